/* bertqa._C: the CPU kernels on NumPy arrays.
 *
 * Every function validates its arguments before touching memory (dtype float32 or integer ids, C-contiguous,
 * aligned, native byte order, non-empty, matching shapes) and raises TypeError / ValueError naming the
 * argument, what was expected and what it got. Kernels run with the GIL released. Gradient outputs are
 * fresh arrays (the kernels accumulate into zeros). bertqa.ops wraps these with documented signatures.
 */
#include "pymodule.h"
#include <limits.h>
#include <math.h>
#include <stdlib.h>

#include "bertqa.h"
#include "cpu.h"

/* ---- argument helpers of the kernels (the shared checks are pyargs.c's) ----------------------- */

/* Rows of an [..., C] array viewed as [N, C]; fails if N exceeds int range. */
static int rows_of(PyArrayObject *a, const char *name, int *N) {
    npy_intp C = PyArray_DIM(a, PyArray_NDIM(a) - 1);
    npy_intp n = PyArray_SIZE(a) / C;
    if (n > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s has %ld rows, more than %d", name, (long)n, INT_MAX);
        return 0;
    }
    *N = (int)n;
    return 1;
}

static PyArrayObject *new_like(PyArrayObject *a, int zero) {
    return (PyArrayObject *)(zero ? PyArray_ZEROS(PyArray_NDIM(a), PyArray_DIMS(a), NPY_FLOAT32, 0)
                                  : PyArray_EMPTY(PyArray_NDIM(a), PyArray_DIMS(a), NPY_FLOAT32, 0));
}

static PyArrayObject *new_f32(int nd, const npy_intp *dims, int zero) {
    npy_intp d[4];
    for (int i = 0; i < nd; i++) d[i] = dims[i];
    return (PyArrayObject *)(zero ? PyArray_ZEROS(nd, d, NPY_FLOAT32, 0) : PyArray_EMPTY(nd, d, NPY_FLOAT32, 0));
}


/* ---- layernorm -------------------------------------------------------------------------------- */

static PyObject *py_layernorm(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "weight", "bias", "eps", NULL};
    PyObject *xo, *wo, *bo;
    double eps = 1e-12;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|d:layernorm", kwlist, &xo, &wo, &bo, &eps)) return NULL;
    PyArrayObject *x, *w, *b;
    int N;
    if (!(x = f32_arg(xo, "x", 1, NPY_MAXDIMS, 0)) || !(w = f32_arg(wo, "weight", 1, 1, 0)) ||
        !(b = f32_arg(bo, "bias", 1, 1, 0)) || !rows_of(x, "x", &N))
        return NULL;
    int C = (int)PyArray_DIM(x, PyArray_NDIM(x) - 1);
    if (!dim_is(w, "weight", 0, C, "the last dimension of x") || !dim_is(b, "bias", 0, C, "the last dimension of x") ||
        !finite_in(eps, "eps", 0.0, 1.0, 0))
        return NULL;
    PyArrayObject *y = new_like(x, 0);
    if (!y) return NULL;
    Py_BEGIN_ALLOW_THREADS
    layernorm_forward(F(y), NULL, NULL, F(x), F(w), F(b), N, C, (float)eps);
    Py_END_ALLOW_THREADS
    return (PyObject *)y;
}

static PyObject *py_layernorm_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "x", "weight", "eps", NULL};
    PyObject *dyo, *xo, *wo;
    double eps = 1e-12;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|d:layernorm_backward", kwlist, &dyo, &xo, &wo, &eps))
        return NULL;
    PyArrayObject *dy, *x, *w;
    int N;
    if (!(dy = f32_arg(dyo, "dy", 1, NPY_MAXDIMS, 0)) || !(x = f32_arg(xo, "x", 1, NPY_MAXDIMS, 0)) ||
        !(w = f32_arg(wo, "weight", 1, 1, 0)) || !same_shape(dy, "dy", x, "x") || !rows_of(x, "x", &N))
        return NULL;
    int C = (int)PyArray_DIM(x, PyArray_NDIM(x) - 1);
    if (!dim_is(w, "weight", 0, C, "the last dimension of x") || !finite_in(eps, "eps", 0.0, 1.0, 0)) return NULL;
    PyObject *result = NULL;
    PyArrayObject *dx = new_like(x, 1), *dw = new_like(w, 1), *db = new_like(w, 1);
    float *stats = malloc(2 * (size_t)N * sizeof(float));
    float *scratch = malloc((size_t)N * C * sizeof(float));
    if (!dx || !dw || !db) goto done;
    if (!stats || !scratch) { PyErr_NoMemory(); goto done; }
    Py_BEGIN_ALLOW_THREADS
    /* mean/rstd as the forward computes them; the normalised output itself is not needed */
    layernorm_forward(scratch, stats, stats + N, F(x), F(w), F(w), N, C, (float)eps);
    layernorm_backward(F(dx), F(dw), F(db), F(dy), F(x), F(w), stats, stats + N, N, C);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OOO)", dx, dw, db);
