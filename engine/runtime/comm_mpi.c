/* comm_mpi.c — td_comm over MPI point-to-point and MPI_Allreduce, for CPU pipeline ranks.
 *
 * Errors return to the caller (MPI_ERRORS_RETURN) so the executor can print a rank-tagged
 * message before td_comm.abort takes the whole job down with MPI_Abort.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#include "comm.h"

struct td_request {
    MPI_Request req;
};

static td_status mpi_fail(td_comm *c, int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    snprintf(c->err, sizeof c->err, "%s failed: %s", what, msg);
    return TD_ERR_COMM;
}

static td_status p2p(td_comm *c, float *buf, int64_t n, int peer, int tag, td_request **out,
                     int send) {
    if (n > INT32_MAX) {
        snprintf(c->err, sizeof c->err, "message of %lld floats exceeds MPI's int count", (long long)n);
        return TD_ERR_COMM;
    }
    td_request *r = malloc(sizeof *r);
    if (!r) return snprintf(c->err, sizeof c->err, "out of memory"), TD_ERR_NOMEM;
    int rc = send ? MPI_Isend(buf, (int)n, MPI_FLOAT, peer, tag, MPI_COMM_WORLD, &r->req)
                  : MPI_Irecv(buf, (int)n, MPI_FLOAT, peer, tag, MPI_COMM_WORLD, &r->req);
    if (rc != MPI_SUCCESS) {
        free(r);
        return mpi_fail(c, rc, send ? "MPI_Isend" : "MPI_Irecv");
    }
    *out = r;
    return TD_OK;
}

static td_status mpi_isend(td_comm *c, const float *buf, int64_t n, int peer, int tag, td_request **req) {
    return p2p(c, (float *)buf, n, peer, tag, req, 1);
}
static td_status mpi_irecv(td_comm *c, float *buf, int64_t n, int peer, int tag, td_request **req) {
    return p2p(c, buf, n, peer, tag, req, 0);
}

static td_status mpi_wait(td_comm *c, td_request *r) {
    int rc = MPI_Wait(&r->req, MPI_STATUS_IGNORE);
    free(r);
    return rc == MPI_SUCCESS ? TD_OK : mpi_fail(c, rc, "MPI_Wait");
}

static td_status mpi_allreduce(td_comm *c, double *buf, int n) {
    int rc = MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return rc == MPI_SUCCESS ? TD_OK : mpi_fail(c, rc, "MPI_Allreduce");
}

static td_status mpi_exchange(td_comm *c, float *recv, const float *send, int64_t n, int peer, int tag) {
    if (n > INT32_MAX) return snprintf(c->err, sizeof c->err, "exchange too large"), TD_ERR_COMM;
    int rc = MPI_Sendrecv(send, (int)n, MPI_FLOAT, peer, tag, recv, (int)n, MPI_FLOAT, peer, tag,
                          MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    return rc == MPI_SUCCESS ? TD_OK : mpi_fail(c, rc, "MPI_Sendrecv");
}

static td_status mpi_barrier(td_comm *c) {
    int rc = MPI_Barrier(MPI_COMM_WORLD);
    return rc == MPI_SUCCESS ? TD_OK : mpi_fail(c, rc, "MPI_Barrier");
}

static double mpi_now(td_comm *c) { (void)c; return MPI_Wtime(); }

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
    c->isend = mpi_isend;
    c->irecv = mpi_irecv;
    c->wait = mpi_wait;
    c->allreduce_sum = mpi_allreduce;
    c->exchange = mpi_exchange;
    c->barrier = mpi_barrier;
    c->now = mpi_now;
    c->abort = mpi_abort;
    return TD_OK;
}

void td_comm_mpi_finalize(td_comm *c) {
    (void)c;
    MPI_Finalize();
}
