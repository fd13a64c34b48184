/* llama.cuh — the Llama family (family = 1) on the CUDA backend: its device buffers, the offsets
 * of its parameters, and the launchers of its own ops (llama_ops.cu). Shared by llama_build.cu
 * (allocation), llama_passes.cu (forward / backward) and backend.cu (release).
 *
 * Layouts (E = the compute type, f32 marked). A layer's q, k, v live in one row per token,
 * qkv (B, T, QW) with QW = C + 2 KV (KV = NKV * HS): q at column 0 (NH heads of HS), k at C,
 * v at C + KV (NKV heads each): the layout of one product with q_proj, k_proj, v_proj stacked
 * (they are consecutive in the parameter table), which the flash kernels read in place (rows QW
 * apart). gate and up likewise share gu (B, T, 2F): gate at column 0, up at F. The maths and
 * the order are engine/src/llama_model.c's; docs/model.md's "Llama family" has the formulas.
 */
#ifndef TD_CUDA_LLAMA_CUH
#define TD_CUDA_LLAMA_CUH

#include "common.cuh"

/* Activations of one Llama layer for one slot, sized for (batch_size, seq_len). */
typedef struct td_cuda_llama_layer {
    void *ln1;               /* (B, T, C) input RMSNorm output */
    float *ln1_rstd;         /* (B, T) f32 */
    void *qkv;               /* (B, T, QW) q and k after RoPE, v */
    void *att;               /* (B, NH, T, T) probabilities when kept (store), else NULL */
    float *lse;              /* (B, NH, T) flash attention's log-sum-exp */
    void *atty;              /* (B, T, C) attention output before o_proj */
    void *res2;              /* (B, T, C) residual after attention */
    void *ln2;               /* (B, T, C) post-attention RMSNorm output */
    float *ln2_rstd;         /* (B, T) f32 */
    void *gu;                /* (B, T, 2F) gate | up projections */
    void *h;                 /* (B, T, F) silu(gate) * up */
    void *res3;              /* (B, T, C) layer output */
} td_cuda_llama_layer;

/* What a split backward's B pass keeps for its W pass: each projection's output gradient. */
typedef struct td_cuda_llama_wgrad {
    void *down;              /* (B, T, C) d res3 = d(down_proj output) */
    void *gu;                /* (B, T, 2F) d(gate | up outputs) */
    void *o;                 /* (B, T, C) d res2 = d(o_proj output) */
    void *qkv;               /* (B, T, QW) d(q | k | v projection outputs), RoPE undone */
} td_cuda_llama_wgrad;

/* Offsets (elements) of one layer's tensors in the flat parameter buffer, found by name. */
typedef struct td_cuda_llama_off {
    size_t attn_norm, wq, wk, wv, wo, mlp_norm, wgate, wup, wdown;
    int fused_qkv;           /* wq, wk, wv consecutive: one (QW, C) weight, one product */
    int fused_gu;            /* wgate, wup consecutive: one (2F, C) weight */
} td_cuda_llama_off;

/* ---- launchers (llama_ops.cu); E = float or bf16; N rows ------------------------------------ */

/* out(N, C) = wte[tok[i]] */
template <typename E>
cudaError_t td_k_embed_forward(cudaStream_t s, E *out, const int *tok, const E *wte, int N, int C);
/* dwte[tok] += the rows of dout per token, summed in row order (csr buckets of passes.cu) */
template <typename E>
cudaError_t td_k_embed_backward(cudaStream_t s, float *dwte, const E *dout, const int *csr,
                                int n_uniq, int N, int C);
/* out = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) (fp32) kept per row */
template <typename E>
cudaError_t td_k_rmsnorm_forward(cudaStream_t s, E *out, float *rstd, const E *inp, const E *w,
                                 int N, int C, float eps);
/* td_k_rmsnorm_backward_input and the one-pass td_k_rmsnorm_backward: common.cuh */
/* RoPE on the first nh heads of HS channels of rows ld elements apart (q and k inside qkv: the
 * NH + NKV heads from column 0), positions t = row % T, tables (T, HS/2); sign 1 forward, -1
 * backward (the inverse rotation), in place */
template <typename E>
cudaError_t td_k_rope(cudaStream_t s, E *x, int ld, const float *cos_t, const float *sin_t,
                      int N, int T, int nh, int HS, int sign);
/* h(N, F) = silu(gu[:, :F]) * gu[:, F:] */
template <typename E>
cudaError_t td_k_swiglu_forward(cudaStream_t s, E *h, const E *gu, int N, int F);
/* dgu(N, 2F) = (d gate, d up) from dh(N, F) and gu */
template <typename E>
cudaError_t td_k_swiglu_backward(cudaStream_t s, E *dgu, const E *dh, const E *gu, int N, int F);
/* qkv rows (B, T, QW) <-> q (B, NH, T, HS) | k (B, NKV, T, HS) | v (B, NKV, T, HS) packed one
 * after the other in qkvp (dir 0: rows -> heads; 1: heads -> rows) */
template <typename E>
cudaError_t td_k_gqa_permute(cudaStream_t s, E *qkvp, E *qkv, int B, int T, int NH, int NKV,
                             int HS, int dir);

#endif /* TD_CUDA_LLAMA_CUH */
