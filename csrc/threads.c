/* Threading and BLAS glue: one place that knows which BLAS we link and how many threads run. */
#include "bertqa.h"
#include "blas.h"
#ifdef _OPENMP
#include <omp.h>
#endif

const char *bq_status_string(int status) {
    switch (status) {
    case BQ_OK: return "ok";
    case BQ_ERR_NOMEM: return "out of memory";
    case BQ_ERR_INDEX: return "index out of range";
    case BQ_ERR_ARG: return "invalid argument";
    default: return "unknown error";
    }
}

int bq_num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int bq_blas_num_threads(void) { return BQ_OPENBLAS(get_num_threads)(); }

void bq_set_num_threads(int n) {
    if (n < 1) n = 1;
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    BQ_OPENBLAS(set_num_threads)(n);
}

const char *bq_blas_config(void) { return BQ_OPENBLAS(get_config)(); }
const char *bq_blas_corename(void) { return BQ_OPENBLAS(get_corename)(); }

void bq_sgemm(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc) {
    BQ_CBLAS(sgemm)(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                    M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
