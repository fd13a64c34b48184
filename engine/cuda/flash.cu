/* flash.cu — causal attention without the (T, T) matrix in memory, bf16 mode.
 *
 * Inputs are the permuted heads q, k, v (B*NH, T, HS) (kernels.cu's qkv_permute); outputs O
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

template <int HS>
constexpr size_t fwd_smem_bytes() {
    return (size_t)3 * 64 * (HS + 8) * 2 + FA_NW * 16 * (FA_BC + 4) * 4 + FA_NW * 16 * (FA_BC + 8) * 2 +
           FA_NW * 16 * HS * 4 + 3 * 64 * 4;
}

template <int HS>
__global__ void __launch_bounds__(128) flash_forward_kernel(bf16 *O, float *lse, const bf16 *Q,
                                                            const bf16 *K, const bf16 *V, int T,
                                                            float scale) {
    constexpr int LDH = HS + 8, LDS = FA_BC + 4, LDP = FA_BC + 8;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sQ = (bf16 *)smem;
    bf16 *sK = sQ + 64 * LDH;
    bf16 *sV = sK + 64 * LDH;
    float *sS = (float *)(sV + 64 * LDH);
    bf16 *sP = (bf16 *)(sS + FA_NW * 16 * LDS);
    float *sO = (float *)(sP + FA_NW * 16 * LDP);
    float *sM = sO + FA_NW * 16 * HS, *sL = sM + 64, *sA = sL + 64;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int q0 = blockIdx.x * FA_BR;
    const long long head = (long long)blockIdx.y * T * HS;
    float *S_w = sS + warp * 16 * LDS, *O_w = sO + warp * 16 * HS;
    bf16 *P_w = sP + warp * 16 * LDP;

    load_tile<HS>(sQ, Q + head, q0, T);
    for (int i = lane; i < 16 * HS; i += 32) O_w[i] = 0.f;
    if (lane < 16) {
        sM[warp * 16 + lane] = -INFINITY;
        sL[warp * 16 + lane] = 0.f;
    }
    const int last = min(q0 + FA_BR, T) - 1; /* the last query row of the tile */
    const int nkt = last / FA_BC + 1;
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * FA_BC;
        __syncthreads(); /* everyone is done with the previous K, V tiles */
        load_tile<HS>(sK, K + head, k0, T);
        load_tile<HS>(sV, V + head, k0, T);
        __syncthreads();
        { /* S_w (16 x 64) = Q_w K^T */
            frag_c acc[FA_BC / 16];
#pragma unroll
            for (int n = 0; n < FA_BC / 16; n++) wmma::fill_fragment(acc[n], 0.f);
#pragma unroll
            for (int k = 0; k < HS; k += 16) {
                frag_a a;
                wmma::load_matrix_sync(a, sQ + warp * 16 * LDH + k, LDH);
#pragma unroll
                for (int n = 0; n < FA_BC / 16; n++) {
                    frag_b_col b;
                    wmma::load_matrix_sync(b, sK + n * 16 * LDH + k, LDH);
                    wmma::mma_sync(acc[n], a, b, acc[n]);
                }
            }
#pragma unroll
            for (int n = 0; n < FA_BC / 16; n++)
                wmma::store_matrix_sync(S_w + n * 16, acc[n], LDS, wmma::mem_row_major);
        }
        __syncwarp();
        for (int r = 0; r < 16; r++) { /* online softmax, one row at a time across the warp */
            const int qi = q0 + warp * 16 + r;
            const int c0 = lane, c1 = lane + 32;
            const float v0 = (k0 + c0 <= qi && k0 + c0 < T) ? S_w[r * LDS + c0] * scale : -INFINITY;
            const float v1 = (k0 + c1 <= qi && k0 + c1 < T) ? S_w[r * LDS + c1] * scale : -INFINITY;
            const float m_old = sM[warp * 16 + r];
            const float m_new = fmaxf(m_old, fa_warp_max(fmaxf(v0, v1)));
            const float p0 = v0 == -INFINITY ? 0.f : expf(v0 - m_new);
            const float p1 = v1 == -INFINITY ? 0.f : expf(v1 - m_new);
            const float sum = fa_warp_sum(p0 + p1);
            P_w[r * LDP + c0] = __float2bfloat16_rn(p0);
            P_w[r * LDP + c1] = __float2bfloat16_rn(p1);
            __syncwarp(); /* every lane has read sM[r] before lane 0 rewrites it (racecheck) */
            if (lane == 0) {
                const float alpha = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
                sM[warp * 16 + r] = m_new;
                sL[warp * 16 + r] = sL[warp * 16 + r] * alpha + sum;
                sA[warp * 16 + r] = alpha;
            }
        }
        __syncwarp();
        for (int i = lane; i < 16 * HS; i += 32) O_w[i] *= sA[warp * 16 + i / HS];
        __syncwarp();
