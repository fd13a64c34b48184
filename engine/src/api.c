/* api.c — the public ABI of tandem.h: argument checks, configuration, and the entry points that
 * turn calls into model.c passes. Every failure returns a status and leaves a message on the
 * handle ("function: what, the values. HINT: what to do"); nothing here exits or aborts.
 */
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "internal.h"
#include "kernels.h"

#ifndef TD_VERSION
#define TD_VERSION "0.1.0"
#endif

static _Thread_local char g_err[TD_ERR_LEN];

td_status td_fail(td_model *m, td_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m ? m->err : g_err, TD_ERR_LEN, fmt, ap);
    va_end(ap);
    return status;
}

td_status td_fail_global(td_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, TD_ERR_LEN, fmt, ap);
    va_end(ap);
    return status;
}

int32_t td_abi_version(void) { return TD_ABI_VERSION; }
int32_t td_real_bytes(void) { return (int32_t)sizeof(td_real); }

/* the version and the build's backends: "cpu, float64 kernels", "cpu, fp32" or, when the
 * library was built with the CUDA backend, "cpu, fp32; cuda fp32/bf16" */
const char *td_version_string(void) {
#ifdef TD_FLOAT64
    return TD_VERSION " (cpu, float64 kernels)";
#else
    return td_cuda_ops() ? TD_VERSION " (cpu, fp32; cuda fp32/bf16)" : TD_VERSION " (cpu, fp32)";
#endif
}

const char *td_last_error(void) { return g_err; }

const char *td_status_name(td_status s) {
    static const char *names[] = {"TD_OK",       "TD_ERR_ARG",   "TD_ERR_CONFIG",
                                  "TD_ERR_IO",   "TD_ERR_FORMAT", "TD_ERR_RANGE",
                                  "TD_ERR_STATE", "TD_ERR_NOMEM", "TD_ERR_COMM",
                                  "TD_ERR_INTERNAL"};
    return (unsigned)s < sizeof names / sizeof names[0] ? names[s] : "TD_ERR_UNKNOWN";
}

void td_free(void *ptr) { free(ptr); }

/* Test hook for the regression gate: TANDEM_SLOWDOWN=<factor> makes every compute call take
 * `factor` times as long by spinning (not sleeping, so CPU-time and instruction counts see it
 * too) for (factor - 1) x the time the real work took. Unset in normal use. */
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void slowdown(double started) {
    const char *f = getenv("TANDEM_SLOWDOWN");
    if (!f || !*f) return;
    double factor = atof(f);
    if (!(factor > 1.0) || factor > 100.0) return;
    double until = now_s() + (now_s() - started) * (factor - 1.0);
    volatile double sink = 0.0;
    while (now_s() < until) sink += 1.0;
}

/* Denormals flushed to zero (FTZ) and read as zero (DAZ) while the engine computes: denormal
 * arithmetic takes microcode assists that made a small model's step 40% slower here with real
 * weights (50 ms vs 36 ms), and XLA's CPU runtime flushes them too. MXCSR is per thread: the
 * OpenMP pool keeps the setting, the caller's thread gets its own back on the way out. */
#if defined(__x86_64__) || defined(__SSE2__)
#include <xmmintrin.h>
#define TD_FTZ_DAZ 0x8040u
unsigned td_fp_enter(const td_model *m) {
    if (m) td_set_threads(m);
    unsigned old = _mm_getcsr();
#pragma omp parallel
    _mm_setcsr(_mm_getcsr() | TD_FTZ_DAZ);
    _mm_setcsr(old | TD_FTZ_DAZ); /* also without OpenMP */
    return old;
}
void td_fp_leave(unsigned old) { _mm_setcsr(old); }
#else
unsigned td_fp_enter(const td_model *m) {
    if (m) td_set_threads(m);
    return 0;
}
void td_fp_leave(unsigned old) { (void)old; }
#endif

void td_set_threads(const td_model *m) {
#ifdef _OPENMP
    if (m->threads > 0) omp_set_num_threads((int)m->threads);
#else
    (void)m;
#endif
}

/* ---- configuration --------------------------------------------------------------------------- */

typedef struct {
    const char *key;
    size_t offset;
    int after_build; /* may change once built (optimizer hyper-parameters) */
} key_entry;

#define IKEY(k) {#k, offsetof(td_model, k), 0}
static const key_entry INT_KEYS[] = {
    IKEY(n_layer), IKEY(n_embd), IKEY(n_head), IKEY(vocab_size), IKEY(n_positions),
    IKEY(seq_len), IKEY(batch_size), {"threads", offsetof(td_model, threads), 1}, IKEY(stage),
    IKEY(stages), IKEY(layer_begin), IKEY(layer_end), IKEY(slots), IKEY(split_backward),
    IKEY(backend), IKEY(bf16), {"profile", offsetof(td_model, profile), 1},
    IKEY(family), IKEY(n_kv_head), IKEY(ffn_dim),
};
#define FKEY(k) {#k, offsetof(td_model, k), 1}
static const key_entry FLOAT_KEYS[] = {FKEY(lr), FKEY(beta1), FKEY(beta2), FKEY(eps),
                                       FKEY(weight_decay), FKEY(grad_clip),
                                       {"rope_theta", offsetof(td_model, rope_theta), 0},
                                       {"norm_eps", offsetof(td_model, norm_eps), 0}};
