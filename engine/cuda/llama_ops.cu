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

/* the same with 8-element loads (C % 8 == 0, 16-byte aligned rows): lane l takes the chunks l,
 * l + 32, ... of its row */
template <typename E>
__global__ void rmsnorm_forward_vec_kernel(E *out, float *rstd, const E *inp, const E *w, int N,
                                           int C, float eps) {
    const int row = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32);
    const int lane = threadIdx.x % 32;
    if (row >= N) return;
    const E *x = inp + (long long)row * C;
    float ss = 0.f;
    for (int c = lane * 8; c < C; c += 256) {
        float v[8];
        ld8(v, x + c);
#pragma unroll
        for (int k = 0; k < 8; k++) ss += v[k] * v[k];
    }
    const float r = 1.f / sqrtf(warp_sum(ss) / C + eps);
    E *o = out + (long long)row * C;
    for (int c = lane * 8; c < C; c += 256) {
        float v[8], g[8];
        ld8(v, x + c);
        ld8(g, w + c);
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = (v[k] * r) * g[k];
        st8(o + c, v);
    }
    if (lane == 0) rstd[row] = r;
}

template <typename E>
cudaError_t td_k_rmsnorm_forward(cudaStream_t s, E *out, float *rstd, const E *inp, const E *w,
                                 int N, int C, float eps) {
    if (vec_ok(C, out, inp, w))
        rmsnorm_forward_vec_kernel<E><<<blocks_for((long long)N * 32, 256), 256, 0, s>>>(out, rstd, inp, w, N, C, eps);
    else
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

/* four pairs a thread (half % 4 == 0, ld % 8 == 0, 16-byte aligned x and tables): 8-byte (bf16)
 * or 16-byte (fp32) accesses and a 32-bit index; the same arithmetic per pair */
__device__ __forceinline__ void ld4(float (&v)[4], const bf16 *p) {
    const uint2 u = *reinterpret_cast<const uint2 *>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.y));
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}
__device__ __forceinline__ void ld4(float (&v)[4], const float *p) {
    const float4 a = *reinterpret_cast<const float4 *>(p);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
}
__device__ __forceinline__ void st4(bf16 *p, const float (&v)[4]) {
    __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]), b = __floats2bfloat162_rn(v[2], v[3]);
    uint2 u;
    u.x = *reinterpret_cast<uint32_t *>(&a);
    u.y = *reinterpret_cast<uint32_t *>(&b);
    *reinterpret_cast<uint2 *>(p) = u;
}
__device__ __forceinline__ void st4(float *p, const float (&v)[4]) {
    *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

template <typename E>
__global__ void rope_vec_kernel(E *x, int ld, const float *cos_t, const float *sin_t, int n4, int T,
                                int nh, int HS, float sign) {
    const int half = HS / 2, h4 = half / 4;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    const int p = (i % h4) * 4, rh = i / h4, j = rh % nh, row = rh / nh, t = row % T;
    float c[4], sn[4], x1[4], x2[4];
    ld4(c, cos_t + (long long)t * half + p);
    ld4(sn, sin_t + (long long)t * half + p);
    E *v = x + (long long)row * ld + (long long)j * HS + p;
    ld4(x1, v);
    ld4(x2, v + half);
    float o1[4], o2[4];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const float sk = sign * sn[k];
        o1[k] = x1[k] * c[k] - x2[k] * sk;
        o2[k] = x2[k] * c[k] + x1[k] * sk;
    }
    st4(v, o1);
    st4(v + half, o2);
}

template <typename E>
cudaError_t td_k_rope(cudaStream_t s, E *x, int ld, const float *cos_t, const float *sin_t,
                      int N, int T, int nh, int HS, int sign) {
    const long long n = (long long)N * nh * (HS / 2);
    if ((HS / 2) % 4 == 0 && ld % 8 == 0 && n / 4 <= 0x7fffffffLL && aligned16(x) &&
        aligned16(cos_t) && aligned16(sin_t)) {
        rope_vec_kernel<E><<<blocks_for(n / 4, 256), 256, 0, s>>>(x, ld, cos_t, sin_t, (int)(n / 4), T, nh,
                                                                  HS, (float)sign);
        return cudaGetLastError();
    }
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

/* eight elements a thread (F % 8 == 0, 16-byte aligned buffers), a 32-bit index: the same
 * arithmetic per element as the kernels above */
template <typename E>
__global__ void swiglu_forward_vec_kernel(E *h, const E *gu, int F8, int n8) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    const int row = i / F8, c = (i - row * F8) * 8;
    const long long F = (long long)F8 * 8, base = (long long)row * 2 * F + c;
    float g[8], u[8], o[8];
    ld8(g, gu + base);
    ld8(u, gu + base + F);
#pragma unroll
    for (int k = 0; k < 8; k++) o[k] = (g[k] / (1.f + expf(-g[k]))) * u[k];
    st8(h + (long long)row * F + c, o);
}

template <typename E>
__global__ void swiglu_backward_vec_kernel(E *dgu, const E *dh, const E *gu, int F8, int n8) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n8) return;
    const int row = i / F8, c = (i - row * F8) * 8;
    const long long F = (long long)F8 * 8, base = (long long)row * 2 * F + c;
    float g[8], u[8], d[8], dg[8], du[8];
    ld8(g, gu + base);
    ld8(u, gu + base + F);
    ld8(d, dh + (long long)row * F + c);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const float sig = 1.f / (1.f + expf(-g[k]));
        dg[k] = (sig * (1.f + g[k] * (1.f - sig))) * u[k] * d[k];
        du[k] = (g[k] * sig) * d[k];
    }
    st8(dgu + base, dg);
    st8(dgu + base + F, du);
}

template <typename E>
cudaError_t td_k_swiglu_forward(cudaStream_t s, E *h, const E *gu, int N, int F) {
    const long long n = (long long)N * F;
    if (vec_ok(F, h, gu) && n / 8 <= 0x7fffffffLL) {
        swiglu_forward_vec_kernel<E><<<blocks_for(n / 8, 256), 256, 0, s>>>(h, gu, F / 8, (int)(n / 8));
        return cudaGetLastError();
    }
    swiglu_forward_kernel<E><<<blocks_for(n, 256), 256, 0, s>>>(h, gu, F, n);
    return cudaGetLastError();
}

template <typename E>
cudaError_t td_k_swiglu_backward(cudaStream_t s, E *dgu, const E *dh, const E *gu, int N, int F) {
    const long long n = (long long)N * F;
    if (vec_ok(F, dgu, dh, gu) && n / 8 <= 0x7fffffffLL) {
        swiglu_backward_vec_kernel<E><<<blocks_for(n / 8, 256), 256, 0, s>>>(dgu, dh, gu, F / 8, (int)(n / 8));
        return cudaGetLastError();
    }
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
