/* tandem.h — the one public header of the Tandem engine.
 *
 * Everything Python (harness/engine.py) or the tandem-engine launcher sees is declared here:
 * opaque handles, status codes, a per-handle last-error string, key/value configuration and the
 * training-step entry points. No struct crosses this boundary by value or by layout.
 * Conventions: outputs first, then inputs, then sizes; shapes are given in comments with the
 * project letters (B batch, T sequence, C channels, V vocab, L layers, NH heads).
 */
#ifndef TANDEM_H
#define TANDEM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a declaration below changes meaning; the binding refuses a mismatch. */
#define TD_ABI_VERSION 1

typedef enum {
    TD_OK = 0,
    TD_ERR_ARG = 1,      /* a NULL or out-of-range argument */
    TD_ERR_CONFIG = 2,   /* an unknown key or a bad configuration value */
    TD_ERR_IO = 3,       /* a file could not be opened, read or written */
    TD_ERR_FORMAT = 4,   /* a file was read but its contents are malformed */
    TD_ERR_RANGE = 5,    /* a token id or index outside its valid range */
    TD_ERR_STATE = 6,    /* a call made in the wrong order (e.g. step before build) */
    TD_ERR_NOMEM = 7,    /* an allocation failed */
    TD_ERR_COMM = 8,     /* a peer rank failed or a message did not match */
    TD_ERR_INTERNAL = 9  /* a bug: please report it with the message */
} td_status;

/* One model stage: the whole model when stages = 1. Owns parameters, gradients, optimizer state
 * and activation slots (one per micro-batch in flight). Not thread-safe; one handle per thread. */
typedef struct td_model td_model;

int32_t td_abi_version(void);
/* Bytes of the engine's internal real type: 4 for the normal build, 8 for TD_FLOAT64. */
int32_t td_real_bytes(void);
const char *td_version_string(void);
const char *td_status_name(td_status status);
/* The message of the last failed call that had no handle to keep it (td_model_create, file
 * helpers). Thread-local; valid until the next failing call on the same thread. */
const char *td_last_error(void);

/* ---- lifetime and configuration ------------------------------------------------------------- */

td_status td_model_create(td_model **out_model);
void td_model_free(td_model *model); /* NULL is fine */
/* The message of the last failed call on this handle: what, where, the values, and a HINT. */
const char *td_model_last_error(const td_model *model);

/* Configuration before td_model_build. Integer keys: n_layer, n_embd, n_head, vocab_size,
 * n_positions, seq_len (largest T), batch_size (largest micro-batch B), threads (0 = OpenMP
 * default), stage, stages, layer_begin, layer_end (the stage's layers [begin, end); default: the
 * whole model on one stage), slots (activation sets kept at once; default 1), split_backward
 * (1 keeps per-slot gradients of activations so a backward can run as B then W; default 0),
 * backend (0 cpu, 1 cuda: on the current CUDA device), bf16 (1: bf16 compute, cuda only),
 * profile (1: time each CPU phase in wall seconds, 2: in the calling thread's CPU seconds; read
 * with td_model_profile; may change after build), family (0 gpt2, default; 1 llama: the
 * public Llama names and maths of docs/model.md, on one CPU stage without split_backward so
 * far), and Llama's n_kv_head (divides n_head; 0 = n_head) and ffn_dim (the MLP width, > 0).
 * Read-only integer keys (td_model_get_int): step, num_elements, io_bytes, device (the CUDA
 * device ordinal, -1 on the CPU), device_bytes (device memory the model allocated).
 * Float keys: lr, beta1, beta2, eps, weight_decay, grad_clip (0 = off); llama's rope_theta
 * (default 10000) and norm_eps (RMSNorm's epsilon, default 1e-5), build-time only.
 * Optimizer keys may also be set after build. Unknown keys are TD_ERR_CONFIG. */
