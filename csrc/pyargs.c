/* The argument layer of bertqa._C and bertqa._cuda (see pyargs.h). Plain CPython + NumPy C API; it calls nothing
 * of either backend, so both extensions link it as it is. */
#define BQ_IMPORT_ARRAY   /* the NumPy API table of the extension is defined here */
#include "pyargs.h"
#include <limits.h>
#include <math.h>
#include <string.h>

int bq_import_numpy(void) {
    import_array1(-1);
    return 0;
}

/* ---- arrays ---------------------------------------------------------------------------------------------- */

void shape_str(PyArrayObject *a, char *buf, size_t n) {
    int nd = PyArray_NDIM(a), off = 0;
    off += snprintf(buf + off, n - off, "(");
    for (int i = 0; i < nd && off < (int)n; i++)
        off += snprintf(buf + off, n - off, "%s%ld", i ? ", " : "", (long)PyArray_DIM(a, i));
    if (off < (int)n) snprintf(buf + off, n - off, nd == 1 ? ",)" : ")");
}

static int layout_ok(PyArrayObject *a, const char *name, int min_nd, int max_nd, int writeable, int allow_empty) {
    char shp[128];
    int nd = PyArray_NDIM(a);
    shape_str(a, shp, sizeof shp);
    if (nd < min_nd || nd > max_nd) {
        if (min_nd == max_nd)
            PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d (shape %s)", name, min_nd, nd, shp);
        else
            PyErr_Format(PyExc_ValueError, "%s must have %d to %d dimensions, got %d (shape %s)", name, min_nd,
                         max_nd, nd, shp);
        return 0;
    }
    if (PyArray_SIZE(a) == 0 && !allow_empty) {
        PyErr_Format(PyExc_ValueError, "%s is empty (shape %s)", name, shp);
        return 0;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous (shape %s); pass np.ascontiguousarray(%s)", name,
                     shp, name);
        return 0;
    }
    if (!PyArray_ISALIGNED(a) || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned and in native byte order", name);
        return 0;
    }
    if (writeable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be writeable: it is updated in place", name);
        return 0;
    }
    for (int i = 0; i < nd; i++)
        if (PyArray_DIM(a, i) > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d is %ld, larger than %d", name, i,
                         (long)PyArray_DIM(a, i), INT_MAX);
            return 0;
        }
    return 1;
}

int check_layout(PyArrayObject *a, const char *name, int min_nd, int max_nd, int writeable) {
    return layout_ok(a, name, min_nd, max_nd, writeable, 0);
}

int is_ndarray(PyObject *obj, const char *name, const char *what) {
    if (obj == NULL || obj == Py_None || !PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray of %s, got %s", name, what,
                     obj ? Py_TYPE(obj)->tp_name : "nothing");
        return 0;
    }
    return 1;
}

static int is_f32(PyObject *obj, const char *name) {
    if (!is_ndarray(obj, name, "float32")) return 0;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32, got %s; convert with %s.astype(np.float32)",
                     name, PyArray_DESCR(a)->typeobj->tp_name, name);
        return 0;
    }
    return 1;
}

PyArrayObject *f32_arg(PyObject *obj, const char *name, int min_nd, int max_nd, int writeable) {
    if (!is_f32(obj, name)) return NULL;
    PyArrayObject *a = (PyArrayObject *)obj;
    return check_layout(a, name, min_nd, max_nd, writeable) ? a : NULL;
}

static int size_is(PyArrayObject *a, const char *name, size_t n, const char *why) {
    if ((size_t)PyArray_SIZE(a) == n) return 1;
    PyErr_Format(PyExc_ValueError, "%s must have %zu elements%s%s%s, got %zd", name, n, why ? " (" : "", why ? why : "",
                 why ? ")" : "", (Py_ssize_t)PyArray_SIZE(a));
    return 0;
}

int f32_sized(PyObject *obj, const char *name, int nd, size_t n, const char *why, int writeable, int optional,
              PyArrayObject **out) {
    *out = NULL;
    if (obj == Py_None && optional) return 1;
    if (!is_f32(obj, name)) return 0;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!layout_ok(a, name, nd ? nd : 0, nd ? nd : NPY_MAXDIMS, writeable, n == 0) || !size_is(a, name, n, why))
        return 0;
    *out = a;
    return 1;
}

