/* Argument checking shared by the CPython entry points (module.c, engine_py.c). Each returns NULL/0 with a
 * TypeError or ValueError set that names the argument, what was expected and what was received. */
#ifndef BERTQA_PYUTIL_H
#define BERTQA_PYUTIL_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL bertqa_ARRAY_API
#ifndef BQ_IMPORT_ARRAY   /* defined only in module.c, the file that calls import_array() */
#define NO_IMPORT_ARRAY
#endif
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#define F(a) ((float *)PyArray_DATA(a))
#define I64(a) ((const int64_t *)PyArray_DATA(a))

void shape_str(PyArrayObject *a, char *buf, size_t n);
int check_layout(PyArrayObject *a, const char *name, int min_nd, int max_nd, int writeable);
int is_ndarray(PyObject *obj, const char *name, const char *what);
/* borrowed float32 array, no copy */
PyArrayObject *f32_arg(PyObject *obj, const char *name, int min_nd, int max_nd, int writeable);
/* new reference: int64 view/copy of an integer array */
PyArrayObject *ids_arg(PyObject *obj, const char *name, int nd);
/* new reference: float32 [B,T] 0/1 mask */
PyArrayObject *mask_arg(PyObject *obj, const char *name, int B, int T);
int same_shape(PyArrayObject *a, const char *an, PyArrayObject *b, const char *bn);
int dim_is(PyArrayObject *a, const char *name, int axis, npy_intp expected, const char *why);
int finite_in(double x, const char *name, double lo, double hi, int hi_open);
int check_id_range(PyArrayObject *a, const char *name, long limit, const char *table);
PyObject *status_error(int st, const char *what);

int bq_add_engine_type(PyObject *module);
int bq_add_cpu_functions(PyObject *module);   /* cpu_py.c: set_isa and the row-kernel hooks */
int bq_add_attention_functions(PyObject *module);   /* attention_py.c: attention_rows, _backward */
PyObject *bq_py_isas(void);                   /* cpu_py.c: list of the instruction sets this CPU can run */
#endif
