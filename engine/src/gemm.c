/* gemm.c — the GEMM every linear layer and the LM head go through.
 *
 * td_gemm computes C (+)= op(A) @ op(B) with a packed, cache-blocked algorithm (the BLIS loop
 * nest): each thread owns a rectangle of C, cuts K into KC-deep slices walked in order, packs
 * its op(B) block into KC x NR micro-panels and op(A) into MR x KC micro-panels, and a
 * register-blocked micro-kernel (AVX-512 12x32, AVX2 6x16, or portable C) accumulates one
 * MR x NR tile. Threads share nothing, so a call has one fork/join and no barrier (barriers are
 * what collapse on a shared machine). Every element of C is summed over k in the same order
 * whatever the thread count: results are bit-identical run to run and across thread counts. The float64 build and tiny problems use td_gemm_reference (kernels.c),
 * which the C and Python tests hold this kernel to.
 */
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "gemm.h"

#ifndef TD_FLOAT64
#include <stdatomic.h>

static int in_parallel(void) {
#ifdef _OPENMP
    return omp_in_parallel();
#else
    return 0;
#endif
}
#endif

#ifdef TD_FLOAT64

void td_gemm(td_real *C, const td_real *A, const td_real *B, int M, int N, int K, int transA,
             int transB, int accumulate) {
    td_gemm_reference(C, A, B, M, N, K, transA, transB, accumulate);
}

#else

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TD_X86 1
#endif

#define KC 256
#define NC 3072
#define MR_MAX 12
#define NR_MAX 32

typedef void (*microkernel_fn)(int kc, const float *Ap, const float *Bp, float *C, int ldc,
                               int overwrite);

/* ---- micro-kernels: C[MR x NR] (=|+=) Ap[kc x MR]^T-panel @ Bp[kc x NR]-panel ---------------- */

static void kernel_c_4x16(int kc, const float *Ap, const float *Bp, float *C, int ldc,
                          int overwrite) {
    float acc[4][16] = {{0}};
    for (int k = 0; k < kc; k++) {
        const float *a = Ap + k * 4, *b = Bp + k * 16;
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 16; j++) acc[i][j] += a[i] * b[j];
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 16; j++)
            C[i * ldc + j] = overwrite ? acc[i][j] : C[i * ldc + j] + acc[i][j];
}

#ifdef TD_X86
__attribute__((target("avx512f"))) static void kernel_avx512_12x32(int kc, const float *Ap,
                                                                    const float *Bp, float *C,
                                                                    int ldc, int overwrite) {
    __m512 c[12][2];
    for (int i = 0; i < 12; i++) c[i][0] = c[i][1] = _mm512_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m512 b0 = _mm512_loadu_ps(Bp + k * 32), b1 = _mm512_loadu_ps(Bp + k * 32 + 16);
        const float *a = Ap + k * 12;
        for (int i = 0; i < 12; i++) {
            __m512 ai = _mm512_set1_ps(a[i]);
            c[i][0] = _mm512_fmadd_ps(ai, b0, c[i][0]);
            c[i][1] = _mm512_fmadd_ps(ai, b1, c[i][1]);
        }
    }
    for (int i = 0; i < 12; i++) {
        float *ci = C + (size_t)i * ldc;
        if (!overwrite) {
            c[i][0] = _mm512_add_ps(c[i][0], _mm512_loadu_ps(ci));
            c[i][1] = _mm512_add_ps(c[i][1], _mm512_loadu_ps(ci + 16));
        }
        _mm512_storeu_ps(ci, c[i][0]);
        _mm512_storeu_ps(ci + 16, c[i][1]);
    }
}

