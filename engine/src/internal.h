/* internal.h — the engine's private types: the model handle, its parameter table, activation
 * slots, and the error helpers every file uses. Nothing here crosses the ABI; tandem.h is the
 * only public header.
 */
#ifndef TD_INTERNAL_H
#define TD_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "tandem.h"

/* The kernels' element type. The normal build is fp32; TD_FLOAT64 builds a float64 library
 * for finite-difference gradient checks (tests only). */
#ifdef TD_FLOAT64
typedef double td_real;
#define td_sqrt sqrt
#else
typedef float td_real;
#define td_sqrt sqrtf
#endif

#define TD_MAX_NAME 64
#define TD_ERR_LEN 1024

/* One row of the parameter table. offset indexes the stage's flat parameter buffer. */
typedef struct {
    char name[TD_MAX_NAME];
    int32_t ndim;
    int64_t shape[4];
    int64_t numel;
    int32_t decayed; /* AdamW weight decay applies (rank >= 2) */
    size_t offset;
} td_param;

/* Pointers of one transformer layer into a flat buffer (parameters or their gradients).
 * Layouts follow GPT-2: linear weights (in, out). */
typedef struct {
    td_real *ln1w, *ln1b;       /* (C) */
    td_real *qkvw, *qkvb;       /* (C, 3C), (3C) */
    td_real *attprojw, *attprojb; /* (C, C), (C) */
    td_real *ln2w, *ln2b;       /* (C) */
    td_real *fcw, *fcb;         /* (C, 4C), (4C) */
    td_real *fcprojw, *fcprojb; /* (4C, C), (C) */
} td_layer_ptrs;

/* Pointers of one Llama layer (family = 1, llama_model.c) into a flat buffer. Linear weights
 * are (out, in), the public Llama layout; KV = n_kv_head * HS, F = ffn_dim. */
typedef struct {
    td_real *attn_norm;           /* (C) input_layernorm */
    td_real *wq, *wk, *wv, *wo;   /* (C, C), (KV, C), (KV, C), (C, C) */
    td_real *mlp_norm;            /* (C) post_attention_layernorm */
    td_real *wgate, *wup, *wdown; /* (F, C), (F, C), (C, F) */
} td_llama_layer_ptrs;

/* Pointers of a stage into a flat buffer: embeddings (first stage), layers, head (last).
 * A Llama model (one stage) uses wte for model.embed_tokens, lnfw for model.norm, llayers and
 * its own lm_head; wpe, lnfb and layers stay NULL. */
typedef struct {
    td_real *wte;   /* (V, C) — first and last stage both hold it (tied) */
    td_real *wpe;   /* (n_positions, C) — first stage */
    td_layer_ptrs *layers; /* nl entries */
    td_real *lnfw, *lnfb; /* (C) — last stage */
    td_llama_layer_ptrs *llayers; /* nl entries (llama) */
    td_real *lm_head;             /* (V, C) untied output head (llama) */
} td_stage_ptrs;

/* Forward activations of one layer for one micro-batch, sized for (batch_size, seq_len). */
typedef struct {
    td_real *ln1;        /* (B, T, C) */
    td_real *ln1_mean, *ln1_rstd; /* (B, T) */
    td_real *qkv;        /* (B, T, 3C) */
    td_real *att;        /* (B, NH, T, T) softmax probabilities */
    td_real *atty;       /* (B, T, C) attention output before the projection */
    td_real *res2;       /* (B, T, C) residual after attention */
    td_real *ln2;        /* (B, T, C) */
    td_real *ln2_mean, *ln2_rstd; /* (B, T) */
    td_real *fch;        /* (B, T, 4C) pre-GELU */
    td_real *fch_gelu;   /* (B, T, 4C) */
    td_real *res3;       /* (B, T, C) layer output */
} td_layer_acts;

