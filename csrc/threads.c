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

/* The thread count set by bq_set_num_threads, for every thread of the process (0: not set). OpenMP's own
 * setting (omp_set_num_threads) belongs to the calling thread only, so a count set from Python's main thread
 * would not reach a server's engine thread or a notebook's worker thread; every parallel region here names
 * bq_num_threads() instead. */
static _Atomic int bq_threads_set = 0;

int bq_num_threads(void) {
#ifdef _OPENMP
    int n = bq_threads_set;
    return n > 0 ? n : omp_get_max_threads();
#else
    return 1;
#endif
}

int bq_blas_num_threads(void) { return BQ_OPENBLAS(get_num_threads)(); }

/* One thread pool for everything: OpenMP. The BLAS runs single-threaded inside our OpenMP threads, so two
 * pools never spin against each other on the same cores (OpenBLAS's idle workers busy-wait for a long time
 * after each call), and OMP_NUM_THREADS alone sets the parallelism. */
void bq_init_threads(void) { BQ_OPENBLAS(set_num_threads)(1); }

void bq_set_num_threads(int n) {
    if (n < 1) n = 1;
    bq_threads_set = n;
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

const char *bq_blas_config(void) { return BQ_OPENBLAS(get_config)(); }
const char *bq_blas_corename(void) { return BQ_OPENBLAS(get_corename)(); }

void bq_sgemm1(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
               const float *B, int ldb, float beta, float *C, int ldc) {
    BQ_CBLAS(sgemm)(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                    M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* Parallel sgemm: the larger of M and N is cut into one block per thread (multiples of 16 rows/columns, the
 * BLAS's register tile), and each thread runs the single-threaded BLAS on its block. Blocks write disjoint
 * parts of C, so results do not depend on timing. */
void bq_sgemm(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc) {
    int nt = bq_num_threads();
#ifdef _OPENMP
    if (omp_in_parallel()) nt = 1;
#endif
    if (nt == 1 || (double)M * N * K < 4e6) {
        bq_sgemm1(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    const int split_m = M >= N;
    const int len = split_m ? M : N;
    int chunk = (len + nt - 1) / nt;
    chunk = (chunk + 15) / 16 * 16;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int start = 0; start < len; start += chunk) {
        int n = len - start < chunk ? len - start : chunk;
        if (split_m) /* rows of op(A) and of C */
            bq_sgemm1(transA, transB, n, N, K, alpha, transA ? A + start : A + (long)start * lda, lda, B, ldb, beta,
                      C + (long)start * ldc, ldc);
        else /* columns of op(B) and of C */
            bq_sgemm1(transA, transB, M, n, K, alpha, A, lda, transB ? B + (long)start * ldb : B + start, ldb, beta,
                      C + start, ldc);
    }
}
