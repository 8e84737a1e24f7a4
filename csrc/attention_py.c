/* bertqa._C.attention_rows / attention_rows_backward: the fused attention over rows of their own lengths
 * (attention_fused.c), the engine's layout, on NumPy arrays. Added to the module by bq_add_attention_functions.
 *
 * q, k, v, out [N, NH, HS] float32 (the [N, C] activations of N packed tokens, heads side by side); offsets [B+1]
 * integers, 0 = offsets[0] <= ... <= offsets[B] = N: row b is tokens offsets[b] .. offsets[b+1]-1; mask [B, Tpad]
 * of 0/1 with Tpad >= every row's length, or None; dropout numbered as bq_rng says with P = positions (0: Tpad,
 * or the longest row without a mask) and window ids [B] (None: 0..B-1); state [2, NH, N] what backward needs
 * (attention_fused.c: each query's score max in base-2 units and 1 / its softmax denominator).
 */
#include "pymodule.h"
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include "attention_fused.h"

typedef struct {
    PyArrayObject *q, *k, *v;   /* borrowed */
    PyArrayObject *off64, *mask, *win;   /* new references or NULL */
    int *off;                   /* malloc'd [B+1] */
    int B, N, NH, HS, Tpad, Tmax;
    double p;
    unsigned long long seed;
    unsigned int step, tensor_id;
    long P;
    const bq_attn_kernels *kern;
} rows_args;

static void rows_free(rows_args *a) {
    Py_XDECREF(a->off64);
    Py_XDECREF(a->mask);
    Py_XDECREF(a->win);
    free(a->off);
}

static int rows_parse(rows_args *a, PyObject *qo, PyObject *ko, PyObject *vo, PyObject *offo, PyObject *mo,
                      PyObject *wo, const char *isa) {
    if (!(a->q = f32_arg(qo, "q", 3, 3, 0)) || !(a->k = f32_arg(ko, "k", 3, 3, 0)) ||
        !(a->v = f32_arg(vo, "v", 3, 3, 0)) ||
        !same_shape(a->k, "k", a->q, "q") || !same_shape(a->v, "v", a->q, "q") ||
        !finite_in(a->p, "dropout_p", 0.0, 1.0, 1))
        return 0;
    a->N = (int)PyArray_DIM(a->q, 0);
    a->NH = (int)PyArray_DIM(a->q, 1);
    a->HS = (int)PyArray_DIM(a->q, 2);
    if ((long)a->NH * a->HS > INT_MAX / 2) {
        PyErr_Format(PyExc_ValueError, "q: NH * HS = %ld is too large", (long)a->NH * a->HS);
        return 0;
    }
    if (!(a->off64 = ids_arg(offo, "offsets", 1))) return 0;
    const npy_intp n1 = PyArray_DIM(a->off64, 0);
    const int64_t *o = I64(a->off64);
    if (n1 < 2) {
        PyErr_Format(PyExc_ValueError, "offsets must hold B + 1 >= 2 values (row b is tokens offsets[b] .. "
                                       "offsets[b+1]-1), got %ld", (long)n1);
        return 0;
    }
    if (o[0] != 0 || o[n1 - 1] != a->N) {
        PyErr_Format(PyExc_ValueError, "offsets must start at 0 and end at N = q.shape[0] = %d, got %lld .. %lld",
                     a->N, (long long)o[0], (long long)o[n1 - 1]);
        return 0;
    }
    a->B = (int)(n1 - 1);
    if (!(a->off = malloc((size_t)n1 * sizeof(int)))) {
        PyErr_NoMemory();
        return 0;
    }
    a->Tmax = 0;
    for (npy_intp b = 0; b < n1; b++) {
        if (b > 0 && o[b] < o[b - 1]) {
            PyErr_Format(PyExc_ValueError, "offsets must not decrease: offsets[%ld] = %lld < offsets[%ld] = %lld",
                         (long)b, (long long)o[b], (long)b - 1, (long long)o[b - 1]);
            return 0;
        }
        a->off[b] = (int)o[b];
        if (b > 0 && o[b] - o[b - 1] > a->Tmax) a->Tmax = (int)(o[b] - o[b - 1]);
    }
    a->Tpad = a->Tmax;
    if (mo != Py_None) {
        if (!is_ndarray(mo, "mask", "0/1 values (bool, int or float)")) return 0;
        if (PyArray_NDIM((PyArrayObject *)mo) != 2) {
            PyErr_Format(PyExc_ValueError, "mask must be [B, Tpad] (2 dimensions), got %d dimensions",
                         PyArray_NDIM((PyArrayObject *)mo));
            return 0;
        }
        a->Tpad = (int)PyArray_DIM((PyArrayObject *)mo, 1);
        if (!(a->mask = mask_arg(mo, "mask", a->B, a->Tpad))) return 0;
        if (a->Tpad < a->Tmax) {
            PyErr_Format(PyExc_ValueError, "mask.shape[1] = %d must cover the longest row (%d tokens)", a->Tpad,
                         a->Tmax);
            return 0;
        }
    }
    if (a->P == 0) a->P = a->Tpad;
    if (a->P < a->Tmax) {
        PyErr_Format(PyExc_ValueError, "positions = %ld must be at least the longest row (%d tokens)", a->P, a->Tmax);
        return 0;
    }
    double wmax = a->B;
    if (wo != Py_None) {
        if (!window_ids_arg(wo, a->B, &a->win)) return 0;
        for (int b = 0; b < a->B; b++)
            if (I64(a->win)[b] + 1.0 > wmax) wmax = I64(a->win)[b] + 1.0;
    }
    if (wmax * a->NH * (double)a->P * (double)a->P > 1.8e19) {
        PyErr_Format(PyExc_ValueError, "window ids x heads x positions^2 overflow the dropout numbering (2^64)");
        return 0;
    }
    if (!(a->kern = bq_attn_kernels_named(isa))) {
        PyErr_Format(PyExc_ValueError, "isa must be None, 'generic', 'avx2' or 'avx512' (one this CPU and build run), "
                                       "got '%s'", isa);
        return 0;
    }
    return 1;
}

