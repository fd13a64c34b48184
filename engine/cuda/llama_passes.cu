/* llama_passes.cu — the forward and backward passes of one CUDA stage of a Llama model
 * (family = 1), slot by slot: engine/src/llama_model.c's maths in its order, in passes.cu's
 * structure (td_cuda_stage_forward / _backward hand over to these).
 *
 * A stage reads tokens (first stage: the embedding lookup, no position table) or the previous
 * stage's activations, runs its layers (RMSNorm, q | k | v projections, RoPE on q and k,
 * causal grouped-query attention, o_proj with the residual add, RMSNorm, gate | up projections,
 * SwiGLU, down_proj with the residual add) and either writes its output activations or (last
 * stage) RMSNorm, the untied lm_head's logits and the loss. Every projection is one cuBLASLt
 * product y = x @ W^T with W stored (out, in) (q, k, v as one (QW, C) weight and gate, up as one
 * (2F, C) weight where the table has them consecutive, llama.cuh). The backward seeds d(loss) or
 * reads the next stage's gradient; split into B (input-gradient products, attention, RoPE, the
 * RMSNorms with their weight sums) and W (the weight-gradient products, the embedding gradient)
 * from what B kept in the slot. Attention is flash (bf16, head sizes 16..64) or the
 * materialised per-kv-head products (fp32, other head sizes): each kv head's group of query
 * heads is one block of rows, so no key or value is copied per query head and dk, dv sum over
 * the group inside one product.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flash.cuh"
#include "llama.cuh"

/* ---- products -------------------------------------------------------------------------------- */

/* out(N, O) (rows ldo apart) = x(N, I) (rows lda apart) @ W^T, W stored (O, I); + res (beta 1,
 * rows ldo apart) when given */
static td_status proj(td_cuda_dev *d, void *out, int ldo, const void *x, int lda, const void *W,
                      int N, int O, int I, const void *res) {
    td_mm p;
    memset(&p, 0, sizeof p);
    p.out = out, p.ldo = ldo;
    p.A = x, p.lda = lda;
    p.B = W, p.ldb = I, p.transB = 1;
    p.M = N, p.N = O, p.K = I;
    p.beta = res ? 1.f : 0.f, p.C = res;
    p.batch = 1;
    return td_cuda_matmul(d, &p);
}

/* dx(N, I) (= or, beta 1, +=) dy(N, O) (rows ldy apart) @ W, W stored (O, I) */
static td_status proj_dinput(td_cuda_dev *d, void *dx, const void *dy, int ldy, const void *W,
                             int N, int O, int I, int add) {
    td_mm p;
    memset(&p, 0, sizeof p);
    p.out = dx, p.ldo = I;
    p.A = dy, p.lda = ldy;
    p.B = W, p.ldb = I;
    p.M = N, p.N = I, p.K = O;
    p.beta = add ? 1.f : 0.f;
    p.batch = 1;
    return td_cuda_matmul(d, &p);
}

/* dW(O, I) fp32 (+)= dy^T @ x, dy (N, O) rows ldy apart, x (N, I) rows ldx apart (acc = 0:
 * overwrite, the first contribution after a lazy zero_grad) */
static td_status proj_dweight(td_cuda_dev *d, float *dW, const void *dy, int ldy, const void *x,
                              int ldx, int N, int O, int I, int acc) {
    td_mm p;
    memset(&p, 0, sizeof p);
    p.out = dW, p.ldo = I, p.out_f32 = 1;
    p.A = dy, p.lda = ldy, p.transA = 1;
    p.B = x, p.ldb = ldx;
    p.M = O, p.N = I, p.K = N;
    p.beta = acc ? 1.f : 0.f;
    p.batch = 1;
    return td_cuda_matmul(d, &p);
}

/* One block of projections sharing an input: nw weights of rows[j] output rows each, whose
 * outputs sit side by side in one row of width sum(rows) (q | k | v, gate | up); fused: the
 * weights are consecutive in the flat buffer, one product. */
typedef struct {
    int nw, fused;
    size_t off[3];
    int rows[3];
} proj_group;

template <typename E>
static td_status group_forward(td_cuda_dev *d, const proj_group *g, E *out, const E *x, int N, int I) {
    const E *W = (const E *)d->pc;
    int width = 0;
    for (int j = 0; j < g->nw; j++) width += g->rows[j];
    if (g->fused) return proj(d, out, width, x, I, W + g->off[0], N, width, I, NULL);
    for (int j = 0, col = 0; j < g->nw; col += g->rows[j], j++)
        TD_TRY(proj(d, out + col, width, x, I, W + g->off[j], N, g->rows[j], I, NULL));
    return TD_OK;
}

