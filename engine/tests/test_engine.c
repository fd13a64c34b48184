/* test_engine.c — C unit tests of the engine through its public ABI, run under AddressSanitizer
 * and UBSan in CI (cmake -DTD_SANITIZE=ON). They cover lifetime, configuration errors, file
 * errors, a finite-difference gradient check and determinism; the JAX comparisons live in
 * pytest (tests/engine, tests/harness).
 */
#define _XOPEN_SOURCE 700 /* truncate */
#include <math.h>
#include <stdio.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include "tandem.h"

static int failures = 0;
#define CHECK(cond, ...)                                                                         \
    do {                                                                                         \
        if (!(cond)) {                                                                           \
            failures++;                                                                          \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                                \
            fprintf(stderr, __VA_ARGS__);                                                        \
            fprintf(stderr, "\n");                                                               \
        }                                                                                        \
    } while (0)

static td_model *tiny(int stages, int stage, int slots, int split) {
    td_model *m = NULL;
    td_model_create(&m);
    td_model_set_int(m, "n_layer", 2);
    td_model_set_int(m, "n_embd", 12);
    td_model_set_int(m, "n_head", 3);
    td_model_set_int(m, "vocab_size", 19);
    td_model_set_int(m, "n_positions", 8);
    td_model_set_int(m, "seq_len", 6);
    td_model_set_int(m, "batch_size", 2);
    td_model_set_int(m, "threads", 2);
    td_model_set_int(m, "stages", stages);
    td_model_set_int(m, "stage", stage);
    td_model_set_int(m, "slots", slots);
    td_model_set_int(m, "split_backward", split);
    if (td_model_build(m) != TD_OK) {
        fprintf(stderr, "build failed: %s\n", td_model_last_error(m));
        exit(1);
    }
    return m;
}

static uint32_t rng_state = 12345;
static float frand(void) { /* xorshift, uniform in [-1, 1) */
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 17, rng_state ^= rng_state << 5;
    return (float)(rng_state & 0xffffff) / (float)0x800000 - 1.0f;
}

static void init_params(td_model *m) {
    int32_t n;
    td_model_num_params(m, &n);
    for (int32_t i = 0; i < n; i++) {
        const char *name;
        int32_t ndim, decayed;
        int64_t shape[4], numel;
        td_model_param_info(m, i, &name, &ndim, shape, &numel, &decayed);
        float *buf = malloc(sizeof(float) * (size_t)numel);
        for (int64_t j = 0; j < numel; j++)
            buf[j] = ndim == 1 && strstr(name, "weight") ? 1.0f + 0.1f * frand() : 0.2f * frand();
        td_model_set_param(m, name, buf, numel);
        free(buf);
    }
}

static void test_config_errors(void) {
    td_model *m = NULL;
    CHECK(td_model_create(&m) == TD_OK, "create");
    td_model_set_int(m, "n_layer", 2);
    td_model_set_int(m, "n_embd", 50);
    td_model_set_int(m, "n_head", 3);
    td_model_set_int(m, "vocab_size", 10);
    td_model_set_int(m, "n_positions", 8);
    td_model_set_int(m, "seq_len", 8);
    td_model_set_int(m, "batch_size", 1);
    CHECK(td_model_build(m) == TD_ERR_CONFIG, "n_embd %% n_head");
    CHECK(strstr(td_model_last_error(m), "n_embd=50 is not divisible by n_head=3"), "msg: %s",
          td_model_last_error(m));
    td_model_set_int(m, "n_head", 5);
    td_model_set_int(m, "seq_len", 9);
    CHECK(td_model_build(m) == TD_ERR_CONFIG, "seq_len > n_positions");
    CHECK(strstr(td_model_last_error(m), "seq_len=9 exceeds n_positions=8"), "msg: %s",
          td_model_last_error(m));
    td_model_set_int(m, "seq_len", 0);
    CHECK(td_model_build(m) == TD_ERR_CONFIG && strstr(td_model_last_error(m), "seq_len=0"), "zero");
    CHECK(td_model_set_int(m, "n_layers", 3) == TD_ERR_CONFIG, "unknown key");
    CHECK(strstr(td_model_last_error(m), "unknown key 'n_layers'"), "msg: %s", td_model_last_error(m));
    CHECK(td_model_set_float(m, "beta1", 1.5) == TD_ERR_CONFIG, "beta1 range");
    td_model_free(m);
    td_model_free(NULL);
}

/* fp32 central differences on a few elements of every tensor of a one-stage model built for
 * B = 2, T = 6, vocab 19; loose by nature (the pytest suite checks every tensor tightly against
 * the float64 build). Frees m. */
