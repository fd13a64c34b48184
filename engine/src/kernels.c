/* kernels.c — reference CPU kernels for every op of the GPT-2 model, forward and backward.
 *
 * Written to be read and checked, not to be fast: each kernel is the textbook loop with OpenMP
 * over independent rows and a fixed reduction order. The fast GEMM lives in gemm.c and is
 * validated against td_gemm_reference here. The maths is specified in docs/model.md.
 */
#include "kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Fault injection for the harness's own tests: TANDEM_FAULT=<kernel>[:<factor>] scales the output
 * of every kernel whose name is or starts with <kernel>_ by factor (default 1 + 1e-3), so a test can prove that parity catches a
 * wrong kernel and names the tensors it touches. Unset in normal use: costs one getenv. */
static td_real fault_factor(const char *kernel) {
    const char *f = getenv("TANDEM_FAULT");
    if (!f || !*f) return 1;
    const char *colon = strchr(f, ':');
    size_t n = colon ? (size_t)(colon - f) : strlen(f);
    /* "layernorm_backward" selects both layernorm_backward_input and _weight */
    if (strncmp(kernel, f, n) != 0 || (kernel[n] != 0 && kernel[n] != '_')) return 1;
    return (td_real)(colon ? atof(colon + 1) : 1.001);
}

/* TD_OK when TANDEM_FAULT is unset or names a kernel that honours it (td_model_build checks,
 * so a typo cannot make a fault test pass without injecting anything). */
int td_fault_name_valid(const char **out_value) {
    static const char *kernels[] = {"layernorm_backward_input", "layernorm_backward_weight",
                                    "gelu_backward", "attention_backward"};
    const char *f = getenv("TANDEM_FAULT");
    *out_value = f;
    if (!f || !*f) return 1;
    const char *colon = strchr(f, ':');
    size_t n = colon ? (size_t)(colon - f) : strlen(f);
    for (size_t i = 0; i < sizeof kernels / sizeof kernels[0]; i++)
        if (strncmp(kernels[i], f, n) == 0 && (kernels[i][n] == 0 || kernels[i][n] == '_')) return 1;
    return 0;
}

static void apply_fault(const char *kernel, td_real *out, int64_t n) {
    td_real k = fault_factor(kernel);
    if (k != 1)
        for (int64_t i = 0; i < n; i++) out[i] *= k;
}

/* Parallel regions run on the calling thread alone below this much work (elements touched, or
 * multiply-adds): waking the pool costs more than it saves (a few microseconds spinning, tens
 * when the threads sleep). Thread counts never change results, so neither does this. */
#define PAR_MIN_WORK 32768
#define PAR_IF(work) if ((int64_t)(work) >= PAR_MIN_WORK)

/* ---- GEMM ------------------------------------------------------------------------------------ */

void td_gemm_reference(td_real *C, const td_real *A, const td_real *B, int M, int N, int K,
                       int transA, int transB, int accumulate) {
#pragma omp parallel for schedule(static) PAR_IF((int64_t)M * N * K)
    for (int i = 0; i < M; i++) {
        td_real *c = C + (int64_t)i * N;
        if (!transB) {
            if (!accumulate) memset(c, 0, sizeof(td_real) * (size_t)N);
            for (int k = 0; k < K; k++) {
                td_real a = transA ? A[(int64_t)k * M + i] : A[(int64_t)i * K + k];
                const td_real *b = B + (int64_t)k * N;
                for (int n = 0; n < N; n++) c[n] += a * b[n];
            }
        } else {
            for (int n = 0; n < N; n++) {
                const td_real *b = B + (int64_t)n * K;
                td_real s = 0;
                if (!transA) {
                    const td_real *a = A + (int64_t)i * K;
#pragma omp simd reduction(+ : s)
                    for (int k = 0; k < K; k++) s += a[k] * b[k];
                } else {
                    for (int k = 0; k < K; k++) s += A[(int64_t)k * M + i] * b[k];
                }
                c[n] = accumulate ? c[n] + s : s;
            }
        }
    }
}

/* ---- encoder --------------------------------------------------------------------------------- */

void td_encoder_forward(td_real *out, const int32_t *tokens, const td_real *wte,
                        const td_real *wpe, int B, int T, int C) {
#pragma omp parallel for schedule(static) PAR_IF((int64_t)B * T * C)
    for (int bt = 0; bt < B * T; bt++) {
        int t = bt % T;
        const td_real *e = wte + (int64_t)tokens[bt] * C;
        const td_real *p = wpe + (int64_t)t * C;
        td_real *o = out + (int64_t)bt * C;
        for (int c = 0; c < C; c++) o[c] = e[c] + p[c];
    }
}

