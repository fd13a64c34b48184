/* common.cuh — what every file of the CUDA backend shares: the device state of one model
 * (td_cuda_dev, kept in td_model.device), the element types, the error helpers and the kernel
 * launchers that backend.cu drives.
 *
 * The backend runs one pipeline stage (the whole model when stages = 1) on one GPU, with one set
 * of activations per slot (micro-batch in flight) and, for a split backward, what each slot's W
 * pass needs. E is the activation / compute element type:
 * float in fp32 mode, __nv_bfloat16 in bf16 mode (fp32 master weights, fp32 accumulation, fp32
 * LayerNorm / softmax / loss statistics). Every launcher returns the cudaError_t of its launch;
 * the caller turns a failure into a td_status with td_fail (nothing here exits or aborts).
 */
#ifndef TD_CUDA_COMMON_CUH
#define TD_CUDA_COMMON_CUH

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "internal.h"
}

typedef __nv_bfloat16 bf16;

/* ---- element conversions (fp32 arithmetic on either element type) ---------------------------- */

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename E> __device__ __forceinline__ E from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

/* ---- device state of one model ------------------------------------------------------------- */

/* Activations of one layer, sized for (batch_size, seq_len); E elements unless marked f32. */
typedef struct {
    void *ln1;                      /* (B, T, C) */
    float *ln1_mean, *ln1_rstd;     /* (B, T) f32 */
    void *qkv;                      /* (B, T, 3C) */
    void *att;                      /* (B, NH, T, T) softmax probabilities, NULL when recomputed */
    float *lse;                     /* (B, NH, T) log-sum-exp of the scores (flash attention) */
    void *atty;                     /* (B, T, C) attention output before the projection */
    void *res2;                     /* (B, T, C) residual after attention */
    void *ln2;                      /* (B, T, C) */
    float *ln2_mean, *ln2_rstd;     /* (B, T) f32 */
    void *fch;                      /* (B, T, 4C) pre-GELU */
    void *fch_gelu;                 /* (B, T, 4C) */
    void *res3;                     /* (B, T, C) layer output */
} td_cuda_layer;

/* Gradients of one layer's matmul outputs that a split backward's B pass keeps for its W pass
 * (E elements, per slot). */
typedef struct {
    void *fcproj;                   /* (B, T, C) d(res3) = d(MLP projection output) */
    void *fc;                       /* (B, T, 4C) d(fc output, pre-GELU) */
    void *attproj;                  /* (B, T, C) d(res2) = d(attention projection output) */
    void *qkv;                      /* (B, T, 3C) */
} td_cuda_wgrad;

/* One slot: everything a micro-batch's forward leaves for its backward. */
typedef struct {
    void *input;                    /* (B, T, C) stage input: embedding output or received */
    td_cuda_layer *L;               /* nl entries */
    td_cuda_wgrad *Wg;              /* nl entries, split backward only */
    void *g_embed;                  /* (B, T, C) d(stage input), first stage, split backward */
    void *lnf;                      /* (B, T, C) head */
    float *lnf_mean, *lnf_rstd;     /* (B, T) head */
    void *logits;                   /* (B*T, Vp) logits, then d(logits) in place; head */
    float *lse, *losses;            /* (B*T) head */
    int *tok;                       /* (B*T) tokens, then (B*T) targets */
    int *csr;                       /* first stage: encoder-backward buckets uniq | off | rows */
    int n_uniq;
    int *h_tok, *h_csr;             /* pinned staging (2*B*T, 3*B*T+1) */
    cudaEvent_t staged;             /* the last upload from h_tok / h_csr is done with them */
    int B, T, targets;              /* the forward's shape; targets: a backward may follow */
    struct td_cuda_llama_layer *LL; /* llama (family = 1, llama.cuh): nl entries instead of L */
    struct td_cuda_llama_wgrad *LWg; /* llama: nl entries instead of Wg, split backward only */
} td_cuda_slot;

