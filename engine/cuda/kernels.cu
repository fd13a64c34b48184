/* kernels.cu — the GPU kernels of the GPT-2 ops that are not matrix products, forward and
 * backward, each the same maths as its CPU reference in engine/src/kernels.c (same names
 * without the td_k_ prefix). Arithmetic is fp32 whatever the element type E; reductions run in a
 * fixed order, so results are bit-identical run to run (no float atomics anywhere).
 * Not here: matrix products (matmul.cu), the order of the passes (backend.cu).
 */
#include <math.h>

#include "common.cuh"

#define GELU_SCALE 0.7978845608028654f /* sqrt(2 / pi) */

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

/* ---- encoder --------------------------------------------------------------------------------- */

template <typename E>
__global__ void encoder_forward_kernel(E *out, const int *tok, const E *wte, const E *wpe, int T,
                                       int C, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long bt = i / C;
    int c = (int)(i % C), t = (int)(bt % T);
    out[i] = from_f<E>(to_f(wte[(long long)tok[bt] * C + c]) + to_f(wpe[(long long)t * C + c]));
}

template <typename E>
cudaError_t td_k_encoder_forward(cudaStream_t s, E *out, const int *tok, const E *wte,
                                 const E *wpe, int B, int T, int C) {
    long long n = (long long)B * T * C;
    encoder_forward_kernel<E><<<blocks_for(n, 256), 256, 0, s>>>(out, tok, wte, wpe, T, C, n);
    return cudaGetLastError();
}

/* dwte: one block row per distinct token; its rows (ascending) are summed in order, so repeated
 * tokens need no atomics. csr = uniq (BT) | off (BT+1) | rows (BT), built on the host. */
template <typename E>
__global__ void encoder_backward_wte_kernel(float *dwte, const E *dout, const int *uniq,
                                            const int *off, const int *rows, int C) {
    int u = blockIdx.x;
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.f;
    for (int j = off[u]; j < off[u + 1]; j++) acc += to_f(dout[(long long)rows[j] * C + c]);
    dwte[(long long)uniq[u] * C + c] += acc;
}

template <typename E>
__global__ void encoder_backward_wpe_kernel(float *dwpe, const E *dout, int B, long long TC,
                                            int accumulate) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= TC) return;
    float acc = 0.f;
    for (int b = 0; b < B; b++) acc += to_f(dout[(long long)b * TC + i]);
    dwpe[i] = accumulate ? dwpe[i] + acc : acc;
}

template <typename E>
cudaError_t td_k_encoder_backward(cudaStream_t s, float *dwte, float *dwpe, const E *dout,
                                  const int *csr, int n_uniq, int B, int T, int C, int acc_wpe) {
    const int BT = B * T;
    if (n_uniq > 0) {
        dim3 grid((unsigned)n_uniq, blocks_for(C, 256));
        encoder_backward_wte_kernel<E><<<grid, 256, 0, s>>>(dwte, dout, csr, csr + BT,
                                                            csr + 2 * BT + 1, C);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
    }
    long long TC = (long long)T * C;
    encoder_backward_wpe_kernel<E><<<blocks_for(TC, 256), 256, 0, s>>>(dwpe, dout, B, TC, acc_wpe);
    return cudaGetLastError();
}

/* ---- LayerNorm: one warp per row ------------------------------------------------------------- */

template <typename E>
__global__ void layernorm_forward_kernel(E *out, float *mean, float *rstd, const E *inp,
                                         const E *w, const E *b, int N, int C) {
    int row = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32);
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const E *x = inp + (long long)row * C;
    float s = 0.f;
    for (int c = lane; c < C; c += 32) s += to_f(x[c]);
    const float m = warp_sum(s) / C;
    float v = 0.f;
    for (int c = lane; c < C; c += 32) {
        float dx = to_f(x[c]) - m;
        v += dx * dx;
    }
    v = warp_sum(v) / C;
    const float r = 1.f / sqrtf(v + 1e-5f);
    E *o = out + (long long)row * C;
    for (int c = lane; c < C; c += 32) o[c] = from_f<E>(((to_f(x[c]) - m) * r) * to_f(w[c]) + to_f(b[c]));
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