static void fd_check(td_model *m) {
    init_params(m);
    int32_t tok[12], tgt[12];
    for (int i = 0; i < 12; i++) tok[i] = (i * 7) % 19, tgt[i] = (i * 5 + 3) % 19;
    td_model_zero_grad(m);
    double loss;
    CHECK(td_model_forward_backward(m, &loss, tok, tgt, 2, 6, 1.0) == TD_OK, "fwd/bwd: %s", td_model_last_error(m));
    CHECK(isfinite(loss) && loss > 0, "loss %g", loss);
    int32_t n;
    td_model_num_params(m, &n);
    for (int32_t i = 0; i < n; i++) {
        const char *name;
        int32_t ndim, dec;
        int64_t shape[4], numel;
        td_model_param_info(m, i, &name, &ndim, shape, &numel, &dec);
        float *p = malloc(sizeof(float) * (size_t)numel), *g = malloc(sizeof(float) * (size_t)numel);
        td_model_get_param(m, p, name, numel);
        td_model_get_grad(m, g, name, numel);
        for (int k = 0; k < 3; k++) {
            int64_t j = (k * 7919) % numel;
            float orig = p[j], e = 1e-2f;
            double lp, lm;
            p[j] = orig + e;
            td_model_set_param(m, name, p, numel);
            td_model_forward(m, NULL, &lp, tok, tgt, 2, 6);
            p[j] = orig - e;
            td_model_set_param(m, name, p, numel);
            td_model_forward(m, NULL, &lm, tok, tgt, 2, 6);
            p[j] = orig;
            td_model_set_param(m, name, p, numel);
            double fd = (lp - lm) / (2.0 * e);
            CHECK(fabs(fd - g[j]) <= 2e-3 + 0.05 * fabs(fd), "%s[%lld]: fd %g grad %g", name, (long long)j, fd, g[j]);
        }
        free(p);
        free(g);
    }
    td_model_free(m);
}

static void test_fd_gradients(void) { fd_check(tiny(1, 0, 1, 0)); }

/* A Llama model (family = 1): head size 4, multi-query (one kv head), MLP width 20. */
static td_model *tiny_llama(td_status *out_status, int stages) {
    td_model *m = NULL;
    td_model_create(&m);
    const char *keys[] = {"n_layer", "n_embd", "n_head", "n_kv_head", "ffn_dim", "vocab_size",
                          "n_positions", "seq_len", "batch_size", "threads", "family", "stages"};
    const int64_t vals[] = {2, 12, 3, 1, 20, 19, 8, 6, 2, 2, 1, stages};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) td_model_set_int(m, keys[i], vals[i]);
    td_model_set_float(m, "rope_theta", 50.0);
    *out_status = td_model_build(m);
    return m;
}

static void test_llama(void) {
    td_status st;
    td_model *m = tiny_llama(&st, 2); /* stage 0 of 2: the embedding, no norm or head */
    CHECK(st == TD_OK, "stages=2: %s", td_model_last_error(m));
    int32_t n0 = 0;
    td_model_num_params(m, &n0);
    for (int32_t i = 0; i < n0; i++) {
        const char *name;
        td_model_param_info(m, i, &name, NULL, NULL, NULL, NULL);
        CHECK(i > 0 || !strcmp(name, "model.embed_tokens.weight"), "stage 0 starts with %s", name);
        CHECK(strcmp(name, "lm_head.weight") && strcmp(name, "model.norm.weight"), "stage 0 holds %s", name);
    }
    td_model_free(m);
    m = tiny_llama(&st, 1);
    CHECK(st == TD_OK, "build: %s", td_model_last_error(m));
    int32_t n = 0;
    td_model_num_params(m, &n);
    CHECK(n == 1 + 9 * 2 + 2, "llama table has %d tensors", n);
    const char *last;
    td_model_param_info(m, n - 1, &last, NULL, NULL, NULL, NULL);
    CHECK(!strcmp(last, "lm_head.weight"), "last tensor %s", last);
    fd_check(m);
    /* training: loss falls over 30 steps */
    m = tiny_llama(&st, 1);
    init_params(m);
    int32_t tok[12], tgt[12];
    double first = 0, loss = 0, norm;
    for (int s = 0; s < 30; s++) {
        for (int i = 0; i < 12; i++) tok[i] = (i * 3 + s) % 19, tgt[i] = (i * 3 + s + 1) % 19;
        td_model_zero_grad(m);
        CHECK(td_model_forward_backward(m, &loss, tok, tgt, 2, 6, 1.0) == TD_OK, "%s", td_model_last_error(m));
        CHECK(td_model_optimizer_step(m, &norm) == TD_OK && isfinite(norm), "step %d", s);
        if (s == 0) first = loss;
    }
    CHECK(loss < first, "llama loss did not fall: %g -> %g", first, loss);
    td_model_free(m);
}

static double train_steps(int steps, float *out_wte) {
    rng_state = 777;
    td_model *m = tiny(1, 0, 1, 0);
    init_params(m);
    int32_t tok[12], tgt[12];
    double loss = 0;
    for (int s = 0; s < steps; s++) {
        for (int i = 0; i < 12; i++) tok[i] = (i * 3 + s) % 19, tgt[i] = (i * 3 + s + 1) % 19;
        td_model_zero_grad(m);
        td_model_forward_backward(m, &loss, tok, tgt, 2, 6, 1.0);
        double norm;
        td_model_optimizer_step(m, &norm);
    }
    td_model_get_param(m, out_wte, "wte.weight", 19 * 12);
    td_model_free(m);
    return loss;
}