/* Offsets (elements) of one layer's tensors in the flat parameter buffer (m->params layout). */
typedef struct {
    size_t ln1w, ln1b, qkvw, qkvb, attprojw, attprojb, ln2w, ln2b, fcw, fcb, fcprojw, fcprojb;
} td_cuda_layer_off;

#define TD_MM_CACHE 512

typedef struct {
    unsigned char key[128];
    cublasLtMatmulAlgo_t algo;
} td_mm_cache_entry;

typedef struct td_cuda_dev {
    td_model *m;
    int bf16;          /* 1: E = bf16 */
    size_t es;         /* bytes per E */
    int store_att;     /* 1: keep every layer's (B, NH, T, T) probabilities; 0: recompute */
    int flash;         /* 1: flash attention (TANDEM_CUDA_ATTENTION=flash; bf16 only) */
    cudaStream_t stream;
    cublasLtHandle_t lt;
    void *ws;          /* cuBLASLt workspace */
    size_t ws_bytes;

    /* parameters (flat, m->params offsets) */
    float *p32, *g32, *mom, *var; /* fp32 master weights, gradients, AdamW m and v */
    void *pc;                     /* compute copy: bf16 copy in bf16 mode, == p32 in fp32 mode */
    size_t off_wte, off_wpe, off_lnfw, off_lnfb;
    size_t off_head;              /* the LM head's weight (V, C): wte (tied) or llama's lm_head */
    td_cuda_layer_off *lo;        /* nl entries */
    struct td_cuda_llama_off *llo; /* llama: nl entries instead of lo (llama_build.cu) */
    float *rope_cos, *rope_sin;   /* llama: (seq_len, HS/2) RoPE tables */
    float *zeros;                 /* llama: (B*T) zeros, the RMSNorm weight sum's "mean" */
    void *dh;                     /* llama: (B, T, F) backward scratch */
    int64_t *seg_end;             /* (nparams) end offset of each tensor, for AdamW */
    unsigned char *seg_decay;     /* (nparams) weight decay applies */

    /* activations, one set per slot */
    td_cuda_slot *S;              /* m->slots entries */
    int Vp;                       /* padded row stride of logits */

    /* backward / attention scratch (one layer at a time) */
    void *dres, *dln, *dbig;      /* (B,T,C), (B,T,C), (B,T,4C) */
    void *qkvp, *yb, *dqkvp;      /* (3,B,NH,T,HS), (B,NH,T,HS), (3,B,NH,T,HS) */
    void *attS, *attP;            /* (B,NH,T,T): scores / d(probs); probabilities when recomputed */
    float *Dsum;                  /* (B,NH,T) rowsum(dO * O), flash backward */
    void *wte_pad;                /* (Vp, C) wte in the compute type, rows V.. zero: the head's
                                     products run over Vp columns (odd V is slow in cuBLASLt) */
    float *part_w, *part_b, *part_o; /* column-sum partials: the larger of (ceil(BT/CS_ROWS), 4C)
                                     and (ceil(BT/TD_LNB_ROWS_MIN), C) each */
    double *sq_part;              /* grad_sq_sum partials (SQ_BLOCKS + 1) */

    /* host */
    int *h_count;                 /* V (plain malloc) */
    float *h_losses;              /* pinned: ring_cap rows of B*T per-row losses of forwards
                                     whose loss is summed later (td_stage_loss_sum) */
    int ring_cap, ring_n;         /* rows allocated / pending */
    int *ring_bt;                 /* (ring_cap) B*T of each pending row */
    double *h_sq;                 /* pinned */

    int grad_zero;                 /* 1: zero_grad since the last backward; g32 reads as zero
                                      but holds stale values (cuda_zero_grad) */
    size_t bytes;                  /* device memory this model allocated */

    /* every cudaMalloc, for release */
    void **allocs;
    int nallocs, cap_allocs;

    td_mm_cache_entry *cache;
    int ncache;
    int tune;                     /* TD_TUNE_*: how products choose their algorithm (matmul.cu) */
    int dev;                      /* the CUDA device ordinal */

    /* TANDEM_CUDA_PROFILE=<file>: device time per phase (CUDA events), written at release */
    char *prof_path;
    cudaEvent_t *prof_ev;
    const char **prof_evname;
    int prof_nev;
    const char *prof_name[64];
    double prof_ms[64];
    long prof_calls[64];
    int prof_nrows;
    long prof_steps;
    long prof_skip;               /* TANDEM_CUDA_PROFILE_SKIP: first steps not counted (warm-up) */
} td_cuda_dev;

