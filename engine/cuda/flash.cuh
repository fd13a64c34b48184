/* flash.cuh — which head sizes the FlashAttention-2 kernels (flash_fwd.cu, flash_bwd.cu) take,
 * and the first (WMMA) flash attention, kept for head sizes 80..128 and as the baseline of
 * flash_bench.cu (same arguments as td_k_flash_forward / _backward, common.cuh). */
#ifndef TD_CUDA_FLASH_CUH
#define TD_CUDA_FLASH_CUH

#include "common.cuh"

/* 1 when td_k_flash_* run the FlashAttention-2 kernels for this head size (16, 32, 48, 64): the
 * bf16 default of backend.cu; other sizes td_flash_supported takes run the first kernels */
int td_flash_fa2(int HS);

/* Warps per block of the three FlashAttention-2 kernels, 4 or 8 each (16 rows a warp: blocks of
 * 64 or 128 queries for the forward and dQ kernels, 64 or 128 keys for the dK / dV kernel). The
 * choice changes only how many warps share a block's shared-memory tiles, never a row's
 * arithmetic: every setting gives bit-identical results (flash_bench.cu checks it). Default: 4
 * warps each (the measured kernels of docs/cuda.md); flash_bench.cu times every setting, and
 * TANDEM_CUDA_FLASH_WARPS=F,KV,Q overrides them for the models built after it is set. */
typedef struct {
    int fwd, kv, q;
} td_flash_warps;
td_flash_warps td_flash_default_warps(void);
td_flash_warps td_flash_get_warps(void);
/* cudaErrorInvalidValue (and nothing changed) unless every count is 4 or 8 */
cudaError_t td_flash_set_warps(td_flash_warps w);

cudaError_t td_k_flash_forward_v1(cudaStream_t s, bf16 *O, float *lse, const bf16 *q, const bf16 *k,
                                  const bf16 *v, int BH, int T, int HS, float scale);
cudaError_t td_k_flash_backward_v1(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *q,
                                   const bf16 *k, const bf16 *v, const bf16 *dO, const float *lse,
                                   const float *D, int BH, int T, int HS, float scale);

#endif /* TD_CUDA_FLASH_CUH */