/* the same with the row in registers: lane j holds columns 8 (j + 32 k) .. + 8, k < K */
template <typename E, int K>
__global__ void layernorm_forward_vec_kernel(E *out, float *mean, float *rstd, const E *inp,
                                             const E *w, const E *b, int N, int C) {
    const int row = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32);
    const int lane = threadIdx.x % 32, nv = C / 8;
    if (row >= N) return;
    const E *x = inp + (long long)row * C;
    float v[K][8];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int j = lane + 32 * k;
        if (j < nv) {
            ld8(v[k], x + 8 * j);
#pragma unroll
            for (int i = 0; i < 8; i++) s += v[k][i];
        }
    }
    const float m = warp_sum(s) / C;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < K; k++)
        if (lane + 32 * k < nv)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float dx = v[k][i] - m;
                q += dx * dx;
            }
    const float r = 1.f / sqrtf(warp_sum(q) / C + 1e-5f);
    E *o = out + (long long)row * C;
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int j = lane + 32 * k;
        if (j < nv) {
            float wv[8], bv[8], y[8];
            ld8(wv, w + 8 * j);
            ld8(bv, b + 8 * j);
#pragma unroll
            for (int i = 0; i < 8; i++) y[i] = ((v[k][i] - m) * r) * wv[i] + bv[i];
            st8(o + 8 * j, y);
        }
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

template <typename E>
cudaError_t td_k_layernorm_forward(cudaStream_t s, E *out, float *mean, float *rstd,
                                   const E *inp, const E *w, const E *b, int N, int C) {
    const unsigned nb = blocks_for((long long)N * 32, 256);
    if (vec_ok(C, out, inp, w, b) && C <= 256 * 8) {
        const int K = (C / 8 + 31) / 32;
        if (K <= 1) layernorm_forward_vec_kernel<E, 1><<<nb, 256, 0, s>>>(out, mean, rstd, inp, w, b, N, C);
        else if (K <= 2) layernorm_forward_vec_kernel<E, 2><<<nb, 256, 0, s>>>(out, mean, rstd, inp, w, b, N, C);
        else if (K <= 4) layernorm_forward_vec_kernel<E, 4><<<nb, 256, 0, s>>>(out, mean, rstd, inp, w, b, N, C);
        else layernorm_forward_vec_kernel<E, 8><<<nb, 256, 0, s>>>(out, mean, rstd, inp, w, b, N, C);
        return cudaGetLastError();
    }
    layernorm_forward_kernel<E><<<blocks_for((long long)N * 32, 256), 256, 0, s>>>(out, mean, rstd, inp, w, b, N, C);
    return cudaGetLastError();
}

template <typename E>
__global__ void layernorm_backward_input_kernel(E *dinp, const E *dout, const E *inp, const E *w,
                                                const float *mean, const float *rstd, int N,
                                                int C, int accumulate) {
    int row = (int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32);
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const E *d = dout + (long long)row * C;
    const E *x = inp + (long long)row * C;
    const float m = mean[row], r = rstd[row];
    float s1 = 0.f, s2 = 0.f;
    for (int c = lane; c < C; c += 32) {
        float xhat = (to_f(x[c]) - m) * r;
        float dn = to_f(w[c]) * to_f(d[c]);
        s1 += dn;
        s2 += dn * xhat;
    }
    s1 = warp_sum(s1) / C;
    s2 = warp_sum(s2) / C;
    E *di = dinp + (long long)row * C;
    for (int c = lane; c < C; c += 32) {
        float xhat = (to_f(x[c]) - m) * r;
        float dn = to_f(w[c]) * to_f(d[c]);
        float g = (dn - s1 - xhat * s2) * r;
        di[c] = from_f<E>(accumulate ? to_f(di[c]) + g : g);
    }
}

template <typename E>
cudaError_t td_k_layernorm_backward_input(cudaStream_t s, E *dinp, const E *dout, const E *inp,
                                          const E *w, const float *mean, const float *rstd,
                                          int N, int C, int accumulate) {
    layernorm_backward_input_kernel<E><<<blocks_for((long long)N * 32, 256), 256, 0, s>>>(
        dinp, dout, inp, w, mean, rstd, N, C, accumulate);
    return cudaGetLastError();
}

/* ---- deterministic column sums (bias and LayerNorm weight gradients) -------------------------- */

