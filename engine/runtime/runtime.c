/* runtime.c — executes one rank's share of a pipeline schedule, step after step.
 *
 * Per step: post a receive for every message this rank's actions will need (each (kind, stage,
 * micro-batch) has its own tag and buffer, so arrival order cannot matter), then walk the
 * actions: F and B/BW/W wait for their input, compute through td_stage_*_dev, and send their
 * output without waiting; then the tied-embedding gradient sum (GPT-2), the global gradient norm, and
 * AdamW on every local stage. CPU and CUDA stages run the same loop: buffers come from the comm,
 * and transfers and time marks are ordered on each stage's stream (NULL on the CPU). Every action
 * lands in the rank's timeline.
 */
#include "runtime.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define FAIL(st, ...) (snprintf(err, errlen, __VA_ARGS__), (st))

/* ---- schedule file --------------------------------------------------------------------------- */

td_status td_plan_read(td_rank_plan *plan, char *err, size_t errlen, const char *path, int rank,
                       int64_t stages, int64_t microbatches) {
    FILE *f = fopen(path, "r");
    if (!f) return FAIL(TD_ERR_IO, "cannot open schedule '%s'", path);
    td_status st = td_plan_parse(plan, err, errlen, f, path, rank, stages, microbatches);
    fclose(f);
    return st;
}

/* One integer field of a schedule row and the ',' after it (last = 1: the end of the row, blanks
 * aside). strtoll with a range check: sscanf's %d reads 4294967296 as 0. */
static int plan_field(const char **s, int *out, int last) {
    char *e;
    errno = 0;
    long long v = strtoll(*s, &e, 10);
    if (e == *s || errno == ERANGE || v < INT32_MIN || v > INT32_MAX) return 0;
    if (last) {
        while (*e == ' ' || *e == '\t' || *e == '\r') e++;
        if (*e != '\n' && *e != 0) return 0;
    } else if (*e++ != ',') {
        return 0;
    }
    *s = e;
    *out = (int)v;
    return 1;
}

td_status td_plan_parse(td_rank_plan *plan, char *err, size_t errlen, FILE *f, const char *path,
                        int rank, int64_t stages, int64_t microbatches) {
    char line[256];
    int lineno = 1;
    if (!fgets(line, sizeof line, f) || strncmp(line, "rank,index,kind,stage,microbatch", 32) != 0) {
        return FAIL(TD_ERR_FORMAT, "schedule '%s' line 1: expected the header 'rank,index,kind,stage,microbatch'", path);
    }
    int cap = 64;
    plan->count = 0;
    if (!(plan->actions = malloc(sizeof(td_action) * (size_t)cap)))
        return FAIL(TD_ERR_NOMEM, "schedule '%s': out of memory", path);
    while (fgets(line, sizeof line, f)) {
        lineno++;
        int r, idx, stage, mb;
        char kind[8];
        /* fgets splits a longer line: its tail would read as a row of its own */
        if (!strchr(line, '\n') && !feof(f))
            return FAIL(TD_ERR_FORMAT, "schedule '%s' line %d: longer than %d characters: '%.60s...'", path, lineno, (int)sizeof line - 2, line);
        line[strcspn(line, "\r\n")] = 0; /* messages quote the row without its end */
        if (line[0] == 0) continue;
        const char *p = line;
        size_t nk = 0;
        int ok = plan_field(&p, &r, 0) && plan_field(&p, &idx, 0);
        while (ok && nk < sizeof kind - 1 && p[nk] >= 'A' && p[nk] <= 'Z') nk++;
        if (ok && nk && p[nk] == ',') {
            memcpy(kind, p, nk);
            kind[nk] = 0;
            p += nk + 1;
        } else {
            ok = 0;
        }
        if (!ok || !plan_field(&p, &stage, 0) || !plan_field(&p, &mb, 1)) {
            return FAIL(TD_ERR_FORMAT, "schedule '%s' line %d: cannot parse '%.60s'", path, lineno, line);
        }
        if (r != rank) continue;
        int k = !strcmp(kind, "F") ? ACT_F : !strcmp(kind, "BW") ? ACT_BW : !strcmp(kind, "B") ? ACT_B
              : !strcmp(kind, "W") ? ACT_W : -1;
        if (k < 0 || stage < 0 || stage >= stages || mb < 0 || mb >= microbatches) {
            return FAIL(TD_ERR_FORMAT, "schedule '%s' line %d: action %s(stage=%d, mb=%d) is outside kinds F/BW/B/W, stages [0, %lld), micro-batches [0, %lld)",
                        path, lineno, kind, stage, mb, (long long)stages, (long long)microbatches);
        }
        if (plan->count == cap) {
            td_action *grown = cap <= INT32_MAX / 2 ? realloc(plan->actions, sizeof(td_action) * (size_t)cap * 2) : NULL;
            if (!grown) return FAIL(TD_ERR_NOMEM, "schedule '%s' line %d: out of memory for %d actions", path, lineno, cap);
            plan->actions = grown, cap *= 2;
        }
        plan->actions[plan->count++] = (td_action){k, stage, mb};
    }
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
    void *stream;         /* the stage's CUDA stream, NULL on the CPU */
    int stage;
    int32_t *slot_of_mb;  /* micro-batch -> activation slot, -1 when free */
    int32_t *slot_used;   /* slots entries */
    int64_t slots;
    void **act_in, **act_out, **grad_in, **grad_out; /* per micro-batch (B_mb, T, C) io elements */
    td_request **recv_act, **recv_grad, **send_act, **send_grad;
} chunk_state;

