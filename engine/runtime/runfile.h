/* runfile.h — the run file tandem-engine reads: `key value` lines written by harness/pipeline.py.
 *
 * Parsing only: values land in a td_run_config with the defaults below; checks that need the
 * MPI world (stage counts against ranks) stay in main.c. Not here: the schedule CSV (runtime.h).
 */
#ifndef TD_RUNFILE_H
#define TD_RUNFILE_H

#include <stdio.h>

#include "runtime.h"

/* Fills cfg from the file at path; TD_OK, or TD_ERR_IO / TD_ERR_CONFIG with a message in err
 * naming the file, the line and the key. */
td_status td_runfile_read(td_run_config *cfg, char *err, size_t errlen, const char *path);
/* The same over an open stream (path names it in messages; the caller closes it). */
td_status td_runfile_parse(td_run_config *cfg, char *err, size_t errlen, FILE *f, const char *path);

#endif /* TD_RUNFILE_H */
