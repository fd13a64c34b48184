/* main.c — tandem-engine: the program one MPI rank of a pipelined training run executes.
 *
 *   mpirun -n P tandem-engine RUNFILE
 *
 * RUNFILE holds `key value` lines (written by harness/pipeline.py): model sizes, batch_size,
 * microbatches, chunks, steps, optimizer settings, backend (0 cpu, 1 cuda) and bf16, and the
 * paths weights, inputs, targets, schedule, out. CUDA ranks take the GPU transport of
 * td_comm_cuda_init (NCCL, or CUDA IPC when ranks share a GPU). Any failure prints "tandem-engine: rank R: message" and aborts every rank with
 * exit code 3, so no rank is left waiting on a dead peer.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"

static int parse_runfile(td_run_config *cfg, char *err, size_t errlen, const char *path) {
    memset(cfg, 0, sizeof *cfg);
    cfg->microbatches = 1, cfg->chunks = 1, cfg->steps = 1, cfg->save_grads_step = -1;
    cfg->lr = 1e-3, cfg->beta1 = 0.9, cfg->beta2 = 0.95, cfg->eps = 1e-8;
    cfg->weight_decay = 0.1, cfg->grad_clip = 1.0;
    FILE *f = fopen(path, "r");
    if (!f) return snprintf(err, errlen, "cannot open run file '%s'", path), 0;
    char line[2048], key[64], value[1024];
    int lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        if (line[0] == '#' || line[0] == '\n') continue;
        if (sscanf(line, "%63s %1023[^\n]", key, value) != 2) {
            fclose(f);
            return snprintf(err, errlen, "run file '%s' line %d: expected 'key value'", path, lineno), 0;
        }
        struct { const char *k; int64_t *v; } ints[] = {
            {"n_layer", &cfg->n_layer}, {"n_embd", &cfg->n_embd}, {"n_head", &cfg->n_head},
            {"vocab_size", &cfg->vocab_size}, {"n_positions", &cfg->n_positions},
            {"seq_len", &cfg->seq_len}, {"batch_size", &cfg->batch_size},
            {"microbatches", &cfg->microbatches}, {"chunks", &cfg->chunks}, {"steps", &cfg->steps},
            {"threads", &cfg->threads}, {"save_grads_step", &cfg->save_grads_step},
            {"backend", &cfg->backend}, {"bf16", &cfg->bf16}};
        struct { const char *k; double *v; } fl[] = {
            {"lr", &cfg->lr}, {"beta1", &cfg->beta1}, {"beta2", &cfg->beta2}, {"eps", &cfg->eps},
            {"weight_decay", &cfg->weight_decay}, {"grad_clip", &cfg->grad_clip}};
        struct { const char *k; char *v; } strs[] = {
            {"weights", cfg->weights}, {"inputs", cfg->inputs}, {"targets", cfg->targets},
            {"schedule", cfg->schedule}, {"out", cfg->out}};
        int found = 0;
        for (size_t i = 0; i < sizeof ints / sizeof ints[0] && !found; i++)
            if (!strcmp(key, ints[i].k)) *ints[i].v = strtoll(value, NULL, 10), found = 1;
        for (size_t i = 0; i < sizeof fl / sizeof fl[0] && !found; i++)
            if (!strcmp(key, fl[i].k)) *fl[i].v = strtod(value, NULL), found = 1;
        for (size_t i = 0; i < sizeof strs / sizeof strs[0] && !found; i++)
            if (!strcmp(key, strs[i].k)) snprintf(strs[i].v, 1024, "%s", value), found = 1;
        if (!found && !strcmp(key, "layers")) { /* comma-separated per-stage layer counts */
            char *p = value;
            cfg->n_layers_given = 0;
            while (*p && cfg->n_layers_given < 256) {
                cfg->layers[cfg->n_layers_given++] = strtoll(p, &p, 10);
                if (*p == ',') p++;
                else break;
            }
            found = 1;
        }
        if (!found) {
            fclose(f);
            return snprintf(err, errlen, "run file '%s' line %d: unknown key '%s'", path, lineno, key), 0;
        }
    }
    fclose(f);
    return 1;
}

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
    } else if (!parse_runfile(&cfg, err, sizeof err, argv[1])) {
        st = TD_ERR_CONFIG;
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
