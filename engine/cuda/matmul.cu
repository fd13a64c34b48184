/* matmul.cu — every matrix product of the CUDA backend, through cuBLASLt.
 *
 * Row-major products are handed to cuBLAS (column-major) as their transposes:
 * out^T (N x M) = op(B)^T (N x K) @ op(A)^T (K x M), so the bias (one value per output column)
 * is cuBLASLt's per-row bias. bf16 inputs accumulate in fp32 (CUBLAS_COMPUTE_32F) and write bf16
 * or fp32; fp32 mode is fp32 throughout with CUBLAS_COMPUTE_32F (no TF32), so it can be held to
 * the CPU engine's fp32 tolerances. The algorithm for each distinct shape / layout / alignment is
 * chosen once and cached: the heuristic's first choice, or (TANDEM_CUDA_GEMM_TUNE, below) the
 * fastest of its first candidates timed on the device. Fused epilogues (bias, GELU with its pre-activation
 * kept, GELU gradient) are used where cuBLASLt offers them for the case; otherwise a plain
 * product is followed by a kernel, with the same result up to rounding.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "common.cuh"

/* ---- measured algorithm choice ---------------------------------------------------------------
 * cuBLASLt's heuristic ranks its algorithms by a model, and its first choice is not always the
 * fastest on the device (tile shapes against N = 1600 columns, split-K, cluster shapes). With
 * TANDEM_CUDA_GEMM_TUNE=auto (the default) a product of at least TD_MM_TUNE_FLOP flops takes the
 * fastest of the heuristic's first TD_MM_TUNE_CANDIDATES algorithms, each timed twice after a
 * warm-up run (the minimum counts) into scratch outputs, so nothing the caller owns is written;
 * the first choice stays unless another is at least TD_MM_TUNE_MARGIN faster, so that noise does
 * not flip the choice. `all` tunes every product (tests), `off` keeps the first choice.
 * The choice is kept per process (every model of a shape in this process uses the same
 * algorithm: reruns stay bit-identical); a new process times again and may choose another
 * algorithm, whose sums are rounded differently. TANDEM_CUDA_GEMM_TUNE=off gives the same bits
 * in every process. TANDEM_CUDA_GEMM_TUNE_LOG=<file> appends one line per tuned shape. */
#define TD_MM_TUNE_CANDIDATES 8
#define TD_MM_TUNE_FLOP 1e9
#define TD_MM_TUNE_MARGIN 0.97f
#define TD_MM_TUNED_MAX 1024

typedef struct {
    unsigned char key[128];
    int dev;
    cublasLtMatmulAlgo_t algo;
} tuned_entry;
static tuned_entry g_tuned[TD_MM_TUNED_MAX];
static int g_ntuned;
static pthread_mutex_t g_tuned_mu = PTHREAD_MUTEX_INITIALIZER;

/* key: the first n (<= 128) bytes are compared, the rest of the entry's key is zero */
static int tuned_find(const void *key, size_t n, int dev, cublasLtMatmulAlgo_t *algo) {
    int found = 0;
    pthread_mutex_lock(&g_tuned_mu);
    for (int i = 0; i < g_ntuned && !found; i++)
        if (g_tuned[i].dev == dev && !memcmp(g_tuned[i].key, key, n))
            *algo = g_tuned[i].algo, found = 1;
    pthread_mutex_unlock(&g_tuned_mu);
    return found;
}

/* keeps the first choice recorded for the key (another thread may have tuned it meanwhile) */
static void tuned_add(const void *key, size_t n, int dev, cublasLtMatmulAlgo_t *algo) {
    pthread_mutex_lock(&g_tuned_mu);
    int i = 0;
    while (i < g_ntuned && !(g_tuned[i].dev == dev && !memcmp(g_tuned[i].key, key, n))) i++;
    if (i < g_ntuned) *algo = g_tuned[i].algo;
    else if (g_ntuned < TD_MM_TUNED_MAX) {
        memcpy(g_tuned[g_ntuned].key, key, n);
        g_tuned[g_ntuned].dev = dev;
        g_tuned[g_ntuned].algo = *algo;
        g_ntuned++;
    }
    pthread_mutex_unlock(&g_tuned_mu);
}

