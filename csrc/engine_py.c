/* bertqa._C.Engine: the whole-model engine (model.c) as a Python type.
 *
 * The four flat buffers (parameters, gradients, Adam m and v) are NumPy float32 arrays that Python creates and
 * the engine holds references to, so Python sees named tensors as zero-copy views for loading and saving.
 * One call = one forward (or forward + backward, or optimizer step) with the GIL released; a per-engine lock
 * serialises calls from several threads, since they share the activation arena. forward, forward_backward,
 * adamw_step and tensor_sizes are engine_methods.c's, shared with bertqa._cuda.Engine, through cpu_backend below;
 * arena_bytes, profile and release_arena are this engine's own.
 */
#include "pymodule.h"
#include "engine_methods.h"
#include <stdlib.h>
#include <string.h>

#include "bertqa.h"
#include "cpu.h"
#include "model.h"

typedef struct {
    bq_engine base;                          /* base.model = &model once initialised */
    bq_model model;
    PyArrayObject *params, *grads, *m, *v;   /* owned; grads/m/v may be NULL (inference) */
} Engine;

/* ---- the backend for engine_methods.c ---------------------------------------------------------------------- */

static int cpu_training(const void *model) { return ((const bq_model *)model)->grads != NULL; }

static const size_t *cpu_offsets(const void *model, int *ntensors) {
    const bq_model *m = model;
    *ntensors = m->ntensors;
    return m->offsets;
}

static int cpu_forward(void *model, const bq_batch *b, float *start, float *end) {
    return bq_forward(model, I64(b->ids), b->types ? I64(b->types) : NULL, b->mask ? F(b->mask) : NULL, b->B, b->T,
                      0, 0, 0, NULL, start, end);
}

static int cpu_forward_backward(void *model, const bq_train_batch *t, float *loss) {
    const bq_batch *b = &t->batch;
    const int64_t *types = b->types ? I64(b->types) : NULL, *win = t->window_ids ? I64(t->window_ids) : NULL;
    const float *mask = b->mask ? F(b->mask) : NULL;
    int st = bq_forward(model, I64(b->ids), types, mask, b->B, b->T, 1, t->seed, t->step, win, NULL, NULL);
    if (!st)
        st = bq_backward(model, I64(b->ids), types, mask, I64(t->start_positions), I64(t->end_positions), t->seed,
                         t->step, win, (float)t->loss_scale, loss);
    return st;
}

/* the CPU step cannot fail once its arguments are checked */
static int cpu_adamw_step(void *model, const bq_adamw_step_args *a, double *norm) {
    *norm = bq_adamw_step(model, a->decay, a->lr_scale, (float)a->lr, (float)a->beta1, (float)a->beta2,
                          (float)a->eps, (float)a->weight_decay, (float)a->max_grad_norm, a->step);
    return 0;
}

static const bq_engine_backend cpu_backend = {
    .inference_only = "this Engine was built for inference (no grads, m, v buffers)",
    .training = cpu_training,
    .offsets = cpu_offsets,
    .forward = cpu_forward,
    .forward_backward = cpu_forward_backward,
    .adamw_step = cpu_adamw_step,
    .raise = status_error,
};

/* ---- the type ----------------------------------------------------------------------------------------------- */

