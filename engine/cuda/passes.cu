/* passes.cu — the forward and backward passes of one CUDA stage, slot by slot.
 *
 * The same maths, in the same order, as model.c on the CPU: a stage reads tokens (first stage) or
 * the previous stage's activations, runs its layers, and either writes its output activations or
 * (last stage) the logits and the loss. The backward seeds d(loss) (last stage) or reads the next
 * stage's gradient, and writes the gradient of its input (all but the first stage). A split
 * backward runs it as B (every input-gradient product, attention, the LayerNorms with their
 * weight and bias sums, the bias column sums) then W (the weight-gradient products and the
 * embedding gradient) from what B kept in the slot. Stage inputs and outputs are device buffers
 * in the compute type (bf16 in bf16 mode). Nothing here synchronises with the host except a
 * forward whose loss the caller asked for at once.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "flash.cuh"


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
static td_status attention_forward(td_cuda_dev *d, td_cuda_layer *A, int B, int T) {
    const td_model *m = d->m;
    const int C = (int)m->n_embd, NH = (int)m->n_head, HS = C / NH;
    const long long BTC = (long long)B * T * C, TT = (long long)T * T, THS = (long long)T * HS;
    const float scale = (float)(1.0 / sqrt((double)HS));
    if (td_cuda_flash_rows(d)) { /* q, k, v read from the qkv rows, the output written into atty's rows */
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
static td_status attention_backward(td_cuda_dev *d, td_cuda_layer *A, int B, int T, E *dqkv, const E *datty) {
    const td_model *m = d->m;
    const int C = (int)m->n_embd, NH = (int)m->n_head, HS = C / NH;
    const long long BTC = (long long)B * T * C, TT = (long long)T * T, THS = (long long)T * HS;
    const float scale = (float)(1.0 / sqrt((double)HS));
    if (td_cuda_flash_rows(d)) { /* d(qkv) written in place from the qkv rows and d(atty) */
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


/* Rows of each distinct token, in ascending row order (a counting sort): the embedding
 * gradient sums them per token without atomics. Layout: uniq (BT) | off (BT+1) | rows (BT). */
int td_cuda_build_buckets(int *csr, int *cnt, const int32_t *tok, int BT, int V) {
    int *uniq = csr, *off = csr + BT, *rows = csr + 2 * BT + 1;
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
    return nu;
}

/* Room for one more pending row of losses in the pinned ring (grown after a synchronisation). */
static td_status ring_reserve(td_cuda_dev *d, int BT) {
    const int row = (int)(d->m->batch_size * d->m->seq_len);
    if (d->ring_n < d->ring_cap) return TD_OK;
    TD_CK(cudaStreamSynchronize(d->stream));
    const int cap = d->ring_cap ? 2 * d->ring_cap : 16;
    float *h = NULL;
    TD_CK(cudaMallocHost((void **)&h, sizeof(float) * (size_t)cap * row));
    int *bt = (int *)realloc(d->ring_bt, sizeof(int) * (size_t)cap);
    if (!bt) {
        cudaFreeHost(h);
        return td_fail(d->m, TD_ERR_NOMEM, "td_stage_forward: out of host memory for pending losses");
    }
    if (d->h_losses) {
        memcpy(h, d->h_losses, sizeof(float) * (size_t)d->ring_n * row);
        cudaFreeHost(d->h_losses);
    }
    d->h_losses = h, d->ring_bt = bt, d->ring_cap = cap;
    (void)BT;
    return TD_OK;
}

/* Mean loss of each pending forward since the last call, summed in forward order (each row
 * summed in double in row order, as the CPU does). Synchronises. */
td_status td_cuda_loss_sum(td_cuda_dev *d, double *out_sum, int32_t *out_count) {
    const int row = (int)(d->m->batch_size * d->m->seq_len);
    TD_CK(cudaStreamSynchronize(d->stream));
    double total = 0.0;
    for (int k = 0; k < d->ring_n; k++) {
        double sum = 0.0;
        const float *l = d->h_losses + (size_t)k * row;
        for (int i = 0; i < d->ring_bt[k]; i++) sum += l[i];
        total += sum / d->ring_bt[k];
    }
    if (out_sum) *out_sum = total;
    if (out_count) *out_count = d->ring_n;
    d->ring_n = 0;
    return TD_OK;
}

td_status td_cuda_logits_to_host(td_cuda_dev *d, const td_cuda_slot *S, float *logits_out, int BT) {
    const int V = (int)d->m->vocab_size, Vp = d->Vp;
    cudaStream_t st = d->stream;
    if (!d->bf16) {
        TD_CK(cudaMemcpy2DAsync(logits_out, sizeof(float) * (size_t)V, S->logits, sizeof(float) * (size_t)Vp,
                                sizeof(float) * (size_t)V, (size_t)BT, cudaMemcpyDeviceToHost, st));
        TD_CK(cudaStreamSynchronize(st));
        return TD_OK;
    }
    uint16_t *tmp = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)BT * V);
    if (!tmp) return td_fail(d->m, TD_ERR_NOMEM, "td_model_forward: no host memory for %d x %d bf16 logits", BT, V);
    cudaError_t e = cudaMemcpy2DAsync(tmp, 2 * (size_t)V, S->logits, 2 * (size_t)Vp, 2 * (size_t)V, (size_t)BT, cudaMemcpyDeviceToHost, st);
    if (e == cudaSuccess) e = cudaStreamSynchronize(st);
    if (e == cudaSuccess)
        for (size_t i = 0; i < (size_t)BT * V; i++) {
            uint32_t bits = (uint32_t)tmp[i] << 16;
            memcpy(&logits_out[i], &bits, 4);
        }
    free(tmp);
    TD_CK(e);
    return TD_OK;
}