td_status td_model_set_int(td_model *model, const char *key, int64_t value);
td_status td_model_set_float(td_model *model, const char *key, double value);
td_status td_model_get_int(const td_model *model, const char *key, int64_t *out_value);
/* Validates the configuration, lays out the parameter table, allocates everything once. */
td_status td_model_build(td_model *model);
/* CPU per-phase profile (key profile = 1): phase `index` (0-based) as its name (static string),
 * wall seconds spent in it on the calling thread and the number of calls, summed since build or
 * the last reset; TD_ERR_RANGE past the last phase. Zeros while profile = 0. */
td_status td_model_profile(const td_model *model, int32_t index, const char **out_name,
                           double *out_seconds, int64_t *out_calls);
td_status td_model_profile_reset(td_model *model);

/* ---- parameter table ------------------------------------------------------------------------ */

/* Number of tensors this stage owns (the whole table when stages = 1). */
td_status td_model_num_params(const td_model *model, int32_t *out_count);
/* Tensor `index` of this stage: its public GPT-2 or Llama name (owned by the handle), rank, shape
 * (up to 4 dims, unused dims 1), element count, and whether AdamW weight decay applies. */
td_status td_model_param_info(const td_model *model, int32_t index, const char **out_name,
                              int32_t *out_ndim, int64_t out_shape[4], int64_t *out_numel,
                              int32_t *out_decayed);
/* Copy a parameter or gradient by name as fp32, `numel` elements. Losses and norms cross the
 * ABI as double so that a float64 build of the kernels (TD_FLOAT64, used by the
 * finite-difference tests) loses nothing; parameters and activations cross as fp32. */
td_status td_model_get_param(td_model *model, float *out, const char *name, int64_t numel);
td_status td_model_set_param(td_model *model, const char *name, const float *in, int64_t numel);
td_status td_model_get_grad(td_model *model, float *out, const char *name, int64_t numel);
td_status td_model_set_grad(td_model *model, const char *name, const float *in, int64_t numel);

/* Safetensors: load every tensor this stage owns (names checked against the table; a
 * "transformer." prefix and ".attn.bias"/".attn.masked_bias" buffers are tolerated, other
 * unknown names are errors); save this stage's parameters as F32. */
td_status td_model_load_safetensors(td_model *model, const char *path);
td_status td_model_save_safetensors(td_model *model, const char *path);
/* The same layout, holding this stage's accumulated gradients instead of the parameters. */
td_status td_model_save_grads_safetensors(td_model *model, const char *path);

/* ---- one-stage training step ---------------------------------------------------------------- */

/* Forward of the whole model (stages = 1). tokens_BT, targets_BT: int32 ids in [0, vocab_size).
 * logits_BTV may be NULL; targets_BT may be NULL (then *out_loss is not written). B <= batch_size,
 * 1 <= T <= seq_len. */
td_status td_model_forward(td_model *model, float *logits_BTV, double *out_loss,
                           const int32_t *tokens_BT, const int32_t *targets_BT, int32_t B,
                           int32_t T);
td_status td_model_zero_grad(td_model *model);
/* Forward + backward of one micro-batch, ACCUMULATING into the gradients: d(loss)/d(theta) is
 * multiplied by grad_scale (1/M for M equal micro-batches) before it is added. */
td_status td_model_forward_backward(td_model *model, double *out_loss, const int32_t *tokens_BT,
                                    const int32_t *targets_BT, int32_t B, int32_t T,
                                    double grad_scale);
/* AdamW on the accumulated gradients (see docs/optimizer.md for the exact update), then the step
 * counter advances. out_grad_norm (may be NULL) gets the global L2 norm before clipping. For a
 * pipelined model the norm must come from td_model_grad_sq_sum over all stages: pass it in
 * through td_model_optimizer_step_with_norm instead. */
td_status td_model_optimizer_step(td_model *model, double *out_grad_norm);
td_status td_model_grad_sq_sum(td_model *model, double *out_sum);
td_status td_model_optimizer_step_with_norm(td_model *model, double grad_norm);

