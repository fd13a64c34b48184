/* backend.cu — td_cuda_ops: one model stage (the whole model when stages = 1) on one GPU, GPT-2
 * (passes.cu) or Llama (family = 1: llama_build.cu allocates its buffers, llama_passes.cu runs it).
 *
 * build allocates everything once (fp32 master weights, gradients, AdamW m and v in the host's
 * flat layout, a bf16 copy of the weights in bf16 mode, activations for (batch_size, seq_len) per
 * slot, what a split backward keeps between B and W, scratch); the passes (passes.cu) and AdamW
 * then run as kernels and cuBLASLt products on one stream, in the same order and with the same
 * maths as model.c and optim.c on the CPU. The host buffers param_mem / grad_mem stay the staging
 * area for get/set and safetensors (upload / download).
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

td_status td_cuda_alloc(td_cuda_dev *d, void **out, size_t bytes, const char *what) {
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
    d->bytes += bytes;
    return TD_OK;
}

#define ALLOC(ptr, bytes, what) TD_TRY(td_cuda_alloc(d, (void **)&(ptr), (bytes), (what)))

static size_t off_of(const td_model *m, const td_real *p) { return (size_t)(p - m->param_mem); }

/* ---- optional phase timing (TANDEM_CUDA_PROFILE=<file>) --------------------------------------
 * prof() records an event at the start of a phase; the device time to the next event is the
 * phase's. "(end)" closes a run of phases (what follows it, host time, is not counted).
 * prof_flush() runs after a stream synchronisation. Off (one branch per call) when unset. */
#define PROF_MAX 8192

void td_cuda_prof(td_cuda_dev *d, const char *name) {
    if (!d->prof_path || d->prof_nev >= PROF_MAX) return;
    if (!d->prof_ev[d->prof_nev] && cudaEventCreate(&d->prof_ev[d->prof_nev]) != cudaSuccess) {
        cudaGetLastError();
        return;
    }
    cudaEventRecord(d->prof_ev[d->prof_nev], d->stream);
    d->prof_evname[d->prof_nev++] = name;
}

void td_cuda_prof_flush(td_cuda_dev *d) {
    if (!d->prof_path) return;
    if (d->prof_steps < d->prof_skip) { /* a warm-up step: its events are dropped */
        d->prof_nev = 0;
        return;
    }
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
    const long counted = d->prof_steps - (d->prof_skip < d->prof_steps ? d->prof_skip : d->prof_steps);
    fprintf(f, "phase\ttotal_ms\tcalls\tms_per_step\tshare\n");
    for (int r = 0; r < d->prof_nrows; r++)
        fprintf(f, "%s\t%.3f\t%ld\t%.3f\t%.4f\n", d->prof_name[r], d->prof_ms[r], d->prof_calls[r],
                counted ? d->prof_ms[r] / (double)counted : 0.0, total > 0 ? d->prof_ms[r] / total : 0.0);
    fprintf(f, "# steps (AdamW calls) counted: %ld of %ld (TANDEM_CUDA_PROFILE_SKIP=%ld); device time counted: %.3f ms\n",
            counted, d->prof_steps, d->prof_skip, total);
    fclose(f);
}

/* ---- release, build -------------------------------------------------------------------------- */

static void cuda_release(td_model *m) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    if (!d) return;
    if (d->stream) cudaStreamSynchronize(d->stream);
    if (d->prof_path) {
        td_cuda_prof_flush(d);
        prof_write(d);
        for (int i = 0; i < PROF_MAX; i++)
            if (d->prof_ev[i]) cudaEventDestroy(d->prof_ev[i]);
    }
    free(d->prof_path);
    free(d->prof_ev);
    free(d->prof_evname);
    for (int i = 0; i < d->nallocs; i++) cudaFree(d->allocs[i]);
    for (int64_t k = 0; d->S && k < m->slots; k++) {
        td_cuda_slot *S = &d->S[k];
        if (S->h_tok) cudaFreeHost(S->h_tok);
        if (S->h_csr) cudaFreeHost(S->h_csr);
        if (S->staged) cudaEventDestroy(S->staged);
        free(S->L);
        free(S->Wg);
        free(S->LL);
        free(S->LWg);
    }
    free(d->S);
    if (d->h_losses) cudaFreeHost(d->h_losses);
    free(d->ring_bt);
    if (d->h_sq) cudaFreeHost(d->h_sq);
    if (d->lt) cublasLtDestroy(d->lt);
    if (d->stream) cudaStreamDestroy(d->stream);
    cudaGetLastError();
    free(d->h_count);
    free(d->allocs);
    free(d->cache);
    free(d->lo);
    free(d->llo);
    free(d);
    m->device = NULL;
}