td_status td_cuda_loss_to_ring(td_cuda_dev *d, const td_cuda_slot *S, int BT, double *out_loss) {
    /* the per-row losses go to the pinned ring; summed now (out_loss) or by td_cuda_loss_sum */
    TD_TRY(ring_reserve(d, BT));
    const int row = (int)(d->m->batch_size * d->m->seq_len);
    TD_CK(cudaMemcpyAsync(d->h_losses + (size_t)d->ring_n * row, S->losses, sizeof(float) * (size_t)BT, cudaMemcpyDeviceToHost, d->stream));
    d->ring_bt[d->ring_n++] = BT;
    if (out_loss) {
        TD_TRY(td_cuda_loss_sum(d, out_loss, NULL));
        td_cuda_prof_flush(d);
    }
    return TD_OK;
}

/* Tokens (first stage) and targets (last stage, with_targets) of host slot hs to the device
 * through the slot's pinned staging, on the compute stream, with the first stage's embedding
 * buckets: the previous upload from the staging must be done before the host overwrites it. */
td_status td_cuda_stage_tokens(td_cuda_dev *d, td_cuda_slot *S, const td_slot *hs, int BT, int V,
                               int with_targets) {
    const td_model *m = d->m;
    cudaStream_t st = d->stream;
    if (!m->has_embed && !with_targets) return TD_OK;
    TD_CK(cudaEventSynchronize(S->staged));
    size_t ints = 0;
    if (m->has_embed) memcpy(S->h_tok, hs->tokens, sizeof(int) * (size_t)BT), ints = BT;
    if (with_targets) memcpy(S->h_tok + BT, hs->targets, sizeof(int) * (size_t)BT), ints = 2 * (size_t)BT;
    TD_CK(cudaMemcpyAsync(S->tok, S->h_tok, sizeof(int) * ints, cudaMemcpyHostToDevice, st));
    if (m->has_embed) {
        S->n_uniq = td_cuda_build_buckets(S->h_csr, d->h_count, hs->tokens, BT, V);
        TD_CK(cudaMemcpyAsync(S->csr, S->h_csr, sizeof(int) * (size_t)(3 * BT + 1), cudaMemcpyHostToDevice, st));
    }
    TD_CK(cudaEventRecord(S->staged, st));
    return TD_OK;
}

