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
#define NR_MAX 48

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
#define TD_AVX512_ROW(i, r0, r1)                                                                   \
    do {                                                                                           \
        const __m512 ai = _mm512_set1_ps(a[i]);                                                    \
        r0 = _mm512_fmadd_ps(ai, b0, r0);                                                          \
        r1 = _mm512_fmadd_ps(ai, b1, r1);                                                          \
    } while (0)
#define TD_AVX512_STORE(i, r0, r1)                                                                 \
    do {                                                                                           \
        float *ci = C + (size_t)(i) * ldc;                                                         \
        if (!overwrite) {                                                                          \
            r0 = _mm512_add_ps(r0, _mm512_loadu_ps(ci));                                           \
            r1 = _mm512_add_ps(r1, _mm512_loadu_ps(ci + 16));                                      \
        }                                                                                          \
        _mm512_storeu_ps(ci, r0);                                                                  \
        _mm512_storeu_ps(ci + 16, r1);                                                             \
    } while (0)

/* 24 accumulators as named variables (see the AVX2 kernel below for why not an array). */
__attribute__((target("avx512f"))) static void kernel_avx512_12x32(int kc, const float *Ap,
                                                                    const float *Bp, float *C,
                                                                    int ldc, int overwrite) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00,
           c70 = c00, c71 = c00, c80 = c00, c81 = c00, c90 = c00, c91 = c00, ca0 = c00, ca1 = c00,
           cb0 = c00, cb1 = c00;
    for (int i = 0; i < 12; i++) { /* the tile's lines, ahead of the k loop (see the AVX2 kernel) */
        _mm_prefetch((const char *)(C + (size_t)i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(C + (size_t)i * ldc + 16), _MM_HINT_T0);
        _mm_prefetch((const char *)(C + (size_t)i * ldc + 31), _MM_HINT_T0);
    }
    for (int k = 0; k < kc; k++) {
        const __m512 b0 = _mm512_loadu_ps(Bp + k * 32), b1 = _mm512_loadu_ps(Bp + k * 32 + 16);
        const float *a = Ap + k * 12;
        TD_AVX512_ROW(0, c00, c01);
        TD_AVX512_ROW(1, c10, c11);
        TD_AVX512_ROW(2, c20, c21);
        TD_AVX512_ROW(3, c30, c31);
        TD_AVX512_ROW(4, c40, c41);
        TD_AVX512_ROW(5, c50, c51);
        TD_AVX512_ROW(6, c60, c61);
        TD_AVX512_ROW(7, c70, c71);
        TD_AVX512_ROW(8, c80, c81);
        TD_AVX512_ROW(9, c90, c91);
        TD_AVX512_ROW(10, ca0, ca1);
        TD_AVX512_ROW(11, cb0, cb1);
    }
    TD_AVX512_STORE(0, c00, c01);
    TD_AVX512_STORE(1, c10, c11);
    TD_AVX512_STORE(2, c20, c21);
    TD_AVX512_STORE(3, c30, c31);
    TD_AVX512_STORE(4, c40, c41);
    TD_AVX512_STORE(5, c50, c51);
    TD_AVX512_STORE(6, c60, c61);
    TD_AVX512_STORE(7, c70, c71);
    TD_AVX512_STORE(8, c80, c81);
    TD_AVX512_STORE(9, c90, c91);
    TD_AVX512_STORE(10, ca0, ca1);
    TD_AVX512_STORE(11, cb0, cb1);
}

#define TD_AVX512_ROW3(i, r0, r1, r2)                                                              \
    do {                                                                                           \
        const __m512 ai = _mm512_set1_ps(a[i]);                                                    \
        r0 = _mm512_fmadd_ps(ai, b0, r0);                                                          \
        r1 = _mm512_fmadd_ps(ai, b1, r1);                                                          \
        r2 = _mm512_fmadd_ps(ai, b2, r2);                                                          \
    } while (0)