static td_status cuda_upload(td_model *m, int grads);

/* flash attention through the FlashAttention-2 kernels, which take the heads where they lie */
int td_cuda_flash_rows(const td_cuda_dev *d) {
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
    /* llama: only the FlashAttention-2 kernels have the grouped-query (kv head) mapping */
    const int llama = m->family == 1, hs = (int)(m->n_embd / m->n_head);
    const int flash_ok = m->bf16 && (llama ? td_flash_fa2(hs) : td_flash_supported(hs));
    if (att_env && !strcmp(att_env, "flash") && !flash_ok)
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: TANDEM_CUDA_ATTENTION=flash needs bf16=1 and a head size n_embd/n_head %s (bf16=%lld, head size %lld). HINT: unset it for the materialised attention", llama ? "of 16, 32, 48 or 64 for llama" : "that is a multiple of 16 up to 128", (long long)m->bf16, (long long)hs);
    d->flash = att_env ? !strcmp(att_env, "flash") : flash_ok && td_flash_fa2((int)(m->n_embd / m->n_head));

    /* warps per block of the FlashAttention-2 forward, dK/dV and dQ kernels ("F,KV,Q", each 4
     * or 8; unset: the measured defaults of flash_fwd.cu). Bit-identical results either way. */
    const char *warps_env = getenv("TANDEM_CUDA_FLASH_WARPS");
    if (warps_env && *warps_env) {
        td_flash_warps w;
        char tail = 0;
        if (sscanf(warps_env, "%d,%d,%d%c", &w.fwd, &w.kv, &w.q, &tail) != 3 ||
            td_flash_set_warps(w) != cudaSuccess)
            return td_fail(m, TD_ERR_CONFIG, "td_model_build: TANDEM_CUDA_FLASH_WARPS=%s (expected F,KV,Q with each 4 or 8, e.g. 8,8,4; or unset for the defaults)", warps_env);
    } else {
        td_flash_set_warps(td_flash_default_warps());
    }

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
        const char *skip = getenv("TANDEM_CUDA_PROFILE_SKIP"); /* warm-up steps (GEMM tuning) */
        d->prof_skip = skip && *skip ? strtol(skip, NULL, 10) : 0;
        if (d->prof_skip < 0) d->prof_skip = 0;
    }
    TD_CK(cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking));
    cublasStatus_t ls = cublasLtCreate(&d->lt);
    if (ls != CUBLAS_STATUS_SUCCESS)
        return td_fail(m, TD_ERR_INTERNAL, "td_model_build: cublasLtCreate failed (%s)", cublasLtGetStatusString(ls));
    d->ws_bytes = (size_t)32 << 20;
    ALLOC(d->ws, d->ws_bytes, "the cuBLASLt workspace");
    d->cache = (td_mm_cache_entry *)calloc(TD_MM_CACHE, sizeof(td_mm_cache_entry));
    d->lo = (td_cuda_layer_off *)calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_cuda_layer_off));
    d->h_count = (int *)calloc((size_t)m->vocab_size, sizeof(int));
    if (!d->cache || !d->lo || !d->h_count)
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
    /* offsets of the tensors this stage holds (0 for those it does not: never read) */
    d->off_wte = m->P.wte ? off_of(m, m->P.wte) : 0;
    d->off_wpe = m->P.wpe ? off_of(m, m->P.wpe) : 0;
    d->off_lnfw = m->P.lnfw ? off_of(m, m->P.lnfw) : 0;
    d->off_lnfb = m->P.lnfb ? off_of(m, m->P.lnfb) : 0;
    d->off_head = d->off_wte; /* tied (llama_build.cu sets lm_head's) */
    for (int l = 0; !llama && l < m->nl; l++) {
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
        td_status st = td_cuda_alloc(d, (void **)&d->seg_end, sizeof(int64_t) * (size_t)np, "the AdamW tensor table");
        if (!st) st = td_cuda_alloc(d, (void **)&d->seg_decay, (size_t)np, "the AdamW tensor table");
        cudaError_t e1 = st ? cudaSuccess : cudaMemcpy(d->seg_end, se, sizeof(int64_t) * (size_t)np, cudaMemcpyHostToDevice);
        cudaError_t e2 = st ? cudaSuccess : cudaMemcpy(d->seg_decay, sd, (size_t)np, cudaMemcpyHostToDevice);
        free(se), free(sd);
        if (st) return st;
        TD_CK(e1);
        TD_CK(e2);
    }

    if (llama) { /* its activations, scratch and attention buffers: llama_build.cu */
        TD_TRY(td_cuda_llama_build(d));
        return cuda_upload(m, 0);
    }

    /* activations: one set per slot; the head's and the embedding's only where the stage has them */
    const int split = m->split_backward != 0;
    d->S = (td_cuda_slot *)calloc((size_t)m->slots, sizeof(td_cuda_slot));
    if (!d->S) return td_fail(m, TD_ERR_NOMEM, "td_model_build: out of host memory");
    for (int64_t k = 0; k < m->slots; k++) {
        td_cuda_slot *S = &d->S[k];
        S->L = (td_cuda_layer *)calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_cuda_layer));
        S->Wg = (td_cuda_wgrad *)calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_cuda_wgrad));
        if (!S->L || !S->Wg) return td_fail(m, TD_ERR_NOMEM, "td_model_build: out of host memory");
        TD_CK(cudaEventCreateWithFlags(&S->staged, cudaEventDisableTiming));
        ALLOC(S->input, BTC * es, "activations");
        for (int l = 0; l < m->nl; l++) {
            td_cuda_layer *A = &S->L[l];
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
            if (split) {
                td_cuda_wgrad *K = &S->Wg[l];
                ALLOC(K->fcproj, BTC * es, "the split backward's kept gradients");
                ALLOC(K->fc, 4 * BTC * es, "the split backward's kept gradients");
                ALLOC(K->attproj, BTC * es, "the split backward's kept gradients");
                ALLOC(K->qkv, 3 * BTC * es, "the split backward's kept gradients");
            }
        }
        if (m->has_head) {
            ALLOC(S->lnf, BTC * es, "activations");
            ALLOC(S->lnf_mean, BT * 4, "activations");
            ALLOC(S->lnf_rstd, BT * 4, "activations");
            ALLOC(S->logits, BT * (size_t)d->Vp * es, "the logits");
            ALLOC(S->lse, BT * 4, "the loss statistics");
            ALLOC(S->losses, BT * 4, "the loss statistics");
        }
        if (m->has_embed || m->has_head) {
            ALLOC(S->tok, 2 * BT * 4, "tokens and targets");
            TD_CK(cudaMallocHost((void **)&S->h_tok, 2 * BT * 4));
        }
        if (m->has_embed) {
            ALLOC(S->csr, (3 * BT + 1) * 4, "the embedding-gradient buckets");
            TD_CK(cudaMallocHost((void **)&S->h_csr, (3 * BT + 1) * 4));
            if (split) ALLOC(S->g_embed, BTC * es, "the split backward's kept gradients");
        }
    }
    if (m->has_head) {
        ALLOC(d->wte_pad, (size_t)d->Vp * C * es, "the padded LM head");
        TD_CK(cudaMemsetAsync(d->wte_pad, 0, (size_t)d->Vp * C * es, d->stream));
    }

    /* scratch */
    const size_t att = B * NH * T * T * es;
    const size_t nchunks = (BT + TD_CS_ROWS - 1) / TD_CS_ROWS, nlnb = (BT + TD_LNB_ROWS_MIN - 1) / TD_LNB_ROWS_MIN;
    const size_t part = nchunks * 4 * C > nlnb * C ? nchunks * 4 * C : nlnb * C;
    ALLOC(d->dres, BTC * es, "backward scratch");
    ALLOC(d->dln, BTC * es, "backward scratch");
    ALLOC(d->dbig, 4 * BTC * es, "backward scratch");
    if (!td_cuda_flash_rows(d)) { /* the FlashAttention-2 kernels read and write the heads in place */
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
    const size_t keep = (size_t)m->slots * m->nl * att;
    if (d->flash) {
        d->store_att = 0;
        for (int64_t k = 0; k < m->slots; k++)
            for (int l = 0; l < m->nl; l++) ALLOC(d->S[k].L[l].lse, B * NH * T * 4, "attention statistics");
        ALLOC(d->Dsum, B * NH * T * 4, "attention scratch");
    } else if (att_env) {
        d->store_att = !strcmp(att_env, "store");
    } else {
        d->store_att = keep + ((size_t)2 << 30) <= fr;
    }
    if (d->flash) {
    } else if (d->store_att) {
        for (int64_t k = 0; k < m->slots; k++)
            for (int l = 0; l < m->nl; l++) ALLOC(d->S[k].L[l].att, att, "attention probabilities (B, NH, T, T) per layer");
    } else {
        ALLOC(d->attP, att, "attention scratch (B, NH, T, T)");
    }

    TD_CK(cudaMallocHost((void **)&d->h_sq, sizeof(double)));

    TD_CK(cudaMemsetAsync(d->g32, 0, total * 4, d->stream));
    TD_CK(cudaMemsetAsync(d->mom, 0, total * 4, d->stream));
    TD_CK(cudaMemsetAsync(d->var, 0, total * 4, d->stream));
    return cuda_upload(m, 0);
}

