/* bertqa._cuda: the CUDA backend as a Python module (CPython + NumPy C API), separate from bertqa._C so that
 * `import bertqa` and the CPU engine never need the CUDA libraries; bertqa.cuda imports it on first use.
 *
 *   device_count() -> (n, reason)       usable GPUs (compute capability >= 8.0), and why none when n == 0
 *   device_info(dev) -> dict            name, capability, memory, multiprocessors
 *   versions() -> (runtime, driver)
 *   Engine(config, params, training=False, precision="bf16", device=0)
 *                                       the GPU engine (cuda/model.cu), same methods as bertqa._C.Engine plus
 *                                       enable_training, zero_grad, download, upload, synchronize
 *   nccl_version(), nccl_library(), nccl_unique_id()
 *   NcclComm(unique_id, nranks, rank, device=0)
 *                                       NCCL (loaded at run time, cuda/nccl.c) for the data-parallel gradient sum:
 *                                       .allreduce_sum_grads(engine, timeout=0.0), .close(), .abort()
 *   <kernel>(...)                       the kernels one by one on preallocated host arrays (bertqa.cuda.ops wraps
 *                                       them with shapes); outputs are written in place
 *
 * Failures raise: MemoryError (device or host memory), ValueError (bad arguments, ids out of range),
 * RuntimeError (a CUDA/cuBLAS error or no usable device), each with the backend's message (the failing call,
 * the CUDA error string and file:line).
 */
#include "pyargs.h"   /* csrc/pyargs.c, linked into this module too: the argument checks both engines share */
#include "engine_methods.h"   /* csrc/engine_methods.c, linked in too: the Engine methods both engines share */

#include <structmember.h>

#include <math.h>
#include <string.h>
#include <unistd.h>

#include "bertqa_cuda.h"

#define FN(a) ((a) ? (float *)PyArray_DATA(a) : NULL)
#define I64N(a) ((a) ? (const int64_t *)PyArray_DATA(a) : NULL)

static PyObject *raise_status(int st, const char *what) {
    return bq_raise_status(st, what, bq_cuda_status_string(st), bq_cuda_last_error());
}

static int parse_precision(const char *s, int *out) {
    if (!strcmp(s, "fp32") || !strcmp(s, "float32")) *out = BQ_FP32;
    else if (!strcmp(s, "bf16") || !strcmp(s, "bfloat16")) *out = BQ_BF16;
    else {
        PyErr_Format(PyExc_ValueError, "precision must be 'fp32' or 'bf16', got '%s'", s);
        return 0;
    }
    return 1;
}

/* ---- Engine ---------------------------------------------------------------------------------------------- */

typedef struct {
    bq_engine base;   /* base.model: the bq_cuda_model, once initialised */
    int device;
} Engine;

/* ---- the backend for csrc/engine_methods.c (Engine.forward, forward_backward, adamw_step, tensor_sizes) ---- */

static int cuda_training(const void *model) { return bq_cuda_model_training(model); }

static const size_t *cuda_offsets(const void *model, int *ntensors) {
    *ntensors = bq_cuda_model_ntensors(model);
    return bq_cuda_model_offsets(model);
}

static int cuda_forward(void *model, const bq_batch *b, float *start, float *end) {
    return bq_cuda_forward(model, I64(b->ids), I64N(b->types), FN(b->mask), NULL, b->B, b->T, 0, 0, 0, start, end);
}

static int cuda_forward_backward(void *model, const bq_train_batch *t, float *loss) {
    const bq_batch *b = &t->batch;
    int st = bq_cuda_forward(model, I64(b->ids), I64N(b->types), FN(b->mask), I64N(t->window_ids), b->B, b->T, 1,
                             t->seed, t->step, NULL, NULL);
    if (!st)
        st = bq_cuda_backward(model, I64(b->ids), I64N(b->types), I64(t->start_positions), I64(t->end_positions),
                              t->seed, t->step, (float)t->loss_scale, loss);
    return st;
}

static int cuda_adamw_step(void *model, const bq_adamw_step_args *a, double *norm) {
    return bq_cuda_adamw_step(model, a->decay, a->lr_scale, (float)a->lr, (float)a->beta1, (float)a->beta2,
                              (float)a->eps, (float)a->weight_decay, (float)a->max_grad_norm, a->step, norm);
}

static const bq_engine_backend cuda_backend = {
    .inference_only = "this Engine was built for inference: call enable_training() first",
    .training = cuda_training,
    .offsets = cuda_offsets,
    .forward = cuda_forward,
    .forward_backward = cuda_forward_backward,
    .adamw_step = cuda_adamw_step,
    .raise = raise_status,
};

/* ---- the type ----------------------------------------------------------------------------------------------- */

static void engine_dealloc(Engine *self) {
    if (self->base.model) bq_cuda_model_free(self->base.model);
    if (self->base.lock) PyThread_free_lock(self->base.lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ready(Engine *self) { return bq_engine_ready(&self->base, 0); }

static int parse_attention(const char *s, int *mode) {
    if (!strcmp(s, "cudnn")) *mode = BQ_ATTN_CUDNN;
    else if (!strcmp(s, "own")) *mode = BQ_ATTN_OWN;
    else {
        PyErr_Format(PyExc_ValueError, "attention must be 'cudnn' or 'own', got '%s'", s);
        return 0;
    }
    return 1;
}

static int engine_init(Engine *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"config", "params", "training", "precision", "device", "attention", NULL};
    PyObject *cfg, *po;
    int training = 0, device = 0, precision, attention;
    const char *prec = "bf16", *attn = "cudnn";
    if (self->base.model) {
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O|psis:Engine", kwlist, &PyDict_Type, &cfg, &po, &training, &prec,
                                     &device, &attn))
        return -1;
    if (!parse_precision(prec, &precision) || !parse_attention(attn, &attention)) return -1;
    bq_config c;
    if (!bq_config_from_dict(cfg, &c)) return -1;
    /* the parameter count, from the same table as the engine */
    size_t n = (size_t)c.V * c.C + (size_t)c.P * c.C + (size_t)c.NT * c.C + 2 * (size_t)c.C + 2 * (size_t)c.C + 2 +
               (size_t)c.L * (4 * ((size_t)c.C * c.C + c.C) + 2 * (size_t)c.FF * c.C + c.FF + c.C + 4 * (size_t)c.C);
    PyArrayObject *params;
    if (!f32_sized(po, "params", 1, n, "the model's parameter count", 0, 0, &params)) return -1;
    if (!self->base.lock && !(self->base.lock = PyThread_allocate_lock())) {   /* kept from a failed __init__ */
        PyErr_NoMemory();
        return -1;
    }
    int st;
    bq_cuda_model *m = NULL;
    Py_BEGIN_ALLOW_THREADS
    st = bq_cuda_model_init(&m, &c, F(params), precision, training, device);
    Py_END_ALLOW_THREADS
    if (st) {
        raise_status(st, "Engine");
        return -1;
    }
    if (bq_cuda_model_nparams(m) != n) {   /* the two tables must agree */
        bq_cuda_model_free(m);
        PyErr_SetString(PyExc_RuntimeError, "bertqa internal error: CUDA engine parameter count mismatch");
        return -1;
    }
    bq_cuda_model_set_attention(m, attention);
    self->base.backend = &cuda_backend;
    self->base.cfg = c;
    self->base.model = m;
    self->device = device;
    return 0;
}

typedef int (*model_fn)(bq_cuda_model *);

static PyObject *engine_call0(Engine *self, model_fn fn, const char *what) {
    if (!ready(self)) return NULL;
    int st;
    bq_lock_wait(self->base.lock);
    Py_BEGIN_ALLOW_THREADS
    st = fn(self->base.model);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->base.lock);
    if (st) return raise_status(st, what);
    Py_RETURN_NONE;
}