#define TD_AVX512_STORE3(i, r0, r1, r2)                                                            \
    do {                                                                                           \
        float *ci = C + (size_t)(i) * ldc;                                                         \
        if (!overwrite) {                                                                          \
            r0 = _mm512_add_ps(r0, _mm512_loadu_ps(ci));                                           \
            r1 = _mm512_add_ps(r1, _mm512_loadu_ps(ci + 16));                                      \
            r2 = _mm512_add_ps(r2, _mm512_loadu_ps(ci + 32));                                      \
        }                                                                                          \
        _mm512_storeu_ps(ci, r0);                                                                  \
        _mm512_storeu_ps(ci + 16, r1);                                                             \
        _mm512_storeu_ps(ci + 32, r2);                                                             \
    } while (0)

/* 8 rows x 48 columns: the same 24 accumulators as 12x32, but 3 vector loads and 8 broadcasts a
 * k step instead of 2 and 12, and 8 rows divide the token counts (B x T) and widths the layers'
 * products have, where 12 leaves a mostly empty last panel (256 = 21 x 12 + 4). Each element of
 * C still sums over k in order, so it gives the 12x32 kernel's bits. */
__attribute__((target("avx512f"))) static void kernel_avx512_8x48(int kc, const float *Ap,
                                                                   const float *Bp, float *C,
                                                                   int ldc, int overwrite) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00,
           c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00, c40 = c00, c41 = c00,
           c42 = c00, c50 = c00, c51 = c00, c52 = c00, c60 = c00, c61 = c00, c62 = c00, c70 = c00,
           c71 = c00, c72 = c00;
    for (int i = 0; i < 8; i++) {
        _mm_prefetch((const char *)(C + (size_t)i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(C + (size_t)i * ldc + 16), _MM_HINT_T0);
        _mm_prefetch((const char *)(C + (size_t)i * ldc + 32), _MM_HINT_T0);
        _mm_prefetch((const char *)(C + (size_t)i * ldc + 47), _MM_HINT_T0);
    }
    for (int k = 0; k < kc; k++) {
        const __m512 b0 = _mm512_loadu_ps(Bp + k * 48), b1 = _mm512_loadu_ps(Bp + k * 48 + 16),
                     b2 = _mm512_loadu_ps(Bp + k * 48 + 32);
        const float *a = Ap + k * 8;
        TD_AVX512_ROW3(0, c00, c01, c02);
        TD_AVX512_ROW3(1, c10, c11, c12);
        TD_AVX512_ROW3(2, c20, c21, c22);
        TD_AVX512_ROW3(3, c30, c31, c32);
        TD_AVX512_ROW3(4, c40, c41, c42);
        TD_AVX512_ROW3(5, c50, c51, c52);
        TD_AVX512_ROW3(6, c60, c61, c62);
        TD_AVX512_ROW3(7, c70, c71, c72);
    }
    TD_AVX512_STORE3(0, c00, c01, c02);
    TD_AVX512_STORE3(1, c10, c11, c12);
    TD_AVX512_STORE3(2, c20, c21, c22);
    TD_AVX512_STORE3(3, c30, c31, c32);
    TD_AVX512_STORE3(4, c40, c41, c42);
    TD_AVX512_STORE3(5, c50, c51, c52);
    TD_AVX512_STORE3(6, c60, c61, c62);
    TD_AVX512_STORE3(7, c70, c71, c72);
}

/* The accumulators are named variables, not an array: with `__m256 c[6][2]` GCC 12 kept the
 * array's stack copy up to date inside the k loop (ten 32-byte stores per k step beside the twelve
 * FMAs), which made the stores, not the FMA pipes, the bottleneck. Each accumulator still sums
 * over k in order, so the results are the same bits. */
#define TD_AVX2_ROW(i, r0, r1)                                                                     \
    do {                                                                                           \
        const __m256 ai = _mm256_broadcast_ss(a + (i));                                            \
        r0 = _mm256_fmadd_ps(ai, b0, r0);                                                          \
        r1 = _mm256_fmadd_ps(ai, b1, r1);                                                          \
    } while (0)
#define TD_AVX2_STORE(i, r0, r1)                                                                   \
    do {                                                                                           \
        float *ci = C + (size_t)(i) * ldc;                                                         \
        if (!overwrite) {                                                                          \
            r0 = _mm256_add_ps(r0, _mm256_loadu_ps(ci));                                           \
            r1 = _mm256_add_ps(r1, _mm256_loadu_ps(ci + 8));                                       \
        }                                                                                          \
        _mm256_storeu_ps(ci, r0);                                                                  \
        _mm256_storeu_ps(ci + 8, r1);                                                              \
    } while (0)

