/* api.h — what the ABI's files (api.c, api_params.c, api_passes.c) share: the check that opens
 * every entry point needing a built model. Not a public header: tandem.h is.
 */
#ifndef TD_API_H
#define TD_API_H

#include "internal.h"

/* returns TD_ERR_ARG for a NULL model, TD_ERR_STATE before td_model_build; `m` names the handle */
#define REQUIRE_BUILT(fn)                                                                        \
    if (!m) return td_fail_global(TD_ERR_ARG, fn ": model is NULL");                             \
    if (!m->built) return td_fail((td_model *)m, TD_ERR_STATE, fn ": call td_model_build first");

#endif /* TD_API_H */
