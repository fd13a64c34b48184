/* flash_bench.cu — the flash attention kernels (flash_fwd.cu, flash_bwd.cu) on their own: correctness against an fp32
 * reference computed on the GPU from the same bf16 inputs (O, lse, dQ, dK, dV; relative L2;
 * outputs poisoned with NaN before every run; a bit-identical rerun), then the time of the
 * forward and of the backward, FlashAttention-2 (fa2::, the default path for head sizes <= 64)
 * against the first WMMA version (v1), at the GPT-2 shapes (T = 1024, head size 64).
 *
 * Empty unless TD_FLASH_BENCH_MAIN is defined (CMake globs engine/cuda/*.cu into libtandem).
 * Build and run on a GPU host (from the repository root):
 *   nvcc -O3 -std=c++17 -arch=sm_90 -DTD_FLASH_BENCH_MAIN -Iengine/include -Iengine/src \
 *        -Iengine/cuda engine/cuda/flash_bench.cu engine/cuda/flash_fwd.cu engine/cuda/flash_bwd.cu \
 *        -o build/flash_bench
 *   build/flash_bench [REPS]     # exit status 1 when a check fails; REPS 0: small checks only
 */
#ifdef TD_FLASH_BENCH_MAIN

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <random>
#include <vector>

#include "flash.cuh"

#define CK(x)                                                                                    \
    do {                                                                                         \
        cudaError_t e_ = (x);                                                                    \
        if (e_ != cudaSuccess) {                                                                 \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));   \
            exit(2);                                                                             \
        }                                                                                        \
    } while (0)

/* ---- fp32 reference (materialised, one thread per output) ---------------------------------- */

__global__ void ref_scores(float *S, const bf16 *Q, const bf16 *K, int BH, int T, int HS, float scale) {
    const long long n = (long long)BH * T * T;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n; x += (long long)gridDim.x * blockDim.x) {
        const int j = (int)(x % T), i = (int)((x / T) % T);
        const long long h = x / ((long long)T * T);
        if (j > i) { S[x] = -INFINITY; continue; }
        const bf16 *q = Q + (h * T + i) * HS, *k = K + (h * T + j) * HS;
        float s = 0.f;
        for (int d = 0; d < HS; d++) s += __bfloat162float(q[d]) * __bfloat162float(k[d]);
        S[x] = s * scale;
    }
}
__global__ void ref_softmax(float *P, float *lse, int BH, int T) { /* in place, one row a thread */
    const long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (r >= (long long)BH * T) return;
    float *p = P + r * T;
    const int i = (int)(r % T);
    float m = -INFINITY;
    for (int j = 0; j <= i; j++) m = fmaxf(m, p[j]);
    double s = 0.0;
    for (int j = 0; j <= i; j++) s += exp((double)p[j] - m);
    const float ls = m + (float)log(s);
    lse[r] = ls;
    for (int j = 0; j < T; j++) p[j] = j <= i ? (float)exp((double)p[j] - ls) : 0.f;
}
/* Out[h, i, d] = sum_j A[h, i, j] * B[h, j, d] (A (T, T) fp32, transposed when tA) * mul */
__global__ void ref_ab(float *Out, const float *A, const bf16 *B, int BH, int T, int HS, int tA, float mul) {
    const long long n = (long long)BH * T * HS;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n; x += (long long)gridDim.x * blockDim.x) {
        const int d = (int)(x % HS), i = (int)((x / HS) % T);
        const long long h = x / ((long long)T * HS);
        const float *a = A + h * T * T;
        const bf16 *b = B + h * T * HS;
        float s = 0.f;
        for (int j = 0; j < T; j++) s += (tA ? a[(long long)j * T + i] : a[(long long)i * T + j]) * __bfloat162float(b[(long long)j * HS + d]);
        Out[x] = s * mul;
    }
}
template <typename OT>
__global__ void rowdot(float *D, const bf16 *dO, const OT *O, long long rows, int HS) {
    const long long r = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float s = 0.f;
    for (int d = 0; d < HS; d++) s += __bfloat162float(dO[r * HS + d]) * (float)O[r * HS + d];
    D[r] = s;
}
/* dS[h, i, j] = P (dO_i . V_j - D_i) */
__global__ void ref_ds(float *dS, const float *P, const bf16 *dO, const bf16 *V, const float *D, int BH, int T, int HS) {
    const long long n = (long long)BH * T * T;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n; x += (long long)gridDim.x * blockDim.x) {
        const int j = (int)(x % T), i = (int)((x / T) % T);
        const long long h = x / ((long long)T * T);
        if (j > i) { dS[x] = 0.f; continue; }
        const bf16 *o = dO + (h * T + i) * HS, *v = V + (h * T + j) * HS;
        float s = 0.f;
        for (int d = 0; d < HS; d++) s += __bfloat162float(o[d]) * __bfloat162float(v[d]);
        dS[x] = P[x] * (s - D[h * T + i]);
    }
}