/* ---- stage-level passes (pipeline parallelism) ---------------------------------------------- */

/* Which parts of a backward pass to run. */
typedef enum {
    TD_BWD_FULL = 0,   /* input gradient and weight gradient in one pass ("BW") */
    TD_BWD_INPUT = 1,  /* "B": the gradient w.r.t. the stage input only (needs split_backward) */
    TD_BWD_WEIGHT = 2  /* "W": the weight gradients of an earlier TD_BWD_INPUT on the same slot */
} td_backward_part;

/* Forward of this stage for one micro-batch in activation slot `slot`.
 * First stage reads tokens_BT, others read in_BTC. The last stage needs targets_BT and writes
 * *out_loss (mean cross-entropy of this micro-batch); others write out_BTC. */
td_status td_stage_forward(td_model *model, float *out_BTC, double *out_loss, int32_t slot,
                           const int32_t *tokens_BT, const float *in_BTC,
                           const int32_t *targets_BT, int32_t B, int32_t T);
/* Backward of the micro-batch held in `slot`. The last stage seeds d(loss) = grad_scale; other
 * stages read dout_BTC. Non-first stages write din_BTC (for TD_BWD_FULL and TD_BWD_INPUT).
 * Weight gradients accumulate. */
td_status td_stage_backward(td_model *model, float *din_BTC, int32_t slot, const float *dout_BTC,
                            double grad_scale, int32_t part);

/* The same passes on buffers in the model's own memory and compute type, for the pipeline
 * executor: device memory holding (B, T, C) elements of td_model_get_int(m, "io_bytes") bytes
 * (bf16 in bf16 mode, else fp32) for a CUDA model, host td_real arrays for a CPU model. Work is
 * queued on the model's stream (td_model_stream) and may still run when the call returns: order
 * transfers after it on that stream. out_loss may be NULL on the last stage: the micro-batch's
 * mean loss is then kept for td_stage_loss_sum. tokens_BT / targets_BT are host arrays. */
td_status td_stage_forward_dev(td_model *model, void *out_BTC, double *out_loss, int32_t slot,
                               const int32_t *tokens_BT, const void *in_BTC,
                               const int32_t *targets_BT, int32_t B, int32_t T);
td_status td_stage_backward_dev(td_model *model, void *din_BTC, int32_t slot,
                                const void *dout_BTC, double grad_scale, int32_t part);
/* The sum of the mean losses of the forwards whose loss was deferred since the last call, in
 * forward order, and their count; waits for the device. */
td_status td_stage_loss_sum(td_model *model, double *out_sum, int32_t *out_count);
/* Where gradient `name` (numel elements, fp32) lives in the model's memory (device memory for a
 * CUDA model), valid until the model is freed: for transfers between stages. */
td_status td_model_grad_data(td_model *model, void **out, const char *name, int64_t numel);
/* The CUDA stream (cudaStream_t) the model's work runs on; NULL for a CPU model. */
td_status td_model_stream(td_model *model, void **out_stream);

/* ---- kernels, one by one (op-level parity) ------------------------------------------------- */

/* Each td_op_* runs one engine kernel on caller buffers (fp32, row-major, shapes in the names):
 * the same code the model runs, exposed so `tandem parity` can hold every kernel, forward and
 * backward, to jax.vjp. Weight-gradient outputs ACCUMULATE (+=); other outputs are overwritten.
 * The float64 build returns TD_ERR_STATE. See engine/src/kernels.h for the maths. */
td_status td_op_gemm(float *C, const float *A, const float *B, int32_t M, int32_t N, int32_t K,
                     int32_t transA, int32_t transB, int32_t accumulate);
td_status td_op_encoder_forward(float *out_BTC, const int32_t *tokens_BT, const float *wte_VC,
                                const float *wpe_TC, int32_t B, int32_t T, int32_t C, int32_t V);
