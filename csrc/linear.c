/* Linear layer y = x @ W.T + b with W in the Hugging Face [OUT, IN] layout: fp32 products go to the BLAS, bf16 and
 * int8 ones to gemm_lowp_avx512.c through the table cpu.h's bq_cpu_lowp gives. */
#include "bertqa.h"
#include "cpu.h"

/* out[n, :] = bias, for the products to add onto (beta = 1) */
static void fill_bias(float *out, const float *bias, int N, int OUT) {
#pragma omp parallel for schedule(static) if ((long)N * OUT > 65536) num_threads(bq_num_threads())
    for (long n = 0; n < N; n++) {
        float *o = out + n * OUT;
        for (int j = 0; j < OUT; j++) o[j] = bias[j];
    }
}

/* dbias += column sums of dout; threads own column ranges so the order of the sum is fixed. */
static void bias_grad(float *dbias, const float *dout, int N, int OUT) {
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

void linear_forward(float *out, const float *inp, const float *weight, const float *bias, int N, int IN,
                    int OUT) {
    /* Broadcast the bias into out, then let sgemm accumulate onto it (beta = 1): one pass over out. */
    float beta = 0.0f;
    if (bias) {
        fill_bias(out, bias, N, OUT);
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
    if (dbias) bias_grad(dbias, dout, N, OUT);
}

int linear_forward_lowp(const void *kp, int prec, const void *wp, const float *sw, const int32_t *qsum, int per_tensor,
                        float *out, const float *inp, const float *bias, int N, int IN, int OUT, int gelu) {
    const bq_lowp_kernels *k = kp;   /* the bias is added as the products store their first block */
    if (prec == BQ_PREC_BF16) return k->gemm_bf16(0, N, OUT, IN, inp, IN, wp, 0.0f, out, OUT, bias, gelu);
    return k->gemm_i8(N, OUT, IN, inp, IN, wp, sw, qsum, per_tensor, 0.0f, out, OUT, bias, gelu);
}

int linear_backward_bf16(const void *kp, float *dinp, float *dweight, float *dbias, const float *dout,
                         const float *inp, const float *weight, int N, int IN, int OUT) {
    const bq_lowp_kernels *k = kp;
    int st = BQ_OK;
    if (dinp) /* dinp[N,IN] += dout[N,OUT] @ weight[OUT,IN]: W packed here (the forward's copy is W^T's) */
        st = k->gemm_bf16_full(0, 0, N, IN, OUT, dout, OUT, weight, IN, 1.0f, dinp, IN);
    if (!st && dweight) /* dweight[OUT,IN] += dout^T[OUT,N] @ inp[N,IN] */
        st = k->gemm_bf16_full(1, 0, OUT, IN, N, dout, OUT, inp, IN, 1.0f, dweight, IN);
    if (!st && dbias) bias_grad(dbias, dout, N, OUT);
    return st;
}
