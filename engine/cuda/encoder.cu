/* encoder.cu — token + position embedding, forward and backward (engine/src/kernels.c's
 * td_encoder_forward / _backward). Deterministic: repeated tokens are summed in order from a
 * host-built index, no atomics. Not here: the other ops (layernorm.cu, gelu.cu, attention.cu,
 * softmax_ce.cu, optim.cu), matrix products (matmul.cu).
 */
#include <math.h>

#include "common.cuh"
#include "vec.cuh"

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

/* ---- explicit instantiations ----------------------------------------------------------------- */

#define TD_INSTANTIATE(E)                                                                        \
    template cudaError_t td_k_encoder_forward<E>(cudaStream_t, E *, const int *, const E *,      \
                                                 const E *, int, int, int);                      \
    template cudaError_t td_k_encoder_backward<E>(cudaStream_t, float *, float *, const E *,     \
                                                  const int *, int, int, int, int, int);

TD_INSTANTIATE(float)
TD_INSTANTIATE(bf16)
