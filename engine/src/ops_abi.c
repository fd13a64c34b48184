/* ops_abi.c — the td_op_* entry points: each engine kernel exposed on caller buffers so that
 * op-level parity tests reach exactly the code the model runs. Thin wrappers: argument checks
 * here, maths in kernels.c / gemm.c / llama_ops.c. The GPT-2 ops exist in fp32 builds only
 * (td_real is float there); the Llama ops run in either build on td_op_real buffers.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kernels.h"
#include "llama_ops.h"

#ifdef TD_FLOAT64
#define FP32_ONLY() return td_fail_global(TD_ERR_STATE, "%s: op entry points exist in the fp32 library only", __func__)
#else
#define FP32_ONLY() (void)0
#endif

#define CHECK_PTRS(cond)                                                                         \
    if (!(cond)) return td_fail_global(TD_ERR_ARG, "%s: a required buffer is NULL", __func__)
#define CHECK_DIMS(cond)                                                                         \
    if (!(cond)) return td_fail_global(TD_ERR_ARG, "%s: sizes must be positive", __func__)

static td_status check_tokens(const char *fn, const int32_t *ids, int64_t n, int64_t limit) {
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= limit)
            return td_fail_global(TD_ERR_RANGE, "%s: id %d at %lld is outside [0, %lld)", fn, ids[i], (long long)i, (long long)limit);
    return TD_OK;
}

td_status td_op_gemm(float *C, const float *A, const float *B, int32_t M, int32_t N, int32_t K,
                     int32_t transA, int32_t transB, int32_t accumulate) {
    FP32_ONLY();
    CHECK_PTRS(C && A && B);
    CHECK_DIMS(M > 0 && N > 0 && K > 0);
#ifndef TD_FLOAT64
    td_gemm(C, A, B, M, N, K, transA != 0, transB != 0, accumulate != 0);
#endif
    return TD_OK;
}

td_status td_op_encoder_forward(float *out, const int32_t *tokens, const float *wte,
                                const float *wpe, int32_t B, int32_t T, int32_t C, int32_t V) {
    FP32_ONLY();
    CHECK_PTRS(out && tokens && wte && wpe);
    CHECK_DIMS(B > 0 && T > 0 && C > 0 && V > 0);
    td_status st = check_tokens(__func__, tokens, (int64_t)B * T, V);
    if (st) return st;
#ifndef TD_FLOAT64
    td_encoder_forward(out, tokens, wte, wpe, B, T, C);
#endif
    return TD_OK;
}

td_status td_op_encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *tokens,
                                 int32_t B, int32_t T, int32_t C, int32_t V) {
    FP32_ONLY();
    CHECK_PTRS(dwte && dwpe && dout && tokens);
    CHECK_DIMS(B > 0 && T > 0 && C > 0 && V > 0);
    td_status st = check_tokens(__func__, tokens, (int64_t)B * T, V);
    if (st) return st;
#ifndef TD_FLOAT64
    td_encoder_backward(dwte, dwpe, dout, tokens, B, T, C);
#endif
    return TD_OK;
}

td_status td_op_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                                  const float *w, const float *b, int32_t N, int32_t C) {
    FP32_ONLY();
    CHECK_PTRS(out && mean && rstd && inp && w && b);
    CHECK_DIMS(N > 0 && C > 0);
#ifndef TD_FLOAT64
    td_layernorm_forward(out, mean, rstd, inp, w, b, N, C);
#endif
    return TD_OK;
}

td_status td_op_layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                                   const float *inp, const float *w, const float *mean,
                                   const float *rstd, int32_t N, int32_t C) {
    FP32_ONLY();
    CHECK_PTRS(dinp && dw && db && dout && inp && w && mean && rstd);
    CHECK_DIMS(N > 0 && C > 0);
#ifndef TD_FLOAT64
    td_layernorm_backward_input(dinp, dout, inp, w, mean, rstd, N, C, 0);
    td_layernorm_backward_weight(dw, db, dout, inp, mean, rstd, N, C);
#endif
    return TD_OK;
}

td_status td_op_matmul_forward(float *out, const float *inp, const float *w, const float *bias,
                               int32_t N, int32_t IC, int32_t OC) {
    FP32_ONLY();
    CHECK_PTRS(out && inp && w);
    CHECK_DIMS(N > 0 && IC > 0 && OC > 0);
#ifndef TD_FLOAT64
    td_linear_forward(out, inp, w, bias, N, IC, OC);
#endif
    return TD_OK;
}

td_status td_op_matmul_backward(float *dinp, float *dw, float *dbias, const float *dout,
                                const float *inp, const float *w, int32_t N, int32_t IC,
                                int32_t OC) {
    FP32_ONLY();
    CHECK_PTRS(dinp && dw && dout && inp && w);
    CHECK_DIMS(N > 0 && IC > 0 && OC > 0);
#ifndef TD_FLOAT64
    td_linear_backward_input(dinp, dout, w, N, IC, OC, 0);
    td_linear_backward_weight(dw, dbias, dout, inp, N, IC, OC);
#endif
    return TD_OK;
}

td_status td_op_attention_forward(float *out, float *att, const float *qkv, int32_t B, int32_t T,
                                  int32_t C, int32_t NH) {
    FP32_ONLY();
    CHECK_PTRS(out && att && qkv);
    CHECK_DIMS(B > 0 && T > 0 && C > 0 && NH > 0);
    if (C % NH) return td_fail_global(TD_ERR_ARG, "%s: C=%d is not divisible by NH=%d", __func__, C, NH);
#ifndef TD_FLOAT64
    td_attention_forward(out, att, qkv, B, T, C, NH);
#endif
    return TD_OK;
}

td_status td_op_attention_backward(float *dqkv, const float *dout, const float *qkv,
                                   const float *att, int32_t B, int32_t T, int32_t C, int32_t NH) {
    FP32_ONLY();
    CHECK_PTRS(dqkv && dout && qkv && att);
    CHECK_DIMS(B > 0 && T > 0 && C > 0 && NH > 0);
    if (C % NH) return td_fail_global(TD_ERR_ARG, "%s: C=%d is not divisible by NH=%d", __func__, C, NH);
#ifndef TD_FLOAT64
    float *datt = malloc(sizeof(float) * (size_t)B * NH * T * T);
    if (!datt) return td_fail_global(TD_ERR_NOMEM, "%s: out of memory", __func__);
    td_attention_backward(dqkv, datt, dout, qkv, att, B, T, C, NH);
    free(datt);
#endif
    return TD_OK;
}

td_status td_op_gelu_forward(float *out, const float *inp, int64_t n) {
    FP32_ONLY();
    CHECK_PTRS(out && inp);
    CHECK_DIMS(n > 0);
#ifndef TD_FLOAT64
    td_gelu_forward(out, inp, n);
#endif
    return TD_OK;
}

td_status td_op_gelu_backward(float *dinp, const float *inp, const float *dout, int64_t n) {
    FP32_ONLY();
    CHECK_PTRS(dinp && inp && dout);
    CHECK_DIMS(n > 0);
#ifndef TD_FLOAT64
    td_gelu_backward(dinp, inp, dout, n);
#endif
    return TD_OK;
}

td_status td_op_softmax_crossentropy_forward(float *probs, float *losses, const float *logits,
                                             const int32_t *targets, int32_t N, int32_t V) {
    FP32_ONLY();
    CHECK_PTRS(probs && losses && logits && targets);
    CHECK_DIMS(N > 0 && V > 0);
    td_status st = check_tokens(__func__, targets, N, V);
    if (st) return st;
#ifndef TD_FLOAT64
    memcpy(probs, logits, sizeof(float) * (size_t)N * V);
    td_softmax_crossentropy_forward(probs, losses, targets, N, V);
#endif
    return TD_OK;
}

td_status td_op_softmax_crossentropy_backward(float *dlogits, const float *probs,
                                              const int32_t *targets, double dloss, int32_t N,
                                              int32_t V) {
    FP32_ONLY();
    CHECK_PTRS(dlogits && probs && targets);
    CHECK_DIMS(N > 0 && V > 0);
    td_status st = check_tokens(__func__, targets, N, V);
    if (st) return st;
#ifndef TD_FLOAT64
    td_softmax_crossentropy_backward(dlogits, probs, targets, dloss, N, V);
#endif
    return TD_OK;
}

/* ---- Llama family: buffers of td_op_real (= td_real: float, or double in the TD_FLOAT64 build) */