void td_encoder_backward(td_real *dwte, td_real *dwpe, const td_real *dout, const int32_t *tokens,
                         int B, int T, int C) {
    /* Rows may share a token (and all batches share positions): keep the adds in row order. */
    for (int bt = 0; bt < B * T; bt++) {
        int t = bt % T;
        const td_real *d = dout + (int64_t)bt * C;
        td_real *de = dwte + (int64_t)tokens[bt] * C;
        td_real *dp = dwpe + (int64_t)t * C;
        for (int c = 0; c < C; c++) {
            de[c] += d[c];
            dp[c] += d[c];
        }
    }
}

/* ---- LayerNorm ------------------------------------------------------------------------------- */

/* LayerNorm rows. Each row's sums run in TD_LANES double lanes (lane l adds elements l,
 * l + TD_LANES, ... in order; the lanes are then added pairwise in a fixed tree, the tail last):
 * one running sum per row is bound by the add's latency (about 4 cycles an element: 0.48 ms of
 * the small case's 1024 x 384 forward on 2 threads). The order is fixed, so the bits do not
 * depend on the thread count; in the float build the rows are cloned per vector width like
 * GELU. */
#ifndef TD_FLOAT64
#define LN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LN_CLONES
#endif

LN_CLONES static void layernorm_forward_row(td_real *o, td_real *mean, td_real *rstd,
                                            const td_real *x, const td_real *w, const td_real *b,
                                            int C) {
    const double eps = 1e-5;
    double acc[TD_LANES] = {0};
    int c = 0;
    for (; c + TD_LANES <= C; c += TD_LANES)
        for (int l = 0; l < TD_LANES; l++) acc[l] += x[c + l];
    double s = td_lanes8_total(acc);
    for (; c < C; c++) s += x[c];
    const double m = s / C;
    double vacc[TD_LANES] = {0};
    for (c = 0; c + TD_LANES <= C; c += TD_LANES)
        for (int l = 0; l < TD_LANES; l++) {
            const double d = x[c + l] - m;
            vacc[l] += d * d;
        }
    double v = td_lanes8_total(vacc);
    for (; c < C; c++) {
        const double d = x[c] - m;
        v += d * d;
    }
    v /= C;
    const double r = 1.0 / sqrt(v + eps);
    for (c = 0; c < C; c++) o[c] = (td_real)(((double)x[c] - m) * r) * w[c] + b[c];
    *mean = (td_real)m;
    *rstd = (td_real)r;
}

void td_layernorm_forward(td_real *out, td_real *mean, td_real *rstd, const td_real *inp,
                          const td_real *w, const td_real *b, int N, int C) {
#pragma omp parallel for schedule(static) PAR_IF((int64_t)N * C)
    for (int i = 0; i < N; i++)
        layernorm_forward_row(out + (int64_t)i * C, mean + i, rstd + i, inp + (int64_t)i * C, w,
                              b, C);
}

LN_CLONES static void layernorm_backward_input_row(td_real *di, const td_real *d,
                                                   const td_real *x, const td_real *w, td_real m,
                                                   td_real r, int C, int accumulate_dinp,
                                                   td_real fk) {
    double am[TD_LANES] = {0}, ax[TD_LANES] = {0};
    int c = 0;
    for (; c + TD_LANES <= C; c += TD_LANES)
        for (int l = 0; l < TD_LANES; l++) {
            const double xhat = (double)(x[c + l] - m) * r;
            const double dnorm = (double)w[c + l] * d[c + l];
            am[l] += dnorm;
            ax[l] += dnorm * xhat;
        }
    double dnorm_mean = td_lanes8_total(am), dnorm_xhat_mean = td_lanes8_total(ax);
    for (; c < C; c++) {
        const double xhat = (double)(x[c] - m) * r;
        const double dnorm = (double)w[c] * d[c];
        dnorm_mean += dnorm;
        dnorm_xhat_mean += dnorm * xhat;
    }
    dnorm_mean /= C;
    dnorm_xhat_mean /= C;
#define LN_XHAT(c) ((double)(x[c] - m) * r)
#define LN_DNORM(c) ((double)w[c] * d[c])
#define LN_DINP(c) ((td_real)((LN_DNORM(c) - dnorm_mean - LN_XHAT(c) * dnorm_xhat_mean) * r) * fk)
    if (accumulate_dinp) /* two loops, not a branch per element: each vectorizes */
        for (c = 0; c < C; c++) di[c] += LN_DINP(c);
    else
        for (c = 0; c < C; c++) di[c] = LN_DINP(c);
#undef LN_DINP
#undef LN_DNORM
#undef LN_XHAT
}

