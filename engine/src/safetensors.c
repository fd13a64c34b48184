/* safetensors.c — safetensors weights in and out of a model: the file's JSON header (a minimal
 * reader), every tensor's dtype, shape and offsets, the load into the parameter table and the
 * writer (also used by checkpoint.c).
 *
 * Every header field is checked before it is trusted (lengths, offsets inside the file, dtype,
 * shapes against the parameter table); a bad file is an error with the file name, the tensor and
 * the numbers, never a crash. Not here: the layout of tensors in memory (model.c), training
 * checkpoints (checkpoint.c), token shards (shards.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "safetensors.h"

/* ---- a minimal JSON reader for safetensors headers -------------------------------------------- */

void td_json_ws(jreader *r) {
    while (r->s < r->end && (*r->s == ' ' || *r->s == '\n' || *r->s == '\r' || *r->s == '\t'))
        r->s++;
}

int td_json_expect(jreader *r, char c) {
    td_json_ws(r);
    if (r->s >= r->end || *r->s != c) {
        snprintf(r->err, sizeof r->err, "expected '%c' at header byte %ld", c,
                 (long)(r->s - r->base));
        return 0;
    }
    r->s++;
    return 1;
}

/* Reads a string into out (truncated to cap - 1; returns 0 on malformed input). */
int td_json_string(jreader *r, char *out, size_t cap) {
    td_json_ws(r);
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
    td_json_ws(r);
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
    td_json_ws(r);
    if (depth > 32 || r->s >= r->end) {
        snprintf(r->err, sizeof r->err, "nesting too deep or truncated header");
        return 0;
    }
    char c = *r->s;
    if (c == '"') {
        char tmp[1];
        return td_json_string(r, tmp, 0);
    }
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        r->s++;
        td_json_ws(r);
        if (r->s < r->end && *r->s == close) return r->s++, 1;
        for (;;) {
            if (c == '{') {
                char tmp[1];
                if (!td_json_string(r, tmp, 0) || !td_json_expect(r, ':')) return 0;
            }
            if (!jskip(r, depth + 1)) return 0;
            td_json_ws(r);
            if (r->s < r->end && *r->s == ',') { r->s++; continue; }
            return td_json_expect(r, close);
        }
    }
    while (r->s < r->end && *r->s != ',' && *r->s != '}' && *r->s != ']') r->s++;
    return 1;
}

/* ---- safetensors ----------------------------------------------------------------------------- */

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

void td_st_shape_str(char *out, size_t cap, int32_t ndim, const int64_t *shape) {
    size_t n = (size_t)snprintf(out, cap, "(");
    for (int d = 0; d < ndim && n < cap; d++)
        n += (size_t)snprintf(out + n, cap - n, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (n < cap) snprintf(out + n, cap - n, ndim == 1 ? ",)" : ")");
}

int td_st_parse_entry(jreader *r, st_entry *e) {
    if (!td_json_expect(r, '{')) return 0;
    int have_dtype = 0, have_shape = 0, have_off = 0;
    td_json_ws(r);
    if (r->s < r->end && *r->s == '}') { r->s++; goto done; }
    for (;;) {
        char key[32];
        if (!td_json_string(r, key, sizeof key) || !td_json_expect(r, ':')) return 0;
        if (!strcmp(key, "dtype")) {
            if (!td_json_string(r, e->dtype, sizeof e->dtype)) return 0;
            have_dtype = 1;
        } else if (!strcmp(key, "shape") || !strcmp(key, "data_offsets")) {
            int is_shape = key[0] == 's';
            if (!td_json_expect(r, '[')) return 0;
            int n = 0;
            int64_t vals[8];
            td_json_ws(r);
            if (r->s < r->end && *r->s == ']') r->s++;
            else for (;;) {
                if (n >= 8) { snprintf(r->err, sizeof r->err, "more than 8 dimensions"); return 0; }
                if (!jint(r, &vals[n++])) return 0;
                td_json_ws(r);
                if (r->s < r->end && *r->s == ',') { r->s++; continue; }
                if (!td_json_expect(r, ']')) return 0;
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
        td_json_ws(r);
        if (r->s < r->end && *r->s == ',') { r->s++; continue; }
        if (!td_json_expect(r, '}')) return 0;
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
    if (!entries || !td_json_expect(&r, '{')) goto bad_json;
    td_json_ws(&r);
    if (r.s < r.end && *r.s == '}') r.s++;
    else for (;;) {
        char key[TD_MAX_NAME * 2];
        if (!td_json_string(&r, key, sizeof key) || !td_json_expect(&r, ':')) goto bad_json;
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
            if (!td_st_parse_entry(&r, &entries[n])) goto bad_json;
            n++;
        }
        td_json_ws(&r);
        if (r.s < r.end && *r.s == ',') { r.s++; continue; }
        if (!td_json_expect(&r, '}')) goto bad_json;
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
            td_st_shape_str(got, sizeof got, e->ndim, e->shape);
            td_st_shape_str(want, sizeof want, p->ndim, p->shape);
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
            td_st_shape_str(want, sizeof want, m->params[i].ndim, m->params[i].shape);
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

/* Writes a safetensors file: header {"__metadata__":{...},"name":{"dtype",...},...} padded to
 * 8 bytes, then every tensor's elements as F32 (or F64 with f64 = 1). `metadata` is the body of
 * the __metadata__ object (already JSON) or NULL. atomic = 1 writes a temporary file in the
 * same directory, flushes and fsyncs it, renames it over `path` and fsyncs the directory, so a
 * reader sees the old file or the whole new one, never a part. `fn` names the caller. */
td_status td_st_write(td_model *m, const char *fn, const char *path, const st_out *t, int n,
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
    td_status st = td_st_write(m, "td_model_save_safetensors", path, t, m->nparams, NULL, 0, 0);
    free(t);
    return st;
}