__attribute__((target("avx2,fma"))) static void kernel_avx2_6x16(int kc, const float *Ap,
                                                                  const float *Bp, float *C,
                                                                  int ldc, int overwrite) {
    /* the tile of C is read or written only after the k loop: fetch its lines now, so that
     * their misses overlap the loop instead of stalling the stores (C is megabytes for the
     * layers' products, so the tile is rarely in cache) */
    for (int i = 0; i < 6; i++) {
        _mm_prefetch((const char *)(C + (size_t)i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(C + (size_t)i * ldc + 15), _MM_HINT_T0);
    }
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
           c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int k = 0; k < kc; k++) {
        const __m256 b0 = _mm256_loadu_ps(Bp + k * 16), b1 = _mm256_loadu_ps(Bp + k * 16 + 8);
        const float *a = Ap + k * 6;
        TD_AVX2_ROW(0, c00, c01);
        TD_AVX2_ROW(1, c10, c11);
        TD_AVX2_ROW(2, c20, c21);
        TD_AVX2_ROW(3, c30, c31);
        TD_AVX2_ROW(4, c40, c41);
        TD_AVX2_ROW(5, c50, c51);
    }
    TD_AVX2_STORE(0, c00, c01);
    TD_AVX2_STORE(1, c10, c11);
    TD_AVX2_STORE(2, c20, c21);
    TD_AVX2_STORE(3, c30, c31);
    TD_AVX2_STORE(4, c40, c41);
    TD_AVX2_STORE(5, c50, c51);
}
#endif

typedef struct {
    int mr, nr;
    microkernel_fn fn;
    const char *name;
    int simd; /* the CPU has AVX2: packing moves 8 x 8 blocks (pack_rows_avx2) */
} kernel_desc;

/* TANDEM_GEMM_KERNEL, where set to one kernel (unset, empty or "default": the engine's choice) */
static const char *forced_kernel(void) {
    const char *f = getenv("TANDEM_GEMM_KERNEL");
    return f && *f && strcmp(f, "default") != 0 ? f : NULL;
}

#ifdef TD_X86
/* every AVX-512 CPU has AVX2, which the packing's 8 x 8 moves need */
static kernel_desc kernel_8x48(void) {
    return (kernel_desc){8, 48, kernel_avx512_8x48, "avx512-8x48", 1};
}
#endif

static kernel_desc pick_kernel(void) {
    kernel_desc k = {4, 16, kernel_c_4x16, "c-4x16", 0};
#ifdef TD_X86
    /* "avx512-8x48", "avx512" (12x32), "avx2", "c": for tests and A/B timing */
    const char *force = forced_kernel();
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f"), avx2 = __builtin_cpu_supports("avx2") &&
                                                            __builtin_cpu_supports("fma");
    if (force && !strcmp(force, "c")) return k;
    if (avx512 && force && !strcmp(force, "avx512-8x48")) return kernel_8x48();
    if (avx512 && !(force && !strcmp(force, "avx2")))
        return (kernel_desc){12, 32, kernel_avx512_12x32, "avx512-12x32", avx2};
    if (avx2) return (kernel_desc){6, 16, kernel_avx2_6x16, "avx2-6x16", 1};
#endif
    return k;
}

/* The second AVX-512 shape a call may take when no kernel is forced: 8x48 wherever it pads
 * M and N to no more area than 12x32 does (same bits either way: each element sums over k in
 * order). Timed in one process, alternating, 2 threads: the products of a GPT-2 124M T64 B4
 * step 193 -> 201 GFLOP/s; at tiny widths (N = 64, 128) 12x32 wins, which the rule keeps. */
static int wide_kernel_available(void) {
#ifdef TD_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && !forced_kernel();
#else
    return 0;
#endif
}

static int wide_pads_less(int M, int N) {
    const double wide = (double)((M + 7) / 8 * 8) * ((N + 47) / 48 * 48);
    const double base = (double)((M + 11) / 12 * 12) * ((N + 31) / 32 * 32);
    return wide <= base;
}

const char *td_gemm_kernel_name(void) {
    return wide_kernel_available() ? "avx512-12x32+8x48" : pick_kernel().name;
}

/* ---- packing ------------------------------------------------------------------------------ */

