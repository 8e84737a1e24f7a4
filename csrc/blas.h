/* Which BLAS the core calls. The default is OpenBLAS from the scipy-openblas32 wheel (the build NumPy and
 * SciPy ship), whose symbols all carry a scipy_ prefix; BERTQA_SYSTEM_BLAS builds against a plain cblas.h. */
#ifndef BERTQA_BLAS_H
#define BERTQA_BLAS_H
#include <cblas.h>
#ifdef BERTQA_SYSTEM_BLAS
#define BQ_CBLAS(name) cblas_##name
#define BQ_OPENBLAS(name) openblas_##name
#else
#define BQ_CBLAS(name) scipy_cblas_##name
#define BQ_OPENBLAS(name) scipy_openblas_##name
#endif
#endif