done:
    free(stats);
    free(scratch);
    Py_XDECREF(dx); Py_XDECREF(dw); Py_XDECREF(db);
    return result;
}

/* ---- GELU ------------------------------------------------------------------------------------- */

static PyObject *py_gelu(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", NULL};
    PyObject *xo;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O:gelu", kwlist, &xo)) return NULL;
    PyArrayObject *x = f32_arg(xo, "x", 0, NPY_MAXDIMS, 0);
    if (!x) return NULL;
    PyArrayObject *y = new_like(x, 0);
    if (!y) return NULL;
    size_t n = (size_t)PyArray_SIZE(x);
    Py_BEGIN_ALLOW_THREADS
    gelu_forward(F(y), F(x), n);
    Py_END_ALLOW_THREADS
    return (PyObject *)y;
}

static PyObject *py_gelu_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "x", NULL};
    PyObject *dyo, *xo;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO:gelu_backward", kwlist, &dyo, &xo)) return NULL;
    PyArrayObject *dy, *x;
    if (!(dy = f32_arg(dyo, "dy", 0, NPY_MAXDIMS, 0)) || !(x = f32_arg(xo, "x", 0, NPY_MAXDIMS, 0)) ||
        !same_shape(dy, "dy", x, "x"))
        return NULL;
    PyArrayObject *dx = new_like(x, 1);
    if (!dx) return NULL;
    size_t n = (size_t)PyArray_SIZE(x);
    Py_BEGIN_ALLOW_THREADS
    gelu_backward(F(dx), F(x), F(dy), n);
    Py_END_ALLOW_THREADS
    return (PyObject *)dx;
}

/* ---- linear ----------------------------------------------------------------------------------- */

static PyObject *py_linear(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "weight", "bias", NULL};
    PyObject *xo, *wo, *bo = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:linear", kwlist, &xo, &wo, &bo)) return NULL;
    PyArrayObject *x, *w, *b = NULL;
    int N;
    if (!(x = f32_arg(xo, "x", 1, NPY_MAXDIMS, 0)) || !(w = f32_arg(wo, "weight", 2, 2, 0)) || !rows_of(x, "x", &N))
        return NULL;
    int IN = (int)PyArray_DIM(x, PyArray_NDIM(x) - 1), OUT = (int)PyArray_DIM(w, 0);
    if (!dim_is(w, "weight", 1, IN, "weight is [out_features, in_features]; in_features = x.shape[-1]")) return NULL;
    if (bo != Py_None && (!(b = f32_arg(bo, "bias", 1, 1, 0)) || !dim_is(b, "bias", 0, OUT, "out_features = weight.shape[0]")))
        return NULL;
    npy_intp dims[NPY_MAXDIMS];
    for (int i = 0; i < PyArray_NDIM(x); i++) dims[i] = PyArray_DIM(x, i);
    dims[PyArray_NDIM(x) - 1] = OUT;
    PyArrayObject *y = (PyArrayObject *)PyArray_EMPTY(PyArray_NDIM(x), dims, NPY_FLOAT32, 0);
    if (!y) return NULL;
    Py_BEGIN_ALLOW_THREADS
    linear_forward(F(y), F(x), F(w), b ? F(b) : NULL, N, IN, OUT);
    Py_END_ALLOW_THREADS
    return (PyObject *)y;
}

