/* llama_ops.cu — the Llama family's own ops on the GPU (engine/src/llama_ops.c's kernels): the
 * token embedding lookup and its gradient, RMSNorm forward and input gradient, RoPE (half-split,
 * from tables of cos and sin computed on the host in double, as the CPU rounds them), SwiGLU
 * forward and backward, and the layout change of the fused q | k | v rows to per-head blocks for
 * the materialised grouped-query attention. fp32 arithmetic whatever the element type, fixed
 * reduction orders (no float atomics). The RMSNorm weight gradient is layernorm.cu's
 * deterministic column sum (td_k_colsum with a zero mean); products are matmul.cu's.
 * Declarations and layouts: llama.cuh.
 */
#include <math.h>

#include "llama.cuh"
#include "vec.cuh"

/* ---- token embedding ------------------------------------------------------------------------- */

template <typename E>
__global__ void embed_forward_kernel(E *out, const int *tok, const E *wte, int C, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = wte[(long long)tok[i / C] * C + (int)(i % C)];
}

template <typename E>
cudaError_t td_k_embed_forward(cudaStream_t s, E *out, const int *tok, const E *wte, int N, int C) {
    const long long n = (long long)N * C;
    embed_forward_kernel<E><<<blocks_for(n, 256), 256, 0, s>>>(out, tok, wte, C, n);
    return cudaGetLastError();
}

/* one block row per distinct token; its rows (ascending) summed in order, then added */
template <typename E>
__global__ void embed_backward_kernel(float *dwte, const E *dout, const int *uniq, const int *off,
                                      const int *rows, int C) {
    const int u = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.f;
    for (int j = off[u]; j < off[u + 1]; j++) acc += to_f(dout[(long long)rows[j] * C + c]);
    dwte[(long long)uniq[u] * C + c] += acc;
}

template <typename E>
cudaError_t td_k_embed_backward(cudaStream_t s, float *dwte, const E *dout, const int *csr,
                                int n_uniq, int N, int C) {
    if (n_uniq <= 0) return cudaSuccess;
    dim3 grid((unsigned)n_uniq, blocks_for(C, 256));
    embed_backward_kernel<E><<<grid, 256, 0, s>>>(dwte, dout, csr, csr + N, csr + 2 * N + 1, C);
    return cudaGetLastError();
}

/* ---- RMSNorm: one warp per row --------------------------------------------------------------- */

template <typename E>
__global__ void rmsnorm_forward_kernel(E *out, float *rstd, const E *inp, const E *w, int N, int C,
                                       float eps) {
    const int row = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32);
    const int lane = threadIdx.x % 32;
    if (row >= N) return;
    const E *x = inp + (long long)row * C;
    float ss = 0.f;
    for (int c = lane; c < C; c += 32) {
        const float v = to_f(x[c]);
        ss += v * v;
    }
    const float r = 1.f / sqrtf(warp_sum(ss) / C + eps);
    E *o = out + (long long)row * C;
    for (int c = lane; c < C; c += 32) o[c] = from_f<E>((to_f(x[c]) * r) * to_f(w[c]));
    if (lane == 0) rstd[row] = r;
}

template <typename E>
cudaError_t td_k_rmsnorm_forward(cudaStream_t s, E *out, float *rstd, const E *inp, const E *w,
                                 int N, int C, float eps) {
    rmsnorm_forward_kernel<E><<<blocks_for((long long)N * 32, 256), 256, 0, s>>>(out, rstd, inp, w, N, C, eps);
    return cudaGetLastError();
}

template <typename E>
__global__ void rmsnorm_backward_input_kernel(E *dinp, const E *dout, const E *inp, const E *w,
                                              const float *rstd, int N, int C, int accumulate) {
    const int row = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32);
    const int lane = threadIdx.x % 32;
    if (row >= N) return;
    const E *d = dout + (long long)row * C, *x = inp + (long long)row * C;
    const float r = rstd[row];
    float dot = 0.f;
    for (int c = lane; c < C; c += 32) dot += to_f(w[c]) * to_f(d[c]) * (to_f(x[c]) * r);
    dot = warp_sum(dot) / C;
    E *di = dinp + (long long)row * C;
    for (int c = lane; c < C; c += 32) {
        const float g = r * (to_f(w[c]) * to_f(d[c]) - (to_f(x[c]) * r) * dot);
        di[c] = from_f<E>(accumulate ? to_f(di[c]) + g : g);
    }
}

template <typename E>
cudaError_t td_k_rmsnorm_backward_input(cudaStream_t s, E *dinp, const E *dout, const E *inp,
                                        const E *w, const float *rstd, int N, int C,
                                        int accumulate) {
    rmsnorm_backward_input_kernel<E><<<blocks_for((long long)N * 32, 256), 256, 0, s>>>(
        dinp, dout, inp, w, rstd, N, C, accumulate);
    return cudaGetLastError();
}

/* ---- RoPE: one thread per (row, head, pair) -------------------------------------------------- */

template <typename E>
__global__ void rope_kernel(E *x, int ld, const float *cos_t, const float *sin_t, int N, int T,
                            int nh, int HS, float sign) {
    const int half = HS / 2;
    const long long n = (long long)N * nh * half;
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int p = (int)(i % half);
    const long long rh = i / half;
    const int j = (int)(rh % nh);
    const long long row = rh / nh;
    const int t = (int)(row % T);
    const float c = cos_t[(long long)t * half + p], sn = sign * sin_t[(long long)t * half + p];
    E *v = x + row * ld + (long long)j * HS + p;
    const float x1 = to_f(v[0]), x2 = to_f(v[half]);
    v[0] = from_f<E>(x1 * c - x2 * sn);
    v[half] = from_f<E>(x2 * c + x1 * sn);
}

