/* bertqa._C's side of the run-time instruction-set choice (cpu.h): set_isa, and the row kernels of the dispatch
 * table one by one on NumPy arrays, for tests and benchmarks (underscore names: not part of bertqa.ops). */
#include "pyutil.h"
#include "bertqa.h"
#include "cpu.h"

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_isa", &name)) return NULL;
    bq_isa isa = bq_cpu_parse_isa(name);
    if (isa == BQ_ISA_COUNT)
        return PyErr_Format(PyExc_ValueError, "set_isa: expected 'auto', 'avx2' or 'avx512', got %R",
                            PyTuple_GET_ITEM(args, 0));
    if (bq_cpu_set_isa(isa) != BQ_OK)
        return PyErr_Format(PyExc_RuntimeError,
                            "set_isa(%R): this CPU (or this build) cannot run it; AVX-512 needs avx512f, avx512bw, "
                            "avx512dq and avx512vl (runtime_info()['isas'] lists what it can run)",
                            PyTuple_GET_ITEM(args, 0));
    return PyUnicode_FromString(bq_cpu_isa_name());
}

PyObject *bq_py_isas(void) {
    PyObject *isas = PyList_New(0);
    for (int i = 0; isas && i < BQ_ISA_COUNT; i++) {
        const char *name = bq_cpu_supports((bq_isa)i) ? bq_cpu_isa_label((bq_isa)i) : NULL;
        if (!name) continue;
        PyObject *s = PyUnicode_FromString(name);
        if (!s || PyList_Append(isas, s) < 0) Py_CLEAR(isas);
        Py_XDECREF(s);
    }
    return isas;
}

/* a fresh float32 copy of a C-contiguous float32 array, or NULL with an error set */
static PyArrayObject *copy_f32(PyObject *obj, const char *name, int nd) {
    PyArrayObject *a = f32_arg(obj, name, nd, nd, 0);
    return a ? (PyArrayObject *)PyArray_NewCopy(a, NPY_CORDER) : NULL;
}

/* _softmax_rows(x [N,T], mask [N,T] or None) -> softmax_row of each row */
static PyObject *py_softmax_rows(PyObject *self, PyObject *args) {
    PyObject *xo, *mo = Py_None;
    if (!PyArg_ParseTuple(args, "O|O:_softmax_rows", &xo, &mo)) return NULL;
    PyArrayObject *y = copy_f32(xo, "x", 2), *m = NULL;
    if (!y) return NULL;
    if (mo != Py_None && (!(m = f32_arg(mo, "mask", 2, 2, 0)) || !same_shape(m, "mask", y, "x"))) {
        Py_DECREF(y);
        return NULL;
    }
    const int N = (int)PyArray_DIM(y, 0), T = (int)PyArray_DIM(y, 1);
    const bq_kernels *k = bq_cpu();
    for (int i = 0; i < N; i++) k->softmax_row(F(y) + (long)i * T, m ? F(m) + (long)i * T : NULL, T);
    return (PyObject *)y;
}

/* _exp_rows(x [N,n], shift) -> (exp(x - shift) [N,n], row sums [N], row maxima [N]) */
static PyObject *py_exp_rows(PyObject *self, PyObject *args) {
    PyObject *xo;
    float shift;
    if (!PyArg_ParseTuple(args, "Of:_exp_rows", &xo, &shift)) return NULL;
    PyArrayObject *y = copy_f32(xo, "x", 2);
    if (!y) return NULL;
    const int N = (int)PyArray_DIM(y, 0), n = (int)PyArray_DIM(y, 1);
    npy_intp dims[1] = {N};
    PyArrayObject *sums = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_FLOAT32);
    PyArrayObject *maxs = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_FLOAT32);
    if (!sums || !maxs) {
        Py_XDECREF(sums);
        Py_XDECREF(maxs);
        Py_DECREF(y);
        return NULL;
    }
    const bq_kernels *k = bq_cpu();
    for (int i = 0; i < N; i++) {
        float *r = F(y) + (long)i * n;
        F(maxs)[i] = k->max_row(r, n);
        F(sums)[i] = k->exp_row(r, r, shift, n);
    }
    return Py_BuildValue("(NNN)", y, sums, maxs);
}