template <typename E>
__global__ void colsum_partial_kernel(float *pw, float *pb, const E *dout, const E *inp,
                                      const float *mean, const float *rstd, int N, int C) {
    __shared__ float sw[8][33], sb[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * 32 + tx, chunk = blockIdx.y;
    const int r0 = chunk * TD_CS_ROWS, r1 = min(N, r0 + TD_CS_ROWS);
    float aw = 0.f, ab = 0.f;
    if (col < C) {
        for (int r = r0 + ty; r < r1; r += 8) {
            float dv = to_f(dout[(long long)r * C + col]);
            ab += dv;
            if (inp) aw += dv * ((to_f(inp[(long long)r * C + col]) - mean[r]) * rstd[r]);
        }
    }
    sw[ty][tx] = aw;
    sb[ty][tx] = ab;
    __syncthreads();
    if (ty == 0 && col < C) {
        float tw = 0.f, tb = 0.f;
        for (int k = 0; k < 8; k++) {
            tw += sw[k][tx];
            tb += sb[k][tx];
        }
        pb[(long long)chunk * C + col] = tb;
        if (pw) pw[(long long)chunk * C + col] = tw;
    }
}

/* out[col] (+)= sum over chunks of part[chunk, col], for up to three (out, part) pairs (an out
 * that is NULL is skipped): 32 threads per column take every 32nd chunk (their loads in flight
 * together), then one adds the 32 sums in order. Fixed order for a given shape. acc = 0
 * overwrites out (a gradient's first contribution after a lazy zero_grad). */
#define CSF_T 32
__global__ void colsum_final_kernel(float *o0, float *o1, float *o2, const float *p0,
                                    const float *p1, const float *p2, int nchunks, int C,
                                    int acc) {
    __shared__ float sh[3][CSF_T][33];
    const int tx = threadIdx.x, ty = threadIdx.y, col = blockIdx.x * 32 + tx;
    float t0 = 0.f, t1 = 0.f, t2 = 0.f;
    if (col < C)
        for (int k = ty; k < nchunks; k += CSF_T) {
            if (o0) t0 += p0[(long long)k * C + col];
            if (o1) t1 += p1[(long long)k * C + col];
            if (o2) t2 += p2[(long long)k * C + col];
        }
    sh[0][ty][tx] = t0;
    sh[1][ty][tx] = t1;
    sh[2][ty][tx] = t2;
    __syncthreads();
    if (ty == 0 && col < C) {
        float a = 0.f, b = 0.f, c = 0.f;
        for (int k = 0; k < CSF_T; k++) {
            a += sh[0][k][tx];
            b += sh[1][k][tx];
            c += sh[2][k][tx];
        }
        if (o0) o0[col] = acc ? o0[col] + a : a;
        if (o1) o1[col] = acc ? o1[col] + b : b;
        if (o2) o2[col] = acc ? o2[col] + c : c;
    }
}
static cudaError_t colsum_final(cudaStream_t s, float *o0, float *o1, float *o2, const float *p0,
                                const float *p1, const float *p2, int nchunks, int C, int acc) {
    if (!o0 && !o1 && !o2) return cudaSuccess;
    colsum_final_kernel<<<blocks_for(C, 32), dim3(32, CSF_T), 0, s>>>(o0, o1, o2, p0, p1, p2,
                                                                     nchunks, C, acc);
    return cudaGetLastError();
}

/* bias partials only (colsum_partial_kernel without inp), 8 columns per thread by 16-byte loads:
 * block (32, 8) covers 256 columns; thread (tx, ty) sums rows ty, ty + 8, ... of its chunk, four
 * loads in flight, then column c's 8 sums are added in ty order. */
template <typename E>
__global__ void colsum_bias_vec_kernel(float *pb, const E *dout, int N, int C) {
    __shared__ float sb[8][256];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col0 = (blockIdx.x * 32 + tx) * 8, chunk = blockIdx.y;
    const int r0 = chunk * TD_CS_ROWS, r1 = min(N, r0 + TD_CS_ROWS);
    float ab[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (col0 < C) {
        int r = r0 + ty;
        for (; r + 24 < r1; r += 32) {
            float a[4][8];
#pragma unroll
            for (int u = 0; u < 4; u++) ld8(a[u], dout + (long long)(r + 8 * u) * C + col0);
#pragma unroll
            for (int u = 0; u < 4; u++)
#pragma unroll
                for (int i = 0; i < 8; i++) ab[i] += a[u][i];
        }
        for (; r < r1; r += 8) {
            float a[8];
            ld8(a, dout + (long long)r * C + col0);
#pragma unroll
            for (int i = 0; i < 8; i++) ab[i] += a[i];
        }
    }
#pragma unroll
    for (int i = 0; i < 8; i++) sb[ty][tx * 8 + i] = ab[i];
    __syncthreads();
    const int id = ty * 32 + tx, col = blockIdx.x * 256 + id;
    if (col < C) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; k++) t += sb[k][id];
        pb[(long long)chunk * C + col] = t;
    }
}