/* ---- host <-> device ------------------------------------------------------------------------- */

/* the padded LM-head copy of wte (llama: lm_head) follows the compute copy of the parameters */
static td_status refresh_wte_pad(td_cuda_dev *d) {
    if (!d->m->has_head) return TD_OK;
    const size_t bytes = (size_t)d->m->vocab_size * (size_t)d->m->n_embd * d->es;
    TD_CK(cudaMemcpyAsync(d->wte_pad, (const char *)d->pc + d->off_head * d->es, bytes, cudaMemcpyDeviceToDevice, d->stream));
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


static td_status cuda_download(td_model *m, int grads) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    if (grads) TD_TRY(td_cuda_materialize_zero_grads(d));
    TD_CK(cudaMemcpyAsync(grads ? m->grad_mem : m->param_mem, grads ? d->g32 : d->p32,
                          m->total * sizeof(float), cudaMemcpyDeviceToHost, d->stream));
    TD_CK(cudaStreamSynchronize(d->stream));
    return TD_OK;
}

/* AdamW's fp32 moments to and from the host m_mem / v_mem (checkpoints; both ways synchronous) */
static td_status cuda_opt_download(td_model *m) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    TD_CK(cudaMemcpyAsync(m->m_mem, d->mom, m->total * sizeof(float), cudaMemcpyDeviceToHost, d->stream));
    TD_CK(cudaMemcpyAsync(m->v_mem, d->var, m->total * sizeof(float), cudaMemcpyDeviceToHost, d->stream));
    TD_CK(cudaStreamSynchronize(d->stream));
    return TD_OK;
}

