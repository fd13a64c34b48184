/* api_passes.c — the ABI's pass entry points: argument checks, then model.c's stage and one-stage
 * passes, the optimizer step, and the FP environment around each (td_fp_enter / td_fp_leave of
 * api.c). Not here: the parameter table or files (api_params.c). Every failure returns a status
 * with a message on the handle; nothing here exits or aborts.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api.h"
#include "internal.h"

/* Test hook for the regression gate: TANDEM_SLOWDOWN=<factor> makes every compute call take
 * `factor` times as long by spinning (not sleeping, so CPU-time and instruction counts see it
 * too) for (factor - 1) x the time the real work took. Unset in normal use. */
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void slowdown(double started) {
    const char *f = getenv("TANDEM_SLOWDOWN");
    if (!f || !*f) return;
    double factor = atof(f);
    if (!(factor > 1.0) || factor > 100.0) return;
    double until = now_s() + (now_s() - started) * (factor - 1.0);
    volatile double sink = 0.0;
    while (now_s() < until) sink += 1.0;
}

/* ---- passes ---------------------------------------------------------------------------------- */

static td_status check_ids(td_model *m, const char *fn, const char *what, const int32_t *ids,
                           int32_t B, int32_t T) {
    for (int32_t i = 0; i < B * T; i++)
        if (ids[i] < 0 || ids[i] >= m->vocab_size)
            return td_fail(m, TD_ERR_RANGE,
                           "%s: %s[%d, %d] = %d is outside [0, vocab_size=%lld). HINT: the data "
                           "was tokenized for another vocabulary",
                           fn, what, i / T, i % T, ids[i], (long long)m->vocab_size);
    return TD_OK;
}

static td_status check_shape(td_model *m, const char *fn, int32_t B, int32_t T) {
    if (B < 1 || B > m->batch_size)
        return td_fail(m, TD_ERR_ARG, "%s: B=%d is outside [1, batch_size=%lld]. HINT: set batch_size before td_model_build", fn, B, (long long)m->batch_size);
    if (T < 1 || T > m->seq_len)
        return td_fail(m, TD_ERR_ARG, "%s: T=%d is outside [1, seq_len=%lld]", fn, T, (long long)m->seq_len);
    return TD_OK;
}

/* The stage passes. dev = 0: in/out are host fp32 arrays (td_stage_forward / _backward, CPU
 * models only); dev = 1: buffers in the model's own memory and compute type (td_stage_*_dev). */
static td_status td_stage_forward_impl(td_model *m, void *out_BTC, double *out_loss, int32_t slot, const int32_t *tokens_BT, const void *in_BTC, const int32_t *targets_BT, int32_t B, int32_t T, int dev) {
    static const char *fn = "td_stage_forward";
    REQUIRE_BUILT("td_stage_forward");
    if (m->ops && !dev) return td_fail(m, TD_ERR_STATE, "%s: a %s model's stage passes take device buffers. HINT: td_stage_forward_dev", fn, m->ops->name);
    td_status st = check_shape(m, fn, B, T);
    if (st) return st;
    if (slot < 0 || slot >= m->slots)
        return td_fail(m, TD_ERR_ARG, "%s: slot %d outside [0, slots=%lld)", fn, slot, (long long)m->slots);
    td_slot *s = &m->slot[slot];
    if (s->state == 2)
        return td_fail(m, TD_ERR_STATE, "%s: slot %d still holds a micro-batch waiting for its weight-gradient (W) pass", fn, slot);
    if (m->has_embed) {
        if (!tokens_BT) return td_fail(m, TD_ERR_ARG, "%s: the first stage needs tokens", fn);
        if ((st = check_ids(m, fn, "tokens", tokens_BT, B, T))) return st;
    } else if (!in_BTC) {
        return td_fail(m, TD_ERR_ARG, "%s: stage %lld needs the previous stage's activations", fn, (long long)m->stage);
    }
    if (m->has_head && targets_BT && (st = check_ids(m, fn, "targets", targets_BT, B, T))) return st;
    if (!m->has_head && !out_BTC) return td_fail(m, TD_ERR_ARG, "%s: out_BTC is NULL on a stage without the head", fn);
    const double started = now_s();
    s->B = B, s->T = T;
    const int64_t n = (int64_t)B * T;
    const int with_targets = m->has_head && targets_BT;
    if (m->has_embed) memcpy(s->tokens, tokens_BT, sizeof(int32_t) * (size_t)n);
    if (with_targets) memcpy(s->targets, targets_BT, sizeof(int32_t) * (size_t)n);
    if (m->ops) {
        st = m->ops->stage_forward(m, slot, out_loss, with_targets, in_BTC, out_BTC);
        if (st) return st;
    } else {
        if (m->has_embed) {
        } else if (dev) memcpy(s->input, in_BTC, sizeof(td_real) * (size_t)(n * m->n_embd));
        else for (int64_t i = 0; i < n * m->n_embd; i++) s->input[i] = (td_real)((const float *)in_BTC)[i];
        double loss = 0.0;
        st = td_forward_slot(m, slot, NULL, &loss, with_targets);
        if (st) return st;
        if (with_targets && out_loss) *out_loss = loss;
        else if (with_targets) m->pending_loss += loss, m->pending_count++;
        if (!m->has_head) {
            const td_real *res = td_stage_output(m, slot);
            if (dev) memcpy(out_BTC, res, sizeof(td_real) * (size_t)(n * m->n_embd));
            else for (int64_t i = 0; i < n * m->n_embd; i++) ((float *)out_BTC)[i] = (float)res[i];
        }
    }
    s->state = m->has_head && !targets_BT ? 0 : 1;
    slowdown(started);
    return TD_OK;
}