td_status td_op_encoder_backward(float *dwte_VC, float *dwpe_TC, const float *dout_BTC,
                                 const int32_t *tokens_BT, int32_t B, int32_t T, int32_t C,
                                 int32_t V);
td_status td_op_layernorm_forward(float *out_NC, float *mean_N, float *rstd_N, const float *inp_NC,
                                  const float *w_C, const float *b_C, int32_t N, int32_t C);
td_status td_op_layernorm_backward(float *dinp_NC, float *dw_C, float *db_C, const float *dout_NC,
                                   const float *inp_NC, const float *w_C, const float *mean_N,
                                   const float *rstd_N, int32_t N, int32_t C);
td_status td_op_matmul_forward(float *out_NO, const float *inp_NI, const float *w_IO,
                               const float *bias_O, int32_t N, int32_t IC, int32_t OC);
td_status td_op_matmul_backward(float *dinp_NI, float *dw_IO, float *dbias_O, const float *dout_NO,
                                const float *inp_NI, const float *w_IO, int32_t N, int32_t IC,
                                int32_t OC);
td_status td_op_attention_forward(float *out_BTC, float *att_BHTT, const float *qkv_BT3C,
                                  int32_t B, int32_t T, int32_t C, int32_t NH);
td_status td_op_attention_backward(float *dqkv_BT3C, const float *dout_BTC, const float *qkv_BT3C,
                                   const float *att_BHTT, int32_t B, int32_t T, int32_t C,
                                   int32_t NH);
td_status td_op_gelu_forward(float *out, const float *inp, int64_t n);
td_status td_op_gelu_backward(float *dinp, const float *inp, const float *dout, int64_t n);
/* losses_N = -log softmax(logits_NV)[targets]; probs_NV receives the probabilities */
td_status td_op_softmax_crossentropy_forward(float *probs_NV, float *losses_N,
                                             const float *logits_NV, const int32_t *targets_N,
                                             int32_t N, int32_t V);
td_status td_op_softmax_crossentropy_backward(float *dlogits_NV, const float *probs_NV,
                                              const int32_t *targets_N, double dloss, int32_t N,
                                              int32_t V);

/* The Llama family's ops (engine/src/llama_ops.h). Their buffers hold td_op_real: float in
 * libtandem, double in libtandem_f64 (built with TD_FLOAT64; td_real_bytes() says which), so
 * that finite-difference tests run these very kernels in float64. Shapes: N rows, C channels,
 * NH query heads, NKV key/value heads (dividing NH), HS head size (even for RoPE). */
#ifdef TD_FLOAT64
typedef double td_op_real;
#else
typedef float td_op_real;
#endif
/* out_NC = x * rstd * w, rstd_N = 1 / sqrt(mean(x^2) + eps) */
td_status td_op_rmsnorm_forward(td_op_real *out_NC, td_op_real *rstd_N, const td_op_real *inp_NC,
                                const td_op_real *w_C, int32_t N, int32_t C, double eps);
td_status td_op_rmsnorm_backward(td_op_real *dinp_NC, td_op_real *dw_C,
                                 const td_op_real *dout_NC, const td_op_real *inp_NC,
                                 const td_op_real *w_C, const td_op_real *rstd_N, int32_t N,
                                 int32_t C);
/* Rotary embedding at positions 0..T-1, half-split: channel i < HS/2 pairs with i + HS/2 and
 * turns by t * theta^(-2i/HS). out may be inp. The backward turns dout back (dinp may be dout). */
td_status td_op_rope_forward(td_op_real *out_BTNH, const td_op_real *inp_BTNH, int32_t B,
                             int32_t T, int32_t NH, int32_t HS, double theta);
td_status td_op_rope_backward(td_op_real *dinp_BTNH, const td_op_real *dout_BTNH, int32_t B,
                              int32_t T, int32_t NH, int32_t HS, double theta);
