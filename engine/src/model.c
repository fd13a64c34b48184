/* model.c — which layers and parameters a stage holds, and its forward and backward passes.
 *
 * A stage is a contiguous range of transformer layers; the first stage also owns the
 * embeddings, the last stage the final LayerNorm and the tied LM head (its own copy of wte).
 * With one stage this is the whole model. Memory is laid out once in td_model_layout; the passes
 * below allocate nothing. The backward runs as two halves that a schedule may separate: the
 * input-gradient half (B) keeps the gradient of every matmul and LayerNorm output in a grad
 * store, the weight-gradient half (W) turns those into parameter gradients. A Llama model
 * (family = 1) keeps its table, buffers and passes in llama_model.c: td_model_layout and the
 * slot passes below hand over to it.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "kernels.h"

/* ---- parameter table ------------------------------------------------------------------------- */

static const char *LAYER_SUFFIX[12] = {
    "ln_1.weight",     "ln_1.bias",        "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight",     "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias",    "mlp.c_proj.weight",  "mlp.c_proj.bias",
};

static void layer_shape(int j, int64_t C, int32_t *ndim, int64_t shape[4]) {
    /* (in, out) for weights, (out) for biases and LayerNorm vectors */
    static const int64_t in_mul[12] = {0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 0};
    static const int64_t out_mul[12] = {1, 1, 3, 3, 1, 1, 1, 1, 4, 4, 1, 1};
    shape[0] = shape[1] = shape[2] = shape[3] = 1;
    if (in_mul[j]) {
        *ndim = 2;
        shape[0] = in_mul[j] * C;
        shape[1] = out_mul[j] * C;
    } else {
        *ndim = 1;
        shape[0] = out_mul[j] * C;
    }
}