#define NKEYS(a) (sizeof(a) / sizeof((a)[0]))

static const key_entry *find_key(const key_entry *keys, size_t n, const char *key) {
    for (size_t i = 0; i < n; i++)
        if (!strcmp(keys[i].key, key)) return &keys[i];
    return NULL;
}

static void list_keys(char *out, size_t cap, const key_entry *keys, size_t n) {
    size_t len = 0;
    out[0] = 0;
    for (size_t i = 0; i < n && len < cap; i++)
        len += (size_t)snprintf(out + len, cap - len, "%s%s", i ? ", " : "", keys[i].key);
}

td_status td_model_create(td_model **out) {
    if (!out) return td_fail_global(TD_ERR_ARG, "td_model_create: out_model is NULL");
    td_model *m = calloc(1, sizeof *m);
    if (!m) return td_fail_global(TD_ERR_NOMEM, "td_model_create: out of memory");
    m->stages = 1;
    m->layer_begin = m->layer_end = -1; /* default: balanced split */
    m->slots = 1;
    m->lr = 1e-3, m->beta1 = 0.9, m->beta2 = 0.95, m->eps = 1e-8;
    m->weight_decay = 0.1, m->grad_clip = 1.0;
    m->rope_theta = 10000.0, m->norm_eps = 1e-5; /* Llama's defaults (docs/model.md) */
    *out = m;
    return TD_OK;
}

void td_model_free(td_model *m) {
    if (!m) return;
    if (m->ops && m->device) m->ops->release(m);
    td_release(m);
    free(m);
}

const char *td_model_last_error(const td_model *m) { return m ? m->err : g_err; }

td_status td_model_set_int(td_model *m, const char *key, int64_t value) {
    if (!m || !key) return td_fail(m, TD_ERR_ARG, "td_model_set_int: NULL model or key");
    const key_entry *k = find_key(INT_KEYS, NKEYS(INT_KEYS), key);
    if (!k) {
        char keys[512];
        list_keys(keys, sizeof keys, INT_KEYS, NKEYS(INT_KEYS));
        if (find_key(FLOAT_KEYS, NKEYS(FLOAT_KEYS), key))
            return td_fail(m, TD_ERR_CONFIG, "td_model_set_int: '%s' is a float key. HINT: use td_model_set_float", key);
        char fkeys[256];
        list_keys(fkeys, sizeof fkeys, FLOAT_KEYS, NKEYS(FLOAT_KEYS));
        return td_fail(m, TD_ERR_CONFIG, "td_model_set_int: unknown key '%s' (integer keys: %s; float keys: %s)", key, keys, fkeys);
    }
    if (m->built && !k->after_build)
        return td_fail(m, TD_ERR_STATE, "td_model_set_int: '%s' cannot change after td_model_build (value %lld). HINT: create a new model", key, (long long)value);
    *(int64_t *)((char *)m + k->offset) = value;
    return TD_OK;
}

td_status td_model_get_int(const td_model *m, const char *key, int64_t *out) {
    if (!m || !key || !out) return TD_ERR_ARG;
    if (!strcmp(key, "step")) return *out = m->step, TD_OK;
    if (!strcmp(key, "num_elements")) return *out = (int64_t)m->total, TD_OK;
    /* bytes per element of the activations td_stage_*_dev exchange: the compute type */
    if (!strcmp(key, "io_bytes")) return *out = m->bf16 ? 2 : (int64_t)sizeof(td_real), TD_OK;
    if (!strcmp(key, "device")) return *out = m->ops && m->built ? m->ops->device((td_model *)m) : -1, TD_OK;
    /* the engine's own allocation counter: parameters, gradients, AdamW moments, activations */
    if (!strcmp(key, "host_bytes")) return *out = m->built ? (int64_t)m->host_bytes : 0, TD_OK;
    if (!strcmp(key, "device_bytes"))
        return *out = m->ops && m->built ? m->ops->device_bytes((td_model *)m) : 0, TD_OK;
    const key_entry *k = find_key(INT_KEYS, NKEYS(INT_KEYS), key);
    if (!k) return td_fail((td_model *)m, TD_ERR_CONFIG, "td_model_get_int: unknown key '%s'", key);
    *out = *(const int64_t *)((const char *)m + k->offset);
    return TD_OK;
}

td_status td_model_set_float(td_model *m, const char *key, double value) {
    if (!m || !key) return td_fail(m, TD_ERR_ARG, "td_model_set_float: NULL model or key");
    const key_entry *k = find_key(FLOAT_KEYS, NKEYS(FLOAT_KEYS), key);
    if (!k) {
        char keys[256];
        list_keys(keys, sizeof keys, FLOAT_KEYS, NKEYS(FLOAT_KEYS));
        char ikeys[512];
        list_keys(ikeys, sizeof ikeys, INT_KEYS, NKEYS(INT_KEYS));
        return td_fail(m, TD_ERR_CONFIG, "td_model_set_float: unknown key '%s' (float keys: %s; integer keys: %s)", key, keys, ikeys);
    }
    if (m->built && !k->after_build)
        return td_fail(m, TD_ERR_STATE, "td_model_set_float: '%s' cannot change after td_model_build (value %g). HINT: create a new model", key, value);
    int ok = isfinite(value);
    if (!strcmp(key, "beta1") || !strcmp(key, "beta2")) ok = ok && value >= 0 && value < 1;
    else if (!strcmp(key, "eps") || !strcmp(key, "rope_theta") || !strcmp(key, "norm_eps")) ok = ok && value > 0;
    else ok = ok && value >= 0;
    if (!ok)
        return td_fail(m, TD_ERR_CONFIG, "td_model_set_float: %s=%g is out of range. HINT: lr, weight_decay, grad_clip >= 0; 0 <= beta < 1; eps, rope_theta, norm_eps > 0", key, value);
    *(double *)((char *)m + k->offset) = value;
    return TD_OK;
}