static PyObject *py_linear_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "x", "weight", NULL};
    PyObject *dyo, *xo, *wo;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO:linear_backward", kwlist, &dyo, &xo, &wo)) return NULL;
    PyArrayObject *dy, *x, *w;
    int N;
    if (!(dy = f32_arg(dyo, "dy", 1, NPY_MAXDIMS, 0)) || !(x = f32_arg(xo, "x", 1, NPY_MAXDIMS, 0)) ||
        !(w = f32_arg(wo, "weight", 2, 2, 0)) || !rows_of(x, "x", &N))
        return NULL;
    int IN = (int)PyArray_DIM(x, PyArray_NDIM(x) - 1), OUT = (int)PyArray_DIM(w, 0);
    if (!dim_is(w, "weight", 1, IN, "weight is [out_features, in_features]; in_features = x.shape[-1]") ||
        !dim_is(dy, "dy", -1, OUT, "out_features = weight.shape[0]"))
        return NULL;
    if (PyArray_NDIM(dy) != PyArray_NDIM(x) ||
        !PyArray_CompareLists(PyArray_DIMS(dy), PyArray_DIMS(x), PyArray_NDIM(x) - 1)) {
        PyErr_SetString(PyExc_ValueError, "dy must have the leading dimensions of x (dy is [..., out], x is [..., in])");
        return NULL;
    }
    PyObject *result = NULL;
    npy_intp ob[1] = {OUT};
    PyArrayObject *dx = new_like(x, 1), *dw = new_like(w, 1), *db = new_f32(1, ob, 1);
    if (dx && dw && db) {
        Py_BEGIN_ALLOW_THREADS
        linear_backward(F(dx), F(dw), F(db), F(dy), F(x), F(w), N, IN, OUT);
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("(OOO)", dx, dw, db);
    }
    Py_XDECREF(dx); Py_XDECREF(dw); Py_XDECREF(db);
    return result;
}

/* ---- attention -------------------------------------------------------------------------------- */

typedef struct {
    PyArrayObject *q, *k, *v, *mask;   /* mask: new reference or NULL */
    bq_attn_shape s;
    double p;
    unsigned long long seed;
    unsigned int step, tensor_id;
} attn_args;

/* The ops API numbers dropout elements by plain position in the [B,NH,T,T] probabilities. */
static bq_rng ops_rng(const attn_args *a) { return (bq_rng){a->seed, a->step, NULL, a->s.T}; }

static int attn_parse(attn_args *a, PyObject *qo, PyObject *ko, PyObject *vo, PyObject *mo) {
    a->mask = NULL;
    if (!(a->q = f32_arg(qo, "q", 4, 4, 0)) || !(a->k = f32_arg(ko, "k", 4, 4, 0)) ||
        !(a->v = f32_arg(vo, "v", 4, 4, 0)) || !same_shape(a->k, "k", a->q, "q") || !same_shape(a->v, "v", a->q, "q") ||
        !finite_in(a->p, "dropout_p", 0.0, 1.0, 1))
        return 0;
    bq_attn_shape s;
    s.B = (int)PyArray_DIM(a->q, 0);
    s.NH = (int)PyArray_DIM(a->q, 1);
    s.T = (int)PyArray_DIM(a->q, 2);
    s.HS = (int)PyArray_DIM(a->q, 3);
    s.st = s.HS;
    s.sh = (long)s.T * s.HS;
    s.sb = (long)s.NH * s.T * s.HS;
    /* the probabilities [B,NH,T,T] must fit */
    double bytes = 1.0 * s.B * s.NH * (double)s.T * s.T * sizeof(float);
    if (bytes > 1e12) {
        PyErr_Format(PyExc_MemoryError, "attention over B=%d, NH=%d, T=%d needs %.0f GB of scratch", s.B, s.NH, s.T,
                     bytes / 1e9);
        return 0;
    }
    a->s = s;
    if (mo != Py_None && !(a->mask = mask_arg(mo, "mask", s.B, s.T))) return 0;
    return 1;
}

static PyObject *py_attention(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"q", "k", "v", "mask", "dropout_p", "seed", "step", "tensor_id", NULL};
    PyObject *qo, *ko, *vo, *mo = Py_None;
    attn_args a = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|OdKII:attention", kwlist, &qo, &ko, &vo, &mo, &a.p, &a.seed,
                                     &a.step, &a.tensor_id))
        return NULL;
    if (!attn_parse(&a, qo, ko, vo, mo)) { Py_XDECREF(a.mask); return NULL; }
    PyObject *result = NULL;
    PyArrayObject *out = new_like(a.q, 0);
    float *att = malloc((size_t)a.s.B * a.s.NH * a.s.T * a.s.T * sizeof(float));
    int st = BQ_OK;
    if (!out) goto done;
    if (!att) { PyErr_NoMemory(); goto done; }
    const float *mask = a.mask ? F(a.mask) : NULL;
    Py_BEGIN_ALLOW_THREADS
    st = attention_forward(F(out), att, F(a.q), F(a.k), F(a.v), mask, a.s, (float)a.p, ops_rng(&a), a.tensor_id);
    Py_END_ALLOW_THREADS
    if (st) { status_error(st, "attention"); goto done; }
    result = (PyObject *)out;
    out = NULL;