td_status td_op_rmsnorm_forward(td_op_real *out, td_op_real *rstd, const td_op_real *inp,
                                const td_op_real *w, int32_t N, int32_t C, double eps) {
    CHECK_PTRS(out && rstd && inp && w);
    CHECK_DIMS(N > 0 && C > 0);
    if (!(eps > 0) || !isfinite(eps)) return td_fail_global(TD_ERR_ARG, "%s: eps=%g must be a finite number > 0", __func__, eps);
    td_rmsnorm_forward(out, rstd, inp, w, N, C, eps);
    return TD_OK;
}

td_status td_op_rmsnorm_backward(td_op_real *dinp, td_op_real *dw, const td_op_real *dout,
                                 const td_op_real *inp, const td_op_real *w,
                                 const td_op_real *rstd, int32_t N, int32_t C) {
    CHECK_PTRS(dinp && dw && dout && inp && w && rstd);
    CHECK_DIMS(N > 0 && C > 0);
    td_rmsnorm_backward_input(dinp, dout, inp, w, rstd, N, C, 0);
    td_rmsnorm_backward_weight(dw, dout, inp, rstd, N, C);
    return TD_OK;
}

static td_status check_rope(const char *fn, int32_t HS, double theta) {
    if (HS % 2) return td_fail_global(TD_ERR_ARG, "%s: head size HS=%d must be even (RoPE rotates pairs i, i + HS/2)", fn, HS);
    if (!(theta > 0) || !isfinite(theta)) return td_fail_global(TD_ERR_ARG, "%s: theta=%g must be a finite number > 0", fn, theta);
    return TD_OK;
}