void td_add_param(td_model *m, const char *name, int32_t ndim, const int64_t *shape) {
    td_param *p = &m->params[m->nparams++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->ndim = ndim;
    p->numel = 1;
    for (int d = 0; d < 4; d++) {
        p->shape[d] = d < ndim ? shape[d] : 1;
        if (d < ndim) p->numel *= shape[d];
    }
    p->decayed = ndim >= 2;
    p->offset = m->total;
    m->total += (size_t)p->numel;
}

td_param *td_find_param(td_model *m, const char *name) {
    for (int32_t i = 0; i < m->nparams; i++)
        if (strcmp(m->params[i].name, name) == 0) return &m->params[i];
    return NULL;
}

static void bind_ptrs(td_model *m, td_stage_ptrs *s, td_real *base) {
    char name[TD_MAX_NAME];
    td_param *p;
    s->wte = (p = td_find_param(m, "wte.weight")) ? base + p->offset : NULL;
    s->wpe = (p = td_find_param(m, "wpe.weight")) ? base + p->offset : NULL;
    s->lnfw = (p = td_find_param(m, "ln_f.weight")) ? base + p->offset : NULL;
    s->lnfb = (p = td_find_param(m, "ln_f.bias")) ? base + p->offset : NULL;
    for (int l = 0; l < m->nl; l++) {
        td_real **dst[12] = {
            &s->layers[l].ln1w, &s->layers[l].ln1b, &s->layers[l].qkvw, &s->layers[l].qkvb,
            &s->layers[l].attprojw, &s->layers[l].attprojb, &s->layers[l].ln2w,
            &s->layers[l].ln2b, &s->layers[l].fcw, &s->layers[l].fcb, &s->layers[l].fcprojw,
            &s->layers[l].fcprojb};
        for (int j = 0; j < 12; j++) {
            snprintf(name, sizeof name, "h.%d.%s", (int)(m->layer_begin + l), LAYER_SUFFIX[j]);
            *dst[j] = base + td_find_param(m, name)->offset;
        }
    }
}

/* Does `name` belong to the full model's table (any stage)? */
int td_full_model_has(const td_model *m, const char *name) {
    if (m->family == 1) return td_llama_full_model_has(m, name);
    if (!strcmp(name, "wte.weight") || !strcmp(name, "wpe.weight") ||
        !strcmp(name, "ln_f.weight") || !strcmp(name, "ln_f.bias"))
        return 1;
    int layer, consumed = 0;
    if (sscanf(name, "h.%d.%n", &layer, &consumed) == 1 && consumed > 0 && layer >= 0 &&
        layer < m->n_layer) {
        char canon[TD_MAX_NAME];
        snprintf(canon, sizeof canon, "h.%d.", layer);
        if (strncmp(name, canon, strlen(canon)) != 0) return 0; /* "h.01." is not "h.1." */
        for (int j = 0; j < 12; j++)
            if (!strcmp(name + consumed, LAYER_SUFFIX[j])) return 1;
    }
    return 0;
}

/* ---- allocation ------------------------------------------------------------------------------ */

/* A bump allocator over one calloc'd block per kind, so a failed build frees cleanly. */
typedef struct {
    td_real *base;
    size_t used, cap;
} arena;

static td_real *take(arena *a, size_t n) {
    td_real *p = a->base ? a->base + a->used : NULL;
    a->used += n;
    return p;
}

/* Lay out activations (slots), grad stores and scratch; two passes: count, then assign. */
static size_t layout_buffers(td_model *m, td_real *base) {
    arena a = {base, 0, 0};
    const size_t B = (size_t)m->batch_size, T = (size_t)m->seq_len, C = (size_t)m->n_embd;
    const size_t V = (size_t)m->vocab_size, NH = (size_t)m->n_head;
    const size_t BT = B * T, BTC = BT * C;
    for (int64_t s = 0; s < m->slots; s++) {
        td_slot *sl = &m->slot[s];
        sl->input = take(&a, BTC);
        for (int l = 0; l < m->nl; l++) {
            td_layer_acts *A = &sl->layers[l];
            A->ln1 = take(&a, BTC);
            A->ln1_mean = take(&a, BT);
            A->ln1_rstd = take(&a, BT);
            A->qkv = take(&a, 3 * BTC);
            A->att = take(&a, B * NH * T * T);
            A->atty = take(&a, BTC);
            A->res2 = take(&a, BTC);
            A->ln2 = take(&a, BTC);
            A->ln2_mean = take(&a, BT);
            A->ln2_rstd = take(&a, BT);
            A->fch = take(&a, 4 * BTC);
            A->fch_gelu = take(&a, 4 * BTC);
            A->res3 = take(&a, BTC);
        }
        if (m->has_head) {
            sl->lnf = take(&a, BTC);
            sl->lnf_mean = take(&a, BT);
            sl->lnf_rstd = take(&a, BT);
            sl->probs = take(&a, BT * V);
            sl->losses = take(&a, BT);
        }
    }
    int64_t nstores = m->split_backward ? m->slots : 1;
    for (int64_t s = 0; s < nstores; s++) {
        td_grad_store *g = &m->gstore[s];
        for (int l = 0; l < m->nl; l++) {
            td_layer_grads *L = &g->layers[l];
            L->g_ln1 = take(&a, BTC);
            L->g_qkv = take(&a, 3 * BTC);
            L->g_attproj = take(&a, BTC);
            L->g_ln2 = take(&a, BTC);
            L->g_fc = take(&a, 4 * BTC);
            L->g_fcproj = take(&a, BTC);
        }
        if (m->has_head) {
            g->g_logits = take(&a, BT * V);
            g->g_lnf = take(&a, BTC);
        }
        g->g_embed = take(&a, BTC);
    }
    m->scratch.dres = take(&a, BTC);
    m->scratch.dtmp = take(&a, BTC);
    m->scratch.datty = take(&a, BTC);
    m->scratch.datt = take(&a, B * NH * T * T);
    m->scratch.dfch_gelu = take(&a, 4 * BTC);
    return a.used;
}

static td_real *acts_mem_of(td_model *m) { return m->slot ? m->slot[0].input : NULL; }

void td_release(td_model *m) {
    free(m->params);
    free(m->param_mem);
    free(m->grad_mem);
    free(m->m_mem);
    free(m->v_mem);
    free(acts_mem_of(m));
    if (m->slot) {
        for (int64_t s = 0; s < m->slots; s++) {
            free(m->slot[s].layers);
            free(m->slot[s].llayers);
            free(m->slot[s].tokens);
        }
        free(m->slot);
    }
    if (m->gstore) {
        for (int64_t s = 0; s < (m->split_backward ? m->slots : 1); s++) {
            free(m->gstore[s].layers);
            free(m->gstore[s].llayers);
        }
        free(m->gstore);
    }
    free(m->P.layers);
    free(m->G.layers);
    free(m->P.llayers);
    free(m->G.llayers);
    m->P.llayers = m->G.llayers = NULL;
    m->params = NULL;
    m->param_mem = m->grad_mem = m->m_mem = m->v_mem = NULL;
    m->slot = NULL;
    m->gstore = NULL;
    m->P.layers = m->G.layers = NULL;
}

static int checked_mul(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}

td_status td_model_layout(td_model *m) {
    const int64_t C = m->n_embd;
    m->nl = (int)(m->layer_end - m->layer_begin);
    m->has_embed = m->stage == 0;
    m->has_head = m->stage == m->stages - 1;
    int32_t cap = 2 + 12 * m->nl + 3;
    m->params = calloc((size_t)cap, sizeof(td_param));
    m->slot = calloc((size_t)m->slots, sizeof(td_slot));
    int64_t nstores = m->split_backward ? m->slots : 1;
    m->gstore = calloc((size_t)nstores, sizeof(td_grad_store));
    m->P.layers = calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_layer_ptrs));
    m->G.layers = calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_layer_ptrs));
    m->P.llayers = calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_llama_layer_ptrs));
    m->G.llayers = calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_llama_layer_ptrs));
    if (!m->params || !m->slot || !m->gstore || !m->P.layers || !m->G.layers || !m->P.llayers ||
        !m->G.llayers)
        goto oom;
    for (int64_t s = 0; s < m->slots; s++) {
        m->slot[s].layers = calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_layer_acts));
        m->slot[s].llayers = calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_llama_layer_acts));
        m->slot[s].tokens = calloc((size_t)(2 * m->batch_size * m->seq_len), sizeof(int32_t));
        if (!m->slot[s].layers || !m->slot[s].llayers || !m->slot[s].tokens) goto oom;
        m->slot[s].targets = m->slot[s].tokens + m->batch_size * m->seq_len;
    }
    for (int64_t s = 0; s < nstores; s++) {
        m->gstore[s].layers = calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_layer_grads));
        m->gstore[s].llayers = calloc((size_t)(m->nl ? m->nl : 1), sizeof(td_llama_layer_grads));
        if (!m->gstore[s].layers || !m->gstore[s].llayers) goto oom;
    }

    int64_t shape[4];
    int32_t ndim;
    m->nparams = 0;
    m->total = 0;
    if (m->family == 1) {
        td_llama_table(m);
    } else if (m->has_embed) {
        shape[0] = m->vocab_size, shape[1] = C;
        td_add_param(m, "wte.weight", 2, shape);
        shape[0] = m->n_positions;
        td_add_param(m, "wpe.weight", 2, shape);
    }
    for (int l = 0; l < m->nl && m->family != 1; l++) {
        char name[TD_MAX_NAME];
        for (int j = 0; j < 12; j++) {
            layer_shape(j, C, &ndim, shape);
            snprintf(name, sizeof name, "h.%d.%s", (int)(m->layer_begin + l), LAYER_SUFFIX[j]);
            td_add_param(m, name, ndim, shape);
        }
    }
    if (m->has_head && m->family != 1) {
        shape[0] = C;
        td_add_param(m, "ln_f.weight", 1, shape);
        td_add_param(m, "ln_f.bias", 1, shape);
        if (!m->has_embed) { /* the last stage's own copy of the tied embedding */
            shape[0] = m->vocab_size, shape[1] = C;
            td_add_param(m, "wte.weight", 2, shape);
        }
    }

    size_t bytes;
    if (!checked_mul(m->total, sizeof(td_real), &bytes)) goto oom;
    m->param_mem = calloc(m->total ? m->total : 1, sizeof(td_real));
    m->grad_mem = calloc(m->total ? m->total : 1, sizeof(td_real));
    m->m_mem = calloc(m->total ? m->total : 1, sizeof(td_real));
    m->v_mem = calloc(m->total ? m->total : 1, sizeof(td_real));
    if (!m->param_mem || !m->grad_mem || !m->m_mem || !m->v_mem)
        return td_fail(m, TD_ERR_NOMEM,
                       "td_model_build: cannot allocate 4 x %zu bytes for %zu parameters. HINT: "
                       "a smaller model or more memory",
                       bytes, m->total);
    if (m->family == 1) {
        td_llama_bind(m, &m->P, m->param_mem);
        td_llama_bind(m, &m->G, m->grad_mem);
    } else {
        bind_ptrs(m, &m->P, m->param_mem);
        bind_ptrs(m, &m->G, m->grad_mem);
    }
    m->host_bytes = 4 * bytes + (size_t)m->slots * 2 * (size_t)(m->batch_size * m->seq_len) *
                                    sizeof(int32_t);

    if (m->backend == 1) return TD_OK; /* a device backend keeps its own activations; the
                                          * slots' tokens and targets above stay for staging */
    size_t (*lay)(td_model *, td_real *) = m->family == 1 ? td_llama_layout_buffers : layout_buffers;
    size_t n = lay(m, NULL);
    td_real *acts = (n && checked_mul(n, sizeof(td_real), &bytes)) ? calloc(n, sizeof(td_real)) : NULL;
    if (!acts)
        return td_fail(m, TD_ERR_NOMEM,
                       "td_model_build: cannot allocate %zu activation elements (batch_size=%lld, "
                       "seq_len=%lld, slots=%lld). HINT: fewer micro-batches in flight, a smaller "
                       "batch_size or seq_len",
                       n, (long long)m->batch_size, (long long)m->seq_len, (long long)m->slots);
    lay(m, acts); /* slot[0].input == acts: freed through acts_mem_of */
    m->host_bytes += n * sizeof(td_real);
    return TD_OK;