/* ---- shared between backend.cu and passes.cu ------------------------------------------------- */

/* cudaMalloc of `bytes` kept for release (what names it in an out-of-memory message) */
td_status td_cuda_alloc(td_cuda_dev *d, void **out, size_t bytes, const char *what);
/* llama (family = 1): the device buffers beyond backend.cu's common ones (llama_build.cu), the
 * stage passes (llama_passes.cu; the arguments of td_cuda_stage_forward / _backward) */
td_status td_cuda_llama_build(td_cuda_dev *d);
td_status td_cuda_llama_forward(td_cuda_dev *d, int slot, float *logits_out, double *out_loss,
                                int with_targets, const void *in_BTC, void *out_BTC);
td_status td_cuda_llama_backward(td_cuda_dev *d, int slot, double grad_scale, int part,
                                 const void *dout_BTC, void *din_BTC, int acc);

/* TANDEM_CUDA_PROFILE: an event at the start of a phase named `name` ("(end)" closes a run);
 * td_cuda_prof_flush folds the recorded phases in after a synchronisation */
void td_cuda_prof(td_cuda_dev *d, const char *name);
void td_cuda_prof_flush(td_cuda_dev *d);
/* 1: flash attention through the FlashAttention-2 kernels that read the heads in place */
int td_cuda_flash_rows(const td_cuda_dev *d);
/* a lazy zero_grad's zeros written now (a no-op when there is none pending) */
td_status td_cuda_materialize_zero_grads(td_cuda_dev *d);
/* passes.cu. Forward of slot `slot` (tokens / targets staged in m->slot[slot]); in_BTC: the
 * previous stage's output (not first stage), out_BTC: this stage's (not last stage); device
 * buffers of (B, T, C) E. out_loss NULL with targets: the loss waits in a pinned ring for
 * td_cuda_loss_sum. */
td_status td_cuda_stage_forward(td_model *m, int32_t slot, float *logits_out, double *out_loss,
                                int with_targets, const void *in_BTC, void *out_BTC);
/* Backward (part: TD_BWD_*) of the slot's micro-batch; dout_BTC from the next stage (not last
 * stage), din_BTC to the previous one (not first stage). lazy_zero = 1: the one-stage path, where
 * a gradient's first contribution after zero_grad overwrites it. */
td_status td_cuda_stage_backward(td_model *m, int32_t slot, double grad_scale, int part,
                                 const void *dout_BTC, void *din_BTC, int lazy_zero);
td_status td_cuda_loss_sum(td_cuda_dev *d, double *out_sum, int32_t *out_count);
/* passes.cu, for both families: csr <- the rows of each distinct token (encoder-backward buckets,
 * uniq | off | rows; cnt: V ints of scratch), returns the number of distinct tokens; the slot's
 * (BT, V) logits to the host as fp32 (synchronises); the slot's per-row losses to the pinned
 * ring (summed into *out_loss at once when out_loss is not NULL) */
int td_cuda_build_buckets(int *csr, int *cnt, const int32_t *tok, int BT, int V);
td_status td_cuda_stage_tokens(td_cuda_dev *d, td_cuda_slot *S, const td_slot *hs, int BT, int V,
                               int with_targets);