/* out = silu(gate) * up, n elements */
td_status td_op_swiglu_forward(td_op_real *out, const td_op_real *gate, const td_op_real *up,
                               int64_t n);
td_status td_op_swiglu_backward(td_op_real *dgate, td_op_real *dup, const td_op_real *dout,
                                const td_op_real *gate, const td_op_real *up, int64_t n);
/* Causal grouped-query attention; query head h reads key/value head h / (NH / NKV). */
td_status td_op_gqa_attention_forward(td_op_real *out_BTNH, td_op_real *att_BHTT,
                                      const td_op_real *q_BTNH, const td_op_real *k_BTKH,
                                      const td_op_real *v_BTKH, int32_t B, int32_t T, int32_t NH,
                                      int32_t NKV, int32_t HS);
td_status td_op_gqa_attention_backward(td_op_real *dq_BTNH, td_op_real *dk_BTKH,
                                       td_op_real *dv_BTKH, const td_op_real *dout_BTNH,
                                       const td_op_real *q_BTNH, const td_op_real *k_BTKH,
                                       const td_op_real *v_BTKH, const td_op_real *att_BHTT,
                                       int32_t B, int32_t T, int32_t NH, int32_t NKV, int32_t HS);

/* ---- training state: checkpoint and resume ------------------------------------------------- */

/* Version of the checkpoint format (its safetensors __metadata__ "format_version"). */
#define TD_CHECKPOINT_VERSION 1

/* Writes this stage's whole training state to one safetensors file: every parameter under its
 * name, AdamW's moments under "adamw.m.<name>" / "adamw.v.<name>" (the engine's real type, F32),
 * and a __metadata__ table with format "tandem-checkpoint", format_version, the optimizer step,
 * `data_position` (the caller's, e.g. training steps consumed; >= 0) and the settings the state
 * belongs to (n_layer, n_embd, n_head, vocab_size, n_positions, stage, stages, layer_begin,
 * layer_end, lr, beta1, beta2, eps, weight_decay, grad_clip). Atomic: a temporary file in the
 * same directory is written, fsynced and renamed over `path`, so `path` holds the old state or
 * the whole new one. */
td_status td_model_save_checkpoint(td_model *model, const char *path, int64_t data_position);
/* Restores what td_model_save_checkpoint wrote. Everything is checked before anything changes
 * (format and version, every setting above against this model's, each tensor's name, dtype,
 * shape and bytes): a truncated, foreign or mismatched file is TD_ERR_FORMAT or TD_ERR_CONFIG
 * with a message naming the key and both values, and the model is left as it was.
 * out_data_position (may be NULL) gets the saved data position. */
td_status td_model_load_checkpoint(td_model *model, const char *path, int64_t *out_data_position);
/* After a non-finite loss or gradient norm: the first tensor in table order whose gradient
 * (*out_what = 1; the gradients td_model_grad_sq_sum counts, so not a last stage's copy of the
 * tied wte) or, when those are finite, whose parameter (2) holds a NaN or inf;
 * *out_name = NULL and *out_what = 0 when all are finite. The name is owned by the handle.
 * Scans every element (downloads from a device first): for the failure path, not every step. */
td_status td_model_find_nonfinite(td_model *model, const char **out_name, int32_t *out_what);

/* ---- token shards --------------------------------------------------------------------------- */

/* Token shard layout (little-endian): 64-byte header { u32 magic 0x544E4454 ("TDNT"),
 * u32 version 1, u32 bytes per token (2 or 4), u32 reserved 0, u64 count, 40 reserved zero
 * bytes }, then `count` token ids. Reads the whole shard into a malloc'd int32 array that the
 * caller releases with td_free. Values are checked against vocab_size (0 = no check).
 * The writer lives in harness/data.py. */
td_status td_tokens_read(int32_t **out_tokens, int64_t *out_count, const char *path,
                         int64_t vocab_size);
void td_free(void *ptr);

#ifdef __cplusplus
}
#endif
#endif /* TANDEM_H */