template <typename E>
cudaError_t td_k_colsum(cudaStream_t s, float *dw, float *db, float *part_w, float *part_b,
                        const E *dout, const E *inp, const float *mean, const float *rstd, int N,
                        int C, int acc) {
    const int nchunks = (N + TD_CS_ROWS - 1) / TD_CS_ROWS;
    if (!dw && vec_ok(C, dout)) {
        colsum_bias_vec_kernel<E><<<dim3(blocks_for(C, 256), (unsigned)nchunks), dim3(32, 8), 0, s>>>(part_b, dout, N, C);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
        return colsum_final(s, db, NULL, NULL, part_b, NULL, NULL, nchunks, C, acc);
    }
    dim3 grid(blocks_for(C, 32), (unsigned)nchunks), block(32, 8);
    colsum_partial_kernel<E><<<grid, block, 0, s>>>(dw ? part_w : NULL, part_b, dout, dw ? inp : NULL,
                                                    mean, rstd, N, C);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    return colsum_final(s, dw, db, NULL, part_w, part_b, NULL, nchunks, C, acc);
}

/* ---- LayerNorm backward ---------------------------------------------------------------------- */

/* V consecutive elements of E as loaded (V = 8: one 16-byte access for bf16, two for fp32; V = 1:
 * one element), read back as fp32. Loads stay packed until used, so the values held across the
 * LayerNorm backward's barrier cost a bf16 row half the registers of its fp32 values. */
template <typename E, int V>
struct Pack {
    E e[V];
    __device__ __forceinline__ void load(const E *p) {
#pragma unroll
        for (int i = 0; i < V; i++) e[i] = p[i];
    }
    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < V; i++) e[i] = from_f<E>(0.f);
    }
    __device__ __forceinline__ float get(int i) const { return to_f(e[i]); }
};
template <>
struct Pack<bf16, 8> {
    uint4 u;
    __device__ __forceinline__ void load(const bf16 *p) { u = *reinterpret_cast<const uint4 *>(p); }
    __device__ __forceinline__ void zero() { u = make_uint4(0u, 0u, 0u, 0u); }
    __device__ __forceinline__ float get(int i) const { /* i is a constant once unrolled */
        const uint32_t w = (i >> 1) == 0 ? u.x : (i >> 1) == 1 ? u.y : (i >> 1) == 2 ? u.z : u.w;
        return __uint_as_float((i & 1) ? (w & 0xffff0000u) : (w << 16));
    }
};
template <>
struct Pack<float, 8> {
    float4 a, b;
    __device__ __forceinline__ void load(const float *p) {
        a = reinterpret_cast<const float4 *>(p)[0];
        b = reinterpret_cast<const float4 *>(p)[1];
    }
    __device__ __forceinline__ void zero() { a = b = make_float4(0.f, 0.f, 0.f, 0.f); }
    __device__ __forceinline__ float get(int i) const {
        const float4 &h = i < 4 ? a : b;
        const int j = i & 3;
        return j == 0 ? h.x : j == 1 ? h.y : j == 2 ? h.z : h.w;
    }
};
template <int V> __device__ __forceinline__ void stv(bf16 *p, const float (&x)[V]);
template <int V> __device__ __forceinline__ void stv(float *p, const float (&x)[V]);
template <> __device__ __forceinline__ void stv<8>(bf16 *p, const float (&x)[8]) { st8(p, x); }
template <> __device__ __forceinline__ void stv<8>(float *p, const float (&x)[8]) { st8(p, x); }
template <> __device__ __forceinline__ void stv<1>(bf16 *p, const float (&x)[1]) { *p = from_f<bf16>(x[0]); }
template <> __device__ __forceinline__ void stv<1>(float *p, const float (&x)[1]) { *p = x[0]; }

/* LayerNorm backward over a block of `rows` rows, R rows at a time: dinp (+)= d/dx, and per block
 * the partial column sums of dout * xhat (pw), dout (pb) and, when po is given, of the dinp
 * written (po: the bias gradient of the product that reads this residual gradient, folded in
 * here instead of a separate pass). The block's threads split the row's columns: thread t owns
 * the chunks of V columns t, t + NT, ... (KV of them), so each column's partials live in one
 * thread's registers and are written once per block, no shared-memory reduction; the row sums
 * (s1, s2) are reduced across the block's warps through shared memory, one barrier per R rows
 * (the buffer alternates). Every load of the R rows (dout, inp and the dinp being accumulated
 * into) is issued before the first use and before any store, so a batch costs one trip to
 * memory; dout and inp are read again after the barrier, from L1, rather than held in
 * registers (occupancy). Rows past N count as zeros. Partials are summed in a fixed order by
 * colsum_final: bit-identical run to run. */