/* The family's own keys: family = 0 (GPT-2) takes none of Llama's; family = 1 (Llama) runs on
 * one CPU stage without a split backward, so far (llama_model.c). */
static td_status check_family(td_model *m) {
    static const char *fn = "td_model_build";
    if (m->family < 0 || m->family > 1)
        return td_fail(m, TD_ERR_CONFIG, "%s: family=%lld (0 = gpt2, 1 = llama)", fn, (long long)m->family);
    if (m->family == 0) {
        if (m->n_kv_head || m->ffn_dim)
            return td_fail(m, TD_ERR_CONFIG, "%s: n_kv_head=%lld, ffn_dim=%lld are Llama keys, but family=0 (gpt2). HINT: set family=1", fn, (long long)m->n_kv_head, (long long)m->ffn_dim);
        return TD_OK;
    }
    if (m->n_kv_head == 0) m->n_kv_head = m->n_head; /* multi-head attention */
    if (m->n_kv_head < 0 || m->n_head % m->n_kv_head)
        return td_fail(m, TD_ERR_CONFIG, "%s: n_kv_head=%lld does not divide n_head=%lld", fn, (long long)m->n_kv_head, (long long)m->n_head);
    if ((m->n_embd / m->n_head) % 2)
        return td_fail(m, TD_ERR_CONFIG, "%s: head size n_embd/n_head=%lld is odd; RoPE turns pairs of channels", fn, (long long)(m->n_embd / m->n_head));
    if (m->ffn_dim <= 0 || m->ffn_dim > (1 << 22))
        return td_fail(m, TD_ERR_CONFIG, "%s: ffn_dim=%lld must be in [1, %d] for family=1 (llama). HINT: the MLP width F; the harness derives it from multiple_of", fn, (long long)m->ffn_dim, 1 << 22);
    if (m->stages != 1 || m->split_backward || m->backend != 0)
        return td_fail(m, TD_ERR_CONFIG, "%s: family=1 (llama) runs on one CPU stage so far (got stages=%lld, split_backward=%lld, backend=%lld). HINT: stages=1, split_backward=0, backend=0", fn, (long long)m->stages, (long long)m->split_backward, (long long)m->backend);
    return TD_OK;
}

#define REQUIRE_POSITIVE(k)                                                                      \
    if (m->k <= 0)                                                                               \
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: " #k "=%lld must be > 0", (long long)m->k);

td_status td_model_build(td_model *m) {
    if (!m) return td_fail_global(TD_ERR_ARG, "td_model_build: model is NULL");
    if (m->built) return td_fail(m, TD_ERR_STATE, "td_model_build: already built");
    REQUIRE_POSITIVE(n_layer);
    REQUIRE_POSITIVE(n_embd);
    REQUIRE_POSITIVE(n_head);
    REQUIRE_POSITIVE(vocab_size);
    REQUIRE_POSITIVE(n_positions);
    REQUIRE_POSITIVE(seq_len);
    REQUIRE_POSITIVE(batch_size);
    REQUIRE_POSITIVE(stages);
    REQUIRE_POSITIVE(slots);
    if (m->n_embd % m->n_head)
        return td_fail(m, TD_ERR_CONFIG,
                       "td_model_build: n_embd=%lld is not divisible by n_head=%lld. HINT: the head "
                       "size n_embd/n_head must be a whole number",
                       (long long)m->n_embd, (long long)m->n_head);
    if (m->seq_len > m->n_positions)
        return td_fail(m, TD_ERR_CONFIG,
                       "td_model_build: seq_len=%lld exceeds n_positions=%lld. HINT: the position "
                       "table has n_positions rows",
                       (long long)m->seq_len, (long long)m->n_positions);
    if (m->vocab_size > INT32_MAX || m->n_embd > (1 << 20) || m->seq_len > (1 << 20) ||
        m->batch_size > (1 << 20) || m->n_layer > 4096)
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: a size is beyond what this engine supports (vocab_size=%lld, n_embd=%lld, seq_len=%lld, batch_size=%lld, n_layer=%lld)",
                       (long long)m->vocab_size, (long long)m->n_embd, (long long)m->seq_len, (long long)m->batch_size, (long long)m->n_layer);
    if (m->stage < 0 || m->stage >= m->stages)
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: stage=%lld is outside [0, stages=%lld)", (long long)m->stage, (long long)m->stages);
    if (m->threads < 0) return td_fail(m, TD_ERR_CONFIG, "td_model_build: threads=%lld must be >= 0", (long long)m->threads);
    if (m->layer_begin < 0 && m->layer_end < 0) { /* balanced: the first n_layer % stages get one more */
        int64_t base = m->n_layer / m->stages, extra = m->n_layer % m->stages;
        m->layer_begin = m->stage * base + (m->stage < extra ? m->stage : extra);
        m->layer_end = m->layer_begin + base + (m->stage < extra ? 1 : 0);
    }
    if (m->layer_begin < 0 || m->layer_end < m->layer_begin || m->layer_end > m->n_layer)
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: layers [%lld, %lld) are not a range inside [0, n_layer=%lld)",
                       (long long)m->layer_begin, (long long)m->layer_end, (long long)m->n_layer);
    if (m->stages == 1 && (m->layer_begin != 0 || m->layer_end != m->n_layer))
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: a single stage must hold every layer, got [%lld, %lld) of %lld",
                       (long long)m->layer_begin, (long long)m->layer_end, (long long)m->n_layer);
    const char *fault;
    if (!td_fault_name_valid(&fault))
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: TANDEM_FAULT=%s names no kernel that takes a fault (layernorm_backward[_input|_weight], gelu_backward, attention_backward)", fault);
    if (m->backend < 0 || m->backend > 1)
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: backend=%lld (0 = cpu, 1 = cuda)", (long long)m->backend);
    if (m->bf16 && m->backend != 1)
        return td_fail(m, TD_ERR_CONFIG, "td_model_build: bf16=1 needs backend=1 (cuda); the CPU engine computes in fp32");
    const td_status family_st = check_family(m);
    if (family_st) return family_st;
    if (m->backend == 1) {
        m->ops = td_cuda_ops();
        if (!m->ops)
            return td_fail(m, TD_ERR_CONFIG, "td_model_build: backend=cuda but this libtandem was built without CUDA. HINT: build where nvcc is found (cmake -DTD_CUDA=ON)");
    }
    td_status st = td_model_layout(m);
    if (st == TD_OK && m->ops) st = m->ops->build(m);
    if (st != TD_OK) {
        if (m->ops && m->device) m->ops->release(m);
        td_release(m);
        return st;
    }
    m->built = 1;
    return TD_OK;
}

