/* safetensors.h — what safetensors.c shares with checkpoint.c (a checkpoint is a safetensors
 * file): the JSON reader over a header, the parse of one tensor's entry, shapes as text for
 * messages, and the writer. Private to engine/src; the entry points are in internal.h.
 */
#ifndef TD_SAFETENSORS_H
#define TD_SAFETENSORS_H

#include "internal.h"

/* A cursor over a header's JSON text; err holds the first problem found. */
typedef struct {
    const char *s, *end;
    char err[200];
    const char *base; /* the header's first byte: positions in messages count from here */
} jreader;

/* One tensor of a file's header: its name, dtype, shape and byte range in the data section. */
typedef struct {
    char name[TD_MAX_NAME * 2];
    char dtype[16];
    int32_t ndim;
    int64_t shape[8];
    int64_t begin, end;
} st_entry;

/* One tensor of a file being written: `prefix` + the table name, the tensor's shape, and its
 * elements in the stage's flat td_real buffer. */
typedef struct {
    const char *prefix;
    const td_param *p;
    const td_real *data;
} st_out;

/* The JSON reader (safetensors.c): white space skipped; one expected character; a string into
 * out (truncated to cap - 1). The int ones return 0 on malformed input, with r->err set. */
void td_json_ws(jreader *r);
int td_json_expect(jreader *r, char c);
int td_json_string(jreader *r, char *out, size_t cap);
/* One tensor's {"dtype", "shape", "data_offsets"} object into e (e->name already set). */
int td_st_parse_entry(jreader *r, st_entry *e);
/* "(2, 3)", "(4,)", "()" for messages. */
void td_st_shape_str(char *out, size_t cap, int32_t ndim, const int64_t *shape);
/* Writes n tensors as a safetensors file (F32, or F64 with f64 = 1; metadata: the body of the
 * __metadata__ object or NULL; atomic = 1: temporary file, fsync, rename). `fn` names the caller. */
td_status td_st_write(td_model *m, const char *fn, const char *path, const st_out *t, int n,
                      const char *metadata, int f64, int atomic);

#endif
