/* softmax_ce.cu — softmax + cross-entropy over the vocabulary, forward (losses and the
 * log-sum-exp per row) and backward (kernels.c's td_softmax_crossentropy_*); fp32
 * statistics, combined in a fixed order. Not here: the LM head's product (matmul.cu).
 */
#include <math.h>

#include "common.cuh"
#include "vec.cuh"

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

/* ---- explicit instantiations ----------------------------------------------------------------- */

#define TD_INSTANTIATE(E)                                                                        \
    template cudaError_t td_k_crossentropy_forward<E>(cudaStream_t, float *, float *, const E *, \
                                                      const int *, int, int, int);               \
    template cudaError_t td_k_crossentropy_backward<E>(cudaStream_t, E *, const float *,         \
                                                       const int *, float, int, int, int);

TD_INSTANTIATE(float)
TD_INSTANTIATE(bf16)