int td_cuda_gemm_tune_mode(const char *env, int *mode) {
    if (!env || !*env || !strcmp(env, "auto")) *mode = TD_TUNE_AUTO;
    else if (!strcmp(env, "off")) *mode = TD_TUNE_OFF;
    else if (!strcmp(env, "all")) *mode = TD_TUNE_ALL;
    else return -1;
    return 0;
}

#define TD_LT_CK(call)                                                                           \
    do {                                                                                         \
        cublasStatus_t s_ = (call);                                                              \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                       \
            st = td_fail(d->m, TD_ERR_INTERNAL,                                                  \
                         "cuda backend: %s failed (%s, %s:%d) for a (%d x %d x %d) product, "    \
                         "batch %d, transA %d, transB %d. HINT: a cuBLASLt version or layout "   \
                         "problem; please report it with this message",                          \
                         #call, cublasLtGetStatusString(s_), __FILE__, __LINE__, p->M, p->N,     \
                         p->K, p->batch, p->transA, p->transB);                                  \
            goto done;                                                                           \
        }                                                                                        \
    } while (0)

/* Largest power of two (<= 256) dividing the address and every byte stride given. */
static uint32_t alignment(const void *ptr, long long ld_bytes, long long stride_bytes) {
    unsigned long long x = (unsigned long long)(uintptr_t)ptr | (unsigned long long)ld_bytes |
                           (unsigned long long)stride_bytes | 256ull;
    return (uint32_t)(x & (~x + 1ull));
}

typedef struct {
    int M, N, K, lda, ldb, ldo, ldaux, transA, transB, out_f32, in_bf16, epi_lt, batch, beta_nz;
    long long sA, sB, sD;
    uint32_t alA, alB, alC, alD;
} mm_key;

/* Index of the candidate to use (module comment above): each one runs once to warm up, then twice
 * timed with events, into a scratch D (and a scratch C when the product accumulates into its
 * output, a scratch aux when the epilogue writes one); the desc's aux pointer is restored. Any
 * failure (no memory for the scratch, a candidate refused at run time) leaves that candidate out,
 * or the first choice in place: tuning never fails the product. */
static int time_candidates(td_cuda_dev *d, const td_mm *p, cublasLtMatmulDesc_t desc,
                           cublasLtMatrixLayout_t la, cublasLtMatrixLayout_t lb,
                           cublasLtMatrixLayout_t lc, cublasLtMatrixLayout_t ld,
                           const cublasLtMatmulHeuristicResult_t *res, int nres,
                           cublasLtEpilogue_t epi, int use_aux, const void *Cptr) {
    if (nres < 2) return 0;
    const size_t ein = d->es, eout = p->out_f32 ? 4 : d->es;
    const size_t nout = (p->batch > 1 ? (size_t)(p->batch - 1) * (size_t)p->sD : 0) +
                        (size_t)(p->M - 1) * (size_t)p->ldo + (size_t)p->N;
    const int aux_out = use_aux && (epi == CUBLASLT_EPILOGUE_GELU_AUX || epi == CUBLASLT_EPILOGUE_GELU_AUX_BIAS);
    const size_t naux = aux_out ? (size_t)(p->M - 1) * (size_t)p->ldaux + (size_t)p->N : 0;
    void *Ds = NULL, *As = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    float best[TD_MM_TUNE_CANDIDATES];
    int choice = 0;
    const float alpha = 1.f, beta = p->beta;
    if (cudaMalloc(&Ds, nout * eout) != cudaSuccess) goto out;
    if (aux_out && cudaMalloc(&As, naux * ein) != cudaSuccess) goto out;
    if (cudaMemsetAsync(Ds, 0, nout * eout, d->stream) != cudaSuccess) goto out;
    if (aux_out && cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &As, sizeof As) != CUBLAS_STATUS_SUCCESS) goto out;
    if (cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess) goto out;
    {
        const void *Cs = Cptr == p->out ? Ds : Cptr; /* accumulating: C is the scratch too */
        for (int i = 0; i < nres; i++) best[i] = -1.f;
        for (int round = 0; round < 3; round++)
            for (int i = 0; i < nres; i++) {
                if (round > 0 && best[i] == -2.f) continue;
                float ms = 0.f;
                cublasStatus_t s = CUBLAS_STATUS_SUCCESS;
                cudaEventRecord(e0, d->stream);
                s = cublasLtMatmul(d->lt, desc, &alpha, p->B, la, p->A, lb, &beta, Cs, lc, Ds, ld,
                                   &res[i].algo, d->ws, d->ws_bytes, d->stream);
                cudaEventRecord(e1, d->stream);
                if (s != CUBLAS_STATUS_SUCCESS || cudaEventSynchronize(e1) != cudaSuccess ||
                    cudaEventElapsedTime(&ms, e0, e1) != cudaSuccess) {
                    best[i] = -2.f; /* refused or failed: left out */
                    cudaGetLastError();
                    continue;
                }
                if (round > 0 && (best[i] < 0.f || ms < best[i])) best[i] = ms;
            }
        int fastest = -1;
        for (int i = 0; i < nres; i++)
            if (best[i] >= 0.f && (fastest < 0 || best[i] < best[fastest])) fastest = i;
        if (fastest >= 0 && (best[0] < 0.f || best[fastest] < TD_MM_TUNE_MARGIN * best[0])) choice = fastest;
        const char *log = getenv("TANDEM_CUDA_GEMM_TUNE_LOG");
        FILE *f = log && *log ? fopen(log, "a") : NULL;
        if (f) {
            fprintf(f, "M=%d N=%d K=%d batch=%d transA=%d transB=%d epilogue=%d out_f32=%d beta=%g "
                       "bf16=%d candidates=%d first_us=%.1f fastest_us=%.1f chosen=%d",
                    p->M, p->N, p->K, p->batch, p->transA, p->transB, (int)epi, p->out_f32,
                    (double)p->beta, d->bf16, nres, 1e3 * best[0], fastest >= 0 ? 1e3 * best[fastest] : -1.0, choice);
            for (int i = 0; i < nres; i++) fprintf(f, " %.1f", 1e3 * best[i]);
            fprintf(f, "\n");
            fclose(f);
        }
    }