/* One panel from rows that run along k: dst[k * R + r] = src[r * lds + k] for r < valid, and 0
 * for valid <= r < R (the zero padding past the matrix's edge), k < kc. This is the panel of a
 * non-transposed A and of a transposed B. Element by element it writes with a stride of R floats,
 * and it was a quarter of a 256 x 768 x 2304 product's time; the AVX2 path moves 8 x 8 blocks
 * through registers instead. Pure data movement: either path gives the same panel. */
static void pack_rows_scalar(float *dst, int R, const float *src, size_t lds, int valid, int kc) {
    for (int r = 0; r < R; r++) {
        if (r >= valid) {
            for (int k = 0; k < kc; k++) dst[k * R + r] = 0.0f;
            continue;
        }
        const float *row = src + (size_t)r * lds;
        for (int k = 0; k < kc; k++) dst[k * R + r] = row[k];
    }
}

#ifdef TD_X86
/* 8 rows x 8 k of src (rows past `valid` read as zero) to 8 k x `lanes` of dst (row stride R). */
__attribute__((target("avx2"))) static void pack_rows_avx2(float *dst, int R, const float *src,
                                                           size_t lds, int valid, int kc) {
    for (int r0 = 0; r0 < R; r0 += 8) {
        const int lanes = R - r0 < 8 ? R - r0 : 8;
        int nv = valid - r0;
        nv = nv < 0 ? 0 : nv > lanes ? lanes : nv;
        const __m256i mask =
            _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const float *s = src + (size_t)r0 * lds;
        float *d = dst + r0;
        int k = 0;
        for (; k + 8 <= kc; k += 8) {
            const __m256 z = _mm256_setzero_ps();
#define TD_LD(i) ((i) < nv ? _mm256_loadu_ps(s + (size_t)(i) * lds + k) : z)
            const __m256 x0 = TD_LD(0), x1 = TD_LD(1), x2 = TD_LD(2), x3 = TD_LD(3), x4 = TD_LD(4),
                         x5 = TD_LD(5), x6 = TD_LD(6), x7 = TD_LD(7);
#undef TD_LD
            const __m256 t0 = _mm256_unpacklo_ps(x0, x1), t1 = _mm256_unpackhi_ps(x0, x1),
                         t2 = _mm256_unpacklo_ps(x2, x3), t3 = _mm256_unpackhi_ps(x2, x3),
                         t4 = _mm256_unpacklo_ps(x4, x5), t5 = _mm256_unpackhi_ps(x4, x5),
                         t6 = _mm256_unpacklo_ps(x6, x7), t7 = _mm256_unpackhi_ps(x6, x7);
            const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                         u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                         u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                         u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            const __m256 y0 = _mm256_permute2f128_ps(u0, u4, 0x20),
                         y1 = _mm256_permute2f128_ps(u1, u5, 0x20),
                         y2 = _mm256_permute2f128_ps(u2, u6, 0x20),
                         y3 = _mm256_permute2f128_ps(u3, u7, 0x20),
                         y4 = _mm256_permute2f128_ps(u0, u4, 0x31),
                         y5 = _mm256_permute2f128_ps(u1, u5, 0x31),
                         y6 = _mm256_permute2f128_ps(u2, u6, 0x31),
                         y7 = _mm256_permute2f128_ps(u3, u7, 0x31);
            float *dk = d + (size_t)k * R;
            if (lanes == 8) {
                _mm256_storeu_ps(dk, y0);
                _mm256_storeu_ps(dk + R, y1);
                _mm256_storeu_ps(dk + 2 * R, y2);
                _mm256_storeu_ps(dk + 3 * R, y3);
                _mm256_storeu_ps(dk + 4 * R, y4);
                _mm256_storeu_ps(dk + 5 * R, y5);
                _mm256_storeu_ps(dk + 6 * R, y6);
                _mm256_storeu_ps(dk + 7 * R, y7);
            } else {
                _mm256_maskstore_ps(dk, mask, y0);
                _mm256_maskstore_ps(dk + R, mask, y1);
                _mm256_maskstore_ps(dk + 2 * R, mask, y2);
                _mm256_maskstore_ps(dk + 3 * R, mask, y3);
                _mm256_maskstore_ps(dk + 4 * R, mask, y4);
                _mm256_maskstore_ps(dk + 5 * R, mask, y5);
                _mm256_maskstore_ps(dk + 6 * R, mask, y6);
                _mm256_maskstore_ps(dk + 7 * R, mask, y7);
            }
        }
        for (; k < kc; k++)
            for (int r = 0; r < lanes; r++)
                d[(size_t)k * R + r] = r < nv ? s[(size_t)r * lds + k] : 0.0f;
    }
}
#endif