void td_layernorm_backward_input(td_real *dinp, const td_real *dout, const td_real *inp,
                                 const td_real *w, const td_real *mean, const td_real *rstd,
                                 int N, int C, int accumulate_dinp) {
    const td_real fk = fault_factor("layernorm_backward_input");
#pragma omp parallel for schedule(static) PAR_IF((int64_t)N * C)
    for (int i = 0; i < N; i++)
        layernorm_backward_input_row(dinp + (int64_t)i * C, dout + (int64_t)i * C,
                                     inp + (int64_t)i * C, w, mean[i], rstd[i], C,
                                     accumulate_dinp, fk);
}

void td_layernorm_backward_weight(td_real *dw, td_real *db, const td_real *dout,
                                  const td_real *inp, const td_real *mean, const td_real *rstd,
                                  int N, int C) {
    const td_real fk = fault_factor("layernorm_backward_weight");
#pragma omp parallel for schedule(static) PAR_IF((int64_t)N * C)
    for (int c0 = 0; c0 < C; c0 += 64) { /* 64 channels per task, rows in order */
        const int cn = C - c0 < 64 ? C - c0 : 64;
        td_real sw[64] = {0}, sb[64] = {0};
        for (int i = 0; i < N; i++) {
            const td_real *d = dout + (int64_t)i * C + c0, *x = inp + (int64_t)i * C + c0;
            const td_real m = mean[i], r = rstd[i];
#pragma omp simd
            for (int c = 0; c < cn; c++) {
                sw[c] += d[c] * ((x[c] - m) * r);
                sb[c] += d[c];
            }
        }
        for (int c = 0; c < cn; c++) {
            dw[c0 + c] += sw[c] * fk;
            db[c0 + c] += sb[c] * fk;
        }
    }
}

/* ---- linear layers (x @ W + b, GPT-2 layout W: (in, out)) ---------------------------------- */

void td_linear_forward(td_real *out, const td_real *inp, const td_real *w, const td_real *bias,
                       int N, int IC, int OC) {
    td_gemm(out, inp, w, N, OC, IC, 0, 0, 0);
    if (bias) {
#pragma omp parallel for schedule(static) PAR_IF((int64_t)N * OC)
        for (int i = 0; i < N; i++) {
            td_real *o = out + (int64_t)i * OC;
            for (int j = 0; j < OC; j++) o[j] += bias[j];
        }
    }
}

void td_linear_backward_input(td_real *dinp, const td_real *dout, const td_real *w, int N,
                              int IC, int OC, int accumulate) {
    td_gemm(dinp, dout, w, N, IC, OC, 0, 1, accumulate);
}

void td_linear_backward_weight(td_real *dw, td_real *dbias, const td_real *dout,
                               const td_real *inp, int N, int IC, int OC) {
    td_gemm(dw, inp, dout, IC, OC, N, 1, 0, 1);
    if (dbias) { /* column sums, 64 columns per task, rows in order: contiguous inner loop */
#pragma omp parallel for schedule(static) PAR_IF((int64_t)N * OC)
        for (int j0 = 0; j0 < OC; j0 += 64) {
            const int jn = OC - j0 < 64 ? OC - j0 : 64;
            td_real s[64] = {0};
            for (int i = 0; i < N; i++) {
                const td_real *row = dout + (int64_t)i * OC + j0;
#pragma omp simd
                for (int j = 0; j < jn; j++) s[j] += row[j];
            }
            for (int j = 0; j < jn; j++) dbias[j0 + j] += s[j];
        }
    }
}

/* fast_expf and softmax_exp: internal.h (llama_ops.c uses them too) */

/* ---- attention ------------------------------------------------------------------------------- */

#ifndef TD_FLOAT64
#define TD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

/* p[v] = e^(p[v] - maxv) over one row, returning the row's sum: eight partial sums, added in a
 * fixed order, so the float build vectorizes the polynomial (one clone per vector width, the
 * same sums in each). The float64 build keeps libm and one sum in order. */
#ifdef TD_FLOAT64
static td_real softmax_row_max(const td_real *p, int V) {
    td_real maxv = -INFINITY;
    for (int v = 0; v < V; v++) maxv = p[v] > maxv ? p[v] : maxv;
    return maxv;
}

