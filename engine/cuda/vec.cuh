/* vec.cuh — what the op kernels (encoder.cu, layernorm.cu, gelu.cu, attention.cu, softmax_ce.cu,
 * optim.cu) share: launch sizes, warp reductions, and 8-element loads and stores with the
 * alignment test that picks the vector kernels. Private to those files. Each of them is the same
 * maths as its CPU reference in engine/src/kernels.c (same names without the td_k_ prefix), in
 * fp32 arithmetic whatever the element type E, with reductions in a fixed order (no float
 * atomics anywhere), so results are bit-identical run to run.
 */
#ifndef TD_CUDA_VEC_CUH
#define TD_CUDA_VEC_CUH

#include "common.cuh"

static inline unsigned blocks_for(long long n, int threads) {
    return (unsigned)((n + threads - 1) / threads);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* 8 consecutive elements as fp32 and back: one 16-byte access for bf16, two for fp32. The vector
 * kernels below take rows whose length is a multiple of 8 starting at 16-byte aligned addresses
 * (vec_ok); other shapes run the scalar kernels, which are the same maths. */
__device__ __forceinline__ void ld8(float (&x)[8], const bf16 *p) {
    const uint4 u = *reinterpret_cast<const uint4 *>(p);
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 f = __bfloat1622float2(h[i]);
        x[2 * i] = f.x;
        x[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void ld8(float (&x)[8], const float *p) {
    const float4 a = reinterpret_cast<const float4 *>(p)[0], b = reinterpret_cast<const float4 *>(p)[1];
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}
__device__ __forceinline__ void st8(bf16 *p, const float (&x)[8]) {
    uint4 u;
    __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(x[2 * i], x[2 * i + 1]);
    *reinterpret_cast<uint4 *>(p) = u;
}
__device__ __forceinline__ void st8(float *p, const float (&x)[8]) {
    reinterpret_cast<float4 *>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
    reinterpret_cast<float4 *>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
}
static inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }
/* rows of n elements (n % 8 == 0) at 16-byte aligned bases */
static inline bool vec_ok(int n, const void *a, const void *b = NULL, const void *c = NULL,
                          const void *d = NULL) {
    return n % 8 == 0 && aligned16(a) && (!b || aligned16(b)) && (!c || aligned16(c)) && (!d || aligned16(d));
}

#endif /* TD_CUDA_VEC_CUH */
