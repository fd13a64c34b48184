/* attention.cu — the materialised attention's pieces that are not products (kernels.c's
 * td_attention_*): layout changes between (B, T, 3, NH, HS) and per-head (B, NH, T, HS), and
 * the causal softmax over the scores. Not here: the products (matmul.cu), flash attention
 * (flash_fwd.cu, flash_bwd.cu).
 */
#include <math.h>

#include "common.cuh"
#include "vec.cuh"

/* ---- attention layout changes: (B, T, 3, NH, HS) <-> 3 x (B, NH, T, HS) ----------------------- */

template <typename E>
__global__ void qkv_permute_kernel(E *qkvp, const E *qkv, int B, int T, int NH, int HS, int dir) {
    const int C = NH * HS;
    const long long n = (long long)B * T * 3 * C;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long bt = i / (3 * C);
    int r = (int)(i % (3 * C));
    int j = r / C, h = (r % C) / HS, dd = r % HS;
    int b = (int)(bt / T), t = (int)(bt % T);
    long long o = (long long)j * B * T * C + (((long long)b * NH + h) * T + t) * HS + dd;
    if (dir == 0) qkvp[o] = qkv[i];
    else ((E *)qkv)[i] = qkvp[o];
}

template <typename E>
cudaError_t td_k_qkv_permute(cudaStream_t s, E *qkvp, const E *qkv, int B, int T, int NH, int HS) {
    qkv_permute_kernel<E><<<blocks_for((long long)B * T * 3 * NH * HS, 256), 256, 0, s>>>(qkvp, qkv, B, T, NH, HS, 0);
    return cudaGetLastError();
}
template <typename E>
cudaError_t td_k_qkv_unpermute(cudaStream_t s, E *dqkv, const E *dqkvp, int B, int T, int NH,
                               int HS) {
    qkv_permute_kernel<E><<<blocks_for((long long)B * T * 3 * NH * HS, 256), 256, 0, s>>>((E *)dqkvp, dqkv, B, T, NH, HS, 1);
    return cudaGetLastError();
}

template <typename E>
__global__ void head_permute_kernel(E *y, E *x, int B, int T, int NH, int HS, int dir) {
    const int C = NH * HS;
    const long long n = (long long)B * T * C;
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; /* index into x (B, T, C) */
    if (i >= n) return;
    long long bt = i / C;
    int r = (int)(i % C), h = r / HS, dd = r % HS;
    int b = (int)(bt / T), t = (int)(bt % T);
    long long o = (((long long)b * NH + h) * T + t) * HS + dd;
    if (dir == 0) y[o] = x[i];
    else x[i] = y[o];
}
template <typename E>
cudaError_t td_k_head_permute(cudaStream_t s, E *y, const E *x, int B, int T, int NH, int HS) {
    head_permute_kernel<E><<<blocks_for((long long)B * T * NH * HS, 256), 256, 0, s>>>(y, (E *)x, B, T, NH, HS, 0);
    return cudaGetLastError();
}
template <typename E>
cudaError_t td_k_head_unpermute(cudaStream_t s, E *x, const E *y, int B, int T, int NH, int HS) {
    head_permute_kernel<E><<<blocks_for((long long)B * T * NH * HS, 256), 256, 0, s>>>((E *)y, x, B, T, NH, HS, 1);
    return cudaGetLastError();
}

/* ---- causal softmax over attention scores: one warp per (b, h, t) row --------------------------- */

template <typename E>
__global__ void attn_softmax_forward_kernel(E *P, const E *S, long long rows, int T, float scale) {
    long long row = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int t = (int)(row % T);
    const E *s = S + row * T;
    E *p = P + row * T;
    float mx = -INFINITY;
    for (int u = lane; u <= t; u += 32) mx = fmaxf(mx, to_f(s[u]) * scale);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int u = lane; u <= t; u += 32) sum += expf(to_f(s[u]) * scale - mx);
    const float inv = 1.f / warp_sum(sum);
    for (int u = lane; u < T; u += 32) p[u] = from_f<E>(u <= t ? expf(to_f(s[u]) * scale - mx) * inv : 0.f);
}

/* In place: dS (in: d(probs)) <- P * (dP - sum_u P dP) * scale, zero above the diagonal. */
template <typename E>
__global__ void attn_softmax_backward_kernel(E *dS, const E *P, long long rows, int T, float scale) {
    long long row = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int t = (int)(row % T);
    const E *p = P + row * T;
    E *d = dS + row * T;
    float dot = 0.f;
    for (int u = lane; u <= t; u += 32) dot += to_f(p[u]) * to_f(d[u]);
    dot = warp_sum(dot);
    for (int u = lane; u < T; u += 32) d[u] = from_f<E>(u <= t ? to_f(p[u]) * (to_f(d[u]) - dot) * scale : 0.f);
}

template <typename E>
cudaError_t td_k_attn_softmax_forward(cudaStream_t s, E *P, const E *S, long long rows, int T,
                                      float scale) {
    attn_softmax_forward_kernel<E><<<blocks_for(rows * 32, 256), 256, 0, s>>>(P, S, rows, T, scale);
    return cudaGetLastError();
}
template <typename E>
cudaError_t td_k_attn_softmax_backward(cudaStream_t s, E *dS, const E *P, long long rows, int T,
                                       float scale) {
    attn_softmax_backward_kernel<E><<<blocks_for(rows * 32, 256), 256, 0, s>>>(dS, P, rows, T, scale);
    return cudaGetLastError();
}

/* ---- explicit instantiations ----------------------------------------------------------------- */

#define TD_INSTANTIATE(E)                                                                        \
    template cudaError_t td_k_qkv_permute<E>(cudaStream_t, E *, const E *, int, int, int, int);  \
    template cudaError_t td_k_qkv_unpermute<E>(cudaStream_t, E *, const E *, int, int, int,      \
                                               int);                                             \
    template cudaError_t td_k_head_permute<E>(cudaStream_t, E *, const E *, int, int, int, int); \
    template cudaError_t td_k_head_unpermute<E>(cudaStream_t, E *, const E *, int, int, int,     \
                                                int);                                            \
    template cudaError_t td_k_attn_softmax_forward<E>(cudaStream_t, E *, const E *, long long,   \
                                                      int, float);                               \
    template cudaError_t td_k_attn_softmax_backward<E>(cudaStream_t, E *, const E *, long long,  \
                                                       int, float);

TD_INSTANTIATE(float)
TD_INSTANTIATE(bf16)