static void test_determinism_and_learning(void) {
    float a[19 * 12], b[19 * 12];
    double l1 = train_steps(1, a);
    double la = train_steps(30, a), lb = train_steps(30, b);
    CHECK(la == lb && memcmp(a, b, sizeof a) == 0, "reruns differ: %.17g vs %.17g", la, lb);
    CHECK(la < l1, "loss did not fall: %g -> %g", l1, la);
}

static void test_split_backward_equals_fused(void) {
    rng_state = 99;
    td_model *f = tiny(1, 0, 1, 0);
    init_params(f);
    rng_state = 99;
    td_model *s = tiny(1, 0, 2, 1);
    init_params(s);
    int32_t tok[12], tgt[12];
    for (int i = 0; i < 12; i++) tok[i] = (i * 5) % 19, tgt[i] = (i * 2 + 1) % 19;
    double l1, l2;
    td_model_zero_grad(f);
    td_model_forward_backward(f, &l1, tok, tgt, 2, 6, 1.0);
    td_model_zero_grad(s);
    CHECK(td_stage_forward(s, NULL, &l2, 1, tok, NULL, tgt, 2, 6) == TD_OK, "%s", td_model_last_error(s));
    CHECK(td_stage_backward(s, NULL, 1, NULL, 1.0, TD_BWD_INPUT) == TD_OK, "%s", td_model_last_error(s));
    CHECK(td_stage_forward(s, NULL, &l2, 1, tok, NULL, tgt, 2, 6) == TD_ERR_STATE, "slot awaiting W must refuse a forward");
    CHECK(td_stage_backward(s, NULL, 1, NULL, 1.0, TD_BWD_WEIGHT) == TD_OK, "%s", td_model_last_error(s));
    float g1[12 * 36], g2[12 * 36];
    td_model_get_grad(f, g1, "h.0.attn.c_attn.weight", 12 * 36);
    td_model_get_grad(s, g2, "h.0.attn.c_attn.weight", 12 * 36);
    CHECK(l1 == l2 && memcmp(g1, g2, sizeof g1) == 0, "split backward differs from fused");
    td_model_free(f);
    td_model_free(s);
}

static void test_files(void) {
    td_model *m = tiny(1, 0, 1, 0);
    init_params(m);
    const char *path = "test_roundtrip.safetensors";
    CHECK(td_model_save_safetensors(m, path) == TD_OK, "save: %s", td_model_last_error(m));
    td_model *m2 = tiny(1, 0, 1, 0);
    CHECK(td_model_load_safetensors(m2, path) == TD_OK, "load: %s", td_model_last_error(m2));
    float a[19 * 12], b[19 * 12];
    td_model_get_param(m, a, "wte.weight", 19 * 12);
    td_model_get_param(m2, b, "wte.weight", 19 * 12);
    CHECK(memcmp(a, b, sizeof a) == 0, "round trip differs");
    /* truncate it */
    FILE *f = fopen(path, "rb+");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    CHECK(truncate(path, size - 10) == 0, "truncate");
    CHECK(td_model_load_safetensors(m2, path) == TD_ERR_FORMAT, "truncated file accepted");
    CHECK(strstr(td_model_last_error(m2), "data_offsets"), "msg: %s", td_model_last_error(m2));
    CHECK(td_model_load_safetensors(m2, "does-not-exist.safetensors") == TD_ERR_IO, "missing file");
    remove(path);

    int32_t *tokens = NULL;
    int64_t count = 0;
    f = fopen("bad.tokens", "wb");
    fwrite("NOPE----------------------------------------------------------------", 1, 64, f);
    fclose(f);
    CHECK(td_tokens_read(&tokens, &count, "bad.tokens", 0) == TD_ERR_FORMAT, "bad magic accepted");
    CHECK(strstr(td_last_error(), "magic"), "msg: %s", td_last_error());
    remove("bad.tokens");
    td_model_free(m);
    td_model_free(m2);
}

static void test_range_errors(void) {
    td_model *m = tiny(1, 0, 1, 0);
    int32_t tok[12] = {0}, tgt[12] = {0};
    tok[7] = 19;
    double loss;
    CHECK(td_model_forward(m, NULL, &loss, tok, tgt, 2, 6) == TD_ERR_RANGE, "token >= vocab");
    CHECK(strstr(td_model_last_error(m), "tokens[1, 1] = 19 is outside [0, vocab_size=19)"), "msg: %s", td_model_last_error(m));
    tok[7] = 0;
    CHECK(td_model_forward(m, NULL, &loss, tok, tgt, 3, 6) == TD_ERR_ARG, "B > batch_size");
    td_model_free(m);
}

int main(void) {
    printf("tandem %s, ABI %d\n", td_version_string(), td_abi_version());
    test_config_errors();
    test_fd_gradients();
    test_llama();
    test_determinism_and_learning();
    test_split_backward_equals_fused();
    test_files();
    test_range_errors();
    if (failures) {
        printf("%d failed\n", failures);
        return 1;
    }
    printf("all engine C tests passed\n");
    return 0;
}