/* A timeline row whose times are marks (comm->mark), resolved once the step's work is done. */
typedef struct {
    const char *kind;
    int stage, mb, m0, m1;
} pending_row;

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
        {"stage", stage}, {"stages", S}, {"slots", slots}, {"split_backward", split},
        {"backend", cfg->backend}, {"bf16", cfg->bf16}, {"family", cfg->family},
        {"n_kv_head", cfg->n_kv_head}, {"ffn_dim", cfg->ffn_dim}};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && !st; i++) st = td_model_set_int(m, ints[i].k, ints[i].v);
    if (!st && cfg->n_layers_given) {
        int64_t begin = 0;
        for (int s = 0; s < stage; s++) begin += cfg->layers[s];
        st = td_model_set_int(m, "layer_begin", begin);
        if (!st) st = td_model_set_int(m, "layer_end", begin + cfg->layers[stage]);
    }
    struct { const char *k; double v; } fl[] = {
        {"lr", cfg->lr}, {"beta1", cfg->beta1}, {"beta2", cfg->beta2}, {"eps", cfg->eps},
        {"weight_decay", cfg->weight_decay}, {"grad_clip", cfg->grad_clip},
        {"rope_theta", cfg->rope_theta}, {"norm_eps", cfg->norm_eps}};
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

/* Bookkeeping of one step's timeline rows, written once the marks are resolved. */
typedef struct {
    pending_row *rows;
    int n, cap;
} row_list;

static td_status add_row(row_list *rl, const char *kind, int stage, int mb, int m0, int m1) {
    if (rl->n == rl->cap) {
        int cap = rl->cap ? 2 * rl->cap : 256;
        pending_row *p = realloc(rl->rows, sizeof(pending_row) * (size_t)cap);
        if (!p) return TD_ERR_NOMEM;
        rl->rows = p, rl->cap = cap;
    }
    rl->rows[rl->n++] = (pending_row){kind, stage, mb, m0, m1};
    return TD_OK;
}

#define MARK(stream, id)                                                                          \
    do {                                                                                          \
        if ((st = comm->mark(comm, (stream), &(id)))) return FAIL(st, "%s", comm->err);           \
    } while (0)

