/* io.c — bytes in and out of files: safetensors weights and token shards.
 *
 * Every header field is checked before it is trusted (lengths, offsets inside the file, dtype,
 * shapes against the parameter table); a bad file is an error with the file name, the tensor and
 * the numbers, never a crash. Not here: the layout of tensors in memory (model.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* ---- a minimal JSON reader for safetensors headers -------------------------------------------- */

typedef struct {
    const char *s, *end;
    char err[200];
    const char *base; /* the header's first byte: positions in messages count from here */
} jreader;

static void jws(jreader *r) {
    while (r->s < r->end && (*r->s == ' ' || *r->s == '\n' || *r->s == '\r' || *r->s == '\t'))
        r->s++;
}

static int jexpect(jreader *r, char c) {
    jws(r);
    if (r->s >= r->end || *r->s != c) {
        snprintf(r->err, sizeof r->err, "expected '%c' at header byte %ld", c,
                 (long)(r->s - r->base));
        return 0;
    }
    r->s++;
    return 1;
}

/* Reads a string into out (truncated to cap - 1; returns 0 on malformed input). */
static int jstring(jreader *r, char *out, size_t cap) {
    jws(r);
    if (r->s >= r->end || *r->s != '"') {
        snprintf(r->err, sizeof r->err, "expected a string");
        return 0;
    }
    r->s++;
    size_t n = 0;
    while (r->s < r->end && *r->s != '"') {
        char c = *r->s++;
        if (c == '\\') {
            if (r->s >= r->end) break;
            char e = *r->s++;
            if (e == 'u') { /* keep escapes of non-ASCII names as '?' */
                if (r->end - r->s < 4) break;
                r->s += 4;
                c = '?';
            } else {
                c = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e == 'b' ? '\b'
                  : e == 'f' ? '\f' : e;
            }
        }
        if (n + 1 < cap) out[n++] = c;
    }
    if (r->s >= r->end) {
        snprintf(r->err, sizeof r->err, "unterminated string");
        return 0;
    }
    r->s++;
    if (cap) out[n] = 0;
    return 1;
}

static int jint(jreader *r, int64_t *out) {
    jws(r);
    /* the header is not NUL-terminated: strtoll reads a bounded, terminated copy */
    char digits[32];
    size_t n = 0;
    while (n + 1 < sizeof digits && r->s + n < r->end &&
           ((r->s[n] >= '0' && r->s[n] <= '9') || (n == 0 && r->s[n] == '-')))
        n++;
    memcpy(digits, r->s, n);
    digits[n] = 0;
    char *e;
    errno = 0;
    long long v = strtoll(digits, &e, 10);
    if (e == digits || errno) {
        snprintf(r->err, sizeof r->err, "expected an integer at header byte %ld, got '%.20s'",
                 (long)(r->s - r->base), digits);
        return 0;
    }
    r->s += e - digits;
    *out = v;
    return 1;
}

static int jskip(jreader *r, int depth) {
    jws(r);
    if (depth > 32 || r->s >= r->end) {
        snprintf(r->err, sizeof r->err, "nesting too deep or truncated header");
        return 0;
    }
    char c = *r->s;
    if (c == '"') {
        char tmp[1];
        return jstring(r, tmp, 0);
    }
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        r->s++;
        jws(r);
        if (r->s < r->end && *r->s == close) return r->s++, 1;
        for (;;) {
            if (c == '{') {
                char tmp[1];
                if (!jstring(r, tmp, 0) || !jexpect(r, ':')) return 0;
            }
            if (!jskip(r, depth + 1)) return 0;
            jws(r);
            if (r->s < r->end && *r->s == ',') { r->s++; continue; }
            return jexpect(r, close);
        }
    }
    while (r->s < r->end && *r->s != ',' && *r->s != '}' && *r->s != ']') r->s++;
    return 1;
}

/* ---- safetensors ----------------------------------------------------------------------------- */

typedef struct {
    char name[TD_MAX_NAME * 2];
    char dtype[16];
    int32_t ndim;
    int64_t shape[8];
    int64_t begin, end;
} st_entry;

