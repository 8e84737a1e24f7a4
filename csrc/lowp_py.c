/* bertqa._C's hooks on the low-precision products (gemm_lowp_avx512.c through cpu.h's bq_lowp_kernels), for tests
 * and benchmarks: the engine calls them itself (model.c). */
#include "pymodule.h"
#include "bertqa.h"
#include "cpu.h"

static const char *const prec_names[] = {"fp32", "bf16", "int8"};

/* The table for precision p, or NULL with RuntimeError naming what this machine lacks */
static const bq_lowp_kernels *lowp_or_raise(int p) {
    const char *missing = NULL;
    const bq_lowp_kernels *k = bq_cpu_lowp(p, &missing);
    if (!k) PyErr_Format(PyExc_RuntimeError, "precision '%s' on the CPU needs %s", prec_names[p], missing);
    return k;
}

/* The optional bias (None, or float32 [n]) of a product with n columns; 1, or 0 with the error set */
static int bias_arg(PyObject *obj, int n, PyArrayObject **out) {
    return f32_sized(obj, "bias", 1, (size_t)n, "the product's columns", 0, 1, out);
}

static PyObject *py_gemm_bf16(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"a", "b", "c", "trans_a", "trans_b", "accumulate", "bias", "gelu", NULL};
    PyObject *ao, *bo, *co, *biaso = Py_None;
    int ta, tb, acc, gelu = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOppp|Op:_gemm_bf16", kwlist, &ao, &bo, &co, &ta, &tb, &acc, &biaso,
                                     &gelu))
        return NULL;
    const bq_lowp_kernels *k = lowp_or_raise(BQ_PREC_BF16);
    PyArrayObject *a, *b, *c, *bias = NULL;
    if (!k || !(a = f32_arg(ao, "a", 2, 2, 0)) || !(b = f32_arg(bo, "b", 2, 2, 0)) || !(c = f32_arg(co, "c", 2, 2, 1)))
        return NULL;
    const int M = (int)PyArray_DIM(a, ta), K = (int)PyArray_DIM(a, !ta), N = (int)PyArray_DIM(b, !tb);
    if (!dim_is(b, "b", tb, K, "op(a)'s columns") || !dim_is(c, "c", 0, M, "op(a)'s rows") ||
        !dim_is(c, "c", 1, N, "op(b)'s columns") || !bias_arg(biaso, N, &bias))
        return NULL;
    const float beta = acc ? 1.0f : 0.0f;
    int st;
    if (!bias && !gelu) {   /* the backward's call, which packs b itself */
        Py_BEGIN_ALLOW_THREADS
        st = k->gemm_bf16_full(ta, tb, M, N, K, F(a), PyArray_DIM(a, 1), F(b), PyArray_DIM(b, 1), beta, F(c), N);
        Py_END_ALLOW_THREADS
    } else {   /* the forward's: b packed once, then the product with its epilogue */
        uint16_t *Bp = PyMem_RawMalloc(k->bf16_packed_elems(K, N) * sizeof(uint16_t));
        st = Bp ? BQ_OK : BQ_ERR_NOMEM;
        if (!st) {
            Py_BEGIN_ALLOW_THREADS
            k->bf16_pack_b(Bp, F(b), PyArray_DIM(b, 1), tb, K, N);
            st = k->gemm_bf16(ta, M, N, K, F(a), PyArray_DIM(a, 1), Bp, beta, F(c), N, bias ? F(bias) : NULL, gelu);
            Py_END_ALLOW_THREADS
        }
        PyMem_RawFree(Bp);
    }
    if (st) return status_error(st, "_gemm_bf16");
    Py_RETURN_NONE;
}