static PyObject *engine_enable_training(Engine *self, PyObject *noargs) {
    return engine_call0(self, bq_cuda_model_enable_training, "Engine.enable_training");
}
static PyObject *engine_zero_grad(Engine *self, PyObject *noargs) {
    return engine_call0(self, bq_cuda_model_zero_grad, "Engine.zero_grad");
}
static PyObject *engine_release_arena(Engine *self, PyObject *noargs) {
    return engine_call0(self, bq_cuda_model_release_arena, "Engine.release_arena");
}
static PyObject *engine_synchronize(Engine *self, PyObject *noargs) {
    return engine_call0(self, bq_cuda_model_synchronize, "Engine.synchronize");
}

static int buffer_number(const char *name) {
    if (!strcmp(name, "params")) return BQ_BUF_PARAMS;
    if (!strcmp(name, "grads")) return BQ_BUF_GRADS;
    if (!strcmp(name, "m")) return BQ_BUF_M;
    if (!strcmp(name, "v")) return BQ_BUF_V;
    PyErr_Format(PyExc_ValueError, "buffer must be 'params', 'grads', 'm' or 'v', got '%s'", name);
    return -1;
}

static PyObject *engine_copy(Engine *self, PyObject *args, int to_device) {
    const char *name;
    PyObject *ao;
    if (!ready(self) || !PyArg_ParseTuple(args, "sO", &name, &ao)) return NULL;
    const int which = buffer_number(name);
    PyArrayObject *a;
    if (which < 0 || !f32_sized(ao, to_device ? "array" : "out", 0, bq_cuda_model_nparams(self->base.model),
                                "the model's parameter count", !to_device, 0, &a))
        return NULL;
    int st;
    bq_lock_wait(self->base.lock);
    Py_BEGIN_ALLOW_THREADS
    st = to_device ? bq_cuda_model_upload(self->base.model, which, F(a))
                   : bq_cuda_model_download(self->base.model, which, F(a));
    Py_END_ALLOW_THREADS
    PyThread_release_lock(self->base.lock);
    if (st) return raise_status(st, to_device ? "Engine.upload" : "Engine.download");
    Py_RETURN_NONE;
}
static PyObject *engine_download(Engine *self, PyObject *args) { return engine_copy(self, args, 0); }
static PyObject *engine_upload(Engine *self, PyObject *args) { return engine_copy(self, args, 1); }

static PyObject *engine_arena_bytes(Engine *self, PyObject *noargs) {
    if (!ready(self)) return NULL;
    return PyLong_FromSize_t(bq_cuda_model_arena_bytes(self->base.model));
}

static PyObject *engine_get_precision(Engine *self, void *closure) {
    if (!ready(self)) return NULL;
    return PyUnicode_FromString(bq_cuda_model_precision(self->base.model) == BQ_BF16 ? "bf16" : "fp32");
}
static PyObject *engine_get_training(Engine *self, void *closure) {
    if (!ready(self)) return NULL;
    return PyBool_FromLong(bq_cuda_model_training(self->base.model));
}
static PyObject *engine_get_device(Engine *self, void *closure) { return PyLong_FromLong(self->device); }
static PyObject *engine_get_attention(Engine *self, void *closure) {
    if (!ready(self)) return NULL;
    return PyUnicode_FromString(bq_cuda_model_attention(self->base.model) == BQ_ATTN_CUDNN ? "cudnn" : "own");
}
static int engine_set_attention(Engine *self, PyObject *value, void *closure) {
    if (!ready(self)) return -1;
    if (!value || !PyUnicode_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "attention must be the string 'cudnn' or 'own'");
        return -1;
    }
    const char *s = PyUnicode_AsUTF8(value);
    int mode;
    if (!s || !parse_attention(s, &mode)) return -1;
    bq_lock_wait(self->base.lock);   /* not between a running forward and its backward's choice */
    bq_cuda_model_set_attention(self->base.model, mode);
    PyThread_release_lock(self->base.lock);
    return 0;
}
static PyObject *engine_get_attention_used(Engine *self, void *closure) {
    if (!ready(self)) return NULL;
    bq_lock_wait(self->base.lock);
    PyObject *r = PyUnicode_FromString(bq_cuda_model_attention_used(self->base.model));
    PyThread_release_lock(self->base.lock);
    return r;
}
static PyObject *engine_get_gemm_stats(Engine *self, void *closure) {
    if (!ready(self)) return NULL;
    long lt, fb;
    bq_cuda_model_gemm_stats(self->base.model, &lt, &fb);
    return Py_BuildValue("{s:l,s:l}", "cublaslt", lt, "cublas_fallback", fb);
}

