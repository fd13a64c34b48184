/* optim.cu — the optimizer step's kernels (optim.c's td_adamw and td_grad_sq_sum_local): the
 * bf16 copy of the weights, docs/model.md's AdamW in optim.c's order of fp32 operations, and
 * the deterministic sum of squares behind the global gradient norm.
 * Not here: the per-op kernels (encoder.cu ... softmax_ce.cu).
 */
#include <math.h>

#include "common.cuh"
#include "vec.cuh"

/* ---- parameters: bf16 copy, AdamW, sum of squares -------------------------------------------- */

__global__ void cast_bf16_kernel(bf16 *out, const float *in, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2bfloat16_rn(in[i]);
}
cudaError_t td_k_cast_bf16(cudaStream_t s, bf16 *out, const float *in, long long n) {
    if (n <= 0) return cudaSuccess;
    cast_bf16_kernel<<<blocks_for(n, 256), 256, 0, s>>>(out, in, n);
    return cudaGetLastError();
}

/* docs/model.md's AdamW, in the CPU's (optim.c) order of fp32 operations; one pass over every
 * tensor. Which tensor an element belongs to (for weight decay) comes from seg_end: the block's
 * first element is found by bisection, the threads then step forward. */
__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, bf16 *p16,
                             long long first, long long n, const int64_t *seg_end,
                             const unsigned char *seg_decay, int nseg, float b1, float b2,
                             float bc1, float bc2, float lr, float eps, float wd, float clip) {
    __shared__ int s0;
    const long long start = first + blockIdx.x * (long long)blockDim.x; /* elements [first, n) */
    if (threadIdx.x == 0) {
        int lo = 0, hi = nseg - 1;
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (seg_end[mid] > start) hi = mid;
            else lo = mid + 1;
        }
        s0 = lo;
    }
    __syncthreads();
    const long long i = start + threadIdx.x;
    if (i >= n) return;
    int sg = s0;
    while (seg_end[sg] <= i) sg++;
    const float w = seg_decay[sg] ? wd : 0.f;
    const float gj = clip == 1.f ? g[i] : g[i] * clip;
    const float mm = b1 * m[i] + (1.f - b1) * gj;
    const float vv = b2 * v[i] + (1.f - b2) * gj * gj;
    m[i] = mm;
    v[i] = vv;
    const float mhat = mm / bc1, vhat = vv / bc2;
    float th = p[i];
    th = th - lr * (mhat / (sqrtf(vhat) + eps) + w * th);
    p[i] = th;
    if (p16) p16[i] = __float2bfloat16_rn(th);
}

/* the same, 4 elements per thread through 16-byte loads and stores (the buffers are cudaMalloc'd,
 * so 16-byte aligned); the last n % 4 elements, if any, take the scalar kernel */
__global__ void adamw4_kernel(float *p, const float *g, float *m, float *v, bf16 *p16, long long n4,
                              const int64_t *seg_end, const unsigned char *seg_decay, int nseg,
                              float b1, float b2, float bc1, float bc2, float lr, float eps,
                              float wd, float clip) {
    __shared__ int s0;
    const long long start = blockIdx.x * (long long)blockDim.x * 4;
    if (threadIdx.x == 0) {
        int lo = 0, hi = nseg - 1;
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (seg_end[mid] > start) hi = mid;
            else lo = mid + 1;
        }
        s0 = lo;
    }
    __syncthreads();
    const long long q = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (q >= n4) return;
    const long long i0 = 4 * q;
    float4 P = reinterpret_cast<float4 *>(p)[q], M = reinterpret_cast<float4 *>(m)[q];
    float4 Vv = reinterpret_cast<float4 *>(v)[q];
    const float4 G = reinterpret_cast<const float4 *>(g)[q];
    float *pp = &P.x, *mp = &M.x, *vp = &Vv.x;
    const float *gp = &G.x;
    int sg = s0;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        while (seg_end[sg] <= i0 + j) sg++;
        const float w = seg_decay[sg] ? wd : 0.f;
        const float gj = clip == 1.f ? gp[j] : gp[j] * clip;
        const float mm = b1 * mp[j] + (1.f - b1) * gj;
        const float vv = b2 * vp[j] + (1.f - b2) * gj * gj;
        mp[j] = mm;
        vp[j] = vv;
        const float mhat = mm / bc1, vhat = vv / bc2;
        const float th = pp[j];
        pp[j] = th - lr * (mhat / (sqrtf(vhat) + eps) + w * th);
    }
    reinterpret_cast<float4 *>(p)[q] = P;
    reinterpret_cast<float4 *>(m)[q] = M;
    reinterpret_cast<float4 *>(v)[q] = Vv;
    if (p16) {
        __nv_bfloat162 lo = __floats2bfloat162_rn(P.x, P.y), hi = __floats2bfloat162_rn(P.z, P.w);
        uint2 u;
        u.x = *reinterpret_cast<uint32_t *>(&lo);
        u.y = *reinterpret_cast<uint32_t *>(&hi);
        reinterpret_cast<uint2 *>(p16)[q] = u;
    }
}

