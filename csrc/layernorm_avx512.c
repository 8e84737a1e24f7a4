/* LayerNorm's row kernels (layernorm_avx2.c) sixteen channels at a time, the last C % 16 through lane masks.
 * Elementwise parts compute the AVX2 variant's expressions in its order; the row sums (mean, variance, the two
 * backward means) add sixteen partial sums instead of the compiler's eight, so mean and rstd, and with them out
 * and dx, can differ from the AVX2 path by a few float32 ulps. The parameter gradients sum over rows in row
 * order per channel, as the AVX2 path does. */
#include <math.h>
#include "bertqa.h"
#include "cpu.h"
#include "vmath.h"
#ifdef BQ_HAVE_AVX512_BUILD
BQ_AVX512_BEGIN
#include "vmath_avx512.h"

/* Each step below handles channels c .. c+15 (full) or the lanes of k of them (the row's tail; masked lanes 0). */

static inline __m512 sum_step(__m512 s, const float *x, __mmask16 k, int full) { return _mm512_add_ps(s, bq_load16(x, k, full)); }

static inline __m512 var_step(__m512 v, const float *x, __m512 m, __mmask16 k, int full) {
    __m512 d = _mm512_maskz_sub_ps(full ? (__mmask16)0xFFFF : k, bq_load16(x, k, full), m);
    return _mm512_add_ps(v, _mm512_mul_ps(d, d));
}

static inline void out_step(float *o, const float *x, const float *w, const float *b, __m512 m, __m512 r,
                            __mmask16 k, int full) {
    __m512 d = _mm512_sub_ps(bq_load16(x, k, full), m);
    bq_store16(o, _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(d, r), bq_load16(w, k, full)), bq_load16(b, k, full)), k, full);
}

void layernorm_forward_row_avx512(float *o, float *mean, float *rstd, const float *x, const float *weight,
                                  const float *bias, int C, float eps) {
    const int body = C & ~15;
    const __mmask16 tail = bq_mask16(C - body);
    __m512 vs = _mm512_setzero_ps();
    for (int c = 0; c < body; c += 16) vs = sum_step(vs, x + c, 0, 1);
    if (tail) vs = sum_step(vs, x + body, tail, 0);
    const float m = _mm512_reduce_add_ps(vs) / C;
    const __m512 vm = _mm512_set1_ps(m);
    __m512 vv = _mm512_setzero_ps();   /* two passes: no cancellation from E[x^2] - m^2 */
    for (int c = 0; c < body; c += 16) vv = var_step(vv, x + c, vm, 0, 1);
    if (tail) vv = var_step(vv, x + body, vm, tail, 0);
    const float r = 1.0f / sqrtf(_mm512_reduce_add_ps(vv) / C + eps);
    const __m512 vr = _mm512_set1_ps(r);
    const int h = bq_head16(o, C);   /* elementwise: its stores aligned (vmath_avx512.h) */
    if (h) out_step(o, x, weight, bias, vm, vr, bq_mask16(h), 0);
    int c = h;
    for (; c + 16 <= C; c += 16) out_step(o + c, x + c, weight + c, bias + c, vm, vr, 0, 1);
    if (c < C) out_step(o + c, x + c, weight + c, bias + c, vm, vr, bq_mask16(C - c), 0);
    *mean = m;
    *rstd = r;
}

/* sg += g, sgx += g * (x - m) * r with g = dy * w */
static inline void dot_step(__m512 *sg, __m512 *sgx, const float *dy, const float *x, const float *w, __m512 m,
                            __m512 r, __mmask16 k, int full) {
    __m512 g = _mm512_mul_ps(bq_load16(dy, k, full), bq_load16(w, k, full));   /* masked lanes: 0 */
    *sg = _mm512_add_ps(*sg, g);
    *sgx = _mm512_add_ps(*sgx, _mm512_mul_ps(_mm512_mul_ps(g, _mm512_sub_ps(bq_load16(x, k, full), m)), r));
}

/* dx += r * (dy * w - sg - xhat * sgx) */
static inline void dx_step(float *dx, const float *dy, const float *x, const float *w, __m512 m, __m512 r, __m512 sg,
                           __m512 sgx, __mmask16 k, int full) {
    __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(bq_load16(x, k, full), m), r);
    __m512 g = _mm512_mul_ps(bq_load16(dy, k, full), bq_load16(w, k, full));
    __m512 d = _mm512_mul_ps(r, _mm512_sub_ps(_mm512_sub_ps(g, sg), _mm512_mul_ps(xhat, sgx)));
    bq_store16(dx, _mm512_add_ps(bq_load16(dx, k, full), d), k, full);
}