#define REQUIRE_BUILT(fn)                                                                        \
    if (!m) return td_fail_global(TD_ERR_ARG, fn ": model is NULL");                             \
    if (!m->built) return td_fail((td_model *)m, TD_ERR_STATE, fn ": call td_model_build first");

/* ---- parameter table ------------------------------------------------------------------------- */

td_status td_model_num_params(const td_model *m, int32_t *out) {
    REQUIRE_BUILT("td_model_num_params");
    if (!out) return td_fail((td_model *)m, TD_ERR_ARG, "td_model_num_params: out is NULL");
    *out = m->nparams;
    return TD_OK;
}

td_status td_model_param_info(const td_model *m, int32_t index, const char **name, int32_t *ndim,
                              int64_t shape[4], int64_t *numel, int32_t *decayed) {
    REQUIRE_BUILT("td_model_param_info");
    if (index < 0 || index >= m->nparams)
        return td_fail((td_model *)m, TD_ERR_RANGE, "td_model_param_info: index %d outside [0, %d)", index, m->nparams);
    const td_param *p = &m->params[index];
    if (name) *name = p->name;
    if (ndim) *ndim = p->ndim;
    if (shape) memcpy(shape, p->shape, sizeof p->shape);
    if (numel) *numel = p->numel;
    if (decayed) *decayed = p->decayed;
    return TD_OK;
}

static td_status lookup(td_model *m, const char *fn, const char *name, int64_t numel, td_param **out) {
    if (!name) return td_fail(m, TD_ERR_ARG, "%s: name is NULL", fn);
    td_param *p = td_find_param(m, name);
    if (!p)
        return td_fail(m, TD_ERR_ARG, "%s: no parameter '%s' on stage %lld (layers [%lld, %lld)). HINT: td_model_param_info lists this stage's table",
                       fn, name, (long long)m->stage, (long long)m->layer_begin, (long long)m->layer_end);
    if (numel != p->numel)
        return td_fail(m, TD_ERR_ARG, "%s: '%s' has %lld elements, the buffer %lld", fn, name, (long long)p->numel, (long long)numel);
    *out = p;
    return TD_OK;
}

static td_status copy_tensor(td_model *m, const char *fn, td_real *base, const char *name,
                             float *out, const float *in, int64_t numel) {
    REQUIRE_BUILT("td_model_get_param/set_param");
    td_param *p = NULL;
    td_status st = lookup(m, fn, name, numel, &p);
    if (st) return st;
    if (!(out || in)) return td_fail(m, TD_ERR_ARG, "%s: buffer is NULL", fn);
    td_real *t = base + p->offset;
    const int grads = base == m->grad_mem;
    /* with a device backend the host buffer is a staging copy: refresh it first, so that setting
     * one tensor uploads current values for all the others */
    if (m->ops && (st = m->ops->download(m, grads))) return st;
    if (out) for (int64_t i = 0; i < numel; i++) out[i] = (float)t[i];
    else for (int64_t i = 0; i < numel; i++) t[i] = (td_real)in[i];
    if (in && m->ops && (st = m->ops->upload(m, grads))) return st;
    return TD_OK;
}

