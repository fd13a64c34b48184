/* main.c — tandem-engine: the program one MPI rank of a pipelined training run executes.
 *
 *   mpirun -n P tandem-engine RUNFILE
 *
 * RUNFILE holds `key value` lines (written by harness/pipeline.py, read by runfile.c): model sizes, batch_size,
 * microbatches, chunks, steps, optimizer settings, backend (0 cpu, 1 cuda) and bf16, and the
 * paths weights, inputs, targets, schedule, out. CUDA ranks take the GPU transport of
 * td_comm_cuda_init (NCCL, or CUDA IPC when ranks share a GPU). Any failure prints "tandem-engine: rank R: message" and aborts every rank with
 * exit code 3, so no rank is left waiting on a dead peer.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runfile.h"
#include "runtime.h"

int main(int argc, char **argv) {
    td_comm comm;
    memset(&comm, 0, sizeof comm);
    if (td_comm_mpi_init(&comm, &argc, &argv) != TD_OK) {
        fprintf(stderr, "tandem-engine: %s\n", comm.err);
        return 3;
    }
    char err[2048] = {0};
    td_run_config cfg;
    td_rank_plan plan = {NULL, 0};
    td_status st = TD_OK;
    if (argc != 2) {
        snprintf(err, sizeof err, "usage: mpirun -n P tandem-engine RUNFILE");
        st = TD_ERR_ARG;
    } else if ((st = td_runfile_read(&cfg, err, sizeof err, argv[1])) != TD_OK) {
        /* err names the line and the key */
    } else if (cfg.n_layers_given && cfg.n_layers_given != comm.size * cfg.chunks) {
        snprintf(err, sizeof err, "'layers' lists %lld stages but the run has %d ranks x %lld chunks",
                 (long long)cfg.n_layers_given, comm.size, (long long)cfg.chunks);
        st = TD_ERR_CONFIG;
    } else if (cfg.backend < 0 || cfg.backend > 1 || (cfg.bf16 && cfg.backend != 1)) {
        snprintf(err, sizeof err, "run file: backend=%lld bf16=%lld (backend 0 = cpu, 1 = cuda; bf16 needs cuda)",
                 (long long)cfg.backend, (long long)cfg.bf16);
        st = TD_ERR_CONFIG;
    } else if (cfg.backend == 1 && (st = td_comm_cuda_init(&comm)) != TD_OK) {
        snprintf(err, sizeof err, "%s", comm.err);
    } else {
        st = td_plan_read(&plan, err, sizeof err, cfg.schedule, comm.rank,
                          comm.size * cfg.chunks, cfg.microbatches);
        if (!st) st = td_run_pipeline(&cfg, &plan, &comm, err, sizeof err);
    }
    free(plan.actions);
    if (st != TD_OK) {
        fprintf(stderr, "tandem-engine: rank %d: %s: %s\n", comm.rank, td_status_name(st), err);
        comm.abort(&comm, 3);
        return 3;
    }
    if (cfg.backend == 1) td_comm_cuda_finalize(&comm);
    td_comm_mpi_finalize(&comm);
    return 0;
}