cudaError_t td_k_adamw(cudaStream_t s, float *p, const float *g, float *m, float *v, bf16 *p16,
                       long long n, const int64_t *seg_end, const unsigned char *seg_decay,
                       int nseg, float b1, float b2, float bc1, float bc2, float lr, float eps,
                       float wd, float clip) {
    if (n <= 0) return cudaSuccess;
    const bool vec = aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v) &&
                     (!p16 || ((uintptr_t)p16 & 7u) == 0);
    const long long n4 = vec ? n / 4 : 0;
    if (n4 > 0) {
        adamw4_kernel<<<blocks_for(n4, 256), 256, 0, s>>>(p, g, m, v, p16, n4, seg_end, seg_decay, nseg,
                                                           b1, b2, bc1, bc2, lr, eps, wd, clip);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess || n4 * 4 == n) return e;
    }
    const long long first = n4 * 4; /* what the 4-wide kernel left: all, or the last n % 4 */
    adamw_kernel<<<blocks_for(n - first, 256), 256, 0, s>>>(p, g, m, v, p16, first, n, seg_end, seg_decay, nseg,
                                                     b1, b2, bc1, bc2, lr, eps, wd, clip);
    return cudaGetLastError();
}

/* Sum of squares in double: TD_SQ_BLOCKS fixed chunks, a fixed reduction tree in each, then one
 * thread adds the chunk sums in order into part[TD_SQ_BLOCKS]. */
__global__ void sq_partial_kernel(double *part, const float *g, long long n, long long chunk) {
    __shared__ double sh[256 / 32];
    const long long lo = blockIdx.x * chunk, hi = min(n, lo + chunk);
    double acc = 0.0;
    if ((chunk & 3) == 0 && ((uintptr_t)g & 15u) == 0) { /* 16-byte loads, then the scalar tail */
        const long long h4 = hi > lo ? lo + ((hi - lo) & ~3ll) : hi; /* chunks past n are empty */
        for (long long i = lo + 4 * threadIdx.x; i < h4; i += 4 * blockDim.x) {
            const float4 x = *reinterpret_cast<const float4 *>(g + i);
            acc += (double)x.x * x.x + (double)x.y * x.y + (double)x.z * x.z + (double)x.w * x.w;
        }
        for (long long i = h4 + threadIdx.x; i < hi; i += blockDim.x) acc += (double)g[i] * g[i];
    } else {
        for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) acc += (double)g[i] * g[i];
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (threadIdx.x % 32 == 0) sh[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < (int)(blockDim.x / 32); w++) t += sh[w];
        part[blockIdx.x] = t;
    }
}
__global__ void sq_final_kernel(double *part, int nb) {
    double t = 0.0;
    for (int b = 0; b < nb; b++) t += part[b];
    part[nb] = t;
}
cudaError_t td_k_sq_sum(cudaStream_t s, double *part, const float *g, long long n) {
    long long chunk = (n + TD_SQ_BLOCKS - 1) / TD_SQ_BLOCKS;
    chunk = (chunk + 3) & ~3ll; /* a multiple of 4: every chunk starts 16-byte aligned */
    sq_partial_kernel<<<TD_SQ_BLOCKS, 256, 0, s>>>(part, g, n, chunk);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    sq_final_kernel<<<1, 1, 0, s>>>(part, TD_SQ_BLOCKS);
    return cudaGetLastError();
}
