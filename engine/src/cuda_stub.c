/* cuda_stub.c — td_cuda_ops for a library built without CUDA: there is no device backend, and
 * td_model_build says so when backend=cuda is asked for. */
#include "internal.h"

const td_backend_ops *td_cuda_ops(void) { return NULL; }