#pragma unroll
        for (int n = 0; n < HS / 16; n++) { /* O_w += P_w V */
            frag_c o;
            wmma::load_matrix_sync(o, O_w + n * 16, HS, wmma::mem_row_major);
#pragma unroll
            for (int k = 0; k < FA_BC; k += 16) {
                frag_a a;
                frag_b_row b;
                wmma::load_matrix_sync(a, P_w + k, LDP);
                wmma::load_matrix_sync(b, sV + k * LDH + n * 16, LDH);
                wmma::mma_sync(o, a, b, o);
            }
            wmma::store_matrix_sync(O_w + n * 16, o, HS, wmma::mem_row_major);
        }
        __syncwarp();
    }
    for (int i = lane; i < 16 * HS; i += 32) {
        const int r = i / HS, c = i % HS, qi = q0 + warp * 16 + r;
        if (qi < T) O[head + (long long)qi * HS + c] = __float2bfloat16_rn(O_w[i] / sL[warp * 16 + r]);
    }
    if (lane < 16) {
        const int qi = q0 + warp * 16 + lane;
        if (qi < T) lse[(long long)blockIdx.y * T + qi] = sM[warp * 16 + lane] + logf(sL[warp * 16 + lane]);
    }
}

/* ---- backward ------------------------------------------------------------------------------- */

template <int HS>
constexpr size_t bwd_smem_bytes() {
    return (size_t)4 * 64 * (HS + 8) * 2 + 2 * FA_NW * 16 * (FA_BC + 4) * 4 +
           2 * FA_NW * 16 * (FA_BC + 8) * 2 + FA_NW * 16 * HS * 4 + 2 * 64 * 4;
}

/* dK, dV for 64 keys of one head: loop over the query tiles at or after the diagonal. */
template <int HS>
__global__ void __launch_bounds__(128) flash_backward_kv_kernel(bf16 *dK, bf16 *dV, const bf16 *Q,
                                                                const bf16 *K, const bf16 *V,
                                                                const bf16 *dO, const float *lse,
                                                                const float *Dsum, int T,
                                                                float scale) {
    constexpr int LDH = HS + 8, LDS = FA_BC + 4, LDP = FA_BC + 8;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sK = (bf16 *)smem;
    bf16 *sV = sK + 64 * LDH;
    bf16 *sQ = sV + 64 * LDH;
    bf16 *sdO = sQ + 64 * LDH;
    float *sS = (float *)(sdO + 64 * LDH);   /* P^T, fp32 */
    float *sS2 = sS + FA_NW * 16 * LDS;      /* dP^T, fp32 */
    bf16 *sP = (bf16 *)(sS2 + FA_NW * 16 * LDS);
    bf16 *sdS = sP + FA_NW * 16 * LDP;
    float *stage = (float *)(sdS + FA_NW * 16 * LDP);
    float *slse = stage + FA_NW * 16 * HS, *sD = slse + 64;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int k0 = blockIdx.x * FA_BC;
    const long long head = (long long)blockIdx.y * T * HS, hrow = (long long)blockIdx.y * T;
    float *S_w = sS + warp * 16 * LDS, *S2_w = sS2 + warp * 16 * LDS, *st_w = stage + warp * 16 * HS;
    bf16 *P_w = sP + warp * 16 * LDP, *dS_w = sdS + warp * 16 * LDP;

    load_tile<HS>(sK, K + head, k0, T);
    load_tile<HS>(sV, V + head, k0, T);
    frag_c dv[HS / 16], dk[HS / 16];
#pragma unroll
    for (int n = 0; n < HS / 16; n++) {
        wmma::fill_fragment(dv[n], 0.f);
        wmma::fill_fragment(dk[n], 0.f);
    }
    const int nqt = (T + FA_BR - 1) / FA_BR;
    for (int qt = k0 / FA_BR; qt < nqt; qt++) {
        const int q0 = qt * FA_BR;
        __syncthreads();
        load_tile<HS>(sQ, Q + head, q0, T);
        load_tile<HS>(sdO, dO + head, q0, T);
        for (int i = threadIdx.x; i < 64; i += blockDim.x) {
            slse[i] = q0 + i < T ? lse[hrow + q0 + i] : 0.f;
            sD[i] = q0 + i < T ? Dsum[hrow + q0 + i] : 0.f;
        }
        __syncthreads();
        { /* S^T_w (16 keys x 64 queries) = K_w Q^T ; dP^T_w = V_w dO^T */
            frag_c s[FA_BR / 16], dp[FA_BR / 16];
#pragma unroll
            for (int n = 0; n < FA_BR / 16; n++) {
                wmma::fill_fragment(s[n], 0.f);
                wmma::fill_fragment(dp[n], 0.f);
            }
#pragma unroll
            for (int k = 0; k < HS; k += 16) {
                frag_a ak, av;
                wmma::load_matrix_sync(ak, sK + warp * 16 * LDH + k, LDH);
                wmma::load_matrix_sync(av, sV + warp * 16 * LDH + k, LDH);
#pragma unroll
                for (int n = 0; n < FA_BR / 16; n++) {
                    frag_b_col bq, bo;
                    wmma::load_matrix_sync(bq, sQ + n * 16 * LDH + k, LDH);
                    wmma::load_matrix_sync(bo, sdO + n * 16 * LDH + k, LDH);
                    wmma::mma_sync(s[n], ak, bq, s[n]);
                    wmma::mma_sync(dp[n], av, bo, dp[n]);
                }
            }
#pragma unroll
            for (int n = 0; n < FA_BR / 16; n++) {
                wmma::store_matrix_sync(S_w + n * 16, s[n], LDS, wmma::mem_row_major);
                wmma::store_matrix_sync(S2_w + n * 16, dp[n], LDS, wmma::mem_row_major);
            }
        }
        __syncwarp();
        for (int i = lane; i < 16 * FA_BR; i += 32) {
            const int r = i / FA_BR, c = i % FA_BR;
            const int kj = k0 + warp * 16 + r, qi = q0 + c;
            const float p = (kj <= qi && qi < T && kj < T) ? expf(S_w[r * LDS + c] * scale - slse[c]) : 0.f;
            const float ds = p * (S2_w[r * LDS + c] - sD[c]) * scale;
            P_w[r * LDP + c] = __float2bfloat16_rn(p);
            dS_w[r * LDP + c] = __float2bfloat16_rn(ds);
        }
        __syncwarp();
#pragma unroll
        for (int n = 0; n < HS / 16; n++) { /* dV_w += P^T_w dO ; dK_w += dS^T_w Q */
#pragma unroll
            for (int k = 0; k < FA_BR; k += 16) {
                frag_a ap, ads;
                frag_b_row bo, bq;
                wmma::load_matrix_sync(ap, P_w + k, LDP);
                wmma::load_matrix_sync(ads, dS_w + k, LDP);
                wmma::load_matrix_sync(bo, sdO + k * LDH + n * 16, LDH);
                wmma::load_matrix_sync(bq, sQ + k * LDH + n * 16, LDH);
                wmma::mma_sync(dv[n], ap, bo, dv[n]);
                wmma::mma_sync(dk[n], ads, bq, dk[n]);
            }
        }
    }
    /* write dK, dV rows < T through a per-warp fp32 staging area */
    for (int which = 0; which < 2; which++) {
        __syncwarp();
#pragma unroll
        for (int n = 0; n < HS / 16; n++)
            wmma::store_matrix_sync(st_w + n * 16, which ? dk[n] : dv[n], HS, wmma::mem_row_major);
        __syncwarp();
        bf16 *dst = which ? dK : dV;
        for (int i = lane; i < 16 * HS; i += 32) {
            const int r = i / HS, c = i % HS, kj = k0 + warp * 16 + r;
            if (kj < T) dst[head + (long long)kj * HS + c] = __float2bfloat16_rn(st_w[i]);
        }
    }
}