static void engine_dealloc(Engine *self) {
    if (self->base.model) bq_model_free(&self->model);
    Py_XDECREF(self->params);
    Py_XDECREF(self->grads);
    Py_XDECREF(self->m);
    Py_XDECREF(self->v);
    if (self->base.lock) PyThread_free_lock(self->base.lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A 1-D float32 buffer of the model's n parameters, or None when optional. New reference in *out. */
static int flat_arg(PyObject *obj, const char *name, size_t n, int optional, PyArrayObject **out) {
    if (!f32_sized(obj, name, 1, n, "the model's parameter count", 1, optional, out)) return 0;
    Py_XINCREF(*out);
    return 1;
}

static int engine_init(Engine *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "params", "grads", "m", "v", "precision", "int8_activations", NULL};
    PyObject *cfg, *po, *go = Py_None, *mo = Py_None, *vo = Py_None;
    const char *prec_name = "fp32", *act = "token";
    if (self->base.model) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O|OOOss:Engine", kwlist, &PyDict_Type, &cfg, &po, &go, &mo, &vo,
                                     &prec_name, &act))
        return -1;
    const int prec = !strcmp(prec_name, "fp32") ? BQ_PREC_FP32 : !strcmp(prec_name, "bf16") ? BQ_PREC_BF16
                     : !strcmp(prec_name, "int8") ? BQ_PREC_INT8 : -1;
    if (prec < 0) {
        PyErr_Format(PyExc_ValueError, "precision must be 'fp32', 'bf16' or 'int8', got '%s'", prec_name);
        return -1;
    }
    if (strcmp(act, "token") && strcmp(act, "tensor")) {
        PyErr_Format(PyExc_ValueError, "int8_activations must be 'token' or 'tensor', got '%s'", act);
        return -1;
    }
    const char *missing = NULL;
    if (prec != BQ_PREC_FP32 && !bq_cpu_lowp(prec, &missing)) {
        PyErr_Format(PyExc_RuntimeError, "precision '%s' on the CPU needs %s; use precision='fp32'", prec_name,
                     missing);
        return -1;
    }
    if (prec == BQ_PREC_INT8 && go != Py_None) {
        PyErr_SetString(PyExc_ValueError, "precision 'int8' is for inference: an int8 Engine takes no grads, m, v "
                                          "(fine-tune in 'bf16' or 'fp32')");
        return -1;
    }
    /* __init__ may run again after a failed one: drop what that one took */
    Py_CLEAR(self->params);
    Py_CLEAR(self->grads);
    Py_CLEAR(self->m);
    Py_CLEAR(self->v);
    bq_config c;
    if (!bq_config_from_dict(cfg, &c)) return -1;
    int ntensors = bq_tensor_sizes(&c, NULL);
    size_t *sizes = malloc(sizeof(size_t) * ntensors);
    if (!sizes) {
        PyErr_NoMemory();
        return -1;
    }
    bq_tensor_sizes(&c, sizes);
    size_t n = 0;
    for (int i = 0; i < ntensors; i++) n += sizes[i];
    free(sizes);
    if (!flat_arg(po, "params", n, 0, &self->params) || !flat_arg(go, "grads", n, 1, &self->grads) ||
        !flat_arg(mo, "m", n, 1, &self->m) || !flat_arg(vo, "v", n, 1, &self->v))
        return -1;
    if (!!self->grads != !!self->m || !!self->m != !!self->v) {
        PyErr_SetString(PyExc_ValueError, "pass grads, m and v together (training) or none of them (inference)");
        return -1;
    }
    if (!self->base.lock && !(self->base.lock = PyThread_allocate_lock())) {   /* kept from a failed __init__ */
        PyErr_NoMemory();
        return -1;
    }
    int st = bq_model_init(&self->model, &c, F(self->params), self->grads ? F(self->grads) : NULL,
                           self->m ? F(self->m) : NULL, self->v ? F(self->v) : NULL);
    if (!st) st = bq_model_set_precision(&self->model, prec, !strcmp(act, "tensor"));
    if (st) {
        status_error(st, "Engine");
        return -1;
    }
    self->base.backend = &cpu_backend;
    self->base.cfg = c;
    self->base.model = &self->model;
    return 0;
}

static PyObject *engine_arena_bytes(Engine *self, PyObject *noargs) {
    if (!bq_engine_ready(&self->base, 0)) return NULL;
    return PyLong_FromSize_t(self->model.arena_floats * sizeof(float));
}

static PyObject *engine_profile(Engine *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"reset", NULL};
    int reset = 0;
    if (!bq_engine_ready(&self->base, 0) || !PyArg_ParseTupleAndKeywords(args, kwargs, "|p:profile", kwlist, &reset))
        return NULL;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    bq_lock_wait(self->base.lock);
    for (int i = 0; i < BQ_PROF_N; i++) {
        PyObject *v = PyFloat_FromDouble(self->model.prof[i]);
        if (!v || PyDict_SetItemString(d, bq_prof_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            PyThread_release_lock(self->base.lock);
            return NULL;
        }
        Py_DECREF(v);
        if (reset) self->model.prof[i] = 0.0;
    }
    PyThread_release_lock(self->base.lock);
    return d;
}

static PyObject *engine_release_arena(Engine *self, PyObject *noargs) {
    if (!bq_engine_ready(&self->base, 0)) return NULL;
    bq_lock_wait(self->base.lock);
    free(self->model.arena);
    self->model.arena = NULL;
    self->model.arena_floats = 0;
    self->model.train = 0;
    PyThread_release_lock(self->base.lock);
    Py_RETURN_NONE;
}

