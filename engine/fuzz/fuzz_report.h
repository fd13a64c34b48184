/* fuzz_report.h — with TANDEM_FUZZ_PRINT=1 in the environment, a target prints each parse's
 * status and message to stderr (the regression tests read them; fuzzing leaves it unset). */
#ifndef TD_FUZZ_REPORT_H
#define TD_FUZZ_REPORT_H

#include <stdio.h>
#include <stdlib.h>

#include "tandem.h"

static inline void fuzz_report(const char *what, td_status st, const char *message) {
    static int on = -1;
    if (on < 0) on = getenv("TANDEM_FUZZ_PRINT") != NULL;
    if (on) fprintf(stderr, "%s: %s: %s\n", what, td_status_name(st), st ? message : "ok");
}

#endif /* TD_FUZZ_REPORT_H */
