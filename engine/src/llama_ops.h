/* llama_ops.h — the Llama family's own ops on the CPU, forward and backward: the token lookup,
 * RMSNorm, rotary position embeddings (half-split convention), SwiGLU and causal grouped-query
 * attention.
 *
 * Readable reference kernels in the manner of kernels.h: plain loops, OpenMP over independent
 * rows, a fixed reduction order, outputs first, then inputs, then sizes. Activation gradients are
 * overwritten unless a flag says accumulate; weight gradients ACCUMULATE (+=). The maths is
 * docs/model.md's "Llama family". Shapes: N rows, C channels, B, T, NH query heads, NKV
 * key/value heads, HS head size, n elements.
 */
#ifndef TD_LLAMA_OPS_H
#define TD_LLAMA_OPS_H

#include <stdint.h>

#include "internal.h"

/* out(N, C) = table[tokens[i]]: the token embedding, a lookup (positions enter through RoPE). */
void td_embedding_forward(td_real *out, const int32_t *tokens, const td_real *table, int N,
                          int C);
/* dtable[tokens[i]] += dout[i]; serial over rows so repeated tokens add in row order. */
void td_embedding_backward(td_real *dtable, const td_real *dout, const int32_t *tokens, int N,
                           int C);

/* out(N, C) = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps); rstd (N) kept for the
 * backward. */
void td_rmsnorm_forward(td_real *out, td_real *rstd, const td_real *inp, const td_real *w, int N,
                        int C, double eps);
/* dinp (+)= d/dx; accumulate_dinp selects += (residual stream) or =. */
void td_rmsnorm_backward_input(td_real *dinp, const td_real *dout, const td_real *inp,
                               const td_real *w, const td_real *rstd, int N, int C,
                               int accumulate_dinp);
/* dw(C) += sum over rows of dout * x * rstd. */
void td_rmsnorm_backward_weight(td_real *dw, const td_real *dout, const td_real *inp,
                                const td_real *rstd, int N, int C);

/* Rotary embedding of x (B, T, NH, HS) at positions 0..T-1, HS even: channel i < HS/2 pairs with
 * i + HS/2 and the pair turns by t * theta^(-2i/HS). out may equal inp (in place). */
void td_rope_forward(td_real *out, const td_real *inp, int B, int T, int NH, int HS,
                     double theta);
/* dinp = the inverse rotation of dout (overwrite; dinp may equal dout). */
void td_rope_backward(td_real *dinp, const td_real *dout, int B, int T, int NH, int HS,
                      double theta);

/* out = silu(gate) * up elementwise over n, silu(g) = g * sigmoid(g). */
void td_swiglu_forward(td_real *out, const td_real *gate, const td_real *up, int64_t n);
/* dgate, dup (overwrite) from dout. */
void td_swiglu_backward(td_real *dgate, td_real *dup, const td_real *dout, const td_real *gate,
                        const td_real *up, int64_t n);

/* Causal GQA: q (B, T, NH, HS), k and v (B, T, NKV, HS) -> out (B, T, NH, HS); query head h
 * reads kv head h / (NH / NKV). att (B, NH, T, T) probabilities (upper triangle zero). */
void td_gqa_attention_forward(td_real *out, td_real *att, const td_real *q, const td_real *k,
                              const td_real *v, int B, int T, int NH, int NKV, int HS);
/* dq, dk, dv overwritten; datt (B, NH, T, T) scratch. */
void td_gqa_attention_backward(td_real *dq, td_real *dk, td_real *dv, td_real *datt,
                               const td_real *dout, const td_real *q, const td_real *k,
                               const td_real *v, const td_real *att, int B, int T, int NH,
                               int NKV, int HS);

#endif /* TD_LLAMA_OPS_H */