/* dx(N, I) = dy @ [W_0; W_1; ...] (each weight's slice of the dy rows) */
template <typename E>
static td_status group_dinput(td_cuda_dev *d, const proj_group *g, E *dx, const E *dy, int N, int I) {
    const E *W = (const E *)d->pc;
    int width = 0;
    for (int j = 0; j < g->nw; j++) width += g->rows[j];
    if (g->fused) return proj_dinput(d, dx, dy, width, W + g->off[0], N, width, I, 0);
    for (int j = 0, col = 0; j < g->nw; col += g->rows[j], j++)
        TD_TRY(proj_dinput(d, dx, dy + col, width, W + g->off[j], N, g->rows[j], I, j > 0));
    return TD_OK;
}

template <typename E>
static td_status group_dweight(td_cuda_dev *d, const proj_group *g, const E *dy, const E *x, int N,
                               int I, int acc) {
    int width = 0;
    for (int j = 0; j < g->nw; j++) width += g->rows[j];
    if (g->fused) return proj_dweight(d, d->g32 + g->off[0], dy, width, x, I, N, width, I, acc);
    for (int j = 0, col = 0; j < g->nw; col += g->rows[j], j++)
        TD_TRY(proj_dweight(d, d->g32 + g->off[j], dy + col, width, x, I, N, g->rows[j], I, acc));
    return TD_OK;
}

static proj_group qkv_group(const td_cuda_dev *d, const td_cuda_llama_off *o) {
    const int C = (int)d->m->n_embd, KV = (int)(d->m->n_kv_head * (d->m->n_embd / d->m->n_head));
    proj_group g = {3, o->fused_qkv, {o->wq, o->wk, o->wv}, {C, KV, KV}};
    return g;
}

static proj_group gu_group(const td_cuda_dev *d, const td_cuda_llama_off *o) {
    const int F = (int)d->m->ffn_dim;
    proj_group g = {2, o->fused_gu, {o->wgate, o->wup, 0}, {F, F, 0}};
    return g;
}

/* one strided-batched product: out = op(A) @ op(B), (M, N, K) per batch entry */
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

/* ---- grouped-query attention ------------------------------------------------------------------
 * Materialised: q (B, NH, T, HS) holds the G = NH / NKV query heads of kv head (b, j) as G * T
 * consecutive rows, so per kv head (batch B * NKV): S (G*T, T) = q_grp k^T, P = causal softmax,
 * y = P v; backward dv = P_grp^T dy_grp and dk = dS_grp^T q_grp sum over the group in the
 * product's reduction (K = G * T). S, P are (B, NH, T, T) as for GPT-2. */

template <typename E>
static td_status gqa_forward(td_cuda_dev *d, td_cuda_llama_layer *A, int B, int T) {
    const td_model *m = d->m;
    const int C = (int)m->n_embd, NH = (int)m->n_head, NKV = (int)m->n_kv_head, HS = C / NH;
    const int KV = NKV * HS, QW = C + 2 * KV, G = NH / NKV;
    const long long BT = (long long)B * T, TT = (long long)T * T, THS = (long long)T * HS;
    const float scale = (float)(1.0 / sqrt((double)HS));
    if (td_cuda_flash_rows(d)) { /* q, k, v read from the qkv rows, the output written into atty's */
        const bf16 *qkv = (const bf16 *)A->qkv;
        TD_CK(td_k_flash_forward_gqa(d->stream, (bf16 *)A->atty, C, A->lse, qkv, qkv + C, qkv + C + KV,
                                     QW, B, NH, NKV, T, HS, scale));
        return TD_OK;
    }
    E *q = (E *)d->qkvp, *k = q + BT * C, *v = k + BT * KV;
    E *S = (E *)d->attS, *P = (E *)(d->store_att ? A->att : d->attP);
    TD_CK(td_k_gqa_permute<E>(d->stream, q, (E *)A->qkv, B, T, NH, NKV, HS, 0));
    TD_TRY(heads_mm(d, S, q, 0, k, 1, G * T, T, HS, HS, HS, T, G * THS, THS, G * TT, B * NKV));
    TD_CK(td_k_attn_softmax_forward<E>(d->stream, P, S, BT * NH, T, scale));
    TD_TRY(heads_mm(d, d->yb, P, 0, v, 0, G * T, HS, T, T, HS, HS, G * TT, THS, G * THS, B * NKV));
    TD_CK(td_k_head_unpermute<E>(d->stream, (E *)A->atty, (const E *)d->yb, B, T, NH, HS));
    return TD_OK;
}