static int is_int_array(PyObject *obj, const char *name) {
    if (!is_ndarray(obj, name, "integers (int64 or int32)")) return 0;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!PyArray_ISINTEGER(a)) {
        PyErr_Format(PyExc_TypeError, "%s must have an integer dtype (int64 or int32), got %s", name,
                     PyArray_DESCR(a)->typeobj->tp_name);
        return 0;
    }
    return 1;
}

static PyArrayObject *as_int64(PyObject *obj) {
    return (PyArrayObject *)PyArray_FROMANY(obj, NPY_INT64, 0, 0, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                                                      NPY_ARRAY_FORCECAST);
}

PyArrayObject *ids_arg(PyObject *obj, const char *name, int nd) {
    if (!is_int_array(obj, name) || !check_layout((PyArrayObject *)obj, name, nd, nd, 0)) return NULL;
    return as_int64(obj);
}

int ids_sized(PyObject *obj, const char *name, size_t n, int optional, PyArrayObject **out) {
    *out = NULL;
    if (obj == Py_None && optional) return 1;
    if (!is_int_array(obj, name) || !layout_ok((PyArrayObject *)obj, name, 0, NPY_MAXDIMS, 0, n == 0) ||
        !size_is((PyArrayObject *)obj, name, n, NULL))
        return 0;
    return (*out = as_int64(obj)) != NULL;
}

PyArrayObject *mask_arg(PyObject *obj, const char *name, int B, int T) {
    if (!is_ndarray(obj, name, "0/1 values (bool, int or float)")) return NULL;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!(PyArray_ISBOOL(a) || PyArray_ISINTEGER(a) || PyArray_ISFLOAT(a))) {
        PyErr_Format(PyExc_TypeError, "%s must be a bool, integer or float array, got %s", name,
                     PyArray_DESCR(a)->typeobj->tp_name);
        return NULL;
    }
    if (!check_layout(a, name, 2, 2, 0)) return NULL;
    if (PyArray_DIM(a, 0) != B || PyArray_DIM(a, 1) != T) {
        char shp[128];
        shape_str(a, shp, sizeof shp);
        PyErr_Format(PyExc_ValueError, "%s must have shape (B, T) = (%d, %d), got %s", name, B, T, shp);
        return NULL;
    }
    PyArrayObject *m = (PyArrayObject *)PyArray_FROMANY(obj, NPY_FLOAT32, 2, 2,
                                                        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST);
    if (!m) return NULL;
    const float *p = PyArray_DATA(m);
    for (npy_intp i = 0; i < PyArray_SIZE(m); i++)
        if (p[i] != 0.0f && p[i] != 1.0f) {
            PyErr_Format(PyExc_ValueError, "%s must hold only 0 and 1 (0 = padding and 1 = real token), found %g at "
                         "flat index %ld", name, (double)p[i], (long)i);
            Py_DECREF(m);
            return NULL;
        }
    return m;
}

int window_ids_arg(PyObject *obj, int B, PyArrayObject **out) {
    *out = NULL;
    if (obj == Py_None) return 1;
    /* safe casting only: integers of any width that fit, not floats */
    PyArrayObject *a =
        (PyArrayObject *)PyArray_FROMANY(obj, NPY_INT64, 0, 0, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!a) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "window_ids must be None or a 1-D array of %d integers (int64), got %s", B,
                     Py_TYPE(obj)->tp_name);
        return 0;
    }
    if (PyArray_NDIM(a) != 1 || PyArray_DIM(a, 0) != B) {
        PyErr_Format(PyExc_ValueError, "window_ids must be a 1-D array of %d integers (one per batch row), got %d-D "
                     "with %zd elements", B, PyArray_NDIM(a), (Py_ssize_t)PyArray_SIZE(a));
        Py_DECREF(a);
        return 0;
    }
    for (int i = 0; i < B; i++)
        if (I64(a)[i] < 0 || I64(a)[i] >= (1LL << 40)) {
            PyErr_Format(PyExc_ValueError, "window_ids holds %lld at index %d: a window id must be in [0, 2^40)",
                         (long long)I64(a)[i], i);
            Py_DECREF(a);
            return 0;
        }
    *out = a;
    return 1;
}