/* Forward activations of one Llama layer for one micro-batch (what its backward reads). */
typedef struct {
    td_real *ln1, *ln1_rstd;  /* (B, T, C), (B, T) input RMSNorm */
    td_real *q;               /* (B, T, NH, HS) after RoPE */
    td_real *k, *v;           /* (B, T, NKV, HS), k after RoPE */
    td_real *att;             /* (B, NH, T, T) softmax probabilities */
    td_real *atty;            /* (B, T, C) attention output before o_proj */
    td_real *res2;            /* (B, T, C) residual after attention */
    td_real *ln2, *ln2_rstd;  /* (B, T, C), (B, T) post-attention RMSNorm */
    td_real *gate, *up, *h;   /* (B, T, F) projections and silu(gate) * up */
    td_real *res3;            /* (B, T, C) layer output */
} td_llama_layer_acts;

/* Everything one micro-batch leaves behind for its backward. */
typedef struct {
    int32_t B, T;        /* shape of the micro-batch in the slot; B = 0 means empty */
    int32_t state;       /* 0 empty, 1 forward done, 2 input-gradient done (awaits W) */
    int32_t *tokens;     /* (B, T) first stage */
    int32_t *targets;    /* (B, T) last stage */
    td_real *input;      /* (B, T, C) the residual stream entering the stage */
    td_layer_acts *layers; /* nl entries */
    td_llama_layer_acts *llayers; /* nl entries (llama; layers then unused) */
    td_real *lnf;        /* (B, T, C) last stage */
    td_real *lnf_mean, *lnf_rstd; /* (B, T) */
    td_real *probs;      /* (B, T, V) logits, then softmax probabilities in place */
    td_real *losses;     /* (B, T) */
} td_slot;

/* Gradients of activations that a weight-gradient (W) pass consumes: per layer the gradient of
 * every matmul output and of every LayerNorm output; the head's and the embedding's too. */
typedef struct {
    td_real *g_ln1, *g_qkv, *g_attproj, *g_ln2, *g_fc, *g_fcproj; /* per layer, see model.c */
} td_layer_grads;

/* The same for a Llama layer: the gradient of every projection's output (what its weight
 * gradient reads) and of each RMSNorm's output. */
typedef struct {
    td_real *g_res3;          /* (B, T, C) d of the MLP's output: down_proj's weight gradient */
    td_real *g_gate, *g_up;   /* (B, T, F) d of gate_proj's and up_proj's outputs */
    td_real *g_ln2;           /* (B, T, C) d of the post-attention RMSNorm's output */
    td_real *g_res2;          /* (B, T, C) d of the attention block's output: o_proj's */
    td_real *g_q;             /* (B, T, C) d of q_proj's output (RoPE undone) */
    td_real *g_k, *g_v;       /* (B, T, NKV * HS) d of k_proj's (RoPE undone) and v_proj's */
    td_real *g_ln1;           /* (B, T, C) d of the input RMSNorm's output */
} td_llama_layer_grads;

typedef struct {
    td_layer_grads *layers; /* nl entries */
    td_llama_layer_grads *llayers; /* nl entries (llama; layers then unused) */
    td_real *g_logits;     /* (B, T, V) */
    td_real *g_lnf;        /* (B, T, C) */
    td_real *g_embed;      /* (B, T, C) gradient of the stage input (= of the embedding output) */
} td_grad_store;

/* Scratch for the backward pass, shared by all slots (one backward runs at a time). */
typedef struct {
    td_real *dres;     /* (B, T, C) gradient of the residual stream, running */
    td_real *dtmp;     /* (B, T, C) */
    td_real *datty;    /* (B, T, C) */
    td_real *datt;     /* (B, NH, T, T) */
    td_real *dfch_gelu;/* (B, T, 4C) */
    /* llama: gradients of the MLP's hidden activation silu(gate) * up */
    td_real *dh;       /* (B, T, F) */
} td_scratch;

/* A device backend: where a model stage's tensors live and its passes run (NULL: the CPU code
 * in model.c and optim.c). The host buffers param_mem / grad_mem stay the staging area for
 * get/set and for safetensors; the backend moves them across when asked. Implemented by
 * engine/cuda/ (td_cuda_ops) when the library is built with CUDA. */