static td_status write_rank_info(const td_run_config *cfg, td_comm *comm, chunk_state *chunks,
                                 int nchunks, char *err, size_t errlen) {
    char path[1200];
    snprintf(path, sizeof path, "%s/rank%d.json", cfg->out, comm->rank);
    FILE *f = fopen(path, "w");
    if (!f) return FAIL(TD_ERR_IO, "cannot write '%s'", path);
    int64_t bytes = comm->bytes;
    for (int c = 0; c < nchunks; c++) {
        int64_t b = 0;
        td_model_get_int(chunks[c].model, "device_bytes", &b);
        bytes += b;
    }
    fprintf(f, "{\"rank\": %d, \"ranks\": %d, \"backend\": \"%s\", \"transport\": \"%s\", "
               "\"device\": %d, \"device_name\": \"%s\", \"device_bytes\": %lld, \"stages\": [",
            comm->rank, comm->size, cfg->backend ? "cuda" : "cpu", comm->name, comm->device,
            comm->device_name, (long long)bytes);
    for (int c = 0; c < nchunks; c++) fprintf(f, "%s%d", c ? ", " : "", chunks[c].stage);
    fprintf(f, "]}\n");
    fclose(f);
    return TD_OK;
}

td_status td_run_pipeline(const td_run_config *cfg, const td_rank_plan *plan, td_comm *comm,
                          char *err, size_t errlen) {
    const int P = comm->size, rank = comm->rank;
    const int64_t V = cfg->chunks, S = (int64_t)P * V, M = cfg->microbatches;
    const int64_t bmb = cfg->batch_size / M, T = cfg->seq_len, C = cfg->n_embd;
    const int64_t nact = bmb * T * C; /* elements per activation message */
    const int last_rank = (int)((S - 1) % P);
    td_status st = TD_OK;
    if (cfg->batch_size % M) return FAIL(TD_ERR_CONFIG, "batch_size=%lld is not divisible by microbatches=%lld", (long long)cfg->batch_size, (long long)M);
    if (cfg->checkpoint_every < 0 || cfg->resume_step < 0 || cfg->resume_step > cfg->steps ||
        cfg->on_nonfinite < 0 || cfg->on_nonfinite > 1)
        return FAIL(TD_ERR_CONFIG, "run file: checkpoint_every=%lld, resume_step=%lld, on_nonfinite=%lld (need checkpoint_every >= 0, 0 <= resume_step <= steps=%lld, on_nonfinite 0 = stop or 1 = skip)",
                    (long long)cfg->checkpoint_every, (long long)cfg->resume_step, (long long)cfg->on_nonfinite, (long long)cfg->steps);
    if ((cfg->checkpoint_every > 0 || cfg->resume_step > 0) && !cfg->checkpoint_dir[0])
        return FAIL(TD_ERR_CONFIG, "run file: checkpoint_every=%lld / resume_step=%lld need checkpoint_dir", (long long)cfg->checkpoint_every, (long long)cfg->resume_step);

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
    int64_t io_bytes = 4;
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
        td_model_get_int(ch->model, "io_bytes", &io_bytes);
        if ((st = td_model_stream(ch->model, &ch->stream))) return FAIL(st, "%s", td_model_last_error(ch->model));
        ch->slot_of_mb = malloc(sizeof(int32_t) * (size_t)M);
        ch->slot_used = calloc((size_t)peak, sizeof(int32_t));
        ch->act_in = calloc((size_t)M, sizeof(void *));
        ch->act_out = calloc((size_t)M, sizeof(void *));
        ch->grad_in = calloc((size_t)M, sizeof(void *));
        ch->grad_out = calloc((size_t)M, sizeof(void *));
        ch->recv_act = calloc((size_t)M, sizeof(td_request *));
        ch->recv_grad = calloc((size_t)M, sizeof(td_request *));
        ch->send_act = calloc((size_t)M, sizeof(td_request *));
        ch->send_grad = calloc((size_t)M, sizeof(td_request *));
        if (!ch->slot_of_mb || !ch->slot_used || !ch->act_in || !ch->act_out || !ch->grad_in ||
            !ch->grad_out || !ch->recv_act || !ch->recv_grad || !ch->send_act || !ch->send_grad)
            return FAIL(TD_ERR_NOMEM, "out of memory for pipeline bookkeeping");
        /* message buffers where this stage has a neighbour in that direction */
        const size_t nb = (size_t)(nact * io_bytes);
        for (int64_t mb = 0; mb < M; mb++) {
            if (ch->stage > 0 && (!(ch->act_in[mb] = comm->alloc(comm, nb)) || !(ch->grad_out[mb] = comm->alloc(comm, nb))))
                return FAIL(TD_ERR_NOMEM, "pipeline buffers: %s", comm->err);
            if (ch->stage < S - 1 && (!(ch->act_out[mb] = comm->alloc(comm, nb)) || !(ch->grad_in[mb] = comm->alloc(comm, nb))))
                return FAIL(TD_ERR_NOMEM, "pipeline buffers: %s", comm->err);
        }
    }
    const int64_t msg_bytes = nact * io_bytes;
    /* the tied embedding's gradient from the other end lands here */
    const int64_t nwte = cfg->vocab_size * C;
    const int c_first = local_chunk(chunks, nchunks, 0), c_last = local_chunk(chunks, nchunks, (int)S - 1);
    const int tied = S > 1 && cfg->family == 0; /* GPT-2 ties wte to its head; Llama does not */
    void *wte_peer = NULL;
    if (tied && (c_first >= 0) != (c_last >= 0) &&
        !(wte_peer = comm->alloc(comm, sizeof(float) * (size_t)nwte)))
        return FAIL(TD_ERR_NOMEM, "the wte gradient buffer: %s", comm->err);
    if ((st = write_rank_info(cfg, comm, chunks, nchunks, err, errlen))) return st;

    char path[1200];
    /* resume: every local stage's training state from the step's checkpoint directory */
    for (int c = 0; cfg->resume_step > 0 && c < nchunks; c++) {
        snprintf(path, sizeof path, "%s/step_%08lld/stage%d.safetensors", cfg->checkpoint_dir, (long long)cfg->resume_step, chunks[c].stage);
        int64_t pos = -1;
        if ((st = td_model_load_checkpoint(chunks[c].model, path, &pos)))
            return FAIL(st, "resume at step %lld, stage %d: %s", (long long)cfg->resume_step, chunks[c].stage, td_model_last_error(chunks[c].model));
        if (pos != cfg->resume_step)
            return FAIL(TD_ERR_FORMAT, "resume at step %lld, stage %d: '%s' holds data position %lld. HINT: the checkpoint belongs to another step", (long long)cfg->resume_step, chunks[c].stage, path, (long long)pos);
    }
    timeline tl = {NULL, rank, 0};
    snprintf(path, sizeof path, "%s/timeline_rank%d.csv", cfg->out, rank);
    tl.f = fopen(path, "w");
    if (!tl.f) return FAIL(TD_ERR_IO, "cannot write '%s'", path);
    fprintf(tl.f, "rank,step,kind,stage,microbatch,start_us,end_us\n");
    FILE *lossf = NULL;
    if (rank == last_rank) {
        snprintf(path, sizeof path, "%s/losses.csv", cfg->out);
        if (!(lossf = fopen(path, "w"))) return FAIL(TD_ERR_IO, "cannot write '%s'", path);
        fprintf(lossf, "step,loss,grad_norm,step_s,skipped\n");
    }
    /* The timeline's origin is rank 0's clock reading, the same for every rank: each rank
     * reading its own clock after a barrier left the ranks as far apart as they left the
     * barrier (milliseconds on a loaded host: a stage's F then appeared to start before the F
     * it waits for had ended). now() is one clock for the ranks of a host; a rank whose reading
     * is more than a second from rank 0's is on another host's clock and keeps its own. */
    if ((st = comm->barrier(comm))) return FAIL(st, "%s", comm->err);
    {
        const double mine = comm->now(comm);
        double origin = rank == 0 ? mine : 0.0;
        if ((st = comm->allreduce_sum(comm, &origin, 1))) return FAIL(st, "%s", comm->err);
        tl.t0 = fabs(mine - origin) < 1.0 ? origin : mine;
    }
    row_list rows = {NULL, 0, 0};
    double *mark_s = NULL;
    int mark_cap = 0;

    /* Test hook TANDEM_CRASH="<rank>:<step>[:kill]": that rank exits abruptly at that step, or
     * with ":kill" dies by SIGKILL without a word, as a rank killed from outside would. */
    const char *crash = getenv("TANDEM_CRASH");
    int crash_rank = -1, crash_step = -1;
    if (crash) sscanf(crash, "%d:%d", &crash_rank, &crash_step);

    for (int64_t step = cfg->resume_step; step < cfg->steps; step++) {
        if (rank == crash_rank && step == crash_step) {
            if (strstr(crash, ":kill")) raise(SIGKILL);
            fprintf(stderr, "tandem-engine: rank %d: TANDEM_CRASH requested, exiting abruptly at step %lld\n", rank, (long long)step);
            fflush(stderr);
            _Exit(9);
        }
        double step_start = comm->now(comm);
        rows.n = 0;
        int nmarks = 0, m_begin, m_end;
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
                st = comm->irecv(comm, ch->act_in[a->microbatch], msg_bytes, (int)((a->stage - 1) % P),
                                 tag_of(0, a->stage, a->microbatch, S, M), ch->stream, &ch->recv_act[a->microbatch]);
            else if ((a->kind == ACT_BW || a->kind == ACT_B) && a->stage < S - 1)
                st = comm->irecv(comm, ch->grad_in[a->microbatch], msg_bytes, (int)((a->stage + 1) % P),
                                 tag_of(1, a->stage, a->microbatch, S, M), ch->stream, &ch->recv_grad[a->microbatch]);
            if (st) return FAIL(st, "%s", comm->err);
        }
        void *prev_stream = NULL; /* the stream of this rank's previous action */
        for (int32_t i = 0; i < plan->count; i++) {
            const td_action *a = &plan->actions[i];
            const int c = local_chunk(chunks, nchunks, a->stage);
            if (c < 0) return FAIL(TD_ERR_INTERNAL, "action for stage %d on rank %d, which does not hold it", a->stage, rank);
            chunk_state *ch = &chunks[c];
            const int mb = a->microbatch, s = a->stage;
            const int is_first = s == 0, is_last = s == S - 1;
            int m_wait, m0, m1;
            /* each stage has its own stream: without this, an interleaved rank's two stages ran
             * their actions concurrently on one GPU, out of the schedule's order (and their
             * timeline intervals overlapped, so the measured bubble went negative) */
            if (prev_stream && prev_stream != ch->stream &&
                (st = comm->follow(comm, prev_stream, ch->stream)))
                return FAIL(st, "%s", comm->err);
            prev_stream = ch->stream;
            MARK(ch->stream, m_wait);
            if (a->kind == ACT_F) {
                if (!is_first) {
                    if ((st = comm->wait(comm, ch->recv_act[mb], ch->stream))) return FAIL(st, "%s", comm->err);
                    ch->recv_act[mb] = NULL;
                }
                int32_t slot = -1;
                for (int64_t k = 0; k < ch->slots; k++)
                    if (!ch->slot_used[k]) { slot = (int32_t)k; break; }
                if (slot < 0) return FAIL(TD_ERR_INTERNAL, "no free activation slot for F(stage=%d, mb=%d)", s, mb);
                ch->slot_used[slot] = 1;
                ch->slot_of_mb[mb] = slot;
                const int64_t off = (step * cfg->batch_size + (int64_t)mb * bmb) * T;
                MARK(ch->stream, m0);
                /* the last stage's loss is summed after the step (no wait on the device here) */
                st = td_stage_forward_dev(ch->model, is_last ? NULL : ch->act_out[mb], NULL, slot,
                                          is_first ? inputs + off : NULL, is_first ? NULL : ch->act_in[mb],
                                          is_last ? targets + off : NULL, (int32_t)bmb, (int32_t)T);
                if (st) return FAIL(st, "F(stage=%d, mb=%d): %s", s, mb, td_model_last_error(ch->model));
                MARK(ch->stream, m1);
                if (!is_last && (st = comm->isend(comm, ch->act_out[mb], msg_bytes, (int)((s + 1) % P),
                                                  tag_of(0, s + 1, mb, S, M), ch->stream, &ch->send_act[mb])))
                    return FAIL(st, "%s", comm->err);
            } else {
                int32_t slot = ch->slot_of_mb[mb];
                if (slot < 0) return FAIL(TD_ERR_INTERNAL, "%s(stage=%d, mb=%d) before its F", KIND_NAME[a->kind], s, mb);
                if (a->kind != ACT_W && !is_last) {
                    if ((st = comm->wait(comm, ch->recv_grad[mb], ch->stream))) return FAIL(st, "%s", comm->err);
                    ch->recv_grad[mb] = NULL;
                }
                MARK(ch->stream, m0);
                int part = a->kind == ACT_BW ? TD_BWD_FULL : a->kind == ACT_B ? TD_BWD_INPUT : TD_BWD_WEIGHT;
                st = td_stage_backward_dev(ch->model, (!is_first && a->kind != ACT_W) ? ch->grad_out[mb] : NULL,
                                           slot, (!is_last && a->kind != ACT_W) ? ch->grad_in[mb] : NULL,
                                           1.0 / (double)M, part);
                if (st) return FAIL(st, "%s(stage=%d, mb=%d): %s", KIND_NAME[a->kind], s, mb, td_model_last_error(ch->model));
                MARK(ch->stream, m1);
                if (a->kind != ACT_B) { ch->slot_used[slot] = 0; ch->slot_of_mb[mb] = -1; }
                if (a->kind != ACT_W && !is_first &&
                    (st = comm->isend(comm, ch->grad_out[mb], msg_bytes, (int)((s - 1) % P),
                                      tag_of(1, s - 1, mb, S, M), ch->stream, &ch->send_grad[mb])))
                    return FAIL(st, "%s", comm->err);
            }
            if (add_row(&rows, "WAIT", s, mb, m_wait, m0) || add_row(&rows, KIND_NAME[a->kind], s, mb, m0, m1))
                return FAIL(TD_ERR_NOMEM, "out of memory for the timeline");
            nmarks = m1 + 1;
        }
        /* every send of this step completes before its buffer is reused */
        for (int c = 0; c < nchunks; c++)
            for (int64_t mb = 0; mb < M; mb++) {
                if (chunks[c].send_act[mb] && (st = comm->wait(comm, chunks[c].send_act[mb], chunks[c].stream))) return FAIL(st, "%s", comm->err);
                if (chunks[c].send_grad[mb] && (st = comm->wait(comm, chunks[c].send_grad[mb], chunks[c].stream))) return FAIL(st, "%s", comm->err);
                if (chunks[c].recv_act[mb] || chunks[c].recv_grad[mb])
                    return FAIL(TD_ERR_INTERNAL, "stage %d mb %lld: a posted receive was never used (schedule incomplete)", chunks[c].stage, (long long)mb);
                chunks[c].send_act[mb] = chunks[c].send_grad[mb] = NULL;
            }
        MARK(nchunks ? chunks[0].stream : NULL, m_begin);
        /* tied embedding: the first and the last stage each add the other's wte gradient */
        if (tied && c_first >= 0 && c_last >= 0) { /* both ends on this rank (one rank) */
            float *mine = malloc(sizeof(float) * (size_t)nwte), *theirs = malloc(sizeof(float) * (size_t)nwte);
            if (!mine || !theirs) return FAIL(TD_ERR_NOMEM, "out of memory for the wte gradient sum");
            td_model_get_grad(chunks[c_first].model, mine, "wte.weight", nwte);
            td_model_get_grad(chunks[c_last].model, theirs, "wte.weight", nwte);
            for (int64_t j = 0; j < nwte; j++) mine[j] += theirs[j];
            td_model_set_grad(chunks[c_first].model, "wte.weight", mine, nwte);
            td_model_set_grad(chunks[c_last].model, "wte.weight", mine, nwte);
            free(mine);
            free(theirs);
        } else if (tied && (c_first >= 0 || c_last >= 0)) {
            /* a + b == b + a in IEEE arithmetic: both ends hold the same sum */
            chunk_state *ch = &chunks[c_first >= 0 ? c_first : c_last];
            void *g = NULL;
            td_request *rs = NULL, *rr = NULL;
            const int peer = c_first >= 0 ? last_rank : 0, tag = (int)(2 * S * M);
            if ((st = td_model_grad_data(ch->model, &g, "wte.weight", nwte)))
                return FAIL(st, "%s", td_model_last_error(ch->model));
            if ((st = comm->irecv(comm, wte_peer, (int64_t)sizeof(float) * nwte, peer, tag, ch->stream, &rr)) ||
                (st = comm->isend(comm, g, (int64_t)sizeof(float) * nwte, peer, tag, ch->stream, &rs)) ||
                (st = comm->wait(comm, rr, ch->stream)) || (st = comm->wait(comm, rs, ch->stream)) ||
                (st = comm->add(comm, (float *)g, (const float *)wte_peer, nwte, ch->stream)))
                return FAIL(st, "the wte gradient sum with rank %d: %s", peer, comm->err);
        }
        double red[2] = {0.0, 0.0};
        for (int c = 0; c < nchunks; c++) {
            double sq;
            if ((st = td_model_grad_sq_sum(chunks[c].model, &sq))) return FAIL(st, "%s", td_model_last_error(chunks[c].model));
            red[0] += sq;
        }
        if (c_last >= 0 && (st = td_stage_loss_sum(chunks[c_last].model, &red[1], NULL)))
            return FAIL(st, "%s", td_model_last_error(chunks[c_last].model));
        const double local_sq = red[0];
        if ((st = comm->allreduce_sum(comm, red, 2))) return FAIL(st, "%s", comm->err);
        double norm = sqrt(red[0]);
        /* every rank sees the reduced values: each stops here (or skips the update: all ranks
         * decide alike), naming its own stages' share and its first non-finite tensor */
        const int skip = !isfinite(red[0]) || !isfinite(red[1]);
        if (skip && cfg->on_nonfinite != 1) {
            char culprit[160] = "; no non-finite gradient or parameter on this rank";
            for (int c = 0; c < nchunks; c++) {
                const char *name = NULL;
                int32_t what = 0;
                if (td_model_find_nonfinite(chunks[c].model, &name, &what) == TD_OK && name) {
                    snprintf(culprit, sizeof culprit, "; first non-finite tensor: %s of '%s' on stage %d", what == 1 ? "the gradient" : "the parameter", name, chunks[c].stage);
                    break;
                }
            }
            return FAIL(TD_ERR_RANGE, "step %lld: non-finite %s (mean loss %g, gradient norm %g); this rank's stage%s %d%s: gradient square sum %g%s%s. HINT: lower the learning rate or enable grad_clip",
                        (long long)step, !isfinite(red[1]) ? "loss" : "gradient norm", red[1] / (double)M, norm,
                        nchunks > 1 ? "s" : "", nchunks ? chunks[0].stage : -1, nchunks > 1 ? ".." : "", local_sq,
                        isfinite(local_sq) ? " (finite: the non-finite values are on another rank)" : "", culprit);
        }
        MARK(nchunks ? chunks[0].stream : NULL, m_end);
        if (add_row(&rows, "ALLREDUCE", -1, -1, m_begin, m_end)) return FAIL(TD_ERR_NOMEM, "out of memory for the timeline");
        if (step == cfg->save_grads_step)
            for (int c = 0; c < nchunks; c++) {
                snprintf(path, sizeof path, "%s/grads_stage%d.safetensors", cfg->out, chunks[c].stage);
                if ((st = td_model_save_grads_safetensors(chunks[c].model, path)))
                    return FAIL(st, "%s", td_model_last_error(chunks[c].model));
            }
        double t_opt = comm->now(comm);
        for (int c = 0; c < nchunks && !skip; c++)
            if ((st = td_model_optimizer_step_with_norm(chunks[c].model, norm)))
                return FAIL(st, "step %lld: optimizer on stage %d: %s", (long long)step, chunks[c].stage, td_model_last_error(chunks[c].model));
        double t_end = comm->now(comm);
        /* the step's device work is done (AdamW returns once it is): resolve the marks */
        nmarks = m_end + 1;
        if (nmarks > mark_cap) {
            double *p = realloc(mark_s, sizeof(double) * (size_t)nmarks);
            if (!p) return FAIL(TD_ERR_NOMEM, "out of memory for the timeline");
            mark_s = p, mark_cap = nmarks;
        }
        if ((st = comm->marks_read(comm, mark_s, nmarks))) return FAIL(st, "%s", comm->err);
        for (int r = 0; r < rows.n; r++) {
            const pending_row *pr = &rows.rows[r];
            const double a0 = mark_s[pr->m0], a1 = mark_s[pr->m1];
            if (!strcmp(pr->kind, "WAIT") && a1 - a0 <= 1e-6) continue;
            record(&tl, (int)step, pr->kind, pr->stage, pr->mb, a0, a1);
        }
        record(&tl, (int)step, "OPT", -1, -1, t_opt, t_end);
        if (lossf) fprintf(lossf, "%lld,%.17g,%.17g,%.9f,%d\n", (long long)step, red[1] / (double)M, norm, t_end - step_start, skip);
        /* after every K-th step: each stage's state, atomically, in the step's own directory */
        if (cfg->checkpoint_every > 0 && (step + 1) % cfg->checkpoint_every == 0) {
            snprintf(path, sizeof path, "%s/step_%08lld", cfg->checkpoint_dir, (long long)(step + 1));
            if (mkdir(path, 0777) != 0 && errno != EEXIST)
                return FAIL(TD_ERR_IO, "step %lld: cannot create checkpoint directory '%s': %s", (long long)step, path, strerror(errno));
            for (int c = 0; c < nchunks; c++) {
                snprintf(path, sizeof path, "%s/step_%08lld/stage%d.safetensors", cfg->checkpoint_dir, (long long)(step + 1), chunks[c].stage);
                if ((st = td_model_save_checkpoint(chunks[c].model, path, step + 1)))
                    return FAIL(st, "step %lld: checkpoint of stage %d: %s", (long long)step, chunks[c].stage, td_model_last_error(chunks[c].model));
            }
        }
    }
    for (int c = 0; c < nchunks; c++) {
        snprintf(path, sizeof path, "%s/params_stage%d.safetensors", cfg->out, chunks[c].stage);
        if ((st = td_model_save_safetensors(chunks[c].model, path)))
            return FAIL(st, "%s", td_model_last_error(chunks[c].model));
    }
    fclose(tl.f);
    if (lossf) fclose(lossf);
    free(rows.rows);
    free(mark_s);
    if (wte_peer) comm->release(comm, wte_peer);
    for (int c = 0; c < nchunks; c++) {
        chunk_state *ch = &chunks[c];
        for (int64_t mb = 0; mb < M; mb++) {
            comm->release(comm, ch->act_in[mb]); comm->release(comm, ch->act_out[mb]);
            comm->release(comm, ch->grad_in[mb]); comm->release(comm, ch->grad_out[mb]);
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