td_status td_model_get_param(td_model *m, float *out, const char *name, int64_t numel) {
    if (m && !out) return td_fail(m, TD_ERR_ARG, "td_model_get_param: out is NULL");
    return copy_tensor(m, "td_model_get_param", m ? m->param_mem : NULL, name, out, NULL, numel);
}
td_status td_model_set_param(td_model *m, const char *name, const float *in, int64_t numel) {
    if (m && !in) return td_fail(m, TD_ERR_ARG, "td_model_set_param: in is NULL");
    return copy_tensor(m, "td_model_set_param", m ? m->param_mem : NULL, name, NULL, in, numel);
}
td_status td_model_get_grad(td_model *m, float *out, const char *name, int64_t numel) {
    if (m && !out) return td_fail(m, TD_ERR_ARG, "td_model_get_grad: out is NULL");
    return copy_tensor(m, "td_model_get_grad", m ? m->grad_mem : NULL, name, out, NULL, numel);
}
td_status td_model_set_grad(td_model *m, const char *name, const float *in, int64_t numel) {
    if (m && !in) return td_fail(m, TD_ERR_ARG, "td_model_set_grad: in is NULL");
    return copy_tensor(m, "td_model_set_grad", m ? m->grad_mem : NULL, name, NULL, in, numel);
}

td_status td_model_load_safetensors(td_model *m, const char *path) {
    REQUIRE_BUILT("td_model_load_safetensors");
    if (!path) return td_fail(m, TD_ERR_ARG, "td_model_load_safetensors: path is NULL");
    td_status st = td_load_safetensors(m, path);
    if (st == TD_OK && m->ops) st = m->ops->upload(m, 0);
    return st;
}

td_status td_model_save_safetensors(td_model *m, const char *path) {
    REQUIRE_BUILT("td_model_save_safetensors");
    if (!path) return td_fail(m, TD_ERR_ARG, "td_model_save_safetensors: path is NULL");
    td_status st = m->ops ? m->ops->download(m, 0) : TD_OK;
    return st ? st : td_save_safetensors(m, path, 0);
}

td_status td_model_save_grads_safetensors(td_model *m, const char *path) {
    REQUIRE_BUILT("td_model_save_grads_safetensors");
    if (!path) return td_fail(m, TD_ERR_ARG, "td_model_save_grads_safetensors: path is NULL");
    td_status st = m->ops ? m->ops->download(m, 1) : TD_OK;
    return st ? st : td_save_safetensors(m, path, 1);
}

td_status td_model_save_checkpoint(td_model *m, const char *path, int64_t data_position) {
    REQUIRE_BUILT("td_model_save_checkpoint");
    if (!path) return td_fail(m, TD_ERR_ARG, "td_model_save_checkpoint: path is NULL");
    if (data_position < 0)
        return td_fail(m, TD_ERR_ARG, "td_model_save_checkpoint: data_position=%lld must be >= 0", (long long)data_position);
    td_status st = m->ops ? m->ops->download(m, 0) : TD_OK;
    if (!st && m->ops) st = m->ops->opt_download(m);
    return st ? st : td_save_checkpoint(m, path, data_position);
}

td_status td_model_load_checkpoint(td_model *m, const char *path, int64_t *out_data_position) {
    REQUIRE_BUILT("td_model_load_checkpoint");
    if (!path) return td_fail(m, TD_ERR_ARG, "td_model_load_checkpoint: path is NULL");
    td_status st = td_load_checkpoint(m, path, out_data_position);
    if (!st && m->ops) st = m->ops->upload(m, 0);
    if (!st && m->ops) st = m->ops->opt_upload(m);
    return st;
}

/* the first tensor of a flat buffer holding a non-finite element among the first `elems`
 * elements; -1 when all are finite */
static int32_t first_nonfinite(const td_model *m, const td_real *buf, int64_t elems) {
    for (int32_t i = 0; i < m->nparams && (int64_t)m->params[i].offset < elems; i++) {
        const td_real *x = buf + m->params[i].offset;
        for (int64_t j = 0; j < m->params[i].numel; j++)
            if (!isfinite(x[j])) return i;
    }
    return -1;
}

td_status td_model_find_nonfinite(td_model *m, const char **out_name, int32_t *out_what) {
    REQUIRE_BUILT("td_model_find_nonfinite");
    if (!out_name || !out_what) return td_fail(m, TD_ERR_ARG, "td_model_find_nonfinite: NULL output");
    td_status st = m->ops ? m->ops->download(m, 1) : TD_OK;
    if (!st && m->ops) st = m->ops->download(m, 0);
    if (st) return st;
    *out_name = NULL, *out_what = 0;
    /* the gradients the global norm counts (a last stage's tied wte copy is the first stage's) */
    int32_t i = first_nonfinite(m, m->grad_mem, td_grad_norm_elems(m));
    if (i >= 0) return *out_name = m->params[i].name, *out_what = 1, TD_OK;
    if ((i = first_nonfinite(m, m->param_mem, (int64_t)m->total)) >= 0) *out_name = m->params[i].name, *out_what = 2;
    return TD_OK;
}

/* ---- passes ---------------------------------------------------------------------------------- */

static td_status check_ids(td_model *m, const char *fn, const char *what, const int32_t *ids,
                           int32_t B, int32_t T) {
    for (int32_t i = 0; i < B * T; i++)
        if (ids[i] < 0 || ids[i] >= m->vocab_size)
            return td_fail(m, TD_ERR_RANGE,
                           "%s: %s[%d, %d] = %d is outside [0, vocab_size=%lld). HINT: the data "
                           "was tokenized for another vocabulary",
                           fn, what, i / T, i % T, ids[i], (long long)m->vocab_size);
    return TD_OK;
}