/* dQ for 64 queries of one head: loop over the key tiles up to the diagonal. */
template <int HS>
__global__ void __launch_bounds__(128) flash_backward_q_kernel(bf16 *dQ, const bf16 *Q,
                                                               const bf16 *K, const bf16 *V,
                                                               const bf16 *dO, const float *lse,
                                                               const float *Dsum, int T,
                                                               float scale) {
    constexpr int LDH = HS + 8, LDS = FA_BC + 4, LDP = FA_BC + 8;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sQ = (bf16 *)smem;
    bf16 *sdO = sQ + 64 * LDH;
    bf16 *sK = sdO + 64 * LDH;
    bf16 *sV = sK + 64 * LDH;
    float *sS = (float *)(sV + 64 * LDH);
    float *sS2 = sS + FA_NW * 16 * LDS;
    bf16 *sP = (bf16 *)(sS2 + FA_NW * 16 * LDS); /* unused here: keeps the layout of the kv kernel */
    bf16 *sdS = sP + FA_NW * 16 * LDP;
    float *stage = (float *)(sdS + FA_NW * 16 * LDP);
    float *slse = stage + FA_NW * 16 * HS, *sD = slse + 64;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int q0 = blockIdx.x * FA_BR;
    const long long head = (long long)blockIdx.y * T * HS, hrow = (long long)blockIdx.y * T;
    float *S_w = sS + warp * 16 * LDS, *S2_w = sS2 + warp * 16 * LDS, *st_w = stage + warp * 16 * HS;
    bf16 *dS_w = sdS + warp * 16 * LDP;

    load_tile<HS>(sQ, Q + head, q0, T);
    load_tile<HS>(sdO, dO + head, q0, T);
    for (int i = threadIdx.x; i < 64; i += blockDim.x) {
        slse[i] = q0 + i < T ? lse[hrow + q0 + i] : 0.f;
        sD[i] = q0 + i < T ? Dsum[hrow + q0 + i] : 0.f;
    }
    frag_c dq[HS / 16];
#pragma unroll
    for (int n = 0; n < HS / 16; n++) wmma::fill_fragment(dq[n], 0.f);
    const int last = min(q0 + FA_BR, T) - 1;
    const int nkt = last / FA_BC + 1;
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * FA_BC;
        __syncthreads();
        load_tile<HS>(sK, K + head, k0, T);
        load_tile<HS>(sV, V + head, k0, T);
        __syncthreads();
        { /* S_w = Q_w K^T ; dP_w = dO_w V^T */
            frag_c s[FA_BC / 16], dp[FA_BC / 16];
#pragma unroll
            for (int n = 0; n < FA_BC / 16; n++) {
                wmma::fill_fragment(s[n], 0.f);
                wmma::fill_fragment(dp[n], 0.f);
            }
#pragma unroll
            for (int k = 0; k < HS; k += 16) {
                frag_a aq, ao;
                wmma::load_matrix_sync(aq, sQ + warp * 16 * LDH + k, LDH);
                wmma::load_matrix_sync(ao, sdO + warp * 16 * LDH + k, LDH);
#pragma unroll
                for (int n = 0; n < FA_BC / 16; n++) {
                    frag_b_col bk, bv;
                    wmma::load_matrix_sync(bk, sK + n * 16 * LDH + k, LDH);
                    wmma::load_matrix_sync(bv, sV + n * 16 * LDH + k, LDH);
                    wmma::mma_sync(s[n], aq, bk, s[n]);
                    wmma::mma_sync(dp[n], ao, bv, dp[n]);
                }
            }
#pragma unroll
            for (int n = 0; n < FA_BC / 16; n++) {
                wmma::store_matrix_sync(S_w + n * 16, s[n], LDS, wmma::mem_row_major);
                wmma::store_matrix_sync(S2_w + n * 16, dp[n], LDS, wmma::mem_row_major);
            }
        }
        __syncwarp();
        for (int i = lane; i < 16 * FA_BC; i += 32) {
            const int r = i / FA_BC, c = i % FA_BC;
            const int qi = q0 + warp * 16 + r, kj = k0 + c;
            const float p = (kj <= qi && kj < T && qi < T) ? expf(S_w[r * LDS + c] * scale - slse[warp * 16 + r]) : 0.f;
            dS_w[r * LDP + c] = __float2bfloat16_rn(p * (S2_w[r * LDS + c] - sD[warp * 16 + r]) * scale);
        }
        __syncwarp();
#pragma unroll
        for (int n = 0; n < HS / 16; n++) { /* dQ_w += dS_w K */
#pragma unroll
            for (int k = 0; k < FA_BC; k += 16) {
                frag_a a;
                frag_b_row b;
                wmma::load_matrix_sync(a, dS_w + k, LDP);
                wmma::load_matrix_sync(b, sK + k * LDH + n * 16, LDH);
                wmma::mma_sync(dq[n], a, b, dq[n]);
            }
        }
    }
    __syncwarp();