int same_shape(PyArrayObject *a, const char *an, PyArrayObject *b, const char *bn) {
    if (PyArray_NDIM(a) == PyArray_NDIM(b) &&
        PyArray_CompareLists(PyArray_DIMS(a), PyArray_DIMS(b), PyArray_NDIM(a)))
        return 1;
    char sa[128], sb[128];
    shape_str(a, sa, sizeof sa);
    shape_str(b, sb, sizeof sb);
    PyErr_Format(PyExc_ValueError, "%s must have the same shape as %s: %s has shape %s, %s has shape %s", an, bn,
                 an, sa, bn, sb);
    return 0;
}

int dim_is(PyArrayObject *a, const char *name, int axis, npy_intp expected, const char *why) {
    if (axis < 0) axis += PyArray_NDIM(a);
    if (PyArray_DIM(a, axis) == expected) return 1;
    PyErr_Format(PyExc_ValueError, "%s.shape[%d] must be %ld (%s), got %ld", name, axis, (long)expected, why,
                 (long)PyArray_DIM(a, axis));
    return 0;
}

int finite_in(double x, const char *name, double lo, double hi, int hi_open) {
    if (isfinite(x) && x >= lo && (hi_open ? x < hi : x <= hi)) return 1;
    PyErr_Format(PyExc_ValueError, "%s must be in [%g, %g%s, got %g", name, lo, hi, hi_open ? ")" : "]", x);
    return 0;
}

int check_id_range(PyArrayObject *a, const char *name, long long limit, const char *table) {
    const int64_t *p = I64(a);
    for (npy_intp i = 0; i < PyArray_SIZE(a); i++)
        if (p[i] < 0 || p[i] >= limit) {
            PyErr_Format(PyExc_ValueError, "%s holds %lld at flat index %ld, outside [0, %lld) (%s)", name,
                         (long long)p[i], (long)i, limit, table);
            return 0;
        }
    return 1;
}

/* ---- an Engine's arguments ------------------------------------------------------------------------------- */

static int config_int(PyObject *cfg, const char *key, int *out) {
    PyObject *v = PyDict_GetItemString(cfg, key);   /* borrowed */
    if (!v) {
        PyErr_Format(PyExc_ValueError, "config is missing %s", key);
        return 0;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) return 0;
    if (x < 1 || x > (1L << 30)) {
        PyErr_Format(PyExc_ValueError, "config %s must be a positive integer, got %ld", key, x);
        return 0;
    }
    *out = (int)x;
    return 1;
}