oom:
    return td_fail(m, TD_ERR_NOMEM, "td_model_build: out of memory laying out the model");
}

/* ---- per-phase profile ---------------------------------------------------------------------- */

/* Names of td_phase, in its order. */
static const char *const PHASE_NAME[TD_PH_COUNT] = {
    "encoder_fwd", "layernorm_fwd", "matmul_fwd", "attention_fwd", "residual_fwd", "gelu_fwd",
    "lm_head_fwd", "softmax_ce_fwd", "softmax_ce_bwd", "lm_head_bwd_input", "matmul_bwd_input",
    "gelu_bwd", "attention_bwd", "layernorm_bwd_input", "copy_bwd", "lm_head_bwd_weight",
    "matmul_bwd_weight", "layernorm_bwd_weight", "encoder_bwd", "adamw", "rmsnorm_fwd",
    "rope_fwd", "swiglu_fwd", "rmsnorm_bwd_input", "rmsnorm_bwd_weight", "rope_bwd", "swiglu_bwd"};

td_status td_model_profile(const td_model *m, int32_t index, const char **out_name,
                           double *out_seconds, int64_t *out_calls) {
    if (!m) return TD_ERR_ARG;
    if (index < 0 || index >= TD_PH_COUNT) return TD_ERR_RANGE;
    if (out_name) *out_name = PHASE_NAME[index];
    if (out_seconds) *out_seconds = m->prof_s[index];
    if (out_calls) *out_calls = m->prof_n[index];
    return TD_OK;
}