td_status td_cuda_logits_to_host(td_cuda_dev *d, const td_cuda_slot *S, float *logits_out, int BT);
td_status td_cuda_loss_to_ring(td_cuda_dev *d, const td_cuda_slot *S, int BT, double *out_loss);

/* ---- error helpers --------------------------------------------------------------------------- */

td_status td_cuda_fail(td_cuda_dev *d, const char *what, cudaError_t err, const char *file,
                       int line);
/* Return from the enclosing td_status function when a CUDA call or a launch fails. */
#define TD_CK(call)                                                                              \
    do {                                                                                         \
        cudaError_t err_ = (call);                                                               \
        if (err_ != cudaSuccess) return td_cuda_fail(d, #call, err_, __FILE__, __LINE__);        \
    } while (0)
#define TD_TRY(call)                                                                             \
    do {                                                                                         \
        td_status st_ = (call);                                                                  \
        if (st_ != TD_OK) return st_;                                                            \
    } while (0)

/* ---- matmul (matmul.cu) ---------------------------------------------------------------------- */

/* out(M, N) = op(A)(M, K) @ op(B)(K, N) [+ beta * Cin] [+ bias(N)], row-major, like td_gemm:
 * A is stored (M, K) with row stride lda, or with transA (K, M); B (K, N), or with transB (N, K).
 * Batched (batch > 1) with element strides sA, sB, sD (and sC = sD). The epilogue:
 *   TD_EPI_NONE, TD_EPI_GELU (aux <- pre-GELU value, out <- GELU(value); aux has out's layout),
 *   TD_EPI_DGELU (out <- value * GELU'(aux)).
 * A, B, bias, aux are E (the compute type), out and Cin are E or fp32 (out_f32). fp32 mode uses
 * CUBLAS_COMPUTE_32F on fp32 data (no TF32). A fused epilogue that cuBLASLt cannot take falls
 * back to a plain product and a kernel. */
enum { TD_EPI_NONE = 0, TD_EPI_GELU = 1, TD_EPI_DGELU = 2 };
typedef struct {
    void *out; int ldo; int out_f32;
    const void *A; int lda; int transA;
    const void *B; int ldb; int transB;
    int M, N, K;
    float beta; const void *C; /* Cin with out's type and ldo; NULL: C = out */
    const void *bias;
    int epi; void *aux; int ldaux;
    int batch; long long sA, sB, sD;
} td_mm;
td_status td_cuda_matmul(td_cuda_dev *d, const td_mm *p);
/* TANDEM_CUDA_GEMM_TUNE: auto (default, also unset or empty), off or all -> *mode; -1 otherwise */
enum { TD_TUNE_OFF = 0, TD_TUNE_AUTO = 1, TD_TUNE_ALL = 2 };
int td_cuda_gemm_tune_mode(const char *env, int *mode);

/* ---- kernel launchers (encoder.cu, layernorm.cu, gelu.cu, attention.cu, softmax_ce.cu, optim.cu);
 * E = float or bf16 */

#define TD_CS_ROWS 64   /* rows per partial of a deterministic column sum */
#define TD_SQ_BLOCKS 1024

template <typename E>
cudaError_t td_k_encoder_forward(cudaStream_t s, E *out, const int *tok, const E *wte,
                                 const E *wpe, int B, int T, int C);
/* dwte += the rows of dout per token (csr buckets); dwpe[0..T) (+)= sum over the batch (acc_wpe
 * = 0 overwrites) */
template <typename E>
cudaError_t td_k_encoder_backward(cudaStream_t s, float *dwte, float *dwpe, const E *dout,
                                  const int *csr, int n_uniq, int B, int T, int C, int acc_wpe);
template <typename E>
cudaError_t td_k_layernorm_forward(cudaStream_t s, E *out, float *mean, float *rstd,
                                   const E *inp, const E *w, const E *b, int N, int C);
template <typename E>
cudaError_t td_k_layernorm_backward_input(cudaStream_t s, E *dinp, const E *dout, const E *inp,
                                          const E *w, const float *mean, const float *rstd,
                                          int N, int C, int accumulate);
/* dw (+)= colsum(dout * xhat), db (+)= colsum(dout) (dw, inp, mean, rstd NULL: bias gradient
 * only); acc = 0 overwrites dw, db instead of adding. Deterministic: fixed partials of TD_CS_ROWS
 * rows summed in a fixed order. */
template <typename E>
cudaError_t td_k_colsum(cudaStream_t s, float *dw, float *db, float *part_w, float *part_b,
                        const E *dout, const E *inp, const float *mean, const float *rstd, int N,
                        int C, int acc);
/* LayerNorm backward in one pass over the rows: dinp (+)= d/dx (accumulate), dw, db (+)= the
 * weight and bias gradients and, when dbias is not NULL, dbias (+)= colsum(dinp as stored): the
 * bias gradient of the product whose output gradient dinp is, folded in (acc = 0: dw, db, dbias
 * are overwritten).
 * Deterministic: per-block partials (part_w, part_b, part_o: at least ceil(N / TD_LNB_ROWS_MIN)
 * x C floats each) summed in a fixed order. */
#define TD_LNB_ROWS_MIN 4
template <typename E>
cudaError_t td_k_layernorm_backward(cudaStream_t s, E *dinp, float *dw, float *db, float *dbias,
                                    float *part_w, float *part_b, float *part_o, const E *dout,
                                    const E *inp, const E *w, const float *mean,
                                    const float *rstd, int N, int C, int accumulate, int acc);
/* RMSNorm backward in the same one pass (mean 0 from `zeros`, N floats; no bias): dinp (+)= d/dx,
 * dw (+)= colsum(dout * x * rstd); part_w, part_b as for the LayerNorm (acc = 0 overwrites dw). */
template <typename E>
cudaError_t td_k_rmsnorm_backward(cudaStream_t s, E *dinp, float *dw, float *part_w,
                                  float *part_b, const E *dout, const E *inp, const E *w,
                                  const float *zeros, const float *rstd, int N, int C,
                                  int accumulate, int acc);
/* (llama_ops.cu) the input gradient alone, one warp per row: dinp (+)= rstd * (w dout - xhat *
 * mean(w dout xhat)), xhat = x * rstd (accumulate: +=) */
template <typename E>
cudaError_t td_k_rmsnorm_backward_input(cudaStream_t s, E *dinp, const E *dout, const E *inp,
                                        const E *w, const float *rstd, int N, int C,
                                        int accumulate);
template <typename E>
cudaError_t td_k_gelu_forward(cudaStream_t s, E *out, const E *inp, long long n);
template <typename E>
cudaError_t td_k_gelu_backward_inplace(cudaStream_t s, E *d, const E *inp, long long n);
template <typename E>
cudaError_t td_k_bias_add(cudaStream_t s, E *out, const E *bias, int N, int OC, int ld);
template <typename E>
cudaError_t td_k_qkv_permute(cudaStream_t s, E *qkvp, const E *qkv, int B, int T, int NH, int HS);
template <typename E>
cudaError_t td_k_qkv_unpermute(cudaStream_t s, E *dqkv, const E *dqkvp, int B, int T, int NH,
                               int HS);
template <typename E>
cudaError_t td_k_head_permute(cudaStream_t s, E *y, const E *x, int B, int T, int NH, int HS);
template <typename E>
cudaError_t td_k_head_unpermute(cudaStream_t s, E *x, const E *y, int B, int T, int NH, int HS);
template <typename E>
cudaError_t td_k_attn_softmax_forward(cudaStream_t s, E *P, const E *S, long long rows, int T,
                                      float scale);
template <typename E>
cudaError_t td_k_attn_softmax_backward(cudaStream_t s, E *dS, const E *P, long long rows, int T,
                                       float scale);
template <typename E>
cudaError_t td_k_crossentropy_forward(cudaStream_t s, float *losses, float *lse, const E *logits,
                                      const int *targets, int N, int V, int ld);
template <typename E>
cudaError_t td_k_crossentropy_backward(cudaStream_t s, E *dlogits, const float *lse,
                                       const int *targets, float dloss, int N, int V, int ld);
cudaError_t td_k_cast_bf16(cudaStream_t s, bf16 *out, const float *in, long long n);
cudaError_t td_k_adamw(cudaStream_t s, float *p, const float *g, float *m, float *v, bf16 *p16,
                       long long n, const int64_t *seg_end, const unsigned char *seg_decay,
                       int nseg, float b1, float b2, float bc1, float bc2, float lr, float eps,
                       float wd, float clip);
cudaError_t td_k_sq_sum(cudaStream_t s, double *part, const float *g, long long n);

/* flash_fwd.cu, flash_bwd.cu: bf16 causal attention on permuted heads (B*NH, T, HS); lse, D:
 * (B*NH, T) fp32 */
int td_flash_supported(int HS);
cudaError_t td_k_flash_forward(cudaStream_t s, bf16 *O, float *lse, const bf16 *q, const bf16 *k,
                               const bf16 *v, int BH, int T, int HS, float scale);
cudaError_t td_k_flash_backward(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *q,
                                const bf16 *k, const bf16 *v, const bf16 *dO, const float *lse,
                                const float *D, int BH, int T, int HS, float scale);
/* The FlashAttention-2 kernels (head sizes td_flash_fa2 takes) on heads read in place: q, k, v
 * point at head 0 of rows (b, t) ldi elements apart (q, k, v inside the (B, T, 3C) qkv rows:
 * ldi = 3C), O / dO rows ldo apart ((B, T, C): ldo = C), dq, dk, dv rows ldg apart (inside
 * d(qkv): ldg = 3C); head h of a row starts h * HS further on. No layout copies. */
cudaError_t td_k_flash_forward_rows(cudaStream_t s, bf16 *O, int ldo, float *lse, const bf16 *q,
                                    const bf16 *k, const bf16 *v, int ldi, int B, int NH, int T,
                                    int HS, float scale);
cudaError_t td_k_flash_backward_rows(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, int ldg,
                                     const bf16 *q, const bf16 *k, const bf16 *v, int ldi,
                                     const bf16 *dO, int ldo, const float *lse, const float *D,
                                     int B, int NH, int T, int HS, float scale);
/* The same with grouped-query attention: NKV kv heads (NH % NKV == 0), query head h reading kv
 * head h / (NH / NKV) of k, v (rows ldi apart, like q's); dk, dv of a kv head are the sum over
 * its group, summed in registers in head order (deterministic). NKV = NH: the _rows kernels. */
cudaError_t td_k_flash_forward_gqa(cudaStream_t s, bf16 *O, int ldo, float *lse, const bf16 *q,
                                   const bf16 *k, const bf16 *v, int ldi, int B, int NH, int NKV,
                                   int T, int HS, float scale);
cudaError_t td_k_flash_backward_gqa(cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, int ldg,
                                    const bf16 *q, const bf16 *k, const bf16 *v, int ldi,
                                    const bf16 *dO, int ldo, const float *lse, const float *D,
                                    int B, int NH, int NKV, int T, int HS, float scale);
/* D[b, h, t] = sum_j dout[b, t, h*HS + j] * out[b, t, h*HS + j], inputs (B, T, C) */
cudaError_t td_k_attn_rowdot(cudaStream_t s, float *D, const bf16 *dout, const bf16 *out, int B,
                             int T, int NH, int HS);

#endif /* TD_CUDA_COMMON_CUH */
