/* checkpoint.c — training checkpoints: a stage's parameters, AdamW's moments and the step in
 * one safetensors file (written with safetensors.c's writer), and their load, which checks the
 * whole file (format, settings, every tensor's dtype, shape and offsets) before the model's
 * state changes. A bad file is an error with the file name and the numbers, never a crash.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "safetensors.h"

/* ---- training checkpoints -------------------------------------------------------------------- */

/* A checkpoint is one safetensors file per stage: every parameter under its table name, AdamW's
 * first and second moments under "adamw.m.<name>" and "adamw.v.<name>", all in the engine's real
 * type (F32; F64 in the float64 build), and a __metadata__ table holding the format, its version,
 * the optimizer step, the caller's data position and every setting the state depends on (the
 * model shape, the stage's place, the optimizer's hyper-parameters), which a load must match. */
#define TD_CKPT_FORMAT "tandem-checkpoint"
#define TD_CKPT_NKEYS 18

typedef struct {
    char key[32];
    char value[64];
} st_meta;

/* The settings a checkpoint must agree on, as the strings the file stores ("%.17g" for floats:
 * they read back to the same double). */
static int ckpt_settings(const td_model *m, st_meta *out) {
    int n = 0;
    snprintf(out[n].key, 32, "format"), snprintf(out[n++].value, 64, "%s", TD_CKPT_FORMAT);
    snprintf(out[n].key, 32, "format_version"), snprintf(out[n++].value, 64, "%d", TD_CHECKPOINT_VERSION);
    snprintf(out[n].key, 32, "dtype"), snprintf(out[n++].value, 64, "%s", sizeof(td_real) == 8 ? "F64" : "F32");
    struct { const char *k; int64_t v; } ints[] = {
        {"n_layer", m->n_layer}, {"n_embd", m->n_embd}, {"n_head", m->n_head},
        {"vocab_size", m->vocab_size}, {"n_positions", m->n_positions}, {"stage", m->stage},
        {"stages", m->stages}, {"layer_begin", m->layer_begin}, {"layer_end", m->layer_end}};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        snprintf(out[n].key, 32, "%s", ints[i].k), snprintf(out[n++].value, 64, "%lld", (long long)ints[i].v);
    struct { const char *k; double v; } fl[] = {
        {"lr", m->lr}, {"beta1", m->beta1}, {"beta2", m->beta2}, {"eps", m->eps},
        {"weight_decay", m->weight_decay}, {"grad_clip", m->grad_clip}};
    for (size_t i = 0; i < sizeof fl / sizeof fl[0]; i++)
        snprintf(out[n].key, 32, "%s", fl[i].k), snprintf(out[n++].value, 64, "%.17g", fl[i].v);
    return n;
}

static const char *CKPT_PREFIX[3] = {"", "adamw.m.", "adamw.v."};

td_status td_save_checkpoint(td_model *m, const char *path, int64_t data_position) {
    static const char *fn = "td_model_save_checkpoint";
    st_meta set[TD_CKPT_NKEYS];
    const int ns = ckpt_settings(m, set);
    char meta[2048];
    size_t len = (size_t)snprintf(meta, sizeof meta, "\"step\":\"%lld\",\"data_position\":\"%lld\"",
                                  (long long)m->step, (long long)data_position);
    for (int i = 0; i < ns && len < sizeof meta; i++)
        len += (size_t)snprintf(meta + len, sizeof meta - len, ",\"%s\":\"%s\"", set[i].key, set[i].value);
    const int n = 3 * m->nparams;
    st_out *t = malloc(sizeof(st_out) * (size_t)(n ? n : 1));
    if (!t) return td_fail(m, TD_ERR_NOMEM, "%s: out of memory", fn);
    td_real *bufs[3] = {m->param_mem, m->m_mem, m->v_mem};
    for (int k = 0; k < 3; k++)
        for (int32_t i = 0; i < m->nparams; i++)
            t[k * m->nparams + i] = (st_out){CKPT_PREFIX[k], &m->params[i], bufs[k] + m->params[i].offset};
    td_status st = td_st_write(m, fn, path, t, n, meta, sizeof(td_real) == 8, 1);
    free(t);
    return st;
}

/* Parses a checkpoint's header: its tensors (into *out_entries, malloc'd) and its __metadata__
 * (string values only, into meta). Messages start with `fn`. */