/* dqkv (B, T, QW) (d of q, k after RoPE, of v) from datty (B, T, C) */
template <typename E>
static td_status gqa_backward(td_cuda_dev *d, td_cuda_llama_layer *A, int B, int T, E *dqkv,
                              const E *datty) {
    const td_model *m = d->m;
    const int C = (int)m->n_embd, NH = (int)m->n_head, NKV = (int)m->n_kv_head, HS = C / NH;
    const int KV = NKV * HS, QW = C + 2 * KV, G = NH / NKV;
    const long long BT = (long long)B * T, TT = (long long)T * T, THS = (long long)T * HS;
    const float scale = (float)(1.0 / sqrt((double)HS));
    if (td_cuda_flash_rows(d)) {
        const bf16 *qkv = (const bf16 *)A->qkv;
        bf16 *g = (bf16 *)dqkv;
        TD_CK(td_k_attn_rowdot(d->stream, d->Dsum, (const bf16 *)datty, (const bf16 *)A->atty, B, T, NH, HS));
        TD_CK(td_k_flash_backward_gqa(d->stream, g, g + C, g + C + KV, QW, qkv, qkv + C, qkv + C + KV,
                                      QW, (const bf16 *)datty, C, A->lse, d->Dsum, B, NH, NKV, T, HS, scale));
        return TD_OK;
    }
    E *q = (E *)d->qkvp, *k = q + BT * C, *v = k + BT * KV;
    E *dq = (E *)d->dqkvp, *dk = dq + BT * C, *dv = dk + BT * KV;
    E *dy = (E *)d->yb, *dS = (E *)d->attS, *P = (E *)(d->store_att ? A->att : d->attP);
    const int NB = B * NKV, GT = G * T;
    TD_CK(td_k_gqa_permute<E>(d->stream, q, (E *)A->qkv, B, T, NH, NKV, HS, 0));
    TD_CK(td_k_head_permute<E>(d->stream, dy, datty, B, T, NH, HS));
    if (!d->store_att) { /* the probabilities again, exactly as the forward made them */
        TD_TRY(heads_mm(d, dS, q, 0, k, 1, GT, T, HS, HS, HS, T, G * THS, THS, G * TT, NB));
        TD_CK(td_k_attn_softmax_forward<E>(d->stream, P, dS, BT * NH, T, scale));
    }
    TD_TRY(heads_mm(d, dS, dy, 0, v, 1, GT, T, HS, HS, HS, T, G * THS, THS, G * TT, NB)); /* dP = dy v^T */
    TD_TRY(heads_mm(d, dv, P, 1, dy, 0, T, HS, GT, T, HS, HS, G * TT, G * THS, THS, NB)); /* dv = P^T dy */
    TD_CK(td_k_attn_softmax_backward<E>(d->stream, dS, P, BT * NH, T, scale));
    TD_TRY(heads_mm(d, dq, dS, 0, k, 0, GT, HS, T, T, HS, HS, G * TT, THS, G * THS, NB)); /* dq = dS k */
    TD_TRY(heads_mm(d, dk, dS, 1, q, 0, T, HS, GT, T, HS, HS, G * TT, G * THS, THS, NB)); /* dk = dS^T q */
    TD_CK(td_k_gqa_permute<E>(d->stream, dq, dqkv, B, T, NH, NKV, HS, 1));
    return TD_OK;
}

/* ---- forward --------------------------------------------------------------------------------- */