/* ---- helpers ------------------------------------------------------------------------------ */

static std::mt19937_64 rng(12345);
static bf16 *rand_bf16(long long n, float sd) {
    std::vector<bf16> h(n);
    std::normal_distribution<float> nd(0.f, sd);
    for (long long i = 0; i < n; i++) h[i] = __float2bfloat16_rn(nd(rng));
    bf16 *d;
    CK(cudaMalloc(&d, n * 2));
    CK(cudaMemcpy(d, h.data(), n * 2, cudaMemcpyHostToDevice));
    return d;
}
static std::vector<double> host_f(const void *d, long long n, int is_bf16) {
    std::vector<double> out(n);
    if (is_bf16) {
        std::vector<bf16> h(n);
        CK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
        for (long long i = 0; i < n; i++) out[i] = __bfloat162float(h[i]);
    } else {
        std::vector<float> h(n);
        CK(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost));
        for (long long i = 0; i < n; i++) out[i] = h[i];
    }
    return out;
}
static double rel_l2(const std::vector<double> &a, const std::vector<double> &r) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        if (!std::isfinite(a[i])) return INFINITY;
        num += (a[i] - r[i]) * (a[i] - r[i]);
        den += r[i] * r[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

typedef cudaError_t (*fwd_fn)(cudaStream_t, bf16 *, float *, const bf16 *, const bf16 *, const bf16 *, int, int, int, float);
typedef cudaError_t (*bwd_fn)(cudaStream_t, bf16 *, bf16 *, bf16 *, const bf16 *, const bf16 *, const bf16 *, const bf16 *, const float *, const float *, int, int, int, float);

struct Bufs {
    bf16 *q, *k, *v, *dO, *O, *dq, *dk, *dv;
    float *lse, *D;
};
static Bufs alloc_bufs(int BH, int T, int HS) {
    const long long n = (long long)BH * T * HS;
    Bufs b;
    b.q = rand_bf16(n, 1.5f);
    b.k = rand_bf16(n, 1.5f);
    b.v = rand_bf16(n, 1.f);
    b.dO = rand_bf16(n, 1.f);
    CK(cudaMalloc(&b.O, n * 2));
    CK(cudaMalloc(&b.dq, n * 2));
    CK(cudaMalloc(&b.dk, n * 2));
    CK(cudaMalloc(&b.dv, n * 2));
    CK(cudaMalloc(&b.lse, (long long)BH * T * 4));
    CK(cudaMalloc(&b.D, (long long)BH * T * 4));
    return b;
}
static void free_bufs(Bufs &b) {
    void *p[] = {b.q, b.k, b.v, b.dO, b.O, b.dq, b.dk, b.dv, b.lse, b.D};
    for (void *x : p) cudaFree(x);
}
static void run_impl(fwd_fn f, bwd_fn g, Bufs &b, int BH, int T, int HS, float scale) {
    const long long n = (long long)BH * T * HS;
    CK(cudaMemset(b.O, 0xff, n * 2)); /* NaN poison */
    CK(cudaMemset(b.dq, 0xff, n * 2));
    CK(cudaMemset(b.dk, 0xff, n * 2));
    CK(cudaMemset(b.dv, 0xff, n * 2));
    CK(cudaMemset(b.lse, 0xff, (long long)BH * T * 4));
    CK(f(0, b.O, b.lse, b.q, b.k, b.v, BH, T, HS, scale));
    rowdot<bf16><<<(unsigned)((BH * (long long)T + 255) / 256), 256>>>(b.D, b.dO, b.O, (long long)BH * T, HS);
    CK(cudaGetLastError());
    CK(g(0, b.dq, b.dk, b.dv, b.q, b.k, b.v, b.dO, b.lse, b.D, BH, T, HS, scale));
    CK(cudaDeviceSynchronize());
}

static int n_fail = 0;

static void check(int BH, int T, int HS) {
    const float scale = 1.f / sqrtf((float)HS);
    const long long n = (long long)BH * T * HS, tt = (long long)BH * T * T;
    Bufs b = alloc_bufs(BH, T, HS);
    float *P, *dS, *O, *lse, *D, *g;
    CK(cudaMalloc(&P, tt * 4));
    CK(cudaMalloc(&dS, tt * 4));
    CK(cudaMalloc(&O, n * 4));
    CK(cudaMalloc(&g, n * 4));
    CK(cudaMalloc(&lse, (long long)BH * T * 4));
    CK(cudaMalloc(&D, (long long)BH * T * 4));
    const unsigned gb = 2048, tb = 256;
    ref_scores<<<gb, tb>>>(P, b.q, b.k, BH, T, HS, scale);
    ref_softmax<<<(unsigned)((BH * (long long)T + 127) / 128), 128>>>(P, lse, BH, T);
    ref_ab<<<gb, tb>>>(O, P, b.v, BH, T, HS, 0, 1.f);
    rowdot<float><<<(unsigned)((BH * (long long)T + 255) / 256), 256>>>(D, b.dO, O, (long long)BH * T, HS);
    ref_ds<<<gb, tb>>>(dS, P, b.dO, b.v, D, BH, T, HS);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    std::vector<double> rO = host_f(O, n, 0), rL = host_f(lse, (long long)BH * T, 0);
    ref_ab<<<gb, tb>>>(g, P, b.dO, BH, T, HS, 1, 1.f);  /* dV = P^T dO */
    CK(cudaDeviceSynchronize());
    std::vector<double> rdv = host_f(g, n, 0);
    ref_ab<<<gb, tb>>>(g, dS, b.k, BH, T, HS, 0, scale); /* dQ = dS K * scale */
    CK(cudaDeviceSynchronize());
    std::vector<double> rdq = host_f(g, n, 0);
    ref_ab<<<gb, tb>>>(g, dS, b.q, BH, T, HS, 1, scale); /* dK = dS^T Q * scale */
    CK(cudaDeviceSynchronize());
    std::vector<double> rdk = host_f(g, n, 0);

    const char *names[2] = {"fa2(default)", "v1"};
    fwd_fn fs[2] = {td_k_flash_forward, td_k_flash_forward_v1};
    bwd_fn gs[2] = {td_k_flash_backward, td_k_flash_backward_v1};
    for (int which = 0; which < 2; which++) {
        run_impl(fs[which], gs[which], b, BH, T, HS, scale);
        const double eO = rel_l2(host_f(b.O, n, 1), rO), eL = rel_l2(host_f(b.lse, (long long)BH * T, 0), rL);
        const double eq = rel_l2(host_f(b.dq, n, 1), rdq), ek = rel_l2(host_f(b.dk, n, 1), rdk),
                     ev = rel_l2(host_f(b.dv, n, 1), rdv);
        int same = -1;
        if (which == 0) { /* rerun: bit-identical */
            std::vector<double> a1 = host_f(b.dq, n, 1), a2 = host_f(b.dk, n, 1), a3 = host_f(b.dv, n, 1), a4 = host_f(b.O, n, 1);
            run_impl(fs[which], gs[which], b, BH, T, HS, scale);
            same = a1 == host_f(b.dq, n, 1) && a2 == host_f(b.dk, n, 1) && a3 == host_f(b.dv, n, 1) && a4 == host_f(b.O, n, 1);
        }
        int warps_same = -1; /* every warps-per-block setting: bit-identical to this one */
        if (which == 0 && td_flash_fa2(HS)) {
            const td_flash_warps keep = td_flash_get_warps();
            const std::vector<double> a1 = host_f(b.dq, n, 1), a2 = host_f(b.dk, n, 1), a3 = host_f(b.dv, n, 1),
                                      a4 = host_f(b.O, n, 1), a5 = host_f(b.lse, (long long)BH * T, 0);
            warps_same = 1;
            for (int f = 4; f <= 8; f += 4)
                for (int kv = 4; kv <= 8; kv += 4)
                    for (int q = 4; q <= 8; q += 4) {
                        CK(td_flash_set_warps(td_flash_warps{f, kv, q}));
                        run_impl(fs[which], gs[which], b, BH, T, HS, scale);
                        const bool eq_ = a1 == host_f(b.dq, n, 1) && a2 == host_f(b.dk, n, 1) &&
                                         a3 == host_f(b.dv, n, 1) && a4 == host_f(b.O, n, 1) &&
                                         a5 == host_f(b.lse, (long long)BH * T, 0);
                        if (!eq_) {
                            printf("  warps fwd %d kv %d q %d: NOT bit-identical to the default\n", f, kv, q);
                            warps_same = 0;
                        }
                    }
            CK(td_flash_set_warps(keep));
        }
        const double worst = std::max({eO, eL, eq, ek, ev});
        const bool ok = worst <= 1e-2 && same != 0 && warps_same != 0;
        if (!ok) n_fail++;
        printf("check BH=%d T=%d HS=%d %-13s rel L2: O %.2e lse %.2e dQ %.2e dK %.2e dV %.2e rerun-identical %s "
               "warps-identical %s  %s\n",
               BH, T, HS, names[which], eO, eL, eq, ek, ev, same < 0 ? "-" : same ? "yes" : "NO",
               warps_same < 0 ? "-" : warps_same ? "yes" : "NO", ok ? "ok" : "FAIL");
    }
    cudaFree(P); cudaFree(dS); cudaFree(O); cudaFree(g); cudaFree(lse); cudaFree(D);
    free_bufs(b);
}

static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

/* median forward and backward times (ms) of (f, g) over reps runs, after a warm-up one */
static void time_pair(fwd_fn f, bwd_fn g, Bufs &b, int BH, int T, int HS, float scale, int reps,
                      float *fwd_ms, float *bwd_ms) {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    run_impl(f, g, b, BH, T, HS, scale); /* warm-up (+ attribute setting) */
    std::vector<float> tf, tb;
    for (int r = 0; r < reps; r++) {
        float ms;
        CK(cudaEventRecord(e0));
        CK(f(0, b.O, b.lse, b.q, b.k, b.v, BH, T, HS, scale));
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&ms, e0, e1));
        tf.push_back(ms);
        CK(cudaEventRecord(e0));
        CK(g(0, b.dq, b.dk, b.dv, b.q, b.k, b.v, b.dO, b.lse, b.D, BH, T, HS, scale));
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&ms, e0, e1));
        tb.push_back(ms);
    }
    *fwd_ms = median(tf);
    *bwd_ms = median(tb);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
}

