/* runtime.c — executes one rank's share of a pipeline schedule, step after step.
 *
 * Per step: post a receive for every message this rank's actions will need (each (kind, stage,
 * micro-batch) has its own tag and buffer, so arrival order cannot matter), then walk the
 * actions: F and B/BW wait for their input, compute through td_stage_*, and send their output
 * without waiting; then the tied-embedding gradient exchange, the global gradient norm, and
 * AdamW on every local stage. Every action lands in the rank's timeline.
 */
#include "runtime.h"

#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#define FAIL(st, ...) (snprintf(err, errlen, __VA_ARGS__), (st))

/* ---- schedule file --------------------------------------------------------------------------- */

td_status td_plan_read(td_rank_plan *plan, char *err, size_t errlen, const char *path, int rank,
                       int64_t stages, int64_t microbatches) {
    FILE *f = fopen(path, "r");
    if (!f) return FAIL(TD_ERR_IO, "cannot open schedule '%s'", path);
    char line[256];
    int lineno = 1;
    if (!fgets(line, sizeof line, f) || strncmp(line, "rank,index,kind,stage,microbatch", 32) != 0) {
        fclose(f);
        return FAIL(TD_ERR_FORMAT, "schedule '%s' line 1: expected the header 'rank,index,kind,stage,microbatch'", path);
    }
    int cap = 64;
    plan->actions = malloc(sizeof(td_action) * (size_t)cap);
    plan->count = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        int r, idx, stage, mb;
        char kind[8];
        if (line[0] == '\n' || line[0] == 0) continue;
        if (sscanf(line, "%d,%d,%7[A-Z],%d,%d", &r, &idx, kind, &stage, &mb) != 5) {
            fclose(f);
            return FAIL(TD_ERR_FORMAT, "schedule '%s' line %d: cannot parse '%.60s'", path, lineno, line);
        }
        if (r != rank) continue;
        int k = !strcmp(kind, "F") ? ACT_F : !strcmp(kind, "BW") ? ACT_BW : !strcmp(kind, "B") ? ACT_B
              : !strcmp(kind, "W") ? ACT_W : -1;
        if (k < 0 || stage < 0 || stage >= stages || mb < 0 || mb >= microbatches) {
            fclose(f);
            return FAIL(TD_ERR_FORMAT, "schedule '%s' line %d: action %s(stage=%d, mb=%d) is outside kinds F/BW/B/W, stages [0, %lld), micro-batches [0, %lld)",
                        path, lineno, kind, stage, mb, (long long)stages, (long long)microbatches);
        }
        if (plan->count == cap) plan->actions = realloc(plan->actions, sizeof(td_action) * (size_t)(cap *= 2));
        plan->actions[plan->count++] = (td_action){k, stage, mb};
    }
    fclose(f);
    return TD_OK;
}

/* ---- timeline -------------------------------------------------------------------------------- */

typedef struct {
    FILE *f;
    int rank;
    double t0;
} timeline;

static const char *KIND_NAME[] = {"F", "BW", "B", "W"};

static void record(timeline *tl, int step, const char *kind, int stage, int mb, double start,
                   double end) {
    if (tl->f)
        fprintf(tl->f, "%d,%d,%s,%d,%d,%.3f,%.3f\n", tl->rank, step, kind, stage, mb,
                (start - tl->t0) * 1e6, (end - tl->t0) * 1e6);
}

/* ---- executor -------------------------------------------------------------------------------- */

typedef struct {
    td_model *model;
    int stage;
    int32_t *slot_of_mb;  /* micro-batch -> activation slot, -1 when free */
    int32_t *slot_used;   /* slots entries */
    int64_t slots;
    float **act_in, **act_out, **grad_in, **grad_out; /* per micro-batch (B_mb, T, C) */
    td_request **recv_act, **recv_grad, **send_act, **send_grad;
} chunk_state;

/* One tag per message: activations and gradients of each (stage, micro-batch); the tied-wte
 * exchange uses 2*S*M, just past the range. */
static int tag_of(int is_grad, int stage, int mb, int64_t S, int64_t M) { return (int)((is_grad * S + stage) * M + mb); }