done:
    free(att);
    Py_XDECREF(out);
    Py_XDECREF(a.mask);
    return result;
}

static PyObject *py_attention_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dout", "q", "k", "v", "mask", "dropout_p", "seed", "step", "tensor_id", NULL};
    PyObject *dgo, *qo, *ko, *vo, *mo = Py_None;
    attn_args a = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|OdKII:attention_backward", kwlist, &dgo, &qo, &ko, &vo, &mo,
                                     &a.p, &a.seed, &a.step, &a.tensor_id))
        return NULL;
    PyArrayObject *dout;
    if (!attn_parse(&a, qo, ko, vo, mo) || !(dout = f32_arg(dgo, "dout", 4, 4, 0)) ||
        !same_shape(dout, "dout", a.q, "q")) {
        Py_XDECREF(a.mask);
        return NULL;
    }
    PyObject *result = NULL;
    PyArrayObject *dq = new_like(a.q, 1), *dk = new_like(a.q, 1), *dv = new_like(a.q, 1), *tmp = new_like(a.q, 0);
    size_t natt = (size_t)a.s.B * a.s.NH * a.s.T * a.s.T;
    float *att = malloc(natt * sizeof(float));   /* the probabilities, recomputed by a forward */
    int st = BQ_OK;
    if (!dq || !dk || !dv || !tmp) goto done;
    if (!att) { PyErr_NoMemory(); goto done; }
    const float *mask = a.mask ? F(a.mask) : NULL;
    Py_BEGIN_ALLOW_THREADS
    st = attention_forward(F(tmp), att, F(a.q), F(a.k), F(a.v), mask, a.s, (float)a.p, ops_rng(&a), a.tensor_id);
    if (!st)
        st = attention_backward(F(dq), F(dk), F(dv), F(dout), att, F(a.q), F(a.k), F(a.v), a.s, (float)a.p,
                                ops_rng(&a), a.tensor_id);
    Py_END_ALLOW_THREADS
    if (st) { status_error(st, "attention_backward"); goto done; }
    result = Py_BuildValue("(OOO)", dq, dk, dv);
done:
    free(att);
    Py_XDECREF(dq); Py_XDECREF(dk); Py_XDECREF(dv); Py_XDECREF(tmp);
    Py_XDECREF(a.mask);
    return result;
}

/* ---- embeddings ------------------------------------------------------------------------------- */

static int embed_ids(PyObject *io, PyObject *to, PyArrayObject **ids, PyArrayObject **types) {
    *ids = *types = NULL;
    if (!(*ids = ids_arg(io, "input_ids", 2))) return 0;
    if (to != Py_None) {
        if (!(*types = ids_arg(to, "token_type_ids", 2))) return 0;
        if (!same_shape(*types, "token_type_ids", *ids, "input_ids")) return 0;
    }
    return 1;
}

static PyObject *py_embedding(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"input_ids", "token_type_ids", "word_embeddings", "position_embeddings",
                             "token_type_embeddings", NULL};
    PyObject *io, *to, *wo, *po, *yo;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:embedding", kwlist, &io, &to, &wo, &po, &yo)) return NULL;
    PyArrayObject *ids, *types, *wte, *wpe, *wtt, *out = NULL;
    if (!embed_ids(io, to, &ids, &types) || !(wte = f32_arg(wo, "word_embeddings", 2, 2, 0)) ||
        !(wpe = f32_arg(po, "position_embeddings", 2, 2, 0)) || !(wtt = f32_arg(yo, "token_type_embeddings", 2, 2, 0)))
        goto done;
    int B = (int)PyArray_DIM(ids, 0), T = (int)PyArray_DIM(ids, 1), C = (int)PyArray_DIM(wte, 1);
    int V = (int)PyArray_DIM(wte, 0), P = (int)PyArray_DIM(wpe, 0), NT = (int)PyArray_DIM(wtt, 0);
    if (!dim_is(wpe, "position_embeddings", 1, C, "hidden size = word_embeddings.shape[1]") ||
        !dim_is(wtt, "token_type_embeddings", 1, C, "hidden size = word_embeddings.shape[1]") ||
        !check_id_range(ids, "input_ids", V, "word_embeddings rows") ||
        (types && !check_id_range(types, "token_type_ids", NT, "token_type_embeddings rows")))
        goto done;
    if (T > P) {
        PyErr_Format(PyExc_ValueError, "sequence length %d is longer than position_embeddings (%d positions)", T, P);
        goto done;
    }
    npy_intp dims[3] = {B, T, C};
    if (!(out = new_f32(3, dims, 0))) goto done;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = embedding_forward(F(out), I64(ids), types ? I64(types) : NULL, F(wte), F(wpe), F(wtt), B, T, C, V, P, NT);
    Py_END_ALLOW_THREADS
    if (st) { status_error(st, "embedding"); Py_CLEAR(out); }