static PyObject *py_gemm_i8(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"a", "w", "c", "per_tensor", "accumulate", "repeat", "bias", "gelu", NULL};
    PyObject *ao, *wo, *co, *biaso = Py_None;
    int per_tensor, acc, repeat = 1, gelu = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOpp|iOp:_gemm_i8", kwlist, &ao, &wo, &co, &per_tensor, &acc,
                                     &repeat, &biaso, &gelu))
        return NULL;
    if (repeat < 1) return PyErr_Format(PyExc_ValueError, "repeat must be >= 1, got %d", repeat);
    const bq_lowp_kernels *k = lowp_or_raise(BQ_PREC_INT8);
    PyArrayObject *a, *w, *c, *bias = NULL;
    if (!k || !(a = f32_arg(ao, "a", 2, 2, 0)) || !(w = f32_arg(wo, "w", 2, 2, 0)) || !(c = f32_arg(co, "c", 2, 2, 1)))
        return NULL;
    const int M = (int)PyArray_DIM(a, 0), K = (int)PyArray_DIM(a, 1), N = (int)PyArray_DIM(w, 0);
    if (!dim_is(w, "w", 1, K, "a's columns") || !dim_is(c, "c", 0, M, "a's rows") ||
        !dim_is(c, "c", 1, N, "w's rows") || !bias_arg(biaso, N, &bias))
        return NULL;
    int8_t *Bp = PyMem_RawMalloc(k->i8_packed_bytes(K, N));
    float *sw = PyMem_RawMalloc(sizeof(float) * (size_t)N);
    int32_t *cs = PyMem_RawMalloc(sizeof(int32_t) * (size_t)N);
    int st = Bp && sw && cs ? BQ_OK : BQ_ERR_NOMEM;
    if (!st) {
        Py_BEGIN_ALLOW_THREADS
        k->i8_pack_weights(Bp, sw, cs, F(w), K, N, K);
        for (int r = 0; r < repeat && !st; r++)
            st = k->gemm_i8(M, N, K, F(a), K, Bp, sw, cs, per_tensor, acc ? 1.0f : 0.0f, F(c), N,
                            bias ? F(bias) : NULL, gelu);
        Py_END_ALLOW_THREADS
    }
    PyMem_RawFree(Bp);
    PyMem_RawFree(sw);
    PyMem_RawFree(cs);
    if (st) return status_error(st, "_gemm_i8");
    Py_RETURN_NONE;
}

/* {"fp32": None, "bf16": None or why not, "int8": None or why not} */
PyObject *bq_py_precisions(void) {
    PyObject *d = PyDict_New();
    for (int p = 0; d && p < 3; p++) {
        const char *missing = NULL;
        PyObject *v = Py_None;
        Py_INCREF(v);
        if (p && !bq_cpu_lowp(p, &missing)) {
            Py_DECREF(v);
            v = PyUnicode_FromFormat("needs %s", missing);
        }
        if (!v || PyDict_SetItemString(d, prec_names[p], v) < 0) Py_CLEAR(d);
        Py_XDECREF(v);
    }
    return d;
}

static PyMethodDef lowp_methods[] = {
    {"_gemm_bf16", (PyCFunction)(void (*)(void))py_gemm_bf16, METH_VARARGS | METH_KEYWORDS,
     "_gemm_bf16(a, b, c, trans_a, trans_b, accumulate, bias=None, gelu=False)\n--\n\nc (+)= op(a) @ op(b), operands "
     "rounded to bf16, fp32 sums (op(x) = x.T when trans_x); without accumulate plus bias, then GELU with gelu (the "
     "epilogue of the engine's inference products)."},
    {"_gemm_i8", (PyCFunction)(void (*)(void))py_gemm_i8, METH_VARARGS | METH_KEYWORDS,
     "_gemm_i8(a, w, c, per_tensor, accumulate, repeat=1, bias=None, gelu=False)\n--\n\nc (+)= a @ w.T in int8: w "
     "per output channel, a per row (or per tensor), dequantized in fp32; without accumulate plus bias, then GELU "
     "with gelu; w is quantized once and the product run repeat times (benchmarks)."},
    {NULL, NULL, 0, NULL},
};

int bq_add_lowp_functions(PyObject *module) { return PyModule_AddFunctions(module, lowp_methods); }
