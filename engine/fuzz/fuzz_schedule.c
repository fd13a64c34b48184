/* fuzz_schedule.c — libFuzzer target for the schedule CSV parser of the pipeline runtime
 * (runtime.c, td_plan_parse): `rank,index,kind,stage,microbatch` rows, one rank's kept.
 *
 * The input is fed through fmemopen to the stream entry point that td_plan_read calls; ranks 0
 * and 1 of a 2-rank, 4-stage, 4-micro-batch run are parsed. Accepted actions must lie inside the
 * declared ranges. Seeds: harness/schedule.py's CSV for every schedule family.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "fuzz_report.h"
#include "runtime.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0; /* fmemopen needs a buffer; an empty file is the header-less case */
    for (int rank = 0; rank < 2; rank++) {
        FILE *f = fmemopen((void *)data, size, "r");
        if (!f) abort();
        td_rank_plan plan = {NULL, 0};
        char err[512] = {0};
        td_status st = td_plan_parse(&plan, err, sizeof err, f, "fuzz.csv", rank, 4, 4);
        fclose(f);
        fuzz_report(rank ? "rank 1" : "rank 0", st, err);
        if (st == TD_OK) {
            for (int32_t i = 0; i < plan.count; i++) {
                const td_action *a = &plan.actions[i];
                if (a->kind < ACT_F || a->kind > ACT_W || a->stage < 0 || a->stage >= 4 ||
                    a->microbatch < 0 || a->microbatch >= 4)
                    abort();
            }
        } else if (!err[0]) {
            abort(); /* a failure says why */
        }
        free(plan.actions);
    }
    return 0;
}