static td_status cuda_opt_upload(td_model *m) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    TD_CK(cudaMemcpyAsync(d->mom, m->m_mem, m->total * sizeof(float), cudaMemcpyHostToDevice, d->stream));
    TD_CK(cudaMemcpyAsync(d->var, m->v_mem, m->total * sizeof(float), cudaMemcpyHostToDevice, d->stream));
    TD_CK(cudaStreamSynchronize(d->stream));
    return TD_OK;
}

/* one-stage passes on slot 0 (td_model_forward, td_model_forward_backward): the loss at once,
 * the gradients after a lazy zero_grad overwritten by their first contribution */
static td_status cuda_forward(td_model *m, float *logits_out, double *out_loss, int with_targets) {
    double loss = 0.0;
    return td_cuda_stage_forward(m, 0, logits_out, with_targets ? (out_loss ? out_loss : &loss) : NULL,
                                 with_targets, NULL, NULL);
}

static td_status cuda_backward(td_model *m, double grad_scale) {
    return td_cuda_stage_backward(m, 0, grad_scale, TD_BWD_FULL, NULL, NULL, 1);
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

td_status td_cuda_materialize_zero_grads(td_cuda_dev *d) {
    if (!d->grad_zero) return TD_OK;
    TD_CK(cudaMemsetAsync(d->g32, 0, d->m->total * sizeof(float), d->stream));
    d->grad_zero = 0;
    return TD_OK;
}

static td_status cuda_grad_sq_sum(td_model *m, double *out) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    TD_TRY(td_cuda_materialize_zero_grads(d));
    td_cuda_prof(d, "grad_sq_sum");
    /* the head-only stage leaves its tied wte copy out (td_grad_norm_elems) */
    TD_CK(td_k_sq_sum(d->stream, d->sq_part, d->g32, (long long)td_grad_norm_elems(m)));
    td_cuda_prof(d, "(end)");
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
    TD_TRY(td_cuda_materialize_zero_grads(d));
    td_cuda_prof(d, "adamw");
    TD_CK(td_k_adamw(d->stream, d->p32, d->g32, d->mom, d->var, d->bf16 ? (bf16 *)d->pc : NULL,
                     (long long)m->total, d->seg_end, d->seg_decay, m->nparams, (float)m->beta1,
                     (float)m->beta2, bc1, bc2, (float)m->lr, (float)m->eps,
                     (float)m->weight_decay, clip));
    TD_TRY(refresh_wte_pad(d));
    td_cuda_prof(d, "(end)");
    TD_CK(cudaStreamSynchronize(d->stream));
    td_cuda_prof_flush(d);
    d->prof_steps++;
    return TD_OK;
}