td_status td_model_profile_reset(td_model *m) {
    if (!m) return TD_ERR_ARG;
    memset(m->prof_s, 0, sizeof m->prof_s);
    memset(m->prof_n, 0, sizeof m->prof_n);
    return TD_OK;
}


/* ---- forward --------------------------------------------------------------------------------- */

/* The residual stream entering layer l (l == nl: leaving the last layer). */
static td_real *residual_in(td_slot *s, int l) { return l == 0 ? s->input : s->layers[l - 1].res3; }

/* Forward of the slot's micro-batch from slot->input (or tokens). Writes logits to logits_out
 * (fp32 copy) when given, and the mean loss when the stage has the head and targets are set. */
td_status td_forward_slot(td_model *m, int32_t slot, float *logits_out, double *out_loss,
                          int with_targets) {
    if (m->family == 1) return td_llama_forward_slot(m, slot, logits_out, out_loss, with_targets);
    td_slot *s = &m->slot[slot];
    const int B = s->B, T = s->T, C = (int)m->n_embd, NH = (int)m->n_head, V = (int)m->vocab_size;
    const int BT = B * T;
    if (m->has_embed) PHASE(m, TD_PH_ENCODER_FWD, td_encoder_forward(s->input, s->tokens, m->P.wte, m->P.wpe, B, T, C));
    for (int l = 0; l < m->nl; l++) {
        td_layer_acts *A = &s->layers[l];
        td_layer_ptrs *W = &m->P.layers[l];
        td_real *res = residual_in(s, l);
        PHASE(m, TD_PH_LAYERNORM_FWD, td_layernorm_forward(A->ln1, A->ln1_mean, A->ln1_rstd, res, W->ln1w, W->ln1b, BT, C));
        PHASE(m, TD_PH_MATMUL_FWD, td_linear_forward(A->qkv, A->ln1, W->qkvw, W->qkvb, BT, C, 3 * C));
        PHASE(m, TD_PH_ATTENTION_FWD, td_attention_forward(A->atty, A->att, A->qkv, B, T, C, NH));
        PHASE(m, TD_PH_MATMUL_FWD, td_linear_forward(A->res2, A->atty, W->attprojw, W->attprojb, BT, C, C));
        PHASE(m, TD_PH_RESIDUAL_FWD, td_residual_forward(A->res2, res, A->res2, (int64_t)BT * C));
        PHASE(m, TD_PH_LAYERNORM_FWD, td_layernorm_forward(A->ln2, A->ln2_mean, A->ln2_rstd, A->res2, W->ln2w, W->ln2b, BT, C));
        PHASE(m, TD_PH_MATMUL_FWD, td_linear_forward(A->fch, A->ln2, W->fcw, W->fcb, BT, C, 4 * C));
        PHASE(m, TD_PH_GELU_FWD, td_gelu_forward(A->fch_gelu, A->fch, (int64_t)BT * 4 * C));
        PHASE(m, TD_PH_MATMUL_FWD, td_linear_forward(A->res3, A->fch_gelu, W->fcprojw, W->fcprojb, BT, 4 * C, C));
        PHASE(m, TD_PH_RESIDUAL_FWD, td_residual_forward(A->res3, A->res2, A->res3, (int64_t)BT * C));
    }
    if (!m->has_head) return TD_OK;
    td_real *res = residual_in(s, m->nl);
    PHASE(m, TD_PH_LAYERNORM_FWD, td_layernorm_forward(s->lnf, s->lnf_mean, s->lnf_rstd, res, m->P.lnfw, m->P.lnfb, BT, C));
    PHASE(m, TD_PH_LM_HEAD_FWD, td_gemm(s->probs, s->lnf, m->P.wte, BT, V, C, 0, 1, 0)); /* logits = lnf @ wte^T */
    if (logits_out)
        for (int64_t i = 0; i < (int64_t)BT * V; i++) logits_out[i] = (float)s->probs[i];
    if (!with_targets) return TD_OK;
    PHASE(m, TD_PH_SOFTMAX_CE_FWD, td_softmax_crossentropy_forward(s->probs, s->losses, s->targets, BT, V));
    double sum = 0.0;
    for (int i = 0; i < BT; i++) sum += s->losses[i];
    if (out_loss) *out_loss = sum / BT;
    return TD_OK;
}

