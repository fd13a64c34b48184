/* kernels.h — the maths of every op, forward and backward, on the CPU.
 *
 * These are the readable reference kernels: plain loops, OpenMP over independent rows, fixed
 * reduction order (so results are bit-identical for a given thread count). A fast kernel that
 * replaces one keeps its name and signature: outputs first, then inputs, then sizes. Backward
 * kernels ACCUMULATE (+=) into parameter gradients and overwrite activation gradients unless
 * their comment says otherwise. Shapes use B, T, C, V, NH, and M/N/K for GEMM.
 */
#ifndef TD_KERNELS_H
#define TD_KERNELS_H

#include <stdint.h>

#include "gemm.h" /* the layer below: td_gemm, td_gemm_reference */
#include "internal.h"

/* out(B,T,C) = wte[tokens] + wpe[t] */
void td_encoder_forward(td_real *out, const int32_t *tokens, const td_real *wte,
                        const td_real *wpe, int B, int T, int C);
/* dwte[tokens] += dout; dwpe[t] += dout. Serial over rows so repeated tokens add in order. */
void td_encoder_backward(td_real *dwte, td_real *dwpe, const td_real *dout, const int32_t *tokens,
                         int B, int T, int C);

/* out = (x - mean) * rstd * w + b over C; mean and rstd (B*T) kept for the backward. */
void td_layernorm_forward(td_real *out, td_real *mean, td_real *rstd, const td_real *inp,
                          const td_real *w, const td_real *b, int N, int C);
/* dinp (+)= d/dx; accumulate_dinp selects += (residual stream) or =. */
void td_layernorm_backward_input(td_real *dinp, const td_real *dout, const td_real *inp,
                                 const td_real *w, const td_real *mean, const td_real *rstd,
                                 int N, int C, int accumulate_dinp);
/* dw += sum over rows of dout * xhat; db += sum of dout. */
void td_layernorm_backward_weight(td_real *dw, td_real *db, const td_real *dout,
                                  const td_real *inp, const td_real *mean, const td_real *rstd,
                                  int N, int C);

/* out(N, OC) = inp(N, IC) @ w(IC, OC) + bias(OC) (bias may be NULL) */
void td_linear_forward(td_real *out, const td_real *inp, const td_real *w, const td_real *bias,
                       int N, int IC, int OC);
/* dinp(N, IC) = dout @ w^T (overwrite, or add when accumulate) */
void td_linear_backward_input(td_real *dinp, const td_real *dout, const td_real *w, int N,
                              int IC, int OC, int accumulate);
/* dw(IC, OC) += inp^T @ dout; dbias(OC) += column sums of dout (dbias may be NULL) */
void td_linear_backward_weight(td_real *dw, td_real *dbias, const td_real *dout,
                               const td_real *inp, int N, int IC, int OC);

/* Causal multi-head attention. qkv (B, T, 3C) -> out (B, T, C); att (B, NH, T, T) probabilities
 * (upper triangle left zero). */
void td_attention_forward(td_real *out, td_real *att, const td_real *qkv, int B, int T, int C,
                          int NH);
/* dqkv (overwritten), datt scratch (B, NH, T, T). */
void td_attention_backward(td_real *dqkv, td_real *datt, const td_real *dout, const td_real *qkv,
                           const td_real *att, int B, int T, int C, int NH);

/* The per-head GEMM path of the attention above, for any layout (the Llama family's grouped
 * heads use it too). td_attention_head_gemm_ok: whether (T, head size hs) takes it (below, the
 * per-row loops are faster). Rows of q (and dq), of k, v (and dk, dv), of out / dout are ldq,
 * ldk, ldo apart; att / datt a head's (T, T) probabilities. td_attention_head_forward_gemm: one
 * head. td_attention_group_backward_gemm: `group` query heads sharing one k, v (query head j at
 * column j·hs of q, dq, dout, its probabilities at att + j·T·T), dk and dv overwritten with the
 * sum over the group in order, dq overwritten. Single-threaded (call from inside a parallel loop
 * over heads); both return 0, having written nothing, when their scratch cannot be allocated.
 * td_softmax_row: one row of scores to probabilities, as both paths round it. */
int td_attention_head_gemm_ok(int T, int hs);
int td_attention_head_forward_gemm(td_real *out, int64_t ldo, td_real *att, const td_real *q,
                                   int64_t ldq, const td_real *k, const td_real *v, int64_t ldk,
                                   int T, int hs, td_real scale);
int td_attention_group_backward_gemm(td_real *dq, td_real *dk, td_real *dv, td_real *datt,
                                     const td_real *dout, int64_t ldo, const td_real *q,
                                     int64_t ldq, const td_real *k, const td_real *v, int64_t ldk,
                                     const td_real *att, int group, int T, int hs,
                                     td_real scale);
void td_softmax_row(td_real *a, int t, int n, td_real scale);

/* tanh-approximation GELU, elementwise over n */
void td_gelu_forward(td_real *out, const td_real *inp, int64_t n);
/* dinp = gelu'(inp) * dout (overwrite) */
void td_gelu_backward(td_real *dinp, const td_real *inp, const td_real *dout, int64_t n);

/* out = a + b elementwise */
void td_residual_forward(td_real *out, const td_real *a, const td_real *b, int64_t n);

/* In place: logits (N, V) become softmax probabilities; losses[i] = -log p[targets[i]]. */
void td_softmax_crossentropy_forward(td_real *probs_NV, td_real *losses, const int32_t *targets,
                                     int N, int V);
/* dlogits (N, V) = (probs - onehot(targets)) * dloss, dloss the same for every row. */
void td_softmax_crossentropy_backward(td_real *dlogits, const td_real *probs,
                                      const int32_t *targets, double dloss, int N, int V);

/* 1 when TANDEM_FAULT is unset or names a kernel that honours it; *value gets the variable. */
int td_fault_name_valid(const char **value);

#endif /* TD_KERNELS_H */