static td_status build_stage(td_model **out, const td_run_config *cfg, int stage, int64_t S,
                             int64_t slots, int split, int64_t bmb, char *err, size_t errlen) {
    td_model *m = NULL;
    td_status st = td_model_create(&m);
    if (st) return FAIL(st, "%s", td_last_error());
    struct { const char *k; int64_t v; } ints[] = {
        {"n_layer", cfg->n_layer}, {"n_embd", cfg->n_embd}, {"n_head", cfg->n_head},
        {"vocab_size", cfg->vocab_size}, {"n_positions", cfg->n_positions},
        {"seq_len", cfg->seq_len}, {"batch_size", bmb}, {"threads", cfg->threads},
        {"stage", stage}, {"stages", S}, {"slots", slots}, {"split_backward", split}};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && !st; i++) st = td_model_set_int(m, ints[i].k, ints[i].v);
    if (!st && cfg->n_layers_given) {
        int64_t begin = 0;
        for (int s = 0; s < stage; s++) begin += cfg->layers[s];
        st = td_model_set_int(m, "layer_begin", begin);
        if (!st) st = td_model_set_int(m, "layer_end", begin + cfg->layers[stage]);
    }
    struct { const char *k; double v; } fl[] = {
        {"lr", cfg->lr}, {"beta1", cfg->beta1}, {"beta2", cfg->beta2}, {"eps", cfg->eps},
        {"weight_decay", cfg->weight_decay}, {"grad_clip", cfg->grad_clip}};
    for (size_t i = 0; i < sizeof fl / sizeof fl[0] && !st; i++) st = td_model_set_float(m, fl[i].k, fl[i].v);
    if (!st) st = td_model_build(m);
    if (!st) st = td_model_load_safetensors(m, cfg->weights);
    if (st) {
        snprintf(err, errlen, "stage %d: %s", stage, td_model_last_error(m));
        td_model_free(m);
        return st;
    }
    *out = m;
    return TD_OK;
}

static int local_chunk(const chunk_state *chunks, int nchunks, int stage) {
    for (int c = 0; c < nchunks; c++)
        if (chunks[c].stage == stage) return c;
    return -1;
}

