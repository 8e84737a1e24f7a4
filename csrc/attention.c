/* Multi-head self-attention with a padding mask and dropout on the probabilities.
 *
 * Per (batch b, head h), with q, k, v, out each [T,HS] views (row stride st):
 *   att = softmax(q k^T / sqrt(HS) + (1 - mask[b]) * -10000)     [T,T]   (stored for backward)
 *   out = dropout(att) v                                          [T,HS]
 * Threads take whole heads: each head's [T,T] block stays in the core's cache from the first product through
 * the softmax to the second, and the products are single-threaded BLAS calls inside the thread.
 *
 * Padding at the end of a row (keys after the last real token, as batches padded to their longest row have) is
 * skipped: those keys' probabilities are exp(score - 10000 - max) = exactly 0 in float, so the products run
 * over the first L keys only (L = last real key + 1) and the rest of each probability row is set to 0. Backward
 * finds L again from the probabilities themselves (trailing columns that are 0 in every row add exactly nothing
 * to dq, dk and dv), so it needs no mask.
 *
 * These keep the [B,NH,T,T] probabilities (bertqa.ops.attention and the CUDA parity tests use them). What the
 * engine runs, over rows of their own lengths with nothing [T,T] kept, is the fused kernel of attention_fused.c.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "bertqa.h"
#include "vmath.h"

/* Element index of att[b,h,0,0] in the dropout RNG's numbering of the probabilities (bq_rng: rows of P). */
static inline uint64_t head_offset(bq_rng r, int b, int h, int NH) {
    return (bq_rng_window(r, b) * NH + h) * (uint64_t)r.P * (uint64_t)r.P;
}

/* The columns 0..L of a head's [T,T] probabilities that can be non-zero: 1 + the last non-zero column over all
 * rows (at least 1). Rows are scanned from their end, so unpadded rows cost one read. */
static inline int nonzero_columns(const float *a, int T) {
    int L = 1;
    for (int i = 0; i < T && L < T; i++) {
        const float *r = a + (long)i * T;
        int j = T;
        while (j > L && r[j - 1] == 0.0f) j--;
        if (j > L) L = j;
    }
    return L;
}

/* The dropout RNG over columns 0..L of every row of a [T,T] block whose element (i, j) is number
 * first + i * P + j (P >= T: the numbering's row length). */
static void dropout_rows(float *y, const float *x, int T, int L, float p, bq_rng r, uint32_t tensor_id,
                         uint64_t first, int mask_only) {
    const long TT = (long)T * T;
    if (L == T && r.P == T) {
        if (mask_only) bq_dropout_mask(y, TT, p, r.seed, r.step, tensor_id, first);
        else bq_dropout_slice(y, x, TT, p, r.seed, r.step, tensor_id, first);
        return;
    }
    for (int i = 0; i < T; i++) {
        const long o = (long)i * T;
        const uint64_t f = first + (uint64_t)i * (uint64_t)r.P;
        if (mask_only) bq_dropout_mask(y + o, L, p, r.seed, r.step, tensor_id, f);
        else bq_dropout_slice(y + o, x + o, L, p, r.seed, r.step, tensor_id, f);
    }
}

int attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                      const float *mask, bq_attn_shape s, float dropout_p, bq_rng r, uint32_t tensor_id) {
    const int B = s.B, NH = s.NH, T = s.T, HS = s.HS, ld = (int)s.st;
    const long TT = (long)T * T;
    const float scale = 1.0f / sqrtf((float)HS);
    int status = BQ_OK;
#pragma omp parallel num_threads(bq_num_threads())
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
            const float *mk = mask ? mask + (long)b * T : NULL;
            const int L = mk ? bq_row_length(mk, T) : T;
            /* a[:, :L] = scale * q k[:L]^T */
            bq_sgemm1(0, 1, T, L, HS, scale, q + off, ld, k + off, ld, 0.0f, a, T);
            for (int i = 0; i < T; i++) {
                bq_softmax_row(a + (long)i * T, mk, L);
                /* kept probabilities are whole rows (backward and the ops API read them); scratch needs only :L */
                if (L < T && att) memset(a + (long)i * T + L, 0, (size_t)(T - L) * sizeof(float));
            }
            const float *p = a;
            if (dropout_p > 0.0f) {   /* in place when the probabilities are not kept */
                dropout_rows(scratch, a, T, L, dropout_p, r, tensor_id, head_offset(r, b, h, NH), 0);
                p = scratch;
            }
            /* out = p[:, :L] v[:L] */
            bq_sgemm1(0, 0, T, HS, L, 1.0f, p, T, v + off, ld, 0.0f, out + off, ld);
        }
        free(scratch);
    }
    return status;
}

