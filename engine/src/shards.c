/* shards.c — token shards read into memory: the 64-byte header (magic "TDNT", version, bytes
 * per token, count), then 2- or 4-byte token ids, each checked against vocab_size.
 *
 * A bad shard is an error with the file name and the numbers, never a crash. The writer is the
 * harness's (harness.data.write_shard).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

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