/* the FlashAttention-2 kernels at each warps-per-block setting: forward at 4 and 8 warps, the
 * backward's dK/dV and dQ kernels at each pair (the defaults restored afterwards) */
static void timing_warps(const char *label, int BH, int T, int HS, int reps) {
    const float scale = 1.f / sqrtf((float)HS);
    Bufs b = alloc_bufs(BH, T, HS);
    const double fwd_flop = 4.0 * BH * HS * (double)T * (T + 1) / 2;
    const td_flash_warps keep = td_flash_get_warps();
    for (int f = 4; f <= 8; f += 4)
        for (int kv = 4; kv <= 8; kv += 4)
            for (int q = 4; q <= 8; q += 4) {
                CK(td_flash_set_warps(td_flash_warps{f, kv, q}));
                float mf, mb;
                time_pair(td_k_flash_forward, td_k_flash_backward, b, BH, T, HS, scale, reps, &mf, &mb);
                printf("WARPS | %s | BH=%d T=%d HS=%d | fwd %d kv %d q %d | fwd %.3f ms (%.0f TFLOP/s) | bwd %.3f ms (%.0f TFLOP/s at 2.5x fwd) |%s\n",
                       label, BH, T, HS, f, kv, q, mf, fwd_flop / mf / 1e9, mb, 2.5 * fwd_flop / mb / 1e9,
                       f == keep.fwd && kv == keep.kv && q == keep.q ? " default" : "");
            }
    CK(td_flash_set_warps(keep));
    free_bufs(b);
}

