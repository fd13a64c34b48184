/* fuzz_safetensors.c — libFuzzer target for the safetensors reader (safetensors.c).
 *
 * Each input is a whole safetensors file, loaded through td_load_safetensors_mem into two small
 * models: a one-stage model (every tensor must be present) and stage 1 of 2 (the other stage's
 * tensors are checked, then skipped). A load either succeeds or fails with a message; the
 * sanitizers catch everything else. Seeds: engine/fuzz/corpus/safetensors (tools/make_corpus.py).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_report.h"
#include "internal.h"

/* The model tools/make_corpus.py writes seeds for: keep the two in step. */
static const struct { const char *k; int64_t v; } CONFIG[] = {
    {"n_layer", 2}, {"n_embd", 4}, {"n_head", 2}, {"vocab_size", 5}, {"n_positions", 4},
    {"seq_len", 2}, {"batch_size", 1}, {"threads", 1}};

static td_model *make(int64_t stage, int64_t stages) {
    td_model *m = NULL;
    if (td_model_create(&m)) abort();
    for (size_t i = 0; i < sizeof CONFIG / sizeof CONFIG[0]; i++)
        if (td_model_set_int(m, CONFIG[i].k, CONFIG[i].v)) abort();
    if (td_model_set_int(m, "stage", stage) || td_model_set_int(m, "stages", stages) ||
        td_model_build(m))
        abort();
    return m;
}

static td_model *whole, *second;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!whole) whole = make(0, 1), second = make(1, 2);
    td_status st = td_load_safetensors_mem(whole, "fuzz.safetensors", data, size);
    fuzz_report("one stage", st, td_model_last_error(whole));
    st = td_load_safetensors_mem(second, "fuzz.safetensors", data, size);
    fuzz_report("stage 1 of 2", st, td_model_last_error(second));
    return 0;
}
