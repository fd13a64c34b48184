/* comm_cuda.cu — td_comm for CUDA pipeline ranks: device buffers, transfers ordered on streams.
 *
 * Two transports behind comm.h, chosen at start-up (td_comm_cuda_init):
 *   nccl      one GPU per rank: ncclSend / ncclRecv, one two-rank communicator per directed link
 *             between neighbouring ranks, each side on its own stream, so transfers overlap compute
 *             and the two directions never queue behind each other. NCCL has no tags: the sender
 *             announces each message (tag, size) over MPI before its ncclSend, and the receiver
 *             issues its ncclRecv calls in the announced order into the buffer posted for that tag.
 *             libnccl is loaded at run time (dlopen: the build's libnccl, the Python package
 *             `nvidia-nccl-cu13` beside the installed engine, or the loader's path).
 *   cuda-ipc  ranks sharing a GPU (NCCL refuses two ranks on one device): every receive buffer is
 *             a cudaMalloc'd block whose IPC handle the receiver sends with a "ready" message; the
 *             sender copies into it on its own stream (device to device), records an interprocess
 *             event and answers "done" with the event's handle; the receiver's stream waits on that
 *             event. The host waits only for the small MPI messages, never for the copy.
 * Collectives on host doubles, the clock and abort stay MPI's (comm_mpi.c). Time marks are CUDA
 * events resolved against one reference event per step. Nothing here exits; errors name the call.
 */
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern "C" {
#include "comm.h"
}

#ifdef TD_WITH_NCCL
#include <nccl.h>
#endif

#define CTRL_TAG 32000 /* NCCL transport: "tag, size" announcements */

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

static td_status cuda_err(td_comm *c, const char *what, cudaError_t e) {
    cudaGetLastError();
    snprintf(c->err, sizeof c->err, "%s failed: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
    return e == cudaErrorMemoryAllocation ? TD_ERR_NOMEM : TD_ERR_COMM;
}
#define CK(call)                                                                                  \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess) return cuda_err(c, #call, e_);                                     \
    } while (0)

static td_status mpi_err(td_comm *c, int rc, const char *what) {
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
static int grow(void **arr, int *cap, int n, size_t es) {
    if (n < *cap) return 1;
    int nc = *cap ? 2 * *cap : 16;
    void *p = realloc(*arr, es * (size_t)nc);
    if (!p) return 0;
    *arr = p, *cap = nc;
    return 1;
}
#define GROW(arr, cap, n) grow((void **)&(arr), &(cap), (n), sizeof(*(arr)))

/* ---- memory ---------------------------------------------------------------------------------- */

static void *cu_alloc(td_comm *c, size_t bytes) {
    cuda_impl *im = IMPL(c);
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 256);
    if (e != cudaSuccess) {
        size_t fr = 0, tot = 0;
        cudaGetLastError();
        cudaMemGetInfo(&fr, &tot);
        snprintf(c->err, sizeof c->err, "cudaMalloc of %zu bytes for message buffers failed (%s); %zu of %zu bytes free on device %d. HINT: fewer micro-batches or a smaller micro-batch",
                 bytes, cudaGetErrorString(e), fr, tot, c->device);
        return NULL;
    }
    if (!GROW(im->blocks, im->cap_blocks, im->nblocks)) {
        cudaFree(p);
        snprintf(c->err, sizeof c->err, "out of host memory");
        return NULL;
    }
    dev_block *b = &im->blocks[im->nblocks];
    memset(b, 0, sizeof *b);
    b->base = p, b->size = bytes;
    if (!im->nccl && (e = cudaIpcGetMemHandle(&b->handle, p)) != cudaSuccess) {
        cudaGetLastError();
        cudaFree(p);
        snprintf(c->err, sizeof c->err, "cudaIpcGetMemHandle failed (%s)", cudaGetErrorString(e));
        return NULL;
    }
    im->nblocks++;
    c->bytes += (int64_t)bytes;
    return p;
}

static void cu_release(td_comm *c, void *buf) {
    cuda_impl *im = IMPL(c);
    if (!buf) return;
    for (int i = 0; i < im->nblocks; i++)
        if (im->blocks[i].base == buf) {
            cudaFree(buf);
            c->bytes -= (int64_t)im->blocks[i].size;
            im->blocks[i] = im->blocks[--im->nblocks];
            return;
        }
}