static PyGetSetDef engine_getset[] = {
    {"precision", (getter)engine_get_precision, NULL, "'fp32' or 'bf16'", NULL},
    {"training", (getter)engine_get_training, NULL, "whether gradients and Adam state are allocated", NULL},
    {"device", (getter)engine_get_device, NULL, "CUDA device number", NULL},
    {"attention", (getter)engine_get_attention, (setter)engine_set_attention,
     "'cudnn' (the default: cuDNN's fused attention wherever it takes the batch: bf16, masks of real tokens then "
     "padding, T >= 2; the own kernels elsewhere) or 'own' (always the own kernels: exact CPU parity, attention "
     "dropout included, whose cuDNN masks come from cuDNN's own Philox stream)", NULL},
    {"attention_used", (getter)engine_get_attention_used, NULL,
     "what the last forward's attention ran on: 'cudnn', or 'own (<why>)'", NULL},
    {"gemm_stats", (getter)engine_get_gemm_stats, NULL,
     "matrix products so far through cuBLASLt and through the cuBLAS fallback", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef engine_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))bq_engine_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(input_ids, token_type_ids=None, attention_mask=None)\n--\n\n"
     "Eval-mode forward on the GPU: int [B,T] ids -> (start_logits, end_logits), float32 [B,T] host arrays."},
    {"forward_backward", (PyCFunction)(void (*)(void))bq_engine_forward_backward, METH_VARARGS | METH_KEYWORDS,
     "forward_backward(input_ids, token_type_ids, attention_mask, start_positions, end_positions, seed=0, step=0, "
     "loss_scale=1.0, window_ids=None)\n--\n\n"
     "Train-mode forward (dropout keyed by seed, step as on the CPU) and backward; gradients ADD into the device "
     "gradient buffer (times loss_scale). Returns the loss.\n\n"
     "window_ids: int64 [B], each row's window id (>= 0; None: row b is window b). Dropout masks are numbered by "
     "window, not by place in the batch: hidden element (b, t, c) is (window_ids[b] * P + t) * C + c, attention "
     "element (b, h, i, j) ((window_ids[b] * NH + h) * P + i) * P + j, P = max_position_embeddings, as the CPU "
     "engine."},
    {"adamw_step", (PyCFunction)(void (*)(void))bq_engine_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(decay, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0, "
     "lr_scale=None)\n--\n\n"
     "Global-norm clipping and one AdamW step on the device; lr_scale (float32 [ntensors], None: all 1) multiplies "
     "each tensor's learning rate (layer-wise decay). Returns the gradient norm before clipping; a "
     "non-finite norm leaves everything unchanged."},
    {"enable_training", (PyCFunction)engine_enable_training, METH_NOARGS,
     "enable_training()\n--\n\nAllocate (zeroed) gradients and Adam state on the device."},
    {"zero_grad", (PyCFunction)engine_zero_grad, METH_NOARGS, "zero_grad()\n--\n\nZero the device gradients."},
    {"download", (PyCFunction)engine_download, METH_VARARGS,
     "download(buffer, out)\n--\n\nCopy 'params', 'grads', 'm' or 'v' from the device into the float32 array out."},
    {"upload", (PyCFunction)engine_upload, METH_VARARGS,
     "upload(buffer, array)\n--\n\nCopy a float32 host array into 'params', 'grads', 'm' or 'v' on the device."},
    {"synchronize", (PyCFunction)engine_synchronize, METH_NOARGS,
     "synchronize()\n--\n\nWait for the engine's queued GPU work (surfaces an asynchronous error)."},
    {"tensor_sizes", (PyCFunction)bq_engine_tensor_sizes, METH_NOARGS,
     "tensor_sizes()\n--\n\nElement counts of the parameter tensors in buffer order."},
    {"arena_bytes", (PyCFunction)engine_arena_bytes, METH_NOARGS,
     "arena_bytes()\n--\n\nBytes of the device activation arena now allocated."},
    {"release_arena", (PyCFunction)engine_release_arena, METH_NOARGS,
     "release_arena()\n--\n\nFree the device activation arena (it is reallocated on the next call)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bertqa._cuda.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(config, params, training=False, precision='bf16', device=0)\n--\n\n"
              "BERT for question answering on a GPU; params (float32, the flat host buffer) are copied to the device.",
    .tp_methods = engine_methods,
    .tp_getset = engine_getset,
    .tp_init = (initproc)engine_init,
    .tp_new = PyType_GenericNew,
};

/* ---- devices ------------------------------------------------------------------------------------------------ */

static PyObject *py_device_count(PyObject *self, PyObject *noargs) {
    char reason[512];
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = bq_cuda_device_count(reason, sizeof reason);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(is)", n, reason);
}

static PyObject *py_device_info(PyObject *self, PyObject *args) {
    int dev = 0, major, minor, sms;
    size_t mem;
    char name[256];
    if (!PyArg_ParseTuple(args, "|i", &dev)) return NULL;
    int st = bq_cuda_device_info(dev, name, sizeof name, &major, &minor, &mem, &sms);
    if (st) return raise_status(st, "device_info");
    return Py_BuildValue("{s:s,s:(ii),s:K,s:i}", "name", name, "capability", major, minor, "total_memory",
                         (unsigned long long)mem, "multiprocessors", sms);
}

static PyObject *py_cudnn_version(PyObject *self, PyObject *noargs) {
    return PyLong_FromSize_t(bq_cuda_cudnn_version());
}

static PyObject *py_versions(PyObject *self, PyObject *noargs) {
    int rt, drv;
    bq_cuda_versions(&rt, &drv);
    return Py_BuildValue("(ii)", rt, drv);
}

/* ---- kernels one by one -------------------------------------------------------------------------------------- */
/* Arguments are positional; sizes come first-class from the caller (bertqa.cuda.ops), every array is checked
 * against them. */

#define CHECK_F(obj, name, n, out, opt, var) if (!f32_sized(obj, name, 0, n, NULL, out, opt, &var)) goto done
#define CHECK_I(obj, name, n, opt, var) if (!ids_sized(obj, name, n, opt, &var)) goto done
#define RUN(call, what)                          \
    do {                                         \
        int st_;                                 \
        Py_BEGIN_ALLOW_THREADS                   \
        st_ = (call);                            \
        Py_END_ALLOW_THREADS                     \
        if (st_) { raise_status(st_, what); goto done; } \
    } while (0)

static PyObject *py_uniform(PyObject *self, PyObject *args) {
    PyObject *uo, *result = NULL;
    unsigned long long seed, first = 0;
    unsigned int step, site;
    PyArrayObject *u;
    if (!PyArg_ParseTuple(args, "OKII|K:uniform", &uo, &seed, &step, &site, &first)) return NULL;
    if (!(u = f32_arg(uo, "u", 0, NPY_MAXDIMS, 1))) return NULL;
    RUN(bq_cuda_uniform(F(u), (size_t)PyArray_SIZE(u), seed, step, site, first), "uniform");
    result = Py_None;
    Py_INCREF(result);
done:
    return result;
}

static PyObject *py_dropout(PyObject *self, PyObject *args) {
    PyObject *oo, *io, *result = NULL;
    float p;
    unsigned long long seed;
    unsigned int step, site;
    const char *prec;
    int precision;
    PyArrayObject *out, *inp;
    if (!PyArg_ParseTuple(args, "OOfKIIs:dropout", &oo, &io, &p, &seed, &step, &site, &prec) ||
        !parse_precision(prec, &precision))
        return NULL;
    if (!(inp = f32_arg(io, "x", 0, NPY_MAXDIMS, 0))) return NULL;
    const size_t n = (size_t)PyArray_SIZE(inp);
    CHECK_F(oo, "out", n, 1, 0, out);
    RUN(bq_cuda_dropout(F(out), F(inp), n, p, seed, step, site, precision), "dropout");
    result = Py_None;
    Py_INCREF(result);
done:
    return result;
}

/* residual_layernorm(res, out, mean, rstd, x|None, y, w, b, N, C, eps, p, seed, step, site, precision) */
static PyObject *py_residual_layernorm(PyObject *self, PyObject *args) {
    PyObject *ro, *oo, *mo, *so, *xo, *yo, *wo, *bo, *result = NULL;
    int N, C, precision;
    float eps, p;
    unsigned long long seed;
    unsigned int step, site;
    const char *prec;
    PyArrayObject *res, *out, *mean, *rstd, *x, *y, *w, *b;
    if (!PyArg_ParseTuple(args, "OOOOOOOOiiffKIIs:residual_layernorm", &ro, &oo, &mo, &so, &xo, &yo, &wo, &bo, &N, &C,
                          &eps, &p, &seed, &step, &site, &prec) ||
        !parse_precision(prec, &precision))
        return NULL;
    const size_t NC = (size_t)N * C;
    CHECK_F(ro, "res", NC, 1, 0, res);
    CHECK_F(oo, "out", NC, 1, 0, out);
    CHECK_F(mo, "mean", N, 1, 0, mean);
    CHECK_F(so, "rstd", N, 1, 0, rstd);
    CHECK_F(xo, "x", NC, 0, 1, x);
    CHECK_F(yo, "y", NC, 0, 0, y);
    CHECK_F(wo, "weight", C, 0, 0, w);
    CHECK_F(bo, "bias", C, 0, 0, b);
    RUN(bq_cuda_residual_layernorm(F(res), F(out), F(mean), F(rstd), FN(x), F(y), F(w), F(b), N, C, eps, p, seed, step,
                                   site, precision),
        "residual_layernorm");
    result = Py_None;
    Py_INCREF(result);
done:
    return result;
}

/* layernorm_backward(dinp, branch|None, dw|None, db|None, dout, inp, w, mean, rstd, N, C, p_in, in_site, p_out,
 *                    out_site, seed, step, precision) */
static PyObject *py_layernorm_backward(PyObject *self, PyObject *args) {
    PyObject *dio, *bro, *dwo, *dbo, *doo, *io, *wo, *mo, *so, *result = NULL;
    int N, C, precision;
    float p_in, p_out;
    unsigned int in_site, out_site, step;
    unsigned long long seed;
    const char *prec;
    PyArrayObject *dinp, *branch, *dw, *db, *dout, *inp, *w, *mean, *rstd;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOiifIfIKIs:layernorm_backward", &dio, &bro, &dwo, &dbo, &doo, &io, &wo, &mo,
                          &so, &N, &C, &p_in, &in_site, &p_out, &out_site, &seed, &step, &prec) ||
        !parse_precision(prec, &precision))
        return NULL;
    const size_t NC = (size_t)N * C;
    CHECK_F(dio, "dinp", NC, 1, 0, dinp);
    CHECK_F(bro, "branch", NC, 1, 1, branch);
    CHECK_F(dwo, "dweight", C, 1, 1, dw);
    CHECK_F(dbo, "dbias", C, 1, 1, db);
    CHECK_F(doo, "dout", NC, 0, 0, dout);
    CHECK_F(io, "inp", NC, 0, 0, inp);
    CHECK_F(wo, "weight", C, 0, 0, w);
    CHECK_F(mo, "mean", N, 0, 0, mean);
    CHECK_F(so, "rstd", N, 0, 0, rstd);
    RUN(bq_cuda_layernorm_backward(F(dinp), FN(branch), FN(dw), FN(db), F(dout), F(inp), F(w), F(mean), F(rstd), N, C,
                                   p_in, in_site, p_out, out_site, seed, step, precision),
        "layernorm_backward");
    result = Py_None;
    Py_INCREF(result);