static td_real softmax_row_exp(td_real *p, int V, td_real maxv) {
    td_real sum = 0;
    for (int v = 0; v < V; v++) {
        p[v] = softmax_exp(p[v] - maxv);
        sum += p[v];
    }
    return sum;
}
#else
/* the row maximum over eight lanes: a maximum does not depend on the order it is taken in */
TD_CLONES static float softmax_row_max(const float *p, int V) {
    float m[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int v = 0;
    for (; v + 8 <= V; v += 8)
        for (int j = 0; j < 8; j++) m[j] = p[v + j] > m[j] ? p[v + j] : m[j];
    for (; v < V; v++) m[0] = p[v] > m[0] ? p[v] : m[0];
    for (int j = 1; j < 8; j++) m[0] = m[j] > m[0] ? m[j] : m[0];
    return m[0];
}

TD_CLONES static float softmax_row_exp(float *p, int V, float maxv) {
    float part[8] = {0};
    int v = 0;
    for (; v + 8 <= V; v += 8)
        for (int j = 0; j < 8; j++) {
            p[v + j] = fast_expf(p[v + j] - maxv);
            part[j] += p[v + j];
        }
    for (; v < V; v++) {
        p[v] = fast_expf(p[v] - maxv);
        part[0] += p[v];
    }
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}
#endif


/* sum_u a[u] b[u] over n: eight lanes like softmax_row_exp (the float64 build: one sum in
 * order) */
#ifdef TD_FLOAT64
static td_real softmax_row_dot(const td_real *a, const td_real *b, int n) {
    td_real dot = 0;
    for (int u = 0; u < n; u++) dot += a[u] * b[u];
    return dot;
}
#else
TD_CLONES static float softmax_row_dot(const float *a, const float *b, int n) {
    float part[8] = {0};
    int u = 0;
    for (; u + 8 <= n; u += 8)
        for (int j = 0; j < 8; j++) part[j] += a[u + j] * b[u + j];
    for (; u < n; u++) part[0] += a[u] * b[u];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}
#endif

/* One row t of the scores (a[u] for u <= t holds q_t . k_u on entry) becomes its probabilities:
 * scaled, the row maximum subtracted, softmax_exp, normalised; a[u] = 0 past t up to n. Both
 * paths below (the per-row loops and the per-head GEMMs) go through this and the backward's
 * softmax_row_backward, so they round alike. */
static inline void softmax_row_forward(td_real *a, int t, int n, td_real scale) {
    for (int u = 0; u <= t; u++) a[u] *= scale;
    const td_real maxv = softmax_row_max(a, t + 1);
    const td_real sum = softmax_row_exp(a, t + 1, maxv); /* eight lanes: no serial chain */
    td_real inv = (td_real)1 / sum;
    for (int u = 0; u <= t; u++) a[u] *= inv;
    for (int u = t + 1; u < n; u++) a[u] = 0;
}

/* Through the softmax of one row: on entry da[u] = dL/da[u] (u <= t), on exit the score
 * gradient dpre[u] = a[u] (da[u] - sum_w a[w] da[w]) * scale. */
static inline void softmax_row_backward(const td_real *a, td_real *da, int t, td_real scale) {
    const td_real dot = softmax_row_dot(a, da, t + 1);
    for (int u = 0; u <= t; u++) {
        td_real dpre = a[u] * (da[u] - dot) * scale;
        da[u] = dpre;
    }
}

/* The per-row loops: one (b, t, h) of the forward, one (b, h) of the backward. They are the
 * path for small heads (where a GEMM's packing costs more than it saves) and the fallback when
 * the GEMM path's scratch cannot be allocated. */
static void attention_forward_row(td_real *out, td_real *att, const td_real *qkv, int b, int t,
                                  int h, int T, int C, int NH, td_real scale) {
    const int hs = C / NH;
    const int64_t C3 = 3 * (int64_t)C;
    const td_real *q = qkv + (int64_t)b * T * C3 + (int64_t)t * C3 + h * hs;
    td_real *a = att + (((int64_t)b * NH + h) * T + t) * T;
    for (int u = 0; u <= t; u++) {
        const td_real *k = qkv + (int64_t)b * T * C3 + (int64_t)u * C3 + C + h * hs;
        td_real s = 0;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < hs; i++) s += q[i] * k[i];
        a[u] = s;
    }
    softmax_row_forward(a, t, T, scale);
    td_real *o = out + (int64_t)b * T * C + (int64_t)t * C + h * hs;
    for (int i = 0; i < hs; i++) o[i] = 0;
    for (int u = 0; u <= t; u++) {
        const td_real *v = qkv + (int64_t)b * T * C3 + (int64_t)u * C3 + 2 * C + h * hs;
        const td_real au = a[u];
#pragma omp simd
        for (int i = 0; i < hs; i++) o[i] += au * v[i];
    }
}