static int dtype_size(const char *d) {
    if (!strcmp(d, "F32")) return 4;
    if (!strcmp(d, "F16") || !strcmp(d, "BF16")) return 2;
    if (!strcmp(d, "F64")) return 8;
    return 0;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) bits = sign | 0x7f800000u | (man << 13);
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static double element_at(const unsigned char *p, const char *dtype) {
    if (!strcmp(dtype, "F32")) { float f; memcpy(&f, p, 4); return f; }
    if (!strcmp(dtype, "F64")) { double d; memcpy(&d, p, 8); return d; }
    uint16_t h;
    memcpy(&h, p, 2);
    if (!strcmp(dtype, "F16")) return half_to_float(h);
    uint32_t bits = (uint32_t)h << 16; /* BF16 */
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void shape_str(char *out, size_t cap, int32_t ndim, const int64_t *shape) {
    size_t n = (size_t)snprintf(out, cap, "(");
    for (int d = 0; d < ndim && n < cap; d++)
        n += (size_t)snprintf(out + n, cap - n, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (n < cap) snprintf(out + n, cap - n, ndim == 1 ? ",)" : ")");
}

static int parse_entry(jreader *r, st_entry *e) {
    if (!jexpect(r, '{')) return 0;
    int have_dtype = 0, have_shape = 0, have_off = 0;
    jws(r);
    if (r->s < r->end && *r->s == '}') { r->s++; goto done; }
    for (;;) {
        char key[32];
        if (!jstring(r, key, sizeof key) || !jexpect(r, ':')) return 0;
        if (!strcmp(key, "dtype")) {
            if (!jstring(r, e->dtype, sizeof e->dtype)) return 0;
            have_dtype = 1;
        } else if (!strcmp(key, "shape") || !strcmp(key, "data_offsets")) {
            int is_shape = key[0] == 's';
            if (!jexpect(r, '[')) return 0;
            int n = 0;
            int64_t vals[8];
            jws(r);
            if (r->s < r->end && *r->s == ']') r->s++;
            else for (;;) {
                if (n >= 8) { snprintf(r->err, sizeof r->err, "more than 8 dimensions"); return 0; }
                if (!jint(r, &vals[n++])) return 0;
                jws(r);
                if (r->s < r->end && *r->s == ',') { r->s++; continue; }
                if (!jexpect(r, ']')) return 0;
                break;
            }
            if (is_shape) {
                e->ndim = n;
                memcpy(e->shape, vals, sizeof(int64_t) * (size_t)n);
                have_shape = 1;
            } else {
                if (n != 2) { snprintf(r->err, sizeof r->err, "data_offsets needs 2 values"); return 0; }
                e->begin = vals[0];
                e->end = vals[1];
                have_off = 1;
            }
        } else if (!jskip(r, 1)) return 0;
        jws(r);
        if (r->s < r->end && *r->s == ',') { r->s++; continue; }
        if (!jexpect(r, '}')) return 0;
        break;
    }
done:
    if (!have_dtype || !have_shape || !have_off) {
        snprintf(r->err, sizeof r->err, "tensor '%s' lacks %s", e->name,
                 !have_dtype ? "dtype" : !have_shape ? "shape" : "data_offsets");
        return 0;
    }
    return 1;
}

/* Maps a file's tensor name to the table's: strips "transformer."; returns 0 for tolerated
 * buffers that carry no parameter (the attention masks of public GPT-2 files). */
static int canonical_name(char *out, size_t cap, const char *name) {
    const char *n = strncmp(name, "transformer.", 12) == 0 ? name + 12 : name;
    size_t len = strlen(n);
    static const char *tolerated[2] = {".attn.bias", ".attn.masked_bias"};
    for (int i = 0; i < 2; i++) {
        size_t k = strlen(tolerated[i]);
        if (len > k && !strcmp(n + len - k, tolerated[i])) return 0;
    }
    snprintf(out, cap, "%s", n);
    return 1;
}

td_status td_load_safetensors(td_model *m, const char *path) {
    unsigned char *buf = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return td_fail(m, TD_ERR_IO, "td_model_load_safetensors: cannot open '%s': %s", path,
                       strerror(errno));
    fseek(f, 0, SEEK_END);
    long fsize = ftell(f);
    fseek(f, 0, SEEK_SET);
    td_status st = TD_OK;
    if (fsize < 0) {
        st = td_fail(m, TD_ERR_IO, "td_model_load_safetensors: cannot size '%s': %s", path, strerror(errno));
    } else if (!(buf = malloc(fsize ? (size_t)fsize : 1))) {
        st = td_fail(m, TD_ERR_NOMEM, "td_model_load_safetensors: cannot allocate %ld bytes for '%s'", fsize, path);
    } else if (fread(buf, 1, (size_t)fsize, f) != (size_t)fsize) {
        st = td_fail(m, TD_ERR_IO, "td_model_load_safetensors: short read on '%s'", path);
    }
    fclose(f);
    if (!st) st = td_load_safetensors_mem(m, path, buf, (size_t)fsize);
    free(buf);
    return st;
}

td_status td_load_safetensors_mem(td_model *m, const char *path, const unsigned char *buf,
                                  size_t size) {
    td_status st = TD_OK;
    st_entry *entries = NULL;
    char *seen = NULL;
    int *source = NULL; /* table index -> entry index */
    const long fsize = (long)size;
    if (fsize < 8) {
        st = td_fail(m, TD_ERR_FORMAT,
                     "td_model_load_safetensors: '%s' is %ld bytes, too short for a safetensors "
                     "file (8-byte header length first). HINT: the file is truncated or not "
                     "safetensors",
                     path, fsize);
        goto out;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | buf[i];
    if (hlen == 0 || hlen > (uint64_t)(fsize - 8)) {
        st = td_fail(m, TD_ERR_FORMAT,
                     "td_model_load_safetensors: '%s' declares a %llu-byte header but the file "
                     "has %ld bytes after the length. HINT: truncated or not a safetensors file",
                     path, (unsigned long long)hlen, fsize - 8);
        goto out;
    }
    const unsigned char *data = buf + 8 + hlen;
    const int64_t data_size = (int64_t)((uint64_t)fsize - 8 - hlen);
    jreader r = {(const char *)buf + 8, (const char *)buf + 8 + hlen, {0}, (const char *)buf + 8};
    int cap = 64, n = 0;
    entries = calloc((size_t)cap, sizeof(st_entry));
    if (!entries || !jexpect(&r, '{')) goto bad_json;
    jws(&r);
    if (r.s < r.end && *r.s == '}') r.s++;
    else for (;;) {
        char key[TD_MAX_NAME * 2];
        if (!jstring(&r, key, sizeof key) || !jexpect(&r, ':')) goto bad_json;
        if (!strcmp(key, "__metadata__")) {
            if (!jskip(&r, 1)) goto bad_json;
        } else {
            if (n == cap) {
                st_entry *grown = realloc(entries, sizeof(st_entry) * (size_t)(cap *= 2));
                if (!grown) goto bad_json;
                entries = grown;
            }
            memset(&entries[n], 0, sizeof(st_entry));
            snprintf(entries[n].name, sizeof entries[n].name, "%s", key);
            if (!parse_entry(&r, &entries[n])) goto bad_json;
            n++;
        }
        jws(&r);
        if (r.s < r.end && *r.s == ',') { r.s++; continue; }
        if (!jexpect(&r, '}')) goto bad_json;
        break;
    }

    /* Validate every entry and find every tensor first; copy only when the whole file is good,
     * so a failed load leaves the model's parameters as they were. */
    seen = calloc((size_t)(m->nparams ? m->nparams : 1), 1);
    source = calloc((size_t)(m->nparams ? m->nparams : 1), sizeof(int));
    if (!seen || !source) { st = td_fail(m, TD_ERR_NOMEM, "td_model_load_safetensors: out of memory"); goto out; }
    for (int i = 0; i < n; i++) {
        st_entry *e = &entries[i];
        char name[TD_MAX_NAME * 2];
        if (!canonical_name(name, sizeof name, e->name)) continue;
        int es = dtype_size(e->dtype);
        if (!es) {
            st = td_fail(m, TD_ERR_FORMAT,
                         "td_model_load_safetensors: '%s' tensor '%s' has dtype %s. HINT: "
                         "supported dtypes are F32, F64, F16 and BF16",
                         path, e->name, e->dtype);
            goto out;
        }
        int64_t numel = 1;
        for (int d = 0; d < e->ndim; d++) {
            if (e->shape[d] < 0 || (e->shape[d] && numel > INT64_MAX / e->shape[d])) {
                st = td_fail(m, TD_ERR_FORMAT, "td_model_load_safetensors: '%s' tensor '%s' has an invalid shape", path, e->name);
                goto out;
            }
            numel *= e->shape[d];
        }
        if (numel > INT64_MAX / es) {
            st = td_fail(m, TD_ERR_FORMAT, "td_model_load_safetensors: '%s' tensor '%s' has %lld elements of %d bytes, more than a file can hold. HINT: the header is corrupt", path, e->name, (long long)numel, es);
            goto out;
        }
        if (e->begin < 0 || e->end < e->begin || e->end > data_size ||
            e->end - e->begin != numel * es) {
            st = td_fail(m, TD_ERR_FORMAT,
                         "td_model_load_safetensors: '%s' tensor '%s' has data_offsets [%lld, %lld] "
                         "but the data section holds %lld bytes and the tensor needs %lld. HINT: "
                         "the file is truncated or its header is corrupt",
                         path, e->name, (long long)e->begin, (long long)e->end,
                         (long long)data_size, (long long)(numel * es));
            goto out;
        }
        if (!td_full_model_has(m, name)) {
            st = td_fail(m, TD_ERR_FORMAT,
                         "td_model_load_safetensors: '%s' holds tensor '%s', which is not in the "
                         "model's parameter table (n_layer=%lld). HINT: the file belongs to another "
                         "model configuration",
                         path, e->name, (long long)m->n_layer);
            goto out;
        }
        td_param *p = td_find_param(m, name);
        if (!p) continue; /* another stage's tensor */
        int same = e->ndim == p->ndim;
        for (int d = 0; same && d < p->ndim; d++) same = e->shape[d] == p->shape[d];
        if (!same) {
            char got[96], want[96];
            shape_str(got, sizeof got, e->ndim, e->shape);
            shape_str(want, sizeof want, p->ndim, p->shape);
            st = td_fail(m, TD_ERR_FORMAT,
                         "td_model_load_safetensors: '%s' tensor '%s' has shape %s, the model "
                         "expects %s. HINT: check n_embd, vocab_size and n_positions",
                         path, e->name, got, want);
            goto out;
        }
        int idx = (int)(p - m->params);
        if (seen[idx]) {
            st = td_fail(m, TD_ERR_FORMAT, "td_model_load_safetensors: '%s' holds '%s' twice", path, name);
            goto out;
        }
        seen[idx] = 1;
        source[idx] = i;
    }
    for (int32_t i = 0; i < m->nparams; i++) {
        if (!seen[i]) {
            char want[96];
            shape_str(want, sizeof want, m->params[i].ndim, m->params[i].shape);
            st = td_fail(m, TD_ERR_FORMAT,
                         "td_model_load_safetensors: '%s' lacks tensor '%s' (expected shape %s)",
                         path, m->params[i].name, want);
            goto out;
        }
    }
    for (int32_t i = 0; i < m->nparams; i++) {
        const st_entry *e = &entries[source[i]];
        const int es = dtype_size(e->dtype);
        td_real *dst = m->param_mem + m->params[i].offset;
        const unsigned char *src = data + e->begin;
        for (int64_t j = 0; j < m->params[i].numel; j++) dst[j] = (td_real)element_at(src + j * es, e->dtype);
    }
    goto out;
bad_json:
    st = td_fail(m, TD_ERR_FORMAT,
                 "td_model_load_safetensors: '%s' has a malformed JSON header: %s. HINT: the "
                 "file is corrupt or not safetensors",
                 path, r.err[0] ? r.err : "out of memory");
out:
    free(entries);
    free(seen);
    free(source);
    return st;
}

/* One tensor of a file being written: `prefix` + the table name, the tensor's shape, and its
 * elements in the stage's flat td_real buffer. */
typedef struct {
    const char *prefix;
    const td_param *p;
    const td_real *data;
} st_out;

/* Writes a safetensors file: header {"__metadata__":{...},"name":{"dtype",...},...} padded to
 * 8 bytes, then every tensor's elements as F32 (or F64 with f64 = 1). `metadata` is the body of
 * the __metadata__ object (already JSON) or NULL. atomic = 1 writes a temporary file in the
 * same directory, flushes and fsyncs it, renames it over `path` and fsyncs the directory, so a
 * reader sees the old file or the whole new one, never a part. `fn` names the caller. */
static td_status st_write(td_model *m, const char *fn, const char *path, const st_out *t, int n,
                          const char *metadata, int f64, int atomic) {
    size_t cap = 256 + (metadata ? strlen(metadata) : 0), len = 0;
    for (int i = 0; i < n; i++) cap += strlen(t[i].prefix) + strlen(t[i].p->name) + 160;
    char *h = malloc(cap);
    if (!h) return td_fail(m, TD_ERR_NOMEM, "%s: out of memory", fn);
    const int es = f64 ? 8 : 4;
    len += (size_t)snprintf(h + len, cap - len, "{");
    if (metadata) len += (size_t)snprintf(h + len, cap - len, "\"__metadata__\":{%s}%s", metadata, n ? "," : "");
    int64_t off = 0;
    for (int i = 0; i < n; i++) {
        const td_param *p = t[i].p;
        len += (size_t)snprintf(h + len, cap - len, "%s\"%s%s\":{\"dtype\":\"%s\",\"shape\":[",
                                i ? "," : "", t[i].prefix, p->name, f64 ? "F64" : "F32");
        for (int d = 0; d < p->ndim; d++)
            len += (size_t)snprintf(h + len, cap - len, d ? ",%lld" : "%lld", (long long)p->shape[d]);
        len += (size_t)snprintf(h + len, cap - len, "],\"data_offsets\":[%lld,%lld]}",
                                (long long)off, (long long)(off + es * p->numel));
        off += es * p->numel;
    }
    len += (size_t)snprintf(h + len, cap - len, "}");
    while (len % 8) h[len++] = ' ';
    char tmp[4096];
    if (atomic) snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    const char *target = atomic ? tmp : path;
    FILE *f = fopen(target, "wb");
    if (!f) {
        free(h);
        return td_fail(m, TD_ERR_IO, "%s: cannot create '%s': %s", fn, target, strerror(errno));
    }
    unsigned char lenbuf[8];
    for (int i = 0; i < 8; i++) lenbuf[i] = (unsigned char)(((uint64_t)len >> (8 * i)) & 0xff);
    int ok = fwrite(lenbuf, 1, 8, f) == 8 && fwrite(h, 1, len, f) == len;
    free(h);
    enum { CHUNK = 4096 };
    unsigned char out[CHUNK * 8];
    for (int i = 0; ok && i < n; i++) {
        const td_real *src = t[i].data;
        for (int64_t j0 = 0; ok && j0 < t[i].p->numel; j0 += CHUNK) {
            const int64_t cnt = t[i].p->numel - j0 < CHUNK ? t[i].p->numel - j0 : CHUNK;
            for (int64_t j = 0; j < cnt; j++) {
                if (f64) { double v = (double)src[j0 + j]; memcpy(out + 8 * j, &v, 8); }
                else { float v = (float)src[j0 + j]; memcpy(out + 4 * j, &v, 4); }
            }
            ok = fwrite(out, (size_t)es, (size_t)cnt, f) == (size_t)cnt;
        }
    }
    int err = ok ? 0 : errno;
    if (ok && atomic && (fflush(f) != 0 || fsync(fileno(f)) != 0)) ok = 0, err = errno;
    if (fclose(f) != 0 && ok) ok = 0, err = errno;
    if (ok && atomic && rename(tmp, path) != 0) ok = 0, err = errno;
    if (!ok) {
        if (atomic) remove(tmp);
        return td_fail(m, TD_ERR_IO, "%s: write to '%s' failed: %s", fn, target, strerror(err));
    }
    if (atomic) { /* the rename itself reaches the disk with the directory */
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", path);
        char *slash = strrchr(dir, '/');
        if (slash) *(slash == dir ? slash + 1 : slash) = 0;
        else snprintf(dir, sizeof dir, ".");
        int fd = open(dir, O_RDONLY);
        if (fd >= 0) {
            fsync(fd);
            close(fd);
        }
    }
    return TD_OK;
}

td_status td_save_safetensors(td_model *m, const char *path, int grads) {
    st_out *t = malloc(sizeof(st_out) * (size_t)(m->nparams ? m->nparams : 1));
    if (!t) return td_fail(m, TD_ERR_NOMEM, "td_model_save_safetensors: out of memory");
    for (int32_t i = 0; i < m->nparams; i++)
        t[i] = (st_out){"", &m->params[i], (grads ? m->grad_mem : m->param_mem) + m->params[i].offset};
    td_status st = st_write(m, "td_model_save_safetensors", path, t, m->nparams, NULL, 0, 0);
    free(t);
    return st;
}

/* ---- token shards ---------------------------------------------------------------------------- */

#define TD_TOKENS_MAGIC 0x544E4454u /* "TDNT" */

td_status td_tokens_read(int32_t **out_tokens, int64_t *out_count, const char *path,
                         int64_t vocab_size) {
    if (!out_tokens || !out_count || !path)
        return td_fail_global(TD_ERR_ARG, "td_tokens_read: NULL argument");
    *out_tokens = NULL;
    *out_count = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return td_fail_global(TD_ERR_IO, "td_tokens_read: cannot open '%s': %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long fsize = ftell(f);
    fseek(f, 0, SEEK_SET);
    td_status st = TD_OK;
    unsigned char *buf = NULL;
    if (fsize < 0)
        st = td_fail_global(TD_ERR_IO, "td_tokens_read: cannot size '%s': %s", path, strerror(errno));
    else if (!(buf = malloc(fsize ? (size_t)fsize : 1)))
        st = td_fail_global(TD_ERR_NOMEM, "td_tokens_read: cannot allocate %ld bytes for '%s'", fsize, path);
    else if (fread(buf, 1, (size_t)fsize, f) != (size_t)fsize)
        st = td_fail_global(TD_ERR_IO, "td_tokens_read: short read on '%s'", path);
    fclose(f);
    if (!st) st = td_tokens_parse(out_tokens, out_count, path, buf, (size_t)fsize, vocab_size);
    free(buf);
    return st;
}

td_status td_tokens_parse(int32_t **out_tokens, int64_t *out_count, const char *path,
                          const unsigned char *buf, size_t size, int64_t vocab_size) {
    *out_tokens = NULL;
    *out_count = 0;
    const long fsize = (long)size;
    td_status st = TD_OK;
    int32_t *tokens = NULL;
    if (fsize < 64) {
        st = td_fail_global(TD_ERR_FORMAT, "td_tokens_read: '%s' is %ld bytes, shorter than the 64-byte shard header", path, fsize);
        goto out;
    }
    const unsigned char *h = buf;
    uint32_t magic, version, width;
    uint64_t count;
    memcpy(&magic, h, 4);
    memcpy(&version, h + 4, 4);
    memcpy(&width, h + 8, 4);
    memcpy(&count, h + 16, 8);
    if (magic != TD_TOKENS_MAGIC) {
        st = td_fail_global(TD_ERR_FORMAT,
                            "td_tokens_read: '%s' has magic 0x%08X, expected 0x%08X ('TDNT'). "
                            "HINT: write shards with harness.data.write_shard",
                            path, magic, TD_TOKENS_MAGIC);
        goto out;
    }
    if (version != 1) {
        st = td_fail_global(TD_ERR_FORMAT, "td_tokens_read: '%s' has version %u; this engine reads version 1", path, version);
        goto out;
    }
    if (width != 2 && width != 4) {
        st = td_fail_global(TD_ERR_FORMAT, "td_tokens_read: '%s' declares %u bytes per token (2 or 4 allowed)", path, width);
        goto out;
    }
    if (count > (uint64_t)INT64_MAX / 4 || (uint64_t)fsize != 64 + count * width) {
        st = td_fail_global(TD_ERR_FORMAT,
                            "td_tokens_read: '%s' header says %llu tokens of %u bytes (%llu bytes "
                            "with the header) but the file has %ld bytes. HINT: the shard is "
                            "truncated or was written by something else",
                            path, (unsigned long long)count, width,
                            (unsigned long long)(64 + count * width), fsize);
        goto out;
    }
    tokens = malloc(sizeof(int32_t) * (count ? count : 1));
    if (!tokens) { st = td_fail_global(TD_ERR_NOMEM, "td_tokens_read: cannot allocate %llu tokens", (unsigned long long)count); goto out; }
    const unsigned char *raw = buf + 64;
    for (uint64_t i = 0; i < count; i++) {
        uint32_t v;
        if (width == 2) { uint16_t s; memcpy(&s, raw + 2 * i, 2); v = s; }
        else memcpy(&v, raw + 4 * i, 4);
        if (v > INT32_MAX || (vocab_size > 0 && (int64_t)v >= vocab_size)) {
            st = td_fail_global(TD_ERR_RANGE,
                                "td_tokens_read: '%s' token %llu is %u, outside [0, vocab_size=%lld)",
                                path, (unsigned long long)i, v, (long long)vocab_size);
            goto out;
        }
        tokens[i] = (int32_t)v;
    }
    *out_tokens = tokens;
    *out_count = (int64_t)count;
    tokens = NULL;
out:
    free(tokens);
    return st;
}

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
    td_status st = st_write(m, fn, path, t, n, meta, sizeof(td_real) == 8, 1);
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
    if (!entries || !jexpect(&r, '{')) goto bad;
    jws(&r);
    if (r.s < r.end && *r.s == '}') r.s++;
    else for (;;) {
        char key[TD_MAX_NAME * 2];
        if (!jstring(&r, key, sizeof key) || !jexpect(&r, ':')) goto bad;
        if (!strcmp(key, "__metadata__")) {
            if (!jexpect(&r, '{')) goto bad;
            jws(&r);
            if (r.s < r.end && *r.s == '}') r.s++;
            else for (;;) {
                st_meta kv;
                if (!jstring(&r, kv.key, sizeof kv.key) || !jexpect(&r, ':') || !jstring(&r, kv.value, sizeof kv.value)) goto bad;
                if (nmeta < 64) meta[nmeta++] = kv;
                jws(&r);
                if (r.s < r.end && *r.s == ',') { r.s++; continue; }
                if (!jexpect(&r, '}')) goto bad;
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
            if (!parse_entry(&r, &entries[n])) goto bad;
            n++;
        }
        jws(&r);
        if (r.s < r.end && *r.s == ',') { r.s++; continue; }
        if (!jexpect(&r, '}')) goto bad;
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
        shape_str(want_shape, sizeof want_shape, p->ndim, p->shape);
        if (found < 0) {
            st = td_fail(m, TD_ERR_FORMAT, "%s: '%s' lacks tensor '%s' (expected %s %s). HINT: the file is not a complete checkpoint of this stage", fn, path, name, real, want_shape);
            goto out;
        }
        const st_entry *e = &entries[found];
        int same = e->ndim == p->ndim && !strcmp(e->dtype, real);
        for (int d = 0; same && d < p->ndim; d++) same = e->shape[d] == p->shape[d];
        if (!same) {
            char got[96];
            shape_str(got, sizeof got, e->ndim, e->shape);
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