static td_status ckpt_header(td_model *m, const char *fn, const char *path, const unsigned char *buf,
                             long fsize, st_entry **out_entries, int *out_n, st_meta *meta,
                             int *out_nmeta, int64_t *out_data_size, int64_t *out_data_start) {
    *out_entries = NULL, *out_n = 0, *out_nmeta = 0;
    if (fsize < 8)
        return td_fail(m, TD_ERR_FORMAT, "%s: '%s' is %ld bytes, too short for a safetensors file (8-byte header length first). HINT: the file is truncated; resume from an earlier checkpoint", fn, path, fsize);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | buf[i];
    if (hlen == 0 || hlen > (uint64_t)(fsize - 8))
        return td_fail(m, TD_ERR_FORMAT, "%s: '%s' declares a %llu-byte header but the file has %ld bytes after the length. HINT: the file is truncated; resume from an earlier checkpoint", fn, path, (unsigned long long)hlen, fsize - 8);
    *out_data_start = 8 + (int64_t)hlen;
    *out_data_size = (int64_t)((uint64_t)fsize - 8 - hlen);
    jreader r = {(const char *)buf + 8, (const char *)buf + 8 + hlen, {0}, (const char *)buf + 8};
    int cap = 64, n = 0, nmeta = 0;
    st_entry *entries = calloc((size_t)cap, sizeof(st_entry));
    if (!entries || !td_json_expect(&r, '{')) goto bad;
    td_json_ws(&r);
    if (r.s < r.end && *r.s == '}') r.s++;
    else for (;;) {
        char key[TD_MAX_NAME * 2];
        if (!td_json_string(&r, key, sizeof key) || !td_json_expect(&r, ':')) goto bad;
        if (!strcmp(key, "__metadata__")) {
            if (!td_json_expect(&r, '{')) goto bad;
            td_json_ws(&r);
            if (r.s < r.end && *r.s == '}') r.s++;
            else for (;;) {
                st_meta kv;
                if (!td_json_string(&r, kv.key, sizeof kv.key) || !td_json_expect(&r, ':') || !td_json_string(&r, kv.value, sizeof kv.value)) goto bad;
                if (nmeta < 64) meta[nmeta++] = kv;
                td_json_ws(&r);
                if (r.s < r.end && *r.s == ',') { r.s++; continue; }
                if (!td_json_expect(&r, '}')) goto bad;
                break;
            }
        } else {
            if (n == cap) {
                st_entry *grown = realloc(entries, sizeof(st_entry) * (size_t)(cap *= 2));
                if (!grown) goto bad;
                entries = grown;
            }
            memset(&entries[n], 0, sizeof(st_entry));
            snprintf(entries[n].name, sizeof entries[n].name, "%s", key);
            if (!td_st_parse_entry(&r, &entries[n])) goto bad;
            n++;
        }
        td_json_ws(&r);
        if (r.s < r.end && *r.s == ',') { r.s++; continue; }
        if (!td_json_expect(&r, '}')) goto bad;
        break;
    }
    *out_entries = entries, *out_n = n, *out_nmeta = nmeta;
    return TD_OK;
bad:
    free(entries);
    return td_fail(m, TD_ERR_FORMAT, "%s: '%s' has a malformed JSON header: %s. HINT: the file is corrupt or not a checkpoint", fn, path, r.err[0] ? r.err : "out of memory");
}

static const char *meta_get(const st_meta *meta, int n, const char *key) {
    for (int i = 0; i < n; i++)
        if (!strcmp(meta[i].key, key)) return meta[i].value;
    return NULL;
}

static int parse_count(const char *s, int64_t *out) {
    char *e;
    errno = 0;
    long long v = s ? strtoll(s, &e, 10) : -1;
    if (!s || e == s || *e || errno || v < 0) return 0;
    *out = v;
    return 1;
}