static td_status check_shape(td_model *m, const char *fn, int32_t B, int32_t T) {
    if (B < 1 || B > m->batch_size)
        return td_fail(m, TD_ERR_ARG, "%s: B=%d is outside [1, batch_size=%lld]. HINT: set batch_size before td_model_build", fn, B, (long long)m->batch_size);
    if (T < 1 || T > m->seq_len)
        return td_fail(m, TD_ERR_ARG, "%s: T=%d is outside [1, seq_len=%lld]", fn, T, (long long)m->seq_len);
    return TD_OK;
}

/* The stage passes. dev = 0: in/out are host fp32 arrays (td_stage_forward / _backward, CPU
 * models only); dev = 1: buffers in the model's own memory and compute type (td_stage_*_dev). */
static td_status td_stage_forward_impl(td_model *m, void *out_BTC, double *out_loss, int32_t slot, const int32_t *tokens_BT, const void *in_BTC, const int32_t *targets_BT, int32_t B, int32_t T, int dev) {
    static const char *fn = "td_stage_forward";
    REQUIRE_BUILT("td_stage_forward");
    if (m->ops && !dev) return td_fail(m, TD_ERR_STATE, "%s: a %s model's stage passes take device buffers. HINT: td_stage_forward_dev", fn, m->ops->name);
    td_status st = check_shape(m, fn, B, T);
    if (st) return st;
    if (slot < 0 || slot >= m->slots)
        return td_fail(m, TD_ERR_ARG, "%s: slot %d outside [0, slots=%lld)", fn, slot, (long long)m->slots);
    td_slot *s = &m->slot[slot];
    if (s->state == 2)
        return td_fail(m, TD_ERR_STATE, "%s: slot %d still holds a micro-batch waiting for its weight-gradient (W) pass", fn, slot);
    if (m->has_embed) {
        if (!tokens_BT) return td_fail(m, TD_ERR_ARG, "%s: the first stage needs tokens", fn);
        if ((st = check_ids(m, fn, "tokens", tokens_BT, B, T))) return st;
    } else if (!in_BTC) {
        return td_fail(m, TD_ERR_ARG, "%s: stage %lld needs the previous stage's activations", fn, (long long)m->stage);
    }
    if (m->has_head && targets_BT && (st = check_ids(m, fn, "targets", targets_BT, B, T))) return st;
    if (!m->has_head && !out_BTC) return td_fail(m, TD_ERR_ARG, "%s: out_BTC is NULL on a stage without the head", fn);
    const double started = now_s();
    s->B = B, s->T = T;
    const int64_t n = (int64_t)B * T;
    const int with_targets = m->has_head && targets_BT;
    if (m->has_embed) memcpy(s->tokens, tokens_BT, sizeof(int32_t) * (size_t)n);
    if (with_targets) memcpy(s->targets, targets_BT, sizeof(int32_t) * (size_t)n);
    if (m->ops) {
        st = m->ops->stage_forward(m, slot, out_loss, with_targets, in_BTC, out_BTC);
        if (st) return st;
    } else {
        if (m->has_embed) {
        } else if (dev) memcpy(s->input, in_BTC, sizeof(td_real) * (size_t)(n * m->n_embd));
        else for (int64_t i = 0; i < n * m->n_embd; i++) s->input[i] = (td_real)((const float *)in_BTC)[i];
        double loss = 0.0;
        st = td_forward_slot(m, slot, NULL, &loss, with_targets);
        if (st) return st;
        if (with_targets && out_loss) *out_loss = loss;
        else if (with_targets) m->pending_loss += loss, m->pending_count++;
        if (!m->has_head) {
            const td_real *res = m->nl ? s->layers[m->nl - 1].res3 : s->input;
            if (dev) memcpy(out_BTC, res, sizeof(td_real) * (size_t)(n * m->n_embd));
            else for (int64_t i = 0; i < n * m->n_embd; i++) ((float *)out_BTC)[i] = (float)res[i];
        }
    }
    s->state = m->has_head && !targets_BT ? 0 : 1;
    slowdown(started);
    return TD_OK;
}

