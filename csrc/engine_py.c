/* bertqa._C.Engine: the whole-model engine (model.c) as a Python type.
 *
 * The four flat buffers (parameters, gradients, Adam m and v) are NumPy float32 arrays that Python creates and
 * the engine holds references to, so Python sees named tensors as zero-copy views for loading and saving.
 * One call = one forward (or forward + backward, or optimizer step) with the GIL released; a per-engine lock
 * serialises calls from several threads, since they share the activation arena.
 */
#include "pymodule.h"
#include <stdlib.h>

#include "bertqa.h"
#include "model.h"

typedef struct {
    PyObject_HEAD
    bq_model model;
    PyArrayObject *params, *grads, *m, *v;   /* owned; grads/m/v may be NULL (inference) */
    PyThread_type_lock lock;
    int ready;
} Engine;

static void engine_dealloc(Engine *self) {
    if (self->ready) bq_model_free(&self->model);
    Py_XDECREF(self->params);
    Py_XDECREF(self->grads);
    Py_XDECREF(self->m);
    Py_XDECREF(self->v);
    if (self->lock) PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A 1-D float32 buffer of the model's n parameters, or None when optional. New reference in *out. */
static int flat_arg(PyObject *obj, const char *name, size_t n, int optional, PyArrayObject **out) {
    if (!f32_sized(obj, name, 1, n, "the model's parameter count", 1, optional, out)) return 0;
    Py_XINCREF(*out);
    return 1;
}

static int engine_init(Engine *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "params", "grads", "m", "v", NULL};
    PyObject *cfg, *po, *go = Py_None, *mo = Py_None, *vo = Py_None;
    if (self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O|OOO:Engine", kwlist, &PyDict_Type, &cfg, &po, &go, &mo, &vo))
        return -1;
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
    if (!(self->lock = PyThread_allocate_lock())) {
        PyErr_NoMemory();
        return -1;
    }
    int st = bq_model_init(&self->model, &c, F(self->params), self->grads ? F(self->grads) : NULL,
                           self->m ? F(self->m) : NULL, self->v ? F(self->v) : NULL);
    if (st) {
        status_error(st, "Engine");
        return -1;
    }
    self->ready = 1;
    return 0;
}

static int check_ready(Engine *self, int training) {
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised");
        return 0;
    }
    if (training && !self->grads) {
        PyErr_SetString(PyExc_RuntimeError, "this Engine was built for inference (no grads, m, v buffers)");
        return 0;
    }
    return 1;
}

static PyObject *engine_forward(Engine *self, PyObject *args, PyObject *kw) {
    PyObject *result = NULL;
    bq_batch b = {0};
    PyArrayObject *start = NULL, *end = NULL;
    if (!check_ready(self, 0) || !bq_parse_forward(args, kw, &self->model.cfg, &b) || !bq_new_logits(&b, &start, &end))
        goto done;
    int st;
    bq_lock_wait(self->lock);
    Py_BEGIN_ALLOW_THREADS
    st = bq_forward(&self->model, I64(b.ids), b.types ? I64(b.types) : NULL, b.mask ? F(b.mask) : NULL, b.B, b.T, 0,
                    0, 0, NULL, F(start), F(end));
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    if (st) { status_error(st, "Engine.forward"); goto done; }
    result = Py_BuildValue("(OO)", start, end);
done:
    bq_batch_release(&b);
    Py_XDECREF(start);
    Py_XDECREF(end);
    return result;
}

static PyObject *engine_forward_backward(Engine *self, PyObject *args, PyObject *kw) {
    PyObject *result = NULL;
    bq_train_batch t = {0};
    if (!check_ready(self, 1) || !bq_parse_forward_backward(args, kw, &self->model.cfg, &t)) goto done;
    const bq_batch *b = &t.batch;
    const int64_t *types = b->types ? I64(b->types) : NULL, *win = t.window_ids ? I64(t.window_ids) : NULL;
    const float *mask = b->mask ? F(b->mask) : NULL;
    int st;
    float loss = 0.0f;
    bq_lock_wait(self->lock);
    Py_BEGIN_ALLOW_THREADS
    st = bq_forward(&self->model, I64(b->ids), types, mask, b->B, b->T, 1, t.seed, t.step, win, NULL, NULL);
    if (!st)
        st = bq_backward(&self->model, I64(b->ids), types, mask, I64(t.start_positions), I64(t.end_positions), t.seed,
                         t.step, win, (float)t.loss_scale, &loss);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    if (st) { status_error(st, "Engine.forward_backward"); goto done; }
    result = PyFloat_FromDouble(loss);
done:
    bq_train_batch_release(&t);
    return result;
}