/* _softmax_backward_rows(g [N,n], a [N,n], mask [N,n] or None, scale) -> the softmax_backward_row of each row */
static PyObject *py_softmax_backward_rows(PyObject *self, PyObject *args) {
    PyObject *go, *ao, *mo;
    float scale;
    if (!PyArg_ParseTuple(args, "OOOf:_softmax_backward_rows", &go, &ao, &mo, &scale)) return NULL;
    PyArrayObject *g = copy_f32(go, "g", 2), *a = NULL, *m = NULL;
    if (!g) return NULL;
    if (!(a = f32_arg(ao, "a", 2, 2, 0)) || !same_shape(a, "a", g, "g") ||
        (mo != Py_None && (!(m = f32_arg(mo, "mask", 2, 2, 0)) || !same_shape(m, "mask", g, "g")))) {
        Py_DECREF(g);
        return NULL;
    }
    const int N = (int)PyArray_DIM(g, 0), n = (int)PyArray_DIM(g, 1);
    const bq_kernels *k = bq_cpu();
    for (int i = 0; i < N; i++)
        k->softmax_backward_row(F(g) + (long)i * n, F(a) + (long)i * n, m ? F(m) + (long)i * n : NULL, n, scale);
    return (PyObject *)g;
}

/* _dropout_slice(y [n], x [n] or None, p, seed, step, tensor_id, first, mode): y updated in place, as
 * dropout_slice over elements first .. first+n-1 in mode 0 apply, 1 accumulate, 2 mask, 3 uniform */
static PyObject *py_dropout_slice(PyObject *self, PyObject *args) {
    PyObject *yo, *xo;
    float p;
    unsigned long long seed, first;
    unsigned int step, tid;
    int mode;
    if (!PyArg_ParseTuple(args, "OOfKIIKi:_dropout_slice", &yo, &xo, &p, &seed, &step, &tid, &first, &mode))
        return NULL;
    PyArrayObject *y = f32_arg(yo, "y", 1, 1, 1), *x = NULL;
    if (!y) return NULL;
    if (mode < BQ_DROPOUT_APPLY || mode > BQ_DROPOUT_UNIFORM)
        return PyErr_Format(PyExc_ValueError, "mode must be 0..3, got %d", mode);
    if (mode <= BQ_DROPOUT_ACCUMULATE && (!(x = f32_arg(xo, "x", 1, 1, 0)) || !same_shape(x, "x", y, "y")))
        return NULL;
    if (!(p >= 0.0f && p < 1.0f)) return PyErr_Format(PyExc_ValueError, "p must be in [0, 1), got %g", p);
    bq_cpu()->dropout_slice(F(y), x ? F(x) : NULL, (size_t)PyArray_SIZE(y), p, seed, step, tid, first, mode);
    Py_RETURN_NONE;
}

static PyMethodDef cpu_methods[] = {
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name)\n--\n\nThe CPU kernels' instruction set from now on: 'avx2', 'avx512' or 'auto' (the best this "
     "CPU runs). Returns the one in use. RuntimeError if this CPU cannot run it."},
    {"_softmax_rows", py_softmax_rows, METH_VARARGS, "_softmax_rows(x, mask=None)\n--\n\nsoftmax_row per row."},
    {"_exp_rows", py_exp_rows, METH_VARARGS, "_exp_rows(x, shift)\n--\n\n-> (exp(x - shift), sums, maxima) per row."},
    {"_softmax_backward_rows", py_softmax_backward_rows, METH_VARARGS,
     "_softmax_backward_rows(g, a, mask, scale)\n--\n\nsoftmax_backward_row per row."},
    {"_dropout_slice", py_dropout_slice, METH_VARARGS,
     "_dropout_slice(y, x, p, seed, step, tensor_id, first, mode)\n--\n\ndropout_slice into y in place."},
    {NULL, NULL, 0, NULL},
};

/* Adds the functions above to bertqa._C; 0 on success, -1 with an exception set. */
int bq_add_cpu_functions(PyObject *module) { return PyModule_AddFunctions(module, cpu_methods); }
