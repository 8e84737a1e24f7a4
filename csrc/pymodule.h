/* The parts of bertqa._C that csrc/module.c assembles in PyInit__C, each in its own file. The dependency runs one
 * way: module.c calls these; the files that define them use only pyargs.h and the C core, nothing of module.c. */
#ifndef BERTQA_PYMODULE_H
#define BERTQA_PYMODULE_H
#include "pyargs.h"

int bq_add_engine_type(PyObject *module);          /* engine_py.c: bertqa._C.Engine */
int bq_add_cpu_functions(PyObject *module);        /* cpu_py.c: set_isa and the row-kernel hooks */
int bq_add_attention_functions(PyObject *module);  /* attention_py.c: attention_rows, attention_rows_backward */
PyObject *bq_py_isas(void);                        /* cpu_py.c: list of the instruction sets this CPU can run */
int bq_add_lowp_functions(PyObject *module);       /* lowp_py.c: the bf16 / int8 product hooks */
PyObject *bq_py_precisions(void);                  /* lowp_py.c: {precision: None or why this CPU cannot} */
#endif