static void timing(const char *label, int BH, int T, int HS, int reps) {
    const float scale = 1.f / sqrtf((float)HS);
    Bufs b = alloc_bufs(BH, T, HS);
    const double fwd_flop = 4.0 * BH * HS * (double)T * (T + 1) / 2; /* causal, 2 products */
    const char *names[2] = {"fa2", "v1"};
    fwd_fn fs[2] = {td_k_flash_forward, td_k_flash_forward_v1};
    bwd_fn gs[2] = {td_k_flash_backward, td_k_flash_backward_v1};
    float res[2][2];
    for (int which = 0; which < 2; which++) {
        time_pair(fs[which], gs[which], b, BH, T, HS, scale, reps, &res[which][0], &res[which][1]);
        printf("time %-5s BH=%d T=%d HS=%d %-4s fwd %.3f ms (%.0f TFLOP/s)  bwd %.3f ms (%.0f TFLOP/s at 2.5x fwd, "
               "%.0f at the 3.5x it computes)\n",
               label, BH, T, HS, names[which], res[which][0], fwd_flop / res[which][0] / 1e9, res[which][1],
               2.5 * fwd_flop / res[which][1] / 1e9, 3.5 * fwd_flop / res[which][1] / 1e9);
    }
    printf("TABLE | %s | BH=%d T=%d HS=%d | fwd %.3f -> %.3f ms (%.1fx) | bwd %.3f -> %.3f ms (%.1fx) |\n", label, BH, T, HS,
           res[1][0], res[0][0], res[1][0] / res[0][0], res[1][1], res[0][1], res[1][1] / res[0][1]);
    free_bufs(b);
}

