/* backend.cu — td_cuda_ops: a one-stage GPT-2 model trained on one GPU.
 *
 * build allocates everything once (fp32 master weights, gradients, AdamW m and v in the host's
 * flat layout, a bf16 copy of the weights in bf16 mode, activations for (batch_size, seq_len),
 * scratch); forward / backward / AdamW then run as kernels and cuBLASLt products on one stream,
 * in the same order and with the same maths as model.c and optim.c on the CPU. The host buffers
 * param_mem / grad_mem stay the staging area for get/set and safetensors (upload / download).
 * Attention: in bf16 mode with a head size flash.cu's FlashAttention-2 kernels take (16..64),
 * flash.cu (no (T, T) matrix); otherwise it materialises the (B, NH, T, T) probabilities of one
 * layer at a time in batched products, kept per layer when the device has room (else recomputed
 * in the backward). TANDEM_CUDA_ATTENTION=flash|store|recompute forces a mode.
 * Every CUDA and cuBLASLt status is checked; a failure returns a td_status with the call, the
 * error string and the place on the handle. Nothing here exits.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "flash.cuh"

td_status td_cuda_fail(td_cuda_dev *d, const char *what, cudaError_t err, const char *file,
                       int line) {
    cudaGetLastError(); /* clear a non-sticky error so that later calls are not blamed */
    return td_fail(d->m, err == cudaErrorMemoryAllocation ? TD_ERR_NOMEM : TD_ERR_INTERNAL,
                   "cuda backend: %s failed with %s (%s) at %s:%d", what, cudaGetErrorName(err),
                   cudaGetErrorString(err), file, line);
}

static td_status dev_alloc(td_cuda_dev *d, void **out, size_t bytes, const char *what) {
    *out = NULL;
    if (bytes == 0) bytes = 256;
    if (d->nallocs == d->cap_allocs) {
        int cap = d->cap_allocs ? 2 * d->cap_allocs : 256;
        void **a = (void **)realloc(d->allocs, sizeof(void *) * (size_t)cap);
        if (!a) return td_fail(d->m, TD_ERR_NOMEM, "cuda backend: out of host memory");
        d->allocs = a, d->cap_allocs = cap;
    }
    cudaError_t e = cudaMalloc(out, bytes);
    if (e != cudaSuccess) {
        size_t fr = 0, tot = 0;
        cudaGetLastError();
        cudaMemGetInfo(&fr, &tot);
        *out = NULL;
        return td_fail(d->m, TD_ERR_NOMEM,
                       "td_model_build: cudaMalloc of %zu bytes for %s failed (%s); %zu of %zu "
                       "bytes are free on the device. HINT: a smaller batch_size or seq_len, or a "
                       "smaller model",
                       bytes, what, cudaGetErrorString(e), fr, tot);
    }
    d->allocs[d->nallocs++] = *out;
    return TD_OK;
}

#define ALLOC(ptr, bytes, what) TD_TRY(dev_alloc(d, (void **)&(ptr), (bytes), (what)))

static size_t off_of(const td_model *m, const td_real *p) { return (size_t)(p - m->param_mem); }

/* ---- optional phase timing (TANDEM_CUDA_PROFILE=<file>) --------------------------------------
 * prof() records an event at the start of a phase; the device time to the next event is the
 * phase's. "(end)" closes a run of phases (what follows it, host time, is not counted).
 * prof_flush() runs after a stream synchronisation. Off (one branch per call) when unset. */
#define PROF_MAX 8192

static void prof(td_cuda_dev *d, const char *name) {
    if (!d->prof_path || d->prof_nev >= PROF_MAX) return;
    if (!d->prof_ev[d->prof_nev] && cudaEventCreate(&d->prof_ev[d->prof_nev]) != cudaSuccess) {
        cudaGetLastError();
        return;
    }
    cudaEventRecord(d->prof_ev[d->prof_nev], d->stream);
    d->prof_evname[d->prof_nev++] = name;
}

static void prof_flush(td_cuda_dev *d) {
    if (!d->prof_path) return;
    for (int i = 0; i + 1 < d->prof_nev; i++) {
        const char *name = d->prof_evname[i];
        if (!strcmp(name, "(end)")) continue;
        float ms = 0.f;
        if (cudaEventElapsedTime(&ms, d->prof_ev[i], d->prof_ev[i + 1]) != cudaSuccess) {
            cudaGetLastError();
            continue;
        }
        int r = 0;
        while (r < d->prof_nrows && strcmp(d->prof_name[r], name)) r++;
        if (r == d->prof_nrows) {
            if (r == 64) continue;
            d->prof_name[r] = name, d->prof_ms[r] = 0, d->prof_calls[r] = 0, d->prof_nrows++;
        }
        d->prof_ms[r] += ms;
        d->prof_calls[r]++;
    }
    d->prof_nev = 0;
}

static void prof_write(td_cuda_dev *d) {
    if (!d->prof_path) return;
    FILE *f = fopen(d->prof_path, "w");
    if (!f) return;
    double total = 0;
    for (int r = 0; r < d->prof_nrows; r++) total += d->prof_ms[r];
    fprintf(f, "phase\ttotal_ms\tcalls\tms_per_step\tshare\n");
    for (int r = 0; r < d->prof_nrows; r++)
        fprintf(f, "%s\t%.3f\t%ld\t%.3f\t%.4f\n", d->prof_name[r], d->prof_ms[r], d->prof_calls[r],
                d->prof_steps ? d->prof_ms[r] / (double)d->prof_steps : 0.0, total > 0 ? d->prof_ms[r] / total : 0.0);
    fprintf(f, "# steps (AdamW calls): %ld; device time counted: %.3f ms\n", d->prof_steps, total);
    fclose(f);
}

/* ---- release, build -------------------------------------------------------------------------- */