/* ---- backward -------------------------------------------------------------------------------- */

/* B: gradients of activations, from d(loss) (last stage) or dout_BTC down to the stage input.
 * Leaves the result in g->g_embed and everything W needs in g. */
static void backward_input(td_model *m, td_slot *s, td_grad_store *g, double grad_scale,
                           const td_real *dout_BTC) {
    const int B = s->B, T = s->T, C = (int)m->n_embd, NH = (int)m->n_head, V = (int)m->vocab_size;
    const int BT = B * T;
    const size_t btc = (size_t)BT * C * sizeof(td_real);
    td_real *dres = m->scratch.dres;
    if (m->has_head) {
        /* loss = mean over BT rows: each row's d(loss) is grad_scale / BT */
        PHASE(m, TD_PH_SOFTMAX_CE_BWD, td_softmax_crossentropy_backward(g->g_logits, s->probs, s->targets, grad_scale / BT, BT, V));
        PHASE(m, TD_PH_LM_HEAD_BWD_INPUT, td_gemm(g->g_lnf, g->g_logits, m->P.wte, BT, C, V, 0, 0, 0)); /* d lnf = dlogits @ wte */
        PHASE(m, TD_PH_LAYERNORM_BWD_INPUT, td_layernorm_backward_input(dres, g->g_lnf, residual_in(s, m->nl), m->P.lnfw, s->lnf_mean,
                                    s->lnf_rstd, BT, C, 0));
    } else {
        PHASE(m, TD_PH_COPY_BWD, memcpy(dres, dout_BTC, btc));
    }
    for (int l = m->nl - 1; l >= 0; l--) {
        td_layer_acts *A = &s->layers[l];
        td_layer_ptrs *W = &m->P.layers[l];
        td_layer_grads *L = &g->layers[l];
        /* MLP block: res3 = res2 + fcproj(gelu(fc(ln2(res2)))) */
        PHASE(m, TD_PH_COPY_BWD, memcpy(L->g_fcproj, dres, btc));
        PHASE(m, TD_PH_MATMUL_BWD_INPUT, td_linear_backward_input(m->scratch.dfch_gelu, L->g_fcproj, W->fcprojw, BT, 4 * C, C, 0));
        PHASE(m, TD_PH_GELU_BWD, td_gelu_backward(L->g_fc, A->fch, m->scratch.dfch_gelu, (int64_t)BT * 4 * C));
        PHASE(m, TD_PH_MATMUL_BWD_INPUT, td_linear_backward_input(L->g_ln2, L->g_fc, W->fcw, BT, C, 4 * C, 0));
        PHASE(m, TD_PH_LAYERNORM_BWD_INPUT, td_layernorm_backward_input(dres, L->g_ln2, A->res2, W->ln2w, A->ln2_mean, A->ln2_rstd,
                                    BT, C, 1));
        /* attention block: res2 = res + attproj(attention(qkv(ln1(res)))) */
        PHASE(m, TD_PH_COPY_BWD, memcpy(L->g_attproj, dres, btc));
        PHASE(m, TD_PH_MATMUL_BWD_INPUT, td_linear_backward_input(m->scratch.datty, L->g_attproj, W->attprojw, BT, C, C, 0));
        PHASE(m, TD_PH_ATTENTION_BWD, td_attention_backward(L->g_qkv, m->scratch.datt, m->scratch.datty, A->qkv, A->att, B, T,
                              C, NH));
        PHASE(m, TD_PH_MATMUL_BWD_INPUT, td_linear_backward_input(L->g_ln1, L->g_qkv, W->qkvw, BT, C, 3 * C, 0));
        PHASE(m, TD_PH_LAYERNORM_BWD_INPUT, td_layernorm_backward_input(dres, L->g_ln1, residual_in(s, l), W->ln1w, A->ln1_mean,
                                    A->ln1_rstd, BT, C, 1));
    }
    PHASE(m, TD_PH_COPY_BWD, memcpy(g->g_embed, dres, btc));
}

