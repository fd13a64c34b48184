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
 * This file: device memory, time marks, the CUDA IPC transport and start-up; the NCCL transport
 * is comm_nccl.cu, the state both share comm_cuda.cuh.
 * Collectives on host doubles, the clock and abort stay MPI's (comm_mpi.c). Time marks are CUDA
 * events resolved against one reference event per step. Nothing here exits; errors name the call.
 */
#include <cuda_runtime.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm_cuda.cuh"

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

/* One event serves every call: cudaStreamWaitEvent takes the work recorded so far, and a later
 * record does not change what an earlier wait waits for. */
static td_status cu_follow(td_comm *c, void *before, void *after) {
    cuda_impl *im = IMPL(c);
    if (!before || !after || before == after) return TD_OK;
    CK(cudaEventRecord(im->order_ev, (cudaStream_t)before));
    CK(cudaStreamWaitEvent((cudaStream_t)after, im->order_ev, 0));
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
    CK(cudaEventCreateWithFlags(&im->order_ev, cudaEventDisableTiming));

    int use_nccl = shared < 0 && c->size > 1 && strcmp(want, "ipc");
#ifdef TD_WITH_NCCL
    /* every rank must load NCCL for any to use it */
    char why[512] = "";
    int ok = 1;
    if (use_nccl && td_nccl_load(c) != TD_OK) ok = 0, snprintf(why, sizeof why, "%s", c->err);
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
    c->follow = cu_follow;
    if (use_nccl) {
#ifdef TD_WITH_NCCL
        c->name = "nccl";
        c->isend = td_nccl_isend;
        c->irecv = td_nccl_irecv;
        c->wait = td_nccl_wait;
        td_status st = td_nccl_links(c);
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
