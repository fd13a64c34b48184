/* comm_cuda_stub.c — td_comm_cuda_init for a tandem-engine built without CUDA. */
#include <stdio.h>

#include "comm.h"

td_status td_comm_cuda_init(td_comm *c) {
    snprintf(c->err, sizeof c->err,
             "backend=cuda but this tandem-engine was built without CUDA. HINT: build where nvcc "
             "and the CUDA toolkit are found (cmake -DTD_CUDA=ON)");
    return TD_ERR_CONFIG;
}

void td_comm_cuda_finalize(td_comm *c) { (void)c; }
