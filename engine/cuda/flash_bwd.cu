/* flash_bwd.cu — flash attention backward (bf16): D = rowsum(dO * O) (td_k_attn_rowdot), then
 * dK, dV per 64 keys and dQ per 64 queries, for FlashAttention-2 (fa2::bwd_*) and the first
 * WMMA version, and their launchers. Deterministic (no atomics). Design and shared helpers:
 * flash_common.cuh. Not here: the forward (flash_fwd.cu).
 */
#include "flash_common.cuh"

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

namespace fa2 {

/* NW warps of 16 keys each: a block of 16 NW keys; query tiles of 64 */
template <int HS, int NW>
constexpr size_t bwd_kv_smem() {
    return (size_t)(2 * 16 * NW + 4 * 64) * (HS + 8) * sizeof(bf16) + 4 * 64 * sizeof(float);
}

/* dK, dV of 16 NW keys of one kv head (blockIdx.y over B * NKV): for each of the `group` query
 * heads that share it (grouped-query attention; group = 1: one head), in head order, the query
 * tiles from the diagonal to the end; the group's sum stays in registers (no atomics) */
template <int HS, int NW>
__global__ void __launch_bounds__(32 * NW) bwd_kv_kernel(bf16 *dK, bf16 *dV, const bf16 *Q, const bf16 *K,
                                                         const bf16 *V, const bf16 *dO, const float *lse,
                                                         const float *Dsum, int T, int NH, int group,
                                                         int ldi, int ldo, int ldg, float scale,
                                                         float scale_log2) {
    constexpr int LD = HS + 8, TILE = 64 * LD, BK = 16 * NW, NT = 32 * NW;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sK = (bf16 *)smem, *sV = sK + BK * LD, *sQ = sV + BK * LD, *sdO = sQ + 2 * TILE;
    float *sL = (float *)(sdO + 2 * TILE), *sD = sL + 2 * 64; /* two stages of 64 each */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k0 = (int)blockIdx.x * BK; /* the longest columns (smallest keys) first */
    const int kt = k0 / 64;              /* the first query tile that sees a key of the block */
    const int NKV = NH / group, b = (int)blockIdx.y / NKV, hk = (int)blockIdx.y % NKV;
    const long long kvh = (long long)b * T * ldi + (long long)hk * HS;
    const int nqt = (T + 63) / 64, nq = nqt - kt, nit = group * nq; /* (query head, tile) pairs */
    auto load_q = [&](int it, int buf) {
        const int bh = b * NH + hk * group + it / nq, qt = kt + it % nq;
        const long long hr = (long long)bh * T;
        tile_async<HS, 64, NT>(sQ + buf * TILE, Q + head_off(bh, NH, T, ldi, HS), qt * 64, T, ldi);
        tile_async<HS, 64, NT>(sdO + buf * TILE, dO + head_off(bh, NH, T, ldo, HS), qt * 64, T, ldo);
        const int i = threadIdx.x & 63, q = qt * 64 + i;
        const bool ok = q < T;
        if (threadIdx.x < 64) cp4(sL + buf * 64 + i, lse + hr + (ok ? q : 0), ok);
        else if (threadIdx.x < 128) cp4(sD + buf * 64 + i, Dsum + hr + (ok ? q : 0), ok);
    };
    tile_async<HS, BK, NT>(sK, K + kvh, k0, T, ldi);
    tile_async<HS, BK, NT>(sV, V + kvh, k0, T, ldi);
    load_q(0, 0);
    cp_commit();

    uint32_t kf[HS / 16][4], vf[HS / 16][4];
    float dk[HS / 8][4], dv[HS / 8][4];
#pragma unroll
    for (int d = 0; d < HS / 8; d++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[d][e] = dv[d][e] = 0.f;
    const int w0 = k0 + warp * 16; /* the warp's first key */
    const int key0 = w0 + g, key1 = key0 + 8;
    for (int it = 0; it < nit; it++) {
        const int qt = kt + it % nq, buf = it & 1;
        if (it + 1 < nit) {
            load_q(it + 1, buf ^ 1);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        if (it == 0) {
            load_a<HS>(kf, sK + warp * 16 * LD, lane);
            load_a<HS>(vf, sV + warp * 16 * LD, lane);
        }
        if (qt * 64 + 63 < w0) { /* every query of the tile is before every key of this warp */
            __syncthreads();
            continue;
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
        const bool mask = qt * 64 < w0 + 15 || qt * 64 + 64 > T; /* the warp's diagonal, or T */
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
    const long long gh = (long long)b * T * ldg + (long long)hk * HS;
    store_rows<HS>(dK + gh, dk, key0, T, t, 1.f, 1.f, ldg);
    store_rows<HS>(dV + gh, dv, key0, T, t, 1.f, 1.f, ldg);
}

/* NW warps of 16 query rows each: a block of 16 NW queries; key tiles of 64 */
template <int HS, int NW>
constexpr size_t bwd_q_smem() { return (size_t)(2 * 16 * NW + 4 * 64) * (HS + 8) * sizeof(bf16); }

/* dQ of 16 NW queries: key tiles up to the diagonal */
template <int HS, int NW>
__global__ void __launch_bounds__(32 * NW) bwd_q_kernel(bf16 *dQ, const bf16 *Q, const bf16 *K,
                                                        const bf16 *V, const bf16 *dO, const float *lse,
                                                        const float *Dsum, int T, int NH, int group,
                                                        int ldi, int ldo, int ldg, float scale,
                                                        float scale_log2) {
    constexpr int LD = HS + 8, TILE = 64 * LD, BR = 16 * NW, NT = 32 * NW;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sQ = (bf16 *)smem, *sdO = sQ + BR * LD, *sK = sdO + BR * LD, *sV = sK + 2 * TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int qt = (int)gridDim.x - 1 - (int)blockIdx.x;
    const int q0 = qt * BR;
    const long long head = head_off((int)blockIdx.y, NH, T, ldi, HS), hr = (long long)blockIdx.y * T;
    const long long kvh = kv_head_off((int)blockIdx.y, NH, group, T, ldi, HS); /* GQA: shared kv */
    const bf16 *Kh = K + kvh, *Vh = V + kvh;
    tile_async<HS, BR, NT>(sQ, Q + head, q0, T, ldi);
    tile_async<HS, BR, NT>(sdO, dO + head_off((int)blockIdx.y, NH, T, ldo, HS), q0, T, ldo);
    tile_async<HS, 64, NT>(sK, Kh, 0, T, ldi);
    tile_async<HS, 64, NT>(sV, Vh, 0, T, ldi);
    cp_commit();
    const int w0 = q0 + warp * 16; /* the warp's first row */
    const int row0 = w0 + g, row1 = row0 + 8;
    const float L0 = row0 < T ? lse[hr + row0] * LOG2E : 0.f, L1 = row1 < T ? lse[hr + row1] * LOG2E : 0.f;
    const float D0 = row0 < T ? Dsum[hr + row0] : 0.f, D1 = row1 < T ? Dsum[hr + row1] : 0.f;

    uint32_t qf[HS / 16][4], of[HS / 16][4];
    float dq[HS / 8][4];
#pragma unroll
    for (int d = 0; d < HS / 8; d++) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;
    /* key tiles up to the one holding the block's last row (or T's last key) */
    const int nkt = min((q0 + BR - 1) / 64, (T - 1) / 64) + 1;
    for (int kt = 0; kt < nkt; kt++) {
        const int buf = kt & 1;
        if (kt + 1 < nkt) {
            tile_async<HS, 64, NT>(sK + (buf ^ 1) * TILE, Kh, (kt + 1) * 64, T, ldi);
            tile_async<HS, 64, NT>(sV + (buf ^ 1) * TILE, Vh, (kt + 1) * 64, T, ldi);
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
        if (kt * 64 > w0 + 15) { /* every key of the tile is after every row of this warp */
            __syncthreads();
            continue;
        }
        const bf16 *k_s = sK + buf * TILE, *v_s = sV + buf * TILE;
        float s[8][4], dp[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.f;
        mma_abt<HS>(s, qf, k_s, lane);
        mma_abt<HS>(dp, of, v_s, lane);
        const bool mask = kt * 64 + 63 > w0; /* the warp's diagonal */
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

template <int HS, int NW>
static cudaError_t bwd_kv_fa2(cudaStream_t s, bf16 *dk, bf16 *dv, int ldg, const bf16 *q,
                              const bf16 *k, const bf16 *v, int ldi, const bf16 *dO, int ldo,
                              const float *lse, const float *D, int B, int NH, int NKV, int T,
                              float scale) {
    const size_t sm = fa2::bwd_kv_smem<HS, NW>();
    cudaError_t e = cudaFuncSetAttribute(fa2::bwd_kv_kernel<HS, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    if (e != cudaSuccess) return e;
    dim3 grid((unsigned)((T + 16 * NW - 1) / (16 * NW)), (unsigned)(B * NKV));
    fa2::bwd_kv_kernel<HS, NW><<<grid, 32 * NW, sm, s>>>(dk, dv, q, k, v, dO, lse, D, T, NH, NH / NKV, ldi, ldo, ldg, scale, scale * fa2::LOG2E);
    return cudaGetLastError();
}

template <int HS, int NW>
static cudaError_t bwd_q_fa2(cudaStream_t s, bf16 *dq, int ldg, const bf16 *q, const bf16 *k,
                             const bf16 *v, int ldi, const bf16 *dO, int ldo, const float *lse,
                             const float *D, int B, int NH, int NKV, int T, float scale) {
    const size_t sm = fa2::bwd_q_smem<HS, NW>();
    cudaError_t e = cudaFuncSetAttribute(fa2::bwd_q_kernel<HS, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    if (e != cudaSuccess) return e;
    dim3 grid((unsigned)((T + 16 * NW - 1) / (16 * NW)), (unsigned)(B * NH));
    fa2::bwd_q_kernel<HS, NW><<<grid, 32 * NW, sm, s>>>(dq, q, k, v, dO, lse, D, T, NH, NH / NKV, ldi, ldo, ldg, scale, scale * fa2::LOG2E);
    return cudaGetLastError();
}

template <int HS>
static cudaError_t bwd_fa2(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, int ldg, const bf16 *q,
                           const bf16 *k, const bf16 *v, int ldi, const bf16 *dO, int ldo,
                           const float *lse, const float *D, int B, int NH, int NKV, int T,
                           float scale) {
    const td_flash_warps w = td_flash_get_warps();
    cudaError_t e = w.kv == 8 ? bwd_kv_fa2<HS, 8>(s, dk, dv, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, NKV, T, scale)
                              : bwd_kv_fa2<HS, 4>(s, dk, dv, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, NKV, T, scale);
    if (e != cudaSuccess) return e;
    return w.q == 8 ? bwd_q_fa2<HS, 8>(s, dq, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, NKV, T, scale)
                    : bwd_q_fa2<HS, 4>(s, dq, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, NKV, T, scale);
}

cudaError_t td_k_flash_backward_gqa(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, int ldg,
                                    const bf16 *q, const bf16 *k, const bf16 *v, int ldi,
                                    const bf16 *dO, int ldo, const float *lse, const float *D,
                                    int B, int NH, int NKV, int T, int HS, float scale) {
    if (NKV < 1 || NH % NKV) return cudaErrorInvalidValue;
    switch (HS) {
    case 16: return bwd_fa2<16>(s, dq, dk, dv, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, NKV, T, scale);
    case 32: return bwd_fa2<32>(s, dq, dk, dv, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, NKV, T, scale);
    case 48: return bwd_fa2<48>(s, dq, dk, dv, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, NKV, T, scale);
    case 64: return bwd_fa2<64>(s, dq, dk, dv, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, NKV, T, scale);
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t td_k_flash_backward_rows(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, int ldg,
                                     const bf16 *q, const bf16 *k, const bf16 *v, int ldi,
                                     const bf16 *dO, int ldo, const float *lse, const float *D,
                                     int B, int NH, int T, int HS, float scale) {
    return td_k_flash_backward_gqa(s, dq, dk, dv, ldg, q, k, v, ldi, dO, ldo, lse, D, B, NH, NH, T, HS, scale);
}

cudaError_t td_k_flash_backward(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *q,
                                const bf16 *k, const bf16 *v, const bf16 *dO, const float *lse,
                                const float *D, int BH, int T, int HS, float scale) {
    if (td_flash_fa2(HS))
        return td_k_flash_backward_rows(s, dq, dk, dv, HS, q, k, v, HS, dO, HS, lse, D, BH, 1, T, HS, scale);
    return td_k_flash_backward_v1(s, dq, dk, dv, q, k, v, dO, lse, D, BH, T, HS, scale);
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
