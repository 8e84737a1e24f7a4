/* bertqa._C's side of the run-time instruction-set choice (cpu.h): set_isa; the row kernels of the dispatch table
 * one by one on NumPy arrays, for tests; and the vectorised kernels in place on caller-given arrays (no output
 * allocated, threads as in the engine) with a STREAM copy / triad beside them, for bench/ops.py. The underscore
 * names are not part of bertqa.ops. */
#include "pymodule.h"
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

/* ---- in place, threaded, no allocation: what bench/ops.py times (the ops API allocates its outputs) ---------- */

/* float32 C-contiguous arrays of n elements each (n from the first), the first `writeable` of them writeable */
static int f32_all(PyObject *const *objs, const char *const *names, int count, int writeable, PyArrayObject **out,
                   npy_intp *n) {
    for (int i = 0; i < count; i++) {
        if (!(out[i] = f32_arg(objs[i], names[i], 1, 8, i < writeable))) return 0;
        if (i == 0) *n = PyArray_SIZE(out[0]);
        else if (PyArray_SIZE(out[i]) != *n)
            return PyErr_Format(PyExc_ValueError, "%s must have %ld elements (as %s), got %ld", names[i], (long)*n,
                                names[0], (long)PyArray_SIZE(out[i])), 0;
    }
    return 1;
}