static td_status td_stage_backward_impl(td_model *m, void *din_BTC, int32_t slot, const void *dout_BTC, double grad_scale, int32_t part, int dev) {
    static const char *fn = "td_stage_backward";
    REQUIRE_BUILT("td_stage_backward");
    if (m->ops && !dev) return td_fail(m, TD_ERR_STATE, "%s: a %s model's stage passes take device buffers. HINT: td_stage_backward_dev", fn, m->ops->name);
    if (slot < 0 || slot >= m->slots)
        return td_fail(m, TD_ERR_ARG, "%s: slot %d outside [0, slots=%lld)", fn, slot, (long long)m->slots);
    if (part < TD_BWD_FULL || part > TD_BWD_WEIGHT)
        return td_fail(m, TD_ERR_ARG, "%s: part=%d is not TD_BWD_FULL, TD_BWD_INPUT or TD_BWD_WEIGHT", fn, part);
    if (part != TD_BWD_FULL && !m->split_backward)
        return td_fail(m, TD_ERR_STATE, "%s: a split backward (B then W) needs split_backward=1 at build", fn);
    td_slot *s = &m->slot[slot];
    int need = part == TD_BWD_WEIGHT ? 2 : 1;
    if (s->state != need)
        return td_fail(m, TD_ERR_STATE, "%s: slot %d is in state %d, %s needs %s", fn, slot, s->state,
                       part == TD_BWD_WEIGHT ? "W" : "a backward", need == 2 ? "a finished B" : "a finished forward (with targets on the last stage)");
    if (!m->has_head && !dout_BTC && part != TD_BWD_WEIGHT)
        return td_fail(m, TD_ERR_ARG, "%s: stage %lld needs the next stage's gradient dout_BTC", fn, (long long)m->stage);
    if (!isfinite(grad_scale)) return td_fail(m, TD_ERR_ARG, "%s: grad_scale=%g is not finite", fn, grad_scale);
    const double started = now_s();
    const int64_t n = (int64_t)s->B * s->T * m->n_embd;
    td_status st;
    if (m->ops) {
        st = m->ops->stage_backward(m, slot, grad_scale, part, dout_BTC, din_BTC);
        if (st) return st;
    } else {
        const td_real *dout = NULL;
        if (!m->has_head && part != TD_BWD_WEIGHT) { /* stage the input in td_real */
            if (dev) dout = (const td_real *)dout_BTC;
            else {
                td_real *tmp = m->scratch.dtmp;
                for (int64_t i = 0; i < n; i++) tmp[i] = (td_real)((const float *)dout_BTC)[i];
                dout = tmp;
            }
        }
        st = td_backward_slot(m, slot, grad_scale, part, dout);
        if (st) return st;
        if (part != TD_BWD_WEIGHT && din_BTC) {
            const td_real *g = td_input_grad(m, slot);
            if (dev) memcpy(din_BTC, g, sizeof(td_real) * (size_t)n);
            else for (int64_t i = 0; i < n; i++) ((float *)din_BTC)[i] = (float)g[i];
        }
    }
    s->state = part == TD_BWD_INPUT ? 2 : 0;
    slowdown(started);
    return TD_OK;
}

td_status td_stage_loss_sum(td_model *m, double *out_sum, int32_t *out_count) {
    REQUIRE_BUILT("td_stage_loss_sum");
    if (!out_sum) return td_fail(m, TD_ERR_ARG, "td_stage_loss_sum: out_sum is NULL");
    if (m->ops) return m->ops->loss_sum(m, out_sum, out_count);
    *out_sum = m->pending_loss;
    if (out_count) *out_count = m->pending_count;
    m->pending_loss = 0.0, m->pending_count = 0;
    return TD_OK;
}

td_status td_model_grad_data(td_model *m, void **out, const char *name, int64_t numel) {
    REQUIRE_BUILT("td_model_grad_data");
    if (!out) return td_fail(m, TD_ERR_ARG, "td_model_grad_data: out is NULL");
    td_param *p = NULL;
    td_status st = lookup(m, "td_model_grad_data", name, numel, &p);
    if (st) return st;
    if (m->ops) return m->ops->grad_data(m, out, p->offset);
    *out = m->grad_mem + p->offset;
    return TD_OK;
}

td_status td_model_stream(td_model *m, void **out_stream) {
    REQUIRE_BUILT("td_model_stream");
    if (!out_stream) return td_fail(m, TD_ERR_ARG, "td_model_stream: out_stream is NULL");
    *out_stream = m->ops ? m->ops->stream(m) : NULL;
    return TD_OK;
}

static td_status td_model_forward_impl(td_model *m, float *logits_BTV, double *out_loss, const int32_t *tokens_BT, const int32_t *targets_BT, int32_t B, int32_t T) {
    static const char *fn = "td_model_forward";
    REQUIRE_BUILT("td_model_forward");
    if (m->stages != 1) return td_fail(m, TD_ERR_STATE, "%s: the model is stage %lld of %lld; use td_stage_forward", fn, (long long)m->stage, (long long)m->stages);
    td_status st = check_shape(m, fn, B, T);
    if (st) return st;
    if (!tokens_BT) return td_fail(m, TD_ERR_ARG, "%s: tokens is NULL", fn);
    if ((st = check_ids(m, fn, "tokens", tokens_BT, B, T))) return st;
    if (targets_BT && (st = check_ids(m, fn, "targets", targets_BT, B, T))) return st;
    if (m->slot[0].state == 2) return td_fail(m, TD_ERR_STATE, "%s: slot 0 awaits a W pass", fn);
    td_slot *s = &m->slot[0];
    s->B = B, s->T = T;
    memcpy(s->tokens, tokens_BT, sizeof(int32_t) * (size_t)B * T);
    if (targets_BT) memcpy(s->targets, targets_BT, sizeof(int32_t) * (size_t)B * T);
    st = m->ops ? m->ops->forward(m, logits_BTV, out_loss, targets_BT != NULL)
                : td_forward_slot(m, 0, logits_BTV, out_loss, targets_BT != NULL);
    s->state = targets_BT ? 1 : 0;
    return st;
}

td_status td_model_zero_grad(td_model *m) {
    REQUIRE_BUILT("td_model_zero_grad");
    if (m->ops) return m->ops->zero_grad(m); /* the host copy is refreshed on download */
    memset(m->grad_mem, 0, sizeof(td_real) * m->total);
    return TD_OK;
}