static void cuda_release(td_model *m) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    if (!d) return;
    if (d->stream) cudaStreamSynchronize(d->stream);
    if (d->prof_path) {
        prof_flush(d);
        prof_write(d);
        for (int i = 0; i < PROF_MAX; i++)
            if (d->prof_ev[i]) cudaEventDestroy(d->prof_ev[i]);
    }
    free(d->prof_path);
    free(d->prof_ev);
    free(d->prof_evname);
    for (int i = 0; i < d->nallocs; i++) cudaFree(d->allocs[i]);
    if (d->h_tok) cudaFreeHost(d->h_tok);
    if (d->h_csr) cudaFreeHost(d->h_csr);
    if (d->h_losses) cudaFreeHost(d->h_losses);
    if (d->h_sq) cudaFreeHost(d->h_sq);
    if (d->lt) cublasLtDestroy(d->lt);
    if (d->stream) cudaStreamDestroy(d->stream);
    cudaGetLastError();
    free(d->h_count);
    free(d->allocs);
    free(d->cache);
    free(d->L);
    free(d->lo);
    free(d);
    m->device = NULL;
}

static td_status cuda_upload(td_model *m, int grads);

/* flash attention through the FlashAttention-2 kernels, which take the heads where they lie */
static int flash_rows(const td_cuda_dev *d) {
    return d->flash && td_flash_fa2((int)(d->m->n_embd / d->m->n_head));
}