done:
    return result;
}

/* embedding_layernorm(emb, out, mean, rstd, ids, types|None, wte, wpe, wtt, lnw, lnb, B, T, C, V, P, NT, eps, p,
 *                     seed, step, precision) */
static PyObject *py_embedding_layernorm(PyObject *self, PyObject *args) {
    PyObject *eo, *oo, *mo, *so, *io, *to, *weo, *wpo, *wto, *lwo, *lbo, *result = NULL;
    int B, T, C, V, P, NT, precision;
    float eps, p;
    unsigned long long seed;
    unsigned int step;
    const char *prec;
    PyArrayObject *emb, *out, *mean, *rstd, *ids = NULL, *types = NULL, *wte, *wpe, *wtt, *lnw, *lnb;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOiiiiiiffKIs:embedding_layernorm", &eo, &oo, &mo, &so, &io, &to, &weo, &wpo,
                          &wto, &lwo, &lbo, &B, &T, &C, &V, &P, &NT, &eps, &p, &seed, &step, &prec) ||
        !parse_precision(prec, &precision))
        return NULL;
    const size_t N = (size_t)B * T, NC = N * C;
    CHECK_F(eo, "emb", NC, 1, 0, emb);
    CHECK_F(oo, "out", NC, 1, 0, out);
    CHECK_F(mo, "mean", N, 1, 0, mean);
    CHECK_F(so, "rstd", N, 1, 0, rstd);
    CHECK_I(io, "input_ids", N, 0, ids);
    CHECK_I(to, "token_type_ids", N, 1, types);
    CHECK_F(weo, "word_embeddings", (size_t)V * C, 0, 0, wte);
    CHECK_F(wpo, "position_embeddings", (size_t)P * C, 0, 0, wpe);
    CHECK_F(wto, "token_type_embeddings", (size_t)NT * C, 0, 0, wtt);
    CHECK_F(lwo, "weight", C, 0, 0, lnw);
    CHECK_F(lbo, "bias", C, 0, 0, lnb);
    RUN(bq_cuda_embedding_layernorm(F(emb), F(out), F(mean), F(rstd), I64(ids), I64N(types), F(wte), F(wpe), F(wtt),
                                    F(lnw), F(lnb), B, T, C, V, P, NT, eps, p, seed, step, precision),
        "embedding_layernorm");
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(ids);
    Py_XDECREF(types);
    return result;
}

/* embedding_backward(dwte, dwpe, dwtt, dout, ids, types|None, B, T, C, V, P, NT, pad_id, precision) */
static PyObject *py_embedding_backward(PyObject *self, PyObject *args) {
    PyObject *a0, *a1, *a2, *doo, *io, *to, *result = NULL;
    int B, T, C, V, P, NT, precision;
    long long pad;
    const char *prec;
    PyArrayObject *dwte, *dwpe, *dwtt, *dout, *ids = NULL, *types = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOiiiiiiLs:embedding_backward", &a0, &a1, &a2, &doo, &io, &to, &B, &T, &C, &V, &P,
                          &NT, &pad, &prec) ||
        !parse_precision(prec, &precision))
        return NULL;
    const size_t N = (size_t)B * T;
    CHECK_F(a0, "dword", (size_t)V * C, 1, 0, dwte);
    CHECK_F(a1, "dposition", (size_t)P * C, 1, 0, dwpe);
    CHECK_F(a2, "dtype", (size_t)NT * C, 1, 0, dwtt);
    CHECK_F(doo, "dout", N * C, 0, 0, dout);
    CHECK_I(io, "input_ids", N, 0, ids);
    CHECK_I(to, "token_type_ids", N, 1, types);
    RUN(bq_cuda_embedding_backward(F(dwte), F(dwpe), F(dwtt), F(dout), I64(ids), I64N(types), B, T, C, V, P, NT, pad,
                                   precision),
        "embedding_backward");
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(ids);
    Py_XDECREF(types);
    return result;
}

/* gelu(out, x, precision); gelu_backward(dinp, x, dout, precision) */
static PyObject *py_gelu(PyObject *self, PyObject *args) {
    PyObject *oo, *io, *result = NULL;
    const char *prec;
    int precision;
    PyArrayObject *out, *inp;
    if (!PyArg_ParseTuple(args, "OOs:gelu", &oo, &io, &prec) || !parse_precision(prec, &precision)) return NULL;
    if (!(inp = f32_arg(io, "x", 0, NPY_MAXDIMS, 0))) return NULL;
    const size_t n = (size_t)PyArray_SIZE(inp);
    CHECK_F(oo, "out", n, 1, 0, out);
    RUN(bq_cuda_gelu(F(out), F(inp), n, precision), "gelu");
    result = Py_None;
    Py_INCREF(result);
done:
    return result;
}

static PyObject *py_gelu_backward(PyObject *self, PyObject *args) {
    PyObject *oo, *io, *go, *result = NULL;
    const char *prec;
    int precision;
    PyArrayObject *dinp, *inp, *dout;
    if (!PyArg_ParseTuple(args, "OOOs:gelu_backward", &oo, &io, &go, &prec) || !parse_precision(prec, &precision))
        return NULL;
    if (!(inp = f32_arg(io, "x", 0, NPY_MAXDIMS, 0))) return NULL;
    const size_t n = (size_t)PyArray_SIZE(inp);
    CHECK_F(go, "dout", n, 0, 0, dout);
    CHECK_F(oo, "dinp", n, 1, 0, dinp);
    RUN(bq_cuda_gelu_backward(F(dinp), F(inp), F(dout), n, precision), "gelu_backward");
    result = Py_None;
    Py_INCREF(result);
done:
    return result;
}

/* linear(out, x, w, b|None, N, IN, OUT, precision) */
static PyObject *py_linear(PyObject *self, PyObject *args) {
    PyObject *oo, *xo, *wo, *bo, *result = NULL;
    int N, IN, OUT, precision;
    const char *prec;
    PyArrayObject *out, *x, *w, *b;
    if (!PyArg_ParseTuple(args, "OOOOiiis:linear", &oo, &xo, &wo, &bo, &N, &IN, &OUT, &prec) ||
        !parse_precision(prec, &precision))
        return NULL;
    CHECK_F(oo, "out", (size_t)N * OUT, 1, 0, out);
    CHECK_F(xo, "x", (size_t)N * IN, 0, 0, x);
    CHECK_F(wo, "weight", (size_t)OUT * IN, 0, 0, w);
    CHECK_F(bo, "bias", OUT, 0, 1, b);
    RUN(bq_cuda_linear(F(out), F(x), F(w), FN(b), N, IN, OUT, precision), "linear");
    result = Py_None;
    Py_INCREF(result);
done:
    return result;
}