static td_status td_stage_backward_impl(td_model *m, void *din_BTC, int32_t slot, const void *dout_BTC, double grad_scale, int32_t part, int dev) {
    static const char *fn = "td_stage_backward";
    REQUIRE_BUILT("td_stage_backward");
    if (m->ops && !dev) return td_fail(m, TD_ERR_STATE, "%s: a %s model's stage passes take device buffers. HINT: td_stage_backward_dev", fn, m->ops->name);
    if (slot < 0 || slot >= m->slots)
        return td_fail(m, TD_ERR_ARG, "%s: slot %d outside [0, slots=%lld)", fn, slot, (long long)m->slots);
    if (part < TD_BWD_FULL || part > TD_BWD_WEIGHT)
        return td_fail(m, TD_ERR_ARG, "%s: part=%d is not TD_BWD_FULL, TD_BWD_INPUT or TD_BWD_WEIGHT", fn, part);
    if (part != TD_BWD_FULL && !m->split_backward)
        return td_fail(m, TD_ERR_STATE, "%s: a split backward (B then W) needs split_backward=1 at build", fn);
    td_slot *s = &m->slot[slot];
    int need = part == TD_BWD_WEIGHT ? 2 : 1;
    if (s->state != need)
        return td_fail(m, TD_ERR_STATE, "%s: slot %d is in state %d, %s needs %s", fn, slot, s->state,
                       part == TD_BWD_WEIGHT ? "W" : "a backward", need == 2 ? "a finished B" : "a finished forward (with targets on the last stage)");
    if (!m->has_head && !dout_BTC && part != TD_BWD_WEIGHT)
        return td_fail(m, TD_ERR_ARG, "%s: stage %lld needs the next stage's gradient dout_BTC", fn, (long long)m->stage);
    if (!isfinite(grad_scale)) return td_fail(m, TD_ERR_ARG, "%s: grad_scale=%g is not finite", fn, grad_scale);
    const double started = now_s();
    const int64_t n = (int64_t)s->B * s->T * m->n_embd;
    td_status st;
    if (m->ops) {
        st = m->ops->stage_backward(m, slot, grad_scale, part, dout_BTC, din_BTC);
        if (st) return st;
    } else {
        const td_real *dout = NULL;
        if (!m->has_head && part != TD_BWD_WEIGHT) { /* stage the input in td_real */
            if (dev) dout = (const td_real *)dout_BTC;
            else {
                td_real *tmp = m->scratch.dtmp;
                for (int64_t i = 0; i < n; i++) tmp[i] = (td_real)((const float *)dout_BTC)[i];
                dout = tmp;
            }
        }
        st = td_backward_slot(m, slot, grad_scale, part, dout);
        if (st) return st;
        if (part != TD_BWD_WEIGHT && din_BTC) {
            const td_real *g = td_input_grad(m, slot);
            if (dev) memcpy(din_BTC, g, sizeof(td_real) * (size_t)n);
            else for (int64_t i = 0; i < n; i++) ((float *)din_BTC)[i] = (float)g[i];
        }
    }
    s->state = part == TD_BWD_INPUT ? 2 : 0;
    slowdown(started);
    return TD_OK;
}