static td_status cuda_build(td_model *m) {
    td_cuda_dev *d = (td_cuda_dev *)calloc(1, sizeof(td_cuda_dev));
    if (!d) return td_fail(m, TD_ERR_NOMEM, "td_model_build: out of host memory");
    m->device = d;
    d->m = m;
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev < 1) {
        cudaGetLastError();
        return td_fail(m, TD_ERR_CONFIG,
                       "td_model_build: backend=cuda but no CUDA device is usable "
                       "(cudaGetDeviceCount: %s, %d devices). HINT: run on a GPU host; check the "
                       "driver and CUDA_VISIBLE_DEVICES",
                       cudaGetErrorString(e), ndev);
    }
    /* flash | store | recompute | unset. Unset: flash in bf16 mode when the head size has the
     * FlashAttention-2 kernels (td_flash_fa2: 16..64, every GPT-2 size; 4.6-7.3x faster than the
     * first flash kernels, 124M steps 70.4 -> 50.4 ms, docs/cuda.md); else store the
     * probabilities when they fit, else recompute them. flash is also accepted for head sizes
     * 80..128 (the slower first kernels). fp32 mode never takes flash. */
    const char *att_env = getenv("TANDEM_CUDA_ATTENTION");
    if (att_env && !*att_env) att_env = NULL;
    if (att_env && strcmp(att_env, "flash") && strcmp(att_env, "store") && strcmp(att_env, "recompute"))
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: TANDEM_CUDA_ATTENTION=%s (allowed: flash, store, recompute, or unset for automatic)", att_env);
    const int flash_ok = m->bf16 && td_flash_supported((int)(m->n_embd / m->n_head));
    if (att_env && !strcmp(att_env, "flash") && !flash_ok)
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: TANDEM_CUDA_ATTENTION=flash needs bf16=1 and a head size n_embd/n_head that is a multiple of 16 up to 128 (bf16=%lld, head size %lld)", (long long)m->bf16, (long long)(m->n_embd / m->n_head));
    d->flash = att_env ? !strcmp(att_env, "flash") : flash_ok && td_flash_fa2((int)(m->n_embd / m->n_head));

    const char *tune_env = getenv("TANDEM_CUDA_GEMM_TUNE");
    if (td_cuda_gemm_tune_mode(tune_env, &d->tune))
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: TANDEM_CUDA_GEMM_TUNE=%s (allowed: auto, off, all, or unset for auto)", tune_env);
    TD_CK(cudaGetDevice(&d->dev));
    d->bf16 = m->bf16 != 0;
    d->es = d->bf16 ? 2 : 4;
    const char *prof_env = getenv("TANDEM_CUDA_PROFILE");
    if (prof_env && *prof_env) {
        d->prof_path = strdup(prof_env);
        d->prof_ev = (cudaEvent_t *)calloc(PROF_MAX, sizeof(cudaEvent_t));
        d->prof_evname = (const char **)calloc(PROF_MAX, sizeof(char *));
        if (!d->prof_path || !d->prof_ev || !d->prof_evname)
            return td_fail(m, TD_ERR_NOMEM, "td_model_build: out of host memory");
    }
    TD_CK(cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking));
    cublasStatus_t ls = cublasLtCreate(&d->lt);
    if (ls != CUBLAS_STATUS_SUCCESS)
        return td_fail(m, TD_ERR_INTERNAL, "td_model_build: cublasLtCreate failed (%s)", cublasLtGetStatusString(ls));
    d->ws_bytes = (size_t)32 << 20;
    ALLOC(d->ws, d->ws_bytes, "the cuBLASLt workspace");
    d->cache = (td_mm_cache_entry *)calloc(TD_MM_CACHE, sizeof(td_mm_cache_entry));
    d->L = (td_cuda_layer *)calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_cuda_layer));
    d->lo = (td_cuda_layer_off *)calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_cuda_layer_off));
    d->h_count = (int *)calloc((size_t)m->vocab_size, sizeof(int));
    if (!d->cache || !d->L || !d->lo || !d->h_count)
        return td_fail(m, TD_ERR_NOMEM, "td_model_build: out of host memory");

    const size_t B = (size_t)m->batch_size, T = (size_t)m->seq_len, C = (size_t)m->n_embd;
    const size_t NH = (size_t)m->n_head, V = (size_t)m->vocab_size, es = d->es;
    const size_t BT = B * T, BTC = BT * C, total = m->total;
    d->Vp = (int)((V + 63) / 64 * 64);

    /* parameters and their offsets */
    ALLOC(d->p32, total * 4, "fp32 parameters");
    ALLOC(d->g32, total * 4, "fp32 gradients");
    ALLOC(d->mom, total * 4, "AdamW m");
    ALLOC(d->var, total * 4, "AdamW v");
    if (d->bf16) ALLOC(d->pc, total * 2, "the bf16 copy of the parameters");
    else d->pc = d->p32;
    d->off_wte = off_of(m, m->P.wte);
    d->off_wpe = off_of(m, m->P.wpe);
    d->off_lnfw = off_of(m, m->P.lnfw);
    d->off_lnfb = off_of(m, m->P.lnfb);
    for (int l = 0; l < m->nl; l++) {
        const td_layer_ptrs *W = &m->P.layers[l];
        td_cuda_layer_off *o = &d->lo[l];
        o->ln1w = off_of(m, W->ln1w), o->ln1b = off_of(m, W->ln1b);
        o->qkvw = off_of(m, W->qkvw), o->qkvb = off_of(m, W->qkvb);
        o->attprojw = off_of(m, W->attprojw), o->attprojb = off_of(m, W->attprojb);
        o->ln2w = off_of(m, W->ln2w), o->ln2b = off_of(m, W->ln2b);
        o->fcw = off_of(m, W->fcw), o->fcb = off_of(m, W->fcb);
        o->fcprojw = off_of(m, W->fcprojw), o->fcprojb = off_of(m, W->fcprojb);
    }
    {
        const int np = m->nparams;
        int64_t *se = (int64_t *)malloc(sizeof(int64_t) * (size_t)np);
        unsigned char *sd = (unsigned char *)malloc((size_t)np);
        if (!se || !sd) {
            free(se), free(sd);
            return td_fail(m, TD_ERR_NOMEM, "td_model_build: out of host memory");
        }
        for (int i = 0; i < np; i++) {
            se[i] = (int64_t)(m->params[i].offset + (size_t)m->params[i].numel);
            sd[i] = (unsigned char)(m->params[i].decayed != 0);
        }
        td_status st = dev_alloc(d, (void **)&d->seg_end, sizeof(int64_t) * (size_t)np, "the AdamW tensor table");
        if (!st) st = dev_alloc(d, (void **)&d->seg_decay, (size_t)np, "the AdamW tensor table");
        cudaError_t e1 = st ? cudaSuccess : cudaMemcpy(d->seg_end, se, sizeof(int64_t) * (size_t)np, cudaMemcpyHostToDevice);
        cudaError_t e2 = st ? cudaSuccess : cudaMemcpy(d->seg_decay, sd, (size_t)np, cudaMemcpyHostToDevice);
        free(se), free(sd);
        if (st) return st;
        TD_CK(e1);
        TD_CK(e2);
    }

    /* activations */
    ALLOC(d->input, BTC * es, "activations");
    for (int l = 0; l < m->nl; l++) {
        td_cuda_layer *A = &d->L[l];
        ALLOC(A->ln1, BTC * es, "activations");
        ALLOC(A->ln1_mean, BT * 4, "activations");
        ALLOC(A->ln1_rstd, BT * 4, "activations");
        ALLOC(A->qkv, 3 * BTC * es, "activations");
        ALLOC(A->atty, BTC * es, "activations");
        ALLOC(A->res2, BTC * es, "activations");
        ALLOC(A->ln2, BTC * es, "activations");
        ALLOC(A->ln2_mean, BT * 4, "activations");
        ALLOC(A->ln2_rstd, BT * 4, "activations");
        ALLOC(A->fch, 4 * BTC * es, "activations");
        ALLOC(A->fch_gelu, 4 * BTC * es, "activations");
        ALLOC(A->res3, BTC * es, "activations");
    }
    ALLOC(d->lnf, BTC * es, "activations");
    ALLOC(d->lnf_mean, BT * 4, "activations");
    ALLOC(d->lnf_rstd, BT * 4, "activations");
    ALLOC(d->logits, BT * (size_t)d->Vp * es, "the logits");
    ALLOC(d->wte_pad, (size_t)d->Vp * C * es, "the padded LM head");
    TD_CK(cudaMemsetAsync(d->wte_pad, 0, (size_t)d->Vp * C * es, d->stream));
    ALLOC(d->lse, BT * 4, "the loss statistics");
    ALLOC(d->losses, BT * 4, "the loss statistics");
    ALLOC(d->tok, 2 * BT * 4, "tokens and targets");
    ALLOC(d->csr, (3 * BT + 1) * 4, "the embedding-gradient buckets");

    /* scratch */
    const size_t att = B * NH * T * T * es;
    const size_t nchunks = (BT + TD_CS_ROWS - 1) / TD_CS_ROWS, nlnb = (BT + TD_LNB_ROWS_MIN - 1) / TD_LNB_ROWS_MIN;
    const size_t part = nchunks * 4 * C > nlnb * C ? nchunks * 4 * C : nlnb * C;
    ALLOC(d->dres, BTC * es, "backward scratch");
    ALLOC(d->dln, BTC * es, "backward scratch");
    ALLOC(d->dbig, 4 * BTC * es, "backward scratch");
    if (!flash_rows(d)) { /* the FlashAttention-2 kernels read and write the heads in place */
        ALLOC(d->qkvp, 3 * BTC * es, "attention scratch");
        ALLOC(d->yb, BTC * es, "attention scratch");
        ALLOC(d->dqkvp, 3 * BTC * es, "attention scratch");
    }
    if (!d->flash) ALLOC(d->attS, att, "attention scratch (B, NH, T, T)");
    ALLOC(d->part_w, part * 4, "column-sum partials");
    ALLOC(d->part_b, part * 4, "column-sum partials");
    ALLOC(d->part_o, part * 4, "column-sum partials");
    ALLOC(d->sq_part, (TD_SQ_BLOCKS + 1) * sizeof(double), "norm partials");

    /* keep every layer's attention probabilities when they fit with 2 GiB to spare */
    size_t fr = 0, tot = 0;
    TD_CK(cudaMemGetInfo(&fr, &tot));
    const size_t keep = (size_t)m->nl * att;
    if (d->flash) {
        d->store_att = 0;
        for (int l = 0; l < m->nl; l++) ALLOC(d->L[l].lse, B * NH * T * 4, "attention statistics");
        ALLOC(d->Dsum, B * NH * T * 4, "attention scratch");
    } else if (att_env) {
        d->store_att = !strcmp(att_env, "store");
    } else {
        d->store_att = keep + ((size_t)2 << 30) <= fr;
    }
    if (d->flash) {
    } else if (d->store_att) {
        for (int l = 0; l < m->nl; l++) ALLOC(d->L[l].att, att, "attention probabilities (B, NH, T, T) per layer");
    } else {
        ALLOC(d->attP, att, "attention scratch (B, NH, T, T)");
    }

    /* pinned host staging */
    TD_CK(cudaMallocHost((void **)&d->h_tok, 2 * BT * 4));
    TD_CK(cudaMallocHost((void **)&d->h_csr, (3 * BT + 1) * 4));
    TD_CK(cudaMallocHost((void **)&d->h_losses, BT * 4));
    TD_CK(cudaMallocHost((void **)&d->h_sq, sizeof(double)));

    TD_CK(cudaMemsetAsync(d->g32, 0, total * 4, d->stream));
    TD_CK(cudaMemsetAsync(d->mom, 0, total * 4, d->stream));
    TD_CK(cudaMemsetAsync(d->var, 0, total * 4, d->stream));
    return cuda_upload(m, 0);
}