out:
    if (aux_out) {
        void *aux = p->aux;
        cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof aux);
    }
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (Ds || As) cudaStreamSynchronize(d->stream);
    if (Ds) cudaFree(Ds);
    if (As) cudaFree(As);
    cudaGetLastError(); /* a failed scratch allocation is not the product's error */
    return choice;
}

static td_status run_lt(td_cuda_dev *d, const td_mm *p, cublasLtEpilogue_t epi, const void *bias,
                        int use_aux) {
    td_status st = TD_OK;
    cublasLtMatmulDesc_t desc = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL, ld = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    const cudaDataType tin = d->bf16 ? CUDA_R_16BF : CUDA_R_32F;
    const cudaDataType tout = p->out_f32 ? CUDA_R_32F : tin;
    const size_t ein = d->es, eout = p->out_f32 ? 4 : d->es;
    const cublasOperation_t opN = CUBLAS_OP_N, opT = CUBLAS_OP_T;
    const cublasOperation_t opa = p->transB ? opT : opN; /* cuBLAS A := row-major B */
    const cublasOperation_t opb = p->transA ? opT : opN; /* cuBLAS B := row-major A */
    const void *Cptr = p->C ? p->C : p->out;
    const float alpha = 1.f, beta = p->beta;

    mm_key key;
    memset(&key, 0, sizeof key);
    key.M = p->M, key.N = p->N, key.K = p->K, key.lda = p->lda, key.ldb = p->ldb, key.ldo = p->ldo;
    key.ldaux = use_aux ? p->ldaux : 0;
    key.transA = p->transA, key.transB = p->transB, key.out_f32 = p->out_f32, key.in_bf16 = d->bf16;
    key.epi_lt = (int)epi, key.batch = p->batch, key.beta_nz = p->beta != 0.f;
    key.sA = p->sA, key.sB = p->sB, key.sD = p->sD;
    key.alA = alignment(p->A, (long long)p->lda * ein, p->batch > 1 ? p->sA * (long long)ein : 0);
    key.alB = alignment(p->B, (long long)p->ldb * ein, p->batch > 1 ? p->sB * (long long)ein : 0);
    key.alD = alignment(p->out, (long long)p->ldo * eout, p->batch > 1 ? p->sD * (long long)eout : 0);
    key.alC = alignment(Cptr, (long long)p->ldo * eout, p->batch > 1 ? p->sD * (long long)eout : 0);

    TD_LT_CK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    TD_LT_CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    TD_LT_CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    TD_LT_CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    if (bias)
        TD_LT_CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    if (use_aux) {
        int64_t ldaux = p->ldaux;
        void *aux = p->aux;
        TD_LT_CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof aux));
        TD_LT_CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ldaux, sizeof ldaux));
    }
    /* cuBLAS A = row-major B: stored (N x K) col-major when !transB (row-major (K, N)) */
    TD_LT_CK(cublasLtMatrixLayoutCreate(&la, tin, p->transB ? p->K : p->N, p->transB ? p->N : p->K, p->ldb));
    TD_LT_CK(cublasLtMatrixLayoutCreate(&lb, tin, p->transA ? p->M : p->K, p->transA ? p->K : p->M, p->lda));
    TD_LT_CK(cublasLtMatrixLayoutCreate(&lc, tout, p->N, p->M, p->ldo));
    TD_LT_CK(cublasLtMatrixLayoutCreate(&ld, tout, p->N, p->M, p->ldo));
    if (p->batch > 1) {
        int32_t bc = p->batch;
        int64_t sa = p->sB, sb = p->sA, sd = p->sD;
        TD_LT_CK(cublasLtMatrixLayoutSetAttribute(la, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof bc));
        TD_LT_CK(cublasLtMatrixLayoutSetAttribute(la, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sa, sizeof sa));
        TD_LT_CK(cublasLtMatrixLayoutSetAttribute(lb, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof bc));
        TD_LT_CK(cublasLtMatrixLayoutSetAttribute(lb, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sb, sizeof sb));
        TD_LT_CK(cublasLtMatrixLayoutSetAttribute(lc, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof bc));
        TD_LT_CK(cublasLtMatrixLayoutSetAttribute(lc, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sd, sizeof sd));
        TD_LT_CK(cublasLtMatrixLayoutSetAttribute(ld, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &bc, sizeof bc));
        TD_LT_CK(cublasLtMatrixLayoutSetAttribute(ld, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sd, sizeof sd));
    }

    {
        cublasLtMatmulAlgo_t algo;
        int found = 0;
        for (int i = 0; i < d->ncache; i++)
            if (!memcmp(d->cache[i].key, &key, sizeof key)) {
                algo = d->cache[i].algo;
                found = 1;
                break;
            }
        const double flop = 2.0 * p->M * (double)p->N * p->K * (p->batch > 1 ? p->batch : 1);
        const int tune = d->tune == TD_TUNE_ALL || (d->tune == TD_TUNE_AUTO && flop >= TD_MM_TUNE_FLOP);
        if (!found && tune) found = tuned_find(&key, sizeof key, d->dev, &algo);
        if (!found) {
            cublasLtMatmulHeuristicResult_t res[TD_MM_TUNE_CANDIDATES];
            int nres = 0;
            size_t wsb = d->ws_bytes;
            TD_LT_CK(cublasLtMatmulPreferenceCreate(&pref));
            TD_LT_CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb));
            /* cuBLASLt's heuristics assume 256-byte aligned operands unless told otherwise */
            TD_LT_CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.alB, sizeof key.alB));
            TD_LT_CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.alA, sizeof key.alA));
            TD_LT_CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.alC, sizeof key.alC));
            TD_LT_CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.alD, sizeof key.alD));
            cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(d->lt, desc, la, lb, lc, ld, pref,
                                                               tune ? TD_MM_TUNE_CANDIDATES : 1, res, &nres);
            if (hs != CUBLAS_STATUS_SUCCESS || nres < 1) {
                st = TD_ERR_ARG; /* "no algorithm": the caller may fall back to a plain product */
                snprintf(d->m->err, TD_ERR_LEN,
                         "cuda backend: cublasLtMatmulAlgoGetHeuristic found no algorithm (%s) for a "
                         "(%d x %d x %d) product, batch %d, transA %d, transB %d, epilogue %d, "
                         "alignments %u/%u/%u/%u bytes",
                         cublasLtGetStatusString(hs), p->M, p->N, p->K, p->batch, p->transA,
                         p->transB, (int)epi, key.alA, key.alB, key.alC, key.alD);
                goto done;
            }
            algo = res[0].algo;
            if (tune) {
                algo = res[time_candidates(d, p, desc, la, lb, lc, ld, res, nres, epi, use_aux, Cptr)].algo;
                tuned_add(&key, sizeof key, d->dev, &algo);
            }
            if (d->ncache < TD_MM_CACHE) {
                memcpy(d->cache[d->ncache].key, &key, sizeof key);
                d->cache[d->ncache].algo = algo;
                d->ncache++;
            }
        }
        TD_LT_CK(cublasLtMatmul(d->lt, desc, &alpha, p->B, la, p->A, lb, &beta, Cptr, lc, p->out,
                                ld, &algo, d->ws, d->ws_bytes, d->stream));
    }