td_status td_stage_loss_sum(td_model *m, double *out_sum, int32_t *out_count) {
    REQUIRE_BUILT("td_stage_loss_sum");
    if (!out_sum) return td_fail(m, TD_ERR_ARG, "td_stage_loss_sum: out_sum is NULL");
    if (m->ops) return m->ops->loss_sum(m, out_sum, out_count);
    *out_sum = m->pending_loss;
    if (out_count) *out_count = m->pending_count;
    m->pending_loss = 0.0, m->pending_count = 0;
    return TD_OK;
}

td_status td_model_stream(td_model *m, void **out_stream) {
    REQUIRE_BUILT("td_model_stream");
    if (!out_stream) return td_fail(m, TD_ERR_ARG, "td_model_stream: out_stream is NULL");
    *out_stream = m->ops ? m->ops->stream(m) : NULL;
    return TD_OK;
}

static td_status td_model_forward_impl(td_model *m, float *logits_BTV, double *out_loss, const int32_t *tokens_BT, const int32_t *targets_BT, int32_t B, int32_t T) {
    static const char *fn = "td_model_forward";
    REQUIRE_BUILT("td_model_forward");
    if (m->stages != 1) return td_fail(m, TD_ERR_STATE, "%s: the model is stage %lld of %lld; use td_stage_forward", fn, (long long)m->stage, (long long)m->stages);
    td_status st = check_shape(m, fn, B, T);
    if (st) return st;
    if (!tokens_BT) return td_fail(m, TD_ERR_ARG, "%s: tokens is NULL", fn);
    if ((st = check_ids(m, fn, "tokens", tokens_BT, B, T))) return st;
    if (targets_BT && (st = check_ids(m, fn, "targets", targets_BT, B, T))) return st;
    if (m->slot[0].state == 2) return td_fail(m, TD_ERR_STATE, "%s: slot 0 awaits a W pass", fn);
    td_slot *s = &m->slot[0];
    s->B = B, s->T = T;
    memcpy(s->tokens, tokens_BT, sizeof(int32_t) * (size_t)B * T);
    if (targets_BT) memcpy(s->targets, targets_BT, sizeof(int32_t) * (size_t)B * T);
    st = m->ops ? m->ops->forward(m, logits_BTV, out_loss, targets_BT != NULL)
                : td_forward_slot(m, 0, logits_BTV, out_loss, targets_BT != NULL);
    s->state = targets_BT ? 1 : 0;
    return st;
}

td_status td_model_zero_grad(td_model *m) {
    REQUIRE_BUILT("td_model_zero_grad");
    if (m->ops) return m->ops->zero_grad(m); /* the host copy is refreshed on download */
    memset(m->grad_mem, 0, sizeof(td_real) * m->total);
    return TD_OK;
}

static td_status td_model_forward_backward_impl(td_model *m, double *out_loss, const int32_t *tokens_BT, const int32_t *targets_BT, int32_t B, int32_t T, double grad_scale) {
    static const char *fn = "td_model_forward_backward";
    REQUIRE_BUILT("td_model_forward_backward");
    if (!targets_BT) return td_fail(m, TD_ERR_ARG, "%s: targets is NULL", fn);
    const double started = now_s();
    td_status st = td_model_forward_impl(m, NULL, out_loss, tokens_BT, targets_BT, B, T);
    if (st) return st;
    if (!isfinite(grad_scale)) return td_fail(m, TD_ERR_ARG, "%s: grad_scale=%g is not finite", fn, grad_scale);
    st = m->ops ? m->ops->backward(m, grad_scale) : td_backward_slot(m, 0, grad_scale, TD_BWD_FULL, NULL);
    m->slot[0].state = 0;
    slowdown(started);
    return st;
}

td_status td_model_grad_sq_sum(td_model *m, double *out) {
    REQUIRE_BUILT("td_model_grad_sq_sum");
    if (!out) return td_fail(m, TD_ERR_ARG, "td_model_grad_sq_sum: out is NULL");
    if (m->ops) return m->ops->grad_sq_sum(m, out);
    *out = td_grad_sq_sum_local(m);
    return TD_OK;
}