int main(int argc, char **argv) {
    cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    printf("device: %s, %d SMs\n", p.name, p.multiProcessorCount);
    const int reps = argc > 1 ? atoi(argv[1]) : 20; /* 0: the small checks only (for the sanitizers) */
    if (reps > 0) check(4, 1024, 64);
    check(6, 200, 64);
    check(8, 64, 32);
    check(3, 1, 64);
    check(5, 77, 16);
    check(3, 130, 48);
    check(2, 300, 128); /* v1 on both sides (head size > 64) */
    printf("%d check(s) failed\n", n_fail);
    if (reps <= 0) return n_fail ? 1 : 0;
    timing("124M", 16 * 12, 1024, 64, reps);
    timing("350M", 16 * 16, 1024, 64, reps);
    timing("1.5B", 8 * 25, 1024, 64, reps);
    /* the warps-per-block settings at GPT-2 124M's and the llama-gpu suite's attention shapes
     * (one query head per kv head here: grouped heads change which kv rows a block reads, not
     * the work per block) */
    timing_warps("gpt2-124m", 16 * 12, 1024, 64, reps);
    timing_warps("llama-125m", 8 * 12, 2048, 64, reps);
    timing_warps("llama-1b", 4 * 32, 2048, 64, reps);
    timing_warps("llama-3b", 2 * 48, 2048, 64, reps);
    return n_fail ? 1 : 0;
}

#endif /* TD_FLASH_BENCH_MAIN */
