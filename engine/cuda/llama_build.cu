/* llama_build.cu — the device side of a Llama stage (family = 1) beyond what backend.cu's build
 * sets up for every family (stream, cuBLASLt, fp32 master weights, gradients, AdamW moments, the
 * bf16 copy, the AdamW tensor table, the attention mode): the parameter offsets, found by name in
 * the stage's table (model.layers.{layer_begin + l}.*, model.embed_tokens on the first stage,
 * model.norm and lm_head on the last), one set of activations per slot (llama.cuh's layouts),
 * what a split backward keeps between B and W, the scratch of one backward, and the RoPE tables.
 * Everything is allocated once, here; release is backend.cu's (every allocation is recorded).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.cuh"

#define ALLOC(ptr, bytes, what) TD_TRY(td_cuda_alloc(d, (void **)&(ptr), (bytes), (what)))

/* offset of a tensor of the stage's table, or a failure naming it */
static td_status find_off(td_cuda_dev *d, const char *name, size_t *out) {
    const td_param *p = td_find_param(d->m, name);
    if (!p)
        return td_fail(d->m, TD_ERR_INTERNAL, "td_model_build: the cuda backend found no tensor %s in this stage's parameter table. HINT: an engine bug (llama_model.c's table and llama_build.cu disagree); please report it", name);
    *out = p->offset;
    return TD_OK;
}

static td_status layer_off(td_cuda_dev *d, int l, const char *key, size_t *out) {
    char name[TD_MAX_NAME];
    snprintf(name, sizeof name, "model.layers.%d.%s", (int)(d->m->layer_begin + l), key);
    return find_off(d, name, out);
}

/* cos and sin of t * theta^(-2i/HS), t < seq_len, i < HS/2, computed in double and rounded
 * once, as llama_ops.c's rope_rotate does */
static td_status rope_tables(td_cuda_dev *d) {
    const td_model *m = d->m;
    const int T = (int)m->seq_len, HS = (int)(m->n_embd / m->n_head), half = HS / 2;
    const size_t n = (size_t)T * half;
    ALLOC(d->rope_cos, n * 4, "the RoPE tables");
    ALLOC(d->rope_sin, n * 4, "the RoPE tables");
    float *h = (float *)malloc(2 * n * sizeof(float));
    if (!h) return td_fail(d->m, TD_ERR_NOMEM, "td_model_build: out of host memory");
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            const double angle = (double)t * pow(m->rope_theta, -2.0 * i / HS);
            h[(size_t)t * half + i] = (float)cos(angle);
            h[n + (size_t)t * half + i] = (float)sin(angle);
        }
    cudaError_t e = cudaMemcpy(d->rope_cos, h, n * 4, cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(d->rope_sin, h + n, n * 4, cudaMemcpyHostToDevice);
    free(h);
    TD_CK(e);
    return TD_OK;
}

