/* comm_cuda.cuh — what comm_cuda.cu (memory, time marks, the CUDA IPC transport, start-up) and
 * comm_nccl.cu (the NCCL transport) share: the state of a CUDA rank's td_comm, the request, the
 * error helpers, and the NCCL transport's entry points. Private to engine/runtime.
 */
#ifndef TD_COMM_CUDA_CUH
#define TD_COMM_CUDA_CUH

#include <cuda_runtime.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "comm.h"
}

#ifdef TD_WITH_NCCL
#include <nccl.h>
#endif

/* ---- state ----------------------------------------------------------------------------------- */

typedef struct {
    void *base;
    size_t size;
    cudaIpcMemHandle_t handle;
} dev_block;

typedef struct {
    int peer, tag;
    cudaEvent_t ev;
    cudaIpcEventHandle_t handle;
} keyed_event;

typedef struct {
    int peer;
    cudaIpcMemHandle_t handle;
    void *ptr;
} opened_mem;

typedef struct {
    int64_t bytes, offset;
    cudaIpcMemHandle_t mem;
} ready_msg;

typedef struct {
    cudaIpcEventHandle_t ev;
} done_msg;

typedef struct {
    int64_t tag, bytes;
} ctrl_msg;

#ifdef TD_WITH_NCCL
typedef struct {
    ncclResult_t (*GetUniqueId)(ncclUniqueId *);
    ncclResult_t (*CommInitRank)(ncclComm_t *, int, ncclUniqueId, int);
    ncclResult_t (*Send)(const void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*Recv)(void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*CommDestroy)(ncclComm_t);
    const char *(*GetErrorString)(ncclResult_t);
    ncclResult_t (*GetVersion)(int *);
} nccl_fns;
#endif

struct td_request;

/* one directed link to or from a peer (NCCL transport) */
typedef struct {
    int peer, out; /* out: this rank sends on it */
#ifdef TD_WITH_NCCL
    ncclComm_t comm;
#endif
    cudaStream_t stream;
    cudaEvent_t ev_in; /* the compute stream's position, for the link stream to wait on */
    /* receiving side: announcements not yet issued (FIFO) and posted receives */
    ctrl_msg *queue;
    int qn, qcap;
    struct td_request **posted;
    int pn, pcap;
} link_t;

typedef struct {
    int nccl; /* 1: NCCL transport, 0: CUDA IPC */
    void *mpi_impl; /* comm_mpi.c's state, given back at finalize */
    td_status (*mpi_mark)(td_comm *, void *, int *);
    dev_block *blocks;
    int nblocks, cap_blocks;
    keyed_event *send_ev, *recv_ev;
    int nsend_ev, cap_send_ev, nrecv_ev, cap_recv_ev;
    opened_mem *mems;
    int nmems, cap_mems;
    /* time marks */
    cudaEvent_t *marks;
    int nmarks, cap_marks;
    cudaEvent_t ref;
    cudaEvent_t order_ev; /* cu_follow's: orders one stage's stream after another's */
    cudaStream_t clock_stream;
    link_t links[4]; /* to and from the previous and the next rank */
    int nlinks;
    void *nccl_lib;
#ifdef TD_WITH_NCCL
    nccl_fns f;
#endif
} cuda_impl;

struct td_request {
    int kind; /* 0 ipc send, 1 ipc recv, 2 nccl send, 3 nccl recv */
    int peer, tag;
    MPI_Request mreq[2];
    ready_msg ready;
    done_msg done;
    void *buf;
    int64_t bytes;
    int issued;
    cudaEvent_t ev;
};

#define IMPL(c) ((cuda_impl *)(c)->impl)

static inline td_status cuda_err(td_comm *c, const char *what, cudaError_t e) {
    cudaGetLastError();
    snprintf(c->err, sizeof c->err, "%s failed: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
    return e == cudaErrorMemoryAllocation ? TD_ERR_NOMEM : TD_ERR_COMM;
}
#define CK(call)                                                                                  \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess) return cuda_err(c, #call, e_);                                     \
    } while (0)

static inline td_status mpi_err(td_comm *c, int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    snprintf(c->err, sizeof c->err, "%s failed: %s", what, msg);
    return TD_ERR_COMM;
}
#define MPI_CK(call)                                                                              \
    do {                                                                                          \
        int rc_ = (call);                                                                         \
        if (rc_ != MPI_SUCCESS) return mpi_err(c, rc_, #call);                                    \
    } while (0)

/* grow *arr (elements of size `es`) to hold one more than *n */
static inline int grow(void **arr, int *cap, int n, size_t es) {
    if (n < *cap) return 1;
    int nc = *cap ? 2 * *cap : 16;
    void *p = realloc(*arr, es * (size_t)nc);
    if (!p) return 0;
    *arr = p, *cap = nc;
    return 1;
}
#define GROW(arr, cap, n) grow((void **)&(arr), &(cap), (n), sizeof(*(arr)))

#ifdef TD_WITH_NCCL
/* The NCCL transport (comm_nccl.cu): libnccl loaded at run time, one two-rank communicator per
 * directed link to a neighbour, and comm.h's isend / irecv / wait over them. */
td_status td_nccl_load(td_comm *c);
td_status td_nccl_links(td_comm *c);
td_status td_nccl_isend(td_comm *c, const void *buf, int64_t bytes, int peer, int tag,
                        void *stream, td_request **out);
td_status td_nccl_irecv(td_comm *c, void *buf, int64_t bytes, int peer, int tag, void *stream,
                        td_request **out);
td_status td_nccl_wait(td_comm *c, td_request *r, void *stream);
#endif

#endif
