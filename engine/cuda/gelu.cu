/* gelu.cu — tanh-GELU forward and backward (kernels.c's td_gelu_*), in the same tanhf form as
 * the CPU, and the bias add of the products whose epilogue does not fuse it (matmul.cu).
 * Not here: the other ops (encoder.cu, layernorm.cu, attention.cu, softmax_ce.cu).
 */
#include <math.h>

#include "common.cuh"
#include "vec.cuh"

#define GELU_SCALE 0.7978845608028654f /* sqrt(2 / pi) */

/* ---- GELU (tanh form), bias ------------------------------------------------------------------ */

template <typename E>
__global__ void gelu_forward_kernel(E *out, const E *inp, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_f(inp[i]);
    out[i] = from_f<E>(0.5f * x * (1.f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x))));
}

template <typename E>
__global__ void gelu_backward_kernel(E *d, const E *inp, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = to_f(inp[i]);
    float th = tanhf(GELU_SCALE * (x + 0.044715f * x * x * x));
    float sech2 = 1.f - th * th;
    float g = 0.5f * (1.f + th) + 0.5f * x * sech2 * GELU_SCALE * (1.f + 3.f * 0.044715f * x * x);
    d[i] = from_f<E>(g * to_f(d[i]));
}

template <typename E>
cudaError_t td_k_gelu_forward(cudaStream_t s, E *out, const E *inp, long long n) {
    gelu_forward_kernel<E><<<blocks_for(n, 256), 256, 0, s>>>(out, inp, n);
    return cudaGetLastError();
}
template <typename E>
cudaError_t td_k_gelu_backward_inplace(cudaStream_t s, E *d, const E *inp, long long n) {
    gelu_backward_kernel<E><<<blocks_for(n, 256), 256, 0, s>>>(d, inp, n);
    return cudaGetLastError();
}

template <typename E>
__global__ void bias_add_kernel(E *out, const E *bias, int OC, int ld, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long r = i / OC;
    int c = (int)(i % OC);
    E *o = out + r * ld + c;
    *o = from_f<E>(to_f(*o) + to_f(bias[c]));
}
template <typename E>
cudaError_t td_k_bias_add(cudaStream_t s, E *out, const E *bias, int N, int OC, int ld) {
    long long n = (long long)N * OC;
    bias_add_kernel<E><<<blocks_for(n, 256), 256, 0, s>>>(out, bias, OC, ld, n);
    return cudaGetLastError();
}

/* ---- explicit instantiations ----------------------------------------------------------------- */

#define TD_INSTANTIATE(E)                                                                        \
    template cudaError_t td_k_gelu_forward<E>(cudaStream_t, E *, const E *, long long);          \
    template cudaError_t td_k_gelu_backward_inplace<E>(cudaStream_t, E *, const E *, long long); \
    template cudaError_t td_k_bias_add<E>(cudaStream_t, E *, const E *, int, int, int);

TD_INSTANTIATE(float)
TD_INSTANTIATE(bf16)