#pragma unroll
    for (int n = 0; n < HS / 16; n++) wmma::store_matrix_sync(st_w + n * 16, dq[n], HS, wmma::mem_row_major);
    __syncwarp();
    for (int i = lane; i < 16 * HS; i += 32) {
        const int r = i / HS, c = i % HS, qi = q0 + warp * 16 + r;
        if (qi < T) dQ[head + (long long)qi * HS + c] = __float2bfloat16_rn(st_w[i]);
    }
}


/* D[b, h, t] = sum over the head's columns of dout * out, both (B, T, C) */
__global__ void attn_rowdot_kernel(float *D, const bf16 *dout, const bf16 *out, int B, int T, int NH,
                                   int HS) {
    const long long w = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32; /* (b, t, h) */
    const int lane = threadIdx.x % 32;
    if (w >= (long long)B * T * NH) return;
    const int h = (int)(w % NH);
    const long long bt = w / NH;
    const int b = (int)(bt / T), t = (int)(bt % T);
    const long long base = bt * NH * HS + (long long)h * HS;
    float s = 0.f;
    for (int c = lane; c < HS; c += 32) s += __bfloat162float(dout[base + c]) * __bfloat162float(out[base + c]);
    s = fa_warp_sum(s);
    if (lane == 0) D[((long long)b * NH + h) * T + t] = s;
}

/* the same for head sizes up to 64 (multiples of 8): 8 lanes per (b, t, h), each one 16-byte load
 * of dout and out (lanes past the head add 0), combined by shuffles within the 8 */
__global__ void attn_rowdot8_kernel(float *D, const bf16 *dout, const bf16 *out, int B, int T, int NH,
                                    int HS) {
    const long long gi = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long w = gi / 8; /* (b, t, h) */
    const int j = (int)(gi % 8);
    const bool live = w < (long long)B * T * NH;
    float s = 0.f;
    long long bt = 0;
    int h = 0;
    if (live) {
        h = (int)(w % NH);
        bt = w / NH;
        if (j * 8 < HS) {
            const long long base = bt * NH * HS + (long long)h * HS + j * 8;
            const uint4 a = *reinterpret_cast<const uint4 *>(dout + base);
            const uint4 b = *reinterpret_cast<const uint4 *>(out + base);
            const __nv_bfloat162 *a2 = reinterpret_cast<const __nv_bfloat162 *>(&a);
            const __nv_bfloat162 *b2 = reinterpret_cast<const __nv_bfloat162 *>(&b);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float2 x = __bfloat1622float2(a2[i]), y = __bfloat1622float2(b2[i]);
                s = fmaf(x.x, y.x, s);
                s = fmaf(x.y, y.y, s);
            }
        }
    }
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    if (live && j == 0) {
        const int b = (int)(bt / T), t = (int)(bt % T);
        D[((long long)b * NH + h) * T + t] = s;
    }
}


/* ==== FlashAttention-2 on mma.sync (the path td_k_flash_* take for head sizes up to 64) ========
 *
 * Tensor-core tiles: mma.sync.aligned.m16n8k16 bf16 x bf16 -> fp32 through inline PTX; operands
 * come from shared memory by ldmatrix (.trans for the operand whose reduction index runs down the
 * rows: V in P V, dO / Q in the dV / dK products, K in dS K). Shared rows are padded by 8 elements
 * (16 bytes), so the 8 row addresses of an ldmatrix phase fall in 8 different bank groups.
 * Blocks of 4 warps, 64 rows; each warp owns 16 rows (one m16 tile) across the whole head size.
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

/* rows [r0, r0 + 64) of a head (T rows of HS, ld elements apart in global memory) into shared
 * memory (row stride HS + 8), zeros past T */
