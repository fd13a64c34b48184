/* runfile.c — reads tandem-engine's run file (`key value` lines; '#' starts a comment line).
 *
 * Integer keys take a whole decimal number, float keys a finite number, path keys the rest of
 * the line; an unknown key or a value that is not a number is an error naming the line and the
 * key. Range checks of the model sizes belong to td_model_build, which every stage calls.
 */
#include "runfile.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

td_status td_runfile_read(td_run_config *cfg, char *err, size_t errlen, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        memset(cfg, 0, sizeof *cfg);
        snprintf(err, errlen, "cannot open run file '%s'", path);
        return TD_ERR_IO;
    }
    td_status st = td_runfile_parse(cfg, err, errlen, f, path);
    fclose(f);
    return st;
}

td_status td_runfile_parse(td_run_config *cfg, char *err, size_t errlen, FILE *f, const char *path) {
    memset(cfg, 0, sizeof *cfg);
    cfg->microbatches = 1, cfg->chunks = 1, cfg->steps = 1, cfg->save_grads_step = -1;
    cfg->lr = 1e-3, cfg->beta1 = 0.9, cfg->beta2 = 0.95, cfg->eps = 1e-8;
    cfg->weight_decay = 0.1, cfg->grad_clip = 1.0;
    cfg->rope_theta = 10000.0, cfg->norm_eps = 1e-5; /* Llama's defaults, as td_model's */
    char line[2048], key[64], value[1024];
    int lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        /* fgets splits a longer line: its tail would read as a line of its own */
        if (!strchr(line, '\n') && !feof(f))
            return snprintf(err, errlen, "run file '%s' line %d: longer than %d characters", path, lineno, (int)sizeof line - 2), TD_ERR_CONFIG;
        if (line[0] == '#' || line[0] == '\n') continue;
        if (sscanf(line, "%63s %1023[^\n]", key, value) != 2)
            return snprintf(err, errlen, "run file '%s' line %d: expected 'key value'", path, lineno), TD_ERR_CONFIG;
        struct { const char *k; int64_t *v; } ints[] = {
            {"n_layer", &cfg->n_layer}, {"n_embd", &cfg->n_embd}, {"n_head", &cfg->n_head},
            {"vocab_size", &cfg->vocab_size}, {"n_positions", &cfg->n_positions},
            {"seq_len", &cfg->seq_len}, {"batch_size", &cfg->batch_size},
            {"microbatches", &cfg->microbatches}, {"chunks", &cfg->chunks}, {"steps", &cfg->steps},
            {"threads", &cfg->threads}, {"save_grads_step", &cfg->save_grads_step},
            {"backend", &cfg->backend}, {"bf16", &cfg->bf16},
            {"checkpoint_every", &cfg->checkpoint_every}, {"resume_step", &cfg->resume_step},
            {"on_nonfinite", &cfg->on_nonfinite}, {"family", &cfg->family},
            {"n_kv_head", &cfg->n_kv_head}, {"ffn_dim", &cfg->ffn_dim}};
        struct { const char *k; double *v; } fl[] = {
            {"lr", &cfg->lr}, {"beta1", &cfg->beta1}, {"beta2", &cfg->beta2}, {"eps", &cfg->eps},
            {"weight_decay", &cfg->weight_decay}, {"grad_clip", &cfg->grad_clip},
            {"rope_theta", &cfg->rope_theta}, {"norm_eps", &cfg->norm_eps}};
        struct { const char *k; char *v; } strs[] = {
            {"weights", cfg->weights}, {"inputs", cfg->inputs}, {"targets", cfg->targets},
            {"schedule", cfg->schedule}, {"out", cfg->out}, {"checkpoint_dir", cfg->checkpoint_dir}};
        int found = 0;
        char *end = NULL;
        errno = 0;
        for (size_t i = 0; i < sizeof ints / sizeof ints[0] && !found; i++)
            if (!strcmp(key, ints[i].k)) *ints[i].v = strtoll(value, &end, 10), found = 1;
        for (size_t i = 0; i < sizeof fl / sizeof fl[0] && !found; i++)
            if (!strcmp(key, fl[i].k)) *fl[i].v = strtod(value, &end), found = 1;
        for (size_t i = 0; i < sizeof strs / sizeof strs[0] && !found; i++)
            if (!strcmp(key, strs[i].k)) snprintf(strs[i].v, 1024, "%s", value), found = 1;
        if (end) { /* a number key: the whole value must be the number (trailing blanks aside) */
            const char *rest = end;
            while (*rest == ' ' || *rest == '\t' || *rest == '\r') rest++;
            if (end == value || *rest || errno == ERANGE)
                return snprintf(err, errlen, "run file '%s' line %d: %s='%.60s' is not a number%s", path, lineno, key, value,
                                errno == ERANGE ? " in range" : ""), TD_ERR_CONFIG;
        }
        if (!found && !strcmp(key, "layers")) { /* comma-separated per-stage layer counts */
            char *p = value;
            cfg->n_layers_given = 0;
            for (;;) {
                char *q;
                errno = 0;
                long long n = strtoll(p, &q, 10);
                if (q == p || errno || n < 0 || cfg->n_layers_given == 256)
                    return snprintf(err, errlen, "run file '%s' line %d: layers='%.60s' is not a list of at most 256 layer counts >= 0", path, lineno, value), TD_ERR_CONFIG;
                cfg->layers[cfg->n_layers_given++] = n;
                p = q;
                while (*p == ' ' || *p == '\t' || *p == '\r') p++;
                if (*p == ',') p++;
                else if (!*p) break;
                else
                    return snprintf(err, errlen, "run file '%s' line %d: layers='%.60s' is not a list of at most 256 layer counts >= 0", path, lineno, value), TD_ERR_CONFIG;
            }
            found = 1;
        }
        if (!found)
            return snprintf(err, errlen, "run file '%s' line %d: unknown key '%s'", path, lineno, key), TD_ERR_CONFIG;
    }
    return TD_OK;
}
