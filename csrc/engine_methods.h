/* The Engine methods both extensions share (engine_methods.c is compiled into bertqa._C and into bertqa._cuda):
 * forward, forward_backward, adamw_step and tensor_sizes, each written once as
 *     parse (pyargs.c) -> the engine's lock -> the backend with the GIL released -> unlock -> status to exception
 *     -> the result.
 * An extension supplies a bq_engine_backend (its model behind these uniform signatures), an Engine struct that
 * starts with a bq_engine, its type object and its method table (its docstrings), plus whatever only it has:
 * bertqa._C's profile(), bertqa._cuda's enable_training(), download(), upload(), ... */
#ifndef BERTQA_ENGINE_METHODS_H
#define BERTQA_ENGINE_METHODS_H
#include "pyargs.h"

typedef struct {
    /* RuntimeError message of a training call on an engine built without gradients and Adam state */
    const char *inference_only;
    int (*training)(const void *model);
    const size_t *(*offsets)(const void *model, int *ntensors);   /* [ntensors + 1], host memory */
    /* run with the GIL released; each returns a bq_status */
    int (*forward)(void *model, const bq_batch *b, float *start, float *end);   /* eval mode; start, end [B,T] */
    int (*forward_backward)(void *model, const bq_train_batch *t, float *loss);
    int (*adamw_step)(void *model, const bq_adamw_step_args *a, double *norm);
    /* with the GIL: sets the exception for a nonzero status, "<what>: ...", and returns NULL */
    PyObject *(*raise)(int st, const char *what);
} bq_engine_backend;

/* The head of each extension's Engine object. */
typedef struct {
    PyObject_HEAD
    const bq_engine_backend *backend;
    void *model;               /* the backend's model; NULL until __init__ succeeds */
    bq_config cfg;             /* the model's config, for the batch checks */
    PyThread_type_lock lock;   /* serialises calls from several threads: they share the activation arena */
} bq_engine;

/* 1 when __init__ has succeeded (and, with training, the engine has gradients); else 0 with RuntimeError set */
int bq_engine_ready(bq_engine *e, int training);

PyObject *bq_engine_forward(bq_engine *e, PyObject *args, PyObject *kw);
PyObject *bq_engine_forward_backward(bq_engine *e, PyObject *args, PyObject *kw);
PyObject *bq_engine_adamw_step(bq_engine *e, PyObject *args, PyObject *kw);
PyObject *bq_engine_tensor_sizes(bq_engine *e, PyObject *noargs);

#endif
