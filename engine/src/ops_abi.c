/* ops_abi.c — the td_op_* entry points: each engine kernel exposed on caller buffers so that
 * op-level parity tests reach exactly the code the model runs. Thin wrappers: argument checks
 * here, maths in kernels.c / gemm.c. fp32 builds only (td_real is float there).
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kernels.h"

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
