/* comm_mpi.c — td_comm over MPI point-to-point and MPI_Allreduce, for CPU pipeline ranks.
 *
 * Buffers are host memory and streams are ignored: a wait blocks the host. Errors return to the
 * caller (MPI_ERRORS_RETURN) so the executor can print a rank-tagged message before td_comm.abort
 * takes the whole job down with MPI_Abort. comm_cuda.cu reuses the collective, clock and abort
 * functions for GPU ranks.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, CLOCK_MONOTONIC under -std=c11 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm.h"

struct td_request {
    MPI_Request req;
};

typedef struct {
    double *marks;
    int nmarks, cap;
} mpi_impl;

static td_status mpi_fail(td_comm *c, int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    snprintf(c->err, sizeof c->err, "%s failed: %s", what, msg);
    return TD_ERR_COMM;
}

static void *mpi_alloc(td_comm *c, size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) snprintf(c->err, sizeof c->err, "out of host memory for a %zu-byte message buffer", bytes);
    return p;
}

static void mpi_release(td_comm *c, void *buf) { (void)c; free(buf); }

static td_status p2p(td_comm *c, void *buf, int64_t bytes, int peer, int tag, td_request **out,
                     int send) {
    if (bytes > INT32_MAX) {
        snprintf(c->err, sizeof c->err, "message of %lld bytes exceeds MPI's int count", (long long)bytes);
        return TD_ERR_COMM;
    }
    td_request *r = malloc(sizeof *r);
    if (!r) return snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
    int rc = send ? MPI_Isend(buf, (int)bytes, MPI_BYTE, peer, tag, MPI_COMM_WORLD, &r->req)
                  : MPI_Irecv(buf, (int)bytes, MPI_BYTE, peer, tag, MPI_COMM_WORLD, &r->req);
    if (rc != MPI_SUCCESS) {
        free(r);
        return mpi_fail(c, rc, send ? "MPI_Isend" : "MPI_Irecv");
    }
    *out = r;
    return TD_OK;
}

static td_status mpi_isend(td_comm *c, const void *buf, int64_t bytes, int peer, int tag,
                           void *stream, td_request **req) {
    (void)stream;
    return p2p(c, (void *)buf, bytes, peer, tag, req, 1);
}
static td_status mpi_irecv(td_comm *c, void *buf, int64_t bytes, int peer, int tag, void *stream,
                           td_request **req) {
    (void)stream;
    return p2p(c, buf, bytes, peer, tag, req, 0);
}

static td_status mpi_wait(td_comm *c, td_request *r, void *stream) {
    (void)stream;
    int rc = MPI_Wait(&r->req, MPI_STATUS_IGNORE);
    free(r);
    return rc == MPI_SUCCESS ? TD_OK : mpi_fail(c, rc, "MPI_Wait");
}

static td_status mpi_add(td_comm *c, float *dst, const float *src, int64_t n, void *stream) {
    (void)c, (void)stream;
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
    return TD_OK;
}

static td_status mpi_allreduce(td_comm *c, double *buf, int n) {
    int rc = MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return rc == MPI_SUCCESS ? TD_OK : mpi_fail(c, rc, "MPI_Allreduce");
}

static td_status mpi_barrier(td_comm *c) {
    int rc = MPI_Barrier(MPI_COMM_WORLD);
    return rc == MPI_SUCCESS ? TD_OK : mpi_fail(c, rc, "MPI_Barrier");
}

/* CLOCK_MONOTONIC, not MPI_Wtime: Open MPI 5's MPI_Wtime counts from an epoch each process
 * sets for itself at start-up, so two ranks' timelines were milliseconds apart (a rank's F
 * appeared to run before the F it received from) and every cross-rank figure (step wall time,
 * bubble per rank) was wrong. The monotonic clock is one clock for every process of a host. */
static double host_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double mpi_now(td_comm *c) { (void)c; return host_now(); }

static td_status mpi_follow(td_comm *c, void *before, void *after) {
    (void)c, (void)before, (void)after; /* CPU ranks run their actions in order already */
    return TD_OK;
}

static td_status mpi_mark(td_comm *c, void *stream, int *out_id) {
    (void)stream;
    mpi_impl *im = (mpi_impl *)c->impl;
    if (im->nmarks == im->cap) {
        int cap = im->cap ? 2 * im->cap : 256;
        double *p = realloc(im->marks, sizeof(double) * (size_t)cap);
        if (!p) return snprintf(c->err, sizeof c->err, "out of memory for time marks"), TD_ERR_NOMEM;
        im->marks = p, im->cap = cap;
    }
    im->marks[im->nmarks] = host_now();
    *out_id = im->nmarks++;
    return TD_OK;
}

static td_status mpi_marks_read(td_comm *c, double *out, int n) {
    mpi_impl *im = (mpi_impl *)c->impl;
    if (n > im->nmarks) return snprintf(c->err, sizeof c->err, "%d marks asked for, %d taken", n, im->nmarks), TD_ERR_INTERNAL;
    memcpy(out, im->marks, sizeof(double) * (size_t)n);
    im->nmarks = 0;
    return TD_OK;
}

static void mpi_abort(td_comm *c, int code) {
    (void)c;
    fflush(stdout);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
}

td_status td_comm_mpi_init(td_comm *c, int *argc, char ***argv) {
    int rc = MPI_Init(argc, argv);
    if (rc != MPI_SUCCESS) return mpi_fail(c, rc, "MPI_Init");
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &c->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &c->size);
    c->impl = calloc(1, sizeof(mpi_impl));
    if (!c->impl) return snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
    c->name = "mpi";
    c->device = -1;
    snprintf(c->device_name, sizeof c->device_name, "cpu");
    c->alloc = mpi_alloc;
    c->release = mpi_release;
    c->isend = mpi_isend;
    c->irecv = mpi_irecv;
    c->wait = mpi_wait;
    c->add = mpi_add;
    c->allreduce_sum = mpi_allreduce;
    c->barrier = mpi_barrier;
    c->now = mpi_now;
    c->mark = mpi_mark;
    c->marks_read = mpi_marks_read;
    c->follow = mpi_follow;
    c->abort = mpi_abort;
    return TD_OK;
}

void td_comm_mpi_finalize(td_comm *c) {
    mpi_impl *im = (mpi_impl *)c->impl;
    if (im) free(im->marks);
    free(im);
    c->impl = NULL;
    MPI_Finalize();
}