template <typename E>
static td_status forward_impl(td_cuda_dev *d, int slot, float *logits_out, double *out_loss,
                              int with_targets, const void *in_BTC, void *out_BTC) {
    td_model *m = d->m;
    const td_slot *hs = &m->slot[slot];
    td_cuda_slot *S = &d->S[slot];
    const int B = hs->B, T = hs->T, C = (int)m->n_embd, V = (int)m->vocab_size, Vp = d->Vp;
    const int BT = B * T;
    const size_t btc = (size_t)BT * C * sizeof(E);
    cudaStream_t st = d->stream;
    const E *W = (const E *)d->pc;
    S->targets = 0;
    S->B = B, S->T = T;
    with_targets = with_targets && m->has_head;

    TD_TRY(td_cuda_stage_tokens(d, S, hs, BT, V, with_targets));

    E *x0 = (E *)S->input;
    if (m->has_embed) {
        td_cuda_prof(d, "fwd: embedding");
        TD_CK(td_k_encoder_forward<E>(st, x0, S->tok, W + d->off_wte, W + d->off_wpe, B, T, C));
    } else {
        TD_CK(cudaMemcpyAsync(x0, in_BTC, btc, cudaMemcpyDeviceToDevice, st));
    }
    for (int l = 0; l < m->nl; l++) {
        td_cuda_layer *A = &S->L[l];
        const td_cuda_layer_off *o = &d->lo[l];
        const E *res = l == 0 ? x0 : (const E *)S->L[l - 1].res3;
        td_cuda_prof(d, "fwd: layernorm");
        TD_CK(td_k_layernorm_forward<E>(st, (E *)A->ln1, A->ln1_mean, A->ln1_rstd, res, W + o->ln1w, W + o->ln1b, BT, C));
        td_cuda_prof(d, "fwd: matmul");
        TD_TRY(linear(d, A->qkv, A->ln1, W + o->qkvw, W + o->qkvb, BT, C, 3 * C, NULL, TD_EPI_NONE, NULL));
        td_cuda_prof(d, "fwd: attention");
        TD_TRY(attention_forward<E>(d, A, B, T));
        td_cuda_prof(d, "fwd: matmul");
        /* res2 = res + atty @ W + b: the residual add rides in the product (beta = 1) */
        TD_TRY(linear(d, A->res2, A->atty, W + o->attprojw, W + o->attprojb, BT, C, C, res, TD_EPI_NONE, NULL));
        td_cuda_prof(d, "fwd: layernorm");
        TD_CK(td_k_layernorm_forward<E>(st, (E *)A->ln2, A->ln2_mean, A->ln2_rstd, (const E *)A->res2, W + o->ln2w, W + o->ln2b, BT, C));
        td_cuda_prof(d, "fwd: matmul");
        TD_TRY(linear(d, A->fch_gelu, A->ln2, W + o->fcw, W + o->fcb, BT, C, 4 * C, NULL, TD_EPI_GELU, A->fch));
        TD_TRY(linear(d, A->res3, A->fch_gelu, W + o->fcprojw, W + o->fcprojb, BT, 4 * C, C, A->res2, TD_EPI_NONE, NULL));
    }
    const E *res = m->nl ? (const E *)S->L[m->nl - 1].res3 : x0;
    if (!m->has_head) {
        TD_CK(cudaMemcpyAsync(out_BTC, res, btc, cudaMemcpyDeviceToDevice, st));
        td_cuda_prof(d, "(end)");
        S->targets = 1; /* a backward may follow (from the next stage's gradient) */
        return TD_OK;
    }
    td_cuda_prof(d, "fwd: layernorm");
    TD_CK(td_k_layernorm_forward<E>(st, (E *)S->lnf, S->lnf_mean, S->lnf_rstd, res, W + d->off_lnfw, W + d->off_lnfb, BT, C));
    {
        td_cuda_prof(d, "head: logits matmul");
        td_mm p; /* logits (BT, V), rows Vp apart = lnf @ wte^T */
        memset(&p, 0, sizeof p);
        p.out = S->logits, p.ldo = Vp;
        p.A = S->lnf, p.lda = C;
        p.B = d->wte_pad, p.ldb = C, p.transB = 1;
        p.M = BT, p.N = Vp, p.K = C, p.batch = 1; /* columns V.. are 0: wte_pad's rows are */
        TD_TRY(td_cuda_matmul(d, &p));
    }
    td_cuda_prof(d, "(end)");
    if (logits_out) TD_TRY(td_cuda_logits_to_host(d, S, logits_out, BT));
    if (with_targets) {
        td_cuda_prof(d, "head: softmax + cross-entropy");
        TD_CK(td_k_crossentropy_forward<E>(st, S->losses, S->lse, (const E *)S->logits, S->tok + BT, BT, V, Vp));
        td_cuda_prof(d, "(end)");
        TD_TRY(td_cuda_loss_to_ring(d, S, BT, out_loss));
        S->targets = 1;
    }
    return TD_OK;
}