done:
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (ld) cublasLtMatrixLayoutDestroy(ld);
    if (desc) cublasLtMatmulDescDestroy(desc);
    return st;
}

typedef char mm_key_fits[sizeof(mm_key) <= sizeof(((td_mm_cache_entry *)0)->key) ? 1 : -1];

template <typename E>
static td_status fallback(td_cuda_dev *d, const td_mm *p) {
    /* the plain product, then bias / GELU / GELU' as kernels */
    td_mm q = *p;
    q.epi = TD_EPI_NONE;
    q.bias = NULL;
    if (p->epi == TD_EPI_GELU) q.out = p->aux, q.ldo = p->ldaux; /* pre-activation goes to aux */
    td_status st = run_lt(d, &q, CUBLASLT_EPILOGUE_DEFAULT, NULL, 0);
    if (st == TD_ERR_ARG) st = TD_ERR_INTERNAL;
    if (st) return st;
    if (p->bias)
        TD_CK((td_k_bias_add<E>(d->stream, (E *)q.out, (const E *)p->bias, p->M, p->N, q.ldo)));
    if (p->epi == TD_EPI_GELU) {
        if (p->ldo != p->N || p->ldaux != p->N)
            return td_fail(d->m, TD_ERR_INTERNAL, "cuda backend: GELU fallback needs packed rows (ldo %d, ldaux %d, N %d)", p->ldo, p->ldaux, p->N);
        TD_CK(td_k_gelu_forward<E>(d->stream, (E *)p->out, (const E *)p->aux, (long long)p->M * p->N));
    } else if (p->epi == TD_EPI_DGELU) {
        if (p->ldo != p->N || p->ldaux != p->N)
            return td_fail(d->m, TD_ERR_INTERNAL, "cuda backend: GELU' fallback needs packed rows (ldo %d, ldaux %d, N %d)", p->ldo, p->ldaux, p->N);
        TD_CK(td_k_gelu_backward_inplace<E>(d->stream, (E *)p->out, (const E *)p->aux, (long long)p->M * p->N));
    }
    return TD_OK;
}