template <typename E>
cudaError_t td_k_rope(cudaStream_t s, E *x, int ld, const float *cos_t, const float *sin_t,
                      int N, int T, int nh, int HS, int sign) {
    const long long n = (long long)N * nh * (HS / 2);
    rope_kernel<E><<<blocks_for(n, 256), 256, 0, s>>>(x, ld, cos_t, sin_t, N, T, nh, HS, (float)sign);
    return cudaGetLastError();
}

/* ---- SwiGLU ---------------------------------------------------------------------------------- */

template <typename E>
__global__ void swiglu_forward_kernel(E *h, const E *gu, int F, long long n) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const long long row = i / F;
    const int c = (int)(i % F);
    const float g = to_f(gu[row * 2 * F + c]), u = to_f(gu[row * 2 * F + F + c]);
    h[i] = from_f<E>((g / (1.f + expf(-g))) * u);
}

template <typename E>
__global__ void swiglu_backward_kernel(E *dgu, const E *dh, const E *gu, int F, long long n) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const long long row = i / F;
    const int c = (int)(i % F);
    const float g = to_f(gu[row * 2 * F + c]), u = to_f(gu[row * 2 * F + F + c]);
    const float d = to_f(dh[i]), sig = 1.f / (1.f + expf(-g));
    dgu[row * 2 * F + c] = from_f<E>((sig * (1.f + g * (1.f - sig))) * u * d);
    dgu[row * 2 * F + F + c] = from_f<E>((g * sig) * d);
}

template <typename E>
cudaError_t td_k_swiglu_forward(cudaStream_t s, E *h, const E *gu, int N, int F) {
    const long long n = (long long)N * F;
    swiglu_forward_kernel<E><<<blocks_for(n, 256), 256, 0, s>>>(h, gu, F, n);
    return cudaGetLastError();
}

template <typename E>
cudaError_t td_k_swiglu_backward(cudaStream_t s, E *dgu, const E *dh, const E *gu, int N, int F) {
    const long long n = (long long)N * F;
    swiglu_backward_kernel<E><<<blocks_for(n, 256), 256, 0, s>>>(dgu, dh, gu, F, n);
    return cudaGetLastError();
}

/* ---- fused q | k | v rows <-> per-head blocks ------------------------------------------------ */

template <typename E>
__global__ void gqa_permute_kernel(E *qkvp, E *qkv, int B, int T, int NH, int NKV, int HS, int dir) {
    const int nt = NH + 2 * NKV, W = nt * HS;
    const long long n = (long long)B * T * W;
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; /* index into qkv */
    if (i >= n) return;
    const long long bt = i / W;
    const int r = (int)(i % W), j = r / HS, dd = r % HS;
    const int b = (int)(bt / T), t = (int)(bt % T);
    const long long BT = (long long)B * T, q_n = BT * NH * HS, kv_n = BT * NKV * HS;
    long long o;
    if (j < NH) o = (((long long)b * NH + j) * T + t) * HS + dd;
    else if (j < NH + NKV) o = q_n + (((long long)b * NKV + (j - NH)) * T + t) * HS + dd;
    else o = q_n + kv_n + (((long long)b * NKV + (j - NH - NKV)) * T + t) * HS + dd;
    if (dir == 0) qkvp[o] = qkv[i];
    else qkv[i] = qkvp[o];
}

template <typename E>
cudaError_t td_k_gqa_permute(cudaStream_t s, E *qkvp, E *qkv, int B, int T, int NH, int NKV,
                             int HS, int dir) {
    const long long n = (long long)B * T * (NH + 2 * NKV) * HS;
    gqa_permute_kernel<E><<<blocks_for(n, 256), 256, 0, s>>>(qkvp, qkv, B, T, NH, NKV, HS, dir);
    return cudaGetLastError();
}

/* ---- explicit instantiations ----------------------------------------------------------------- */

#define TD_INSTANTIATE(E)                                                                        \
    template cudaError_t td_k_embed_forward<E>(cudaStream_t, E *, const int *, const E *, int,   \
                                               int);                                             \
    template cudaError_t td_k_embed_backward<E>(cudaStream_t, float *, const E *, const int *,   \
                                                int, int, int);                                  \
    template cudaError_t td_k_rmsnorm_forward<E>(cudaStream_t, E *, float *, const E *,          \
                                                 const E *, int, int, float);                    \
    template cudaError_t td_k_rmsnorm_backward_input<E>(cudaStream_t, E *, const E *, const E *, \
                                                        const E *, const float *, int, int,      \
                                                        int);                                    \
    template cudaError_t td_k_rope<E>(cudaStream_t, E *, int, const float *, const float *, int, \
                                      int, int, int, int);                                       \
    template cudaError_t td_k_swiglu_forward<E>(cudaStream_t, E *, const E *, int, int);         \
    template cudaError_t td_k_swiglu_backward<E>(cudaStream_t, E *, const E *, const E *, int,   \
                                                 int);                                           \
    template cudaError_t td_k_gqa_permute<E>(cudaStream_t, E *, E *, int, int, int, int, int,    \
                                             int);

TD_INSTANTIATE(float)
TD_INSTANTIATE(bf16)
