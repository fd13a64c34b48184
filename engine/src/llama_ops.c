/* llama_ops.c — reference CPU kernels of the Llama family's own ops (RMSNorm, RoPE, SwiGLU,
 * grouped-query attention), forward and backward.
 *
 * Written to be read and checked, like kernels.c: the textbook loop, OpenMP over independent
 * rows, a fixed reduction order (bit-identical for a given thread count). The maths and the
 * conventions (half-split RoPE, query head h -> kv head h / (NH / NKV)) are docs/model.md's.
 * The projections around these ops are GEMMs (td_gemm with the public (out, in) weights).
 */
#include "llama_ops.h"

#include "kernels.h" /* the attention's per-head GEMM path and its row softmax */

#include <math.h>
#include <string.h>

/* ---- token embedding ------------------------------------------------------------------------- */

void td_embedding_forward(td_real *out, const int32_t *tokens, const td_real *table, int N,
                          int C) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++)
        memcpy(out + (int64_t)i * C, table + (int64_t)tokens[i] * C, sizeof(td_real) * C);
}

void td_embedding_backward(td_real *dtable, const td_real *dout, const int32_t *tokens, int N,
                           int C) {
    for (int i = 0; i < N; i++) {
        const td_real *d = dout + (int64_t)i * C;
        td_real *de = dtable + (int64_t)tokens[i] * C;
        for (int c = 0; c < C; c++) de[c] += d[c];
    }
}

/* ---- RMSNorm --------------------------------------------------------------------------------- */

/* RMSNorm rows: each row's sum in 8 double lanes added in a fixed tree, the tail last, like
 * kernels.c's LayerNorm rows (one running sum per row is bound by the add's latency); the
 * rows are cloned per vector width in the float build. */
#ifndef TD_FLOAT64
#define RMS_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RMS_CLONES
#endif

RMS_CLONES static void rmsnorm_forward_row(td_real *o, td_real *rstd, const td_real *x,
                                           const td_real *w, int C, double eps) {
    double acc[TD_LANES] = {0};
    int c = 0;
    for (; c + TD_LANES <= C; c += TD_LANES)
        for (int l = 0; l < TD_LANES; l++) acc[l] += (double)x[c + l] * x[c + l];
    double ss = td_lanes8_total(acc);
    for (; c < C; c++) ss += (double)x[c] * x[c];
    const double r = 1.0 / sqrt(ss / C + eps);
    for (c = 0; c < C; c++) o[c] = (td_real)(x[c] * r) * w[c];
    *rstd = (td_real)r;
}

void td_rmsnorm_forward(td_real *out, td_real *rstd, const td_real *inp, const td_real *w, int N,
                        int C, double eps) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++)
        rmsnorm_forward_row(out + (int64_t)i * C, rstd + i, inp + (int64_t)i * C, w, C, eps);
}

RMS_CLONES static void rmsnorm_backward_input_row(td_real *di, const td_real *d,
                                                  const td_real *x, const td_real *w, double r,
                                                  int C, int accumulate_dinp) {
    double acc[TD_LANES] = {0};
    int c = 0;
    for (; c + TD_LANES <= C; c += TD_LANES)
        for (int l = 0; l < TD_LANES; l++) acc[l] += (double)w[c + l] * d[c + l] * (x[c + l] * r);
    double dot = td_lanes8_total(acc);
    for (; c < C; c++) dot += (double)w[c] * d[c] * (x[c] * r);
    dot /= C;
#define RMS_DINP(c) ((td_real)(r * ((double)w[c] * d[c] - (x[c] * r) * dot)))
    if (accumulate_dinp) /* two loops, not a branch per element */
        for (c = 0; c < C; c++) di[c] += RMS_DINP(c);
    else
        for (c = 0; c < C; c++) di[c] = RMS_DINP(c);
#undef RMS_DINP
}

void td_rmsnorm_backward_input(td_real *dinp, const td_real *dout, const td_real *inp,
                               const td_real *w, const td_real *rstd, int N, int C,
                               int accumulate_dinp) {
    /* y = w * x * r, r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / C:
     * dx_j = r * (w_j dy_j - xhat_j * mean_i(w_i dy_i xhat_i)), xhat = x * r */
#pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++)
        rmsnorm_backward_input_row(dinp + (int64_t)i * C, dout + (int64_t)i * C,
                                   inp + (int64_t)i * C, w, rstd[i], C, accumulate_dinp);
}

void td_rmsnorm_backward_weight(td_real *dw, const td_real *dout, const td_real *inp,
                                const td_real *rstd, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += 64) { /* 64 channels per task, rows in order */
        const int cn = C - c0 < 64 ? C - c0 : 64;
        td_real s[64] = {0};
        for (int i = 0; i < N; i++) {
            const td_real *d = dout + (int64_t)i * C + c0, *x = inp + (int64_t)i * C + c0;
            const td_real r = rstd[i];
            for (int c = 0; c < cn; c++) s[c] += d[c] * (x[c] * r);
        }
        for (int c = 0; c < cn; c++) dw[c0 + c] += s[c];
    }
}