/* linear_backward(dinp|None, dw|None, db|None, dout, x, w, N, IN, OUT, precision) */
static PyObject *py_linear_backward(PyObject *self, PyObject *args) {
    PyObject *dio, *dwo, *dbo, *doo, *xo, *wo, *result = NULL;
    int N, IN, OUT, precision;
    const char *prec;
    PyArrayObject *dinp, *dw, *db, *dout, *x, *w;
    if (!PyArg_ParseTuple(args, "OOOOOOiiis:linear_backward", &dio, &dwo, &dbo, &doo, &xo, &wo, &N, &IN, &OUT, &prec) ||
        !parse_precision(prec, &precision))
        return NULL;
    CHECK_F(dio, "dinp", (size_t)N * IN, 1, 1, dinp);
    CHECK_F(dwo, "dweight", (size_t)OUT * IN, 1, 1, dw);
    CHECK_F(dbo, "dbias", OUT, 1, 1, db);
    CHECK_F(doo, "dout", (size_t)N * OUT, 0, 0, dout);
    CHECK_F(xo, "x", (size_t)N * IN, 0, 0, x);
    CHECK_F(wo, "weight", (size_t)OUT * IN, 0, 0, w);
    RUN(bq_cuda_linear_backward(FN(dinp), FN(dw), FN(db), F(dout), F(x), F(w), N, IN, OUT, precision),
        "linear_backward");
    result = Py_None;
    Py_INCREF(result);
done:
    return result;
}

/* attention(out, att, q, k, v, mask|None, B, NH, T, HS, p, seed, step, site, precision) */
static PyObject *py_attention(PyObject *self, PyObject *args) {
    PyObject *oo, *ao, *qo, *ko, *vo, *mo, *result = NULL;
    int B, NH, T, HS, precision;
    float p;
    unsigned long long seed;
    unsigned int step, site;
    const char *prec;
    PyArrayObject *out, *att, *q, *k, *v, *mask;
    if (!PyArg_ParseTuple(args, "OOOOOOiiiifKIIs:attention", &oo, &ao, &qo, &ko, &vo, &mo, &B, &NH, &T, &HS, &p, &seed,
                          &step, &site, &prec) ||
        !parse_precision(prec, &precision))
        return NULL;
    const size_t NC = (size_t)B * T * NH * HS, A = (size_t)B * NH * T * T;
    CHECK_F(oo, "out", NC, 1, 0, out);
    CHECK_F(ao, "att", A, 1, 0, att);
    CHECK_F(qo, "q", NC, 0, 0, q);
    CHECK_F(ko, "k", NC, 0, 0, k);
    CHECK_F(vo, "v", NC, 0, 0, v);
    CHECK_F(mo, "mask", (size_t)B * T, 0, 1, mask);
    RUN(bq_cuda_attention(F(out), F(att), F(q), F(k), F(v), FN(mask), B, NH, T, HS, p, seed, step, site, precision),
        "attention");
    result = Py_None;
    Py_INCREF(result);
done:
    return result;
}

/* cudnn_attention(out, dq, dk, dv, dout, q, k, v, lengths, B, NH, T, HS, p, seed): dq, dk, dv, dout None for the
 * forward alone */
static PyObject *py_cudnn_attention(PyObject *self, PyObject *args) {
    PyObject *oo, *a0, *a1, *a2, *doo, *qo, *ko, *vo, *lo, *result = NULL;
    int B, NH, T, HS;
    float p;
    unsigned long long seed;
    PyArrayObject *out, *dq, *dk, *dv, *dout, *q, *k, *v, *lens;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOiiiifK:cudnn_attention", &oo, &a0, &a1, &a2, &doo, &qo, &ko, &vo, &lo, &B,
                          &NH, &T, &HS, &p, &seed))
        return NULL;
    if (B < 1 || NH < 1 || T < 1 || HS < 1) {
        PyErr_Format(PyExc_ValueError, "cudnn_attention: B, NH, T, HS must be >= 1, got %d, %d, %d, %d", B, NH, T, HS);
        return NULL;
    }
    const size_t NC = (size_t)B * T * NH * HS;
    const int opt = doo == Py_None;   /* the forward alone: no gradients to write */
    CHECK_F(oo, "out", NC, 1, 0, out);
    CHECK_F(a0, "dq", NC, 1, opt, dq);
    CHECK_F(a1, "dk", NC, 1, opt, dk);
    CHECK_F(a2, "dv", NC, 1, opt, dv);
    CHECK_F(doo, "dout", NC, 0, 1, dout);
    CHECK_F(qo, "q", NC, 0, 0, q);
    CHECK_F(ko, "k", NC, 0, 0, k);
    CHECK_F(vo, "v", NC, 0, 0, v);
    CHECK_I(lo, "lengths", (size_t)B, 0, lens);
    RUN(bq_cuda_cudnn_attention(F(out), FN(dq), FN(dk), FN(dv), FN(dout), F(q), F(k), F(v), I64(lens), B, NH, T, HS, p,
                                seed),
        "cudnn_attention");
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(lens);
    return result;
}

/* attention_backward(dq, dk, dv, dout, att, q, k, v, B, NH, T, HS, p, seed, step, site, precision) */
static PyObject *py_attention_backward(PyObject *self, PyObject *args) {
    PyObject *a0, *a1, *a2, *doo, *ao, *qo, *ko, *vo, *result = NULL;
    int B, NH, T, HS, precision;
    float p;
    unsigned long long seed;
    unsigned int step, site;
    const char *prec;
    PyArrayObject *dq, *dk, *dv, *dout, *att, *q, *k, *v;
    if (!PyArg_ParseTuple(args, "OOOOOOOOiiiifKIIs:attention_backward", &a0, &a1, &a2, &doo, &ao, &qo, &ko, &vo, &B,
                          &NH, &T, &HS, &p, &seed, &step, &site, &prec) ||
        !parse_precision(prec, &precision))
        return NULL;
    const size_t NC = (size_t)B * T * NH * HS, A = (size_t)B * NH * T * T;
    CHECK_F(a0, "dq", NC, 1, 0, dq);
    CHECK_F(a1, "dk", NC, 1, 0, dk);
    CHECK_F(a2, "dv", NC, 1, 0, dv);
    CHECK_F(doo, "dout", NC, 0, 0, dout);
    CHECK_F(ao, "att", A, 0, 0, att);
    CHECK_F(qo, "q", NC, 0, 0, q);
    CHECK_F(ko, "k", NC, 0, 0, k);
    CHECK_F(vo, "v", NC, 0, 0, v);
    RUN(bq_cuda_attention_backward(F(dq), F(dk), F(dv), F(dout), F(att), F(q), F(k), F(v), B, NH, T, HS, p, seed, step,
                                   site, precision),
        "attention_backward");
    result = Py_None;
    Py_INCREF(result);
done:
    return result;
}

/* span_loss(dstart, dend, start, end, start_pos, end_pos, B, T, grad_scale) -> loss */
static PyObject *py_span_loss(PyObject *self, PyObject *args) {
    PyObject *dso, *deo, *so, *eo, *spo, *epo, *result = NULL;
    int B, T;
    float scale, loss = 0.0f;
    PyArrayObject *ds, *de, *s, *e, *sp = NULL, *ep = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOiif:span_loss", &dso, &deo, &so, &eo, &spo, &epo, &B, &T, &scale)) return NULL;
    const size_t N = (size_t)B * T;
    CHECK_F(dso, "dstart", N, 1, 0, ds);
    CHECK_F(deo, "dend", N, 1, 0, de);
    CHECK_F(so, "start_logits", N, 0, 0, s);
    CHECK_F(eo, "end_logits", N, 0, 0, e);
    CHECK_I(spo, "start_positions", B, 0, sp);
    CHECK_I(epo, "end_positions", B, 0, ep);
    RUN(bq_cuda_span_loss(&loss, F(ds), F(de), F(s), F(e), I64(sp), I64(ep), B, T, scale), "span_loss");
    result = PyFloat_FromDouble(loss);
done:
    Py_XDECREF(sp);
    Py_XDECREF(ep);
    return result;
}

/* adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale), in place */
static PyObject *py_adamw(PyObject *self, PyObject *args) {
    PyObject *po, *go, *mo, *vo, *result = NULL;
    float lr, b1, b2, eps, wd, scale;
    int step;
    PyArrayObject *p, *g, *m, *v;
    if (!PyArg_ParseTuple(args, "OOOOfffffif:adamw", &po, &go, &mo, &vo, &lr, &b1, &b2, &eps, &wd, &step, &scale))
        return NULL;
    if (!(p = f32_arg(po, "param", 0, NPY_MAXDIMS, 1))) return NULL;
    const size_t n = (size_t)PyArray_SIZE(p);
    CHECK_F(go, "grad", n, 0, 0, g);
    CHECK_F(mo, "m", n, 1, 0, m);
    CHECK_F(vo, "v", n, 1, 0, v);
    RUN(bq_cuda_adamw(F(p), F(g), F(m), F(v), n, lr, b1, b2, eps, wd, step, scale), "adamw");
    result = Py_None;
    Py_INCREF(result);
done:
    return result;
}

static PyObject *py_sum_squares(PyObject *self, PyObject *args) {
    PyObject *go, *result = NULL;
    PyArrayObject *g;
    double out = 0.0;
    if (!PyArg_ParseTuple(args, "O:sum_squares", &go)) return NULL;
    if (!(g = f32_arg(go, "g", 0, NPY_MAXDIMS, 0))) return NULL;
    RUN(bq_cuda_sum_squares(&out, F(g), (size_t)PyArray_SIZE(g)), "sum_squares");
    result = PyFloat_FromDouble(out);
done:
    return result;
}

/* ---- NCCL (cuda/nccl.c: loaded at run time) ------------------------------------------------------------------ */

/* Loads NCCL, offering the nvidia-nccl wheel's library when one is on sys.path. With the GIL held. */
static int nccl_ready(void) {
    char wheel[1024] = "";
    PyObject *path = PySys_GetObject("path");   /* borrowed */
    for (Py_ssize_t i = 0; path && PyList_Check(path) && i < PyList_GET_SIZE(path) && !wheel[0]; i++) {
        PyObject *entry = PyList_GET_ITEM(path, i);
        const char *dir = PyUnicode_Check(entry) ? PyUnicode_AsUTF8(entry) : NULL;
        if (!dir) {
            PyErr_Clear();
            continue;
        }
        char candidate[1024];
        if (snprintf(candidate, sizeof candidate, "%s/nvidia/nccl/lib/libnccl.so.2", *dir ? dir : ".") <
                (int)sizeof candidate && access(candidate, R_OK) == 0)
            snprintf(wheel, sizeof wheel, "%s", candidate);
    }
    int st = bq_nccl_load(wheel[0] ? wheel : NULL);
    if (st) raise_status(st, "NCCL");
    return st == BQ_OK;
}

static PyObject *py_nccl_version(PyObject *self, PyObject *noargs) {
    int v = 0, st;
    if (!nccl_ready()) return NULL;
    if ((st = bq_nccl_version(&v))) return raise_status(st, "nccl_version");
    return PyLong_FromLong(v);
}

static PyObject *py_nccl_library(PyObject *self, PyObject *noargs) {
    if (!nccl_ready()) return NULL;
    return PyUnicode_DecodeFSDefault(bq_nccl_library());
}