static __global__ void add_kernel(float *dst, const float *src, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] += src[i];
}

static td_status cu_add(td_comm *c, float *dst, const float *src, int64_t n, void *stream) {
    long long blocks = (n + 255) / 256;
    add_kernel<<<(unsigned)(blocks > 4096 ? 4096 : blocks < 1 ? 1 : blocks), 256, 0, (cudaStream_t)stream>>>(dst, src, (long long)n);
    CK(cudaGetLastError());
    return TD_OK;
}

/* ---- time marks ------------------------------------------------------------------------------- */

static td_status cu_mark(td_comm *c, void *stream, int *out_id) {
    cuda_impl *im = IMPL(c);
    if (!stream) return im->mpi_mark(c, stream, out_id); /* never: CUDA stages have streams */
    if (im->nmarks == im->cap_marks) {
        int cap = im->cap_marks ? 2 * im->cap_marks : 256;
        cudaEvent_t *p = (cudaEvent_t *)realloc(im->marks, sizeof(cudaEvent_t) * (size_t)cap);
        if (!p) return snprintf(c->err, sizeof c->err, "out of memory for time marks"), TD_ERR_NOMEM;
        for (int i = im->cap_marks; i < cap; i++) p[i] = NULL;
        im->marks = p, im->cap_marks = cap;
    }
    if (!im->marks[im->nmarks]) CK(cudaEventCreate(&im->marks[im->nmarks]));
    CK(cudaEventRecord(im->marks[im->nmarks], (cudaStream_t)stream));
    *out_id = im->nmarks++;
    return TD_OK;
}

/* Each mark's time: a reference event recorded now on an idle stream, waited for, and read on the
 * host clock; a mark's time is that minus the device time from the mark to the reference. */
static td_status cu_marks_read(td_comm *c, double *out, int n) {
    cuda_impl *im = IMPL(c);
    if (n > im->nmarks) return snprintf(c->err, sizeof c->err, "%d marks asked for, %d taken", n, im->nmarks), TD_ERR_INTERNAL;
    CK(cudaDeviceSynchronize());
    CK(cudaEventRecord(im->ref, im->clock_stream));
    CK(cudaEventSynchronize(im->ref));
    const double t_ref = c->now(c);
    for (int i = 0; i < n; i++) {
        float ms = 0.f;
        CK(cudaEventElapsedTime(&ms, im->marks[i], im->ref));
        out[i] = t_ref - 1e-3 * (double)ms;
    }
    im->nmarks = 0;
    return TD_OK;
}

/* ---- CUDA IPC transport ----------------------------------------------------------------------- */

static td_status ipc_irecv(td_comm *c, void *buf, int64_t bytes, int peer, int tag, void *stream,
                           td_request **out) {
    cuda_impl *im = IMPL(c);
    (void)stream;
    const dev_block *b = NULL;
    for (int i = 0; i < im->nblocks && !b; i++)
        if ((char *)buf >= (char *)im->blocks[i].base && (char *)buf + bytes <= (char *)im->blocks[i].base + im->blocks[i].size)
            b = &im->blocks[i];
    if (!b) return snprintf(c->err, sizeof c->err, "receive buffer %p (%lld bytes, tag %d) is not a block of this comm's alloc", buf, (long long)bytes, tag), TD_ERR_INTERNAL;
    td_request *r = (td_request *)calloc(1, sizeof *r);
    if (!r) return snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
    r->kind = 1, r->peer = peer, r->tag = tag, r->buf = buf, r->bytes = bytes;
    r->ready.bytes = bytes;
    r->ready.offset = (int64_t)((char *)buf - (char *)b->base);
    r->ready.mem = b->handle;
    int rc = MPI_Isend(&r->ready, (int)sizeof r->ready, MPI_BYTE, peer, 2 * tag, MPI_COMM_WORLD, &r->mreq[0]);
    if (rc == MPI_SUCCESS) rc = MPI_Irecv(&r->done, (int)sizeof r->done, MPI_BYTE, peer, 2 * tag + 1, MPI_COMM_WORLD, &r->mreq[1]);
    if (rc != MPI_SUCCESS) {
        free(r);
        return mpi_err(c, rc, "MPI_Isend/Irecv (IPC ready/done)");
    }
    *out = r;
    return TD_OK;
}

