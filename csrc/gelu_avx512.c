/* GELU (gelu.c, gelu_avx2.c) sixteen lanes at a time: the AVX2 variant's formula, operation for operation, so
 * results are bit-identical to it; the last n % 16 elements go to the AVX2 variant (eight lanes, then its scalar
 * tail). */
#include "bertqa.h"
#include "cpu.h"
#include "vmath.h"
#ifdef BQ_HAVE_AVX512_BUILD
BQ_AVX512_BEGIN
#include "vmath_avx512.h"

#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

void gelu_forward_avx512(float *out, const float *inp, long n) {
    long i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, bq_gelu16(_mm512_loadu_ps(inp + i)));
    if (i < n) gelu_forward_avx2(out + i, inp + i, n - i);
}

void gelu_backward_avx512(float *dinp, const float *inp, const float *dout, long n) {
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f), k = _mm512_set1_ps(INV_SQRT2),
                 c = _mm512_set1_ps(INV_SQRT_2PI);
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(inp + i), e;
        __m512 cdf = _mm512_mul_ps(half, _mm512_add_ps(one, bq_erff16(_mm512_mul_ps(x, k), &e)));
        __m512 pdf = _mm512_mul_ps(c, e);   /* e = exp(-x^2 / 2) */
        __m512 d = _mm512_mul_ps(_mm512_loadu_ps(dout + i), _mm512_add_ps(cdf, _mm512_mul_ps(x, pdf)));
        _mm512_storeu_ps(dinp + i, _mm512_add_ps(_mm512_loadu_ps(dinp + i), d));
    }
    if (i < n) gelu_backward_avx2(dinp + i, inp + i, dout + i, n - i);
}

BQ_AVX512_END
#endif