td_status td_op_rope_forward(td_op_real *out, const td_op_real *inp, int32_t B, int32_t T,
                             int32_t NH, int32_t HS, double theta) {
    CHECK_PTRS(out && inp);
    CHECK_DIMS(B > 0 && T > 0 && NH > 0 && HS > 0);
    td_status st = check_rope(__func__, HS, theta);
    if (st) return st;
    td_rope_forward(out, inp, B, T, NH, HS, theta);
    return TD_OK;
}

td_status td_op_rope_backward(td_op_real *dinp, const td_op_real *dout, int32_t B, int32_t T,
                              int32_t NH, int32_t HS, double theta) {
    CHECK_PTRS(dinp && dout);
    CHECK_DIMS(B > 0 && T > 0 && NH > 0 && HS > 0);
    td_status st = check_rope(__func__, HS, theta);
    if (st) return st;
    td_rope_backward(dinp, dout, B, T, NH, HS, theta);
    return TD_OK;
}

td_status td_op_swiglu_forward(td_op_real *out, const td_op_real *gate, const td_op_real *up,
                               int64_t n) {
    CHECK_PTRS(out && gate && up);
    CHECK_DIMS(n > 0);
    td_swiglu_forward(out, gate, up, n);
    return TD_OK;
}

td_status td_op_swiglu_backward(td_op_real *dgate, td_op_real *dup, const td_op_real *dout,
                                const td_op_real *gate, const td_op_real *up, int64_t n) {
    CHECK_PTRS(dgate && dup && dout && gate && up);
    CHECK_DIMS(n > 0);
    td_swiglu_backward(dgate, dup, dout, gate, up, n);
    return TD_OK;
}

static td_status check_gqa(const char *fn, int32_t NH, int32_t NKV) {
    if (NH % NKV) return td_fail_global(TD_ERR_ARG, "%s: n_kv_head NKV=%d does not divide n_head NH=%d", fn, NKV, NH);
    return TD_OK;
}

td_status td_op_gqa_attention_forward(td_op_real *out, td_op_real *att, const td_op_real *q,
                                      const td_op_real *k, const td_op_real *v, int32_t B,
                                      int32_t T, int32_t NH, int32_t NKV, int32_t HS) {
    CHECK_PTRS(out && att && q && k && v);
    CHECK_DIMS(B > 0 && T > 0 && NH > 0 && NKV > 0 && HS > 0);
    td_status st = check_gqa(__func__, NH, NKV);
    if (st) return st;
    td_gqa_attention_forward(out, att, q, k, v, B, T, NH, NKV, HS);
    return TD_OK;
}

td_status td_op_gqa_attention_backward(td_op_real *dq, td_op_real *dk, td_op_real *dv,
                                       const td_op_real *dout, const td_op_real *q,
                                       const td_op_real *k, const td_op_real *v,
                                       const td_op_real *att, int32_t B, int32_t T, int32_t NH,
                                       int32_t NKV, int32_t HS) {
    CHECK_PTRS(dq && dk && dv && dout && q && k && v && att);
    CHECK_DIMS(B > 0 && T > 0 && NH > 0 && NKV > 0 && HS > 0);
    td_status st = check_gqa(__func__, NH, NKV);
    if (st) return st;
    td_real *datt = malloc(sizeof(td_real) * (size_t)B * NH * T * T);
    if (!datt) return td_fail_global(TD_ERR_NOMEM, "%s: out of memory", __func__);
    td_gqa_attention_backward(dq, dk, dv, datt, dout, q, k, v, att, B, T, NH, NKV, HS);
    free(datt);
    return TD_OK;
}