template <typename E, int V, int KV, int R>
__global__ void layernorm_backward_kernel(E *__restrict__ dinp, float *__restrict__ pw,
                                          float *__restrict__ pb, float *__restrict__ po,
                                          const E *__restrict__ dout, const E *__restrict__ inp,
                                          const E *__restrict__ w, const float *__restrict__ mean,
                                          const float *__restrict__ rstd, int N, int C,
                                          int accumulate, int rows) {
    __shared__ float red[2][R][2][32]; /* [buffer][row][s1, s2][warp] */
    const int nt = blockDim.x, nw = nt / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nch = C / V;
    float wr[KV][V], aw[KV][V], ab[KV][V], ao[KV][V];
#pragma unroll
    for (int k = 0; k < KV; k++) {
        const int j = threadIdx.x + nt * k;
#pragma unroll
        for (int i = 0; i < V; i++) {
            wr[k][i] = j < nch ? to_f(w[j * V + i]) : 0.f;
            aw[k][i] = ab[k][i] = ao[k][i] = 0.f;
        }
    }
    const int r0 = blockIdx.x * rows, r1 = min(N, r0 + rows);
    int buf = 0;
    for (int rb = r0; rb < r1; rb += R, buf ^= 1) {
        Pack<E, V> dv[R][KV], xv[R][KV], old[R][KV];
        float m[R], rs[R], s1[R], s2[R];
#pragma unroll
        for (int q = 0; q < R; q++) {
            const int row = rb + q;
            const bool ok = row < r1;
            m[q] = ok ? mean[row] : 0.f;
            rs[q] = ok ? rstd[row] : 0.f;
#pragma unroll
            for (int k = 0; k < KV; k++) {
                const int j = threadIdx.x + nt * k;
                const long long at = (long long)row * C + j * V;
                if (ok && j < nch) {
                    dv[q][k].load(dout + at);
                    xv[q][k].load(inp + at);
                    if (accumulate) old[q][k].load(dinp + at);
                    else old[q][k].zero();
                } else {
                    dv[q][k].zero();
                    xv[q][k].zero();
                    old[q][k].zero();
                }
            }
        }
#pragma unroll
        for (int q = 0; q < R; q++) {
            float a1 = 0.f, a2 = 0.f;
#pragma unroll
            for (int k = 0; k < KV; k++)
#pragma unroll
                for (int i = 0; i < V; i++) {
                    const float d = dv[q][k].get(i), xh = (xv[q][k].get(i) - m[q]) * rs[q];
                    const float dn = wr[k][i] * d;
                    a1 += dn;
                    a2 += dn * xh;
                    aw[k][i] += d * xh;
                    ab[k][i] += d;
                }
            a1 = warp_sum(a1);
            a2 = warp_sum(a2);
            if (lane == 0) red[buf][q][0][warp] = a1, red[buf][q][1][warp] = a2;
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < R; q++) {
            float t1 = 0.f, t2 = 0.f;
            for (int u = 0; u < nw; u++) t1 += red[buf][q][0][u], t2 += red[buf][q][1][u];
            s1[q] = t1 / C;
            s2[q] = t2 / C;
        }
#pragma unroll
        for (int q = 0; q < R; q++) { /* again, from L1: what the first pass loaded */
            const int row = rb + q;
#pragma unroll
            for (int k = 0; k < KV; k++) {
                const int j = threadIdx.x + nt * k;
                if (row < r1 && j < nch) {
                    dv[q][k].load(dout + (long long)row * C + j * V);
                    xv[q][k].load(inp + (long long)row * C + j * V);
                }
            }
        }
#pragma unroll
        for (int q = 0; q < R; q++) {
            const int row = rb + q;
            if (row >= r1) break;
#pragma unroll
            for (int k = 0; k < KV; k++) {
                const int j = threadIdx.x + nt * k;
                if (j >= nch) continue;
                float g[V];
#pragma unroll
                for (int i = 0; i < V; i++) {
                    const float xh = (xv[q][k].get(i) - m[q]) * rs[q];
                    const float gi = (wr[k][i] * dv[q][k].get(i) - s1[q] - xh * s2[q]) * rs[q];
                    g[i] = old[q][k].get(i) + gi; /* old is 0 unless accumulating */
                    ao[k][i] += to_f(from_f<E>(g[i])); /* the value stored, as a reader sees it */
                }
                stv<V>(dinp + (long long)row * C + j * V, g);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < KV; k++) {
        const int j = threadIdx.x + nt * k;
        if (j >= nch) continue;
        const long long at = (long long)blockIdx.x * C + j * V;
        stv<V>(pw + at, aw[k]);
        stv<V>(pb + at, ab[k]);
        if (po) stv<V>(po + at, ao[k]);
    }
}

/* Threads per block for nch chunks split KV per thread, and the rows per block: one wave of
 * resident blocks (occupancy asked once per instantiation and block size), each over an equal
 * share of the rows, at least TD_LNB_ROWS_MIN (so that nb never exceeds the partial buffers). */
template <typename E, int V, int KV, int R>
static cudaError_t ln_bwd_launch(cudaStream_t s, E *dinp, float *part_w, float *part_b,
                                 float *part_o, const E *dout, const E *inp, const E *w,
                                 const float *mean, const float *rstd, int N, int C,
                                 int accumulate, int *nb_out) {
    const int nch = C / V, nt = (((nch + KV - 1) / KV) + 31) / 32 * 32;
    /* (nt, device, resident blocks) of the last launch, in one word: read and written whole */
    static unsigned long long cached = 0;
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    const unsigned long long tag = ((unsigned long long)nt << 48) | ((unsigned long long)(dev & 0xffff) << 32);
    unsigned long long c = cached;
    if ((c & ~0xffffffffull) != tag) {
        int sms = 0, per_sm = 0;
        e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        if (e == cudaSuccess)
            e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, layernorm_backward_kernel<E, V, KV, R>, nt, 0);
        if (e != cudaSuccess) return e;
        const long long w = (long long)(per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
        c = tag | (unsigned long long)(w & 0xffffffffll);
        cached = c;
    }
    const long long wave = (long long)(c & 0xffffffffull);
    int rows = (int)((N + wave - 1) / wave);
    rows = (rows + R - 1) / R * R;
    if (rows < TD_LNB_ROWS_MIN) rows = TD_LNB_ROWS_MIN;
    const int nb = (N + rows - 1) / rows;
    *nb_out = nb;
    layernorm_backward_kernel<E, V, KV, R><<<(unsigned)nb, (unsigned)nt, 0, s>>>(
        dinp, part_w, part_b, part_o, dout, inp, w, mean, rstd, N, C, accumulate, rows);
    return cudaGetLastError();
}

template <typename E>
cudaError_t td_k_layernorm_backward(cudaStream_t s, E *dinp, float *dw, float *db, float *dbias,
                                    float *part_w, float *part_b, float *part_o, const E *dout,
                                    const E *inp, const E *w, const float *mean,
                                    const float *rstd, int N, int C, int accumulate, int acc) {
    cudaError_t e;
    int nb = 0;
    const bool vec = vec_ok(C, dinp, dout, inp, w);
    const int nch = vec ? C / 8 : C;
    float *po = dbias ? part_o : NULL;
    /* GPT-2's widths (768 .. 1600) take one 16-byte chunk per thread, 96 .. 224 threads */
    if (vec && nch <= 512) e = ln_bwd_launch<E, 8, 1, 4>(s, dinp, part_w, part_b, po, dout, inp, w, mean, rstd, N, C, accumulate, &nb);
    else if (vec && nch <= 1024) e = ln_bwd_launch<E, 8, 2, 2>(s, dinp, part_w, part_b, po, dout, inp, w, mean, rstd, N, C, accumulate, &nb);
    else if (!vec && nch <= 256) e = ln_bwd_launch<E, 1, 1, 4>(s, dinp, part_w, part_b, po, dout, inp, w, mean, rstd, N, C, accumulate, &nb);
    else if (!vec && nch <= 1024) e = ln_bwd_launch<E, 1, 4, 4>(s, dinp, part_w, part_b, po, dout, inp, w, mean, rstd, N, C, accumulate, &nb);
    else { /* very wide rows: the input gradient, then the column sums, in separate passes */
        e = td_k_layernorm_backward_input<E>(s, dinp, dout, inp, w, mean, rstd, N, C, accumulate);
        if (e == cudaSuccess) e = td_k_colsum<E>(s, dw, db, part_w, part_b, dout, inp, mean, rstd, N, C, acc);
        if (e == cudaSuccess && dbias) e = td_k_colsum<E>(s, NULL, dbias, NULL, part_o, dinp, NULL, NULL, NULL, N, C, acc);
        return e;
    }
    if (e != cudaSuccess) return e;
    return colsum_final(s, dw, db, dbias, part_w, part_b, po, nb, C, acc);
}

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

/* ---- softmax + cross-entropy over the vocabulary: one block per row, fp32 statistics ---------- */

#define CE_THREADS 256
#define CE_LOG2E 1.4426950408889634f

/* (max, sum) pairs of two partial softmax denominators, combined */
__device__ __forceinline__ void lse_merge(float &mx, float &s, float mo, float so) {
    const float mn = fmaxf(mx, mo);
    const float a = mx == -INFINITY ? 0.f : s * expf(mx - mn);
    const float b = mo == -INFINITY ? 0.f : so * expf(mo - mn);
    mx = mn;
    s = a + b;
}

/* one row's (max, sum) pairs combined, first within each warp, then across warps in a fixed
 * order; thread 0 writes the log-sum-exp and the loss */
template <typename E>
__device__ __forceinline__ void ce_row_finish(float mx, float s, float *losses, float *lse,
                                              const E *l, const int *targets, int row) {
    __shared__ float sm[CE_THREADS / 32], ss[CE_THREADS / 32];
    for (int o = 16; o > 0; o >>= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, mx, o), so = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(mx, s, mo, so);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        sm[warp] = mx;
        ss[warp] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = -INFINITY, S = 0.f;
        for (int w = 0; w < (int)(blockDim.x / 32); w++) lse_merge(M, S, sm[w], ss[w]);
        const float z = M + logf(S);
        lse[row] = z;
        losses[row] = z - to_f(l[targets[row]]);
    }
}

template <typename E>
__global__ void crossentropy_forward_kernel(float *losses, float *lse, const E *logits,
                                            const int *targets, int V, int ld) {
    const int row = blockIdx.x;
    const E *l = logits + (long long)row * ld;
    float mx = -INFINITY, s = 0.f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float x = to_f(l[v]);
        if (x > mx) {
            s = s * expf(mx - x) + 1.f;
            mx = x;
        } else {
            s += expf(x - mx);
        }
    }
    ce_row_finish<E>(mx, s, losses, lse, l, targets, row);
}

