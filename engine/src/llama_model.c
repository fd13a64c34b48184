/* llama_model.c — the Llama family on the CPU, any stage of a pipeline: its parameter table (the
 * public Llama names of reference/llama.py, in its order, the stage's share of them), activation
 * buffers, forward (a stage's output, or logits and loss on the last) and backward (every
 * parameter's gradient), whole or split into B (input gradients, kept in a grad store per slot)
 * and W (weight gradients from what B kept), as model.c does for GPT-2. model.c hands over to
 * these when family = 1; AdamW (optim.c) runs on the flat buffers as for GPT-2.
 *
 * The first stage holds model.embed_tokens, the last model.norm and lm_head (untied: no
 * gradient crosses between the two ends). Not here: the CUDA backend (engine/cuda). The ops are
 * llama_ops.c's kernels; every projection is one td_gemm with the (out, in) weight transposed.
 * The maths is docs/model.md's "Llama family".
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "kernels.h"
#include "llama_ops.h"

/* ---- parameter table ------------------------------------------------------------------------- */

/* A layer's tensors, in reference.llama.LAYER_KEYS order. */
static const char *const LAYER_KEY[9] = {
    "input_layernorm.weight",  "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",    "mlp.up_proj.weight",      "mlp.down_proj.weight",
};

void td_llama_table(td_model *m) {
    const int64_t C = m->n_embd, V = m->vocab_size, F = m->ffn_dim;
    const int64_t KV = m->n_kv_head * (C / m->n_head);
    /* (out, in) per LAYER_KEY; a zero second dimension marks a vector */
    const int64_t shapes[9][2] = {{C, 0}, {C, C}, {KV, C}, {KV, C}, {C, C},
                                  {C, 0}, {F, C}, {F, C},  {C, F}};
    int64_t shape[4] = {V, C, 1, 1};
    if (m->has_embed) td_add_param(m, "model.embed_tokens.weight", 2, shape);
    for (int l = 0; l < m->nl; l++) {
        for (int j = 0; j < 9; j++) {
            char name[TD_MAX_NAME];
            snprintf(name, sizeof name, "model.layers.%d.%s", (int)(m->layer_begin + l),
                     LAYER_KEY[j]);
            shape[0] = shapes[j][0], shape[1] = shapes[j][1];
            td_add_param(m, name, shapes[j][1] ? 2 : 1, shape);
        }
    }
    if (!m->has_head) return;
    shape[0] = C;
    td_add_param(m, "model.norm.weight", 1, shape);
    shape[0] = V, shape[1] = C;
    td_add_param(m, "lm_head.weight", 2, shape);
}

/* Does `name` belong to the whole model's table (any stage)? */
int td_llama_full_model_has(const td_model *m, const char *name) {
    if (!strcmp(name, "model.embed_tokens.weight") || !strcmp(name, "model.norm.weight") ||
        !strcmp(name, "lm_head.weight"))
        return 1;
    int layer, consumed = 0;
    if (sscanf(name, "model.layers.%d.%n", &layer, &consumed) != 1 || consumed <= 0 ||
        layer < 0 || layer >= m->n_layer)
        return 0;
    char canon[TD_MAX_NAME];
    snprintf(canon, sizeof canon, "model.layers.%d.", layer);
    if (strncmp(name, canon, strlen(canon)) != 0) return 0; /* "layers.01." is not "layers.1." */
    for (int j = 0; j < 9; j++)
        if (!strcmp(name + consumed, LAYER_KEY[j])) return 1;
    return 0;
}

static td_real *at(td_model *m, td_real *base, const char *name) {
    td_param *p = td_find_param(m, name);
    return p ? base + p->offset : NULL;
}

void td_llama_bind(td_model *m, td_stage_ptrs *s, td_real *base) {
    s->wte = at(m, base, "model.embed_tokens.weight"); /* NULL off the stage that holds it */
    s->lnfw = at(m, base, "model.norm.weight");
    s->lm_head = at(m, base, "lm_head.weight");
    s->wpe = s->lnfb = NULL;
    for (int l = 0; l < m->nl; l++) {
        td_llama_layer_ptrs *L = &s->llayers[l];
        td_real **dst[9] = {&L->attn_norm, &L->wq,    &L->wk,  &L->wv,   &L->wo,
                            &L->mlp_norm,  &L->wgate, &L->wup, &L->wdown};
        for (int j = 0; j < 9; j++) {
            char name[TD_MAX_NAME];
            snprintf(name, sizeof name, "model.layers.%d.%s", (int)(m->layer_begin + l),
                     LAYER_KEY[j]);
            *dst[j] = at(m, base, name);
        }
    }
}