static bq_rng rows_rng(const rows_args *a) {
    return (bq_rng){a->seed, a->step, a->win ? I64(a->win) : NULL, a->P};
}

static PyObject *py_attention_rows(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"q", "k", "v", "offsets", "mask", "dropout_p", "seed", "step", "window_ids",
                             "tensor_id", "positions", "return_state", "isa", NULL};
    PyObject *qo, *ko, *vo, *offo, *mo = Py_None, *wo = Py_None, *result = NULL;
    int return_state = 0;
    const char *isa = NULL;
    rows_args a = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|OdKIOIlpz:attention_rows", kwlist, &qo, &ko, &vo, &offo, &mo,
                                     &a.p, &a.seed, &a.step, &wo, &a.tensor_id, &a.P, &return_state, &isa))
        return NULL;
    if (a.P < 0) return PyErr_Format(PyExc_ValueError, "positions must be >= 0, got %ld", a.P);
    const int bf16 = isa && !strcmp(isa, "bf16");   /* the bf16 forward (inference: no dropout, no state) */
    const bq_attn_bf16_kernels *kb = bf16 ? bq_attn_bf16_best() : NULL;
    if (bf16 && !kb)
        return PyErr_Format(PyExc_RuntimeError, "isa='bf16' needs AVX-512 BF16 (avx512_bf16) and the AVX-512 kernels "
                                                "in use; this CPU or setting has not");
    if (bf16 && (a.p != 0.0 || return_state))
        return PyErr_Format(PyExc_ValueError, "isa='bf16' is the inference forward: no dropout_p, no return_state");
    PyArrayObject *out = NULL, *state = NULL;
    if (!rows_parse(&a, qo, ko, vo, offo, mo, wo, bf16 ? NULL : isa)) goto done;
    npy_intp sd[3] = {2, a.NH, a.N};
    out = (PyArrayObject *)PyArray_EMPTY(3, PyArray_DIMS(a.q), NPY_FLOAT32, 0);
    if (!out || (return_state && !(state = (PyArrayObject *)PyArray_EMPTY(3, sd, NPY_FLOAT32, 0)))) goto done;
    int st;
    const float *mask = a.mask ? F(a.mask) : NULL;
    float *saved = state ? F(state) : NULL;
    Py_BEGIN_ALLOW_THREADS
    if (bf16)
        st = bq_attention_forward_rows_bf16(kb, F(out), F(a.q), F(a.k), F(a.v), mask, a.Tpad, a.B, a.off, a.NH, a.HS,
                                            a.NH * a.HS);
    else
        st = bq_attention_forward_rows_with(a.kern, F(out), saved, F(a.q), F(a.k), F(a.v), mask, a.Tpad, a.B, a.off,
                                            a.NH, a.HS, a.NH * a.HS, (float)a.p, rows_rng(&a), a.tensor_id);
    Py_END_ALLOW_THREADS
    if (st) { status_error(st, "attention_rows"); goto done; }
    result = state ? Py_BuildValue("(OO)", out, state) : (Py_INCREF(out), (PyObject *)out);