static void attention_backward_head(td_real *dqkv, td_real *datt, const td_real *dout,
                                    const td_real *qkv, const td_real *att, int b, int h, int T,
                                    int C, int NH, td_real scale) {
    const int hs = C / NH;
    const int64_t C3 = 3 * (int64_t)C;
    td_real *base = dqkv + (int64_t)b * T * C3;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < 3; j++)
            memset(base + (int64_t)t * C3 + j * C + h * hs, 0, sizeof(td_real) * hs);
    for (int t = 0; t < T; t++) {
        const td_real *a = att + (((int64_t)b * NH + h) * T + t) * T;
        td_real *da = datt + (((int64_t)b * NH + h) * T + t) * T;
        const td_real *d = dout + (int64_t)b * T * C + (int64_t)t * C + h * hs;
        const td_real *q = qkv + (int64_t)b * T * C3 + (int64_t)t * C3 + h * hs;
        td_real *dq = base + (int64_t)t * C3 + h * hs;
        /* through o = sum_u a[u] v[u] */
        for (int u = 0; u <= t; u++) {
            const td_real *v = qkv + (int64_t)b * T * C3 + (int64_t)u * C3 + 2 * C + h * hs;
            td_real *dv = base + (int64_t)u * C3 + 2 * C + h * hs;
            td_real s = 0;
            const td_real au = a[u];
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < hs; i++) {
                s += v[i] * d[i];
                dv[i] += au * d[i];
            }
            da[u] = s;
        }
        softmax_row_backward(a, da, t, scale); /* da[u] is now dpre[u] */
        for (int u = 0; u <= t; u++) {
            const td_real dpre = da[u];
            const td_real *k = qkv + (int64_t)b * T * C3 + (int64_t)u * C3 + C + h * hs;
            td_real *dk = base + (int64_t)u * C3 + C + h * hs;
#pragma omp simd
            for (int i = 0; i < hs; i++) {
                dq[i] += k[i] * dpre;
                dk[i] += q[i] * dpre;
            }
        }
    }
}

/* ---- the GEMM path: one (b, h) per iteration, its q, k, v (and dout) packed contiguous, the
 * products through td_gemm (single-threaded inside the parallel loop: td_gemm does not fork
 * when called from an active parallel region). Rows go in blocks of ATT_ROWS: block [r0, r1)
 * needs only the scores of columns [0, r1), so the products skip most of the masked triangle
 * (T = 128: 3/4 of the full T x T work). 64 keeps each block's products above td_gemm's own
 * small-problem cutoff for head sizes >= 16 (32-row blocks fall below it at head size 32 and
 * measured slower there; at head size 64 the two tie). */
#define ATT_ROWS 64

/* Below this many multiply-adds of q k^T per head (T^2 hs) the per-row loops are used: at
 * T = 32, head size 16 (smoke's tiny model) the packing and the small GEMMs cost more than
 * they save. */
#define ATT_GEMM_MIN_WORK (64 * 64 * 32)

static int attention_use_gemm(int T, int hs) {
    return (int64_t)T * T * hs >= ATT_GEMM_MIN_WORK;
}

/* Per thread, grown on demand and kept (OpenMP keeps its pool threads), so a steady-state step
 * allocates nothing; NULL when out of memory, and the caller takes the loops instead. */
static _Thread_local td_real *att_scratch;
static _Thread_local size_t att_scratch_cap;

static td_real *attention_scratch(size_t n) {
    if (n > att_scratch_cap) {
        free(att_scratch);
        att_scratch = malloc(sizeof(td_real) * n);
        att_scratch_cap = att_scratch ? n : 0;
    }
    return att_scratch;
}

/* dst[T, hs] <- the hs columns at src (rows ld apart) */
static void gather_head(td_real *dst, const td_real *src, int T, int hs, int64_t ld) {
    for (int t = 0; t < T; t++) memcpy(dst + (int64_t)t * hs, src + t * ld, sizeof(td_real) * hs);
}

static void scatter_head(td_real *dst, const td_real *src, int T, int hs, int64_t ld) {
    for (int t = 0; t < T; t++) memcpy(dst + t * ld, src + (int64_t)t * hs, sizeof(td_real) * hs);
}

int td_attention_head_gemm_ok(int T, int hs) { return attention_use_gemm(T, hs); }

