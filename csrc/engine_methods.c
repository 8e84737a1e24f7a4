/* The Engine methods of bertqa._C and bertqa._cuda, through each one's bq_engine_backend (engine_methods.h). */
#include "engine_methods.h"

int bq_engine_ready(bq_engine *e, int training) {
    if (!e->model) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised");
        return 0;
    }
    if (training && !e->backend->training(e->model)) {
        PyErr_SetString(PyExc_RuntimeError, e->backend->inference_only);
        return 0;
    }
    return 1;
}

PyObject *bq_engine_forward(bq_engine *e, PyObject *args, PyObject *kw) {
    PyObject *result = NULL;
    bq_batch b = {0};
    PyArrayObject *start = NULL, *end = NULL;
    if (!bq_engine_ready(e, 0) || !bq_parse_forward(args, kw, &e->cfg, &b) || !bq_new_logits(&b, &start, &end))
        goto done;
    int st;
    bq_lock_wait(e->lock);
    Py_BEGIN_ALLOW_THREADS
    st = e->backend->forward(e->model, &b, F(start), F(end));
    Py_END_ALLOW_THREADS
    PyThread_release_lock(e->lock);
    if (st) { e->backend->raise(st, "Engine.forward"); goto done; }
    result = Py_BuildValue("(OO)", start, end);
done:
    bq_batch_release(&b);
    Py_XDECREF(start);
    Py_XDECREF(end);
    return result;
}

PyObject *bq_engine_forward_backward(bq_engine *e, PyObject *args, PyObject *kw) {
    PyObject *result = NULL;
    bq_train_batch t = {0};
    if (!bq_engine_ready(e, 1) || !bq_parse_forward_backward(args, kw, &e->cfg, &t)) goto done;
    int st;
    float loss = 0.0f;
    bq_lock_wait(e->lock);
    Py_BEGIN_ALLOW_THREADS
    st = e->backend->forward_backward(e->model, &t, &loss);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(e->lock);
    if (st) { e->backend->raise(st, "Engine.forward_backward"); goto done; }
    result = PyFloat_FromDouble(loss);
done:
    bq_train_batch_release(&t);
    return result;
}

PyObject *bq_engine_adamw_step(bq_engine *e, PyObject *args, PyObject *kw) {
    bq_adamw_step_args a;
    int ntensors;
    if (!bq_engine_ready(e, 1)) return NULL;
    e->backend->offsets(e->model, &ntensors);   /* decay and lr_scale hold one entry per tensor */
    if (!bq_parse_adamw_step(args, kw, ntensors, &a)) return NULL;
    double norm = 0.0;
    int st;
    bq_lock_wait(e->lock);
    Py_BEGIN_ALLOW_THREADS
    st = e->backend->adamw_step(e->model, &a, &norm);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(e->lock);
    if (st) return e->backend->raise(st, "Engine.adamw_step");
    return PyFloat_FromDouble(norm);
}

PyObject *bq_engine_tensor_sizes(bq_engine *e, PyObject *noargs) {
    if (!bq_engine_ready(e, 0)) return NULL;
    int nt;
    const size_t *off = e->backend->offsets(e->model, &nt);
    PyObject *list = PyList_New(nt);
    if (!list) return NULL;
    for (int i = 0; i < nt; i++) {
        PyObject *n = PyLong_FromSize_t(off[i + 1] - off[i]);
        if (!n) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, n);
    }
    return list;
}