static PyObject *engine_adamw_step(Engine *self, PyObject *args, PyObject *kw) {
    bq_adamw_step_args a;
    if (!check_ready(self, 1) || !bq_parse_adamw_step(args, kw, self->model.ntensors, &a)) return NULL;
    double norm;
    bq_lock_wait(self->lock);
    Py_BEGIN_ALLOW_THREADS
    norm = bq_adamw_step(&self->model, a.decay, a.lr_scale, (float)a.lr, (float)a.beta1, (float)a.beta2, (float)a.eps,
                         (float)a.weight_decay, (float)a.max_grad_norm, a.step);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->lock);
    return PyFloat_FromDouble(norm);
}

static PyObject *engine_tensor_sizes(Engine *self, PyObject *noargs) {
    if (!check_ready(self, 0)) return NULL;
    PyObject *list = PyList_New(self->model.ntensors);
    if (!list) return NULL;
    for (int i = 0; i < self->model.ntensors; i++) {
        PyObject *n = PyLong_FromSize_t(self->model.offsets[i + 1] - self->model.offsets[i]);
        if (!n) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, n);
    }
    return list;
}

static PyObject *engine_arena_bytes(Engine *self, PyObject *noargs) {
    return PyLong_FromSize_t(self->model.arena_floats * sizeof(float));
}

static PyObject *engine_profile(Engine *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"reset", NULL};
    int reset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|p:profile", kwlist, &reset)) return NULL;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    bq_lock_wait(self->lock);
    for (int i = 0; i < BQ_PROF_N; i++) {
        PyObject *v = PyFloat_FromDouble(self->model.prof[i]);
        if (!v || PyDict_SetItemString(d, bq_prof_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            PyThread_release_lock(self->lock);
            return NULL;
        }
        Py_DECREF(v);
        if (reset) self->model.prof[i] = 0.0;
    }
    PyThread_release_lock(self->lock);
    return d;
}

static PyObject *engine_release_arena(Engine *self, PyObject *noargs) {
    bq_lock_wait(self->lock);
    free(self->model.arena);
    self->model.arena = NULL;
    self->model.arena_floats = 0;
    self->model.train = 0;
    PyThread_release_lock(self->lock);
    Py_RETURN_NONE;
}

static PyMethodDef engine_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))engine_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(input_ids, token_type_ids=None, attention_mask=None)\n--\n\n"
     "Eval-mode forward: int [B,T] ids -> (start_logits, end_logits), float32 [B,T]; -inf after each row's last "
     "real token (padding is not computed)."},
    {"forward_backward", (PyCFunction)(void (*)(void))engine_forward_backward, METH_VARARGS | METH_KEYWORDS,
     "forward_backward(input_ids, token_type_ids, attention_mask, start_positions, end_positions, seed=0, step=0, "
     "loss_scale=1.0, window_ids=None)\n--\n\n"
     "Train-mode forward and backward; gradients ADD into grads (times loss_scale). Dropout masks are keyed by "
     "(seed, step, window, position, feature): window_ids int [B] (default 0..B-1) names each row's window, so a "
     "window draws the same masks in any batch. Returns the loss."},
    {"adamw_step", (PyCFunction)(void (*)(void))engine_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(decay, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, "
     "lr_scale=None)\n--\n\n"
     "Global-norm clipping (max_grad_norm <= 0: none) and one AdamW step; decay[i] marks tensors with weight "
     "decay; lr_scale (float32 [ntensors], None: all 1) multiplies the learning rate of each tensor (layer-wise "
     "decay). Returns the gradient norm before clipping; a non-finite norm leaves everything unchanged."},
    {"tensor_sizes", (PyCFunction)engine_tensor_sizes, METH_NOARGS,
     "tensor_sizes()\n--\n\nElement counts of the parameter tensors in buffer order."},
    {"arena_bytes", (PyCFunction)engine_arena_bytes, METH_NOARGS,
     "arena_bytes()\n--\n\nBytes of the activation arena now allocated."},
    {"profile", (PyCFunction)(void (*)(void))engine_profile, METH_VARARGS | METH_KEYWORDS,
     "profile(reset=False)\n--\n\nSeconds spent per kind of work (forward.linear, backward.attention, adamw, ...) "
     "since the engine was made or last reset; reset=True zeroes the counters after reading them."},
    {"release_arena", (PyCFunction)engine_release_arena, METH_NOARGS,
     "release_arena()\n--\n\nFree the activation arena (it is reallocated on the next call)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bertqa._C.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(config, params, grads=None, m=None, v=None)\n--\n\n"
              "BERT for question answering over flat float32 buffers (see bertqa.model.BertQA).",
    .tp_methods = engine_methods,
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