static PyObject *engine_weights_changed(Engine *self, PyObject *noargs) {
    if (!bq_engine_ready(&self->base, 0)) return NULL;
    bq_lock_wait(self->base.lock);
    bq_model_weights_changed(&self->model);
    PyThread_release_lock(self->base.lock);
    Py_RETURN_NONE;
}

static PyObject *engine_precision(Engine *self, void *closure) {
    if (!bq_engine_ready(&self->base, 0)) return NULL;
    static const char *const names[] = {"fp32", "bf16", "int8"};
    return PyUnicode_FromString(names[self->model.precision]);
}

static PyGetSetDef engine_getset[] = {
    {"precision", (getter)engine_precision, NULL, "'fp32', 'bf16' or 'int8': the matrix products' precision", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef engine_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))bq_engine_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(input_ids, token_type_ids=None, attention_mask=None)\n--\n\n"
     "Eval-mode forward: int [B,T] ids -> (start_logits, end_logits), float32 [B,T]; -inf after each row's last "
     "real token (padding is not computed)."},
    {"forward_backward", (PyCFunction)(void (*)(void))bq_engine_forward_backward, METH_VARARGS | METH_KEYWORDS,
     "forward_backward(input_ids, token_type_ids, attention_mask, start_positions, end_positions, seed=0, step=0, "
     "loss_scale=1.0, window_ids=None)\n--\n\n"
     "Train-mode forward and backward; gradients ADD into grads (times loss_scale). Dropout masks are keyed by "
     "(seed, step, window, position, feature): window_ids int [B] (default 0..B-1) names each row's window, so a "
     "window draws the same masks in any batch. Returns the loss."},
    {"adamw_step", (PyCFunction)(void (*)(void))bq_engine_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(decay, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, "
     "lr_scale=None)\n--\n\n"
     "Global-norm clipping (max_grad_norm <= 0: none) and one AdamW step; decay[i] marks tensors with weight "
     "decay; lr_scale (float32 [ntensors], None: all 1) multiplies the learning rate of each tensor (layer-wise "
     "decay). Returns the gradient norm before clipping; a non-finite norm leaves everything unchanged."},
    {"tensor_sizes", (PyCFunction)bq_engine_tensor_sizes, METH_NOARGS,
     "tensor_sizes()\n--\n\nElement counts of the parameter tensors in buffer order."},
    {"arena_bytes", (PyCFunction)engine_arena_bytes, METH_NOARGS,
     "arena_bytes()\n--\n\nBytes of the activation arena now allocated."},
    {"profile", (PyCFunction)(void (*)(void))engine_profile, METH_VARARGS | METH_KEYWORDS,
     "profile(reset=False)\n--\n\nSeconds spent per kind of work (forward.linear, backward.attention, adamw, ...) "
     "since the engine was made or last reset; reset=True zeroes the counters after reading them."},
    {"weights_changed", (PyCFunction)engine_weights_changed, METH_NOARGS,
     "weights_changed()\n--\n\nThe parameters were written outside the engine: a bf16 / int8 engine remakes its "
     "low-precision copies of the weights at the next forward (an AdamW step does this itself)."},
    {"release_arena", (PyCFunction)engine_release_arena, METH_NOARGS,
     "release_arena()\n--\n\nFree the activation arena (it is reallocated on the next call)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bertqa._C.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(config, params, grads=None, m=None, v=None, precision='fp32', int8_activations='token')\n--\n\n"
              "BERT for question answering over flat float32 buffers (see bertqa.model.BertQA). precision: the "
              "linear layers' products in 'fp32' (OpenBLAS), 'bf16' (AVX-512 BF16; fp32 master weights, "
              "gradients and optimizer) or 'int8' (AVX-512 VNNI, inference: weights per output channel, "
              "activations per token or, int8_activations='tensor', per tensor). RuntimeError when the CPU lacks "
              "the instructions.",
    .tp_methods = engine_methods,
    .tp_getset = engine_getset,
    .tp_init = (initproc)engine_init,
    .tp_new = PyType_GenericNew,
};

int bq_add_engine_type(PyObject *module) {
    if (PyType_Ready(&EngineType) < 0) return -1;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(module, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        return -1;
    }
    return 0;
}