/* ---- rotary position embedding ----------------------------------------------------------------- */

/* One rotation of every (b, t, h) pair (i, i + HS/2) by +angle (sign = 1) or -angle (-1). The
 * angle t * theta^(-2i/HS) is computed in double and its cos and sin rounded once. */
static void rope_rotate(td_real *out, const td_real *inp, int B, int T, int NH, int HS,
                        double theta, int sign) {
    const int half = HS / 2;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < half; i++) {
            const double angle = (double)t * pow(theta, -2.0 * i / HS);
            const td_real c = (td_real)cos(angle), s = (td_real)(sign * sin(angle));
            for (int b = 0; b < B; b++) {
                for (int h = 0; h < NH; h++) {
                    const int64_t at = (((int64_t)b * T + t) * NH + h) * HS;
                    const td_real x1 = inp[at + i], x2 = inp[at + i + half];
                    out[at + i] = x1 * c - x2 * s;
                    out[at + i + half] = x2 * c + x1 * s;
                }
            }
        }
    }
}

void td_rope_forward(td_real *out, const td_real *inp, int B, int T, int NH, int HS,
                     double theta) {
    rope_rotate(out, inp, B, T, NH, HS, theta, 1);
}

void td_rope_backward(td_real *dinp, const td_real *dout, int B, int T, int NH, int HS,
                      double theta) {
    /* a rotation's Jacobian is the rotation; its transpose turns by the opposite angle */
    rope_rotate(dinp, dout, B, T, NH, HS, theta, -1);
}

/* ---- SwiGLU ---------------------------------------------------------------------------------- */

/* silu(g) = g sigmoid(g): e^-g by kernels.h's polynomial in the float build (the loops
 * vectorize; within 1e-7 relative of libm), libm in double in the float64 build */
#ifndef TD_FLOAT64
#define SIG(g) (1.0f / (1.0f + fast_expf(-(g))))
typedef float sig_t;
#else
#define SIG(g) (1.0 / (1.0 + exp(-(g))))
typedef double sig_t;
#endif

void td_swiglu_forward(td_real *out, const td_real *gate, const td_real *up, int64_t n) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const sig_t g = gate[i];
        out[i] = (td_real)(g * SIG(g)) * up[i];
    }
}

void td_swiglu_backward(td_real *dgate, td_real *dup, const td_real *dout, const td_real *gate,
                        const td_real *up, int64_t n) {
    /* d silu(g) / dg = sig(g) (1 + g (1 - sig(g))) */
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const sig_t g = gate[i], sig = SIG(g);
        const td_real d = dout[i];
        dgate[i] = (td_real)(sig * (1 + g * (1 - sig))) * up[i] * d;
        dup[i] = (td_real)(g * sig) * d;
    }
}

/* ---- grouped-query attention ----------------------------------------------------------------- */

/* One (b, t, h) of the forward by the textbook loops (the path for small heads) */
static void gqa_forward_row(td_real *out, td_real *att, const td_real *q, const td_real *k,
                            const td_real *v, int b, int t, int h, int T, int NH, int NKV,
                            int HS, td_real scale) {
    const int kvh = h / (NH / NKV); /* consecutive query heads share a kv head */
    const td_real *qt = q + (((int64_t)b * T + t) * NH + h) * HS;
    td_real *a = att + (((int64_t)b * NH + h) * T + t) * T;
    for (int u = 0; u <= t; u++) {
        const td_real *ku = k + (((int64_t)b * T + u) * NKV + kvh) * HS;
        td_real s = 0;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < HS; i++) s += qt[i] * ku[i];
        a[u] = s;
    }
    td_softmax_row(a, t, T, scale);
    td_real *o = out + (((int64_t)b * T + t) * NH + h) * HS;
    for (int i = 0; i < HS; i++) o[i] = 0;
    for (int u = 0; u <= t; u++) {
        const td_real *vu = v + (((int64_t)b * T + u) * NKV + kvh) * HS;
        const td_real au = a[u];
#pragma omp simd
        for (int i = 0; i < HS; i++) o[i] += au * vu[i];
    }
}

