/* runtime.h — the pipeline executor: walks one rank's list of schedule actions.
 *
 * The schedule (which action runs when) is data produced by harness/schedule.py and read from
 * CSV; the executor holds no policy. It is a client of the public ABI (tandem.h) and of the
 * comm interface (comm.h) only.
 */
#ifndef TD_RUNTIME_H
#define TD_RUNTIME_H

#include <stdint.h>
#include <stdio.h>

#include "comm.h"
#include "tandem.h"

enum { ACT_F = 0, ACT_BW = 1, ACT_B = 2, ACT_W = 3 };

typedef struct {
    int32_t kind, stage, microbatch;
} td_action;

/* Everything one rank needs to run; read from the run file by main.c. */
typedef struct {
    int64_t n_layer, n_embd, n_head, vocab_size, n_positions, seq_len;
    int64_t batch_size;   /* sequences per optimizer step (all micro-batches) */
    int64_t microbatches; /* M */
    int64_t chunks;       /* V: virtual stages per rank; stages S = P * V */
    int64_t steps, threads;
    int64_t layers[256];  /* optional per-virtual-stage layer counts (0 = balanced) */
    int64_t n_layers_given;
    int64_t save_grads_step; /* step whose gradients are written (-1: none) */
    int64_t backend;         /* 0 cpu, 1 cuda (one stage per rank on the rank's GPU) */
    int64_t bf16;            /* 1: bf16 compute (cuda) */
    int64_t checkpoint_every; /* K > 0: after every K-th step each rank writes its stages' states
                                 to checkpoint_dir/step_<8 digits>/stage<s>.safetensors; 0: never */
    int64_t resume_step;      /* S > 0: start at step S from checkpoint_dir/step_<S>/ (0: fresh) */
    int64_t on_nonfinite;     /* 0: stop at a non-finite loss or norm; 1: skip that step's update */
    int64_t family;           /* 0 GPT-2, 1 Llama (with n_kv_head, ffn_dim, rope_theta, norm_eps) */
    int64_t n_kv_head, ffn_dim;
    double rope_theta, norm_eps;
    char checkpoint_dir[1024];
    double lr, beta1, beta2, eps, weight_decay, grad_clip;
    char weights[1024], inputs[1024], targets[1024], schedule[1024], out[1024];
} td_run_config;

/* One rank's actions (in order) and the stage -> rank map (stage s on rank s % P). */
typedef struct {
    td_action *actions;
    int32_t count;
} td_rank_plan;

/* Reads the CSV `rank,index,kind,stage,microbatch` and keeps this rank's actions. */
td_status td_plan_read(td_rank_plan *plan, char *err, size_t errlen, const char *path, int rank,
                       int64_t stages, int64_t microbatches);
/* The same over an open stream (path names it in messages; the caller closes it). */
td_status td_plan_parse(td_rank_plan *plan, char *err, size_t errlen, FILE *f, const char *path,
                        int rank, int64_t stages, int64_t microbatches);

/* Runs steps [resume_step, steps); writes losses.csv (last stage's rank; step, loss, grad_norm,
 * step_s, skipped), timeline_rank<r>.csv, rank<r>.json
 * (transport, device, device memory, stages), and
 * params_stage<s>.safetensors / grads_stage<s>.safetensors for this rank's stages into cfg->out.
 * On failure returns a status with a message in err (the caller aborts the job). */
td_status td_run_pipeline(const td_run_config *cfg, const td_rank_plan *plan, td_comm *comm,
                          char *err, size_t errlen);

#endif /* TD_RUNTIME_H */