template <typename E>
static td_status forward_impl(td_cuda_dev *d, int slot, float *logits_out, double *out_loss,
                              int with_targets, const void *in_BTC, void *out_BTC) {
    td_model *m = d->m;
    const td_slot *hs = &m->slot[slot];
    td_cuda_slot *S = &d->S[slot];
    const int B = hs->B, T = hs->T, C = (int)m->n_embd, V = (int)m->vocab_size, Vp = d->Vp;
    const int NH = (int)m->n_head, NKV = (int)m->n_kv_head, HS = C / NH, KV = NKV * HS;
    const int QW = C + 2 * KV, F = (int)m->ffn_dim, BT = B * T;
    const float eps = (float)m->norm_eps;
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
        TD_CK(td_k_embed_forward<E>(st, x0, S->tok, W + d->off_wte, BT, C));
    } else {
        TD_CK(cudaMemcpyAsync(x0, in_BTC, btc, cudaMemcpyDeviceToDevice, st));
    }
    for (int l = 0; l < m->nl; l++) {
        td_cuda_llama_layer *A = &S->LL[l];
        const td_cuda_llama_off *o = &d->llo[l];
        const E *res = l == 0 ? x0 : (const E *)S->LL[l - 1].res3;
        const proj_group gq = qkv_group(d, o), gg = gu_group(d, o);
        /* attention block: res2 = res + o_proj(GQA(RoPE(q), RoPE(k), v)) of RMS(res) */
        td_cuda_prof(d, "fwd: rmsnorm");
        TD_CK(td_k_rmsnorm_forward<E>(st, (E *)A->ln1, A->ln1_rstd, res, W + o->attn_norm, BT, C, eps));
        td_cuda_prof(d, "fwd: matmul qkv");
        TD_TRY(group_forward<E>(d, &gq, (E *)A->qkv, (const E *)A->ln1, BT, C));
        td_cuda_prof(d, "fwd: rope");
        TD_CK(td_k_rope<E>(st, (E *)A->qkv, QW, d->rope_cos, d->rope_sin, BT, T, NH + NKV, HS, 1));
        td_cuda_prof(d, "fwd: attention");
        TD_TRY(gqa_forward<E>(d, A, B, T));
        td_cuda_prof(d, "fwd: matmul o");
        TD_TRY(proj(d, A->res2, C, A->atty, C, W + o->wo, BT, C, C, res));
        /* MLP block: res3 = res2 + down(silu(gate(a)) * up(a)), a = RMS(res2) */
        td_cuda_prof(d, "fwd: rmsnorm");
        TD_CK(td_k_rmsnorm_forward<E>(st, (E *)A->ln2, A->ln2_rstd, (const E *)A->res2, W + o->mlp_norm, BT, C, eps));
        td_cuda_prof(d, "fwd: matmul gate|up");
        TD_TRY(group_forward<E>(d, &gg, (E *)A->gu, (const E *)A->ln2, BT, C));
        td_cuda_prof(d, "fwd: swiglu");
        TD_CK(td_k_swiglu_forward<E>(st, (E *)A->h, (const E *)A->gu, BT, F));
        td_cuda_prof(d, "fwd: matmul down");
        TD_TRY(proj(d, A->res3, C, A->h, F, W + o->wdown, BT, C, F, A->res2));
    }
    const E *res = m->nl ? (const E *)S->LL[m->nl - 1].res3 : x0;
    if (!m->has_head) {
        TD_CK(cudaMemcpyAsync(out_BTC, res, btc, cudaMemcpyDeviceToDevice, st));
        td_cuda_prof(d, "(end)");
        S->targets = 1; /* a backward may follow (from the next stage's gradient) */
        return TD_OK;
    }
    td_cuda_prof(d, "fwd: rmsnorm");
    TD_CK(td_k_rmsnorm_forward<E>(st, (E *)S->lnf, S->lnf_rstd, res, W + d->off_lnfw, BT, C, eps));
    td_cuda_prof(d, "head: logits matmul");
    /* logits (BT, V), rows Vp apart = lnf @ lm_head^T; columns V.. are 0 (wte_pad's rows are) */
    TD_TRY(proj(d, S->logits, Vp, S->lnf, C, d->wte_pad, BT, Vp, C, NULL));
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

/* ---- backward -------------------------------------------------------------------------------- */

/* dinp (+)= the RMSNorm's input gradient (accumulate) and dw (+)= sum over rows of dout * x *
 * rstd (acc = 0 overwrites), in one pass: layernorm.cu's deterministic one-pass backward with a
 * zero mean */
template <typename E>
static cudaError_t rms_backward(td_cuda_dev *d, E *dinp, float *dw, const E *dout, const E *x,
                                const E *w, const float *rstd, int N, int C, int accumulate,
                                int acc) {
    return td_k_rmsnorm_backward<E>(d->stream, dinp, dw, d->part_w, d->part_b, dout, x, w,
                                    d->zeros, rstd, N, C, accumulate, acc);
}