/* ---- activation buffers ---------------------------------------------------------------------- */

/* Bump allocation over one block; base NULL only counts (model.c calls this twice). */
static td_real *take(td_real *base, size_t *used, size_t n) {
    td_real *p = base ? base + *used : NULL;
    *used += n;
    return p;
}

size_t td_llama_layout_buffers(td_model *m, td_real *base) {
    const size_t B = (size_t)m->batch_size, T = (size_t)m->seq_len, C = (size_t)m->n_embd;
    const size_t V = (size_t)m->vocab_size, NH = (size_t)m->n_head, F = (size_t)m->ffn_dim;
    const size_t BT = B * T, BTC = BT * C, BTKV = BT * (size_t)m->n_kv_head * (C / NH);
    size_t u = 0;
    for (int64_t s = 0; s < m->slots; s++) {
        td_slot *sl = &m->slot[s];
        sl->input = take(base, &u, BTC); /* slot 0's first: the block model.c frees */
        for (int l = 0; l < m->nl; l++) {
            td_llama_layer_acts *A = &sl->llayers[l];
            A->ln1 = take(base, &u, BTC);
            A->ln1_rstd = take(base, &u, BT);
            A->q = take(base, &u, BTC);
            A->k = take(base, &u, BTKV);
            A->v = take(base, &u, BTKV);
            A->att = take(base, &u, B * NH * T * T);
            A->atty = take(base, &u, BTC);
            A->res2 = take(base, &u, BTC);
            A->ln2 = take(base, &u, BTC);
            A->ln2_rstd = take(base, &u, BT);
            A->gate = take(base, &u, BT * F);
            A->up = take(base, &u, BT * F);
            A->h = take(base, &u, BT * F);
            A->res3 = take(base, &u, BTC);
        }
        if (m->has_head) {
            sl->lnf = take(base, &u, BTC);
            sl->lnf_rstd = take(base, &u, BT);
            sl->probs = take(base, &u, BT * V);
            sl->losses = take(base, &u, BT);
        }
    }
    const int64_t nstores = m->split_backward ? m->slots : 1; /* one per slot awaiting its W */
    for (int64_t s = 0; s < nstores; s++) {
        td_grad_store *g = &m->gstore[s];
        for (int l = 0; l < m->nl; l++) {
            td_llama_layer_grads *L = &g->llayers[l];
            L->g_res3 = take(base, &u, BTC);
            L->g_gate = take(base, &u, BT * F);
            L->g_up = take(base, &u, BT * F);
            L->g_ln2 = take(base, &u, BTC);
            L->g_res2 = take(base, &u, BTC);
            L->g_q = take(base, &u, BTC);
            L->g_k = take(base, &u, BTKV);
            L->g_v = take(base, &u, BTKV);
            L->g_ln1 = take(base, &u, BTC);
        }
        if (m->has_head) {
            g->g_logits = take(base, &u, BT * V);
            g->g_lnf = take(base, &u, BTC);
        }
        g->g_embed = take(base, &u, BTC);
    }
    td_scratch *k = &m->scratch;
    k->dres = take(base, &u, BTC);
    k->dtmp = take(base, &u, BTC);
    k->datty = take(base, &u, BTC);
    k->datt = take(base, &u, B * NH * T * T);
    k->dh = take(base, &u, BT * F);
    return u;
}

/* ---- forward --------------------------------------------------------------------------------- */

/* The residual stream entering layer l (l == nl: leaving the last layer). */
static td_real *residual_in(td_slot *s, int l) {
    return l == 0 ? s->input : s->llayers[l - 1].res3;
}

/* y(N, O) = x(N, I) @ W^T for W stored (O, I), overwriting y. */
static void proj(td_real *y, const td_real *x, const td_real *W, int N, int O, int I) {
    td_gemm(y, x, W, N, O, I, 0, 1, 0);
}