/* ---- host <-> device ------------------------------------------------------------------------- */

/* the padded LM-head copy of wte follows the compute copy of the parameters */
static td_status refresh_wte_pad(td_cuda_dev *d) {
    const size_t bytes = (size_t)d->m->vocab_size * (size_t)d->m->n_embd * d->es;
    TD_CK(cudaMemcpyAsync(d->wte_pad, (const char *)d->pc + d->off_wte * d->es, bytes, cudaMemcpyDeviceToDevice, d->stream));
    return TD_OK;
}

static td_status cuda_upload(td_model *m, int grads) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    const size_t bytes = m->total * sizeof(float);
    if (grads) d->grad_zero = 0; /* overwritten whole */
    TD_CK(cudaMemcpyAsync(grads ? d->g32 : d->p32, grads ? m->grad_mem : m->param_mem, bytes,
                          cudaMemcpyHostToDevice, d->stream));
    if (!grads && d->bf16) TD_CK(td_k_cast_bf16(d->stream, (bf16 *)d->pc, d->p32, (long long)m->total));
    if (!grads) TD_TRY(refresh_wte_pad(d));
    TD_CK(cudaStreamSynchronize(d->stream));
    return TD_OK;
}

static td_status materialize_zero_grads(td_cuda_dev *d);

static td_status cuda_download(td_model *m, int grads) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    if (grads) TD_TRY(materialize_zero_grads(d));
    TD_CK(cudaMemcpyAsync(grads ? m->grad_mem : m->param_mem, grads ? d->g32 : d->p32,
                          m->total * sizeof(float), cudaMemcpyDeviceToHost, d->stream));
    TD_CK(cudaStreamSynchronize(d->stream));
    return TD_OK;
}

/* Rows of each distinct token, in ascending row order (a counting sort): the embedding
 * gradient sums them per token without atomics. Layout: uniq (BT) | off (BT+1) | rows (BT). */
static void build_buckets(td_cuda_dev *d, const int32_t *tok, int BT, int V) {
    int *cnt = d->h_count, *uniq = d->h_csr, *off = d->h_csr + BT, *rows = d->h_csr + 2 * BT + 1;
    memset(cnt, 0, sizeof(int) * (size_t)V);
    for (int i = 0; i < BT; i++) cnt[tok[i]]++;
    int nu = 0, pos = 0;
    for (int v = 0; v < V; v++) {
        if (!cnt[v]) continue;
        uniq[nu] = v;
        off[nu] = pos;
        int c = cnt[v];
        cnt[v] = pos;
        pos += c;
        nu++;
    }
    off[nu] = pos;
    for (int i = 0; i < BT; i++) rows[cnt[tok[i]]++] = i;
    d->n_uniq = nu;
}

/* ---- passes ---------------------------------------------------------------------------------- */

static td_status linear(td_cuda_dev *d, void *out, const void *inp, const void *w,
                        const void *bias, int N, int IC, int OC, const void *residual, int epi,
                        void *aux) {
    td_mm p;
    memset(&p, 0, sizeof p);
    p.out = out, p.ldo = OC;
    p.A = inp, p.lda = IC;
    p.B = w, p.ldb = OC;
    p.M = N, p.N = OC, p.K = IC;
    p.beta = residual ? 1.f : 0.f, p.C = residual;
    p.bias = bias, p.epi = epi, p.aux = aux, p.ldaux = OC;
    p.batch = 1;
    return td_cuda_matmul(d, &p);
}

/* dW(IC, OC) (+)= inp^T @ dout in fp32 (acc = 0: overwrite, the first contribution after a
 * lazy zero_grad) */
static td_status linear_dweight(td_cuda_dev *d, float *dw, const void *inp, const void *dout,
                                int N, int IC, int OC, int acc) {
    td_mm p;
    memset(&p, 0, sizeof p);
    p.out = dw, p.ldo = OC, p.out_f32 = 1;
    p.A = inp, p.lda = IC, p.transA = 1;
    p.B = dout, p.ldb = OC;
    p.M = IC, p.N = OC, p.K = N;
    p.beta = acc ? 1.f : 0.f;
    p.batch = 1;
    return td_cuda_matmul(d, &p);
}

/* dinp(N, IC) = dout(N, OC) @ W^T, with GELU' of aux applied when epi = TD_EPI_DGELU */
static td_status linear_dinput(td_cuda_dev *d, void *dinp, const void *dout, const void *w, int N,
                               int IC, int OC, int epi, void *aux) {
    td_mm p;
    memset(&p, 0, sizeof p);
    p.out = dinp, p.ldo = IC;
    p.A = dout, p.lda = OC;
    p.B = w, p.ldb = OC, p.transB = 1;
    p.M = N, p.N = IC, p.K = OC;
    p.epi = epi, p.aux = aux, p.ldaux = IC;
    p.batch = 1;
    return td_cuda_matmul(d, &p);
}