/* a probability or epsilon in [0, 1) */
static int config_fraction(PyObject *cfg, const char *key, float *out) {
    PyObject *v = PyDict_GetItemString(cfg, key);
    if (!v) {
        PyErr_Format(PyExc_ValueError, "config is missing %s", key);
        return 0;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return 0;
    if (!isfinite(x) || x < 0.0 || x >= 1.0) {
        PyErr_Format(PyExc_ValueError, "config %s must be in [0, 1), got %g", key, x);
        return 0;
    }
    *out = (float)x;
    return 1;
}

int bq_config_from_dict(PyObject *cfg, bq_config *c) {
    if (!PyDict_Check(cfg)) {
        PyErr_Format(PyExc_TypeError, "config must be a dict (a Hugging Face config.json), got %s",
                     Py_TYPE(cfg)->tp_name);
        return 0;
    }
    if (!config_int(cfg, "vocab_size", &c->V) || !config_int(cfg, "max_position_embeddings", &c->P) ||
        !config_int(cfg, "type_vocab_size", &c->NT) || !config_int(cfg, "hidden_size", &c->C) ||
        !config_int(cfg, "num_hidden_layers", &c->L) || !config_int(cfg, "num_attention_heads", &c->NH) ||
        !config_int(cfg, "intermediate_size", &c->FF) || !config_fraction(cfg, "layer_norm_eps", &c->eps) ||
        !config_fraction(cfg, "hidden_dropout_prob", &c->hidden_dropout) ||
        !config_fraction(cfg, "attention_probs_dropout_prob", &c->attn_dropout))
        return 0;
    PyObject *pad = PyDict_GetItemString(cfg, "pad_token_id");
    c->pad_id = -1;
    if (pad && pad != Py_None && (c->pad_id = PyLong_AsLongLong(pad)) == -1 && PyErr_Occurred()) return 0;
    if (c->C % c->NH) {
        PyErr_Format(PyExc_ValueError, "hidden_size %d is not a multiple of num_attention_heads %d", c->C, c->NH);
        return 0;
    }
    return 1;
}

void bq_batch_release(bq_batch *b) {
    Py_CLEAR(b->ids);
    Py_CLEAR(b->types);
    Py_CLEAR(b->mask);
}

int bq_batch_parse(bq_batch *b, PyObject *io, PyObject *to, PyObject *mo, const bq_config *c) {
    memset(b, 0, sizeof *b);
    if (!(b->ids = ids_arg(io, "input_ids", 2))) return 0;
    const npy_intp B = PyArray_DIM(b->ids, 0), T = PyArray_DIM(b->ids, 1);
    if (B * T > (1L << 30)) {
        PyErr_Format(PyExc_ValueError, "input_ids has B * T = %ld tokens, more than 2^30", (long)(B * T));
        return 0;
    }
    b->B = (int)B;
    b->T = (int)T;
    if (b->T > c->P) {
        PyErr_Format(PyExc_ValueError, "input_ids has %d tokens per row, more than max_position_embeddings (%d)", b->T,
                     c->P);
        return 0;
    }
    if (!check_id_range(b->ids, "input_ids", c->V, "vocab_size")) return 0;
    if (to != Py_None && (!(b->types = ids_arg(to, "token_type_ids", 2)) ||
                          !same_shape(b->types, "token_type_ids", b->ids, "input_ids") ||
                          !check_id_range(b->types, "token_type_ids", c->NT, "type_vocab_size")))
        return 0;
    if (mo != Py_None && !(b->mask = mask_arg(mo, "attention_mask", b->B, b->T))) return 0;
    return 1;
}

static int targets_parse(PyObject *spo, PyObject *epo, PyObject *wo, int B, PyArrayObject **sp, PyArrayObject **ep,
                     PyArrayObject **win) {
    *sp = *ep = *win = NULL;
    return (*sp = ids_arg(spo, "start_positions", 1)) && (*ep = ids_arg(epo, "end_positions", 1)) &&
           dim_is(*sp, "start_positions", 0, B, "batch size") && dim_is(*ep, "end_positions", 0, B, "batch size") &&
           window_ids_arg(wo, B, win);
}

int bq_adamw_args_check(int step, double lr, double beta1, double beta2, double eps, double weight_decay) {
    if (step < 1) {
        PyErr_Format(PyExc_ValueError, "step counts from 1, got %d", step);
        return 0;
    }
    return finite_in(lr, "lr", 0.0, 1e3, 0) && finite_in(beta1, "beta1", 0.0, 1.0, 1) &&
           finite_in(beta2, "beta2", 0.0, 1.0, 1) && finite_in(eps, "eps", 0.0, 1.0, 0) &&
           finite_in(weight_decay, "weight_decay", 0.0, 1e3, 0);
}

static int decay_arg(PyObject *obj, int ntensors, const uint8_t **out) {
    if (!is_ndarray(obj, "decay", "uint8 flags, one per tensor")) return 0;
    PyArrayObject *d = (PyArrayObject *)obj;
    if (PyArray_TYPE(d) != NPY_UINT8 && PyArray_TYPE(d) != NPY_BOOL) {
        PyErr_Format(PyExc_TypeError, "decay must be a uint8 or bool array, got %s", PyArray_DESCR(d)->typeobj->tp_name);
        return 0;
    }
    if (!check_layout(d, "decay", 1, 1, 0) || !dim_is(d, "decay", 0, ntensors, "one flag per parameter tensor"))
        return 0;
    *out = (const uint8_t *)PyArray_DATA(d);
    return 1;
}

static int lr_scale_arg(PyObject *obj, int ntensors, const float **out) {
    *out = NULL;
    if (obj == Py_None) return 1;
    PyArrayObject *a = f32_arg(obj, "lr_scale", 1, 1, 0);
    if (!a || !dim_is(a, "lr_scale", 0, ntensors, "one multiplier per parameter tensor")) return 0;
    const float *s = F(a);
    for (int t = 0; t < ntensors; t++)
        if (!finite_in(s[t], "lr_scale[i]", 0.0, 1e3, 0)) return 0;
    *out = s;
    return 1;
}

int bq_parse_forward(PyObject *args, PyObject *kw, const bq_config *c, bq_batch *b) {
    static char *kwlist[] = {"input_ids", "token_type_ids", "attention_mask", NULL};
    PyObject *io, *to = Py_None, *mo = Py_None;
    memset(b, 0, sizeof *b);
    return PyArg_ParseTupleAndKeywords(args, kw, "O|OO:forward", kwlist, &io, &to, &mo) &&
           bq_batch_parse(b, io, to, mo, c);
}

void bq_train_batch_release(bq_train_batch *t) {
    bq_batch_release(&t->batch);
    Py_CLEAR(t->start_positions);
    Py_CLEAR(t->end_positions);
    Py_CLEAR(t->window_ids);
}

int bq_parse_forward_backward(PyObject *args, PyObject *kw, const bq_config *c, bq_train_batch *t) {
    static char *kwlist[] = {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions",
                             "seed", "step", "loss_scale", "window_ids", NULL};
    PyObject *io, *to, *mo, *spo, *epo, *wo = Py_None;
    memset(t, 0, sizeof *t);
    t->loss_scale = 1.0;
    /* window ids key the dropout masks (bq_rng) */
    return PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|KIdO:forward_backward", kwlist, &io, &to, &mo, &spo, &epo,
                                       &t->seed, &t->step, &t->loss_scale, &wo) &&
           bq_batch_parse(&t->batch, io, to, mo, c) &&
           targets_parse(spo, epo, wo, t->batch.B, &t->start_positions, &t->end_positions, &t->window_ids) &&
           finite_in(t->loss_scale, "loss_scale", 0.0, 1e30, 0);
}