typedef struct td_backend_ops {
    const char *name;
    td_status (*build)(td_model *m);          /* allocate device memory, upload param_mem */
    void (*release)(td_model *m);
    td_status (*upload)(td_model *m, int grads);   /* host param_mem (or grad_mem) -> device */
    td_status (*download)(td_model *m, int grads); /* device -> host param_mem (or grad_mem) */
    /* forward of slot 0 (tokens/targets already in m->slot[0]); logits_out may be NULL */
    td_status (*forward)(td_model *m, float *logits_out, double *out_loss, int with_targets);
    td_status (*backward)(td_model *m, double grad_scale); /* after a forward with targets */
    td_status (*zero_grad)(td_model *m);
    td_status (*grad_sq_sum)(td_model *m, double *out);
    td_status (*adamw)(td_model *m, double grad_norm);
    /* stage passes on device buffers in the compute type (td_stage_forward_dev); tokens and
     * targets already in m->slot[slot]; out_loss NULL: the loss is summed later (loss_sum) */
    td_status (*stage_forward)(td_model *m, int32_t slot, double *out_loss, int with_targets,
                               const void *in_BTC, void *out_BTC);
    td_status (*stage_backward)(td_model *m, int32_t slot, double grad_scale, int part,
                                const void *dout_BTC, void *din_BTC);
    td_status (*loss_sum)(td_model *m, double *out_sum, int32_t *out_count);
    td_status (*grad_data)(td_model *m, void **out, size_t offset); /* device fp32 gradient */
    void *(*stream)(td_model *m);
    int64_t (*device_bytes)(td_model *m);
    int32_t (*device)(td_model *m);
    /* AdamW's moments: device -> host m_mem / v_mem, and back (checkpoints) */
    td_status (*opt_download)(td_model *m);
    td_status (*opt_upload)(td_model *m);
} td_backend_ops;

/* The CUDA backend's table, or NULL when the library was built without CUDA. */
const td_backend_ops *td_cuda_ops(void);

/* Phases of the CPU per-phase profile (model.c names them; td_model_profile reads them). */
typedef enum {
    TD_PH_ENCODER_FWD, TD_PH_LAYERNORM_FWD, TD_PH_MATMUL_FWD, TD_PH_ATTENTION_FWD,
    TD_PH_RESIDUAL_FWD, TD_PH_GELU_FWD, TD_PH_LM_HEAD_FWD, TD_PH_SOFTMAX_CE_FWD,
    TD_PH_SOFTMAX_CE_BWD, TD_PH_LM_HEAD_BWD_INPUT, TD_PH_MATMUL_BWD_INPUT, TD_PH_GELU_BWD,
    TD_PH_ATTENTION_BWD, TD_PH_LAYERNORM_BWD_INPUT, TD_PH_COPY_BWD, TD_PH_LM_HEAD_BWD_WEIGHT,
    TD_PH_MATMUL_BWD_WEIGHT, TD_PH_LAYERNORM_BWD_WEIGHT, TD_PH_ENCODER_BWD, TD_PH_ADAMW,
    /* the Llama family's own ops (its products, attention, head and embedding use the above) */
    TD_PH_RMSNORM_FWD, TD_PH_ROPE_FWD, TD_PH_SWIGLU_FWD, TD_PH_RMSNORM_BWD_INPUT,
    TD_PH_RMSNORM_BWD_WEIGHT, TD_PH_ROPE_BWD, TD_PH_SWIGLU_BWD,
    TD_PH_COUNT
} td_phase;

