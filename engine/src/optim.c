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

/* One chunk's sum of squares in 32 double lanes, lane l summing elements l, l + 32, ... in
 * order, the lanes then added 0..31, the tail last: a fixed order (the same bits on every clone
 * and thread count), and no chain of dependent additions (a single running sum is bound by the
 * add's latency, about 4 cycles an element: 53 ms of GPT-2 124M's step on 2 threads against
 * ~9 ms for reading the 500 MB). In float builds each product of two floats is exact in double,
 * so FMA contraction could not change it either. */
__attribute__((target_clones("avx512f", "avx2", "default"))) static double
sq_sum_chunk(const td_real *restrict g, int64_t n) {
    enum { LANES = 32 };
    double acc[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += (double)g[j + l] * g[j + l];
    double s = 0.0;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; j < n; j++) s += (double)g[j] * g[j];
    return s;
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
            partial[c] = sq_sum_chunk(m->grad_mem + lo, hi - lo);
        }
        for (int64_t c = 0; c < cn; c++) sum += partial[c];
    }
    return sum;
}

/* One element of the update of docs/model.md, exactly as written (the same divisions and square
 * root, no reciprocal); inlined into both loops of adamw_slice. */
static inline __attribute__((always_inline)) void
adamw_element(td_real *theta, td_real *mm, td_real *vv, int64_t j, td_real gj, td_real b1,
              td_real b2, td_real bc1, td_real bc2, td_real lr, td_real eps, td_real wd) {
    mm[j] = b1 * mm[j] + (1 - b1) * gj;
    vv[j] = b2 * vv[j] + (1 - b2) * gj * gj;
    td_real mhat = mm[j] / bc1;
    td_real vhat = vv[j] / bc2;
    theta[j] = theta[j] - lr * (mhat / (td_sqrt(vhat) + eps) + wd * theta[j]);
}

/* One tensor's slice. Cloned for AVX-512 and AVX2 so it runs 16 or 8 lanes wide. This file is
 * compiled with -ffp-contract=off, which keeps every clone's arithmetic identical to the portable
 * one (an FMA would round once where the code rounds twice), and -fno-math-errno, which lets the
 * square root vectorize (it is correctly rounded either way): engine/CMakeLists.txt. The clip
 * branch is hoisted out of the loop. */
__attribute__((target_clones("avx512f", "avx2", "default"))) static void
adamw_slice(td_real *restrict theta, const td_real *restrict g, td_real *restrict mm,
            td_real *restrict vv, int64_t n, td_real b1, td_real b2, td_real bc1, td_real bc2,
            td_real lr, td_real eps, td_real wd, td_real clip_scale) {
    if (clip_scale != 1) {
        for (int64_t j = 0; j < n; j++)
            adamw_element(theta, mm, vv, j, g[j] * clip_scale, b1, b2, bc1, bc2, lr, eps, wd);
    } else {
        for (int64_t j = 0; j < n; j++)
            adamw_element(theta, mm, vv, j, g[j], b1, b2, bc1, bc2, lr, eps, wd);
    }
}

void td_adamw(td_model *m, double grad_norm) {
    const double started = m->profile ? td_prof_now(m) : 0.0;
    m->step += 1;
    const double t = (double)m->step;
    const td_real b1 = (td_real)m->beta1, b2 = (td_real)m->beta2;
    const td_real bc1 = (td_real)(1.0 - pow(m->beta1, t));
    const td_real bc2 = (td_real)(1.0 - pow(m->beta2, t));
    const td_real lr = (td_real)m->lr, eps = (td_real)m->eps;
    td_real clip_scale = 1;
    if (m->grad_clip > 0 && grad_norm > m->grad_clip) clip_scale = (td_real)(m->grad_clip / grad_norm);
    /* Elements are independent: the flat buffers are cut into fixed slices that never straddle
     * a tensor (each has one decay setting), one parallel region for all of them, and one
     * thread alone when the model is too small to repay waking the others. */
    enum { SLICE = 8192 };
    int64_t nslices = 0;
    for (int32_t i = 0; i < m->nparams; i++) nslices += (m->params[i].numel + SLICE - 1) / SLICE;
#pragma omp parallel if ((int64_t)m->total >= 4 * SLICE)
    {
        int32_t i = 0;
        int64_t first = 0; /* index of tensor i's first slice */
#pragma omp for schedule(static) nowait
        for (int64_t k = 0; k < nslices; k++) {
            while (k >= first + (m->params[i].numel + SLICE - 1) / SLICE) {
                first += (m->params[i].numel + SLICE - 1) / SLICE;
                i++;
            }
            const td_param *p = &m->params[i];
            const td_real wd = p->decayed ? (td_real)m->weight_decay : 0;
            const int64_t lo = (k - first) * SLICE;
            const int64_t n = p->numel - lo < SLICE ? p->numel - lo : SLICE;
            const size_t off = p->offset + (size_t)lo;
            adamw_slice(m->param_mem + off, m->grad_mem + off, m->m_mem + off, m->v_mem + off, n,
                        b1, b2, bc1, bc2, lr, eps, wd, clip_scale);
        }
    }
    if (m->profile) td_prof_add(m, TD_PH_ADAMW, started);
}