/* rows are ld apart; the padding columns [V, ld) become 0 (the head's products run over ld) */
template <typename E>
__global__ void crossentropy_backward_kernel(E *dlogits, const float *lse, const int *targets,
                                             float dloss, int V, int ld) {
    const int row = blockIdx.x;
    E *d = dlogits + (long long)row * ld;
    const float z = lse[row];
    const int y = targets[row];
    for (int v = threadIdx.x; v < ld; v += blockDim.x) {
        if (v >= V) {
            d[v] = from_f<E>(0.f);
            continue;
        }
        float p = expf(to_f(d[v]) - z);
        d[v] = from_f<E>((p - (v == y ? 1.f : 0.f)) * dloss);
    }
}


/* the same 8 columns at a time (16-byte loads; ld % 8 == 0, so a vector that starts before V ends
 * inside the row): each thread rescales its running sum once per vector, not once per element */
template <typename E>
__global__ void crossentropy_forward_vec_kernel(float *losses, float *lse, const E *logits,
                                                const int *targets, int V, int ld) {
    const int row = blockIdx.x;
    const E *l = logits + (long long)row * ld;
    float mx = -INFINITY, s = 0.f;
    for (int v0 = threadIdx.x * 8; v0 < V; v0 += blockDim.x * 8) {
        float x[8];
        ld8(x, l + v0);
        float m8 = -INFINITY;
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (v0 + i < V) m8 = fmaxf(m8, x[i]);
        if (m8 > mx) {
            s = mx == -INFINITY ? 0.f : s * exp2f((mx - m8) * CE_LOG2E);
            mx = m8;
        }
        const float mxl = mx * CE_LOG2E; /* exp(x - mx) = 2^(x log2 e - mx log2 e): one FMA + ex2 */
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (v0 + i < V) s += exp2f(fmaf(x[i], CE_LOG2E, -mxl));
    }
    ce_row_finish<E>(mx, s, losses, lse, l, targets, row);
}