/* part: TD_BWD_FULL, TD_BWD_INPUT (B) or TD_BWD_WEIGHT (W). acc = 0 lets each gradient's first
 * contribution overwrite it (the one-stage path after a lazy zero_grad); stage passes run with
 * the zeros materialised and acc = 1. */
template <typename E>
static td_status backward_impl(td_cuda_dev *d, int slot, double grad_scale, int part,
                               const void *dout_BTC, void *din_BTC, int acc) {
    td_model *m = d->m;
    td_cuda_slot *S = &d->S[slot];
    const int B = S->B, T = S->T, C = (int)m->n_embd, V = (int)m->vocab_size, Vp = d->Vp;
    const int BT = B * T;
    const size_t btc = (size_t)BT * C * sizeof(E);
    cudaStream_t st = d->stream;
    const E *W = (const E *)d->pc;
    float *G = d->g32;
    E *dres = (E *)d->dres, *dln = (E *)d->dln, *dbig = (E *)d->dbig, *x0 = (E *)S->input;
    const int do_input = part != TD_BWD_WEIGHT, do_weight = part != TD_BWD_INPUT;
    const int split = part != TD_BWD_FULL;
    const E *res_last = m->nl ? (const E *)S->L[m->nl - 1].res3 : x0;
    /* wte's rows are all written by the head's product (overwrite when !acc); a first stage
     * without the head only adds to them, so its gradients run with acc = 1 (stage passes) */

    if (do_input) {
        if (m->has_head) {
            /* loss = mean over BT rows: each row's d(loss) is grad_scale / BT; d(logits) in place */
            td_cuda_prof(d, "head: cross-entropy backward");
            TD_CK(td_k_crossentropy_backward<E>(st, (E *)S->logits, S->lse, S->tok + BT, (float)(grad_scale / BT), BT, V, Vp));
            td_cuda_prof(d, "head: matmuls backward");
            td_mm p; /* d lnf = dlogits @ wte */
            memset(&p, 0, sizeof p);
            p.out = dln, p.ldo = C;
            p.A = S->logits, p.lda = Vp;
            p.B = d->wte_pad, p.ldb = C;
            p.M = BT, p.N = C, p.K = Vp, p.batch = 1; /* d(logits) is 0 in the padding columns */
            TD_TRY(td_cuda_matmul(d, &p));
        }
    }
    if (do_weight && m->has_head) {
        td_cuda_prof(d, "head: matmuls backward");
        /* dwte += dlogits^T @ lnf, as two products: rows [0, Vm) with Vm a multiple of 128 and
         * the rest. With M = V = 50257 rows the whole product ran at ~450 TFLOP/s on an H200
         * (2.9 ms at 1.5B) against ~800 for the same work over aligned rows. */
        const int Vm = V > 128 && V % 128 ? V / 128 * 128 : V;
        for (int half = 0; half < 2; half++) {
            const int r0 = half ? Vm : 0, nr = half ? V - Vm : Vm;
            if (nr <= 0) continue;
            td_mm p;
            memset(&p, 0, sizeof p);
            p.out = G + d->off_wte + (size_t)r0 * C, p.ldo = C, p.out_f32 = 1;
            p.A = (const E *)S->logits + r0, p.lda = Vp, p.transA = 1;
            p.B = S->lnf, p.ldb = C;
            p.M = nr, p.N = C, p.K = BT, p.beta = acc ? 1.f : 0.f, p.batch = 1;
            TD_TRY(td_cuda_matmul(d, &p));
        }
    }
    if (do_input) {
        /* Each LayerNorm backward below also sums its output (the residual gradient) over the
         * rows: that is the bias gradient of the product whose output joins the residual there
         * (the last layer's MLP projection here, then per layer the attention projection (LN2)
         * and the previous layer's MLP projection (LN1)). A stage without the head starts from
         * the next stage's gradient and sums the last projection's bias gradient itself. */
        if (m->has_head) {
            td_cuda_prof(d, "bwd: layernorm + weight sums");
            TD_CK(td_k_layernorm_backward<E>(st, dres, G + d->off_lnfw, G + d->off_lnfb,
                                             m->nl ? G + d->lo[m->nl - 1].fcprojb : NULL, d->part_w, d->part_b,
                                             d->part_o, dln, res_last, W + d->off_lnfw, S->lnf_mean, S->lnf_rstd,
                                             BT, C, 0, acc));
        } else {
            TD_CK(cudaMemcpyAsync(dres, dout_BTC, btc, cudaMemcpyDeviceToDevice, st));
            if (m->nl) {
                td_cuda_prof(d, "bwd: bias sums");
                TD_CK(td_k_colsum<E>(st, NULL, G + d->lo[m->nl - 1].fcprojb, NULL, d->part_b, dres, NULL, NULL, NULL, BT, C, acc));
            }
        }
    }
    for (int l = m->nl - 1; l >= 0; l--) {
        td_cuda_layer *A = &S->L[l];
        const td_cuda_layer_off *o = &d->lo[l];
        const E *res = l == 0 ? x0 : (const E *)S->L[l - 1].res3;
        td_cuda_wgrad *K = split ? &S->Wg[l] : NULL; /* what B keeps for W */
        E *g_fcproj = K ? (E *)K->fcproj : dres, *g_fc = K ? (E *)K->fc : dbig;
        E *g_attproj = K ? (E *)K->attproj : dres, *g_qkv = K ? (E *)K->qkv : dbig;
        if (!do_input) { /* W: the weight-gradient products from what B kept */
            td_cuda_prof(d, "bwd: matmul");
            TD_TRY(linear_dweight(d, G + o->fcprojw, A->fch_gelu, g_fcproj, BT, 4 * C, C, acc));
            TD_TRY(linear_dweight(d, G + o->fcw, A->ln2, g_fc, BT, C, 4 * C, acc));
            TD_TRY(linear_dweight(d, G + o->attprojw, A->atty, g_attproj, BT, C, C, acc));
            TD_TRY(linear_dweight(d, G + o->qkvw, A->ln1, g_qkv, BT, C, 3 * C, acc));
            continue;
        }
        /* MLP block: res3 = res2 + fcproj(gelu(fc(ln2(res2)))) */
        td_cuda_prof(d, "bwd: matmul");
        if (K) TD_CK(cudaMemcpyAsync(g_fcproj, dres, btc, cudaMemcpyDeviceToDevice, st));
        TD_TRY(linear_dinput(d, g_fc, dres, W + o->fcprojw, BT, 4 * C, C, TD_EPI_DGELU, A->fch)); /* d fch */
        if (do_weight) TD_TRY(linear_dweight(d, G + o->fcprojw, A->fch_gelu, dres, BT, 4 * C, C, acc));
        TD_TRY(linear_dinput(d, dln, g_fc, W + o->fcw, BT, C, 4 * C, TD_EPI_NONE, NULL));
        if (do_weight) TD_TRY(linear_dweight(d, G + o->fcw, A->ln2, g_fc, BT, C, 4 * C, acc));
        td_cuda_prof(d, "bwd: bias sums");
        TD_CK(td_k_colsum<E>(st, NULL, G + o->fcb, NULL, d->part_b, g_fc, NULL, NULL, NULL, BT, 4 * C, acc));
        td_cuda_prof(d, "bwd: layernorm + weight sums");
        TD_CK(td_k_layernorm_backward<E>(st, dres, G + o->ln2w, G + o->ln2b, G + o->attprojb, d->part_w,
                                         d->part_b, d->part_o, dln, (const E *)A->res2, W + o->ln2w,
                                         A->ln2_mean, A->ln2_rstd, BT, C, 1, acc));
        /* attention block: res2 = res + attproj(attention(qkv(ln1(res)))) */
        td_cuda_prof(d, "bwd: matmul");
        if (K) TD_CK(cudaMemcpyAsync(g_attproj, dres, btc, cudaMemcpyDeviceToDevice, st));
        TD_TRY(linear_dinput(d, dln, dres, W + o->attprojw, BT, C, C, TD_EPI_NONE, NULL)); /* d atty */
        if (do_weight) TD_TRY(linear_dweight(d, G + o->attprojw, A->atty, dres, BT, C, C, acc));
        td_cuda_prof(d, "bwd: attention");
        TD_TRY(attention_backward<E>(d, A, B, T, g_qkv, dln)); /* d qkv */
        td_cuda_prof(d, "bwd: matmul");
        TD_TRY(linear_dinput(d, dln, g_qkv, W + o->qkvw, BT, C, 3 * C, TD_EPI_NONE, NULL));
        if (do_weight) TD_TRY(linear_dweight(d, G + o->qkvw, A->ln1, g_qkv, BT, C, 3 * C, acc));
        td_cuda_prof(d, "bwd: bias sums");
        TD_CK(td_k_colsum<E>(st, NULL, G + o->qkvb, NULL, d->part_b, g_qkv, NULL, NULL, NULL, BT, 3 * C, acc));
        td_cuda_prof(d, "bwd: layernorm + weight sums");
        TD_CK(td_k_layernorm_backward<E>(st, dres, G + o->ln1w, G + o->ln1b, l ? G + d->lo[l - 1].fcprojb : NULL,
                                         d->part_w, d->part_b, d->part_o, dln, res, W + o->ln1w,
                                         A->ln1_mean, A->ln1_rstd, BT, C, 1, acc));
    }
    if (m->has_embed) {
        /* the embedding gradient is a weight gradient: W reads d(input) that B kept */
        const E *g_embed = split ? (const E *)S->g_embed : dres;
        if (part == TD_BWD_INPUT) {
            TD_CK(cudaMemcpyAsync(S->g_embed, dres, btc, cudaMemcpyDeviceToDevice, st));
        } else {
            td_cuda_prof(d, "bwd: embedding");
            /* wte: added to the head's product, which wrote every row; wpe: rows past T get nothing */
            TD_CK(td_k_encoder_backward<E>(st, G + d->off_wte, G + d->off_wpe, g_embed, S->csr, S->n_uniq, B, T, C, acc));
            if (!acc && T < m->n_positions)
                TD_CK(cudaMemsetAsync(G + d->off_wpe + (size_t)T * C, 0, sizeof(float) * (size_t)(m->n_positions - T) * C, st));
        }
    } else if (do_input && din_BTC) {
        TD_CK(cudaMemcpyAsync(din_BTC, dres, btc, cudaMemcpyDeviceToDevice, st));
    }
    td_cuda_prof(d, "(end)");
    d->grad_zero = 0;
    return TD_OK;
}