/* one strided-batched product over the B*NH heads: out = op(A) @ op(B), (M, N, K) per head */
static td_status heads_mm(td_cuda_dev *d, void *out, const void *A, int transA, const void *Bm,
                          int transB, int M, int N, int K, int lda, int ldb, int ldo,
                          long long sA, long long sB, long long sD, int batch) {
    td_mm p;
    memset(&p, 0, sizeof p);
    p.out = out, p.ldo = ldo;
    p.A = A, p.lda = lda, p.transA = transA;
    p.B = Bm, p.ldb = ldb, p.transB = transB;
    p.M = M, p.N = N, p.K = K;
    p.batch = batch, p.sA = sA, p.sB = sB, p.sD = sD;
    return td_cuda_matmul(d, &p);
}

template <typename E>
static td_status attention_forward(td_cuda_dev *d, int l, int B, int T) {
    const td_model *m = d->m;
    const int C = (int)m->n_embd, NH = (int)m->n_head, HS = C / NH;
    const long long BTC = (long long)B * T * C, TT = (long long)T * T, THS = (long long)T * HS;
    const float scale = (float)(1.0 / sqrt((double)HS));
    td_cuda_layer *A = &d->L[l];
    if (flash_rows(d)) { /* q, k, v read from the qkv rows, the output written into atty's rows */
        const bf16 *qkv = (const bf16 *)A->qkv;
        TD_CK(td_k_flash_forward_rows(d->stream, (bf16 *)A->atty, C, A->lse, qkv, qkv + C, qkv + 2 * C,
                                      3 * C, B, NH, T, HS, scale));
        return TD_OK;
    }
    E *qkvp = (E *)d->qkvp, *q = qkvp, *k = qkvp + BTC, *v = qkvp + 2 * BTC;
    E *S = (E *)d->attS, *P = (E *)(d->store_att ? A->att : d->attP);
    TD_CK(td_k_qkv_permute<E>(d->stream, qkvp, (const E *)A->qkv, B, T, NH, HS));
    if (d->flash) { /* bf16 only (build checks): E is bf16 whenever this runs */
        TD_CK(td_k_flash_forward(d->stream, (bf16 *)d->yb, A->lse, (const bf16 *)q, (const bf16 *)k,
                                 (const bf16 *)v, B * NH, T, HS, scale));
        TD_CK(td_k_head_unpermute<E>(d->stream, (E *)A->atty, (const E *)d->yb, B, T, NH, HS));
        return TD_OK;
    }
    TD_TRY(heads_mm(d, S, q, 0, k, 1, T, T, HS, HS, HS, T, THS, THS, TT, B * NH)); /* S = q k^T */
    TD_CK(td_k_attn_softmax_forward<E>(d->stream, P, S, (long long)B * NH * T, T, scale));
    TD_TRY(heads_mm(d, d->yb, P, 0, v, 0, T, HS, T, T, HS, HS, TT, THS, THS, B * NH)); /* y = P v */
    TD_CK(td_k_head_unpermute<E>(d->stream, (E *)A->atty, (const E *)d->yb, B, T, NH, HS));
    return TD_OK;
}

/* dqkv (B, T, 3C) from datty (B, T, C) */
template <typename E>
static td_status attention_backward(td_cuda_dev *d, int l, int B, int T, E *dqkv, const E *datty) {
    const td_model *m = d->m;
    const int C = (int)m->n_embd, NH = (int)m->n_head, HS = C / NH;
    const long long BTC = (long long)B * T * C, TT = (long long)T * T, THS = (long long)T * HS;
    const float scale = (float)(1.0 / sqrt((double)HS));
    td_cuda_layer *A = &d->L[l];
    if (flash_rows(d)) { /* d(qkv) written in place from the qkv rows and d(atty) */
        const bf16 *qkv = (const bf16 *)A->qkv;
        bf16 *g = (bf16 *)dqkv;
        TD_CK(td_k_attn_rowdot(d->stream, d->Dsum, (const bf16 *)datty, (const bf16 *)A->atty, B, T, NH, HS));
        TD_CK(td_k_flash_backward_rows(d->stream, g, g + C, g + 2 * C, 3 * C, qkv, qkv + C, qkv + 2 * C,
                                       3 * C, (const bf16 *)datty, C, A->lse, d->Dsum, B, NH, T, HS, scale));
        return TD_OK;
    }
    E *qkvp = (E *)d->qkvp, *q = qkvp, *k = qkvp + BTC, *v = qkvp + 2 * BTC;
    E *dqkvp = (E *)d->dqkvp, *dq = dqkvp, *dk = dqkvp + BTC, *dv = dqkvp + 2 * BTC;
    E *dy = (E *)d->yb, *dS = (E *)d->attS;
    E *P = (E *)(d->store_att ? A->att : d->attP);
    TD_CK(td_k_qkv_permute<E>(d->stream, qkvp, (const E *)A->qkv, B, T, NH, HS));
    TD_CK(td_k_head_permute<E>(d->stream, dy, datty, B, T, NH, HS));
    if (d->flash) {
        TD_CK(td_k_attn_rowdot(d->stream, d->Dsum, (const bf16 *)datty, (const bf16 *)A->atty, B, T, NH, HS));
        TD_CK(td_k_flash_backward(d->stream, (bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)q,
                                  (const bf16 *)k, (const bf16 *)v, (const bf16 *)dy, A->lse,
                                  d->Dsum, B * NH, T, HS, scale));
        TD_CK(td_k_qkv_unpermute<E>(d->stream, dqkv, dqkvp, B, T, NH, HS));
        return TD_OK;
    }
    if (!d->store_att) { /* recompute the probabilities exactly as the forward did */
        TD_TRY(heads_mm(d, dS, q, 0, k, 1, T, T, HS, HS, HS, T, THS, THS, TT, B * NH));
        TD_CK(td_k_attn_softmax_forward<E>(d->stream, P, dS, (long long)B * NH * T, T, scale));
    }
    TD_TRY(heads_mm(d, dS, dy, 0, v, 1, T, T, HS, HS, HS, T, THS, THS, TT, B * NH)); /* dP = dy v^T */
    TD_TRY(heads_mm(d, dv, P, 1, dy, 0, T, HS, T, T, HS, HS, TT, THS, THS, B * NH)); /* dv = P^T dy */
    TD_CK(td_k_attn_softmax_backward<E>(d->stream, dS, P, (long long)B * NH * T, T, scale));
    TD_TRY(heads_mm(d, dq, dS, 0, k, 0, T, HS, T, T, HS, HS, TT, THS, THS, B * NH)); /* dq = dS k */
    TD_TRY(heads_mm(d, dk, dS, 1, q, 0, T, HS, T, T, HS, HS, TT, THS, THS, B * NH)); /* dk = dS^T q */
    TD_CK(td_k_qkv_unpermute<E>(d->stream, dqkv, dqkvp, B, T, NH, HS));
    return TD_OK;
}