template <typename E>
__global__ void crossentropy_backward_vec_kernel(E *dlogits, const float *lse, const int *targets,
                                                 float dloss, int V, int ld) {
    const int row = blockIdx.x;
    E *d = dlogits + (long long)row * ld;
    const float zl = lse[row] * CE_LOG2E;
    const int y = targets[row];
    for (int v0 = threadIdx.x * 8; v0 < ld; v0 += blockDim.x * 8) {
        float x[8];
        ld8(x, d + v0);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int v = v0 + i;
            x[i] = v >= V ? 0.f : (exp2f(fmaf(x[i], CE_LOG2E, -zl)) - (v == y ? 1.f : 0.f)) * dloss;
        }
        st8(d + v0, x);
    }
}

template <typename E>
cudaError_t td_k_crossentropy_forward(cudaStream_t s, float *losses, float *lse, const E *logits,
                                      const int *targets, int N, int V, int ld) {
    if (vec_ok(ld, logits)) {
        crossentropy_forward_vec_kernel<E><<<(unsigned)N, CE_THREADS, 0, s>>>(losses, lse, logits, targets, V, ld);
        return cudaGetLastError();
    }
    crossentropy_forward_kernel<E><<<(unsigned)N, CE_THREADS, 0, s>>>(losses, lse, logits, targets, V, ld);
    return cudaGetLastError();
}
template <typename E>
cudaError_t td_k_crossentropy_backward(cudaStream_t s, E *dlogits, const float *lse,
                                       const int *targets, float dloss, int N, int V, int ld) {
    if (vec_ok(ld, dlogits)) {
        crossentropy_backward_vec_kernel<E><<<(unsigned)N, CE_THREADS, 0, s>>>(dlogits, lse, targets, dloss, V, ld);
        return cudaGetLastError();
    }
    crossentropy_backward_kernel<E><<<(unsigned)N, CE_THREADS, 0, s>>>(dlogits, lse, targets, dloss, V, ld);
    return cudaGetLastError();
}

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

