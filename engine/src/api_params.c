/* api_params.c — the ABI's parameter-table and file entry points: the table's rows, copying one
 * tensor's parameters or gradients in and out, the device gradient buffer, safetensors weights,
 * training checkpoints and the non-finite check. Not here: the passes (api_passes.c) or a
 * handle's configuration (api.c). Every failure returns a status with a message on the handle.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "api.h"
#include "internal.h"

/* ---- parameter table ------------------------------------------------------------------------- */

td_status td_model_num_params(const td_model *m, int32_t *out) {
    REQUIRE_BUILT("td_model_num_params");
    if (!out) return td_fail((td_model *)m, TD_ERR_ARG, "td_model_num_params: out is NULL");
    *out = m->nparams;
    return TD_OK;
}

td_status td_model_param_info(const td_model *m, int32_t index, const char **name, int32_t *ndim,
                              int64_t shape[4], int64_t *numel, int32_t *decayed) {
    REQUIRE_BUILT("td_model_param_info");
    if (index < 0 || index >= m->nparams)
        return td_fail((td_model *)m, TD_ERR_RANGE, "td_model_param_info: index %d outside [0, %d)", index, m->nparams);
    const td_param *p = &m->params[index];
    if (name) *name = p->name;
    if (ndim) *ndim = p->ndim;
    if (shape) memcpy(shape, p->shape, sizeof p->shape);
    if (numel) *numel = p->numel;
    if (decayed) *decayed = p->decayed;
    return TD_OK;
}

static td_status lookup(td_model *m, const char *fn, const char *name, int64_t numel, td_param **out) {
    if (!name) return td_fail(m, TD_ERR_ARG, "%s: name is NULL", fn);
    td_param *p = td_find_param(m, name);
    if (!p)
        return td_fail(m, TD_ERR_ARG, "%s: no parameter '%s' on stage %lld (layers [%lld, %lld)). HINT: td_model_param_info lists this stage's table",
                       fn, name, (long long)m->stage, (long long)m->layer_begin, (long long)m->layer_end);
    if (numel != p->numel)
        return td_fail(m, TD_ERR_ARG, "%s: '%s' has %lld elements, the buffer %lld", fn, name, (long long)p->numel, (long long)numel);
    *out = p;
    return TD_OK;
}

static td_status copy_tensor(td_model *m, const char *fn, td_real *base, const char *name,
                             float *out, const float *in, int64_t numel) {
    REQUIRE_BUILT("td_model_get_param/set_param");
    td_param *p = NULL;
    td_status st = lookup(m, fn, name, numel, &p);
    if (st) return st;
    if (!(out || in)) return td_fail(m, TD_ERR_ARG, "%s: buffer is NULL", fn);
    td_real *t = base + p->offset;
    const int grads = base == m->grad_mem;
    /* with a device backend the host buffer is a staging copy: refresh it first, so that setting
     * one tensor uploads current values for all the others */
    if (m->ops && (st = m->ops->download(m, grads))) return st;
    if (out) for (int64_t i = 0; i < numel; i++) out[i] = (float)t[i];
    else for (int64_t i = 0; i < numel; i++) t[i] = (td_real)in[i];
    if (in && m->ops && (st = m->ops->upload(m, grads))) return st;
    return TD_OK;
}

td_status td_model_get_param(td_model *m, float *out, const char *name, int64_t numel) {
    if (m && !out) return td_fail(m, TD_ERR_ARG, "td_model_get_param: out is NULL");
    return copy_tensor(m, "td_model_get_param", m ? m->param_mem : NULL, name, out, NULL, numel);
}
td_status td_model_set_param(td_model *m, const char *name, const float *in, int64_t numel) {
    if (m && !in) return td_fail(m, TD_ERR_ARG, "td_model_set_param: in is NULL");
    return copy_tensor(m, "td_model_set_param", m ? m->param_mem : NULL, name, NULL, in, numel);
}
td_status td_model_get_grad(td_model *m, float *out, const char *name, int64_t numel) {
    if (m && !out) return td_fail(m, TD_ERR_ARG, "td_model_get_grad: out is NULL");
    return copy_tensor(m, "td_model_get_grad", m ? m->grad_mem : NULL, name, out, NULL, numel);
}
td_status td_model_set_grad(td_model *m, const char *name, const float *in, int64_t numel) {
    if (m && !in) return td_fail(m, TD_ERR_ARG, "td_model_set_grad: in is NULL");
    return copy_tensor(m, "td_model_set_grad", m ? m->grad_mem : NULL, name, NULL, in, numel);
}