template <typename E>
static td_status forward_impl(td_cuda_dev *d, float *logits_out, double *out_loss, int with_targets) {
    td_model *m = d->m;
    const td_slot *s = &m->slot[0];
    const int B = s->B, T = s->T, C = (int)m->n_embd, V = (int)m->vocab_size, Vp = d->Vp;
    const int BT = B * T;
    cudaStream_t st = d->stream;
    const E *W = (const E *)d->pc;
    d->fwd_targets = 0;

    /* tokens (and targets) through pinned staging; the previous copy must be done with it */
    TD_CK(cudaStreamSynchronize(st));
    memcpy(d->h_tok, s->tokens, sizeof(int) * (size_t)BT);
    if (with_targets) {
        memcpy(d->h_tok + BT, s->targets, sizeof(int) * (size_t)BT);
        build_buckets(d, s->tokens, BT, V);
        TD_CK(cudaMemcpyAsync(d->csr, d->h_csr, sizeof(int) * (size_t)(3 * BT + 1), cudaMemcpyHostToDevice, st));
    }
    TD_CK(cudaMemcpyAsync(d->tok, d->h_tok, sizeof(int) * (size_t)BT * (with_targets ? 2 : 1), cudaMemcpyHostToDevice, st));

    E *x0 = (E *)d->input;
    prof(d, "fwd: embedding");
    TD_CK(td_k_encoder_forward<E>(st, x0, d->tok, W + d->off_wte, W + d->off_wpe, B, T, C));
    for (int l = 0; l < m->nl; l++) {
        td_cuda_layer *A = &d->L[l];
        const td_cuda_layer_off *o = &d->lo[l];
        const E *res = l == 0 ? x0 : (const E *)d->L[l - 1].res3;
        prof(d, "fwd: layernorm");
        TD_CK(td_k_layernorm_forward<E>(st, (E *)A->ln1, A->ln1_mean, A->ln1_rstd, res, W + o->ln1w, W + o->ln1b, BT, C));
        prof(d, "fwd: matmul");
        TD_TRY(linear(d, A->qkv, A->ln1, W + o->qkvw, W + o->qkvb, BT, C, 3 * C, NULL, TD_EPI_NONE, NULL));
        prof(d, "fwd: attention");
        TD_TRY(attention_forward<E>(d, l, B, T));
        prof(d, "fwd: matmul");
        /* res2 = res + atty @ W + b: the residual add rides in the product (beta = 1) */
        TD_TRY(linear(d, A->res2, A->atty, W + o->attprojw, W + o->attprojb, BT, C, C, res, TD_EPI_NONE, NULL));
        prof(d, "fwd: layernorm");
        TD_CK(td_k_layernorm_forward<E>(st, (E *)A->ln2, A->ln2_mean, A->ln2_rstd, (const E *)A->res2, W + o->ln2w, W + o->ln2b, BT, C));
        prof(d, "fwd: matmul");
        TD_TRY(linear(d, A->fch_gelu, A->ln2, W + o->fcw, W + o->fcb, BT, C, 4 * C, NULL, TD_EPI_GELU, A->fch));
        TD_TRY(linear(d, A->res3, A->fch_gelu, W + o->fcprojw, W + o->fcprojb, BT, 4 * C, C, A->res2, TD_EPI_NONE, NULL));
    }
    const E *res = m->nl ? (const E *)d->L[m->nl - 1].res3 : x0;
    prof(d, "fwd: layernorm");
    TD_CK(td_k_layernorm_forward<E>(st, (E *)d->lnf, d->lnf_mean, d->lnf_rstd, res, W + d->off_lnfw, W + d->off_lnfb, BT, C));
    {
        prof(d, "head: logits matmul");
        td_mm p; /* logits (BT, V), rows Vp apart = lnf @ wte^T */
        memset(&p, 0, sizeof p);
        p.out = d->logits, p.ldo = Vp;
        p.A = d->lnf, p.lda = C;
        p.B = d->wte_pad, p.ldb = C, p.transB = 1;
        p.M = BT, p.N = Vp, p.K = C, p.batch = 1; /* columns V.. are 0: wte_pad's rows are */
        TD_TRY(td_cuda_matmul(d, &p));
    }
    prof(d, "(end)");
    if (logits_out) {
        if (!d->bf16) {
            TD_CK(cudaMemcpy2DAsync(logits_out, sizeof(float) * (size_t)V, d->logits, sizeof(float) * (size_t)Vp,
                                    sizeof(float) * (size_t)V, (size_t)BT, cudaMemcpyDeviceToHost, st));
            TD_CK(cudaStreamSynchronize(st));
        } else {
            uint16_t *tmp = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)BT * V);
            if (!tmp) return td_fail(m, TD_ERR_NOMEM, "td_model_forward: no host memory for %d x %d bf16 logits", BT, V);
            cudaError_t e = cudaMemcpy2DAsync(tmp, 2 * (size_t)V, d->logits, 2 * (size_t)Vp, 2 * (size_t)V, (size_t)BT, cudaMemcpyDeviceToHost, st);
            if (e == cudaSuccess) e = cudaStreamSynchronize(st);
            if (e == cudaSuccess)
                for (size_t i = 0; i < (size_t)BT * V; i++) {
                    uint32_t bits = (uint32_t)tmp[i] << 16;
                    memcpy(&logits_out[i], &bits, 4);
                }
            free(tmp);
            TD_CK(e);
        }
    }
    if (with_targets) {
        prof(d, "head: softmax + cross-entropy");
        TD_CK(td_k_crossentropy_forward<E>(st, d->losses, d->lse, (const E *)d->logits, d->tok + BT, BT, V, Vp));
        prof(d, "(end)");
        TD_CK(cudaMemcpyAsync(d->h_losses, d->losses, sizeof(float) * (size_t)BT, cudaMemcpyDeviceToHost, st));
        TD_CK(cudaStreamSynchronize(st));
        prof_flush(d);
        double sum = 0.0; /* in row order, in double, like the CPU */
        for (int i = 0; i < BT; i++) sum += d->h_losses[i];
        if (out_loss) *out_loss = sum / BT;
        d->fwd_B = B, d->fwd_T = T, d->fwd_targets = 1;
    }
    return TD_OK;
}