void td_softmax_row(td_real *a, int t, int n, td_real scale) { softmax_row_forward(a, t, n, scale); }

int td_attention_head_forward_gemm(td_real *out, int64_t ldo, td_real *att, const td_real *q,
                                   int64_t ldq, const td_real *k, const td_real *v, int64_t ldk,
                                   int T, int hs, td_real scale) {
    const int64_t Ths = (int64_t)T * hs;
    const int R = ATT_ROWS < T ? ATT_ROWS : T;
    td_real *w = attention_scratch((size_t)(4 * Ths + (int64_t)R * T));
    if (!w) return 0;
    td_real *Q = w, *K = Q + Ths, *V = K + Ths, *O = V + Ths, *S = O + Ths;
    gather_head(Q, q, T, hs, ldq);
    gather_head(K, k, T, hs, ldk);
    gather_head(V, v, T, hs, ldk);
    for (int r0 = 0; r0 < T; r0 += R) {
        const int r1 = r0 + R < T ? r0 + R : T, m = r1 - r0;
        /* S[m, r1] = Q[r0:r1] K[0:r1]^T: the scores this block's rows can see */
        td_gemm(S, Q + (int64_t)r0 * hs, K, m, r1, hs, 0, 1, 0);
        for (int i = 0; i < m; i++) {
            td_real *s = S + (int64_t)i * r1;
            softmax_row_forward(s, r0 + i, r1, scale);
            td_real *a = att + (int64_t)(r0 + i) * T;
            memcpy(a, s, sizeof(td_real) * r1);
            for (int u = r1; u < T; u++) a[u] = 0;
        }
        /* O[r0:r1] = P[m, r1] V[0:r1] */
        td_gemm(O + (int64_t)r0 * hs, S, V, m, hs, r1, 0, 0, 0);
    }
    scatter_head(out, O, T, hs, ldo);
    return 1;
}

int td_attention_group_backward_gemm(td_real *dq, td_real *dk, td_real *dv, td_real *datt,
                                     const td_real *dout, int64_t ldo, const td_real *q,
                                     int64_t ldq, const td_real *k, const td_real *v, int64_t ldk,
                                     const td_real *att, int group, int T, int hs,
                                     td_real scale) {
    const int64_t Ths = (int64_t)T * hs, TT = (int64_t)T * T;
    const int R = ATT_ROWS < T ? ATT_ROWS : T;
    td_real *w = attention_scratch((size_t)(7 * Ths + 2 * (int64_t)R * T));
    if (!w) return 0;
    td_real *Q = w, *K = Q + Ths, *V = K + Ths, *dO = V + Ths, *dQ = dO + Ths, *dK = dQ + Ths,
            *dV = dK + Ths, *P = dV + Ths, *dP = P + (int64_t)R * T;
    gather_head(K, k, T, hs, ldk);
    gather_head(V, v, T, hs, ldk);
    memset(dK, 0, sizeof(td_real) * Ths);
    memset(dV, 0, sizeof(td_real) * Ths);
    for (int j = 0; j < group; j++) { /* the group's query heads in order: dK, dV add in it */
        gather_head(Q, q + (int64_t)j * hs, T, hs, ldq);
        gather_head(dO, dout + (int64_t)j * hs, T, hs, ldo);
        const td_real *A = att + j * TT;
        td_real *dA = datt + j * TT;
        for (int r0 = 0; r0 < T; r0 += R) {
            const int r1 = r0 + R < T ? r0 + R : T, m = r1 - r0;
            for (int i = 0; i < m; i++)
                memcpy(P + (int64_t)i * r1, A + (int64_t)(r0 + i) * T, sizeof(td_real) * r1);
            /* dV[0:r1] += P^T dO[r0:r1]; dP[m, r1] = dO[r0:r1] V[0:r1]^T */
            td_gemm(dV, P, dO + (int64_t)r0 * hs, r1, hs, m, 1, 0, 1);
            td_gemm(dP, dO + (int64_t)r0 * hs, V, m, r1, hs, 0, 1, 0);
            for (int i = 0; i < m; i++) {
                td_real *dp = dP + (int64_t)i * r1;
                softmax_row_backward(P + (int64_t)i * r1, dp, r0 + i, scale);
                for (int u = r0 + i + 1; u < r1; u++) dp[u] = 0; /* masked: no gradient */
                memcpy(dA + (int64_t)(r0 + i) * T, dp, sizeof(td_real) * r1);
            }
            /* dQ[r0:r1] = dS K[0:r1]; dK[0:r1] += dS^T Q[r0:r1] */
            td_gemm(dQ + (int64_t)r0 * hs, dP, K, m, hs, r1, 0, 0, 0);
            td_gemm(dK, dP, Q + (int64_t)r0 * hs, r1, hs, m, 1, 0, 1);
        }
        scatter_head(dq + (int64_t)j * hs, dQ, T, hs, ldq);
    }
    scatter_head(dk, dK, T, hs, ldk);
    scatter_head(dv, dV, T, hs, ldk);
    return 1;
}