/* Packed inference is the fused kernel's forward (attention_fused.c) without dropout and with nothing kept: no
 * [T,T] block at all, and faster than the two BLAS products around a softmax this used to be. */
int attention_forward_packed(float *out, const float *q, const float *k, const float *v, const float *mask, int Tpad,
                             const int *row_off, int B, int NH, int HS, int ld) {
    const bq_rng none = {0, 0, NULL, 1};
    return attention_forward_rows(out, NULL, q, k, v, mask, Tpad, B, row_off, NH, HS, ld, 0.0f, none, 0);
}

int attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                       const float *q, const float *k, const float *v, bq_attn_shape s, float dropout_p,
                       bq_rng r, uint32_t tensor_id) {
    const int B = s.B, NH = s.NH, T = s.T, HS = s.HS, ld = (int)s.st;
    const long TT = (long)T * T;
    const float scale = 1.0f / sqrtf((float)HS);
    int status = BQ_OK;
#pragma omp parallel num_threads(bq_num_threads())
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
            const int L = nonzero_columns(a, T);   /* keys past L have probability 0: no gradient flows there */
            const float *p = a;               /* what multiplied v in the forward */
            float *mk = dp + TT;              /* the head's dropout mask (keep / (1 - p)), made once */
            if (dropout_p > 0.0f) {
                dropout_rows(mk, NULL, T, L, dropout_p, r, tensor_id, head_offset(r, b, h, NH), 1);
                float *pd = dp;               /* dropout(att) in dp until dp is needed */
                for (int i = 0; i < T; i++)
                    for (int j = 0; j < L; j++) pd[(long)i * T + j] = a[(long)i * T + j] * mk[(long)i * T + j];
                p = pd;
            }
            /* dv[:L] += p[:, :L]^T dout */
            bq_sgemm1(1, 0, L, HS, T, 1.0f, p, T, dout + off, ld, 1.0f, dv + off, ld);
            /* dp[:, :L] = dout v[:L]^T, then through the dropout mask */
            bq_sgemm1(0, 1, T, L, HS, 1.0f, dout + off, ld, v + off, ld, 0.0f, dp, T);
            if (dropout_p > 0.0f)
                for (int i = 0; i < T; i++)
                    for (int j = 0; j < L; j++) dp[(long)i * T + j] *= mk[(long)i * T + j];
            /* softmax backward with the 1/sqrt(HS) of the scores folded in: dS = scale * a (dp - <dp, a>) */
            for (int i = 0; i < T; i++) {
                const float *ar = a + (long)i * T;
                float *g = dp + (long)i * T;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int j = 0; j < L; j++) dot += g[j] * ar[j];
#pragma omp simd
                for (int j = 0; j < L; j++) g[j] = scale * ar[j] * (g[j] - dot);
            }
            /* dq += dS[:, :L] k[:L] ; dk[:L] += dS[:, :L]^T q */
            bq_sgemm1(0, 0, T, HS, L, 1.0f, dp, T, k + off, ld, 1.0f, dq + off, ld);
            bq_sgemm1(1, 0, L, HS, T, 1.0f, dp, T, q + off, ld, 1.0f, dk + off, ld);
        }
        free(dp);
    }
    return status;
}
