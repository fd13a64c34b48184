/* flash.cu — causal attention without the (T, T) matrix in memory, bf16 mode (FlashAttention-2
 * style, on the tensor cores through WMMA 16x16x16 bf16 fragments with fp32 accumulation).
 *
 * Inputs are the permuted heads q, k, v (B*NH, T, HS) (kernels.cu's qkv_permute). Forward: one
 * block of 4 warps per (head, 64 queries); each warp owns 16 query rows, walks the key tiles up to
 * the diagonal with an online softmax (fp32 statistics) and keeps its output rows in shared memory;
 * it writes O (bf16) and the log-sum-exp of each row (fp32). Backward, deterministic (no atomics):
 * one kernel per (head, 64 keys) accumulates dK and dV over the query tiles at or below the
 * diagonal; another per (head, 64 queries) accumulates dQ over the key tiles; both recompute the
 * probabilities from the stored log-sum-exp, with D = rowsum(dO * O) precomputed.
 * Head sizes: multiples of 16 up to 128 (td_flash_supported); fp32 mode uses the materialised
 * attention of backend.cu, so that fp32 stays exact to the CPU engine's tolerances.
 * Status: correct (tests/engine/test_cuda.py, bf16 tiers) but SLOWER than the materialised
 * attention on an H100 (GPT-2 124M: 46.7 ms against 38.5 ms a step, docs/cuda.md), so it is
 * opt-in (TANDEM_CUDA_ATTENTION=flash). Where the time goes: the online softmax walks the 16
 * rows of a warp one at a time through shared memory, S and P make a round trip through shared
 * memory, and 4 warps per block leave the tensor cores idle; a register-resident softmax on
 * mma.sync / wgmma fragments (FlashAttention-2/3) is the way forward.
 */
#include <mma.h>

#include "common.cuh"

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

/* ---- launchers ---------------------------------------------------------------------------- */

int td_flash_supported(int HS) { return HS % 16 == 0 && HS >= 16 && HS <= 128; }

template <int HS>
static cudaError_t fwd(cudaStream_t s, bf16 *O, float *lse, const bf16 *q, const bf16 *k,
                       const bf16 *v, int BH, int T, float scale) {
    const size_t sm = fwd_smem_bytes<HS>();
    cudaError_t e = cudaFuncSetAttribute(flash_forward_kernel<HS>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    if (e != cudaSuccess) return e;
    dim3 grid((unsigned)((T + FA_BR - 1) / FA_BR), (unsigned)BH);
    flash_forward_kernel<HS><<<grid, 128, sm, s>>>(O, lse, q, k, v, T, scale);
    return cudaGetLastError();
}

template <int HS>
static cudaError_t bwd(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *q, const bf16 *k,
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

cudaError_t td_k_flash_forward(cudaStream_t s, bf16 *O, float *lse, const bf16 *q, const bf16 *k,
                               const bf16 *v, int BH, int T, int HS, float scale) {
    switch (HS) {
    case 16: return fwd<16>(s, O, lse, q, k, v, BH, T, scale);
    case 32: return fwd<32>(s, O, lse, q, k, v, BH, T, scale);
    case 48: return fwd<48>(s, O, lse, q, k, v, BH, T, scale);
    case 64: return fwd<64>(s, O, lse, q, k, v, BH, T, scale);
    case 80: return fwd<80>(s, O, lse, q, k, v, BH, T, scale);
    case 96: return fwd<96>(s, O, lse, q, k, v, BH, T, scale);
    case 112: return fwd<112>(s, O, lse, q, k, v, BH, T, scale);
    case 128: return fwd<128>(s, O, lse, q, k, v, BH, T, scale);
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t td_k_flash_backward(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *q,
                                const bf16 *k, const bf16 *v, const bf16 *dO, const float *lse,
                                const float *D, int BH, int T, int HS, float scale) {
    switch (HS) {
    case 16: return bwd<16>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 32: return bwd<32>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 48: return bwd<48>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 64: return bwd<64>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 80: return bwd<80>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 96: return bwd<96>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 112: return bwd<112>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    case 128: return bwd<128>(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, scale);
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t td_k_attn_rowdot(cudaStream_t s, float *D, const bf16 *dout, const bf16 *out, int B,
                             int T, int NH, int HS) {
    const long long n = (long long)B * T * NH * 32;
    attn_rowdot_kernel<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(D, dout, out, B, T, NH, HS);
    return cudaGetLastError();
}