__attribute__((target("avx2,fma"))) static void kernel_avx2_6x16(int kc, const float *Ap,
                                                                  const float *Bp, float *C,
                                                                  int ldc, int overwrite) {
    __m256 c[6][2];
    for (int i = 0; i < 6; i++) c[i][0] = c[i][1] = _mm256_setzero_ps();
    for (int k = 0; k < kc; k++) {
        __m256 b0 = _mm256_loadu_ps(Bp + k * 16), b1 = _mm256_loadu_ps(Bp + k * 16 + 8);
        const float *a = Ap + k * 6;
        for (int i = 0; i < 6; i++) {
            __m256 ai = _mm256_broadcast_ss(a + i);
            c[i][0] = _mm256_fmadd_ps(ai, b0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(ai, b1, c[i][1]);
        }
    }
    for (int i = 0; i < 6; i++) {
        float *ci = C + (size_t)i * ldc;
        if (!overwrite) {
            c[i][0] = _mm256_add_ps(c[i][0], _mm256_loadu_ps(ci));
            c[i][1] = _mm256_add_ps(c[i][1], _mm256_loadu_ps(ci + 8));
        }
        _mm256_storeu_ps(ci, c[i][0]);
        _mm256_storeu_ps(ci + 8, c[i][1]);
    }
}
#endif

typedef struct {
    int mr, nr;
    microkernel_fn fn;
    const char *name;
} kernel_desc;

static kernel_desc pick_kernel(void) {
    kernel_desc k = {4, 16, kernel_c_4x16, "c-4x16"};
#ifdef TD_X86
    const char *force = getenv("TANDEM_GEMM_KERNEL"); /* "avx512", "avx2", "c": for tests */
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f"), avx2 = __builtin_cpu_supports("avx2") &&
                                                            __builtin_cpu_supports("fma");
    if (force && !strcmp(force, "c")) return k;
    if (avx512 && !(force && !strcmp(force, "avx2")))
        return (kernel_desc){12, 32, kernel_avx512_12x32, "avx512-12x32"};
    if (avx2) return (kernel_desc){6, 16, kernel_avx2_6x16, "avx2-6x16"};
#endif
    return k;
}

const char *td_gemm_kernel_name(void) { return pick_kernel().name; }

/* ---- packing ------------------------------------------------------------------------------ */

/* Ap: ceil(m / MR) panels, each kc x MR (k-major), zero-padded past m. */
static void pack_A(float *Ap, const float *A, int M, int K, int transA, int i0, int m, int p0,
                   int kc, int MR) {
    int panels = (m + MR - 1) / MR;
    for (int p = 0; p < panels; p++) {
        float *dst = Ap + (size_t)p * kc * MR;
        const int rows = m - p * MR < MR ? m - p * MR : MR;
        if (transA) { /* A stored K x M: a panel's rows are contiguous for each k */
            for (int k = 0; k < kc; k++) {
                const float *src = A + (size_t)(p0 + k) * M + i0 + p * MR;
                for (int ii = 0; ii < rows; ii++) dst[k * MR + ii] = src[ii];
                for (int ii = rows; ii < MR; ii++) dst[k * MR + ii] = 0.0f;
            }
        } else {
            for (int ii = 0; ii < MR; ii++) {
                if (ii >= rows) {
                    for (int k = 0; k < kc; k++) dst[k * MR + ii] = 0.0f;
                    continue;
                }
                const float *src = A + (size_t)(i0 + p * MR + ii) * K + p0;
                for (int k = 0; k < kc; k++) dst[k * MR + ii] = src[k];
            }
        }
    }
}

/* Bp: ceil(n / NR) panels, each kc x NR (k-major), zero-padded past n. */
static void pack_B(float *Bp, const float *B, int N, int K, int transB, int j0, int n, int p0,
                   int kc, int NR) {
    int panels = (n + NR - 1) / NR;
    for (int p = 0; p < panels; p++) {
        float *dst = Bp + (size_t)p * kc * NR;
        int jn = n - p * NR < NR ? n - p * NR : NR;
        if (!transB) {
            for (int k = 0; k < kc; k++) {
                const float *src = B + (size_t)(p0 + k) * N + j0 + p * NR;
                memcpy(dst + k * NR, src, sizeof(float) * (size_t)jn);
                for (int jj = jn; jj < NR; jj++) dst[k * NR + jj] = 0.0f;
            }
        } else {
            for (int jj = 0; jj < NR; jj++) {
                if (jj >= jn) {
                    for (int k = 0; k < kc; k++) dst[k * NR + jj] = 0.0f;
                    continue;
                }
                const float *src = B + (size_t)(j0 + p * NR + jj) * K + p0;
                for (int k = 0; k < kc; k++) dst[k * NR + jj] = src[k];
            }
        }
    }
}

/* Per thread (OpenMP keeps its pool threads, so these persist): grown on demand and kept, so a
 * steady-state step allocates nothing. */
static _Thread_local float *tl_Ap, *tl_Bp;
static _Thread_local size_t tl_Ap_cap, tl_Bp_cap;

static float *grow(float **buf, size_t *cap, size_t n) {
    if (n > *cap) {
        free(*buf);
        *buf = aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
        *cap = *buf ? n : 0;
    }
    return *buf;
}

#define MC 192

/* One thread's rectangle of C: rows [m0, m1), columns [n0, n1) (panel-aligned). It packs its
 * own blocks of op(A) and op(B), so threads share nothing and never wait for each other. */
static int gemm_block(const kernel_desc *kd, float *C, const float *A, const float *B, int M,
                      int N, int K, int transA, int transB, int accumulate, int m0, int m1,
                      int n0, int n1) {
    const int MR = kd->mr, NR = kd->nr;
    float *Ap = grow(&tl_Ap, &tl_Ap_cap, (size_t)MC * KC);
    float *Bp = grow(&tl_Bp, &tl_Bp_cap, (size_t)NC * KC);
    if (!Ap || !Bp) return 0;
    float tile[MR_MAX * NR_MAX];
    for (int j0 = n0; j0 < n1; j0 += NC) {
        const int n = n1 - j0 < NC ? n1 - j0 : NC;
        const int npanels = (n + NR - 1) / NR;
        for (int p0 = 0; p0 < K; p0 += KC) {
            const int kc = K - p0 < KC ? K - p0 : KC;
            const int overwrite = p0 == 0 && !accumulate;
            pack_B(Bp, B, N, K, transB, j0, n, p0, kc, NR);
            for (int i0 = m0; i0 < m1; i0 += MC) {
                const int m = m1 - i0 < MC ? m1 - i0 : MC;
                const int mpanels = (m + MR - 1) / MR;
                pack_A(Ap, A, M, K, transA, i0, m, p0, kc, MR);
                for (int jp = 0; jp < npanels; jp++) {
                    const int j = j0 + jp * NR, nn = N - j < NR ? N - j : NR;
                    const float *b = Bp + (size_t)jp * kc * NR;
                    for (int ip = 0; ip < mpanels; ip++) {
                        const int i = i0 + ip * MR, mm = M - i < MR ? M - i : MR;
                        const float *a = Ap + (size_t)ip * kc * MR;
                        float *c = C + (size_t)i * N + j;
                        if (mm == MR && nn == NR) {
                            kd->fn(kc, a, b, c, N, overwrite);
                        } else { /* edge tile: compute in full, write back the valid part */
                            kd->fn(kc, a, b, tile, NR, 1);
                            for (int ii = 0; ii < mm; ii++)
                                for (int jj = 0; jj < nn; jj++) {
                                    float *dst = c + (size_t)ii * N + jj;
                                    *dst = overwrite ? tile[ii * NR + jj] : *dst + tile[ii * NR + jj];
                                }
                        }
                    }
                }
            }
        }
    }
    return 1;
}

void td_gemm(float *C, const float *A, const float *B, int M, int N, int K, int transA,
             int transB, int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate)
            for (int i = 0; i < M; i++) memset(C + (size_t)i * N, 0, sizeof(float) * (size_t)N);
        return;
    }
    /* chosen once (the CPU does not change under us), thread-safely: attention calls td_gemm
     * from inside its own parallel loop, so the first calls may race here */
    static kernel_desc kd_once;
    static _Atomic int kd_ready = 0;
    if (!atomic_load_explicit(&kd_ready, memory_order_acquire)) {
#pragma omp critical(td_gemm_pick_kernel)
        if (!atomic_load_explicit(&kd_ready, memory_order_relaxed)) {
            kd_once = pick_kernel();
            atomic_store_explicit(&kd_ready, 1, memory_order_release);
        }
    }
    const kernel_desc kd = kd_once;
    /* small problems: packing costs more than it saves */
    if ((double)M * N * K < 4096.0 * 16) {
        td_gemm_reference(C, A, B, M, N, K, transA, transB, accumulate);
        return;
    }
    const int MR = kd.mr, NR = kd.nr;
    const int mpanels = (M + MR - 1) / MR, npanels = (N + NR - 1) / NR;
    int failed = 0;
    /* one thread below ~1M multiply-adds (tens of microseconds on one core): waking the pool
     * would cost as much; every thread count gives the same bits, so this changes none. One
     * thread too when called from inside an active parallel region (attention's loop over
     * heads): the caller's threads are the parallelism, and nesting would oversubscribe. */
#pragma omp parallel reduction(| : failed) if ((double)M * N * K >= 1048576.0 && !in_parallel())
    {
        int nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        t = omp_get_thread_num();
#endif
        /* Split C along N when op(A) is the smaller operand (each thread re-packs all of it),
         * else along M; panel-aligned contiguous ranges, the same every call. */
        int m0 = 0, m1 = M, n0 = 0, n1 = N;
        if ((M <= N && npanels >= nt) || mpanels < nt) {
            n0 = (int)((int64_t)npanels * t / nt) * NR;
            n1 = (int)((int64_t)npanels * (t + 1) / nt) * NR;
            if (n1 > N) n1 = N;
        } else {
            m0 = (int)((int64_t)mpanels * t / nt) * MR;
            m1 = (int)((int64_t)mpanels * (t + 1) / nt) * MR;
            if (m1 > M) m1 = M;
        }
        if (m0 < m1 && n0 < n1)
            failed = !gemm_block(&kd, C, A, B, M, N, K, transA, transB, accumulate, m0, m1, n0, n1);
    }
    if (failed) /* out of memory for packing buffers: the reference needs none */
        td_gemm_reference(C, A, B, M, N, K, transA, transB, accumulate);
}

#endif /* TD_FLOAT64 */