td_status td_run_pipeline(const td_run_config *cfg, const td_rank_plan *plan, td_comm *comm,
                          char *err, size_t errlen) {
    const int P = comm->size, rank = comm->rank;
    const int64_t V = cfg->chunks, S = (int64_t)P * V, M = cfg->microbatches;
    const int64_t bmb = cfg->batch_size / M, T = cfg->seq_len, C = cfg->n_embd;
    const int64_t nact = bmb * T * C; /* floats per activation message */
    const int last_rank = (int)((S - 1) % P);
    td_status st = TD_OK;
    if (cfg->batch_size % M) return FAIL(TD_ERR_CONFIG, "batch_size=%lld is not divisible by microbatches=%lld", (long long)cfg->batch_size, (long long)M);

    /* tokens: inputs on the rank of stage 0, targets on the rank of stage S-1 */
    int32_t *inputs = NULL, *targets = NULL;
    int64_t n_in = 0, n_tg = 0, need = cfg->steps * cfg->batch_size * T;
    if (rank == 0 && (st = td_tokens_read(&inputs, &n_in, cfg->inputs, cfg->vocab_size)))
        return FAIL(st, "%s", td_last_error());
    if (rank == last_rank && (st = td_tokens_read(&targets, &n_tg, cfg->targets, cfg->vocab_size)))
        return FAIL(st, "%s", td_last_error());
    if ((rank == 0 && n_in < need) || (rank == last_rank && n_tg < need))
        return FAIL(TD_ERR_FORMAT, "token shards hold %lld inputs / %lld targets; %lld steps x %lld sequences x %lld tokens need %lld",
                    (long long)n_in, (long long)n_tg, (long long)cfg->steps, (long long)cfg->batch_size, (long long)T, (long long)need);

    /* local stages, their peak live micro-batches (= activation slots) and split backward */
    chunk_state chunks[64];
    int nchunks = 0;
    for (int64_t s = rank; s < S; s += P) {
        if (nchunks == 64) return FAIL(TD_ERR_CONFIG, "more than 64 chunks on one rank");
        memset(&chunks[nchunks], 0, sizeof(chunk_state));
        chunks[nchunks++].stage = (int)s;
    }
    for (int c = 0; c < nchunks; c++) {
        int64_t live = 0, peak = 1;
        int split = 0;
        for (int32_t i = 0; i < plan->count; i++) {
            const td_action *a = &plan->actions[i];
            if (a->stage != chunks[c].stage) continue;
            if (a->kind == ACT_F && ++live > peak) peak = live;
            if (a->kind == ACT_BW || a->kind == ACT_W) live--;
            if (a->kind == ACT_B) split = 1;
        }
        chunk_state *ch = &chunks[c];
        ch->slots = peak;
        if ((st = build_stage(&ch->model, cfg, ch->stage, S, peak, split, bmb, err, errlen))) return st;
        ch->slot_of_mb = malloc(sizeof(int32_t) * (size_t)M);
        ch->slot_used = calloc((size_t)peak, sizeof(int32_t));
        ch->act_in = calloc((size_t)M, sizeof(float *));
        ch->act_out = calloc((size_t)M, sizeof(float *));
        ch->grad_in = calloc((size_t)M, sizeof(float *));
        ch->grad_out = calloc((size_t)M, sizeof(float *));
        ch->recv_act = calloc((size_t)M, sizeof(td_request *));
        ch->recv_grad = calloc((size_t)M, sizeof(td_request *));
        ch->send_act = calloc((size_t)M, sizeof(td_request *));
        ch->send_grad = calloc((size_t)M, sizeof(td_request *));
        for (int64_t mb = 0; mb < M; mb++) {
            ch->act_in[mb] = malloc(sizeof(float) * (size_t)nact);
            ch->act_out[mb] = malloc(sizeof(float) * (size_t)nact);
            ch->grad_in[mb] = malloc(sizeof(float) * (size_t)nact);
            ch->grad_out[mb] = malloc(sizeof(float) * (size_t)nact);
            if (!ch->act_in[mb] || !ch->act_out[mb] || !ch->grad_in[mb] || !ch->grad_out[mb])
                return FAIL(TD_ERR_NOMEM, "out of memory for pipeline buffers");
        }
    }

    char path[1200];
    timeline tl = {NULL, rank, 0};
    snprintf(path, sizeof path, "%s/timeline_rank%d.csv", cfg->out, rank);
    tl.f = fopen(path, "w");
    if (!tl.f) return FAIL(TD_ERR_IO, "cannot write '%s'", path);
    fprintf(tl.f, "rank,step,kind,stage,microbatch,start_us,end_us\n");
    FILE *lossf = NULL;
    if (rank == last_rank) {
        snprintf(path, sizeof path, "%s/losses.csv", cfg->out);
        if (!(lossf = fopen(path, "w"))) return FAIL(TD_ERR_IO, "cannot write '%s'", path);
        fprintf(lossf, "step,loss,grad_norm,step_s\n");
    }
    if ((st = comm->barrier(comm))) return FAIL(st, "%s", comm->err);
    tl.t0 = comm->now(comm);

    /* Test hook TANDEM_CRASH="<rank>:<step>[:kill]": that rank exits abruptly at that step, or
     * with ":kill" dies by SIGKILL without a word, as a rank killed from outside would. */
    const char *crash = getenv("TANDEM_CRASH");
    int crash_rank = -1, crash_step = -1;
    if (crash) sscanf(crash, "%d:%d", &crash_rank, &crash_step);

    for (int64_t step = 0; step < cfg->steps; step++) {
        if (rank == crash_rank && step == crash_step) {
            if (strstr(crash, ":kill")) raise(SIGKILL);
            fprintf(stderr, "tandem-engine: rank %d: TANDEM_CRASH requested, exiting abruptly at step %lld\n", rank, (long long)step);
            fflush(stderr);
            _Exit(9);
        }
        double step_start = comm->now(comm);
        for (int c = 0; c < nchunks; c++) {
            td_model_zero_grad(chunks[c].model);
            for (int64_t mb = 0; mb < M; mb++) chunks[c].slot_of_mb[mb] = -1;
            memset(chunks[c].slot_used, 0, sizeof(int32_t) * (size_t)chunks[c].slots);
        }
        /* post every receive this step will need */
        for (int32_t i = 0; i < plan->count; i++) {
            const td_action *a = &plan->actions[i];
            chunk_state *ch = &chunks[local_chunk(chunks, nchunks, a->stage)];
            if (a->kind == ACT_F && a->stage > 0)
                st = comm->irecv(comm, ch->act_in[a->microbatch], nact, (int)((a->stage - 1) % P),
                                 tag_of(0, a->stage, a->microbatch, S, M), &ch->recv_act[a->microbatch]);
            else if ((a->kind == ACT_BW || a->kind == ACT_B) && a->stage < S - 1)
                st = comm->irecv(comm, ch->grad_in[a->microbatch], nact, (int)((a->stage + 1) % P),
                                 tag_of(1, a->stage, a->microbatch, S, M), &ch->recv_grad[a->microbatch]);
            if (st) return FAIL(st, "%s", comm->err);
        }
        double loss_sum = 0.0;
        for (int32_t i = 0; i < plan->count; i++) {
            const td_action *a = &plan->actions[i];
            const int c = local_chunk(chunks, nchunks, a->stage);
            if (c < 0) return FAIL(TD_ERR_INTERNAL, "action for stage %d on rank %d, which does not hold it", a->stage, rank);
            chunk_state *ch = &chunks[c];
            const int mb = a->microbatch, s = a->stage;
            const int is_first = s == 0, is_last = s == S - 1;
            double t_wait = comm->now(comm), t0;
            if (a->kind == ACT_F) {
                if (!is_first) {
                    if ((st = comm->wait(comm, ch->recv_act[mb]))) return FAIL(st, "%s", comm->err);
                    ch->recv_act[mb] = NULL;
                }
                int32_t slot = -1;
                for (int64_t k = 0; k < ch->slots; k++)
                    if (!ch->slot_used[k]) { slot = (int32_t)k; break; }
                if (slot < 0) return FAIL(TD_ERR_INTERNAL, "no free activation slot for F(stage=%d, mb=%d)", s, mb);
                ch->slot_used[slot] = 1;
                ch->slot_of_mb[mb] = slot;
                const int64_t off = (step * cfg->batch_size + (int64_t)mb * bmb) * T;
                double loss = 0;
                t0 = comm->now(comm);
                if (t0 - t_wait > 1e-6) record(&tl, (int)step, "WAIT", s, mb, t_wait, t0);
                st = td_stage_forward(ch->model, is_last ? NULL : ch->act_out[mb], &loss, slot,
                                      is_first ? inputs + off : NULL, is_first ? NULL : ch->act_in[mb],
                                      is_last ? targets + off : NULL, (int32_t)bmb, (int32_t)T);
                if (st) return FAIL(st, "F(stage=%d, mb=%d): %s", s, mb, td_model_last_error(ch->model));
                record(&tl, (int)step, "F", s, mb, t0, comm->now(comm));
                if (is_last) loss_sum += loss;
                else if ((st = comm->isend(comm, ch->act_out[mb], nact, (int)((s + 1) % P),
                                           tag_of(0, s + 1, mb, S, M), &ch->send_act[mb])))
                    return FAIL(st, "%s", comm->err);
            } else {
                int32_t slot = ch->slot_of_mb[mb];
                if (slot < 0) return FAIL(TD_ERR_INTERNAL, "%s(stage=%d, mb=%d) before its F", KIND_NAME[a->kind], s, mb);
                if (a->kind != ACT_W && !is_last) {
                    if ((st = comm->wait(comm, ch->recv_grad[mb]))) return FAIL(st, "%s", comm->err);
                    ch->recv_grad[mb] = NULL;
                }
                t0 = comm->now(comm);
                if (t0 - t_wait > 1e-6) record(&tl, (int)step, "WAIT", s, mb, t_wait, t0);
                int part = a->kind == ACT_BW ? TD_BWD_FULL : a->kind == ACT_B ? TD_BWD_INPUT : TD_BWD_WEIGHT;
                st = td_stage_backward(ch->model, (!is_first && a->kind != ACT_W) ? ch->grad_out[mb] : NULL,
                                       slot, (!is_last && a->kind != ACT_W) ? ch->grad_in[mb] : NULL,
                                       1.0 / (double)M, part);
                if (st) return FAIL(st, "%s(stage=%d, mb=%d): %s", KIND_NAME[a->kind], s, mb, td_model_last_error(ch->model));
                record(&tl, (int)step, KIND_NAME[a->kind], s, mb, t0, comm->now(comm));
                if (a->kind != ACT_B) { ch->slot_used[slot] = 0; ch->slot_of_mb[mb] = -1; }
                if (a->kind != ACT_W && !is_first &&
                    (st = comm->isend(comm, ch->grad_out[mb], nact, (int)((s - 1) % P),
                                      tag_of(1, s - 1, mb, S, M), &ch->send_grad[mb])))
                    return FAIL(st, "%s", comm->err);
            }
        }
        /* every send of this step completes before its buffer is reused */
        for (int c = 0; c < nchunks; c++)
            for (int64_t mb = 0; mb < M; mb++) {
                if (chunks[c].send_act[mb] && (st = comm->wait(comm, chunks[c].send_act[mb]))) return FAIL(st, "%s", comm->err);
                if (chunks[c].send_grad[mb] && (st = comm->wait(comm, chunks[c].send_grad[mb]))) return FAIL(st, "%s", comm->err);
                if (chunks[c].recv_act[mb] || chunks[c].recv_grad[mb])
                    return FAIL(TD_ERR_INTERNAL, "stage %d mb %lld: a posted receive was never used (schedule incomplete)", chunks[c].stage, (long long)mb);
                chunks[c].send_act[mb] = chunks[c].send_grad[mb] = NULL;
            }
        double t_red = comm->now(comm);
        /* tied embedding: the first and the last stage each add the other's wte gradient */
        if (S > 1) {
            const int64_t nwte = cfg->vocab_size * C;
            int c0 = local_chunk(chunks, nchunks, 0), cl = local_chunk(chunks, nchunks, (int)S - 1);
            float *mine = malloc(sizeof(float) * (size_t)nwte), *theirs = malloc(sizeof(float) * (size_t)nwte);
            if (!mine || !theirs) return FAIL(TD_ERR_NOMEM, "out of memory for the wte gradient exchange");
            if (c0 >= 0 && cl >= 0) { /* both ends on this rank */
                td_model_get_grad(chunks[c0].model, mine, "wte.weight", nwte);
                td_model_get_grad(chunks[cl].model, theirs, "wte.weight", nwte);
                for (int64_t j = 0; j < nwte; j++) mine[j] += theirs[j];
                td_model_set_grad(chunks[c0].model, "wte.weight", mine, nwte);
                td_model_set_grad(chunks[cl].model, "wte.weight", mine, nwte);
            } else if (c0 >= 0 || cl >= 0) {
                int c = c0 >= 0 ? c0 : cl;
                td_model_get_grad(chunks[c].model, mine, "wte.weight", nwte);
                if ((st = comm->exchange(comm, theirs, mine, nwte, c0 >= 0 ? last_rank : 0, (int)(2 * S * M))))
                    return FAIL(st, "%s", comm->err);
                /* first-stage contribution + last-stage contribution, in that order on both */
                for (int64_t j = 0; j < nwte; j++) mine[j] = c0 >= 0 ? mine[j] + theirs[j] : theirs[j] + mine[j];
                td_model_set_grad(chunks[c].model, "wte.weight", mine, nwte);
            }
            free(mine);
            free(theirs);
        }
        double red[2] = {0.0, loss_sum};
        for (int c = 0; c < nchunks; c++) {
            double sq;
            td_model_grad_sq_sum(chunks[c].model, &sq);
            red[0] += sq;
        }
        if ((st = comm->allreduce_sum(comm, red, 2))) return FAIL(st, "%s", comm->err);
        double norm = sqrt(red[0]);
        record(&tl, (int)step, "ALLREDUCE", -1, -1, t_red, comm->now(comm));
        if (step == cfg->save_grads_step)
            for (int c = 0; c < nchunks; c++) {
                snprintf(path, sizeof path, "%s/grads_stage%d.safetensors", cfg->out, chunks[c].stage);
                if ((st = td_model_save_grads_safetensors(chunks[c].model, path)))
                    return FAIL(st, "%s", td_model_last_error(chunks[c].model));
            }
        double t_opt = comm->now(comm);
        for (int c = 0; c < nchunks; c++)
            if ((st = td_model_optimizer_step_with_norm(chunks[c].model, norm)))
                return FAIL(st, "optimizer on stage %d: %s", chunks[c].stage, td_model_last_error(chunks[c].model));
        double t_end = comm->now(comm);
        record(&tl, (int)step, "OPT", -1, -1, t_opt, t_end);
        if (lossf) fprintf(lossf, "%lld,%.17g,%.17g,%.9f\n", (long long)step, red[1] / (double)M, norm, t_end - step_start);
    }
    for (int c = 0; c < nchunks; c++) {
        snprintf(path, sizeof path, "%s/params_stage%d.safetensors", cfg->out, chunks[c].stage);
        if ((st = td_model_save_safetensors(chunks[c].model, path)))
            return FAIL(st, "%s", td_model_last_error(chunks[c].model));
    }
    fclose(tl.f);
    if (lossf) fclose(lossf);
    for (int c = 0; c < nchunks; c++) {
        chunk_state *ch = &chunks[c];
        for (int64_t mb = 0; mb < M; mb++) {
            free(ch->act_in[mb]); free(ch->act_out[mb]); free(ch->grad_in[mb]); free(ch->grad_out[mb]);
        }
        free(ch->act_in); free(ch->act_out); free(ch->grad_in); free(ch->grad_out);
        free(ch->recv_act); free(ch->recv_grad); free(ch->send_act); free(ch->send_grad);
        free(ch->slot_of_mb); free(ch->slot_used);
        td_model_free(ch->model);
    }
    free(inputs);
    free(targets);
    return TD_OK;
}