static td_status td_model_forward_backward_impl(td_model *m, double *out_loss, const int32_t *tokens_BT, const int32_t *targets_BT, int32_t B, int32_t T, double grad_scale) {
    static const char *fn = "td_model_forward_backward";
    REQUIRE_BUILT("td_model_forward_backward");
    if (!targets_BT) return td_fail(m, TD_ERR_ARG, "%s: targets is NULL", fn);
    const double started = now_s();
    td_status st = td_model_forward_impl(m, NULL, out_loss, tokens_BT, targets_BT, B, T);
    if (st) return st;
    if (!isfinite(grad_scale)) return td_fail(m, TD_ERR_ARG, "%s: grad_scale=%g is not finite", fn, grad_scale);
    st = m->ops ? m->ops->backward(m, grad_scale) : td_backward_slot(m, 0, grad_scale, TD_BWD_FULL, NULL);
    m->slot[0].state = 0;
    slowdown(started);
    return st;
}

td_status td_model_grad_sq_sum(td_model *m, double *out) {
    REQUIRE_BUILT("td_model_grad_sq_sum");
    if (!out) return td_fail(m, TD_ERR_ARG, "td_model_grad_sq_sum: out is NULL");
    if (m->ops) return m->ops->grad_sq_sum(m, out);
    *out = td_grad_sq_sum_local(m);
    return TD_OK;
}

static td_status td_model_optimizer_step_with_norm_impl(td_model *m, double grad_norm) {
    REQUIRE_BUILT("td_model_optimizer_step_with_norm");
    if (!(grad_norm >= 0) || !isfinite(grad_norm)) {
        const char *name = NULL;
        int32_t what = 0;
        td_model_find_nonfinite(m, &name, &what); /* failure path only: names the culprit */
        char found[TD_MAX_NAME + 64] = "";
        if (name) snprintf(found, sizeof found, "; first non-finite %s on stage %lld: '%s'", what == 1 ? "gradient" : "parameter", (long long)m->stage, name);
        return td_fail(m, TD_ERR_ARG, "td_model_optimizer_step_with_norm: grad_norm=%g is not a finite non-negative number (step %lld)%s. HINT: a NaN or inf gradient; lower the learning rate or enable grad_clip", grad_norm, (long long)m->step, found);
    }
    if (m->ops) return m->ops->adamw(m, grad_norm);
    td_adamw(m, grad_norm);
    return TD_OK;
}

td_status td_model_optimizer_step(td_model *m, double *out_grad_norm) {
    REQUIRE_BUILT("td_model_optimizer_step");
    if (m->stages != 1)
        return td_fail(m, TD_ERR_STATE, "td_model_optimizer_step: stage %lld of %lld: the global norm spans every stage. HINT: use td_model_optimizer_step_with_norm", (long long)m->stage, (long long)m->stages);
    double sq = 0.0;
    td_status st = td_model_grad_sq_sum(m, &sq);
    if (st) return st;
    double norm = sqrt(sq);
    if (out_grad_norm) *out_grad_norm = norm;
    return td_model_optimizer_step_with_norm(m, norm);
}

/* ---- public entry points of the passes: FP environment around the work --------------------- */

td_status td_stage_forward(td_model *m, float *out_BTC, double *out_loss, int32_t slot, const int32_t *tokens_BT, const float *in_BTC, const int32_t *targets_BT, int32_t B, int32_t T) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_stage_forward_impl(m, out_BTC, out_loss, slot, tokens_BT, in_BTC, targets_BT, B, T, 0);
    td_fp_leave(fp);
    return st;
}

td_status td_stage_backward(td_model *m, float *din_BTC, int32_t slot, const float *dout_BTC, double grad_scale, int32_t part) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_stage_backward_impl(m, din_BTC, slot, dout_BTC, grad_scale, part, 0);
    td_fp_leave(fp);
    return st;
}

td_status td_stage_forward_dev(td_model *m, void *out_BTC, double *out_loss, int32_t slot, const int32_t *tokens_BT, const void *in_BTC, const int32_t *targets_BT, int32_t B, int32_t T) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_stage_forward_impl(m, out_BTC, out_loss, slot, tokens_BT, in_BTC, targets_BT, B, T, 1);
    td_fp_leave(fp);
    return st;
}

td_status td_stage_backward_dev(td_model *m, void *din_BTC, int32_t slot, const void *dout_BTC, double grad_scale, int32_t part) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_stage_backward_impl(m, din_BTC, slot, dout_BTC, grad_scale, part, 1);
    td_fp_leave(fp);
    return st;
}

td_status td_model_forward(td_model *m, float *logits_BTV, double *out_loss, const int32_t *tokens_BT, const int32_t *targets_BT, int32_t B, int32_t T) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_model_forward_impl(m, logits_BTV, out_loss, tokens_BT, targets_BT, B, T);
    td_fp_leave(fp);
    return st;
}

td_status td_model_forward_backward(td_model *m, double *out_loss, const int32_t *tokens_BT, const int32_t *targets_BT, int32_t B, int32_t T, double grad_scale) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_model_forward_backward_impl(m, out_loss, tokens_BT, targets_BT, B, T, grad_scale);
    td_fp_leave(fp);
    return st;
}

td_status td_model_optimizer_step_with_norm(td_model *m, double grad_norm) {
    const unsigned fp = td_fp_enter(m);
    td_status st = td_model_optimizer_step_with_norm_impl(m, grad_norm);
    td_fp_leave(fp);
    return st;
}
