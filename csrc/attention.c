/* Multi-head self-attention with a padding mask and dropout on the probabilities.
 *
 * Per (batch b, head h), with q, k, v, out each [T,HS] views (row stride st):
 *   att = softmax(q k^T / sqrt(HS) + (1 - mask[b]) * -10000)     [T,T]   (stored for backward)
 *   out = dropout(att) v                                          [T,HS]
 * The products go to the BLAS as one batched call over all B*NH heads; the softmax is ours.
 */
#include <math.h>
#include <stdlib.h>
#include "bertqa.h"
#include "blas.h"
#include "vmath.h"

/* C_i = alpha * op(A_i) op(B_i) + beta * C_i for i over the B*NH heads; each operand is located by a
 * (batch, head) offset rule: base + b*sb + h*sh, leading dimension ld. */
typedef struct {
    const float *base;
    long sb, sh;
    int ld;
} head_view;

static int batched_gemm(int transA, int transB, int M, int N, int K, float alpha, head_view A, head_view Bv,
                        float beta, float *C_base, long csb, long csh, int ldc, int B, int NH) {
    const int count = B * NH;
    const float **a = malloc(sizeof(float *) * (size_t)count);
    const float **bb = malloc(sizeof(float *) * (size_t)count);
    float **c = malloc(sizeof(float *) * (size_t)count);
    if (!a || !bb || !c) {
        free(a); free(bb); free(c);
        return BQ_ERR_NOMEM;
    }
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            int i = b * NH + h;
            a[i] = A.base + b * A.sb + h * A.sh;
            bb[i] = Bv.base + b * Bv.sb + h * Bv.sh;
            c[i] = C_base + b * csb + h * csh;
        }
    enum CBLAS_TRANSPOSE ta = transA ? CblasTrans : CblasNoTrans, tb = transB ? CblasTrans : CblasNoTrans;
    blasint m = M, n = N, k = K, lda = A.ld, ldb = Bv.ld, lc = ldc, gs = count;
    BQ_CBLAS(sgemm_batch)(CblasRowMajor, &ta, &tb, &m, &n, &k, &alpha, a, &lda, bb, &ldb, &beta, c, &lc, 1, &gs);
    free(a); free(bb); free(c);
    return BQ_OK;
}

/* Row-wise masked softmax in place over att [B*NH*T, T]; rows are scores already scaled by 1/sqrt(HS). */
static void masked_softmax(float *att, const float *mask, int B, int NH, int T) {
    const long rows = (long)B * NH * T;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        float *row = att + r * T;
        const float *mk = mask ? mask + (r / ((long)NH * T)) * T : NULL;   /* [T] of batch b */
        if (mk)
            for (int j = 0; j < T; j++) row[j] += (1.0f - mk[j]) * -10000.0f;
        float mx = row[0];
        for (int j = 1; j < T; j++) mx = row[j] > mx ? row[j] : mx;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < T; j++) {
            float e = bq_expf(row[j] - mx);
            row[j] = e;
            sum += e;
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int j = 0; j < T; j++) row[j] *= inv;
    }
}

int attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                      const float *mask, bq_attn_shape s, float dropout_p, uint64_t seed, uint32_t step,
                      uint32_t tensor_id) {
    const int B = s.B, NH = s.NH, T = s.T, HS = s.HS;
    const long TT = (long)T * T;
    const size_t natt = (size_t)B * NH * TT;
    const float scale = 1.0f / sqrtf((float)HS);
    int st;
    /* att[b,h] = scale * q[b,h] @ k[b,h]^T */
    head_view qv = {q, s.sb, s.sh, (int)s.st}, kv = {k, s.sb, s.sh, (int)s.st};
    st = batched_gemm(0, 1, T, T, HS, scale, qv, kv, 0.0f, att, NH * TT, TT, T, B, NH);
    if (st) return st;
    masked_softmax(att, mask, B, NH, T);
    const float *probs = att;
    float *dropped = NULL;
    if (dropout_p > 0.0f) {
        dropped = malloc(natt * sizeof(float));
        if (!dropped) return BQ_ERR_NOMEM;
        dropout_forward(dropped, att, natt, dropout_p, seed, step, tensor_id);
        probs = dropped;
    }
    /* out[b,h] = probs[b,h] @ v[b,h] */
    head_view pv = {probs, NH * TT, TT, T}, vv = {v, s.sb, s.sh, (int)s.st};
    st = batched_gemm(0, 0, T, HS, T, 1.0f, pv, vv, 0.0f, out, s.sb, s.sh, (int)s.st, B, NH);
    free(dropped);
    return st;
}

int attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                       const float *q, const float *k, const float *v, bq_attn_shape s, float dropout_p,
                       uint64_t seed, uint32_t step, uint32_t tensor_id, float *scratch) {
    const int B = s.B, NH = s.NH, T = s.T, HS = s.HS;
    const long TT = (long)T * T;
    const size_t natt = (size_t)B * NH * TT;
    const float scale = 1.0f / sqrtf((float)HS);
    float *owned = NULL;
    int st = BQ_OK;
    if (!scratch) {
        owned = scratch = malloc(2 * natt * sizeof(float));
        if (!owned) return BQ_ERR_NOMEM;
    }
    float *dprobs = scratch;          /* [B,NH,T,T]: d(dropout(att)), then d(att), then d(scores) */
    const float *probs = att;         /* what multiplied v in the forward */
    if (dropout_p > 0.0f) {
        float *dropped = scratch + natt;
        dropout_forward(dropped, att, natt, dropout_p, seed, step, tensor_id);
        probs = dropped;
    }
    head_view dov = {dout, s.sb, s.sh, (int)s.st};
    /* dv[b,h] += probs^T @ dout */
    head_view pv = {probs, NH * TT, TT, T};
    st = batched_gemm(1, 0, T, HS, T, 1.0f, pv, dov, 1.0f, dv, s.sb, s.sh, (int)s.st, B, NH);
    if (st) goto done;
    /* dprobs = dout @ v^T */
    head_view vv = {v, s.sb, s.sh, (int)s.st};
    st = batched_gemm(0, 1, T, T, HS, 1.0f, dov, vv, 0.0f, dprobs, NH * TT, TT, T, B, NH);
    if (st) goto done;
    if (dropout_p > 0.0f) {
        /* d(att) = d(dropped) * keep / (1 - p): the same mask, applied to the gradient */
        dropout_forward(dprobs, dprobs, natt, dropout_p, seed, step, tensor_id);
    }
    /* softmax backward, with the 1/sqrt(HS) of the scores folded in: dS = scale * P (dP - <dP, P>) */
    const long rows = (long)B * NH * T;
#pragma omp parallel for schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *p = att + r * T;
        float *g = dprobs + r * T;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j < T; j++) dot += g[j] * p[j];
#pragma omp simd
        for (int j = 0; j < T; j++) g[j] = scale * p[j] * (g[j] - dot);
    }
    head_view dsv = {dprobs, NH * TT, TT, T};
    head_view qv = {q, s.sb, s.sh, (int)s.st}, kv = {k, s.sb, s.sh, (int)s.st};
    /* dq += dS @ k ; dk += dS^T @ q */
    st = batched_gemm(0, 0, T, HS, T, 1.0f, dsv, kv, 1.0f, dq, s.sb, s.sh, (int)s.st, B, NH);
    if (st) goto done;
    st = batched_gemm(1, 0, T, HS, T, 1.0f, dsv, qv, 1.0f, dk, s.sb, s.sh, (int)s.st, B, NH);
done:
    free(owned);
    return st;
}
