/* Multi-head self-attention with a padding mask and dropout on the probabilities.
 *
 * Per (batch b, head h), with q, k, v, out each [T,HS] views (row stride st):
 *   att = softmax(q k^T / sqrt(HS) + (1 - mask[b]) * -10000)     [T,T]   (stored for backward)
 *   out = dropout(att) v                                          [T,HS]
 * Threads take whole heads: each head's [T,T] block stays in the core's cache from the first product through
 * the softmax to the second, and the products are single-threaded BLAS calls inside the thread.
 */
#include <math.h>
#include <stdlib.h>
#include "bertqa.h"
#include "vmath.h"

/* Element index of att[b,h,0,0] in the dropout RNG's numbering of the [B,NH,T,T] probabilities. */
static inline uint64_t head_offset(int b, int h, int NH, long TT) { return ((uint64_t)b * NH + h) * (uint64_t)TT; }

int attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                      const float *mask, bq_attn_shape s, float dropout_p, uint64_t seed, uint32_t step,
                      uint32_t tensor_id) {
    const int B = s.B, NH = s.NH, T = s.T, HS = s.HS, ld = (int)s.st;
    const long TT = (long)T * T;
    const float scale = 1.0f / sqrtf((float)HS);
    int status = BQ_OK;
#pragma omp parallel
    {
        /* this thread's [T,T] scratch: dropout(att) when dropout is on; the probabilities themselves when the
         * caller keeps none (att == NULL: inference, nothing to differentiate) */
        float *scratch = NULL;
        int ok = 1;
        if ((dropout_p > 0.0f || !att) && !(scratch = malloc(TT * sizeof(float)))) ok = 0;
        if (!ok) {
#pragma omp atomic write
            status = BQ_ERR_NOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * NH; bh++) {
            if (!ok) continue;
            const int b = bh / NH, h = bh % NH;
            const long off = b * s.sb + h * s.sh;
            float *a = att ? att + bh * TT : scratch;   /* [T,T] */
            /* a = scale * q k^T */
            bq_sgemm1(0, 1, T, T, HS, scale, q + off, ld, k + off, ld, 0.0f, a, T);
            const float *mk = mask ? mask + (long)b * T : NULL;
            for (int i = 0; i < T; i++) bq_softmax_row(a + (long)i * T, mk, T);
            const float *p = a;
            if (dropout_p > 0.0f) {   /* in place when the probabilities are not kept */
                bq_dropout_slice(scratch, a, TT, dropout_p, seed, step, tensor_id, head_offset(b, h, NH, TT));
                p = scratch;
            }
            /* out = p v */
            bq_sgemm1(0, 0, T, HS, T, 1.0f, p, T, v + off, ld, 0.0f, out + off, ld);
        }
        free(scratch);
    }
    return status;
}

int attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                       const float *q, const float *k, const float *v, bq_attn_shape s, float dropout_p,
                       uint64_t seed, uint32_t step, uint32_t tensor_id) {
    const int B = s.B, NH = s.NH, T = s.T, HS = s.HS, ld = (int)s.st;
    const long TT = (long)T * T;
    const float scale = 1.0f / sqrtf((float)HS);
    int status = BQ_OK;
#pragma omp parallel
    {
        /* this thread's scratch: dP [T,T], and the dropout mask [T,T] when dropout is on */
        float *dp = malloc((dropout_p > 0.0f ? 2 : 1) * TT * sizeof(float));
        if (!dp) {
#pragma omp atomic write
            status = BQ_ERR_NOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < B * NH; bh++) {
            if (!dp) continue;
            const int b = bh / NH, h = bh % NH;
            const long off = b * s.sb + h * s.sh;
            const float *a = att + bh * TT;   /* [T,T] pre-dropout probabilities */
            const float *p = a;               /* what multiplied v in the forward */
            float *mk = dp + TT;              /* the head's dropout mask (keep / (1 - p)), made once */
            if (dropout_p > 0.0f) {
                bq_dropout_mask(mk, TT, dropout_p, seed, step, tensor_id, head_offset(b, h, NH, TT));
                float *pd = dp;               /* dropout(att) in dp until dp is needed */
                for (long i = 0; i < TT; i++) pd[i] = a[i] * mk[i];
                p = pd;
            }
            /* dv += p^T dout */
            bq_sgemm1(1, 0, T, HS, T, 1.0f, p, T, dout + off, ld, 1.0f, dv + off, ld);
            /* dp = dout v^T, then through the dropout mask */
            bq_sgemm1(0, 1, T, T, HS, 1.0f, dout + off, ld, v + off, ld, 0.0f, dp, T);
            if (dropout_p > 0.0f)
                for (long i = 0; i < TT; i++) dp[i] *= mk[i];
            /* softmax backward with the 1/sqrt(HS) of the scores folded in: dS = scale * a (dp - <dp, a>) */
            for (int i = 0; i < T; i++) {
                const float *ar = a + (long)i * T;
                float *g = dp + (long)i * T;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int j = 0; j < T; j++) dot += g[j] * ar[j];
#pragma omp simd
                for (int j = 0; j < T; j++) g[j] = scale * ar[j] * (g[j] - dot);
            }
            /* dq += dS k ; dk += dS^T q */
            bq_sgemm1(0, 0, T, HS, T, 1.0f, dp, T, k + off, ld, 1.0f, dq + off, ld);
            bq_sgemm1(1, 0, T, HS, T, 1.0f, dp, T, q + off, ld, 1.0f, dk + off, ld);
        }
        free(dp);
    }
    return status;
}