done:
    Py_XDECREF(ids);
    Py_XDECREF(types);
    return (PyObject *)out;
}

static PyObject *py_embedding_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dout", "input_ids", "token_type_ids", "vocab_size", "max_position_embeddings",
                             "type_vocab_size", "padding_idx", NULL};
    PyObject *go, *io, *to, *po = Py_None, *result = NULL;
    int V, P, NT;
    long long pad = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOiii|O:embedding_backward", kwlist, &go, &io, &to, &V, &P, &NT, &po))
        return NULL;
    if (po != Py_None && ((pad = PyLong_AsLongLong(po)) == -1 && PyErr_Occurred()))
        return NULL;
    PyArrayObject *dout, *ids, *types, *dwte = NULL, *dwpe = NULL, *dwtt = NULL;
    if (!embed_ids(io, to, &ids, &types) || !(dout = f32_arg(go, "dout", 3, 3, 0))) goto done;
    int B = (int)PyArray_DIM(ids, 0), T = (int)PyArray_DIM(ids, 1), C = (int)PyArray_DIM(dout, 2);
    if (!dim_is(dout, "dout", 0, B, "batch of input_ids") || !dim_is(dout, "dout", 1, T, "length of input_ids"))
        goto done;
    if (V < 1 || P < 1 || NT < 1) {
        PyErr_SetString(PyExc_ValueError, "vocab_size, max_position_embeddings and type_vocab_size must be >= 1");
        goto done;
    }
    if (!check_id_range(ids, "input_ids", V, "vocab_size") ||
        (types && !check_id_range(types, "token_type_ids", NT, "type_vocab_size")))
        goto done;
    if (T > P) {
        PyErr_Format(PyExc_ValueError, "sequence length %d is longer than max_position_embeddings %d", T, P);
        goto done;
    }
    npy_intp dv[2] = {V, C}, dp[2] = {P, C}, dt[2] = {NT, C};
    if (!(dwte = new_f32(2, dv, 1)) || !(dwpe = new_f32(2, dp, 1)) || !(dwtt = new_f32(2, dt, 1))) goto done;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = embedding_backward(F(dwte), F(dwpe), F(dwtt), F(dout), I64(ids), types ? I64(types) : NULL, B, T, C, V, P, NT,
                            (int64_t)pad);
    Py_END_ALLOW_THREADS
    if (st) { status_error(st, "embedding_backward"); goto done; }
    result = Py_BuildValue("(OOO)", dwte, dwpe, dwtt);
done:
    Py_XDECREF(ids); Py_XDECREF(types);
    Py_XDECREF(dwte); Py_XDECREF(dwpe); Py_XDECREF(dwtt);
    return result;
}

/* ---- dropout and the RNG ---------------------------------------------------------------------- */

static PyObject *py_dropout(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "p", "seed", "step", "tensor_id", NULL};
    PyObject *xo;
    double p;
    unsigned long long seed;
    unsigned int step = 0, tid = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OdK|II:dropout", kwlist, &xo, &p, &seed, &step, &tid)) return NULL;
    PyArrayObject *x = f32_arg(xo, "x", 0, NPY_MAXDIMS, 0);
    if (!x || !finite_in(p, "p", 0.0, 1.0, 1)) return NULL;
    PyArrayObject *y = new_like(x, 0);
    if (!y) return NULL;
    size_t n = (size_t)PyArray_SIZE(x);
    Py_BEGIN_ALLOW_THREADS
    dropout_forward(F(y), F(x), n, (float)p, seed, step, tid);
    Py_END_ALLOW_THREADS
    return (PyObject *)y;
}

static PyObject *py_dropout_backward(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"dy", "p", "seed", "step", "tensor_id", NULL};
    PyObject *go;
    double p;
    unsigned long long seed;
    unsigned int step = 0, tid = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OdK|II:dropout_backward", kwlist, &go, &p, &seed, &step, &tid))
        return NULL;
    PyArrayObject *dy = f32_arg(go, "dy", 0, NPY_MAXDIMS, 0);
    if (!dy || !finite_in(p, "p", 0.0, 1.0, 1)) return NULL;
    PyArrayObject *dx = new_like(dy, 1);
    if (!dx) return NULL;
    size_t n = (size_t)PyArray_SIZE(dy);
    Py_BEGIN_ALLOW_THREADS
    dropout_backward(F(dx), F(dy), n, (float)p, seed, step, tid);
    Py_END_ALLOW_THREADS
    return (PyObject *)dx;
}