static td_status td_model_optimizer_step_with_norm_impl(td_model *m, double grad_norm) {
    REQUIRE_BUILT("td_model_optimizer_step_with_norm");
    if (!(grad_norm >= 0) || !isfinite(grad_norm)) {
        const char *name = NULL;
        int32_t what = 0;
        td_model_find_nonfinite(m, &name, &what); /* failure path only: names the culprit */
        char found[TD_MAX_NAME + 64] = "";
        if (name) snprintf(found, sizeof found, "; first non-finite %s on stage %lld: '%s'", what == 1 ? "gradient" : "parameter", (long long)m->stage, name);
        return td_fail(m, TD_ERR_ARG, "td_model_optimizer_step_with_norm: grad_norm=%g is not a finite non-negative number (step %lld)%s. HINT: a NaN or inf gradient; lower the learning rate or enable grad_clip", grad_norm, (long long)m->step, found);
    }
    if (m->ops) return m->ops->adamw(m, grad_norm);
    td_adamw(m, grad_norm);
    return TD_OK;
}

td_status td_model_optimizer_step(td_model *m, double *out_grad_norm) {
    REQUIRE_BUILT("td_model_optimizer_step");
    if (m->stages != 1)
        return td_fail(m, TD_ERR_STATE, "td_model_optimizer_step: stage %lld of %lld: the global norm spans every stage. HINT: use td_model_optimizer_step_with_norm", (long long)m->stage, (long long)m->stages);
    double sq = 0.0;
    td_status st = td_model_grad_sq_sum(m, &sq);
    if (st) return st;
    double norm = sqrt(sq);
    if (out_grad_norm) *out_grad_norm = norm;
    return td_model_optimizer_step_with_norm(m, norm);
}

/* ---- public entry points of the passes: FP environment around the work --------------------- */

td_status td_stage_forward(td_model *m, float *out_BTC, double *out_loss, int32_t slot, const int32_t *tokens_BT, const float *in_BTC, const int32_t *targets_BT, int32_t B, int32_t T) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_stage_forward_impl(m, out_BTC, out_loss, slot, tokens_BT, in_BTC, targets_BT, B, T, 0);
    td_fp_leave(fp);
    return st;
}

td_status td_stage_backward(td_model *m, float *din_BTC, int32_t slot, const float *dout_BTC, double grad_scale, int32_t part) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_stage_backward_impl(m, din_BTC, slot, dout_BTC, grad_scale, part, 0);
    td_fp_leave(fp);
    return st;
}

td_status td_stage_forward_dev(td_model *m, void *out_BTC, double *out_loss, int32_t slot, const int32_t *tokens_BT, const void *in_BTC, const int32_t *targets_BT, int32_t B, int32_t T) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_stage_forward_impl(m, out_BTC, out_loss, slot, tokens_BT, in_BTC, targets_BT, B, T, 1);
    td_fp_leave(fp);
    return st;
}

td_status td_stage_backward_dev(td_model *m, void *din_BTC, int32_t slot, const void *dout_BTC, double grad_scale, int32_t part) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_stage_backward_impl(m, din_BTC, slot, dout_BTC, grad_scale, part, 1);
    td_fp_leave(fp);
    return st;
}

td_status td_model_forward(td_model *m, float *logits_BTV, double *out_loss, const int32_t *tokens_BT, const int32_t *targets_BT, int32_t B, int32_t T) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_model_forward_impl(m, logits_BTV, out_loss, tokens_BT, targets_BT, B, T);
    td_fp_leave(fp);
    return st;
}

td_status td_model_forward_backward(td_model *m, double *out_loss, const int32_t *tokens_BT, const int32_t *targets_BT, int32_t B, int32_t T, double grad_scale) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_model_forward_backward_impl(m, out_loss, tokens_BT, targets_BT, B, T, grad_scale);
    td_fp_leave(fp);
    return st;
}

td_status td_model_optimizer_step_with_norm(td_model *m, double grad_norm) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_model_optimizer_step_with_norm_impl(m, grad_norm);
    td_fp_leave(fp);
    return st;
}