done:
    Py_XDECREF(out);
    Py_XDECREF(state);
    rows_free(&a);
    return result;
}

static PyObject *py_attention_rows_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dout", "q", "k", "v", "out", "state", "offsets", "mask", "dropout_p", "seed", "step",
                             "window_ids", "tensor_id", "positions", "isa", NULL};
    PyObject *dgo, *qo, *ko, *vo, *oo, *so, *offo, *mo = Py_None, *wo = Py_None, *result = NULL;
    const char *isa = NULL;
    rows_args a = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOO|OdKIOIlz:attention_rows_backward", kwlist, &dgo, &qo, &ko,
                                     &vo, &oo, &so, &offo, &mo, &a.p, &a.seed, &a.step, &wo, &a.tensor_id, &a.P, &isa))
        return NULL;
    if (a.P < 0) return PyErr_Format(PyExc_ValueError, "positions must be >= 0, got %ld", a.P);
    PyArrayObject *dout, *out, *state, *dq = NULL, *dk = NULL, *dv = NULL;
    if (!rows_parse(&a, qo, ko, vo, offo, mo, wo, isa) || !(dout = f32_arg(dgo, "dout", 3, 3, 0)) ||
        !same_shape(dout, "dout", a.q, "q") || !(out = f32_arg(oo, "out", 3, 3, 0)) ||
        !same_shape(out, "out", a.q, "q") || !(state = f32_arg(so, "state", 3, 3, 0)) ||
        !dim_is(state, "state", 0, 2, "state is [2, NH, N], as attention_rows(..., return_state=True) returns it") ||
        !dim_is(state, "state", 1, a.NH, "heads") || !dim_is(state, "state", 2, a.N, "tokens"))
        goto done;
    dq = (PyArrayObject *)PyArray_EMPTY(3, PyArray_DIMS(a.q), NPY_FLOAT32, 0);
    dk = (PyArrayObject *)PyArray_EMPTY(3, PyArray_DIMS(a.q), NPY_FLOAT32, 0);
    dv = (PyArrayObject *)PyArray_EMPTY(3, PyArray_DIMS(a.q), NPY_FLOAT32, 0);
    if (!dq || !dk || !dv) goto done;
    int st;
    const float *mask = a.mask ? F(a.mask) : NULL;
    Py_BEGIN_ALLOW_THREADS
    st = bq_attention_backward_rows_with(a.kern, F(dq), F(dk), F(dv), F(dout), F(out), F(state), F(a.q), F(a.k), F(a.v),
                                         mask, a.Tpad, a.B, a.off, a.NH, a.HS, a.NH * a.HS, (float)a.p, rows_rng(&a),
                                         a.tensor_id);
    Py_END_ALLOW_THREADS
    if (st) { status_error(st, "attention_rows_backward"); goto done; }
    result = Py_BuildValue("(OOO)", dq, dk, dv);
done:
    Py_XDECREF(dq); Py_XDECREF(dk); Py_XDECREF(dv);
    rows_free(&a);
    return result;
}

#define KW (METH_VARARGS | METH_KEYWORDS)
static PyMethodDef attention_methods[] = {
    {"attention_rows", (PyCFunction)(void (*)(void))py_attention_rows, KW,
     "attention_rows(q, k, v, offsets, mask=None, dropout_p=0.0, seed=0, step=0, window_ids=None, tensor_id=0, "
     "positions=0, return_state=False, isa=None)\n--\n\n"
     "Fused attention over packed rows: q, k, v [N, NH, HS] float32, offsets [B+1]. -> out [N, NH, HS], or "
     "(out, state [2, NH, N]) with return_state. isa forces the kernel set ('generic', 'avx2', 'avx512'; 'bf16': "
     "the bf16 inference forward, without dropout and state). "
     "See bertqa.ops."},
    {"attention_rows_backward", (PyCFunction)(void (*)(void))py_attention_rows_backward, KW,
     "attention_rows_backward(dout, q, k, v, out, state, offsets, mask=None, dropout_p=0.0, seed=0, step=0, "
     "window_ids=None, tensor_id=0, positions=0, isa=None)\n--\n\n-> (dq, dk, dv), each [N, NH, HS]."},
    {NULL, NULL, 0, NULL},
};

int bq_add_attention_functions(PyObject *module) { return PyModule_AddFunctions(module, attention_methods); }