td_status td_cuda_llama_build(td_cuda_dev *d) {
    td_model *m = d->m;
    const size_t B = (size_t)m->batch_size, T = (size_t)m->seq_len, C = (size_t)m->n_embd;
    const size_t NH = (size_t)m->n_head, HS = C / NH, KV = (size_t)m->n_kv_head * HS;
    const size_t F = (size_t)m->ffn_dim, QW = C + 2 * KV, es = d->es;
    const size_t BT = B * T, BTC = BT * C;
    const int split = m->split_backward != 0;
    /* TANDEM_CUDA_LLAMA_UNFUSED=1: one product per projection even where the table's q, k, v (and
     * gate, up) are consecutive (tests: the path a table without that order would take) */
    const char *unf = getenv("TANDEM_CUDA_LLAMA_UNFUSED");
    const int fuse = !(unf && !strcmp(unf, "1"));

    /* parameter offsets */
    d->llo = (td_cuda_llama_off *)calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_cuda_llama_off));
    if (!d->llo) return td_fail(m, TD_ERR_NOMEM, "td_model_build: out of host memory");
    d->off_wte = d->off_wpe = d->off_lnfw = d->off_lnfb = d->off_head = 0;
    if (m->has_embed) TD_TRY(find_off(d, "model.embed_tokens.weight", &d->off_wte));
    if (m->has_head) {
        TD_TRY(find_off(d, "model.norm.weight", &d->off_lnfw));
        TD_TRY(find_off(d, "lm_head.weight", &d->off_head));
    }
    for (int l = 0; l < m->nl; l++) {
        td_cuda_llama_off *o = &d->llo[l];
        TD_TRY(layer_off(d, l, "input_layernorm.weight", &o->attn_norm));
        TD_TRY(layer_off(d, l, "self_attn.q_proj.weight", &o->wq));
        TD_TRY(layer_off(d, l, "self_attn.k_proj.weight", &o->wk));
        TD_TRY(layer_off(d, l, "self_attn.v_proj.weight", &o->wv));
        TD_TRY(layer_off(d, l, "self_attn.o_proj.weight", &o->wo));
        TD_TRY(layer_off(d, l, "post_attention_layernorm.weight", &o->mlp_norm));
        TD_TRY(layer_off(d, l, "mlp.gate_proj.weight", &o->wgate));
        TD_TRY(layer_off(d, l, "mlp.up_proj.weight", &o->wup));
        TD_TRY(layer_off(d, l, "mlp.down_proj.weight", &o->wdown));
        o->fused_qkv = fuse && o->wk == o->wq + C * C && o->wv == o->wk + KV * C;
        o->fused_gu = fuse && o->wup == o->wgate + F * C;
    }

    /* activations, one set per slot; the head's and the embedding's only where the stage has them */
    d->S = (td_cuda_slot *)calloc((size_t)m->slots, sizeof(td_cuda_slot));
    if (!d->S) return td_fail(m, TD_ERR_NOMEM, "td_model_build: out of host memory");
    const size_t att = B * NH * T * T * es;
    for (int64_t k = 0; k < m->slots; k++) {
        td_cuda_slot *S = &d->S[k];
        S->LL = (td_cuda_llama_layer *)calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_cuda_llama_layer));
        S->LWg = (td_cuda_llama_wgrad *)calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_cuda_llama_wgrad));
        if (!S->LL || !S->LWg) return td_fail(m, TD_ERR_NOMEM, "td_model_build: out of host memory");
        TD_CK(cudaEventCreateWithFlags(&S->staged, cudaEventDisableTiming));
        ALLOC(S->input, BTC * es, "activations");
        for (int l = 0; l < m->nl; l++) {
            td_cuda_llama_layer *A = &S->LL[l];
            ALLOC(A->ln1, BTC * es, "activations");
            ALLOC(A->ln1_rstd, BT * 4, "activations");
            ALLOC(A->qkv, BT * QW * es, "activations");
            ALLOC(A->atty, BTC * es, "activations");
            ALLOC(A->res2, BTC * es, "activations");
            ALLOC(A->ln2, BTC * es, "activations");
            ALLOC(A->ln2_rstd, BT * 4, "activations");
            ALLOC(A->gu, BT * 2 * F * es, "activations");
            ALLOC(A->h, BT * F * es, "activations");
            ALLOC(A->res3, BTC * es, "activations");
            if (split) {
                td_cuda_llama_wgrad *K = &S->LWg[l];
                ALLOC(K->down, BTC * es, "the split backward's kept gradients");
                ALLOC(K->gu, BT * 2 * F * es, "the split backward's kept gradients");
                ALLOC(K->o, BTC * es, "the split backward's kept gradients");
                ALLOC(K->qkv, BT * QW * es, "the split backward's kept gradients");
            }
        }
        if (m->has_head) {
            ALLOC(S->lnf, BTC * es, "activations");
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
    if (m->has_head) { /* lm_head in the compute type, rows V.. zero (backend.cu refreshes it) */
        ALLOC(d->wte_pad, (size_t)d->Vp * C * es, "the padded LM head");
        TD_CK(cudaMemsetAsync(d->wte_pad, 0, (size_t)d->Vp * C * es, d->stream));
    }

    /* scratch of one backward */
    const size_t wide = 2 * F > QW ? 2 * F : QW;
    const size_t nchunks = (BT + TD_CS_ROWS - 1) / TD_CS_ROWS, nlnb = (BT + TD_LNB_ROWS_MIN - 1) / TD_LNB_ROWS_MIN;
    const size_t part = (nchunks > nlnb ? nchunks : nlnb) * C; /* td_k_colsum's or the fused backward's */
    ALLOC(d->dres, BTC * es, "backward scratch");
    ALLOC(d->dln, BTC * es, "backward scratch");
    ALLOC(d->dbig, BT * wide * es, "backward scratch");
    ALLOC(d->dh, BT * F * es, "backward scratch");
    ALLOC(d->part_w, part * 4, "column-sum partials");
    ALLOC(d->part_b, part * 4, "column-sum partials");
    ALLOC(d->zeros, BT * 4, "RMSNorm scratch");
    TD_CK(cudaMemsetAsync(d->zeros, 0, BT * 4, d->stream));
    ALLOC(d->sq_part, (TD_SQ_BLOCKS + 1) * sizeof(double), "norm partials");
    TD_TRY(rope_tables(d));

    /* attention: flash (the FlashAttention-2 kernels on the qkv rows in place) or materialised
     * per-head blocks with the probabilities kept per layer when they fit with 2 GiB to spare */
    if (d->flash) {
        for (int64_t k = 0; k < m->slots; k++)
            for (int l = 0; l < m->nl; l++) ALLOC(d->S[k].LL[l].lse, B * NH * T * 4, "attention statistics");
        ALLOC(d->Dsum, B * NH * T * 4, "attention scratch");
    } else {
        ALLOC(d->qkvp, BT * QW * es, "attention scratch");
        ALLOC(d->yb, BTC * es, "attention scratch");
        ALLOC(d->dqkvp, BT * QW * es, "attention scratch");
        ALLOC(d->attS, att, "attention scratch (B, NH, T, T)");
        const char *att_env = getenv("TANDEM_CUDA_ATTENTION");
        size_t fr = 0, tot = 0;
        TD_CK(cudaMemGetInfo(&fr, &tot));
        if (att_env && *att_env) d->store_att = !strcmp(att_env, "store");
        else d->store_att = (size_t)m->slots * m->nl * att + ((size_t)2 << 30) <= fr;
        if (d->store_att) {
            for (int64_t k = 0; k < m->slots; k++)
                for (int l = 0; l < m->nl; l++) ALLOC(d->S[k].LL[l].att, att, "attention probabilities (B, NH, T, T) per layer");
        } else {
            ALLOC(d->attP, att, "attention scratch (B, NH, T, T)");
        }
    }

    TD_CK(cudaMallocHost((void **)&d->h_sq, sizeof(double)));
    TD_CK(cudaMemsetAsync(d->g32, 0, m->total * 4, d->stream));
    TD_CK(cudaMemsetAsync(d->mom, 0, m->total * 4, d->stream));
    TD_CK(cudaMemsetAsync(d->var, 0, m->total * 4, d->stream));
    return TD_OK;
}