/* _stream(kind, a, b, c, s): kind 0 a = b (copy), 1 a = b + s * c (triad), the OpenMP threads splitting the arrays */
static PyObject *py_stream(PyObject *self, PyObject *args) {
    int kind;
    PyObject *o[3];
    float sc;
    if (!PyArg_ParseTuple(args, "iOOOf:_stream", &kind, &o[0], &o[1], &o[2], &sc)) return NULL;
    static const char *const names[] = {"a", "b", "c"};
    PyArrayObject *a[3];
    npy_intp n;
    if (!f32_all(o, names, 3, 1, a, &n)) return NULL;
    float *x = F(a[0]);
    const float *y = F(a[1]), *z = F(a[2]);
    Py_BEGIN_ALLOW_THREADS
    if (kind == 0) {
#pragma omp parallel for simd schedule(static) num_threads(bq_num_threads())
        for (npy_intp i = 0; i < n; i++) x[i] = y[i];
    } else {
#pragma omp parallel for simd schedule(static) num_threads(bq_num_threads())
        for (npy_intp i = 0; i < n; i++) x[i] = y[i] + sc * z[i];
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* _gelu_into(out, x); _gelu_backward_into(dx, x, dy): dx += */
static PyObject *py_gelu_into(PyObject *self, PyObject *args) {
    PyObject *o[3] = {NULL, NULL, NULL};
    if (!PyArg_ParseTuple(args, "OO|O:_gelu_into", &o[0], &o[1], &o[2])) return NULL;
    static const char *const names[] = {"out", "x", "dy"};
    PyArrayObject *a[3];
    npy_intp n;
    if (!f32_all(o, names, o[2] ? 3 : 2, 1, a, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (o[2]) gelu_backward(F(a[0]), F(a[1]), F(a[2]), (size_t)n);
    else gelu_forward(F(a[0]), F(a[1]), (size_t)n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* _layernorm_into(out [N,C], mean [N], rstd [N], x [N,C], w [C], b [C], eps) */
static PyObject *py_layernorm_into(PyObject *self, PyObject *args) {
    PyObject *o[6];
    float eps;
    if (!PyArg_ParseTuple(args, "OOOOOOf:_layernorm_into", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &eps))
        return NULL;
    static const char *const rows[] = {"out", "x"}, *const stats[] = {"mean", "rstd"}, *const par[] = {"w", "b"};
    PyObject *ro[2] = {o[0], o[3]}, *so[2] = {o[1], o[2]}, *po[2] = {o[4], o[5]};
    PyArrayObject *r[2], *st[2], *pa[2];
    npy_intp nc, N, C;
    if (!f32_all(ro, rows, 2, 1, r, &nc) || !f32_all(so, stats, 2, 2, st, &N) || !f32_all(po, par, 2, 0, pa, &C))
        return NULL;
    if (N * C != nc) return PyErr_Format(PyExc_ValueError, "out/x must have N*C = %ld elements", (long)(N * C));
    Py_BEGIN_ALLOW_THREADS
    layernorm_forward(F(r[0]), F(st[0]), F(st[1]), F(r[1]), F(pa[0]), F(pa[1]), (int)N, (int)C, eps);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* _layernorm_backward_into(dx [N,C], dw [C], db [C], dy [N,C], x [N,C], w [C], mean [N], rstd [N]): all += */
static PyObject *py_layernorm_backward_into(PyObject *self, PyObject *args) {
    PyObject *o[8];
    if (!PyArg_ParseTuple(args, "OOOOOOOO:_layernorm_backward_into", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                          &o[7]))
        return NULL;
    static const char *const rows[] = {"dx", "dy", "x"}, *const par[] = {"dw", "db", "w"},
                             *const stats[] = {"mean", "rstd"};
    PyObject *ro[3] = {o[0], o[3], o[4]}, *po[3] = {o[1], o[2], o[5]}, *so[2] = {o[6], o[7]};
    PyArrayObject *r[3], *pa[3], *st[2];
    npy_intp nc, N, C;
    if (!f32_all(ro, rows, 3, 1, r, &nc) || !f32_all(po, par, 3, 2, pa, &C) || !f32_all(so, stats, 2, 0, st, &N))
        return NULL;
    if (N * C != nc) return PyErr_Format(PyExc_ValueError, "dx/dy/x must have N*C = %ld elements", (long)(N * C));
    Py_BEGIN_ALLOW_THREADS
    layernorm_backward(F(r[0]), F(pa[0]), F(pa[1]), F(r[1]), F(r[2]), F(pa[2]), F(st[0]), F(st[1]), (int)N, (int)C);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* _dropout_into(y, x, p, seed, step, tensor_id, accumulate): y = dropout(x) (y may be x), or y += (backward) */
static PyObject *py_dropout_into(PyObject *self, PyObject *args) {
    PyObject *o[2];
    float p;
    unsigned long long seed;
    unsigned int step, tid;
    int acc;
    if (!PyArg_ParseTuple(args, "OOfKIIp:_dropout_into", &o[0], &o[1], &p, &seed, &step, &tid, &acc)) return NULL;
    static const char *const names[] = {"y", "x"};
    PyArrayObject *a[2];
    npy_intp n;
    if (!f32_all(o, names, 2, 1, a, &n)) return NULL;
    if (!(p >= 0.0f && p < 1.0f)) return PyErr_Format(PyExc_ValueError, "p must be in [0, 1), got %g", p);
    Py_BEGIN_ALLOW_THREADS
    if (acc) dropout_backward(F(a[0]), F(a[1]), (size_t)n, p, seed, step, tid);
    else dropout_forward(F(a[0]), F(a[1]), (size_t)n, p, seed, step, tid);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* _rows_into(kind, x [N,T], a [N,T] or None, mask [N,T] or None, scale): in place over the rows, threads sharing
 * them: kind 0 softmax_row(x, mask), 1 x = exp(x - 1) (exp_row), 2 softmax_backward_row(x, a, mask, scale) */
static PyObject *py_rows_into(PyObject *self, PyObject *args) {
    int kind;
    PyObject *xo, *ao, *mo;
    float scale;
    if (!PyArg_ParseTuple(args, "iOOOf:_rows_into", &kind, &xo, &ao, &mo, &scale)) return NULL;
    PyArrayObject *x = f32_arg(xo, "x", 2, 2, 1), *a = NULL, *m = NULL;
    if (!x || (ao != Py_None && (!(a = f32_arg(ao, "a", 2, 2, 0)) || !same_shape(a, "a", x, "x"))) ||
        (mo != Py_None && (!(m = f32_arg(mo, "mask", 2, 2, 0)) || !same_shape(m, "mask", x, "x"))))
        return NULL;
    if (kind == 2 && !a) return PyErr_Format(PyExc_ValueError, "kind 2 (softmax backward) needs a");
    const int N = (int)PyArray_DIM(x, 0), T = (int)PyArray_DIM(x, 1);
    const bq_kernels *k = bq_cpu();
    float *X = F(x);
    const float *A = a ? F(a) : NULL, *M = m ? F(m) : NULL;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) num_threads(bq_num_threads())
    for (int i = 0; i < N; i++) {
        float *r = X + (long)i * T;
        const float *mk = M ? M + (long)i * T : NULL;
        if (kind == 0) k->softmax_row(r, mk, T);
        else if (kind == 1) k->exp_row(r, r, 1.0f, T);
        else k->softmax_backward_row(r, A + (long)i * T, mk, T, scale);
    }
    Py_END_ALLOW_THREADS
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
    {"_stream", py_stream, METH_VARARGS, "_stream(kind, a, b, c, s)\n--\n\n0: a = b; 1: a = b + s * c (threads)."},
    {"_gelu_into", py_gelu_into, METH_VARARGS, "_gelu_into(out, x[, dy])\n--\n\ngelu_forward, or gelu_backward into out."},
    {"_layernorm_into", py_layernorm_into, METH_VARARGS, "_layernorm_into(out, mean, rstd, x, w, b, eps)\n--\n\n"},
    {"_layernorm_backward_into", py_layernorm_backward_into, METH_VARARGS,
     "_layernorm_backward_into(dx, dw, db, dy, x, w, mean, rstd)\n--\n\n"},
    {"_dropout_into", py_dropout_into, METH_VARARGS, "_dropout_into(y, x, p, seed, step, tensor_id, accumulate)\n--\n\n"},
    {"_rows_into", py_rows_into, METH_VARARGS, "_rows_into(kind, x, a, mask, scale)\n--\n\nRow kernels in place."},
    {NULL, NULL, 0, NULL},
};

/* Adds the functions above to bertqa._C; 0 on success, -1 with an exception set. */
int bq_add_cpu_functions(PyObject *module) { return PyModule_AddFunctions(module, cpu_methods); }
