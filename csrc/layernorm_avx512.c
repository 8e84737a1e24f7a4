/* LayerNorm's row kernels (layernorm.c) sixteen channels at a time, the last C % 16 through masked loads and
 * stores. Elementwise parts compute the AVX2 variant's expressions in its order; the row sums (mean, variance,
 * the two backward means) add sixteen partial sums instead of the compiler's eight, so mean and rstd, and with
 * them out and dx, can differ from the AVX2 path by a few float32 ulps. The parameter gradients sum over rows in
 * row order per channel, as the AVX2 path does: bit-identical. */
#include <math.h>
#include "bertqa.h"
#include "cpu.h"
#include "vmath.h"
#ifdef BQ_HAVE_AVX512_BUILD
BQ_AVX512_BEGIN
#include "vmath_avx512.h"

void layernorm_forward_row_avx512(float *o, float *mean, float *rstd, const float *x, const float *weight,
                                  const float *bias, int C, float eps) {
    __m512 vs = _mm512_setzero_ps();
    for (int c = 0; c < C; c += 16) vs = _mm512_add_ps(vs, _mm512_maskz_loadu_ps(bq_mask16(C - c), x + c));
    const float m = _mm512_reduce_add_ps(vs) / C;
    const __m512 vm = _mm512_set1_ps(m);
    __m512 vv = _mm512_setzero_ps();   /* two passes: no cancellation from E[x^2] - m^2 */
    for (int c = 0; c < C; c += 16) {
        const __mmask16 k = bq_mask16(C - c);
        __m512 d = _mm512_maskz_sub_ps(k, _mm512_maskz_loadu_ps(k, x + c), vm);
        vv = _mm512_add_ps(vv, _mm512_mul_ps(d, d));
    }
    const float r = 1.0f / sqrtf(_mm512_reduce_add_ps(vv) / C + eps);
    const __m512 vr = _mm512_set1_ps(r);
    for (int c = 0; c < C; c += 16) {
        const __mmask16 k = bq_mask16(C - c);
        __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + c), vm);
        __m512 y = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(d, vr), _mm512_maskz_loadu_ps(k, weight + c)),
                                 _mm512_maskz_loadu_ps(k, bias + c));
        _mm512_mask_storeu_ps(o + c, k, y);
    }
    *mean = m;
    *rstd = r;
}

void layernorm_backward_row_avx512(float *dx, const float *dy, const float *x, const float *weight, float m,
                                   float r, int C) {
    const __m512 vm = _mm512_set1_ps(m), vr = _mm512_set1_ps(r);
    __m512 vsg = _mm512_setzero_ps(), vsgx = _mm512_setzero_ps();
    for (int c = 0; c < C; c += 16) {
        const __mmask16 k = bq_mask16(C - c);
        __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, dy + c), _mm512_maskz_loadu_ps(k, weight + c));
        vsg = _mm512_add_ps(vsg, g);   /* masked lanes: g = 0 */
        vsgx = _mm512_add_ps(vsgx, _mm512_mul_ps(_mm512_mul_ps(g, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + c), vm)), vr));
    }
    const __m512 sg = _mm512_set1_ps(_mm512_reduce_add_ps(vsg) / C), sgx = _mm512_set1_ps(_mm512_reduce_add_ps(vsgx) / C);
    for (int c = 0; c < C; c += 16) {
        const __mmask16 k = bq_mask16(C - c);
        __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + c), vm), vr);
        __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, dy + c), _mm512_maskz_loadu_ps(k, weight + c));
        __m512 d = _mm512_mul_ps(vr, _mm512_sub_ps(_mm512_sub_ps(g, sg), _mm512_mul_ps(xhat, sgx)));
        _mm512_mask_storeu_ps(dx + c, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, dx + c), d));
    }
}

void layernorm_param_grad_avx512(float *aw, float *ab, const float *dout, const float *inp, const float *mean,
                                 const float *rstd, long N, int C, int c0, int c1) {
    __m512 w[4], b[4];
    __mmask16 k[4];
    for (int q = 0; q < 4; q++) {
        const int c = c0 + 16 * q;
        k[q] = c < c1 ? bq_mask16(c1 - c) : 0;
        w[q] = _mm512_maskz_loadu_ps(k[q], aw + 16 * q);
        b[q] = _mm512_maskz_loadu_ps(k[q], ab + 16 * q);
    }
    for (long n = 0; n < N; n++) {
        const float *x = inp + n * C + c0, *dy = dout + n * C + c0;
        const __m512 vm = _mm512_set1_ps(mean[n]), vr = _mm512_set1_ps(rstd[n]);
        for (int q = 0; q < 4; q++) {
            if (!k[q]) break;
            __m512 d = _mm512_maskz_loadu_ps(k[q], dy + 16 * q);
            w[q] = _mm512_add_ps(w[q], _mm512_mul_ps(_mm512_mul_ps(d, _mm512_sub_ps(_mm512_maskz_loadu_ps(k[q], x + 16 * q), vm)), vr));
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