void layernorm_backward_row_avx512(float *dx, const float *dy, const float *x, const float *weight, float m,
                                   float r, int C) {
    const int body = C & ~15;
    const __mmask16 tail = bq_mask16(C - body);
    const __m512 vm = _mm512_set1_ps(m), vr = _mm512_set1_ps(r);
    __m512 vsg = _mm512_setzero_ps(), vsgx = _mm512_setzero_ps();
    for (int c = 0; c < body; c += 16) dot_step(&vsg, &vsgx, dy + c, x + c, weight + c, vm, vr, 0, 1);
    if (tail) dot_step(&vsg, &vsgx, dy + body, x + body, weight + body, vm, vr, tail, 0);
    const __m512 sg = _mm512_set1_ps(_mm512_reduce_add_ps(vsg) / C), sgx = _mm512_set1_ps(_mm512_reduce_add_ps(vsgx) / C);
    const int h = bq_head16(dx, C);   /* elementwise: its stores aligned (vmath_avx512.h) */
    if (h) dx_step(dx, dy, x, weight, vm, vr, sg, sgx, bq_mask16(h), 0);
    int c = h;
    for (; c + 16 <= C; c += 16) dx_step(dx + c, dy + c, x + c, weight + c, vm, vr, sg, sgx, 0, 1);
    if (c < C) dx_step(dx + c, dy + c, x + c, weight + c, vm, vr, sg, sgx, bq_mask16(C - c), 0);
}

/* aw += sum_n dy * (x - mean) * rstd, ab += sum_n dy over 16 channels (full) or the lanes of k, rows in order */
static inline void param_grad_step(float *aw, float *ab, const float *dout, const float *inp, const float *mean,
                                   const float *rstd, long N, int C, __mmask16 k, int full) {
    __m512 w = bq_load16(aw, k, full), b = bq_load16(ab, k, full);
    for (long n = 0; n < N; n++) {
        __m512 d = bq_load16(dout + n * C, k, full);
        __m512 xm = _mm512_sub_ps(bq_load16(inp + n * C, k, full), _mm512_set1_ps(mean[n]));
        w = _mm512_add_ps(w, _mm512_mul_ps(_mm512_mul_ps(d, xm), _mm512_set1_ps(rstd[n])));
        b = _mm512_add_ps(b, d);
    }
    bq_store16(aw, w, k, full);
    bq_store16(ab, b, k, full);
}

/* A block of 64 channels (BERT's hidden sizes are multiples of 64): one sweep over the rows with the eight
 * accumulators in registers; a narrower block (the last one when C % 64 != 0): one sweep per 16 channels. */
void layernorm_param_grad_avx512(float *aw, float *ab, const float *dout, const float *inp, const float *mean,
                                 const float *rstd, long N, int C, int c0, int c1) {
    if (c1 - c0 == 64) {
        __m512 w0 = _mm512_loadu_ps(aw), w1 = _mm512_loadu_ps(aw + 16), w2 = _mm512_loadu_ps(aw + 32),
               w3 = _mm512_loadu_ps(aw + 48);
        __m512 b0 = _mm512_loadu_ps(ab), b1 = _mm512_loadu_ps(ab + 16), b2 = _mm512_loadu_ps(ab + 32),
               b3 = _mm512_loadu_ps(ab + 48);
        for (long n = 0; n < N; n++) {
            const float *x = inp + n * C + c0, *dy = dout + n * C + c0;
            const __m512 m = _mm512_set1_ps(mean[n]), r = _mm512_set1_ps(rstd[n]);
#define BQ_PARAM_GRAD_STEP(w, b, o)                                                                              \
    do {                                                                                                         \
        __m512 d = _mm512_loadu_ps(dy + (o));                                                                    \
        w = _mm512_add_ps(w, _mm512_mul_ps(_mm512_mul_ps(d, _mm512_sub_ps(_mm512_loadu_ps(x + (o)), m)), r));   \
        b = _mm512_add_ps(b, d);                                                                                 \
    } while (0)
            BQ_PARAM_GRAD_STEP(w0, b0, 0);
            BQ_PARAM_GRAD_STEP(w1, b1, 16);
            BQ_PARAM_GRAD_STEP(w2, b2, 32);
            BQ_PARAM_GRAD_STEP(w3, b3, 48);
#undef BQ_PARAM_GRAD_STEP
        }
        _mm512_storeu_ps(aw, w0), _mm512_storeu_ps(aw + 16, w1), _mm512_storeu_ps(aw + 32, w2), _mm512_storeu_ps(aw + 48, w3);
        _mm512_storeu_ps(ab, b0), _mm512_storeu_ps(ab + 16, b1), _mm512_storeu_ps(ab + 32, b2), _mm512_storeu_ps(ab + 48, b3);
        return;
    }
    int c = c0;
    for (; c + 16 <= c1; c += 16) param_grad_step(aw + c - c0, ab + c - c0, dout + c, inp + c, mean, rstd, N, C, 0, 1);
    if (c < c1) param_grad_step(aw + c - c0, ab + c - c0, dout + c, inp + c, mean, rstd, N, C, bq_mask16(c1 - c), 0);
}

BQ_AVX512_END
#endif
