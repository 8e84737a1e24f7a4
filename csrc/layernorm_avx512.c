/* LayerNorm's row kernels (layernorm.c) sixteen channels at a time, the last C % 16 through lane masks.
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
    for (int c = 0; c < body; c += 16) out_step(o + c, x + c, weight + c, bias + c, vm, vr, 0, 1);
    if (tail) out_step(o + body, x + body, weight + body, bias + body, vm, vr, tail, 0);
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
    for (int c = 0; c < body; c += 16) dx_step(dx + c, dy + c, x + c, weight + c, vm, vr, sg, sgx, 0, 1);
    if (tail) dx_step(dx + body, dy + body, x + body, weight + body, vm, vr, sg, sgx, tail, 0);
}

void layernorm_param_grad_avx512(float *aw, float *ab, const float *dout, const float *inp, const float *mean,
                                 const float *rstd, long N, int C, int c0, int c1) {
    __m512 w[4], b[4];
    __mmask16 k[4];
    int q_full = 0, q_all = 0;   /* vectors of 16 channels, and all vectors (the last one partial) */
    for (int q = 0; q < 4; q++) {
        const int c = c0 + 16 * q;
        k[q] = c < c1 ? bq_mask16(c1 - c) : 0;
        if (k[q] == 0xFFFF) q_full++;
        if (k[q]) q_all++;
        w[q] = _mm512_maskz_loadu_ps(k[q], aw + 16 * q);
        b[q] = _mm512_maskz_loadu_ps(k[q], ab + 16 * q);
    }
    for (long n = 0; n < N; n++) {
        const float *x = inp + n * C + c0, *dy = dout + n * C + c0;
        const __m512 vm = _mm512_set1_ps(mean[n]), vr = _mm512_set1_ps(rstd[n]);
        for (int q = 0; q < q_all; q++) {
            const int full = q < q_full;
            __m512 d = bq_load16(dy + 16 * q, k[q], full);
            w[q] = _mm512_add_ps(w[q], _mm512_mul_ps(_mm512_mul_ps(d, _mm512_sub_ps(bq_load16(x + 16 * q, k[q], full), vm)), vr));
            b[q] = _mm512_add_ps(b[q], d);
        }
    }
    for (int q = 0; q < 4; q++) {
        _mm512_mask_storeu_ps(aw + 16 * q, k[q], w[q]);
        _mm512_mask_storeu_ps(ab + 16 * q, k[q], b[q]);
    }
}

BQ_AVX512_END
#endif