static td_status open_peer_mem(td_comm *c, int peer, const cudaIpcMemHandle_t *h, void **out) {
    cuda_impl *im = IMPL(c);
    for (int i = 0; i < im->nmems; i++)
        if (im->mems[i].peer == peer && !memcmp(&im->mems[i].handle, h, sizeof *h)) return *out = im->mems[i].ptr, TD_OK;
    if (!GROW(im->mems, im->cap_mems, im->nmems)) return snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
    void *p = NULL;
    CK(cudaIpcOpenMemHandle(&p, *h, cudaIpcMemLazyEnablePeerAccess));
    im->mems[im->nmems].peer = peer, im->mems[im->nmems].handle = *h, im->mems[im->nmems].ptr = p;
    im->nmems++;
    *out = p;
    return TD_OK;
}

static td_status ipc_isend(td_comm *c, const void *buf, int64_t bytes, int peer, int tag,
                           void *stream, td_request **out) {
    cuda_impl *im = IMPL(c);
    ready_msg ready;
    MPI_CK(MPI_Recv(&ready, (int)sizeof ready, MPI_BYTE, peer, 2 * tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
    if (ready.bytes != bytes)
        return snprintf(c->err, sizeof c->err, "message tag %d to rank %d: %lld bytes sent, %lld expected", tag, peer, (long long)bytes, (long long)ready.bytes), TD_ERR_COMM;
    void *base = NULL;
    td_status st = open_peer_mem(c, peer, &ready.mem, &base);
    if (st) return st;
    CK(cudaMemcpyAsync((char *)base + ready.offset, buf, (size_t)bytes, cudaMemcpyDefault, (cudaStream_t)stream));
    keyed_event *ke = NULL;
    for (int i = 0; i < im->nsend_ev && !ke; i++)
        if (im->send_ev[i].peer == peer && im->send_ev[i].tag == tag) ke = &im->send_ev[i];
    if (!ke) {
        if (!GROW(im->send_ev, im->cap_send_ev, im->nsend_ev)) return snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
        ke = &im->send_ev[im->nsend_ev];
        ke->peer = peer, ke->tag = tag;
        CK(cudaEventCreateWithFlags(&ke->ev, cudaEventDisableTiming | cudaEventInterprocess));
        CK(cudaIpcGetEventHandle(&ke->handle, ke->ev));
        im->nsend_ev++;
    }
    CK(cudaEventRecord(ke->ev, (cudaStream_t)stream));
    td_request *r = (td_request *)calloc(1, sizeof *r);
    if (!r) return snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
    r->kind = 0, r->peer = peer, r->tag = tag;
    r->done.ev = ke->handle;
    int rc = MPI_Isend(&r->done, (int)sizeof r->done, MPI_BYTE, peer, 2 * tag + 1, MPI_COMM_WORLD, &r->mreq[0]);
    if (rc != MPI_SUCCESS) {
        free(r);
        return mpi_err(c, rc, "MPI_Isend (IPC done)");
    }
    *out = r;
    return TD_OK;
}

static td_status ipc_wait(td_comm *c, td_request *r, void *stream) {
    cuda_impl *im = IMPL(c);
    td_status st = TD_OK;
    if (r->kind == 0) {
        /* the copy runs on the sender's stream: later work there is ordered after it */
        int rc = MPI_Wait(&r->mreq[0], MPI_STATUS_IGNORE);
        free(r);
        return rc == MPI_SUCCESS ? TD_OK : mpi_err(c, rc, "MPI_Wait (IPC done)");
    }
    int rc = MPI_Waitall(2, r->mreq, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS) {
        free(r);
        return mpi_err(c, rc, "MPI_Waitall (IPC ready/done)");
    }
    keyed_event *ke = NULL;
    for (int i = 0; i < im->nrecv_ev && !ke; i++)
        if (im->recv_ev[i].peer == r->peer && im->recv_ev[i].tag == r->tag) ke = &im->recv_ev[i];
    if (!ke) {
        cudaEvent_t ev;
        cudaError_t e = cudaIpcOpenEventHandle(&ev, r->done.ev);
        if (e != cudaSuccess || !GROW(im->recv_ev, im->cap_recv_ev, im->nrecv_ev)) {
            free(r);
            return e != cudaSuccess ? cuda_err(c, "cudaIpcOpenEventHandle", e)
                                    : (snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM);
        }
        ke = &im->recv_ev[im->nrecv_ev++];
        ke->peer = r->peer, ke->tag = r->tag, ke->ev = ev, ke->handle = r->done.ev;
    }
    cudaError_t e = cudaStreamWaitEvent((cudaStream_t)stream, ke->ev, 0);
    if (e != cudaSuccess) st = cuda_err(c, "cudaStreamWaitEvent (IPC message)", e);
    free(r);
    return st;
}

/* ---- NCCL transport --------------------------------------------------------------------------- */

#ifdef TD_WITH_NCCL
static link_t *find_link(cuda_impl *im, int peer, int out) {
    for (int i = 0; i < im->nlinks; i++)
        if (im->links[i].peer == peer && im->links[i].out == out) return &im->links[i];
    return NULL;
}

static td_status nccl_err(td_comm *c, const char *what, ncclResult_t r) {
    snprintf(c->err, sizeof c->err, "%s failed: %s", what, IMPL(c)->f.GetErrorString(r));
    return TD_ERR_COMM;
}
#define NCCL_CK(call)                                                                             \
    do {                                                                                          \
        ncclResult_t r_ = (call);                                                                 \
        if (r_ != ncclSuccess) return nccl_err(c, #call, r_);                                     \
    } while (0)

static td_status nccl_isend(td_comm *c, const void *buf, int64_t bytes, int peer, int tag,
                            void *stream, td_request **out) {
    cuda_impl *im = IMPL(c);
    link_t *L = find_link(im, peer, 1);
    if (!L) return snprintf(c->err, sizeof c->err, "no NCCL link from rank %d to rank %d (only neighbouring ranks exchange)", c->rank, peer), TD_ERR_INTERNAL;
    ctrl_msg msg = {tag, bytes};
    MPI_CK(MPI_Send(&msg, (int)sizeof msg, MPI_BYTE, peer, CTRL_TAG, MPI_COMM_WORLD));
    CK(cudaEventRecord(L->ev_in, (cudaStream_t)stream));
    CK(cudaStreamWaitEvent(L->stream, L->ev_in, 0));
    NCCL_CK(im->f.Send(buf, (size_t)bytes, ncclInt8, 1, L->comm, L->stream));
    td_request *r = (td_request *)calloc(1, sizeof *r);
    if (!r) return snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
    r->kind = 2, r->peer = peer, r->tag = tag, r->issued = 1;
    CK(cudaEventCreateWithFlags(&r->ev, cudaEventDisableTiming));
    CK(cudaEventRecord(r->ev, L->stream));
    *out = r;
    return TD_OK;
}

/* Issues ncclRecv for the announced messages, in their order, as far as receives are posted. */
static td_status nccl_issue(td_comm *c, link_t *L) {
    cuda_impl *im = IMPL(c);
    while (L->qn > 0) {
        td_request *r = NULL;
        int k = 0;
        for (; k < L->pn; k++)
            if (L->posted[k]->tag == L->queue[0].tag) { r = L->posted[k]; break; }
        if (!r) return TD_OK; /* posted later in this rank's step */
        if (r->bytes != L->queue[0].bytes)
            return snprintf(c->err, sizeof c->err, "message tag %d from rank %d: %lld bytes announced, %lld expected", r->tag, L->peer, (long long)L->queue[0].bytes, (long long)r->bytes), TD_ERR_COMM;
        NCCL_CK(im->f.Recv(r->buf, (size_t)r->bytes, ncclInt8, 0, L->comm, L->stream));
        CK(cudaEventCreateWithFlags(&r->ev, cudaEventDisableTiming));
        CK(cudaEventRecord(r->ev, L->stream));
        r->issued = 1;
        L->posted[k] = L->posted[--L->pn];
        memmove(L->queue, L->queue + 1, sizeof(ctrl_msg) * (size_t)(--L->qn));
    }
    return TD_OK;
}

static td_status nccl_pull(td_comm *c, link_t *L, int block) {
    for (;;) {
        int flag = 1;
        if (!block) MPI_CK(MPI_Iprobe(L->peer, CTRL_TAG, MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE));
        if (!flag) return TD_OK;
        if (!GROW(L->queue, L->qcap, L->qn)) return snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
        MPI_CK(MPI_Recv(&L->queue[L->qn], (int)sizeof(ctrl_msg), MPI_BYTE, L->peer, CTRL_TAG, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
        L->qn++;
        if (block) return TD_OK;
    }
}

static td_status nccl_irecv(td_comm *c, void *buf, int64_t bytes, int peer, int tag, void *stream,
                            td_request **out) {
    cuda_impl *im = IMPL(c);
    (void)stream;
    link_t *L = find_link(im, peer, 0);
    if (!L) return snprintf(c->err, sizeof c->err, "no NCCL link from rank %d to rank %d (only neighbouring ranks exchange)", peer, c->rank), TD_ERR_INTERNAL;
    td_request *r = (td_request *)calloc(1, sizeof *r);
    if (!r || !GROW(L->posted, L->pcap, L->pn)) return free(r), snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
    r->kind = 3, r->peer = peer, r->tag = tag, r->buf = buf, r->bytes = bytes;
    L->posted[L->pn++] = r;
    *out = r;
    td_status st = nccl_pull(c, L, 0);
    return st ? st : nccl_issue(c, L);
}

static td_status nccl_wait(td_comm *c, td_request *r, void *stream) {
    cuda_impl *im = IMPL(c);
    if (r->kind == 3) {
        link_t *L = find_link(im, r->peer, 0);
        td_status st = TD_OK;
        while (!st && !r->issued) {
            if (L->qn > 0) /* an earlier announced message has no posted receive: a bad schedule */
                return snprintf(c->err, sizeof c->err, "rank %d announced message tag %lld before tag %d and this rank has no receive for it", r->peer, (long long)L->queue[0].tag, r->tag), TD_ERR_COMM;
            st = nccl_pull(c, L, 1);
            if (!st) st = nccl_issue(c, L);
        }
        if (st) return st;
    }
    cudaError_t e = cudaStreamWaitEvent((cudaStream_t)stream, r->ev, 0);
    cudaEventDestroy(r->ev);
    free(r);
    return e == cudaSuccess ? TD_OK : cuda_err(c, "cudaStreamWaitEvent (NCCL message)", e);
}

/* libnccl: the library found at build time, the nvidia-nccl wheel beside the installed engine
 * (site-packages/harness/_lib -> site-packages/nvidia/nccl/lib), then the loader's search path. */
static td_status nccl_load(td_comm *c) {
    cuda_impl *im = IMPL(c);
    char cand[4][1200];
    int n = 0;
#ifdef TD_NCCL_LIBRARY
    snprintf(cand[n++], sizeof cand[0], "%s", TD_NCCL_LIBRARY);
#endif
    char exe[1024];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) *slash = 0;
        snprintf(cand[n++], sizeof cand[0], "%s/../../nvidia/nccl/lib/libnccl.so.2", exe);
    }
    snprintf(cand[n++], sizeof cand[0], "libnccl.so.2");
    snprintf(cand[n++], sizeof cand[0], "libnccl.so");
    char tried[1024] = "";
    for (int i = 0; i < n && !im->nccl_lib; i++) {
        im->nccl_lib = dlopen(cand[i], RTLD_NOW | RTLD_LOCAL);
        if (!im->nccl_lib) {
            size_t l = strlen(tried);
            snprintf(tried + l, sizeof tried - l, "%s%s", l ? ", " : "", cand[i]);
        }
    }
    if (!im->nccl_lib)
        return snprintf(c->err, sizeof c->err, "NCCL not found (tried %s). HINT: pip install nvidia-nccl-cu13, or put libnccl.so.2 on LD_LIBRARY_PATH", tried), TD_ERR_CONFIG;
#define SYM(field, name)                                                                          \
    if (!(*(void **)&im->f.field = dlsym(im->nccl_lib, name)))                                    \
        return snprintf(c->err, sizeof c->err, "libnccl lacks %s", name), TD_ERR_CONFIG;
    SYM(GetUniqueId, "ncclGetUniqueId");
    SYM(CommInitRank, "ncclCommInitRank");
    SYM(Send, "ncclSend");
    SYM(Recv, "ncclRecv");
    SYM(CommDestroy, "ncclCommDestroy");
    SYM(GetErrorString, "ncclGetErrorString");
    SYM(GetVersion, "ncclGetVersion");
#undef SYM
    return TD_OK;
}

/* One two-rank communicator per directed link between neighbouring ranks, made in one global
 * order (every rank walks the same list, so the earliest unfinished link always has both ends
 * ready), then one byte through each so that no connection is set up mid-step. */
static td_status nccl_links(td_comm *c) {
    cuda_impl *im = IMPL(c);
    const int P = c->size;
    int pairs[8][2], np = 0;
    for (int r = 0; r < P && P > 1; r++) {
        const int q = (r + 1) % P;
        const int cand[2][2] = {{r, q}, {q, r}};
        for (int k = 0; k < 2; k++) {
            int dup = 0;
            for (int j = 0; j < np; j++) dup |= pairs[j][0] == cand[k][0] && pairs[j][1] == cand[k][1];
            if (dup) continue;
            if (cand[k][0] != c->rank && cand[k][1] != c->rank) continue;
            pairs[np][0] = cand[k][0], pairs[np][1] = cand[k][1], np++;
        }
    }
    /* the global order is (r -> r+1, r+1 -> r) for r ascending; each rank's pairs follow it */
    char *dummy = NULL;
    CK(cudaMalloc((void **)&dummy, 1));
    for (int j = 0; j < np; j++) {
        const int a = pairs[j][0], b = pairs[j][1], out = a == c->rank;
        link_t *L = &im->links[im->nlinks++];
        memset(L, 0, sizeof *L);
        L->peer = out ? b : a, L->out = out;
        ncclUniqueId id;
        if (out) {
            NCCL_CK(im->f.GetUniqueId(&id));
            MPI_CK(MPI_Send(&id, (int)sizeof id, MPI_BYTE, b, CTRL_TAG + 1, MPI_COMM_WORLD));
        } else {
            MPI_CK(MPI_Recv(&id, (int)sizeof id, MPI_BYTE, a, CTRL_TAG + 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
        }
        NCCL_CK(im->f.CommInitRank(&L->comm, 2, id, out ? 0 : 1));
        CK(cudaStreamCreateWithFlags(&L->stream, cudaStreamNonBlocking));
        CK(cudaEventCreateWithFlags(&L->ev_in, cudaEventDisableTiming));
        if (out) NCCL_CK(im->f.Send(dummy, 1, ncclInt8, 1, L->comm, L->stream));
        else NCCL_CK(im->f.Recv(dummy, 1, ncclInt8, 0, L->comm, L->stream));
        CK(cudaStreamSynchronize(L->stream));
    }
    cudaFree(dummy);
    return TD_OK;
}
#endif /* TD_WITH_NCCL */

/* ---- start-up --------------------------------------------------------------------------------- */

extern "C" td_status td_comm_cuda_init(td_comm *c) {
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev < 1) {
        cudaGetLastError();
        snprintf(c->err, sizeof c->err, "backend=cuda but rank %d sees no CUDA device (cudaGetDeviceCount: %s, %d devices). HINT: run on a GPU host; check the driver and CUDA_VISIBLE_DEVICES",
                 c->rank, cudaGetErrorString(e), ndev);
        return TD_ERR_CONFIG;
    }
    /* this rank's device: its rank among the ranks of its host, modulo the visible devices */
    MPI_Comm node;
    int local = 0;
    MPI_CK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &node));
    MPI_Comm_rank(node, &local);
    MPI_Comm_free(&node);
    c->device = local % ndev;
    CK(cudaSetDevice(c->device));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, c->device));
    snprintf(c->device_name, sizeof c->device_name, "%s", prop.name);
    for (char *q = c->device_name; *q; q++)
        if (*q == '"' || *q == '\\') *q = '_';

    /* do two ranks share a GPU? (host name + PCI bus id, gathered from every rank) */
    char me[256], *all = (char *)calloc((size_t)c->size, 256);
    if (!all) return snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
    char host[128] = "";
    gethostname(host, sizeof host - 1);
    char bus[64] = "";
    cudaDeviceGetPCIBusId(bus, sizeof bus, c->device);
    snprintf(me, sizeof me, "%s/%s", host, bus);
    int rc = MPI_Allgather(me, 256, MPI_CHAR, all, 256, MPI_CHAR, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS) return free(all), mpi_err(c, rc, "MPI_Allgather (devices)");
    int shared = -1;
    for (int i = 0; i < c->size && shared < 0; i++)
        for (int j = i + 1; j < c->size && shared < 0; j++)
            if (!strcmp(all + 256 * i, all + 256 * j)) shared = i;
    free(all);

    const char *want = getenv("TANDEM_TRANSPORT");
    if (!want || !*want) want = "auto";
    if (strcmp(want, "auto") && strcmp(want, "nccl") && strcmp(want, "ipc"))
        return snprintf(c->err, sizeof c->err, "TANDEM_TRANSPORT=%s (allowed: auto, nccl, ipc)", want), TD_ERR_CONFIG;
    if (!strcmp(want, "nccl") && shared >= 0)
        return snprintf(c->err, sizeof c->err, "TANDEM_TRANSPORT=nccl needs one GPU per rank, but rank %d shares device %d (%s) with another rank (NCCL refuses a duplicate device). HINT: TANDEM_TRANSPORT=ipc or auto",
                        shared, c->device, me), TD_ERR_CONFIG;

    cuda_impl *im = (cuda_impl *)calloc(1, sizeof(cuda_impl));
    if (!im) return snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
    im->mpi_impl = c->impl;
    im->mpi_mark = c->mark;
    c->impl = im;
    CK(cudaStreamCreateWithFlags(&im->clock_stream, cudaStreamNonBlocking));
    CK(cudaEventCreate(&im->ref));

    int use_nccl = shared < 0 && c->size > 1 && strcmp(want, "ipc");
#ifdef TD_WITH_NCCL
    /* every rank must load NCCL for any to use it */
    char why[512] = "";
    int ok = 1;
    if (use_nccl && nccl_load(c) != TD_OK) ok = 0, snprintf(why, sizeof why, "%s", c->err);
    if (use_nccl) MPI_CK(MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    if (use_nccl && !ok) {
        if (!strcmp(want, "nccl"))
            return snprintf(c->err, sizeof c->err, "TANDEM_TRANSPORT=nccl: %s", why[0] ? why : "NCCL did not load on another rank"), TD_ERR_CONFIG;
        if (c->rank == 0) fprintf(stderr, "tandem-engine: NCCL unavailable (%s); using CUDA IPC copies\n", why[0] ? why : "on another rank");
        use_nccl = 0;
    }
#else
    if (use_nccl && !strcmp(want, "nccl"))
        return snprintf(c->err, sizeof c->err, "TANDEM_TRANSPORT=nccl but this tandem-engine was built without NCCL headers. HINT: pip install nvidia-nccl-cu13 and rebuild"), TD_ERR_CONFIG;
    use_nccl = 0;
#endif
    im->nccl = use_nccl;
    c->alloc = cu_alloc;
    c->release = cu_release;
    c->add = cu_add;
    c->mark = cu_mark;
    c->marks_read = cu_marks_read;
    if (use_nccl) {
#ifdef TD_WITH_NCCL
        c->name = "nccl";
        c->isend = nccl_isend;
        c->irecv = nccl_irecv;
        c->wait = nccl_wait;
        td_status st = nccl_links(c);
        if (st) return st;
#endif
    } else {
        c->name = "cuda-ipc";
        c->isend = ipc_isend;
        c->irecv = ipc_irecv;
        c->wait = ipc_wait;
    }
    return TD_OK;
}

extern "C" void td_comm_cuda_finalize(td_comm *c) {
    cuda_impl *im = IMPL(c);
    if (!im || !c->name || !strcmp(c->name, "mpi")) return;
    cudaDeviceSynchronize();
    for (int i = 0; i < im->nmems; i++) cudaIpcCloseMemHandle(im->mems[i].ptr);
    for (int i = 0; i < im->nblocks; i++) cudaFree(im->blocks[i].base);
    for (int i = 0; i < im->nsend_ev; i++) cudaEventDestroy(im->send_ev[i].ev);
    for (int i = 0; i < im->nrecv_ev; i++) cudaEventDestroy(im->recv_ev[i].ev);
    for (int i = 0; i < im->cap_marks; i++)
        if (im->marks[i]) cudaEventDestroy(im->marks[i]);
    for (int i = 0; i < im->nlinks; i++) {
#ifdef TD_WITH_NCCL
        if (im->links[i].comm) im->f.CommDestroy(im->links[i].comm);
#endif
        free(im->links[i].queue);
        free(im->links[i].posted);
    }
    free(im->blocks), free(im->send_ev), free(im->recv_ev), free(im->mems), free(im->marks);
    c->impl = im->mpi_impl;
    free(im);
}