/* GPT-2's heads: q, k, v of head h at columns h hs, C + h hs, 2C + h hs of qkv's rows */
static int attention_forward_head_gemm(td_real *out, td_real *att, const td_real *qkv, int b,
                                       int h, int T, int C, int NH, td_real scale) {
    const int hs = C / NH;
    const int64_t C3 = 3 * (int64_t)C;
    const td_real *src = qkv + (int64_t)b * T * C3 + h * hs;
    return td_attention_head_forward_gemm(out + (int64_t)b * T * C + h * hs, C,
                                          att + ((int64_t)b * NH + h) * T * T, src, C3, src + C,
                                          src + 2 * C, C3, T, hs, scale);
}

static int attention_backward_head_gemm(td_real *dqkv, td_real *datt, const td_real *dout,
                                        const td_real *qkv, const td_real *att, int b, int h,
                                        int T, int C, int NH, td_real scale) {
    const int hs = C / NH;
    const int64_t C3 = 3 * (int64_t)C, at = ((int64_t)b * NH + h) * T * T;
    const td_real *src = qkv + (int64_t)b * T * C3 + h * hs;
    td_real *dst = dqkv + (int64_t)b * T * C3 + h * hs;
    return td_attention_group_backward_gemm(dst, dst + C, dst + 2 * C, datt + at,
                                            dout + (int64_t)b * T * C + h * hs, C, src, C3,
                                            src + C, src + 2 * C, C3, att + at, 1, T, hs, scale);
}

void td_attention_forward(td_real *out, td_real *att, const td_real *qkv, int B, int T, int C,
                          int NH) {
    const int hs = C / NH;
    const td_real scale = (td_real)(1.0 / sqrt((double)hs));
    if (attention_use_gemm(T, hs)) {
#pragma omp parallel for collapse(2) schedule(static) PAR_IF((int64_t)B * NH * T * T * hs / 2)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++)
                if (!attention_forward_head_gemm(out, att, qkv, b, h, T, C, NH, scale))
                    for (int t = 0; t < T; t++)
                        attention_forward_row(out, att, qkv, b, t, h, T, C, NH, scale);
        return;
    }
#pragma omp parallel for collapse(3) schedule(static) PAR_IF((int64_t)B * NH * T * T * hs / 2)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < NH; h++)
                attention_forward_row(out, att, qkv, b, t, h, T, C, NH, scale);
}

void td_attention_backward(td_real *dqkv, td_real *datt, const td_real *dout, const td_real *qkv,
                           const td_real *att, int B, int T, int C, int NH) {
    const int hs = C / NH;
    const td_real scale = (td_real)(1.0 / sqrt((double)hs));
    const int gemm = attention_use_gemm(T, hs);
    /* One (b, h) per iteration: it owns its columns of dq, dk, dv, so no two threads write the
     * same element and the order of the adds over t is fixed. */
#pragma omp parallel for collapse(2) schedule(static) PAR_IF((int64_t)B * NH * T * T * hs)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            if (!gemm || !attention_backward_head_gemm(dqkv, datt, dout, qkv, att, b, h, T, C, NH,
                                                      scale))
                attention_backward_head(dqkv, datt, dout, qkv, att, b, h, T, C, NH, scale);
    apply_fault("attention_backward", dqkv, (int64_t)B * T * 3 * (int64_t)C);
}

/* ---- GELU, residual -------------------------------------------------------------------------- */

#define GELU_SCALE 0.7978845608028654 /* sqrt(2 / pi) */

#ifdef TD_FLOAT64
#define td_tanh tanh
#define td_exp exp
#else
#define td_tanh tanhf
#define td_exp expf
#endif

#ifndef TD_FLOAT64
/* GELU through E = e^{2u} (u = sqrt(2/pi)(x + 0.044715 x^3)), d = 1 / (E + 1):
 *   1 + tanh(u) = 2 E d,   1 - tanh(u)^2 = 4 E d^2,
 * which never subtracts nearly equal numbers (tanh near -1 would lose every digit of
 * 1 - tanh^2). u is clamped to [-40, 15]: beyond, the float results no longer change and E
 * stays a normal number. */
