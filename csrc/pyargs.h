/* The argument layer shared by both extensions (pyargs.c is compiled into bertqa._C and into bertqa._cuda):
 * array checks, the engine config from a dict, the token batch and the optimizer arguments of an Engine call,
 * and the Python exception for a bq_status. Each check returns NULL/0 with a TypeError (not an array, wrong
 * dtype) or ValueError (shape, layout, range) set that names the argument, what was expected and what was
 * received; MemoryError only for allocations.
 *
 * Include it first (it includes Python.h). The NumPy API table lives in pyargs.c (BQ_IMPORT_ARRAY): each module's
 * init calls bq_import_numpy() before anything else, so no file depends on the module file for it. */
#ifndef BERTQA_PYARGS_H
#define BERTQA_PYARGS_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
/* one NumPy API table per extension; setup.py gives bertqa._cuda its own name so the two never share a symbol */
#ifndef BQ_ARRAY_API
#define BQ_ARRAY_API bertqa_ARRAY_API
#endif
#define PY_ARRAY_UNIQUE_SYMBOL BQ_ARRAY_API
#ifndef BQ_IMPORT_ARRAY
#define NO_IMPORT_ARRAY
#endif
#ifndef NPY_NO_DEPRECATED_API
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#endif
#include <numpy/arrayobject.h>
#include <stdint.h>

#include "bertqa.h"   /* bq_status */
#include "model.h"    /* bq_config */

#define F(a) ((float *)PyArray_DATA(a))
#define I64(a) ((const int64_t *)PyArray_DATA(a))

int bq_import_numpy(void);   /* import_array(): 0, or -1 with the ImportError set */

/* ---- arrays ---------------------------------------------------------------------------------------------- */

void shape_str(PyArrayObject *a, char *buf, size_t n);   /* "(2, 5)" */
/* min_nd..max_nd dimensions, non-empty, C-contiguous, aligned, native byte order, dims <= INT_MAX (writeable) */
int check_layout(PyArrayObject *a, const char *name, int min_nd, int max_nd, int writeable);
int is_ndarray(PyObject *obj, const char *name, const char *what);
/* borrowed float32 array, no copy (float64 is an error, not a silent cast) */
PyArrayObject *f32_arg(PyObject *obj, const char *name, int min_nd, int max_nd, int writeable);
/* borrowed float32 array of exactly n elements in any shape (nd == 0) or in nd dimensions; why (or NULL) says
 * where n comes from. None gives *out = NULL when optional. */
int f32_sized(PyObject *obj, const char *name, int nd, size_t n, const char *why, int writeable, int optional,
              PyArrayObject **out);
/* new reference: int64 view/copy of an integer array of nd dimensions (int32 ids are widened) */
PyArrayObject *ids_arg(PyObject *obj, const char *name, int nd);
/* new reference in *out: int64 ids of exactly n elements in any shape; None gives NULL when optional */
int ids_sized(PyObject *obj, const char *name, size_t n, int optional, PyArrayObject **out);
/* new reference: float32 [B,T] 0/1 mask from a bool, integer or float array */
PyArrayObject *mask_arg(PyObject *obj, const char *name, int B, int T);
/* new reference in *out (NULL for None): window_ids, B integers in [0, 2^40) (the dropout numbering stays below
 * 2^64 at BERT's sizes); any integer sequence that casts safely */
int window_ids_arg(PyObject *obj, int B, PyArrayObject **out);
int same_shape(PyArrayObject *a, const char *an, PyArrayObject *b, const char *bn);
/* dim(a, axis) == expected, else ValueError "<name>.shape[axis] must be <expected> (<why>), got <n>" */
int dim_is(PyArrayObject *a, const char *name, int axis, npy_intp expected, const char *why);
/* x finite and in [lo, hi] ([lo, hi) when hi_open) */
int finite_in(double x, const char *name, double lo, double hi, int hi_open);
/* every int64 of a in [0, limit); table names what the limit is */
int check_id_range(PyArrayObject *a, const char *name, long long limit, const char *table);

/* ---- an Engine's arguments (both engines take the same ones) ---------------------------------------------- */

/* bq_config from a Hugging Face config dict (vocab_size, ..., layer_norm_eps, the dropouts, pad_token_id) */
int bq_config_from_dict(PyObject *cfg, bq_config *c);

/* The token batch: ids [B,T] integers in [0, V), T <= P; types [B,T] in [0, NT) or None; mask [B,T] 0/1 or None.
 * New references (NULL for None); bq_batch_release frees them, also after a failed parse. */
typedef struct {
    PyArrayObject *ids, *types, *mask;
    int B, T;
} bq_batch;
int bq_batch_parse(bq_batch *b, PyObject *io, PyObject *to, PyObject *mo, const bq_config *c);
void bq_batch_release(bq_batch *b);

/* The arguments of Engine.forward / forward_backward / adamw_step, the same for both engines (their signatures and
 * docstrings: csrc/engine_py.c); each parse checks everything a backend needs before any work starts. */
int bq_parse_forward(PyObject *args, PyObject *kw, const bq_config *c, bq_batch *b);

typedef struct {
    bq_batch batch;
    PyArrayObject *start_positions, *end_positions;   /* int64 [B], new references */
    PyArrayObject *window_ids;                        /* int64 [B] (window_ids_arg) or NULL: row b is window b */
    unsigned long long seed;
    unsigned int step;
    double loss_scale;
} bq_train_batch;
int bq_parse_forward_backward(PyObject *args, PyObject *kw, const bq_config *c, bq_train_batch *t);
void bq_train_batch_release(bq_train_batch *t);

typedef struct {
    const uint8_t *decay;   /* [ntensors] weight-decay flags */
    const float *lr_scale;  /* [ntensors] lr multipliers, NULL: all 1 */
    int step;
    double lr, beta1, beta2, eps, weight_decay, max_grad_norm;
} bq_adamw_step_args;
int bq_parse_adamw_step(PyObject *args, PyObject *kw, int ntensors, bq_adamw_step_args *a);

/* AdamW's step and hyperparameters as both adamw kernels and both engines accept them */
int bq_adamw_args_check(int step, double lr, double beta1, double beta2, double eps, double weight_decay);

/* start, end: new float32 [B,T] arrays for the logits of batch b */
int bq_new_logits(const bq_batch *b, PyArrayObject **start, PyArrayObject **end);

/* Waits for an engine's lock with the GIL released (a call from another thread may hold it for seconds). */
void bq_lock_wait(PyThread_type_lock lock);

/* ---- errors ----------------------------------------------------------------------------------------------- */

/* Sets the exception for a nonzero status and returns NULL: MemoryError for BQ_ERR_NOMEM, ValueError for
 * BQ_ERR_ARG and BQ_ERR_INDEX, RuntimeError for any other (the CUDA backend's device errors); the message is
 * "<what>: <text>" plus ": <detail>" when detail is non-empty. */
PyObject *bq_raise_status(int st, const char *what, const char *text, const char *detail);
/* The CPU core's statuses (csrc/threads.c's strings; inline, so bertqa._cuda never links it). */
static inline PyObject *status_error(int st, const char *what) {
    return bq_raise_status(st, what, bq_status_string(st), NULL);
}

#endif