void td_gqa_attention_forward(td_real *out, td_real *att, const td_real *q, const td_real *k,
                              const td_real *v, int B, int T, int NH, int NKV, int HS) {
    const int group = NH / NKV;
    const td_real scale = (td_real)(1.0 / sqrt((double)HS));
    if (td_attention_head_gemm_ok(T, HS)) { /* kernels.c's per-head GEMMs, one (b, h) a task */
        const int64_t ldq = (int64_t)NH * HS, ldk = (int64_t)NKV * HS;
#pragma omp parallel for collapse(2) schedule(static)
        for (int b = 0; b < B; b++) {
            for (int h = 0; h < NH; h++) {
                const int64_t qo = (int64_t)b * T * ldq + (int64_t)h * HS;
                const int64_t ko = (int64_t)b * T * ldk + (int64_t)(h / group) * HS;
                td_real *a = att + ((int64_t)b * NH + h) * T * T;
                if (td_attention_head_forward_gemm(out + qo, ldq, a, q + qo, ldq, k + ko, v + ko,
                                                   ldk, T, HS, scale))
                    continue;
                for (int t = 0; t < T; t++) /* no scratch: this head by the loops below */
                    gqa_forward_row(out, att, q, k, v, b, t, h, T, NH, NKV, HS, scale);
            }
        }
        return;
    }
#pragma omp parallel for collapse(3) schedule(static)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < NH; h++)
                gqa_forward_row(out, att, q, k, v, b, t, h, T, NH, NKV, HS, scale);
}

void td_gqa_attention_backward(td_real *dq, td_real *dk, td_real *dv, td_real *datt,
                               const td_real *dout, const td_real *q, const td_real *k,
                               const td_real *v, const td_real *att, int B, int T, int NH,
                               int NKV, int HS) {
    const int group = NH / NKV;
    const td_real scale = (td_real)(1.0 / sqrt((double)HS));
    /* One (b, kv head) per iteration: it owns dk and dv of that head and dq of the query heads
     * of its group, so no two threads write one element, and the adds into dk and dv run in a
     * fixed order (query heads of the group in order, then t). */
    const int gemm = td_attention_head_gemm_ok(T, HS);
    const int64_t ldq = (int64_t)NH * HS, ldk = (int64_t)NKV * HS;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int kvh = 0; kvh < NKV; kvh++) {
            if (gemm) { /* kernels.c's per-head GEMMs over the group; the loops if no scratch */
                const int64_t qo = (int64_t)b * T * ldq + (int64_t)kvh * group * HS;
                const int64_t ko = (int64_t)b * T * ldk + (int64_t)kvh * HS;
                const int64_t ao = ((int64_t)b * NH + (int64_t)kvh * group) * T * T;
                if (td_attention_group_backward_gemm(dq + qo, dk + ko, dv + ko, datt + ao,
                                                     dout + qo, ldq, q + qo, ldq, k + ko, v + ko,
                                                     ldk, att + ao, group, T, HS, scale))
                    continue;
            }
            for (int t = 0; t < T; t++) {
                const int64_t kv_at = (((int64_t)b * T + t) * NKV + kvh) * HS;
                memset(dk + kv_at, 0, sizeof(td_real) * HS);
                memset(dv + kv_at, 0, sizeof(td_real) * HS);
                for (int j = 0; j < group; j++)
                    memset(dq + (((int64_t)b * T + t) * NH + kvh * group + j) * HS, 0,
                           sizeof(td_real) * HS);
            }
            for (int j = 0; j < group; j++) {
                const int h = kvh * group + j;
                for (int t = 0; t < T; t++) {
                    const td_real *a = att + (((int64_t)b * NH + h) * T + t) * T;
                    td_real *da = datt + (((int64_t)b * NH + h) * T + t) * T;
                    const int64_t q_at = (((int64_t)b * T + t) * NH + h) * HS;
                    const td_real *d = dout + q_at, *qt = q + q_at;
                    td_real *dqt = dq + q_at;
                    /* through o = sum_u a[u] v[u] */
                    for (int u = 0; u <= t; u++) {
                        const int64_t u_at = (((int64_t)b * T + u) * NKV + kvh) * HS;
                        const td_real *vu = v + u_at;
                        td_real *dvu = dv + u_at;
                        const td_real au = a[u];
                        td_real s = 0;
#pragma omp simd reduction(+ : s)
                        for (int i = 0; i < HS; i++) {
                            s += vu[i] * d[i];
                            dvu[i] += au * d[i];
                        }
                        da[u] = s;
                    }
                    /* through the softmax: dpre[u] = a[u] (da[u] - sum_w a[w] da[w]) */
                    td_real dot = 0;
                    for (int u = 0; u <= t; u++) dot += a[u] * da[u];
                    for (int u = 0; u <= t; u++) {
                        const td_real dpre = a[u] * (da[u] - dot) * scale;
                        const int64_t u_at = (((int64_t)b * T + u) * NKV + kvh) * HS;
                        const td_real *ku = k + u_at;
                        td_real *dku = dk + u_at;
#pragma omp simd
                        for (int i = 0; i < HS; i++) {
                            dqt[i] += ku[i] * dpre;
                            dku[i] += qt[i] * dpre;
                        }
                    }
                }
            }
        }
    }
}