td_status td_cuda_matmul(td_cuda_dev *d, const td_mm *p) {
    if (p->M <= 0 || p->N <= 0) return TD_OK;
    if (p->K <= 0) return td_fail(d->m, TD_ERR_INTERNAL, "cuda backend: a product with K = %d", p->K);
    /* Fused epilogues only in bf16 mode: fp32 mode keeps GELU in the same kernel as the CPU
     * (tanhf) so that it is held to fp32 tolerances; bias epilogues are exact either way. Fused
     * paths need 16-byte aligned vectors and single products. */
    const int fuse_ok = p->batch <= 1 && (!p->bias || alignment(p->bias, 0, 0) >= 16) &&
                        (p->epi == TD_EPI_NONE || (d->bf16 && p->ldaux % 8 == 0 &&
                                                     alignment(p->aux, (long long)p->ldaux * d->es, 0) >= 16));
    if (fuse_ok) {
        cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
        if (p->epi == TD_EPI_GELU) epi = p->bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
        else if (p->epi == TD_EPI_DGELU) epi = CUBLASLT_EPILOGUE_DGELU;
        else if (p->bias) epi = CUBLASLT_EPILOGUE_BIAS;
        const int dgelu_with_bias = p->epi == TD_EPI_DGELU && p->bias; /* not a cuBLASLt case */
        if (!dgelu_with_bias) {
            td_status st = run_lt(d, p, epi, p->epi == TD_EPI_DGELU ? NULL : p->bias, p->epi != TD_EPI_NONE);
            if (st != TD_ERR_ARG) return st; /* done, or a real failure */
        }
    } else if (p->epi == TD_EPI_NONE && !p->bias) {
        td_status st = run_lt(d, p, CUBLASLT_EPILOGUE_DEFAULT, NULL, 0);
        return st == TD_ERR_ARG ? TD_ERR_INTERNAL : st;
    }
    return d->bf16 ? fallback<bf16>(d, p) : fallback<float>(d, p);
}