template <int HS>
__device__ __forceinline__ void tile_async(bf16 *s, const bf16 *g, int r0, int T, int ld) {
    constexpr int LD = HS + 8, V8 = HS / 8, N = 64 * V8;
#pragma unroll
    for (int it = 0; it < (N + 127) / 128; it++) {
        const int i = threadIdx.x + it * 128;
        if (N % 128 == 0 || i < N) {
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

template <int HS>
constexpr size_t fwd_smem() { return (size_t)5 * 64 * (HS + 8) * sizeof(bf16); }

template <int HS>
__global__ void __launch_bounds__(128) fwd_kernel(bf16 *O, float *lse, const bf16 *Q, const bf16 *K,
                                                  const bf16 *V, int T, int NH, int ldi, int ldo,
                                                  float scale, float scale_log2) {
    constexpr int LD = HS + 8, TILE = 64 * LD;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sQ = (bf16 *)smem, *sK = sQ + TILE, *sV = sK + 2 * TILE; /* sK, sV: two stages each */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int qt = (int)gridDim.x - 1 - (int)blockIdx.x; /* the longest rows first */
    const int q0 = qt * 64;
    const long long head = head_off((int)blockIdx.y, NH, T, ldi, HS);
    const bf16 *Kh = K + head, *Vh = V + head;
    bf16 *Oh = O + head_off((int)blockIdx.y, NH, T, ldo, HS);
    tile_async<HS>(sQ, Q + head, q0, T, ldi);
    tile_async<HS>(sK, Kh, 0, T, ldi);
    tile_async<HS>(sV, Vh, 0, T, ldi);
    cp_commit();

    uint32_t qf[HS / 16][4];
    float o[HS / 8][4];
#pragma unroll
    for (int d = 0; d < HS / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f; /* rows g, g + 8 (raw score units) */
    const int row0 = q0 + warp * 16 + g, row1 = row0 + 8;
    const int nkt = qt + 1; /* key tiles 0..qt; tile qt is the diagonal */
    for (int kt = 0; kt < nkt; kt++) {
        const int buf = kt & 1;
        if (kt + 1 < nkt) {
            tile_async<HS>(sK + (buf ^ 1) * TILE, Kh, (kt + 1) * 64, T, ldi);
            tile_async<HS>(sV + (buf ^ 1) * TILE, Vh, (kt + 1) * 64, T, ldi);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        if (kt == 0) load_a<HS>(qf, sQ + warp * 16 * LD, lane);
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        mma_abt<HS>(s, qf, sK + buf * TILE, lane);
        if (kt == nkt - 1) { /* diagonal: key > query -> -inf (keys >= T are > every query < T) */
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int key = kt * 64 + j * 8 + 2 * t;
                if (key > row0) s[j][0] = -INFINITY;
                if (key + 1 > row0) s[j][1] = -INFINITY;
                if (key > row1) s[j][2] = -INFINITY;
                if (key + 1 > row1) s[j][3] = -INFINITY;
            }
        }
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        /* a row always has key 0 unmasked, so mx is finite; guard anyway */
        const float ms0 = mx0 == -INFINITY ? 0.f : mx0 * scale_log2;
        const float ms1 = mx1 == -INFINITY ? 0.f : mx1 * scale_log2;
        const float a0 = exp2f(m0 * scale_log2 - ms0), a1 = exp2f(m1 * scale_log2 - ms1); /* 0 at first */
        m0 = mx0;
        m1 = mx1;
        float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            s[j][0] = exp2f(fmaf(s[j][0], scale_log2, -ms0));
            s[j][1] = exp2f(fmaf(s[j][1], scale_log2, -ms0));
            s[j][2] = exp2f(fmaf(s[j][2], scale_log2, -ms1));
            s[j][3] = exp2f(fmaf(s[j][3], scale_log2, -ms1));
            rs0 += s[j][0] + s[j][1];
            rs1 += s[j][2] + s[j][3];
        }
        l0 = l0 * a0 + rs0; /* per-thread partial sums; the quad is combined at the end */
        l1 = l1 * a1 + rs1;
#pragma unroll
        for (int d = 0; d < HS / 8; d++) {
            o[d][0] *= a0;
            o[d][1] *= a0;
            o[d][2] *= a1;
            o[d][3] *= a1;
        }
        mma_pb<HS>(o, s, sV + buf * TILE, lane);
        __syncthreads(); /* every warp is done with this stage before it is refilled */
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    store_rows<HS>(Oh, o, row0, T, t, 1.f / l0, 1.f / l1, ldo);
    if (t == 0) {
        const long long hr = (long long)blockIdx.y * T;
        if (row0 < T) lse[hr + row0] = m0 * scale + logf(l0);
        if (row1 < T) lse[hr + row1] = m1 * scale + logf(l1);
    }
}

template <int HS>
constexpr size_t bwd_kv_smem() { return (size_t)6 * 64 * (HS + 8) * sizeof(bf16) + 4 * 64 * sizeof(float); }

/* dK, dV of 64 keys: query tiles from the diagonal to the end */
template <int HS>
__global__ void __launch_bounds__(128) bwd_kv_kernel(bf16 *dK, bf16 *dV, const bf16 *Q, const bf16 *K,
                                                     const bf16 *V, const bf16 *dO, const float *lse,
                                                     const float *Dsum, int T, int NH, int ldi,
                                                     int ldo, int ldg, float scale, float scale_log2) {
    constexpr int LD = HS + 8, TILE = 64 * LD;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sK = (bf16 *)smem, *sV = sK + TILE, *sQ = sV + TILE, *sdO = sQ + 2 * TILE;
    float *sL = (float *)(sdO + 2 * TILE), *sD = sL + 2 * 64; /* two stages of 64 each */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int kt = blockIdx.x, k0 = kt * 64; /* the longest columns (smallest keys) first */
    const long long head = head_off((int)blockIdx.y, NH, T, ldi, HS), hr = (long long)blockIdx.y * T;
    const bf16 *Qh = Q + head, *dOh = dO + head_off((int)blockIdx.y, NH, T, ldo, HS);
    const int nqt = (T + 63) / 64;
    auto load_q = [&](int qt, int buf) {
        tile_async<HS>(sQ + buf * TILE, Qh, qt * 64, T, ldi);
        tile_async<HS>(sdO + buf * TILE, dOh, qt * 64, T, ldo);
        const int i = threadIdx.x & 63, q = qt * 64 + i;
        const bool ok = q < T;
        if (threadIdx.x < 64) cp4(sL + buf * 64 + i, lse + hr + (ok ? q : 0), ok);
        else cp4(sD + buf * 64 + i, Dsum + hr + (ok ? q : 0), ok);
    };
    tile_async<HS>(sK, K + head, k0, T, ldi);
    tile_async<HS>(sV, V + head, k0, T, ldi);
    load_q(kt, 0);
    cp_commit();

    uint32_t kf[HS / 16][4], vf[HS / 16][4];
    float dk[HS / 8][4], dv[HS / 8][4];
#pragma unroll
    for (int d = 0; d < HS / 8; d++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[d][e] = dv[d][e] = 0.f;
    const int key0 = k0 + warp * 16 + g, key1 = key0 + 8;
    for (int qt = kt; qt < nqt; qt++) {
        const int buf = (qt - kt) & 1;
        if (qt + 1 < nqt) {
            load_q(qt + 1, buf ^ 1);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        if (qt == kt) {
            load_a<HS>(kf, sK + warp * 16 * LD, lane);
            load_a<HS>(vf, sV + warp * 16 * LD, lane);
        }
        const bf16 *q_s = sQ + buf * TILE, *do_s = sdO + buf * TILE;
        const float *L = sL + buf * 64, *Dv = sD + buf * 64;
        float s[8][4], dp[8][4]; /* S^T, dP^T: rows = keys, columns = queries */
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.f;
        mma_abt<HS>(s, kf, q_s, lane);
        mma_abt<HS>(dp, vf, do_s, lane);
        const bool mask = qt == kt || qt * 64 + 64 > T;
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int qc = j * 8 + 2 * t + c, q = qt * 64 + qc;
                const float lq = L[qc] * LOG2E, dq = Dv[qc];
                float p0 = exp2f(fmaf(s[j][c], scale_log2, -lq));     /* key0 */
                float p1 = exp2f(fmaf(s[j][c + 2], scale_log2, -lq)); /* key1 */
                if (mask) {
                    if (key0 > q || q >= T) p0 = 0.f;
                    if (key1 > q || q >= T) p1 = 0.f;
                }
                s[j][c] = p0;
                s[j][c + 2] = p1;
                dp[j][c] = p0 * (dp[j][c] - dq) * scale;
                dp[j][c + 2] = p1 * (dp[j][c + 2] - dq) * scale;
            }
        }
        mma_pb<HS>(dv, s, do_s, lane);  /* dV += P^T dO */
        mma_pb<HS>(dk, dp, q_s, lane);  /* dK += dS^T Q */
        __syncthreads();
    }
    const long long gh = head_off((int)blockIdx.y, NH, T, ldg, HS);
    store_rows<HS>(dK + gh, dk, key0, T, t, 1.f, 1.f, ldg);
    store_rows<HS>(dV + gh, dv, key0, T, t, 1.f, 1.f, ldg);
}

template <int HS>
constexpr size_t bwd_q_smem() { return (size_t)6 * 64 * (HS + 8) * sizeof(bf16); }

/* dQ of 64 queries: key tiles up to the diagonal */
template <int HS>
__global__ void __launch_bounds__(128) bwd_q_kernel(bf16 *dQ, const bf16 *Q, const bf16 *K,
                                                    const bf16 *V, const bf16 *dO, const float *lse,
                                                    const float *Dsum, int T, int NH, int ldi,
                                                    int ldo, int ldg, float scale, float scale_log2) {
    constexpr int LD = HS + 8, TILE = 64 * LD;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sQ = (bf16 *)smem, *sdO = sQ + TILE, *sK = sdO + TILE, *sV = sK + 2 * TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int qt = (int)gridDim.x - 1 - (int)blockIdx.x;
    const int q0 = qt * 64;
    const long long head = head_off((int)blockIdx.y, NH, T, ldi, HS), hr = (long long)blockIdx.y * T;
    const bf16 *Kh = K + head, *Vh = V + head;
    tile_async<HS>(sQ, Q + head, q0, T, ldi);
    tile_async<HS>(sdO, dO + head_off((int)blockIdx.y, NH, T, ldo, HS), q0, T, ldo);
    tile_async<HS>(sK, Kh, 0, T, ldi);
    tile_async<HS>(sV, Vh, 0, T, ldi);
    cp_commit();
    const int row0 = q0 + warp * 16 + g, row1 = row0 + 8;
    const float L0 = row0 < T ? lse[hr + row0] * LOG2E : 0.f, L1 = row1 < T ? lse[hr + row1] * LOG2E : 0.f;
    const float D0 = row0 < T ? Dsum[hr + row0] : 0.f, D1 = row1 < T ? Dsum[hr + row1] : 0.f;

    uint32_t qf[HS / 16][4], of[HS / 16][4];
    float dq[HS / 8][4];
#pragma unroll
    for (int d = 0; d < HS / 8; d++) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;
    const int nkt = qt + 1;
    for (int kt = 0; kt < nkt; kt++) {
        const int buf = kt & 1;
        if (kt + 1 < nkt) {
            tile_async<HS>(sK + (buf ^ 1) * TILE, Kh, (kt + 1) * 64, T, ldi);
            tile_async<HS>(sV + (buf ^ 1) * TILE, Vh, (kt + 1) * 64, T, ldi);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        if (kt == 0) {
            load_a<HS>(qf, sQ + warp * 16 * LD, lane);
            load_a<HS>(of, sdO + warp * 16 * LD, lane);
        }
        const bf16 *k_s = sK + buf * TILE, *v_s = sV + buf * TILE;
        float s[8][4], dp[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.f;
        mma_abt<HS>(s, qf, k_s, lane);
        mma_abt<HS>(dp, of, v_s, lane);
        const bool mask = kt == nkt - 1;
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int c = 0; c < 2; c++) {
                const int key = kt * 64 + j * 8 + 2 * t + c;
                float p0 = exp2f(fmaf(s[j][c], scale_log2, -L0));
                float p1 = exp2f(fmaf(s[j][c + 2], scale_log2, -L1));
                if (mask) {
                    if (key > row0) p0 = 0.f;
                    if (key > row1) p1 = 0.f;
                }
                dp[j][c] = p0 * (dp[j][c] - D0) * scale;
                dp[j][c + 2] = p1 * (dp[j][c + 2] - D1) * scale;
            }
        }
        mma_pb<HS>(dq, dp, k_s, lane); /* dQ += dS K */
        __syncthreads();
    }
    store_rows<HS>(dQ + head_off((int)blockIdx.y, NH, T, ldg, HS), dq, row0, T, t, 1.f, 1.f, ldg);
}

} /* namespace fa2 */

/* ---- launchers ---------------------------------------------------------------------------- */

int td_flash_supported(int HS) { return HS % 16 == 0 && HS >= 16 && HS <= 128; }
int td_flash_fa2(int HS) { return HS == 16 || HS == 32 || HS == 48 || HS == 64; }

template <int HS>
static cudaError_t fwd_v1(cudaStream_t s, bf16 *O, float *lse, const bf16 *q, const bf16 *k,
                          const bf16 *v, int BH, int T, float scale) {
    const size_t sm = fwd_smem_bytes<HS>();
    cudaError_t e = cudaFuncSetAttribute(flash_forward_kernel<HS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    if (e != cudaSuccess) return e;
    dim3 grid((unsigned)((T + FA_BR - 1) / FA_BR), (unsigned)BH);
    flash_forward_kernel<HS><<<grid, 128, sm, s>>>(O, lse, q, k, v, T, scale);
    return cudaGetLastError();
}

template <int HS>
static cudaError_t bwd_v1(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *q, const bf16 *k,
                          const bf16 *v, const bf16 *dO, const float *lse, const float *D, int BH,
                          int T, float scale) {
    const size_t sm = bwd_smem_bytes<HS>();
    cudaError_t e = cudaFuncSetAttribute(flash_backward_kv_kernel<HS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    if (e == cudaSuccess) e = cudaFuncSetAttribute(flash_backward_q_kernel<HS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    if (e != cudaSuccess) return e;
    dim3 grid((unsigned)((T + 63) / 64), (unsigned)BH);
    flash_backward_kv_kernel<HS><<<grid, 128, sm, s>>>(dk, dv, q, k, v, dO, lse, D, T, scale);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    flash_backward_q_kernel<HS><<<grid, 128, sm, s>>>(dq, q, k, v, dO, lse, D, T, scale);
    return cudaGetLastError();
}

template <int HS>
static cudaError_t fwd_fa2(cudaStream_t s, bf16 *O, int ldo, float *lse, const bf16 *q, const bf16 *k,
                           const bf16 *v, int ldi, int B, int NH, int T, float scale) {
    const size_t sm = fa2::fwd_smem<HS>();
    cudaError_t e = cudaFuncSetAttribute(fa2::fwd_kernel<HS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    if (e != cudaSuccess) return e;
    dim3 grid((unsigned)((T + 63) / 64), (unsigned)(B * NH));
    fa2::fwd_kernel<HS><<<grid, 128, sm, s>>>(O, lse, q, k, v, T, NH, ldi, ldo, scale, scale * fa2::LOG2E);
    return cudaGetLastError();
}

template <int HS>
static cudaError_t bwd_fa2(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, int ldg, const bf16 *q,
                           const bf16 *k, const bf16 *v, int ldi, const bf16 *dO, int ldo,
                           const float *lse, const float *D, int B, int NH, int T, float scale) {
    const size_t smkv = fa2::bwd_kv_smem<HS>(), smq = fa2::bwd_q_smem<HS>();
    cudaError_t e = cudaFuncSetAttribute(fa2::bwd_kv_kernel<HS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smkv);
    if (e == cudaSuccess) e = cudaFuncSetAttribute(fa2::bwd_q_kernel<HS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smq);
    if (e != cudaSuccess) return e;
    dim3 grid((unsigned)((T + 63) / 64), (unsigned)(B * NH));
    fa2::bwd_kv_kernel<HS><<<grid, 128, smkv, s>>>(dk, dv, q, k, v, dO, lse, D, T, NH, ldi, ldo, ldg, scale, scale * fa2::LOG2E);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    fa2::bwd_q_kernel<HS><<<grid, 128, smq, s>>>(dq, q, k, v, dO, lse, D, T, NH, ldi, ldo, ldg, scale, scale * fa2::LOG2E);
    return cudaGetLastError();
}

cudaError_t td_k_flash_forward_rows(cudaStream_t s, bf16 *O, int ldo, float *lse, const bf16 *q,
                                    const bf16 *k, const bf16 *v, int ldi, int B, int NH, int T,
                                    int HS, float scale) {
    switch (HS) {
    case 16: return fwd_fa2<16>(s, O, ldo, lse, q, k, v, ldi, B, NH, T, scale);
    case 32: return fwd_fa2<32>(s, O, ldo, lse, q, k, v, ldi, B, NH, T, scale);
    case 48: return fwd_fa2<48>(s, O, ldo, lse, q, k, v, ldi, B, NH, T, scale);
    case 64: return fwd_fa2<64>(s, O, ldo, lse, q, k, v, ldi, B, NH, T, scale);
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t td_k_flash_backward_rows(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, int ldg,
                                     const bf16 *q, const bf16 *k, const bf16 *v, int ldi,
                                     const bf16 *dO, int ldo, const float *lse, const float *D,
                                     int B, int NH, int T, int HS, float scale) {
    switch (HS) {
    case 16: return bwd_fa2<16>(s, dq, dk, dv, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, T, scale);
    case 32: return bwd_fa2<32>(s, dq, dk, dv, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, T, scale);
    case 48: return bwd_fa2<48>(s, dq, dk, dv, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, T, scale);
    case 64: return bwd_fa2<64>(s, dq, dk, dv, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, T, scale);
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t td_k_flash_forward(cudaStream_t s, bf16 *O, float *lse, const bf16 *q, const bf16 *k,
                               const bf16 *v, int BH, int T, int HS, float scale) {
    if (td_flash_fa2(HS)) return td_k_flash_forward_rows(s, O, HS, lse, q, k, v, HS, BH, 1, T, HS, scale);
    return td_k_flash_forward_v1(s, O, lse, q, k, v, BH, T, HS, scale);
}

cudaError_t td_k_flash_backward(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *q,
                                const bf16 *k, const bf16 *v, const bf16 *dO, const float *lse,
                                const float *D, int BH, int T, int HS, float scale) {
    if (td_flash_fa2(HS))
        return td_k_flash_backward_rows(s, dq, dk, dv, HS, q, k, v, HS, dO, HS, lse, D, BH, 1, T, HS, scale);
    return td_k_flash_backward_v1(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, HS, scale);
}

cudaError_t td_k_flash_forward_v1(cudaStream_t s, bf16 *O, float *lse, const bf16 *q, const bf16 *k,
                                  const bf16 *v, int BH, int T, int HS, float scale) {
    switch (HS) {
    case 16: return fwd_v1<16>(s, O, lse, q, k, v, BH, T, scale);
    case 32: return fwd_v1<32>(s, O, lse, q, k, v, BH, T, scale);
    case 48: return fwd_v1<48>(s, O, lse, q, k, v, BH, T, scale);
    case 64: return fwd_v1<64>(s, O, lse, q, k, v, BH, T, scale);
    case 80: return fwd_v1<80>(s, O, lse, q, k, v, BH, T, scale);
    case 96: return fwd_v1<96>(s, O, lse, q, k, v, BH, T, scale);
    case 112: return fwd_v1<112>(s, O, lse, q, k, v, BH, T, scale);
    case 128: return fwd_v1<128>(s, O, lse, q, k, v, BH, T, scale);
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t td_k_flash_backward_v1(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *q,
                                   const bf16 *k, const bf16 *v, const bf16 *dO, const float *lse,
                                   const float *D, int BH, int T, int HS, float scale) {
    switch (HS) {
    case 16: return bwd_v1<16>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 32: return bwd_v1<32>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 48: return bwd_v1<48>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 64: return bwd_v1<64>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 80: return bwd_v1<80>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 96: return bwd_v1<96>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 112: return bwd_v1<112>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 128: return bwd_v1<128>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t td_k_attn_rowdot(cudaStream_t s, float *D, const bf16 *dout, const bf16 *out, int B,
                             int T, int NH, int HS) {
    if (HS <= 64 && HS % 8 == 0) { /* 8 lanes per (b, t, h), 16-byte loads */
        const long long n = (long long)B * T * NH * 8;
        attn_rowdot8_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(D, dout, out, B, T, NH, HS);
        return cudaGetLastError();
    }
    const long long n = (long long)B * T * NH * 32;
    attn_rowdot_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(D, dout, out, B, T, NH, HS);
    return cudaGetLastError();
}