/* ---- explicit instantiations ----------------------------------------------------------------- */

#define TD_INSTANTIATE(E)                                                                        \
    template cudaError_t td_k_encoder_forward<E>(cudaStream_t, E *, const int *, const E *,      \
                                                 const E *, int, int, int);                      \
    template cudaError_t td_k_encoder_backward<E>(cudaStream_t, float *, float *, const E *,     \
                                                  const int *, int, int, int, int, int);         \
    template cudaError_t td_k_layernorm_forward<E>(cudaStream_t, E *, float *, float *,          \
                                                   const E *, const E *, const E *, int, int);   \
    template cudaError_t td_k_layernorm_backward_input<E>(cudaStream_t, E *, const E *,          \
                                                          const E *, const E *, const float *,   \
                                                          const float *, int, int, int);         \
    template cudaError_t td_k_colsum<E>(cudaStream_t, float *, float *, float *, float *,        \
                                        const E *, const E *, const float *, const float *, int, \
                                        int, int);                                               \
    template cudaError_t td_k_layernorm_backward<E>(cudaStream_t, E *, float *, float *, float *, \
                                                    float *, float *, float *, const E *,         \
                                                    const E *, const E *, const float *,          \
                                                    const float *, int, int, int, int);           \
    template cudaError_t td_k_gelu_forward<E>(cudaStream_t, E *, const E *, long long);          \
    template cudaError_t td_k_gelu_backward_inplace<E>(cudaStream_t, E *, const E *, long long); \
    template cudaError_t td_k_bias_add<E>(cudaStream_t, E *, const E *, int, int, int);          \
    template cudaError_t td_k_qkv_permute<E>(cudaStream_t, E *, const E *, int, int, int, int);  \
    template cudaError_t td_k_qkv_unpermute<E>(cudaStream_t, E *, const E *, int, int, int,      \
                                               int);                                             \
    template cudaError_t td_k_head_permute<E>(cudaStream_t, E *, const E *, int, int, int, int); \
    template cudaError_t td_k_head_unpermute<E>(cudaStream_t, E *, const E *, int, int, int,     \
                                                int);                                            \
    template cudaError_t td_k_attn_softmax_forward<E>(cudaStream_t, E *, const E *, long long,   \
                                                      int, float);                               \
    template cudaError_t td_k_attn_softmax_backward<E>(cudaStream_t, E *, const E *, long long,  \
                                                       int, float);                              \
    template cudaError_t td_k_crossentropy_forward<E>(cudaStream_t, float *, float *, const E *, \
                                                      const int *, int, int, int);               \
    template cudaError_t td_k_crossentropy_backward<E>(cudaStream_t, E *, const float *,         \
                                                       const int *, float, int, int, int);

TD_INSTANTIATE(float)
TD_INSTANTIATE(bf16)