#define GELU_U(x) ((float)GELU_SCALE * ((x) + 0.044715f * (x) * (x) * (x)))
#define GELU_CLAMP(u) ((u) < -40.0f ? -40.0f : ((u) > 15.0f ? 15.0f : (u)))

TD_CLONES static void gelu_forward_chunk(float *out, const float *inp, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float x = inp[i], u = GELU_U(x);
        float E = fast_expf(2.0f * GELU_CLAMP(u)), d = 1.0f / (E + 1.0f);
        out[i] = x * E * d; /* 0.5 x (1 + tanh u) */
    }
}

TD_CLONES static void gelu_backward_chunk(float *dinp, const float *inp, const float *dout,
                                          int64_t n) {
    const float s = (float)GELU_SCALE, c3 = 3.0f * 0.044715f;
    for (int64_t i = 0; i < n; i++) {
        float x = inp[i], u = GELU_U(x);
        float E = fast_expf(2.0f * GELU_CLAMP(u)), d = 1.0f / (E + 1.0f);
        /* 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u' */
        float g = E * d + 2.0f * x * E * d * d * s * (1.0f + c3 * x * x);
        dinp[i] = g * dout[i];
    }
}
#endif

/* Element-wise passes run in chunks of this many elements, one chunk per task. */
#define EW_CHUNK 16384

void td_gelu_forward(td_real *out, const td_real *inp, int64_t n) {
#ifdef TD_FLOAT64
    const td_real s = (td_real)GELU_SCALE, c = (td_real)0.044715, half = (td_real)0.5;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        td_real x = inp[i];
        out[i] = half * x * (1 + td_tanh(s * (x + c * x * x * x)));
    }
#else
#pragma omp parallel for schedule(static) if (n > EW_CHUNK)
    for (int64_t lo = 0; lo < n; lo += EW_CHUNK)
        gelu_forward_chunk(out + lo, inp + lo, n - lo < EW_CHUNK ? n - lo : EW_CHUNK);
#endif
}

void td_gelu_backward(td_real *dinp, const td_real *inp, const td_real *dout, int64_t n) {
#ifdef TD_FLOAT64
    const td_real s = (td_real)GELU_SCALE, c = (td_real)0.044715, half = (td_real)0.5;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        td_real x = inp[i];
        td_real th = td_tanh(s * (x + c * x * x * x));
        td_real sech2 = 1 - th * th;
        td_real g = half * (1 + th) + half * x * sech2 * s * (1 + 3 * c * x * x);
        dinp[i] = g * dout[i];
    }
#else
#pragma omp parallel for schedule(static) if (n > EW_CHUNK)
    for (int64_t lo = 0; lo < n; lo += EW_CHUNK)
        gelu_backward_chunk(dinp + lo, inp + lo, dout + lo, n - lo < EW_CHUNK ? n - lo : EW_CHUNK);
#endif
    apply_fault("gelu_backward", dinp, n);
}

void td_residual_forward(td_real *out, const td_real *a, const td_real *b, int64_t n) {
#pragma omp parallel for schedule(static) PAR_IF(n)
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* ---- softmax + cross-entropy ----------------------------------------------------------------- */

void td_softmax_crossentropy_forward(td_real *probs_NV, td_real *losses, const int32_t *targets,
                                     int N, int V) {
#pragma omp parallel for schedule(static) PAR_IF((int64_t)N * V)
    for (int i = 0; i < N; i++) {
        td_real *p = probs_NV + (int64_t)i * V;
        td_real maxv = softmax_row_max(p, V);
        td_real target_logit = p[targets[i]];
        td_real sum = softmax_row_exp(p, V, maxv);
        td_real inv = 1 / sum;
#pragma omp simd
        for (int v = 0; v < V; v++) p[v] *= inv;
        /* -log softmax as log-sum-exp minus the logit: no log of a rounded probability */
        losses[i] = (td_real)(log((double)sum) + (double)maxv - (double)target_logit);
    }
}

void td_softmax_crossentropy_backward(td_real *dlogits, const td_real *probs,
                                      const int32_t *targets, double dloss, int N, int V) {
#pragma omp parallel for schedule(static) PAR_IF((int64_t)N * V)
    for (int i = 0; i < N; i++) {
        const td_real *p = probs + (int64_t)i * V;
        td_real *d = dlogits + (int64_t)i * V;
        int y = targets[i];
        for (int v = 0; v < V; v++) d[v] = (td_real)((p[v] - (v == y ? 1.0 : 0.0)) * dloss);
    }
}