template <typename E>
static td_status backward_impl(td_cuda_dev *d, double grad_scale) {
    td_model *m = d->m;
    if (!d->fwd_targets)
        return td_fail(m, TD_ERR_STATE, "td_model_forward_backward: the CUDA backward needs a forward with targets first");
    const int B = d->fwd_B, T = d->fwd_T, C = (int)m->n_embd, V = (int)m->vocab_size, Vp = d->Vp;
    const int BT = B * T;
    cudaStream_t st = d->stream;
    const E *W = (const E *)d->pc;
    float *G = d->g32;
    E *dres = (E *)d->dres, *dln = (E *)d->dln, *dbig = (E *)d->dbig, *x0 = (E *)d->input;
    d->fwd_targets = 0;
    /* after a zero_grad each gradient's first contribution overwrites it (acc = 0): every
     * element of every tensor is written below, wpe's rows past T by a memset */
    const int acc = !d->grad_zero;

    /* loss = mean over BT rows: each row's d(loss) is grad_scale / BT; d(logits) in place */
    prof(d, "head: cross-entropy backward");
    TD_CK(td_k_crossentropy_backward<E>(st, (E *)d->logits, d->lse, d->tok + BT, (float)(grad_scale / BT), BT, V, Vp));
    {
        prof(d, "head: matmuls backward");
        td_mm p; /* d lnf = dlogits @ wte */
        memset(&p, 0, sizeof p);
        p.out = dln, p.ldo = C;
        p.A = d->logits, p.lda = Vp;
        p.B = d->wte_pad, p.ldb = C;
        p.M = BT, p.N = C, p.K = Vp, p.batch = 1; /* d(logits) is 0 in the padding columns */
        TD_TRY(td_cuda_matmul(d, &p));
        /* dwte += dlogits^T @ lnf, as two products: rows [0, Vm) with Vm a multiple of 128 and
         * the rest. With M = V = 50257 rows the whole product ran at ~450 TFLOP/s on an H200
         * (2.9 ms at 1.5B) against ~800 for the same work over aligned rows. */
        const int Vm = V > 128 && V % 128 ? V / 128 * 128 : V;
        for (int part = 0; part < 2; part++) {
            const int r0 = part ? Vm : 0, nr = part ? V - Vm : Vm;
            if (nr <= 0) continue;
            memset(&p, 0, sizeof p);
            p.out = G + d->off_wte + (size_t)r0 * C, p.ldo = C, p.out_f32 = 1;
            p.A = (const E *)d->logits + r0, p.lda = Vp, p.transA = 1;
            p.B = d->lnf, p.ldb = C;
            p.M = nr, p.N = C, p.K = BT, p.beta = acc ? 1.f : 0.f, p.batch = 1;
            TD_TRY(td_cuda_matmul(d, &p));
        }
    }
    const E *res_last = m->nl ? (const E *)d->L[m->nl - 1].res3 : x0;
    /* Each LayerNorm backward below also sums its output (the residual gradient) over the rows:
     * that is the bias gradient of the projection whose output joins the residual there (the
     * last layer's MLP projection here, then per layer the attention projection (LN2) and the
     * previous layer's MLP projection (LN1)). */
    prof(d, "bwd: layernorm + weight sums");
    TD_CK(td_k_layernorm_backward<E>(st, dres, G + d->off_lnfw, G + d->off_lnfb,
                                     m->nl ? G + d->lo[m->nl - 1].fcprojb : NULL, d->part_w, d->part_b,
                                     d->part_o, dln, res_last, W + d->off_lnfw, d->lnf_mean, d->lnf_rstd,
                                     BT, C, 0, acc));

    for (int l = m->nl - 1; l >= 0; l--) {
        td_cuda_layer *A = &d->L[l];
        const td_cuda_layer_off *o = &d->lo[l];
        const E *res = l == 0 ? x0 : (const E *)d->L[l - 1].res3;
        /* MLP block: res3 = res2 + fcproj(gelu(fc(ln2(res2)))) */
        prof(d, "bwd: matmul");
        TD_TRY(linear_dinput(d, dbig, dres, W + o->fcprojw, BT, 4 * C, C, TD_EPI_DGELU, A->fch)); /* d fch */
        TD_TRY(linear_dweight(d, G + o->fcprojw, A->fch_gelu, dres, BT, 4 * C, C, acc));
        TD_TRY(linear_dinput(d, dln, dbig, W + o->fcw, BT, C, 4 * C, TD_EPI_NONE, NULL));
        TD_TRY(linear_dweight(d, G + o->fcw, A->ln2, dbig, BT, C, 4 * C, acc));
        prof(d, "bwd: bias sums");
        TD_CK(td_k_colsum<E>(st, NULL, G + o->fcb, NULL, d->part_b, dbig, NULL, NULL, NULL, BT, 4 * C, acc));
        prof(d, "bwd: layernorm + weight sums");
        TD_CK(td_k_layernorm_backward<E>(st, dres, G + o->ln2w, G + o->ln2b, G + o->attprojb, d->part_w,
                                         d->part_b, d->part_o, dln, (const E *)A->res2, W + o->ln2w,
                                         A->ln2_mean, A->ln2_rstd, BT, C, 1, acc));
        /* attention block: res2 = res + attproj(attention(qkv(ln1(res)))) */
        prof(d, "bwd: matmul");
        TD_TRY(linear_dinput(d, dln, dres, W + o->attprojw, BT, C, C, TD_EPI_NONE, NULL)); /* d atty */
        TD_TRY(linear_dweight(d, G + o->attprojw, A->atty, dres, BT, C, C, acc));
        prof(d, "bwd: attention");
        TD_TRY(attention_backward<E>(d, l, B, T, dbig, dln)); /* d qkv */
        prof(d, "bwd: matmul");
        TD_TRY(linear_dinput(d, dln, dbig, W + o->qkvw, BT, C, 3 * C, TD_EPI_NONE, NULL));
        TD_TRY(linear_dweight(d, G + o->qkvw, A->ln1, dbig, BT, C, 3 * C, acc));
        prof(d, "bwd: bias sums");
        TD_CK(td_k_colsum<E>(st, NULL, G + o->qkvb, NULL, d->part_b, dbig, NULL, NULL, NULL, BT, 3 * C, acc));
        prof(d, "bwd: layernorm + weight sums");
        TD_CK(td_k_layernorm_backward<E>(st, dres, G + o->ln1w, G + o->ln1b, l ? G + d->lo[l - 1].fcprojb : NULL,
                                         d->part_w, d->part_b, d->part_o, dln, res, W + o->ln1w,
                                         A->ln1_mean, A->ln1_rstd, BT, C, 1, acc));
    }
    prof(d, "bwd: embedding");
    /* wte: added to the head's product, which wrote every row; wpe: rows past T get nothing */
    TD_CK(td_k_encoder_backward<E>(st, G + d->off_wte, G + d->off_wpe, dres, d->csr, d->n_uniq, B, T, C, acc));
    if (!acc && T < m->n_positions)
        TD_CK(cudaMemsetAsync(G + d->off_wpe + (size_t)T * C, 0, sizeof(float) * (size_t)(m->n_positions - T) * C, st));
    prof(d, "(end)");
    d->grad_zero = 0;
    return TD_OK;
}