static PyObject *py_philox4x32(PyObject *self, PyObject *args) {
    uint32_t c[4], k[2], r[4];
    if (!PyArg_ParseTuple(args, "(IIII)(II):philox4x32", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1])) return NULL;
    bq_philox4x32(r, c, k);
    return Py_BuildValue("(IIII)", r[0], r[1], r[2], r[3]);
}

static PyObject *py_uniform(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"n", "seed", "step", "tensor_id", "offset", NULL};
    Py_ssize_t n;
    unsigned long long seed, offset = 0;
    unsigned int step = 0, tid = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "nK|IIK:uniform", kwlist, &n, &seed, &step, &tid, &offset)) return NULL;
    if (n < 1) return PyErr_Format(PyExc_ValueError, "n must be >= 1, got %zd", n);
    npy_intp d[1] = {n};
    PyArrayObject *u = new_f32(1, d, 0);
    if (!u) return NULL;
    float *p = F(u);
    Py_BEGIN_ALLOW_THREADS
    bq_uniform_fill(p, (size_t)n, seed, step, tid, offset);
    Py_END_ALLOW_THREADS
    return (PyObject *)u;
}

/* ---- span loss -------------------------------------------------------------------------------- */

static PyObject *py_span_loss(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"start_logits", "end_logits", "start_positions", "end_positions", NULL};
    PyObject *so, *eo, *spo, *epo, *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO:span_loss", kwlist, &so, &eo, &spo, &epo)) return NULL;
    PyArrayObject *s, *e, *sp = NULL, *ep = NULL, *ds = NULL, *de = NULL;
    if (!(s = f32_arg(so, "start_logits", 2, 2, 0)) || !(e = f32_arg(eo, "end_logits", 2, 2, 0)) ||
        !same_shape(e, "end_logits", s, "start_logits") || !(sp = ids_arg(spo, "start_positions", 1)) ||
        !(ep = ids_arg(epo, "end_positions", 1)))
        goto done;
    int B = (int)PyArray_DIM(s, 0), T = (int)PyArray_DIM(s, 1);
    if (!dim_is(sp, "start_positions", 0, B, "batch size of the logits") ||
        !dim_is(ep, "end_positions", 0, B, "batch size of the logits"))
        goto done;
    if (!(ds = new_like(s, 0)) || !(de = new_like(s, 0))) goto done;
    float loss;
    Py_BEGIN_ALLOW_THREADS
    loss = span_loss(F(ds), F(de), F(s), F(e), I64(sp), I64(ep), B, T, 1.0f);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(dOO)", (double)loss, ds, de);
done:
    Py_XDECREF(sp); Py_XDECREF(ep); Py_XDECREF(ds); Py_XDECREF(de);
    return result;
}

/* ---- optimizer -------------------------------------------------------------------------------- */

static PyObject *py_adamw(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"param", "grad", "m", "v", "step", "lr", "beta1", "beta2", "eps", "weight_decay",
                             "grad_scale", NULL};
    PyObject *po, *go, *mo, *vo;
    int step;
    double lr, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.0, gs = 1.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOid|ddddd:adamw", kwlist, &po, &go, &mo, &vo, &step, &lr, &b1, &b2,
                                     &eps, &wd, &gs))
        return NULL;
    PyArrayObject *p, *g, *m, *v;
    if (!(p = f32_arg(po, "param", 0, NPY_MAXDIMS, 1)) || !(g = f32_arg(go, "grad", 0, NPY_MAXDIMS, 0)) ||
        !(m = f32_arg(mo, "m", 0, NPY_MAXDIMS, 1)) || !(v = f32_arg(vo, "v", 0, NPY_MAXDIMS, 1)) ||
        !same_shape(g, "grad", p, "param") || !same_shape(m, "m", p, "param") || !same_shape(v, "v", p, "param"))
        return NULL;
    if (!bq_adamw_args_check(step, lr, b1, b2, eps, wd) || !finite_in(gs, "grad_scale", 0.0, 1e30, 0)) return NULL;
    if (p == m || p == v || m == v || PyArray_DATA(p) == PyArray_DATA(m) || PyArray_DATA(p) == PyArray_DATA(v) ||
        PyArray_DATA(m) == PyArray_DATA(v)) {
        PyErr_SetString(PyExc_ValueError, "param, m and v must be three different arrays");
        return NULL;
    }
    size_t n = (size_t)PyArray_SIZE(p);
    Py_BEGIN_ALLOW_THREADS
    adamw_update(F(p), F(g), F(m), F(v), n, (float)lr, (float)b1, (float)b2, (float)eps, (float)wd, step, (float)gs);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Borrowed float32 arrays from a sequence; returns a new list or NULL. */