static PyObject *py_nccl_unique_id(PyObject *self, PyObject *noargs) {
    unsigned char id[BQ_NCCL_ID_BYTES];
    int st;
    if (!nccl_ready()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    st = bq_nccl_unique_id(id);
    Py_END_ALLOW_THREADS
    if (st) return raise_status(st, "nccl_unique_id");
    return PyBytes_FromStringAndSize((const char *)id, BQ_NCCL_ID_BYTES);
}

typedef struct {
    PyObject_HEAD
    bq_nccl_comm *comm;
    int nranks, rank, device;
} NcclComm;

static void nccl_comm_dealloc(NcclComm *self) {
    if (self->comm) {
        Py_BEGIN_ALLOW_THREADS
        bq_nccl_comm_free(self->comm);   /* aborts one still open: never waits on peers */
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int nccl_comm_init(NcclComm *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"unique_id", "nranks", "rank", "device", NULL};
    Py_buffer id;
    int nranks, rank, device = 0, st;
    if (self->comm) {
        PyErr_SetString(PyExc_RuntimeError, "NcclComm is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y*ii|i:NcclComm", kwlist, &id, &nranks, &rank, &device)) return -1;
    /* checked here, before NCCL or CUDA is touched */
    if (id.len != BQ_NCCL_ID_BYTES) {
        PyErr_Format(PyExc_ValueError, "unique_id must be the %d bytes of nccl_unique_id(), got %zd", BQ_NCCL_ID_BYTES,
                     id.len);
        PyBuffer_Release(&id);
        return -1;
    }
    unsigned char uid[BQ_NCCL_ID_BYTES];
    memcpy(uid, id.buf, BQ_NCCL_ID_BYTES);
    PyBuffer_Release(&id);
    if (nranks < 1 || rank < 0 || rank >= nranks || device < 0) {
        PyErr_Format(PyExc_ValueError, "NcclComm needs nranks >= 1, 0 <= rank < nranks and device >= 0 (got nranks=%d, "
                     "rank=%d, device=%d)", nranks, rank, device);
        return -1;
    }
    if (!nccl_ready()) return -1;
    bq_nccl_comm *c = NULL;
    Py_BEGIN_ALLOW_THREADS
    st = bq_nccl_comm_init(&c, uid, nranks, rank, device);   /* blocks until every rank joins */
    Py_END_ALLOW_THREADS
    if (st) {
        raise_status(st, "NcclComm");
        return -1;
    }
    self->comm = c;
    self->nranks = nranks;
    self->rank = rank;
    self->device = device;
    return 0;
}

static int nccl_comm_open(NcclComm *self) {
    if (!self->comm || bq_nccl_comm_closed(self->comm)) {
        PyErr_SetString(PyExc_RuntimeError, "NcclComm is closed (or was never initialised)");
        return 0;
    }
    return 1;
}

static PyObject *nccl_comm_allreduce_sum_grads(NcclComm *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"engine", "timeout", NULL};
    PyObject *eo;
    double timeout = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|d:allreduce_sum_grads", kwlist, &eo, &timeout)) return NULL;
    if (!PyObject_TypeCheck(eo, &EngineType))
        return PyErr_Format(PyExc_TypeError, "engine must be a bertqa._cuda.Engine, got %s", Py_TYPE(eo)->tp_name);
    if (!isfinite(timeout) || timeout < 0)
        return PyErr_Format(PyExc_ValueError, "timeout must be >= 0 seconds (0: none), got %g", timeout);
    Engine *engine = (Engine *)eo;
    if (!ready(engine) || !nccl_comm_open(self)) return NULL;
    float *grads;
    size_t n;
    void *stream;
    int dev, st = bq_cuda_model_grad_buffer(engine->base.model, &grads, &n, &stream, &dev);
    if (st) return raise_status(st, "NcclComm.allreduce_sum_grads");
    bq_lock_wait(engine->base.lock);
    Py_BEGIN_ALLOW_THREADS
    st = bq_nccl_allreduce_sum(self->comm, grads, n, stream, dev, timeout);
    Py_END_ALLOW_THREADS
    PyThread_release_lock(engine->base.lock);
    if (st) return raise_status(st, "NcclComm.allreduce_sum_grads");
    Py_RETURN_NONE;
}

static PyObject *nccl_comm_close_impl(NcclComm *self, int abort) {
    if (!self->comm) Py_RETURN_NONE;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bq_nccl_comm_close(self->comm, abort);
    Py_END_ALLOW_THREADS
    if (st) return raise_status(st, abort ? "NcclComm.abort" : "NcclComm.close");
    Py_RETURN_NONE;
}
static PyObject *nccl_comm_close(NcclComm *self, PyObject *noargs) { return nccl_comm_close_impl(self, 0); }
static PyObject *nccl_comm_abort(NcclComm *self, PyObject *noargs) { return nccl_comm_close_impl(self, 1); }
static PyObject *nccl_comm_enter(NcclComm *self, PyObject *noargs) {
    Py_INCREF(self);
    return (PyObject *)self;
}
static PyObject *nccl_comm_exit(NcclComm *self, PyObject *args) {
    /* an exception inside the block: abort (peers may be gone); else a normal destroy */
    const int failing = PyTuple_Check(args) && PyTuple_GET_SIZE(args) > 0 && PyTuple_GET_ITEM(args, 0) != Py_None;
    PyObject *r = nccl_comm_close_impl(self, failing);
    if (!r) return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static PyObject *nccl_comm_get_closed(NcclComm *self, void *closure) {
    return PyBool_FromLong(!self->comm || bq_nccl_comm_closed(self->comm));
}

static PyMemberDef nccl_comm_members[] = {
    {"nranks", T_INT, offsetof(NcclComm, nranks), READONLY, "number of ranks"},
    {"rank", T_INT, offsetof(NcclComm, rank), READONLY, "this rank"},
    {"device", T_INT, offsetof(NcclComm, device), READONLY, "CUDA device of this rank"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef nccl_comm_getset[] = {
    {"closed", (getter)nccl_comm_get_closed, NULL, "whether close() or abort() was called (or a timeout aborted it)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef nccl_comm_methods[] = {
    {"allreduce_sum_grads", (PyCFunction)(void (*)(void))nccl_comm_allreduce_sum_grads, METH_VARARGS | METH_KEYWORDS,
     "allreduce_sum_grads(engine, timeout=0.0)\n--\n\n"
     "Sum the engine's device gradient buffer (float32, all parameters) over the ranks, in place, on the engine's "
     "stream; returns when the sum is complete. NCCL's asynchronous error is polled while waiting, so a failed peer "
     "raises RuntimeError instead of hanging; timeout > 0 seconds: past it the communicator is aborted and "
     "RuntimeError raised. The engine must be on this communicator's device and have gradients."},
    {"close", (PyCFunction)nccl_comm_close, METH_NOARGS,
     "close()\n--\n\nncclCommDestroy: free the communicator (after its pending work). Idempotent."},
    {"abort", (PyCFunction)nccl_comm_abort, METH_NOARGS,
     "abort()\n--\n\nncclCommAbort: free the communicator without waiting for peers (after an error)."},
    {"__enter__", (PyCFunction)nccl_comm_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)nccl_comm_exit, METH_VARARGS, "close() (abort() when the block raised)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject NcclCommType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bertqa._cuda.NcclComm",
    .tp_basicsize = sizeof(NcclComm),
    .tp_dealloc = (destructor)nccl_comm_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "NcclComm(unique_id, nranks, rank, device=0)\n--\n\n"
              "One rank's NCCL communicator on CUDA device `device`: every rank calls it with the same unique_id (the "
              "128 bytes of nccl_unique_id() on rank 0, sent to the others, e.g. over MPI); it returns once all "
              "nranks ranks have joined. Arguments are checked (ValueError) before NCCL or CUDA is touched; NCCL and "
              "CUDA failures raise RuntimeError with NCCL's error string and the call. A communicator still open "
              "when collected is aborted.",
    .tp_methods = nccl_comm_methods,
    .tp_members = nccl_comm_members,
    .tp_getset = nccl_comm_getset,
    .tp_init = (initproc)nccl_comm_init,
    .tp_new = PyType_GenericNew,
};

/* ---- host builds of device logic: testable without a GPU ---------------------------------------------------- */

static PyObject *py_host_uniform(PyObject *self, PyObject *args) {
    PyObject *uo;
    unsigned long long seed, first = 0;
    unsigned int step, site;
    PyArrayObject *u;
    if (!PyArg_ParseTuple(args, "OKII|K:host_uniform", &uo, &seed, &step, &site, &first)) return NULL;
    if (!(u = f32_arg(uo, "u", 0, NPY_MAXDIMS, 1))) return NULL;
    bq_cuda_host_uniform(F(u), (size_t)PyArray_SIZE(u), seed, step, site, first);
    Py_RETURN_NONE;
}

static PyObject *py_host_dropout_rows(PyObject *self, PyObject *args) {
    PyObject *oo, *xo;
    int rows, cols;
    float p;
    unsigned long long seed, first = 0;
    unsigned int step, site;
    PyArrayObject *out, *x;
    if (!PyArg_ParseTuple(args, "OOiifKII|K:host_dropout_rows", &oo, &xo, &rows, &cols, &p, &seed, &step, &site,
                          &first))
        return NULL;
    if (rows < 1 || cols < 1) return PyErr_Format(PyExc_ValueError, "rows and cols must be positive");
    if (!f32_sized(oo, "out", 0, (size_t)rows * cols, NULL, 1, 0, &out) ||
        !f32_sized(xo, "x", 0, (size_t)rows * cols, NULL, 0, 0, &x))
        return NULL;
    bq_cuda_host_dropout_rows(F(out), F(x), rows, cols, p, seed, step, site, first);
    Py_RETURN_NONE;
}

/* host_dropout_windows(out, x, B, NH, T, C, P, window_ids|None, p, seed, step, site): NH == 0 for a hidden state
 * [B,T,C], else attention probabilities [B,NH,T,T] (C ignored). */
static PyObject *py_host_dropout_windows(PyObject *self, PyObject *args) {
    PyObject *oo, *xo, *wo, *result = NULL;
    int B, NH, T, C, P;
    float p;
    unsigned long long seed;
    unsigned int step, site;
    PyArrayObject *out, *x, *win = NULL;
    if (!PyArg_ParseTuple(args, "OOiiiiiOfKII:host_dropout_windows", &oo, &xo, &B, &NH, &T, &C, &P, &wo, &p, &seed,
                          &step, &site))
        return NULL;
    if (B < 1 || NH < 0 || T < 1 || (!NH && C < 1) || P < T)
        return PyErr_Format(PyExc_ValueError, "need B, T >= 1, NH >= 0, C >= 1 when NH == 0 and P >= T (got B=%d NH=%d "
                            "T=%d C=%d P=%d)", B, NH, T, C, P);
    const size_t n = NH ? (size_t)B * NH * T * T : (size_t)B * T * C;
    if (!f32_sized(oo, "out", 0, n, NULL, 1, 0, &out) || !f32_sized(xo, "x", 0, n, NULL, 0, 0, &x) ||
        !window_ids_arg(wo, B, &win))
        return NULL;
    if (NH)
        bq_cuda_host_dropout_attention(F(out), F(x), B, NH, T, P, I64N(win), p, seed, step, site);
    else
        bq_cuda_host_dropout_hidden(F(out), F(x), B, T, C, P, I64N(win), p, seed, step, site);
    result = Py_None;
    Py_INCREF(result);
    Py_XDECREF(win);
    return result;
}

/* group_ids(ids int32 [N], vocab_size, pad_id) -> (uniq, start, tok) int32 arrays */
static PyObject *py_group_ids(PyObject *self, PyObject *args) {
    PyObject *io, *result = NULL;
    int V;
    long long pad;
    if (!PyArg_ParseTuple(args, "OiL:group_ids", &io, &V, &pad)) return NULL;
    PyArrayObject *ids = (PyArrayObject *)PyArray_FROMANY(io, NPY_INT32, 1, 1, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!ids) return NULL;
    const npy_intp N = PyArray_DIM(ids, 0);
    const int *p = (const int *)PyArray_DATA(ids);
    int *count = NULL;
    PyArrayObject *uniq = NULL, *start = NULL, *tok = NULL;
    for (npy_intp i = 0; i < N; i++)
        if (p[i] < 0 || p[i] >= V) {
            PyErr_Format(PyExc_ValueError, "id %d outside [0, %d)", p[i], V);
            goto done;
        }
    npy_intp dn[1] = {N}, ds[1] = {N + 1};
    count = (int *)PyMem_Calloc(V, sizeof(int));
    if (!count) { PyErr_NoMemory(); goto done; }
    if (!(uniq = (PyArrayObject *)PyArray_EMPTY(1, dn, NPY_INT32, 0)) ||
        !(start = (PyArrayObject *)PyArray_EMPTY(1, ds, NPY_INT32, 0)) ||
        !(tok = (PyArrayObject *)PyArray_EMPTY(1, dn, NPY_INT32, 0)))
        goto done;
    const int U = bq_cuda_group_ids(p, (int)N, pad, count, (int *)PyArray_DATA(uniq), (int *)PyArray_DATA(start),
                                    (int *)PyArray_DATA(tok));
    const int total = ((int *)PyArray_DATA(start))[U];
    result = Py_BuildValue("(NNN)", PySequence_GetSlice((PyObject *)uniq, 0, U),
                           PySequence_GetSlice((PyObject *)start, 0, U + 1),
                           PySequence_GetSlice((PyObject *)tok, 0, total));
done:
    PyMem_Free(count);
    Py_DECREF(ids);
    Py_XDECREF(uniq);
    Py_XDECREF(start);
    Py_XDECREF(tok);
    return result;
}

static PyMethodDef methods[] = {
    {"device_count", py_device_count, METH_NOARGS,
     "device_count() -> (n, reason)\n\nUsable CUDA devices (compute capability >= 8.0); reason says why n is 0."},
    {"device_info", py_device_info, METH_VARARGS, "device_info(dev=0) -> dict of name, capability, memory, SMs."},
    {"versions", py_versions, METH_NOARGS, "versions() -> (cuda_runtime, cuda_driver), e.g. 13000 for 13.0."},
    {"cudnn_version", py_cudnn_version, METH_NOARGS,
     "cudnn_version() -> cudnnGetVersion() of the cuDNN this module links (e.g. 91900 for 9.19.0), 0 when it was "
     "built without cuDNN. Needs no GPU."},
    {"uniform", py_uniform, METH_VARARGS, "uniform(u, seed, step, tensor_id, first=0): Philox uniforms into u."},
    {"dropout", py_dropout, METH_VARARGS, "dropout(out, x, p, seed, step, tensor_id, precision)"},
    {"residual_layernorm", py_residual_layernorm, METH_VARARGS,
     "residual_layernorm(res, out, mean, rstd, x, y, w, b, N, C, eps, p, seed, step, site, precision)"},
    {"layernorm_backward", py_layernorm_backward, METH_VARARGS,
     "layernorm_backward(dinp, branch, dw, db, dout, inp, w, mean, rstd, N, C, p_in, in_site, p_out, out_site, "
     "seed, step, precision)"},
    {"embedding_layernorm", py_embedding_layernorm, METH_VARARGS,
     "embedding_layernorm(emb, out, mean, rstd, ids, types, wte, wpe, wtt, lnw, lnb, B, T, C, V, P, NT, eps, p, seed, "
     "step, precision)"},
    {"embedding_backward", py_embedding_backward, METH_VARARGS,
     "embedding_backward(dwte, dwpe, dwtt, dout, ids, types, B, T, C, V, P, NT, pad_id, precision)"},
    {"gelu", py_gelu, METH_VARARGS, "gelu(out, x, precision)"},
    {"gelu_backward", py_gelu_backward, METH_VARARGS, "gelu_backward(dinp, x, dout, precision)"},
    {"linear", py_linear, METH_VARARGS, "linear(out, x, w, b, N, IN, OUT, precision)"},
    {"linear_backward", py_linear_backward, METH_VARARGS,
     "linear_backward(dinp, dw, db, dout, x, w, N, IN, OUT, precision)"},
    {"attention", py_attention, METH_VARARGS,
     "attention(out, att, q, k, v, mask, B, NH, T, HS, p, seed, step, site, precision)"},
    {"cudnn_attention", py_cudnn_attention, METH_VARARGS,
     "cudnn_attention(out, dq, dk, dv, dout, q, k, v, lengths, B, NH, T, HS, p, seed): cuDNN's fused attention "
     "(bf16 on the GPU)"},
    {"attention_backward", py_attention_backward, METH_VARARGS,
     "attention_backward(dq, dk, dv, dout, att, q, k, v, B, NH, T, HS, p, seed, step, site, precision)"},
    {"span_loss", py_span_loss, METH_VARARGS,
     "span_loss(dstart, dend, start, end, start_pos, end_pos, B, T, grad_scale) -> loss"},
    {"adamw", py_adamw, METH_VARARGS, "adamw(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale)"},
    {"sum_squares", py_sum_squares, METH_VARARGS, "sum_squares(g) -> float (double accumulation)"},
    {"nccl_version", py_nccl_version, METH_NOARGS,
     "nccl_version() -> int\n\nNCCL's version code (e.g. 22809 for 2.28.9), loading NCCL on first use "
     "($BERTQA_NCCL_LIBRARY, else the nvidia-nccl wheel on sys.path, else the loader's libnccl.so.2); RuntimeError "
     "naming what was tried when there is none. Needs no GPU."},
    {"nccl_library", py_nccl_library, METH_NOARGS, "nccl_library() -> str\n\nThe libnccl file loaded (loads it)."},
    {"nccl_unique_id", py_nccl_unique_id, METH_NOARGS,
     "nccl_unique_id() -> bytes\n\nA new NCCL unique id (128 bytes) for NcclComm: made on rank 0, sent to every "
     "rank. Needs no GPU."},
    {"host_uniform", py_host_uniform, METH_VARARGS,
     "host_uniform(u, seed, step, tensor_id, first=0): the kernels' Philox code run on the host (no GPU needed)."},
    {"host_dropout_rows", py_host_dropout_rows, METH_VARARGS,
     "host_dropout_rows(out, x, rows, cols, p, seed, step, tensor_id, first=0): the kernels' per-row quad walk "
     "run on the host (no GPU needed)."},
    {"host_dropout_windows", py_host_dropout_windows, METH_VARARGS,
     "host_dropout_windows(out, x, B, NH, T, C, P, window_ids, p, seed, step, tensor_id): the fused kernels' row walk "
     "with the engine's window-keyed numbering, on the host: NH == 0 for a hidden state [B,T,C] (element (b,t,c) "
     "numbered (w[b]*P + t)*C + c), else attention probabilities [B,NH,T,T] (((w[b]*NH + h)*P + i)*P + j)."},
    {"group_ids", py_group_ids, METH_VARARGS,
     "group_ids(ids, vocab_size, pad_id) -> (uniq, start, tok): the engine's grouping of token ids for the "
     "embedding scatter (host code)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "bertqa._cuda",
    "bertqa's CUDA backend: the GPU engine and its kernels (see bertqa.cuda).", -1, methods,
};

PyMODINIT_FUNC PyInit__cuda(void) {
    if (bq_import_numpy() < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (PyType_Ready(&EngineType) < 0) goto fail;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        goto fail;
    }
    if (PyType_Ready(&NcclCommType) < 0) goto fail;
    Py_INCREF(&NcclCommType);
    if (PyModule_AddObject(m, "NcclComm", (PyObject *)&NcclCommType) < 0) {
        Py_DECREF(&NcclCommType);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
