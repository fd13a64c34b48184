/* comm.h — the bytes between pipeline ranks, behind one small interface.
 *
 * The executor (runtime.c) only calls these function pointers. comm_mpi.c implements them over
 * MPI for CPU ranks (host buffers); comm_cuda.cu upgrades an MPI comm to a GPU transport (device
 * buffers): NCCL point-to-point with one GPU per rank (comm_nccl.cu), or CUDA IPC copies when
 * ranks share a GPU.
 * Transfers are ordered on CUDA streams: a send starts after the work queued so far on `stream`,
 * and a wait makes the work queued after it on `stream` wait for the message (the host blocks only
 * where a transport must). CPU ranks pass stream = NULL and everything is host-ordered.
 * Requests are opaque; every call returns a td_status and a message in err.
 */
#ifndef TD_COMM_H
#define TD_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "tandem.h"

typedef struct td_comm td_comm;
typedef struct td_request td_request;

struct td_comm {
    int rank, size;
    const char *name;      /* the transport: "mpi", "cuda-ipc" or "nccl" */
    int device;            /* this rank's CUDA device, -1 for CPU ranks */
    char device_name[128];
    int64_t bytes;         /* device memory the transport allocated (message buffers) */
    void *impl;
    char err[512];
    /* message buffers in the transport's memory (device memory for GPU transports); NULL and a
     * message in err when out of memory */
    void *(*alloc)(td_comm *c, size_t bytes);
    void (*release)(td_comm *c, void *buf);
    /* non-blocking point-to-point of `bytes` bytes; *req is owned by the comm until waited on.
     * A receive's buffer must come from alloc. One tag per message within a step. */
    td_status (*isend)(td_comm *c, const void *buf, int64_t bytes, int peer, int tag, void *stream,
                       td_request **req);
    td_status (*irecv)(td_comm *c, void *buf, int64_t bytes, int peer, int tag, void *stream,
                       td_request **req);
    td_status (*wait)(td_comm *c, td_request *req, void *stream);
    /* dst[i] += src[i] for n floats, in the transport's memory, ordered on stream */
    td_status (*add)(td_comm *c, float *dst, const float *src, int64_t n, void *stream);
    /* in-place sum over all ranks, host doubles */
    td_status (*allreduce_sum)(td_comm *c, double *buf, int n);
    td_status (*barrier)(td_comm *c);
    double (*now)(td_comm *c); /* seconds, one clock for every rank of a host */
    /* a time mark where `stream` has got to (the host's now() for CPU ranks); marks_read gives
     * the first n marks of the step in seconds on now()'s clock, after the step's device work is
     * done, and starts a new set */
    td_status (*mark)(td_comm *c, void *stream, int *out_id);
    td_status (*marks_read)(td_comm *c, double *out_s, int n);
    /* work queued on `after` from now on runs after the work queued on `before` so far (a rank
     * that holds several stages runs their actions in the schedule's order, one at a time, as the
     * CPU runtime and the schedule simulator do); nothing for CPU ranks */
    td_status (*follow)(td_comm *c, void *before, void *after);
    /* end every rank now with this exit code (after the caller printed its message) */
    void (*abort)(td_comm *c, int code);
};

td_status td_comm_mpi_init(td_comm *c, int *argc, char ***argv);
void td_comm_mpi_finalize(td_comm *c);
/* Turns an initialised MPI comm into a GPU transport: picks this rank's device (local rank modulo
 * the visible devices, made current), then NCCL when every rank has its own GPU and NCCL loads,
 * CUDA IPC when ranks share one. TANDEM_TRANSPORT = auto (default), nccl or ipc forces a choice.
 * A library built without CUDA says so. */
td_status td_comm_cuda_init(td_comm *c);
void td_comm_cuda_finalize(td_comm *c);

#endif /* TD_COMM_H */