td_status td_cuda_stage_forward(td_model *m, int32_t slot, float *logits_out, double *out_loss,
                                int with_targets, const void *in_BTC, void *out_BTC) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    if (m->family == 1) /* llama_passes.cu */
        return td_cuda_llama_forward(d, slot, logits_out, out_loss, with_targets, in_BTC, out_BTC);
    return d->bf16 ? forward_impl<bf16>(d, slot, logits_out, out_loss, with_targets, in_BTC, out_BTC)
                   : forward_impl<float>(d, slot, logits_out, out_loss, with_targets, in_BTC, out_BTC);
}

td_status td_cuda_stage_backward(td_model *m, int32_t slot, double grad_scale, int part,
                                 const void *dout_BTC, void *din_BTC, int lazy_zero) {
    td_cuda_dev *d = (td_cuda_dev *)m->device;
    if (!d->S[slot].targets)
        return td_fail(m, TD_ERR_STATE, "td_stage_backward: the CUDA backward of slot %d needs a forward (with targets on the last stage) first", slot);
    int acc = 1;
    if (lazy_zero) acc = !d->grad_zero;
    else TD_TRY(td_cuda_materialize_zero_grads(d));
    td_status st = m->family == 1 ? td_cuda_llama_backward(d, slot, grad_scale, part, dout_BTC, din_BTC, acc)
                   : d->bf16 ? backward_impl<bf16>(d, slot, grad_scale, part, dout_BTC, din_BTC, acc)
                             : backward_impl<float>(d, slot, grad_scale, part, dout_BTC, din_BTC, acc);
    if (part != TD_BWD_INPUT) d->S[slot].targets = 0;
    return st;
}
