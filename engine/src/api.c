/* api.c — the public ABI of tandem.h, its model-facing half: errors, version, the FP environment,
 * and a handle's life (create, configuration keys, build, free). The parameter table and files
 * are api_params.c's, the passes api_passes.c's. Every failure returns a status and leaves a
 * message on the handle ("function: what, the values. HINT: what to do"); nothing here exits or
 * aborts.
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
 * the CPU (llama_model.c), any stage, whole or split backward. */
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
    return TD_OK; /* both backends (the CUDA one: engine/cuda/llama_*.cu) */
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