td_status td_llama_forward_slot(td_model *m, int32_t slot, float *logits_out, double *out_loss,
                                int with_targets) {
    td_slot *s = &m->slot[slot];
    const int B = s->B, T = s->T, C = (int)m->n_embd, V = (int)m->vocab_size;
    const int NH = (int)m->n_head, NKV = (int)m->n_kv_head, HS = C / NH, KV = NKV * HS;
    const int F = (int)m->ffn_dim, BT = B * T;
    const double theta = m->rope_theta, eps = m->norm_eps;
    if (m->has_embed) PHASE(m, TD_PH_ENCODER_FWD, td_embedding_forward(s->input, s->tokens, m->P.wte, BT, C));
    for (int l = 0; l < m->nl; l++) {
        td_llama_layer_acts *A = &s->llayers[l];
        const td_llama_layer_ptrs *W = &m->P.llayers[l];
        const td_real *x = residual_in(s, l);
        /* attention block: res2 = x + o_proj(GQA(RoPE(q), RoPE(k), v)) of RMS(x) */
        PHASE(m, TD_PH_RMSNORM_FWD, td_rmsnorm_forward(A->ln1, A->ln1_rstd, x, W->attn_norm, BT, C, eps));
        PHASE(m, TD_PH_MATMUL_FWD, proj(A->q, A->ln1, W->wq, BT, C, C));
        PHASE(m, TD_PH_MATMUL_FWD, proj(A->k, A->ln1, W->wk, BT, KV, C));
        PHASE(m, TD_PH_MATMUL_FWD, proj(A->v, A->ln1, W->wv, BT, KV, C));
        /* in place: the backward needs only the rotated q and k */
        PHASE(m, TD_PH_ROPE_FWD, td_rope_forward(A->q, A->q, B, T, NH, HS, theta));
        PHASE(m, TD_PH_ROPE_FWD, td_rope_forward(A->k, A->k, B, T, NKV, HS, theta));
        PHASE(m, TD_PH_ATTENTION_FWD, td_gqa_attention_forward(A->atty, A->att, A->q, A->k, A->v, B, T, NH, NKV, HS));
        PHASE(m, TD_PH_MATMUL_FWD, proj(A->res2, A->atty, W->wo, BT, C, C));
        PHASE(m, TD_PH_RESIDUAL_FWD, td_residual_forward(A->res2, x, A->res2, (int64_t)BT * C));
        /* MLP block: res3 = res2 + down(silu(gate(a)) * up(a)), a = RMS(res2) */
        PHASE(m, TD_PH_RMSNORM_FWD, td_rmsnorm_forward(A->ln2, A->ln2_rstd, A->res2, W->mlp_norm, BT, C, eps));
        PHASE(m, TD_PH_MATMUL_FWD, proj(A->gate, A->ln2, W->wgate, BT, F, C));
        PHASE(m, TD_PH_MATMUL_FWD, proj(A->up, A->ln2, W->wup, BT, F, C));
        PHASE(m, TD_PH_SWIGLU_FWD, td_swiglu_forward(A->h, A->gate, A->up, (int64_t)BT * F));
        PHASE(m, TD_PH_MATMUL_FWD, proj(A->res3, A->h, W->wdown, BT, C, F));
        PHASE(m, TD_PH_RESIDUAL_FWD, td_residual_forward(A->res3, A->res2, A->res3, (int64_t)BT * C));
    }
    if (!m->has_head) return TD_OK; /* the output is residual_in(s, nl) (td_stage_output) */
    PHASE(m, TD_PH_RMSNORM_FWD, td_rmsnorm_forward(s->lnf, s->lnf_rstd, residual_in(s, m->nl), m->P.lnfw, BT, C, eps));
    /* logits, softmax'd in place below */
    PHASE(m, TD_PH_LM_HEAD_FWD, proj(s->probs, s->lnf, m->P.lm_head, BT, V, C));
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

/* dx (=, or += with acc) = dy @ W through y = x @ W^T (W stored (O, I)). */
static void proj_dinput(td_real *dx, const td_real *dy, const td_real *W, int N, int O, int I,
                        int acc) {
    td_gemm(dx, dy, W, N, I, O, 0, 0, acc);
}

/* dW += dy^T @ x. */
static void proj_dweight(td_real *dW, const td_real *dy, const td_real *x, int N, int O, int I) {
    td_gemm(dW, dy, x, O, I, N, 1, 0, 1);
}

/* B: gradients of activations from d(loss) (last stage) or dout_BTC down to the stage input
 * (left in g->g_embed), keeping in g every output gradient the weight gradients need. */
static void backward_input(td_model *m, td_slot *s, td_grad_store *g, double grad_scale,
                           const td_real *dout_BTC) {
    td_scratch *k = &m->scratch;
    const int B = s->B, T = s->T, C = (int)m->n_embd, V = (int)m->vocab_size;
    const int NH = (int)m->n_head, NKV = (int)m->n_kv_head, HS = C / NH, KV = NKV * HS;
    const int F = (int)m->ffn_dim, BT = B * T;
    const double theta = m->rope_theta;
    const size_t btc = sizeof(td_real) * (size_t)BT * C;
    td_real *dres = k->dres; /* the gradient of the residual stream, running down the layers */
    if (m->has_head) {
        /* loss = mean over BT rows, so each row's d(loss) is grad_scale / BT */
        PHASE(m, TD_PH_SOFTMAX_CE_BWD, td_softmax_crossentropy_backward(g->g_logits, s->probs, s->targets, grad_scale / BT, BT, V));
        PHASE(m, TD_PH_LM_HEAD_BWD_INPUT, proj_dinput(g->g_lnf, g->g_logits, m->P.lm_head, BT, V, C, 0));
        PHASE(m, TD_PH_RMSNORM_BWD_INPUT, td_rmsnorm_backward_input(dres, g->g_lnf, residual_in(s, m->nl), m->P.lnfw, s->lnf_rstd, BT, C, 0));
    } else {
        PHASE(m, TD_PH_COPY_BWD, memcpy(dres, dout_BTC, btc));
    }
    for (int l = m->nl - 1; l >= 0; l--) {
        const td_llama_layer_acts *A = &s->llayers[l];
        const td_llama_layer_ptrs *W = &m->P.llayers[l];
        td_llama_layer_grads *L = &g->llayers[l];
        /* MLP block; dres holds d res3 */
        PHASE(m, TD_PH_COPY_BWD, memcpy(L->g_res3, dres, btc));
        PHASE(m, TD_PH_MATMUL_BWD_INPUT, proj_dinput(k->dh, dres, W->wdown, BT, C, F, 0));
        PHASE(m, TD_PH_SWIGLU_BWD, td_swiglu_backward(L->g_gate, L->g_up, k->dh, A->gate, A->up, (int64_t)BT * F));
        PHASE(m, TD_PH_MATMUL_BWD_INPUT, proj_dinput(L->g_ln2, L->g_gate, W->wgate, BT, F, C, 0));
        PHASE(m, TD_PH_MATMUL_BWD_INPUT, proj_dinput(L->g_ln2, L->g_up, W->wup, BT, F, C, 1));
        PHASE(m, TD_PH_RMSNORM_BWD_INPUT, td_rmsnorm_backward_input(dres, L->g_ln2, A->res2, W->mlp_norm, A->ln2_rstd, BT, C, 1));
        /* attention block; dres now holds d res2 */
        PHASE(m, TD_PH_COPY_BWD, memcpy(L->g_res2, dres, btc));
        PHASE(m, TD_PH_MATMUL_BWD_INPUT, proj_dinput(k->datty, dres, W->wo, BT, C, C, 0));
        PHASE(m, TD_PH_ATTENTION_BWD, td_gqa_attention_backward(L->g_q, L->g_k, L->g_v, k->datt, k->datty, A->q, A->k, A->v, A->att, B, T, NH, NKV, HS));
        /* to the projections' outputs */
        PHASE(m, TD_PH_ROPE_BWD, td_rope_backward(L->g_q, L->g_q, B, T, NH, HS, theta));
        PHASE(m, TD_PH_ROPE_BWD, td_rope_backward(L->g_k, L->g_k, B, T, NKV, HS, theta));
        PHASE(m, TD_PH_MATMUL_BWD_INPUT, proj_dinput(L->g_ln1, L->g_q, W->wq, BT, C, C, 0));
        PHASE(m, TD_PH_MATMUL_BWD_INPUT, proj_dinput(L->g_ln1, L->g_k, W->wk, BT, KV, C, 1));
        PHASE(m, TD_PH_MATMUL_BWD_INPUT, proj_dinput(L->g_ln1, L->g_v, W->wv, BT, KV, C, 1));
        PHASE(m, TD_PH_RMSNORM_BWD_INPUT, td_rmsnorm_backward_input(dres, L->g_ln1, residual_in(s, l), W->attn_norm, A->ln1_rstd, BT, C, 1));
    }
    PHASE(m, TD_PH_COPY_BWD, memcpy(g->g_embed, dres, btc));
}

/* W: parameter gradients (accumulated) from what backward_input kept. */
static void backward_weight(td_model *m, td_slot *s, td_grad_store *g) {
    const int B = s->B, T = s->T, C = (int)m->n_embd, V = (int)m->vocab_size;
    const int NH = (int)m->n_head, KV = (int)m->n_kv_head * (C / NH);
    const int F = (int)m->ffn_dim, BT = B * T;
    if (m->has_head) {
        PHASE(m, TD_PH_LM_HEAD_BWD_WEIGHT, proj_dweight(m->G.lm_head, g->g_logits, s->lnf, BT, V, C));
        PHASE(m, TD_PH_RMSNORM_BWD_WEIGHT, td_rmsnorm_backward_weight(m->G.lnfw, g->g_lnf, residual_in(s, m->nl), s->lnf_rstd, BT, C));
    }
    for (int l = m->nl - 1; l >= 0; l--) {
        const td_llama_layer_acts *A = &s->llayers[l];
        td_llama_layer_ptrs *D = &m->G.llayers[l];
        const td_llama_layer_grads *L = &g->llayers[l];
        PHASE(m, TD_PH_MATMUL_BWD_WEIGHT, proj_dweight(D->wdown, L->g_res3, A->h, BT, C, F));
        PHASE(m, TD_PH_MATMUL_BWD_WEIGHT, proj_dweight(D->wgate, L->g_gate, A->ln2, BT, F, C));
        PHASE(m, TD_PH_MATMUL_BWD_WEIGHT, proj_dweight(D->wup, L->g_up, A->ln2, BT, F, C));
        PHASE(m, TD_PH_RMSNORM_BWD_WEIGHT, td_rmsnorm_backward_weight(D->mlp_norm, L->g_ln2, A->res2, A->ln2_rstd, BT, C));
        PHASE(m, TD_PH_MATMUL_BWD_WEIGHT, proj_dweight(D->wo, L->g_res2, A->atty, BT, C, C));
        PHASE(m, TD_PH_MATMUL_BWD_WEIGHT, proj_dweight(D->wq, L->g_q, A->ln1, BT, C, C));
        PHASE(m, TD_PH_MATMUL_BWD_WEIGHT, proj_dweight(D->wk, L->g_k, A->ln1, BT, KV, C));
        PHASE(m, TD_PH_MATMUL_BWD_WEIGHT, proj_dweight(D->wv, L->g_v, A->ln1, BT, KV, C));
        PHASE(m, TD_PH_RMSNORM_BWD_WEIGHT, td_rmsnorm_backward_weight(D->attn_norm, L->g_ln1, residual_in(s, l), A->ln1_rstd, BT, C));
    }
    if (m->has_embed) PHASE(m, TD_PH_ENCODER_BWD, td_embedding_backward(m->G.wte, g->g_embed, s->tokens, BT, C));
}

void td_llama_backward_slot(td_model *m, int32_t slot, double grad_scale, int part,
                            const td_real *dout_BTC) {
    td_slot *s = &m->slot[slot];
    td_grad_store *g = &m->gstore[m->split_backward ? slot : 0];
    if (part == TD_BWD_FULL || part == TD_BWD_INPUT) backward_input(m, s, g, grad_scale, dout_BTC);
    if (part == TD_BWD_FULL || part == TD_BWD_WEIGHT) backward_weight(m, s, g);
}