td_status td_load_checkpoint(td_model *m, const char *path, int64_t *out_data_position) {
    static const char *fn = "td_model_load_checkpoint";
    FILE *f = fopen(path, "rb");
    if (!f) return td_fail(m, TD_ERR_IO, "%s: cannot open '%s': %s", fn, path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long fsize = ftell(f);
    fseek(f, 0, SEEK_SET);
    td_status st = TD_OK;
    unsigned char *buf = NULL;
    st_entry *entries = NULL;
    int *source = NULL;
    int n = 0, nmeta = 0;
    st_meta meta[64];
    if (fsize < 0) st = td_fail(m, TD_ERR_IO, "%s: cannot size '%s': %s", fn, path, strerror(errno));
    else if (!(buf = malloc(fsize ? (size_t)fsize : 1))) st = td_fail(m, TD_ERR_NOMEM, "%s: cannot allocate %ld bytes for '%s'", fn, fsize, path);
    else if (fread(buf, 1, (size_t)fsize, f) != (size_t)fsize) st = td_fail(m, TD_ERR_IO, "%s: short read on '%s'", fn, path);
    fclose(f);
    int64_t data_size = 0, data_start = 0, step = 0, data_position = 0;
    if (!st) st = ckpt_header(m, fn, path, buf, fsize, &entries, &n, meta, &nmeta, &data_size, &data_start);
    if (st) goto out;
    /* the settings first: a checkpoint of another model or stage is refused by name */
    const char *format = meta_get(meta, nmeta, "format");
    if (!format || strcmp(format, TD_CKPT_FORMAT)) {
        st = td_fail(m, TD_ERR_FORMAT, "%s: '%s' is not a training checkpoint (__metadata__ format is %s%s%s, expected '%s'). HINT: weights alone load with td_model_load_safetensors", fn, path,
                     format ? "'" : "", format ? format : "missing", format ? "'" : "", TD_CKPT_FORMAT);
        goto out;
    }
    st_meta want[TD_CKPT_NKEYS];
    const int nw = ckpt_settings(m, want);
    for (int i = 1; i < nw; i++) {
        const char *got = meta_get(meta, nmeta, want[i].key);
        if (!got || strcmp(got, want[i].value)) {
            st = td_fail(m, TD_ERR_CONFIG, "%s: '%s' was written for %s=%s, this model has %s=%s. HINT: resume with the configuration (model, stage layout, optimizer) the checkpoint was written with", fn, path,
                         want[i].key, got ? got : "(missing)", want[i].key, want[i].value);
            goto out;
        }
    }
    if (!parse_count(meta_get(meta, nmeta, "step"), &step) || !parse_count(meta_get(meta, nmeta, "data_position"), &data_position)) {
        st = td_fail(m, TD_ERR_FORMAT, "%s: '%s' has step=%s, data_position=%s in its __metadata__; both must be non-negative integers", fn, path,
                     meta_get(meta, nmeta, "step") ? meta_get(meta, nmeta, "step") : "(missing)",
                     meta_get(meta, nmeta, "data_position") ? meta_get(meta, nmeta, "data_position") : "(missing)");
        goto out;
    }
    /* then every tensor: parameters, m and v of each, with the table's shapes, inside the data */
    const int need = 3 * m->nparams;
    source = malloc(sizeof(int) * (size_t)(need ? need : 1));
    if (!source) { st = td_fail(m, TD_ERR_NOMEM, "%s: out of memory", fn); goto out; }
    const char *real = sizeof(td_real) == 8 ? "F64" : "F32";
    const int es = (int)sizeof(td_real);
    for (int k = 0; k < need; k++) {
        const td_param *p = &m->params[k % (m->nparams ? m->nparams : 1)];
        char name[TD_MAX_NAME * 2];
        snprintf(name, sizeof name, "%s%s", CKPT_PREFIX[k / m->nparams], p->name);
        int found = -1;
        for (int i = 0; i < n && found < 0; i++)
            if (!strcmp(entries[i].name, name)) found = i;
        char want_shape[96];
        td_st_shape_str(want_shape, sizeof want_shape, p->ndim, p->shape);
        if (found < 0) {
            st = td_fail(m, TD_ERR_FORMAT, "%s: '%s' lacks tensor '%s' (expected %s %s). HINT: the file is not a complete checkpoint of this stage", fn, path, name, real, want_shape);
            goto out;
        }
        const st_entry *e = &entries[found];
        int same = e->ndim == p->ndim && !strcmp(e->dtype, real);
        for (int d = 0; same && d < p->ndim; d++) same = e->shape[d] == p->shape[d];
        if (!same) {
            char got[96];
            td_st_shape_str(got, sizeof got, e->ndim, e->shape);
            st = td_fail(m, TD_ERR_FORMAT, "%s: '%s' tensor '%s' is %s %s, the model expects %s %s", fn, path, name, e->dtype, got, real, want_shape);
            goto out;
        }
        if (e->begin < 0 || e->end < e->begin || e->end > data_size || e->end - e->begin != p->numel * es) {
            st = td_fail(m, TD_ERR_FORMAT, "%s: '%s' is truncated or corrupt: tensor '%s' has data_offsets [%lld, %lld] but the data section holds %lld bytes and the tensor needs %lld. HINT: resume from an earlier checkpoint", fn, path, name,
                         (long long)e->begin, (long long)e->end, (long long)data_size, (long long)(p->numel * es));
            goto out;
        }
        source[k] = found;
    }
    if (n != need) {
        st = td_fail(m, TD_ERR_FORMAT, "%s: '%s' holds %d tensors, a checkpoint of this stage has %d (parameters, adamw.m.*, adamw.v.*). HINT: the file belongs to another stage or model", fn, path, n, need);
        goto out;
    }
    /* all checked: only now the model's state changes */
    td_real *bufs[3] = {m->param_mem, m->m_mem, m->v_mem};
    for (int k = 0; k < need; k++) {
        const td_param *p = &m->params[k % m->nparams];
        memcpy(bufs[k / m->nparams] + p->offset, buf + data_start + entries[source[k]].begin, (size_t)p->numel * sizeof(td_real));
    }
    m->step = step;
    if (out_data_position) *out_data_position = data_position;
out:
    free(buf);
    free(entries);
    free(source);
    return st;
}