struct td_model {
    /* configuration (td_model_set_*) */
    int64_t n_layer, n_embd, n_head, vocab_size, n_positions, seq_len, batch_size, threads;
    int64_t stage, stages, layer_begin, layer_end, slots, split_backward;
    int64_t backend; /* 0 cpu, 1 cuda */
    int64_t bf16;    /* 1: bf16 compute with fp32 master weights (cuda only) */
    int64_t profile; /* time every CPU phase (td_model_profile): 1 wall, 2 thread CPU; 0 off */
    /* model family: 0 GPT-2 (model.c), 1 Llama (llama_model.c on the CPU), and Llama's
     * shape keys (n_kv_head 0 = n_head; ffn_dim F > 0 required for llama) */
    int64_t family, n_kv_head, ffn_dim;
    double rope_theta, norm_eps; /* build-time: RoPE's theta, RMSNorm's epsilon */
    const td_backend_ops *ops; /* NULL on the CPU */
    void *device;              /* the backend's own state */
    double lr, beta1, beta2, eps, weight_decay, grad_clip;
    int built;
    int64_t step; /* optimizer steps taken */

    /* derived at build */
    int has_embed, has_head; /* first stage holds wte+wpe; last stage ln_f + head (+ wte) */
    int nl;                  /* layers on this stage */
    int32_t nparams;
    td_param *params;
    size_t total; /* elements in each flat buffer */
    size_t host_bytes; /* what td_model_layout allocated on the host (get_int "host_bytes") */
    td_real *param_mem, *grad_mem, *m_mem, *v_mem;
    td_stage_ptrs P, G; /* parameters and gradients */

    double pending_loss;    /* CPU: sum of the mean losses of forwards whose loss is deferred */
    int32_t pending_count;
    td_slot *slot;          /* slots entries */
    td_grad_store *gstore;  /* split_backward ? slots : 1 entries */
    td_scratch scratch;

    /* CPU per-phase profile (profile = 1): wall seconds and calls per td_phase, summed since
     * build or the last td_model_profile_reset */
    double prof_s[TD_PH_COUNT];
    int64_t prof_n[TD_PH_COUNT];

    char err[TD_ERR_LEN];
};

