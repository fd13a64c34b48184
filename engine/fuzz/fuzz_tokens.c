/* fuzz_tokens.c — libFuzzer target for the token-shard reader (shards.c, td_tokens_read).
 *
 * Each input is a whole shard (64-byte header: magic "TDNT", version, bytes per token, count;
 * then the ids), parsed by td_tokens_parse with vocab_size 50257 and with no vocabulary bound.
 * On success the ids must be in range; the sanitizers catch the rest.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "fuzz_report.h"
#include "internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const int64_t vocabs[2] = {50257, 0};
    for (int i = 0; i < 2; i++) {
        int32_t *tokens = NULL;
        int64_t count = -1;
        td_status st = td_tokens_parse(&tokens, &count, "fuzz.bin", data, size, vocabs[i]);
        fuzz_report(i ? "no vocabulary bound" : "vocab_size 50257", st, td_last_error());
        if (st == TD_OK) {
            for (int64_t j = 0; j < count; j++)
                if (tokens[j] < 0 || (vocabs[i] && tokens[j] >= vocabs[i])) abort();
        } else if (tokens || count != 0 || !td_last_error()[0]) {
            abort(); /* a failure leaves no tokens and says why */
        }
        free(tokens);
    }
    return 0;
}
