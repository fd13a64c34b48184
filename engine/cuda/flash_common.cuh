/* flash_common.cuh — causal attention without the (T, T) matrix in memory, bf16 mode: the
 * design, and what its forward (flash_fwd.cu) and backward (flash_bwd.cu) kernels share: tile
 * loads, warp reductions, the mma.sync fragment helpers. Private to those two files.
 *
 * Inputs are the permuted heads q, k, v (B*NH, T, HS) (attention.cu's qkv_permute); outputs O
 * (B*NH, T, HS) bf16 and the log-sum-exp of every row (fp32, natural log); the backward takes
 * dO and D = rowsum(dO * O) (td_k_attn_rowdot) and writes dq, dk, dv. Deterministic (no atomics).
 *
 * Two implementations:
 *  - fa2:: (below the first one), FlashAttention-2 on mma.sync m16n8k16 with register-resident
 *    online softmax, cp.async double buffering and causal tile skipping: what td_k_flash_* run
 *    for head sizes 16..64 (td_flash_fa2; every GPT-2 size has 64), and backend.cu's default
 *    attention in bf16 mode for those sizes. H100, B*NH = 192, T = 1024, HS = 64 (GPT-2 124M,
 *    one layer): forward 0.137 ms (188 TFLOP/s), backward 0.399 ms, against 1.004 / 1.855 ms for
 *    v1 (flash_bench.cu; docs/cuda.md).
 *  - v1, the first version on WMMA 16x16x16 fragments, its softmax walking rows through shared
 *    memory (measured slower than the materialised cuBLASLt attention on an H100, docs/cuda.md):
 *    kept for head sizes 80..128 and as the reference the benchmark (flash_bench.cu) compares
 *    against (td_k_flash_forward_v1 / td_k_flash_backward_v1, flash.cuh).
 * Head sizes: multiples of 16 up to 128 (td_flash_supported); fp32 mode uses the materialised
 * attention of backend.cu, so that fp32 stays exact to the CPU engine's tolerances.
 *
 * v1: one block of 4 warps per (head, 64 queries); each warp owns 16 query rows, walks the key
 * tiles up to the diagonal with an online softmax (fp32 statistics) and keeps its output rows in
 * shared memory. Backward: one kernel per (head, 64 keys) accumulates dK and dV over the query
 * tiles at or below the diagonal; another per (head, 64 queries) accumulates dQ over the key
 * tiles; both recompute the probabilities from the stored log-sum-exp.
 */
#ifndef TD_CUDA_FLASH_COMMON_CUH
#define TD_CUDA_FLASH_COMMON_CUH

#include <mma.h>

#include "flash.cuh"

using namespace nvcuda;

#define FA_BR 64 /* query rows per block */
#define FA_BC 64 /* keys per tile */
#define FA_NW 4  /* warps per block, 16 rows each */

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> frag_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> frag_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_c;

__device__ __forceinline__ float fa_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float fa_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* rows [r0, r0 + 64) of a (T, HS) head into shared memory (row stride LDH), zeros past T;
 * 16-byte copies (HS is a multiple of 16, so every row is). */
template <int HS>
__device__ __forceinline__ void load_tile(bf16 *s, const bf16 *g, int r0, int T) {
    constexpr int LDH = HS + 8, V8 = HS / 8;
    for (int i = threadIdx.x; i < 64 * V8; i += blockDim.x) {
        const int r = i / V8, c = (i % V8) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r0 + r < T) val = *(const uint4 *)(g + (long long)(r0 + r) * HS + c);
        *(uint4 *)(s + r * LDH + c) = val;
    }
}

/* ==== FlashAttention-2 on mma.sync (the path td_k_flash_* take for head sizes up to 64) ========
 *
 * Tensor-core tiles: mma.sync.aligned.m16n8k16 bf16 x bf16 -> fp32 through inline PTX; operands
 * come from shared memory by ldmatrix (.trans for the operand whose reduction index runs down the
 * rows: V in P V, dO / Q in the dV / dK products, K in dS K). Shared rows are padded by 8 elements
 * (16 bytes), so the 8 row addresses of an ldmatrix phase fall in 8 different bank groups.
 * Blocks of 4 warps, 64 rows (or 8 warps, 128 rows: td_flash_set_warps, TANDEM_CUDA_FLASH_WARPS;
 * more warps share each streamed tile, a warp skips the tiles wholly past its own diagonal, and
 * every row's arithmetic is unchanged); each warp owns 16 rows (one m16 tile) across the head size.
 * Key / query tiles of 64 stream through shared memory by cp.async, two stages (the next tile is
 * in flight while the current one is multiplied). Causal: only tiles at or below the diagonal are
 * visited, and only the diagonal tile (and the tile crossing T) is masked.
 * Register fragment layouts (PTX ISA, m16n8k16): with g = lane / 4 and t = lane % 4, an
 * accumulator holds rows g and g + 8, columns 2t and 2t + 1 of its 16 x 8 tile; the A operand of
 * the next product is the accumulator of two neighbouring 8-column tiles, packed to bf16 pairs
 * (the FA2 register reuse: P and dS never touch shared memory).
 * Forward: per block 64 queries; online softmax in fp32 registers (max and sum per row, the 4
 * threads of a quad combined by shuffles), exp2 with the scale folded in; writes O and the
 * natural-log log-sum-exp per row. Backward (deterministic, no atomics): fa2_bwd_kv per 64 keys
 * walks the query tiles at and after the diagonal (S^T = K Q^T, dP^T = V dO^T, P^T, dS^T in
 * registers, dV += P^T dO, dK += dS^T Q); fa2_bwd_q per 64 queries walks the key tiles up to the
 * diagonal (S, dP again, dQ += dS K). The recomputation of S and dP in the second kernel costs
 * 2 of the 7 products (FA2 with fp32 atomics on dQ needs 5) and keeps reruns bit-identical.
 */