/* Error helpers: record "where: what (values). HINT: ..." on the handle and return status. */
td_status td_fail(td_model *m, td_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The same, for calls without a handle: kept in a thread-local buffer (td_last_error). */
td_status td_fail_global(td_status status, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* model.c */
td_status td_model_layout(td_model *m); /* parameter table + allocation */
td_param *td_find_param(td_model *m, const char *name);
/* Appends a row to the parameter table (decayed when ndim >= 2) at the end of the flat buffer. */
void td_add_param(td_model *m, const char *name, int32_t ndim, const int64_t *shape);
void td_release(td_model *m);
td_status td_forward_slot(td_model *m, int32_t slot, float *logits_out, double *out_loss,
                          int with_targets);
const td_real *td_input_grad(const td_model *m, int32_t slot);
int td_full_model_has(const td_model *m, const char *name);
td_status td_backward_slot(td_model *m, int32_t slot, double grad_scale, int part,
                           const td_real *dout_BTC);

/* The stage's output activations after a forward of the slot (a stage without the head). */
const td_real *td_stage_output(const td_model *m, int32_t slot);

/* llama_model.c: the Llama family's table, pointers, buffers and passes (any stage; model.c
 * dispatches to these when family = 1) */
void td_llama_table(td_model *m);
void td_llama_bind(td_model *m, td_stage_ptrs *s, td_real *base);
int td_llama_full_model_has(const td_model *m, const char *name);
size_t td_llama_layout_buffers(td_model *m, td_real *base);
td_status td_llama_forward_slot(td_model *m, int32_t slot, float *logits_out, double *out_loss,
                                int with_targets);
void td_llama_backward_slot(td_model *m, int32_t slot, double grad_scale, int part,
                            const td_real *dout_BTC);

/* Per-phase profile: td_prof_now(m) before a phase, td_prof_add after (model.c's passes,
 * optim.c's AdamW; td_model_profile in model.c reads the sums). Inline here so that every layer
 * may time itself. profile = 1: wall time on the calling thread (what a step waits for,
 * fork/join included); profile = 2: the calling thread's CPU time (on a machine others load it
 * moves far less than wall time; with threads = 1 it is all the work, with more it omits the
 * other threads'). */
static inline double td_prof_now(const td_model *m) {
    struct timespec ts;
    clock_gettime(m->profile == 2 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline void td_prof_add(td_model *m, td_phase ph, double started) {
    m->prof_s[ph] += td_prof_now(m) - started;
    m->prof_n[ph] += 1;
}

/* Runs `call` as phase ph: timed on the calling thread (fork/join included) when profiling,
 * one predictable branch otherwise. */
#define PHASE(m, ph, call)                                   \
    do {                                                     \
        if ((m)->profile) {                                  \
            const double t0_ = td_prof_now(m);                \
            call;                                            \
            td_prof_add((m), (ph), t0_);                     \
        } else {                                             \
            call;                                            \
        }                                                    \
    } while (0)

/* optim.c */
int64_t td_grad_norm_elems(const td_model *m);
double td_grad_sq_sum_local(const td_model *m);
void td_adamw(td_model *m, double grad_norm);

/* safetensors.c, shards.c, checkpoint.c */
td_status td_load_safetensors(td_model *m, const char *path);
/* The same parsers over bytes in memory (path names the source in messages); the path versions
 * read the file and call these. The fuzz targets (engine/fuzz) drive them directly. */
td_status td_load_safetensors_mem(td_model *m, const char *path, const unsigned char *buf,
                                  size_t size);
td_status td_tokens_parse(int32_t **out_tokens, int64_t *out_count, const char *path,
                          const unsigned char *buf, size_t size, int64_t vocab_size);
td_status td_save_safetensors(td_model *m, const char *path, int grads);
/* Training checkpoints (tandem.h td_model_save_checkpoint / _load_checkpoint) on the host buffers
 * param_mem, m_mem, v_mem and the step; the load validates the whole file before it copies. */
td_status td_save_checkpoint(td_model *m, const char *path, int64_t data_position);
td_status td_load_checkpoint(td_model *m, const char *path, int64_t *out_data_position);

void td_set_threads(const td_model *m);
/* Around every compute entry point: threads, and denormals flushed (returns the caller's FP
 * state, which td_fp_leave restores). */
unsigned td_fp_enter(const td_model *m);
void td_fp_leave(unsigned saved);

/* e^x for the kernels (kernels.c, llama_ops.c) */
#ifndef TD_FLOAT64
/* e^x by range reduction and a polynomial: x = k·ln2 + r with |r| <= ln2/2 (k by the 1.5·2^23
 * rounding trick), e^r by its degree-7 Taylor polynomial (relative error < 1e-7 on that
 * interval), 2^k by writing the exponent bits. Plain arithmetic on purpose: a loop over it
 * vectorizes, where a call to libm's expf/tanhf does not (they were 22% of a small model's
 * step). Inputs are clamped to [-87, 88], where e^x is a normal float. */
static inline float fast_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float shifter = 12582912.0f; /* 1.5 * 2^23 */
    float kf = (x * 1.44269504088896341f + shifter) - shifter;
    float r = x - kf * 0.693145751953125f - kf * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f +
              r * (8.3333338e-3f + r * (1.3888889e-3f + r * 1.9841270e-4f))))));
    union { int32_t i; float f; } two_k;
    two_k.i = ((int32_t)kf + 127) << 23;
    return p * two_k.f;
}
/* e^x of softmax inputs (x <= 0 after the row maximum): the polynomial in the float build (it
 * vectorizes; within 1e-7 relative of libm, below the float rounding of the sums it feeds), libm
 * in the float64 build that finite differences and the f64 reference run on. */
#define softmax_exp(x) fast_expf(x)
#else
#define softmax_exp(x) exp(x)
#endif

/* The 8 lanes of a row reduction (kernels.c's LayerNorm rows, llama_ops.c's RMSNorm rows) added
 * in one fixed tree, so the result does not depend on the vector width or thread count. */
#define TD_LANES 8
static inline double td_lanes8_total(const double *a) { /* a[TD_LANES] */
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

#endif /* TD_INTERNAL_H */