/* W: parameter gradients (accumulated) from what backward_input kept. */
static void backward_weight(td_model *m, td_slot *s, td_grad_store *g) {
    const int B = s->B, T = s->T, C = (int)m->n_embd, V = (int)m->vocab_size;
    const int BT = B * T;
    if (m->has_head) {
        PHASE(m, TD_PH_LM_HEAD_BWD_WEIGHT, td_gemm(m->G.wte, g->g_logits, s->lnf, V, C, BT, 1, 0, 1)); /* dwte += dlogits^T @ lnf */
        PHASE(m, TD_PH_LAYERNORM_BWD_WEIGHT, td_layernorm_backward_weight(m->G.lnfw, m->G.lnfb, g->g_lnf, residual_in(s, m->nl),
                                     s->lnf_mean, s->lnf_rstd, BT, C));
    }
    for (int l = m->nl - 1; l >= 0; l--) {
        td_layer_acts *A = &s->layers[l];
        td_layer_ptrs *D = &m->G.layers[l];
        td_layer_grads *L = &g->layers[l];
        PHASE(m, TD_PH_MATMUL_BWD_WEIGHT, td_linear_backward_weight(D->fcprojw, D->fcprojb, L->g_fcproj, A->fch_gelu, BT, 4 * C, C));
        PHASE(m, TD_PH_MATMUL_BWD_WEIGHT, td_linear_backward_weight(D->fcw, D->fcb, L->g_fc, A->ln2, BT, C, 4 * C));
        PHASE(m, TD_PH_LAYERNORM_BWD_WEIGHT, td_layernorm_backward_weight(D->ln2w, D->ln2b, L->g_ln2, A->res2, A->ln2_mean,
                                     A->ln2_rstd, BT, C));
        PHASE(m, TD_PH_MATMUL_BWD_WEIGHT, td_linear_backward_weight(D->attprojw, D->attprojb, L->g_attproj, A->atty, BT, C, C));
        PHASE(m, TD_PH_MATMUL_BWD_WEIGHT, td_linear_backward_weight(D->qkvw, D->qkvb, L->g_qkv, A->ln1, BT, C, 3 * C));
        PHASE(m, TD_PH_LAYERNORM_BWD_WEIGHT, td_layernorm_backward_weight(D->ln1w, D->ln1b, L->g_ln1, residual_in(s, l), A->ln1_mean,
                                     A->ln1_rstd, BT, C));
    }
    if (m->has_embed) PHASE(m, TD_PH_ENCODER_BWD, td_encoder_backward(m->G.wte, m->G.wpe, g->g_embed, s->tokens, B, T, C));
}

td_status td_backward_slot(td_model *m, int32_t slot, double grad_scale, int part,
                           const td_real *dout_BTC) {
    if (m->family == 1) {
        td_llama_backward_slot(m, slot, grad_scale, part, dout_BTC);
        return TD_OK;
    }
    td_slot *s = &m->slot[slot];
    td_grad_store *g = &m->gstore[m->split_backward ? slot : 0];
    if (part == TD_BWD_FULL || part == TD_BWD_INPUT) backward_input(m, s, g, grad_scale, dout_BTC);
    if (part == TD_BWD_FULL || part == TD_BWD_WEIGHT) backward_weight(m, s, g);
    return TD_OK;
}

const td_real *td_stage_output(const td_model *m, int32_t slot) {
    const td_slot *s = &m->slot[slot];
    if (!m->nl) return s->input;
    return m->family == 1 ? s->llayers[m->nl - 1].res3 : s->layers[m->nl - 1].res3;
}

/* The gradient of the stage input after a B or BW pass (what goes to the previous stage). */
const td_real *td_input_grad(const td_model *m, int32_t slot) {
    return m->gstore[m->split_backward ? slot : 0].g_embed;
}