template <typename E>
static td_status backward_impl(td_cuda_dev *d, int slot, double grad_scale, int part,
                               const void *dout_BTC, void *din_BTC, int acc) {
    td_model *m = d->m;
    td_cuda_slot *S = &d->S[slot];
    const int B = S->B, T = S->T, C = (int)m->n_embd, V = (int)m->vocab_size, Vp = d->Vp;
    const int NH = (int)m->n_head, NKV = (int)m->n_kv_head, HS = C / NH, KV = NKV * HS;
    const int QW = C + 2 * KV, F = (int)m->ffn_dim, BT = B * T;
    const size_t btc = (size_t)BT * C * sizeof(E);
    cudaStream_t st = d->stream;
    const E *W = (const E *)d->pc;
    float *G = d->g32;
    E *dres = (E *)d->dres, *dln = (E *)d->dln, *dbig = (E *)d->dbig, *dh = (E *)d->dh;
    E *x0 = (E *)S->input;
    const int do_input = part != TD_BWD_WEIGHT, do_weight = part != TD_BWD_INPUT;
    const int split = part != TD_BWD_FULL;
    const E *res_last = m->nl ? (const E *)S->LL[m->nl - 1].res3 : x0;

    if (do_input && m->has_head) {
        /* loss = mean over BT rows: each row's d(loss) is grad_scale / BT; d(logits) in place */
        td_cuda_prof(d, "head: cross-entropy backward");
        TD_CK(td_k_crossentropy_backward<E>(st, (E *)S->logits, S->lse, S->tok + BT, (float)(grad_scale / BT), BT, V, Vp));
        td_cuda_prof(d, "head: matmuls backward");
        /* d lnf = dlogits @ lm_head over the Vp padded columns (d(logits) is 0 there) */
        TD_TRY(proj_dinput(d, dln, S->logits, Vp, d->wte_pad, BT, Vp, C, 0));
    }
    if (do_weight && m->has_head) {
        td_cuda_prof(d, "head: matmuls backward");
        /* dlm_head (+)= dlogits^T @ lnf, rows [0, Vm) with Vm a multiple of 128, then the rest
         * (passes.cu says why) */
        const int Vm = V > 128 && V % 128 ? V / 128 * 128 : V;
        for (int half = 0; half < 2; half++) {
            const int r0 = half ? Vm : 0, nr = half ? V - Vm : Vm;
            if (nr <= 0) continue;
            TD_TRY(proj_dweight(d, G + d->off_head + (size_t)r0 * C, (const E *)S->logits + r0, Vp,
                                S->lnf, C, BT, nr, C, acc));
        }
    }
    if (do_input) {
        if (m->has_head) {
            td_cuda_prof(d, "bwd: rmsnorm + weight sums");
            TD_CK(rms_backward<E>(d, dres, G + d->off_lnfw, dln, res_last, W + d->off_lnfw, S->lnf_rstd, BT, C, 0, acc));
        } else {
            TD_CK(cudaMemcpyAsync(dres, dout_BTC, btc, cudaMemcpyDeviceToDevice, st));
        }
    }
    for (int l = m->nl - 1; l >= 0; l--) {
        td_cuda_llama_layer *A = &S->LL[l];
        const td_cuda_llama_off *o = &d->llo[l];
        const E *res = l == 0 ? x0 : (const E *)S->LL[l - 1].res3;
        const proj_group gq = qkv_group(d, o), gg = gu_group(d, o);
        td_cuda_llama_wgrad *K = split ? &S->LWg[l] : NULL; /* what B keeps for W */
        E *g_down = K ? (E *)K->down : dres, *g_gu = K ? (E *)K->gu : dbig;
        E *g_o = K ? (E *)K->o : dres, *g_qkv = K ? (E *)K->qkv : dbig;
        if (!do_input) { /* W: the weight-gradient products from what B kept */
            td_cuda_prof(d, "bwd: matmul");
            TD_TRY(proj_dweight(d, G + o->wdown, g_down, C, A->h, F, BT, C, F, acc));
            TD_TRY(group_dweight<E>(d, &gg, g_gu, (const E *)A->ln2, BT, C, acc));
            TD_TRY(proj_dweight(d, G + o->wo, g_o, C, A->atty, C, BT, C, C, acc));
            TD_TRY(group_dweight<E>(d, &gq, g_qkv, (const E *)A->ln1, BT, C, acc));
            continue;
        }
        /* MLP block; dres holds d res3 */
        td_cuda_prof(d, "bwd: matmul down");
        if (K) TD_CK(cudaMemcpyAsync(g_down, dres, btc, cudaMemcpyDeviceToDevice, st));
        TD_TRY(proj_dinput(d, dh, dres, C, W + o->wdown, BT, C, F, 0));
        if (do_weight) TD_TRY(proj_dweight(d, G + o->wdown, dres, C, A->h, F, BT, C, F, acc));
        td_cuda_prof(d, "bwd: swiglu");
        TD_CK(td_k_swiglu_backward<E>(st, g_gu, dh, (const E *)A->gu, BT, F));
        td_cuda_prof(d, "bwd: matmul gate|up");
        TD_TRY(group_dinput<E>(d, &gg, dln, g_gu, BT, C));
        if (do_weight) TD_TRY(group_dweight<E>(d, &gg, g_gu, (const E *)A->ln2, BT, C, acc));
        td_cuda_prof(d, "bwd: rmsnorm + weight sums");
        TD_CK(rms_backward<E>(d, dres, G + o->mlp_norm, dln, (const E *)A->res2, W + o->mlp_norm, A->ln2_rstd, BT, C, 1, acc));
        /* attention block; dres now holds d res2 */
        td_cuda_prof(d, "bwd: matmul o");
        if (K) TD_CK(cudaMemcpyAsync(g_o, dres, btc, cudaMemcpyDeviceToDevice, st));
        TD_TRY(proj_dinput(d, dln, dres, C, W + o->wo, BT, C, C, 0)); /* d atty */
        if (do_weight) TD_TRY(proj_dweight(d, G + o->wo, dres, C, A->atty, C, BT, C, C, acc));
        td_cuda_prof(d, "bwd: attention");
        TD_TRY(gqa_backward<E>(d, A, B, T, g_qkv, dln));
        td_cuda_prof(d, "bwd: rope");
        TD_CK(td_k_rope<E>(st, g_qkv, QW, d->rope_cos, d->rope_sin, BT, T, NH + NKV, HS, -1));
        td_cuda_prof(d, "bwd: matmul qkv");
        TD_TRY(group_dinput<E>(d, &gq, dln, g_qkv, BT, C));
        if (do_weight) TD_TRY(group_dweight<E>(d, &gq, g_qkv, (const E *)A->ln1, BT, C, acc));
        td_cuda_prof(d, "bwd: rmsnorm + weight sums");
        TD_CK(rms_backward<E>(d, dres, G + o->attn_norm, dln, res, W + o->attn_norm, A->ln1_rstd, BT, C, 1, acc));
    }
    if (m->has_embed) {
        /* the embedding gradient is a weight gradient: W reads d(input) that B kept */
        const E *g_embed = split ? (const E *)S->g_embed : dres;
        if (part == TD_BWD_INPUT) {
            TD_CK(cudaMemcpyAsync(S->g_embed, dres, btc, cudaMemcpyDeviceToDevice, st));
        } else {
            td_cuda_prof(d, "bwd: embedding");
            /* untied: only the tokens' rows get a contribution, so a first one zeroes the rest */
            if (!acc) TD_CK(cudaMemsetAsync(G + d->off_wte, 0, sizeof(float) * (size_t)V * C, st));
            TD_CK(td_k_embed_backward<E>(st, G + d->off_wte, g_embed, S->csr, S->n_uniq, BT, C));
        }
    } else if (do_input && din_BTC) {
        TD_CK(cudaMemcpyAsync(din_BTC, dres, btc, cudaMemcpyDeviceToDevice, st));
    }
    td_cuda_prof(d, "(end)");
    d->grad_zero = 0;
    return TD_OK;
}

td_status td_cuda_llama_forward(td_cuda_dev *d, int slot, float *logits_out, double *out_loss,
                                int with_targets, const void *in_BTC, void *out_BTC) {
    return d->bf16 ? forward_impl<bf16>(d, slot, logits_out, out_loss, with_targets, in_BTC, out_BTC)
                   : forward_impl<float>(d, slot, logits_out, out_loss, with_targets, in_BTC, out_BTC);
}

td_status td_cuda_llama_backward(td_cuda_dev *d, int slot, double grad_scale, int part,
                                 const void *dout_BTC, void *din_BTC, int acc) {
    return d->bf16 ? backward_impl<bf16>(d, slot, grad_scale, part, dout_BTC, din_BTC, acc)
                   : backward_impl<float>(d, slot, grad_scale, part, dout_BTC, din_BTC, acc);
}
