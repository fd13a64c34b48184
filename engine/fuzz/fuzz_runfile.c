/* fuzz_runfile.c — libFuzzer target for tandem-engine's run file (runfile.c) and the model
 * configuration it feeds (td_model_set_int / td_model_set_float / td_model_build in api.c).
 *
 * The input is a run file (`key value` lines) fed through fmemopen to td_runfile_parse. When it
 * parses, its model keys go through the same setters build_stage (runtime.c) calls, and the model
 * is built when it is small enough to allocate in the fuzzer (so td_model_build's own checks see
 * every value the setters accept). Seeds: run files written by harness/pipeline.py.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_report.h"
#include "runfile.h"

/* Parameters and activations of the model, roughly, in elements (doubles: no overflow). */
static double footprint(const td_run_config *c) {
    const double L = (double)c->n_layer, C = (double)c->n_embd, V = (double)c->vocab_size;
    const double T = (double)c->seq_len, B = (double)c->batch_size, NH = (double)c->n_head;
    return (V + (double)c->n_positions) * C + L * 12 * C * C + B * T * (L * 16 * C + V) + B * NH * T * T * L;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    FILE *f = fmemopen((void *)data, size, "r");
    if (!f) abort();
    static td_run_config cfg; /* 5 KiB of paths: off the stack */
    char err[2048] = {0};
    td_status st = td_runfile_parse(&cfg, err, sizeof err, f, "fuzz.run");
    fclose(f);
    fuzz_report("run file", st, err);
    if (st != TD_OK) {
        if (!err[0]) abort(); /* a failure says why */
        return 0;
    }
    td_model *m = NULL;
    if (td_model_create(&m)) abort();
    struct { const char *k; int64_t v; } ints[] = {
        {"n_layer", cfg.n_layer}, {"n_embd", cfg.n_embd}, {"n_head", cfg.n_head},
        {"vocab_size", cfg.vocab_size}, {"n_positions", cfg.n_positions},
        {"seq_len", cfg.seq_len}, {"batch_size", cfg.batch_size}, {"threads", cfg.threads},
        {"backend", cfg.backend}, {"bf16", cfg.bf16}};
    struct { const char *k; double v; } fl[] = {
        {"lr", cfg.lr}, {"beta1", cfg.beta1}, {"beta2", cfg.beta2}, {"eps", cfg.eps},
        {"weight_decay", cfg.weight_decay}, {"grad_clip", cfg.grad_clip}};
    st = TD_OK;
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && !st; i++) st = td_model_set_int(m, ints[i].k, ints[i].v);
    for (size_t i = 0; i < sizeof fl / sizeof fl[0] && !st; i++) st = td_model_set_float(m, fl[i].k, fl[i].v);
    const double fp = footprint(&cfg);
    if (!st && cfg.threads >= 0 && cfg.threads <= 2 && fp >= 0 && fp < (1 << 20)) st = td_model_build(m);
    fuzz_report("model", st, td_model_last_error(m));
    if (st != TD_OK && !td_model_last_error(m)[0]) abort();
    td_model_free(m);
    return 0;
}