namespace fa2 {

constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
/* 16 bytes global -> shared, zero-filled when !ok (src must still be a valid address) */
__device__ __forceinline__ void cp16(void *dst, const void *src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp4(void *dst, const void *src, bool ok) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(ok ? 4 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm4t(uint32_t (&r)[4], const bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
/* c += a b, a 16x16 (row), b 16x8 (col), fp32 accumulators */
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); /* .x (lo) in the low half */
    return *reinterpret_cast<uint32_t *>(&v);
}

/* rows [r0, r0 + ROWS) of a head (T rows of HS, ld elements apart in global memory) into shared
 * memory (row stride HS + 8), zeros past T, by the NT threads of the block */
template <int HS, int ROWS = 64, int NT = 128>
__device__ __forceinline__ void tile_async(bf16 *s, const bf16 *g, int r0, int T, int ld) {
    constexpr int LD = HS + 8, V8 = HS / 8, N = ROWS * V8;
#pragma unroll
    for (int it = 0; it < (N + NT - 1) / NT; it++) {
        const int i = threadIdx.x + it * NT;
        if (N % NT == 0 || i < N) {
            const int r = i / V8, c = (i % V8) * 8;
            const bool ok = r0 + r < T;
            cp16(s + r * LD + c, g + (long long)(ok ? r0 + r : 0) * ld + c, ok);
        }
    }
}

/* A operand (16 rows x HS) of one warp from shared rows [row0, row0 + 16) */
template <int HS>
__device__ __forceinline__ void load_a(uint32_t (&f)[HS / 16][4], const bf16 *s, int lane) {
    constexpr int LD = HS + 8;
#pragma unroll
    for (int kc = 0; kc < HS / 16; kc++) ldsm4(f[kc], s + (lane & 15) * LD + kc * 16 + (lane >> 4) * 8);
}

/* acc[j] (16 x 8, j < 8: 64 columns) += A (16 x HS, registers) * B^T where B is 64 shared rows of
 * HS (K, Q, dO or V as stored, row-major): the products Q K^T, dO V^T, K Q^T, V dO^T */
template <int HS>
__device__ __forceinline__ void mma_abt(float (&acc)[8][4], const uint32_t (&a)[HS / 16][4],
                                        const bf16 *sb, int lane) {
    constexpr int LD = HS + 8;
#pragma unroll
    for (int kc = 0; kc < HS / 16; kc++) {
#pragma unroll
        for (int np = 0; np < 4; np++) {
            uint32_t b[4];
            ldsm4(b, sb + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kc * 16 + ((lane >> 3) & 1) * 8);
            mma(acc[2 * np], a[kc], b[0], b[1]);
            mma(acc[2 * np + 1], a[kc], b[2], b[3]);
        }
    }
}

/* out[d] (16 x HS as HS/8 tiles) += P (16 x 64, accumulator layout in p) * B where B is 64 shared
 * rows of HS (V, dO, Q or K as stored): the products P V, P^T dO, dS^T Q, dS K */
template <int HS>
__device__ __forceinline__ void mma_pb(float (&out)[HS / 8][4], const float (&p)[8][4],
                                       const bf16 *sb, int lane) {
    constexpr int LD = HS + 8;
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        const uint32_t a[4] = {pack(p[2 * kk][0], p[2 * kk][1]), pack(p[2 * kk][2], p[2 * kk][3]),
                               pack(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               pack(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < HS / 16; dp++) {
            uint32_t b[4];
            ldsm4t(b, sb + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
            mma(out[2 * dp], a, b[0], b[1]);
            mma(out[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

/* rows r (g) and r + 8 of a warp's 16 x HS accumulator to bf16 global rows (those < T), ld
 * elements apart */
template <int HS>
__device__ __forceinline__ void store_rows(bf16 *dst, const float (&acc)[HS / 8][4], int row0, int T,
                                           int t, float s0, float s1, int ld) {
#pragma unroll
    for (int d = 0; d < HS / 8; d++) {
        if (row0 < T)
            *reinterpret_cast<uint32_t *>(dst + (long long)row0 * ld + d * 8 + 2 * t) =
                pack(acc[d][0] * s0, acc[d][1] * s0);
        if (row0 + 8 < T)
            *reinterpret_cast<uint32_t *>(dst + (long long)(row0 + 8) * ld + d * 8 + 2 * t) =
                pack(acc[d][2] * s1, acc[d][3] * s1);
    }
}

/* Where head bh = b * NH + h starts in a tensor whose rows (b, t) are ld elements apart and whose
 * heads sit HS elements apart in a row: (B, T, NH * HS) slices such as q, k, v inside the
 * (B, T, 3C) qkv rows (ld = 3C) or the (B, T, C) attention output (ld = C). NH = 1, ld = HS is
 * the permuted (B * NH, T, HS) layout. */
__device__ __forceinline__ long long head_off(int bh, int NH, int T, int ld, int HS) {
    return (long long)(bh / NH) * T * ld + (long long)(bh % NH) * HS;
}

/* The same for the key / value head that query head bh reads under grouped-query attention:
 * groups of `group` consecutive query heads share one kv head, kv head (bh % NH) / group of batch
 * row bh / NH, its rows ld elements apart (group = 1: head_off). */
__device__ __forceinline__ long long kv_head_off(int bh, int NH, int group, int T, int ld, int HS) {
    return (long long)(bh / NH) * T * ld + (long long)((bh % NH) / group) * HS;
}

} /* namespace fa2 */

#endif /* TD_CUDA_FLASH_COMMON_CUH */