td_status td_model_load_safetensors(td_model *m, const char *path) {
    REQUIRE_BUILT("td_model_load_safetensors");
    if (!path) return td_fail(m, TD_ERR_ARG, "td_model_load_safetensors: path is NULL");
    td_status st = td_load_safetensors(m, path);
    if (st == TD_OK && m->ops) st = m->ops->upload(m, 0);
    return st;
}

td_status td_model_save_safetensors(td_model *m, const char *path) {
    REQUIRE_BUILT("td_model_save_safetensors");
    if (!path) return td_fail(m, TD_ERR_ARG, "td_model_save_safetensors: path is NULL");
    td_status st = m->ops ? m->ops->download(m, 0) : TD_OK;
    return st ? st : td_save_safetensors(m, path, 0);
}

td_status td_model_save_grads_safetensors(td_model *m, const char *path) {
    REQUIRE_BUILT("td_model_save_grads_safetensors");
    if (!path) return td_fail(m, TD_ERR_ARG, "td_model_save_grads_safetensors: path is NULL");
    td_status st = m->ops ? m->ops->download(m, 1) : TD_OK;
    return st ? st : td_save_safetensors(m, path, 1);
}

td_status td_model_save_checkpoint(td_model *m, const char *path, int64_t data_position) {
    REQUIRE_BUILT("td_model_save_checkpoint");
    if (!path) return td_fail(m, TD_ERR_ARG, "td_model_save_checkpoint: path is NULL");
    if (data_position < 0)
        return td_fail(m, TD_ERR_ARG, "td_model_save_checkpoint: data_position=%lld must be >= 0", (long long)data_position);
    td_status st = m->ops ? m->ops->download(m, 0) : TD_OK;
    if (!st && m->ops) st = m->ops->opt_download(m);
    return st ? st : td_save_checkpoint(m, path, data_position);
}

td_status td_model_load_checkpoint(td_model *m, const char *path, int64_t *out_data_position) {
    REQUIRE_BUILT("td_model_load_checkpoint");
    if (!path) return td_fail(m, TD_ERR_ARG, "td_model_load_checkpoint: path is NULL");
    td_status st = td_load_checkpoint(m, path, out_data_position);
    if (!st && m->ops) st = m->ops->upload(m, 0);
    if (!st && m->ops) st = m->ops->opt_upload(m);
    return st;
}

/* the first tensor of a flat buffer holding a non-finite element among the first `elems`
 * elements; -1 when all are finite */
static int32_t first_nonfinite(const td_model *m, const td_real *buf, int64_t elems) {
    for (int32_t i = 0; i < m->nparams && (int64_t)m->params[i].offset < elems; i++) {
        const td_real *x = buf + m->params[i].offset;
        for (int64_t j = 0; j < m->params[i].numel; j++)
            if (!isfinite(x[j])) return i;
    }
    return -1;
}

td_status td_model_find_nonfinite(td_model *m, const char **out_name, int32_t *out_what) {
    REQUIRE_BUILT("td_model_find_nonfinite");
    if (!out_name || !out_what) return td_fail(m, TD_ERR_ARG, "td_model_find_nonfinite: NULL output");
    td_status st = m->ops ? m->ops->download(m, 1) : TD_OK;
    if (!st && m->ops) st = m->ops->download(m, 0);
    if (st) return st;
    *out_name = NULL, *out_what = 0;
    /* the gradients the global norm counts (a last stage's tied wte copy is the first stage's) */
    int32_t i = first_nonfinite(m, m->grad_mem, td_grad_norm_elems(m));
    if (i >= 0) return *out_name = m->params[i].name, *out_what = 1, TD_OK;
    if ((i = first_nonfinite(m, m->param_mem, (int64_t)m->total)) >= 0) *out_name = m->params[i].name, *out_what = 2;
    return TD_OK;
}

td_status td_model_grad_data(td_model *m, void **out, const char *name, int64_t numel) {
    REQUIRE_BUILT("td_model_grad_data");
    if (!out) return td_fail(m, TD_ERR_ARG, "td_model_grad_data: out is NULL");
    td_param *p = NULL;
    td_status st = lookup(m, "td_model_grad_data", name, numel, &p);
    if (st) return st;
    if (m->ops) return m->ops->grad_data(m, out, p->offset);
    *out = m->grad_mem + p->offset;
    return TD_OK;
}