static td_status cuda_forward(td_model *m, float *logits_out, double *out_loss, int with_targets) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    return d->bf16 ? forward_impl<bf16>(d, logits_out, out_loss, with_targets)
                   : forward_impl<float>(d, logits_out, out_loss, with_targets);
}

static td_status cuda_backward(td_model *m, double grad_scale) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    return d->bf16 ? backward_impl<bf16>(d, grad_scale) : backward_impl<float>(d, grad_scale);
}

/* Lazy zero_grad: the gradients read as zero from here on, but nothing is written (a memset
 * of every gradient, 1.8 ms a step at 1.5B): the next backward's first contribution to each
 * tensor overwrites it instead of adding. Whatever reads the gradients before that backward
 * (download, the norm, AdamW) writes the zeros first (materialize_zero_grads). */
static td_status cuda_zero_grad(td_model *m) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    d->grad_zero = 1;
    return TD_OK;
}

static td_status materialize_zero_grads(td_cuda_dev *d) {
    if (!d->grad_zero) return TD_OK;
    TD_CK(cudaMemsetAsync(d->g32, 0, d->m->total * sizeof(float), d->stream));
    d->grad_zero = 0;
    return TD_OK;
}

static td_status cuda_grad_sq_sum(td_model *m, double *out) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    TD_TRY(materialize_zero_grads(d));
    prof(d, "grad_sq_sum");
    TD_CK(td_k_sq_sum(d->stream, d->sq_part, d->g32, (long long)m->total));
    prof(d, "(end)");
    TD_CK(cudaMemcpyAsync(d->h_sq, d->sq_part + TD_SQ_BLOCKS, sizeof(double), cudaMemcpyDeviceToHost, d->stream));
    TD_CK(cudaStreamSynchronize(d->stream));
    *out = *d->h_sq;
    return TD_OK;
}

/* docs/model.md's AdamW; the step counter, bias corrections and clip scale as optim.c has them.
 * Returns once the update (and the bf16 refresh) is done on the device. */
static td_status cuda_adamw(td_model *m, double grad_norm) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    m->step += 1;
    const double t = (double)m->step;
    const float bc1 = (float)(1.0 - pow(m->beta1, t)), bc2 = (float)(1.0 - pow(m->beta2, t));
    float clip = 1.f;
    if (m->grad_clip > 0 && grad_norm > m->grad_clip) clip = (float)(m->grad_clip / grad_norm);
    TD_TRY(materialize_zero_grads(d));
    prof(d, "adamw");
    TD_CK(td_k_adamw(d->stream, d->p32, d->g32, d->mom, d->var, d->bf16 ? (bf16 *)d->pc : NULL,
                     (long long)m->total, d->seg_end, d->seg_decay, m->nparams, (float)m->beta1,
                     (float)m->beta2, bc1, bc2, (float)m->lr, (float)m->eps,
                     (float)m->weight_decay, clip));
    TD_TRY(refresh_wte_pad(d));
    prof(d, "(end)");
    TD_CK(cudaStreamSynchronize(d->stream));
    prof_flush(d);
    d->prof_steps++;
    return TD_OK;
}

static const td_backend_ops CUDA_OPS = {
    "cuda",          cuda_build,    cuda_release,     cuda_upload, cuda_download,
    cuda_forward,    cuda_backward, cuda_zero_grad,   cuda_grad_sq_sum, cuda_adamw,
};

extern "C" const td_backend_ops *td_cuda_ops(void) { return &CUDA_OPS; }
