/* flash_fwd.cu — flash attention forward (bf16): FlashAttention-2 (fa2::fwd_kernel) for head
 * sizes 16..64, the first WMMA version (flash_forward_kernel) for 80..128, and their launchers.
 * Design and shared helpers: flash_common.cuh. Not here: the backward (flash_bwd.cu).
 */
#include "flash_common.cuh"

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

namespace fa2 {

/* NW warps of 16 query rows each: a block of 16 NW queries; key tiles of 64 */
template <int HS, int NW>
constexpr size_t fwd_smem() { return (size_t)(16 * NW + 4 * 64) * (HS + 8) * sizeof(bf16); }

template <int HS, int NW>
__global__ void __launch_bounds__(32 * NW) fwd_kernel(bf16 *O, float *lse, const bf16 *Q, const bf16 *K,
                                                      const bf16 *V, int T, int NH, int group, int ldi,
                                                      int ldo, float scale, float scale_log2) {
    constexpr int LD = HS + 8, TILE = 64 * LD, BR = 16 * NW, NT = 32 * NW;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sQ = (bf16 *)smem, *sK = sQ + BR * LD, *sV = sK + 2 * TILE; /* sK, sV: two stages each */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int qt = (int)gridDim.x - 1 - (int)blockIdx.x; /* the longest rows first */
    const int q0 = qt * BR;
    const long long head = head_off((int)blockIdx.y, NH, T, ldi, HS);
    const long long kvh = kv_head_off((int)blockIdx.y, NH, group, T, ldi, HS); /* GQA: shared kv */
    const bf16 *Kh = K + kvh, *Vh = V + kvh;
    bf16 *Oh = O + head_off((int)blockIdx.y, NH, T, ldo, HS);
    tile_async<HS, BR, NT>(sQ, Q + head, q0, T, ldi);
    tile_async<HS, 64, NT>(sK, Kh, 0, T, ldi);
    tile_async<HS, 64, NT>(sV, Vh, 0, T, ldi);
    cp_commit();

    uint32_t qf[HS / 16][4];
    float o[HS / 8][4];
#pragma unroll
    for (int d = 0; d < HS / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f; /* rows g, g + 8 (raw score units) */
    const int w0 = q0 + warp * 16; /* the warp's first row */
    const int row0 = w0 + g, row1 = row0 + 8;
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
        if (kt == 0) load_a<HS>(qf, sQ + warp * 16 * LD, lane);
        if (kt * 64 > w0 + 15) { /* every key of the tile is after every row of this warp */
            __syncthreads();
            continue;
        }
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        mma_abt<HS>(s, qf, sK + buf * TILE, lane);
        if (kt * 64 + 63 > w0) { /* the warp's diagonal: key > query -> -inf (keys >= T are > every query < T) */
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

} /* namespace fa2 */

/* ---- launchers ---------------------------------------------------------------------------- */

/* forward 8 warps, backward kernels 4: flash_bench.cu on an H100 (2026-12-07,
 * results/gpu/flash_bench-warps-h100.txt) timed all eight settings at the GPT-2 and Llama
 * shapes; 8 warps in the forward was 2.5-5% faster at every shape, 8 in either backward kernel
 * slower. Every setting gives the same bits (tests/engine/test_cuda.py). */
static const td_flash_warps k_flash_default_warps = {8, 4, 4};
static td_flash_warps g_flash_warps = k_flash_default_warps;

td_flash_warps td_flash_default_warps(void) { return k_flash_default_warps; }
td_flash_warps td_flash_get_warps(void) { return g_flash_warps; }

cudaError_t td_flash_set_warps(td_flash_warps w) {
    const int v[3] = {w.fwd, w.kv, w.q};
    for (int i = 0; i < 3; i++)
        if (v[i] != 4 && v[i] != 8) return cudaErrorInvalidValue;
    g_flash_warps = w;
    return cudaSuccess;
}

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

template <int HS, int NW>
static cudaError_t fwd_fa2_nw(cudaStream_t s, bf16 *O, int ldo, float *lse, const bf16 *q,
                              const bf16 *k, const bf16 *v, int ldi, int B, int NH, int NKV, int T,
                              float scale) {
    const size_t sm = fa2::fwd_smem<HS, NW>();
    cudaError_t e = cudaFuncSetAttribute(fa2::fwd_kernel<HS, NW>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    if (e != cudaSuccess) return e;
    dim3 grid((unsigned)((T + 16 * NW - 1) / (16 * NW)), (unsigned)(B * NH));
    fa2::fwd_kernel<HS, NW><<<grid, 32 * NW, sm, s>>>(O, lse, q, k, v, T, NH, NH / NKV, ldi, ldo, scale, scale * fa2::LOG2E);
    return cudaGetLastError();
}

template <int HS>
static cudaError_t fwd_fa2(cudaStream_t s, bf16 *O, int ldo, float *lse, const bf16 *q, const bf16 *k,
                           const bf16 *v, int ldi, int B, int NH, int NKV, int T, float scale) {
    if (td_flash_get_warps().fwd == 8)
        return fwd_fa2_nw<HS, 8>(s, O, ldo, lse, q, k, v, ldi, B, NH, NKV, T, scale);
    return fwd_fa2_nw<HS, 4>(s, O, ldo, lse, q, k, v, ldi, B, NH, NKV, T, scale);
}

cudaError_t td_k_flash_forward_gqa(cudaStream_t s, bf16 *O, int ldo, float *lse, const bf16 *q,
                                   const bf16 *k, const bf16 *v, int ldi, int B, int NH, int NKV,
                                   int T, int HS, float scale) {
    if (NKV < 1 || NH % NKV) return cudaErrorInvalidValue;
    switch (HS) {
    case 16: return fwd_fa2<16>(s, O, ldo, lse, q, k, v, ldi, B, NH, NKV, T, scale);
    case 32: return fwd_fa2<32>(s, O, ldo, lse, q, k, v, ldi, B, NH, NKV, T, scale);
    case 48: return fwd_fa2<48>(s, O, ldo, lse, q, k, v, ldi, B, NH, NKV, T, scale);
    case 64: return fwd_fa2<64>(s, O, ldo, lse, q, k, v, ldi, B, NH, NKV, T, scale);
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t td_k_flash_forward_rows(cudaStream_t s, bf16 *O, int ldo, float *lse, const bf16 *q,
                                    const bf16 *k, const bf16 *v, int ldi, int B, int NH, int T,
                                    int HS, float scale) {
    return td_k_flash_forward_gqa(s, O, ldo, lse, q, k, v, ldi, B, NH, NH, T, HS, scale);
}

cudaError_t td_k_flash_forward(cudaStream_t s, bf16 *O, float *lse, const bf16 *q, const bf16 *k,
                               const bf16 *v, int BH, int T, int HS, float scale) {
    if (td_flash_fa2(HS)) return td_k_flash_forward_rows(s, O, HS, lse, q, k, v, HS, BH, 1, T, HS, scale);
    return td_k_flash_forward_v1(s, O, lse, q, k, v, BH, T, HS, scale);
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