int bq_parse_adamw_step(PyObject *args, PyObject *kw, int ntensors, bq_adamw_step_args *a) {
    static char *kwlist[] = {"decay", "step", "lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm",
                             "lr_scale", NULL};
    PyObject *dobj, *sobj = Py_None;
    a->beta1 = 0.9, a->beta2 = 0.999, a->eps = 1e-8, a->weight_decay = 0.0, a->max_grad_norm = 1.0;
    return PyArg_ParseTupleAndKeywords(args, kw, "Oid|dddddO:adamw_step", kwlist, &dobj, &a->step, &a->lr, &a->beta1,
                                       &a->beta2, &a->eps, &a->weight_decay, &a->max_grad_norm, &sobj) &&
           lr_scale_arg(sobj, ntensors, &a->lr_scale) && decay_arg(dobj, ntensors, &a->decay) &&
           bq_adamw_args_check(a->step, a->lr, a->beta1, a->beta2, a->eps, a->weight_decay) &&
           finite_in(a->max_grad_norm, "max_grad_norm", 0.0, 1e30, 0);
}

int bq_new_logits(const bq_batch *b, PyArrayObject **start, PyArrayObject **end) {
    npy_intp dims[2] = {b->B, b->T};
    *start = (PyArrayObject *)PyArray_EMPTY(2, dims, NPY_FLOAT32, 0);
    *end = *start ? (PyArrayObject *)PyArray_EMPTY(2, dims, NPY_FLOAT32, 0) : NULL;
    return *end != NULL;
}

void bq_lock_wait(PyThread_type_lock lock) {
    if (!PyThread_acquire_lock(lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
}

/* ---- errors ----------------------------------------------------------------------------------------------- */

PyObject *bq_raise_status(int st, const char *what, const char *text, const char *detail) {
    PyObject *type = st == BQ_ERR_NOMEM                         ? PyExc_MemoryError
                     : (st == BQ_ERR_ARG || st == BQ_ERR_INDEX) ? PyExc_ValueError
                                                                : PyExc_RuntimeError;
    const int more = detail && *detail;
    return PyErr_Format(type, "%s: %s%s%s", what, text, more ? ": " : "", more ? detail : "");
}
