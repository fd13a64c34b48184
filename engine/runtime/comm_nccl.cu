/* comm_nccl.cu — the NCCL transport of CUDA pipeline ranks (comm_cuda.cu chooses it at start-up:
 * one GPU per rank). ncclSend / ncclRecv on one two-rank communicator per directed link between
 * neighbouring ranks, each side on its own stream, so transfers overlap compute and the two
 * directions never queue behind each other. NCCL has no tags: the sender announces each message
 * (tag, size) over MPI before its ncclSend, and the receiver issues its ncclRecv calls in the
 * announced order into the buffer posted for that tag. libnccl is loaded at run time (dlopen: the
 * build's libnccl, the Python package `nvidia-nccl-cu13` beside the installed engine, or the
 * loader's path). Without NCCL headers (no TD_WITH_NCCL) this file is empty.
 */
#include "comm_cuda.cuh"

#ifdef TD_WITH_NCCL
#include <dlfcn.h>
#include <unistd.h>

#define CTRL_TAG 32000 /* NCCL transport: "tag, size" announcements */

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

td_status td_nccl_isend(td_comm *c, const void *buf, int64_t bytes, int peer, int tag,
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

td_status td_nccl_irecv(td_comm *c, void *buf, int64_t bytes, int peer, int tag, void *stream,
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

td_status td_nccl_wait(td_comm *c, td_request *r, void *stream) {
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
td_status td_nccl_load(td_comm *c) {
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
td_status td_nccl_links(td_comm *c) {
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