#ifdef TD_X86
/* dst[k * R + c] = src[k * lds + c] for c < R (R a multiple of 8), k < kc: a full panel of a
 * non-transposed B. With memcpy per 16-float row, the calls were a fifth of a 256 x 3072 x 768
 * product's time. */
__attribute__((target("avx2"))) static void pack_cols_avx2(float *dst, int R, const float *src,
                                                           size_t lds, int kc) {
    for (int k = 0; k < kc; k++) {
        const float *s = src + (size_t)k * lds;
        float *d = dst + (size_t)k * R;
        for (int c = 0; c < R; c += 8) _mm256_storeu_ps(d + c, _mm256_loadu_ps(s + c));
    }
}
#endif

static void pack_rows(float *dst, int R, const float *src, size_t lds, int valid, int kc,
                      int simd) {
#ifdef TD_X86
    if (simd) {
        pack_rows_avx2(dst, R, src, lds, valid, kc);
        return;
    }
#endif
    (void)simd;
    pack_rows_scalar(dst, R, src, lds, valid, kc);
}

/* Ap: ceil(m / MR) panels, each kc x MR (k-major), zero-padded past m. */
static void pack_A(float *Ap, const float *A, int M, int K, int transA, int i0, int m, int p0,
                   int kc, int MR, int simd) {
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
            pack_rows(dst, MR, A + (size_t)(i0 + p * MR) * K + p0, (size_t)K, rows, kc, simd);
        }
    }
}

/* Bp: ceil(n / NR) panels, each kc x NR (k-major), zero-padded past n. */
static void pack_B(float *Bp, const float *B, int N, int K, int transB, int j0, int n, int p0,
                   int kc, int NR, int simd) {
    int panels = (n + NR - 1) / NR;
    for (int p = 0; p < panels; p++) {
        float *dst = Bp + (size_t)p * kc * NR;
        int jn = n - p * NR < NR ? n - p * NR : NR;
        if (!transB) {
            const float *src = B + (size_t)p0 * N + j0 + p * NR;
#ifdef TD_X86
            if (simd && jn == NR) { /* a full panel: NR floats a row, no memcpy call per row */
                pack_cols_avx2(dst, NR, src, (size_t)N, kc);
                continue;
            }
#endif
            for (int k = 0; k < kc; k++) {
                memcpy(dst + k * NR, src + (size_t)k * N, sizeof(float) * (size_t)jn);
                for (int jj = jn; jj < NR; jj++) dst[k * NR + jj] = 0.0f;
            }
        } else {
            pack_rows(dst, NR, B + (size_t)(j0 + p * NR) * K + p0, (size_t)K, jn, kc, simd);
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
            pack_B(Bp, B, N, K, transB, j0, n, p0, kc, NR, kd->simd);
            for (int i0 = m0; i0 < m1; i0 += MC) {
                const int m = m1 - i0 < MC ? m1 - i0 : MC;
                const int mpanels = (m + MR - 1) / MR;
                pack_A(Ap, A, M, K, transA, i0, m, p0, kc, MR, kd->simd);
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
    static kernel_desc kd_once, kd_wide;
    static int wide_ok;
    static _Atomic int kd_ready = 0;
    if (!atomic_load_explicit(&kd_ready, memory_order_acquire)) {
#pragma omp critical(td_gemm_pick_kernel)
        if (!atomic_load_explicit(&kd_ready, memory_order_relaxed)) {
            kd_once = pick_kernel();
            wide_ok = wide_kernel_available();
#ifdef TD_X86
            if (wide_ok) kd_wide = kernel_8x48();
#endif
            atomic_store_explicit(&kd_ready, 1, memory_order_release);
        }
    }
    const kernel_desc kd = wide_ok && wide_pads_less(M, N) ? kd_wide : kd_once;
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