static PyObject *grad_list(PyObject *seq, int writeable) {
    PyObject *fast = PySequence_Fast(seq, "grads must be a sequence of float32 arrays");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n == 0) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "grads is empty");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof name, "grads[%zd]", i);
        if (!f32_arg(PySequence_Fast_GET_ITEM(fast, i), name, 0, NPY_MAXDIMS, writeable)) {
            Py_DECREF(fast);
            return NULL;
        }
    }
    return fast;
}

static double total_sq(PyObject *fast) {
    double s = 0.0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); i++) {
        PyArrayObject *a = (PyArrayObject *)PySequence_Fast_GET_ITEM(fast, i);
        s += sum_squares(F(a), (size_t)PyArray_SIZE(a));
    }
    return s;
}

static PyObject *py_global_norm(PyObject *self, PyObject *args) {
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "O:global_norm", &seq)) return NULL;
    PyObject *fast = grad_list(seq, 0);
    if (!fast) return NULL;
    double s = total_sq(fast);
    Py_DECREF(fast);
    return PyFloat_FromDouble(sqrt(s));
}

static PyObject *py_clip_grad_norm(PyObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"grads", "max_norm", NULL};
    PyObject *seq;
    double max_norm;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Od:clip_grad_norm", kwlist, &seq, &max_norm)) return NULL;
    if (!(max_norm > 0.0) || !isfinite(max_norm))
        return PyErr_Format(PyExc_ValueError, "max_norm must be a positive finite number, got %g", max_norm);
    PyObject *fast = grad_list(seq, 1);
    if (!fast) return NULL;
    double norm = sqrt(total_sq(fast));
    double coef = max_norm / (norm + 1e-6);   /* torch.nn.utils.clip_grad_norm_ */
    if (coef < 1.0)
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast); i++) {
            PyArrayObject *a = (PyArrayObject *)PySequence_Fast_GET_ITEM(fast, i);
            scale_inplace(F(a), (size_t)PyArray_SIZE(a), (float)coef);
        }
    Py_DECREF(fast);
    return PyFloat_FromDouble(norm);
}

/* ---- threads / BLAS --------------------------------------------------------------------------- */

static PyObject *py_runtime_info(PyObject *self, PyObject *noargs) {
    /* isa: the kernels' instruction set in use (cpu.h); isas: those this CPU and build can run */
    /* precisions: {"fp32": None, "bf16": None or why this CPU cannot, "int8": ...} */
    return Py_BuildValue("{s:i,s:i,s:s,s:s,s:s,s:N,s:N}", "omp_threads", bq_num_threads(), "blas_threads",
                         bq_blas_num_threads(), "blas_config", bq_blas_config(), "blas_core", bq_blas_corename(),
                         "isa", bq_cpu_isa_name(), "isas", bq_py_isas(), "precisions", bq_py_precisions());
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i:set_num_threads", &n)) return NULL;
    if (n < 1) return PyErr_Format(PyExc_ValueError, "set_num_threads: n must be >= 1, got %d", n);
    bq_set_num_threads(n);
    Py_RETURN_NONE;
}

