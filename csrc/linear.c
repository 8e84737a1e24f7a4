/* Linear layer y = x @ W.T + b with W in the Hugging Face [OUT, IN] layout; all products go to the BLAS. */
#include "bertqa.h"

void linear_forward(float *out, const float *inp, const float *weight, const float *bias, int N, int IN,
                    int OUT) {
    /* Broadcast the bias into out, then let sgemm accumulate onto it (beta = 1): one pass over out. */
    float beta = 0.0f;
    if (bias) {
#pragma omp parallel for schedule(static) if ((long)N * OUT > 65536) num_threads(bq_num_threads())
        for (long n = 0; n < N; n++) {
            float *o = out + n * OUT;
            for (int j = 0; j < OUT; j++) o[j] = bias[j];
        }
        beta = 1.0f;
    }
    /* out[N,OUT] = inp[N,IN] @ weight[OUT,IN]^T */
    bq_sgemm(0, 1, N, OUT, IN, 1.0f, inp, IN, weight, IN, beta, out, OUT);
}

void linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                     const float *weight, int N, int IN, int OUT) {
    if (dinp) /* dinp[N,IN] += dout[N,OUT] @ weight[OUT,IN] */
        bq_sgemm(0, 0, N, IN, OUT, 1.0f, dout, OUT, weight, IN, 1.0f, dinp, IN);
    if (dweight) /* dweight[OUT,IN] += dout^T[OUT,N] @ inp[N,IN] */
        bq_sgemm(1, 0, OUT, IN, N, 1.0f, dout, OUT, inp, IN, 1.0f, dweight, IN);
    if (dbias) {
        /* Column sums; threads own column ranges so the order of the sum is fixed. */
#pragma omp parallel for schedule(static) if ((long)N * OUT > 65536) num_threads(bq_num_threads())
        for (int j0 = 0; j0 < OUT; j0 += 64) {
            const int j1 = j0 + 64 < OUT ? j0 + 64 : OUT;
            float acc[64] = {0};
            for (long n = 0; n < N; n++) {
                const float *g = dout + n * OUT;
                for (int j = j0; j < j1; j++) acc[j - j0] += g[j];
            }
            for (int j = j0; j < j1; j++) dbias[j] += acc[j - j0];
        }
    }
}
