/* comm.h — the bytes between pipeline ranks, behind one small interface.
 *
 * The executor (runtime.c) only calls these function pointers; comm_mpi.c implements them over
 * MPI for CPU ranks (an NCCL implementation for GPU ranks plugs in the same way). Requests are
 * opaque; every call returns a td_status and a message in err.
 */
#ifndef TD_COMM_H
#define TD_COMM_H

#include <stdint.h>

#include "tandem.h"

typedef struct td_comm td_comm;
typedef struct td_request td_request;

struct td_comm {
    int rank, size;
    void *impl;
    char err[512];
    /* non-blocking point-to-point of n floats; *req is owned by the comm until waited on */
    td_status (*isend)(td_comm *c, const float *buf, int64_t n, int peer, int tag, td_request **req);
    td_status (*irecv)(td_comm *c, float *buf, int64_t n, int peer, int tag, td_request **req);
    td_status (*wait)(td_comm *c, td_request *req);
    /* in-place sum over all ranks */
    td_status (*allreduce_sum)(td_comm *c, double *buf, int n);
    /* blocking exchange: send n floats to peer and receive n floats from it */
    td_status (*exchange)(td_comm *c, float *recv, const float *send, int64_t n, int peer, int tag);
    td_status (*barrier)(td_comm *c);
    double (*now)(td_comm *c); /* seconds, one clock for every rank of a host */
    /* end every rank now with this exit code (after the caller printed its message) */
    void (*abort)(td_comm *c, int code);
};

td_status td_comm_mpi_init(td_comm *c, int *argc, char ***argv);
void td_comm_mpi_finalize(td_comm *c);

#endif /* TD_COMM_H */