/* ---- stage passes (pipelines) ---------------------------------------------------------------- */

static td_status cuda_stage_forward(td_model *m, int32_t slot, double *out_loss, int with_targets,
                                    const void *in_BTC, void *out_BTC) {
    return td_cuda_stage_forward(m, slot, NULL, out_loss, with_targets, in_BTC, out_BTC);
}

static td_status cuda_stage_backward(td_model *m, int32_t slot, double grad_scale, int part,
                                     const void *dout_BTC, void *din_BTC) {
    return td_cuda_stage_backward(m, slot, grad_scale, part, dout_BTC, din_BTC, 0);
}

static td_status cuda_loss_sum(td_model *m, double *out_sum, int32_t *out_count) {
    return td_cuda_loss_sum((td_cuda_dev *)m->device, out_sum, out_count);
}

/* the fp32 gradient at `offset` elements into the flat buffer, zeros materialised first */
static td_status cuda_grad_data(td_model *m, void **out, size_t offset) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    TD_TRY(td_cuda_materialize_zero_grads(d));
    *out = d->g32 + offset;
    return TD_OK;
}

static void *cuda_stream(td_model *m) { return ((td_cuda_dev *)m->device)->stream; }
static int64_t cuda_device_bytes(td_model *m) { return (int64_t)((td_cuda_dev *)m->device)->bytes; }
static int32_t cuda_device(td_model *m) { return ((td_cuda_dev *)m->device)->dev; }

static const td_backend_ops CUDA_OPS = {
    "cuda",          cuda_build,    cuda_release,     cuda_upload, cuda_download,
    cuda_forward,    cuda_backward, cuda_zero_grad,   cuda_grad_sq_sum, cuda_adamw,
    cuda_stage_forward, cuda_stage_backward, cuda_loss_sum, cuda_grad_data, cuda_stream,
    cuda_device_bytes, cuda_device, cuda_opt_download, cuda_opt_upload,
};

extern "C" const td_backend_ops *td_cuda_ops(void) { return &CUDA_OPS; }