static PyObject *py_sgemm(PyObject *self, PyObject *args) {
    /* c = a @ b.T for benchmarking the BLAS itself: a [M,K], b [N,K] -> c [M,N] (preallocated, float32) */
    PyObject *ao, *bo, *co;
    if (!PyArg_ParseTuple(args, "OOO:sgemm_nt", &ao, &bo, &co)) return NULL;
    PyArrayObject *a, *b, *c;
    if (!(a = f32_arg(ao, "a", 2, 2, 0)) || !(b = f32_arg(bo, "b", 2, 2, 0)) || !(c = f32_arg(co, "c", 2, 2, 1)) ||
        !dim_is(b, "b", 1, PyArray_DIM(a, 1), "K = a.shape[1]") || !dim_is(c, "c", 0, PyArray_DIM(a, 0), "M") ||
        !dim_is(c, "c", 1, PyArray_DIM(b, 0), "N"))
        return NULL;
    int M = (int)PyArray_DIM(a, 0), K = (int)PyArray_DIM(a, 1), N = (int)PyArray_DIM(b, 0);
    Py_BEGIN_ALLOW_THREADS
    bq_sgemm(0, 1, M, N, K, 1.0f, F(a), K, F(b), K, 0.0f, F(c), N);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#define KW (METH_VARARGS | METH_KEYWORDS)
#define FN(name, flags, doc) {#name, (PyCFunction)(void (*)(void))py_##name, flags, doc}
static PyMethodDef methods[] = {
    FN(layernorm, KW, "layernorm(x, weight, bias, eps=1e-12)\n--\n\nLayerNorm over the last axis. See bertqa.ops."),
    FN(layernorm_backward, KW, "layernorm_backward(dy, x, weight, eps=1e-12)\n--\n\n-> (dx, dweight, dbias)"),
    FN(gelu, KW, "gelu(x)\n--\n\nExact (erf) GELU."),
    FN(gelu_backward, KW, "gelu_backward(dy, x)\n--\n\n-> dx"),
    FN(linear, KW, "linear(x, weight, bias=None)\n--\n\nx @ weight.T + bias, weight [out, in]."),
    FN(linear_backward, KW, "linear_backward(dy, x, weight)\n--\n\n-> (dx, dweight, dbias)"),
    FN(attention, KW, "attention(q, k, v, mask=None, dropout_p=0.0, seed=0, step=0, tensor_id=0)\n--\n\n"
                      "Masked multi-head attention on [B, NH, T, HS]."),
    FN(attention_backward, KW, "attention_backward(dout, q, k, v, mask=None, dropout_p=0.0, seed=0, step=0, "
                               "tensor_id=0)\n--\n\n-> (dq, dk, dv)"),
    FN(embedding, KW, "embedding(input_ids, token_type_ids, word_embeddings, position_embeddings, "
                      "token_type_embeddings)\n--\n\n-> [B, T, C]"),
    FN(embedding_backward, KW, "embedding_backward(dout, input_ids, token_type_ids, vocab_size, "
                               "max_position_embeddings, type_vocab_size, padding_idx=None)\n--\n\n-> (dword, dposition, dtype)"),
    FN(dropout, KW, "dropout(x, p, seed, step=0, tensor_id=0)\n--\n\nInverted dropout from Philox4x32-10."),
    FN(dropout_backward, KW, "dropout_backward(dy, p, seed, step=0, tensor_id=0)\n--\n\n-> dx"),
    FN(philox4x32, METH_VARARGS, "philox4x32(counter, key)\n--\n\nOne Philox4x32-10 block: 4 words from 4 + 2."),
    FN(uniform, KW, "uniform(n, seed, step=0, tensor_id=0, offset=0)\n--\n\nThe dropout RNG's uniforms [n]."),
    FN(span_loss, KW, "span_loss(start_logits, end_logits, start_positions, end_positions)\n--\n\n"
                      "-> (loss, dstart, dend)"),
    FN(adamw, KW, "adamw(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, "
                  "grad_scale=1.0)\n--\n\nOne AdamW step in place."),
    FN(global_norm, METH_VARARGS, "global_norm(grads)\n--\n\nsqrt of the sum of squares over all arrays."),
    FN(clip_grad_norm, KW, "clip_grad_norm(grads, max_norm)\n--\n\nScale in place to max_norm; return the norm."),
    FN(runtime_info, METH_NOARGS, "runtime_info()\n--\n\nThreads, BLAS and CPU instruction set in use."),
    FN(set_num_threads, METH_VARARGS, "set_num_threads(n)\n--\n\nThreads for the kernels and the BLAS."),
    FN(sgemm, METH_VARARGS, "sgemm(a, b, c)\n--\n\nc = a @ b.T straight through the BLAS (for benchmarks)."),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "bertqa._C",
    "bertqa's C compute core (CPU): float32 kernels on NumPy arrays. Use bertqa.ops for the documented API.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__C(void) {
    if (bq_import_numpy() < 0) return NULL;
    bq_init_threads();
    char err[256];
    if (bq_cpu_init(err, sizeof err) != BQ_OK) {   /* BERTQA_CPU names an ISA this CPU cannot run, or no ISA */
        PyErr_SetString(PyExc_RuntimeError, err);
        return NULL;
    }
    PyObject *mod = PyModule_Create(&moduledef);
    if (mod && (bq_add_engine_type(mod) < 0 || bq_add_cpu_functions(mod) < 0 || bq_add_attention_functions(mod) < 0 ||
                bq_add_lowp_functions(mod) < 0))
        Py_CLEAR(mod);
    return mod;
}
