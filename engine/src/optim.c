/* optim.c — AdamW with bias correction, decoupled weight decay on rank >= 2 tensors and optional
 * global-norm clipping, exactly as docs/model.md writes it. The global norm is an input so that
 * a pipelined run can sum squares over every stage first (td_model_grad_sq_sum).
 */
#include <math.h>
#include <string.h>

#include "internal.h"

/* How many leading elements of the flat gradient buffer the global norm counts: all of them,
 * except the last stage's copy of the tied wte (the last tensor of its table) when the stage does
 * not also hold the embedding: its gradient equals the first stage's after the tied-gradient sum,
 * and the global norm counts each parameter once. Every backend's grad_sq_sum uses it. */
int64_t td_grad_norm_elems(const td_model *m) {
    if (!m->has_embed && m->nparams > 0 && strcmp(m->params[m->nparams - 1].name, "wte.weight") == 0)
        return (int64_t)m->params[m->nparams - 1].offset;
    return (int64_t)m->total;
}

/* Sum of squared gradients of this stage (td_grad_norm_elems of them). */
double td_grad_sq_sum_local(const td_model *m) {
    /* Fixed chunks of the flat gradient buffer, summed in a fixed order: the same bits whatever
     * the thread count, one parallel region. */
    enum { CHUNK = 1 << 16 };
    size_t n = (size_t)td_grad_norm_elems(m);
    const int64_t nchunks = ((int64_t)n + CHUNK - 1) / CHUNK;
    double sum = 0.0;
    double partial[256];
    for (int64_t c0 = 0; c0 < nchunks; c0 += 256) {
        const int64_t cn = nchunks - c0 < 256 ? nchunks - c0 : 256;
#pragma omp parallel for schedule(static)
        for (int64_t c = 0; c < cn; c++) {
            const int64_t lo = (c0 + c) * CHUNK, hi = lo + CHUNK < (int64_t)n ? lo + CHUNK : (int64_t)n;
            const td_real *g = m->grad_mem;
            double s = 0.0;
            for (int64_t j = lo; j < hi; j++) s += (double)g[j] * g[j];
            partial[c] = s;
        }
        for (int64_t c = 0; c < cn; c++) sum += partial[c];
    }
    return sum;
}

void td_adamw(td_model *m, double grad_norm) {
    const double started = m->profile ? td_prof_now() : 0.0;
    m->step += 1;
    const double t = (double)m->step;
    const td_real b1 = (td_real)m->beta1, b2 = (td_real)m->beta2;
    const td_real bc1 = (td_real)(1.0 - pow(m->beta1, t));
    const td_real bc2 = (td_real)(1.0 - pow(m->beta2, t));
    const td_real lr = (td_real)m->lr, eps = (td_real)m->eps;
    td_real clip_scale = 1;
    if (m->grad_clip > 0 && grad_norm > m->grad_clip) clip_scale = (td_real)(m->grad_clip / grad_norm);
    /* One parallel region for every tensor (no barrier between tensors: elements are
     * independent), so the optimizer costs one fork/join, not one per tensor. */
#pragma omp parallel
    for (int32_t i = 0; i < m->nparams; i++) {
        const td_param *p = &m->params[i];
        const td_real wd = p->decayed ? (td_real)m->weight_decay : 0;
        td_real *theta = m->param_mem + p->offset, *g = m->grad_mem + p->offset;
        td_real *mm = m->m_mem + p->offset, *vv = m->v_mem + p->offset;
#pragma omp for schedule(static) nowait
        for (int64_t j = 0; j < p->numel; j++) {
            td_real gj = clip_scale == 1 ? g[j] : g[j] * clip_scale;
            mm[j] = b1 * mm[j] + (1 - b1) * gj;
            vv[j] = b2 * vv[j] + (1 - b2) * gj * gj;
            td_real mhat = mm[j] / bc1;
            td_real vhat = vv[j] / bc2;
            theta[j] = theta[j] - lr * (mhat / (td_sqrt(vhat) + eps) + wd * theta[j]);
        }
    }
    if (m->profile) td_prof_add(m, TD_PH_ADAMW, started);
}
