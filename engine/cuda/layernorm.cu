/* layernorm.cu — LayerNorm forward and backward (kernels.c's td_layernorm_*), and the
 * deterministic column sums that give the LayerNorm weight and the bias gradients (fixed
 * partials of TD_CS_ROWS rows, then a fixed-order final sum). fp32 statistics whatever the
 * element type. Not here: the other ops (encoder.cu, gelu.cu, attention.cu, softmax_ce.cu).
 */
#include <math.h>

#include "common.cuh"
#include "vec.cuh"

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
template <typename E, int V, int KV, int R, bool RMS = false>
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
                    /* RMSNorm (RMS, mean 0): no mean of w * dout to take off */
                    const float gi = (wr[k][i] * dv[q][k].get(i) - (RMS ? 0.f : s1[q]) - xh * s2[q]) * rs[q];
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
template <typename E, int V, int KV, int R, bool RMS = false>
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
            e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, layernorm_backward_kernel<E, V, KV, R, RMS>, nt, 0);
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
    layernorm_backward_kernel<E, V, KV, R, RMS><<<(unsigned)nb, (unsigned)nt, 0, s>>>(
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

/* RMSNorm backward (engine/cuda/llama_*.cu) through the same one-pass kernel: xhat = x * rstd
 * (zeros: N floats of 0 as the mean), d/dx without the mean of w * dout, dw (+)= colsum(dout *
 * xhat). Very wide rows (more than 8192 columns) go to two passes, as for the LayerNorm. */
template <typename E>
cudaError_t td_k_rmsnorm_backward(cudaStream_t s, E *dinp, float *dw, float *part_w,
                                  float *part_b, const E *dout, const E *inp, const E *w,
                                  const float *zeros, const float *rstd, int N, int C,
                                  int accumulate, int acc) {
    cudaError_t e;
    int nb = 0;
    const bool vec = vec_ok(C, dinp, dout, inp, w);
    const int nch = vec ? C / 8 : C;
    if (vec && nch <= 512) e = ln_bwd_launch<E, 8, 1, 4, true>(s, dinp, part_w, part_b, NULL, dout, inp, w, zeros, rstd, N, C, accumulate, &nb);
    else if (vec && nch <= 1024) e = ln_bwd_launch<E, 8, 2, 2, true>(s, dinp, part_w, part_b, NULL, dout, inp, w, zeros, rstd, N, C, accumulate, &nb);
    else if (!vec && nch <= 256) e = ln_bwd_launch<E, 1, 1, 4, true>(s, dinp, part_w, part_b, NULL, dout, inp, w, zeros, rstd, N, C, accumulate, &nb);
    else if (!vec && nch <= 1024) e = ln_bwd_launch<E, 1, 4, 4, true>(s, dinp, part_w, part_b, NULL, dout, inp, w, zeros, rstd, N, C, accumulate, &nb);
    else {
        e = td_k_rmsnorm_backward_input<E>(s, dinp, dout, inp, w, rstd, N, C, accumulate);
        if (e == cudaSuccess) e = td_k_colsum<E>(s, dw, NULL, part_w, part_b, dout, inp, zeros, rstd, N, C, acc);
        return e;
    }
    if (e != cudaSuccess) return e;
    return colsum_final(s, dw, NULL, NULL, part_w, NULL, NULL, nb, C, acc);
}

/* ---- explicit instantiations ----------------------------------------------------------------- */

#define TD_INSTANTIATE(E)                                                                        \
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
                                                    const float *, int, int, int, int);   \
    template cudaError_t td_k_rmsnorm_backward<E>(cudaStream_t, E *, float *, float *, float *,   \
                                                  const E *, const E *, const E *, const float *, \
                                                  const float *, int, int, int, int);

TD_INSTANTIATE(float)
TD_INSTANTIATE(bf16)
