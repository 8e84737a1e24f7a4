/* AdamW and the sum of squares (adamw.c, adamw_avx2.c) sixteen lanes at a time. AdamW computes the AVX2 variant's
 * expressions in its order (bit-identical results); the sum of squares adds in double in another order (its
 * products are exact in double, so only the additions' rounding differs, ~1e-16 relative). The last n % 16
 * elements go to the AVX2 variants. */
#include <math.h>
#include "bertqa.h"
#include "cpu.h"
#include "vmath.h"
#ifdef BQ_HAVE_AVX512_BUILD
BQ_AVX512_BEGIN
#include "vmath_avx512.h"

void adamw_avx512(float *param, const float *grad, float *m, float *v, long n, const bq_adamw_scalars *s) {
    const __m512 beta1 = _mm512_set1_ps(s->beta1), beta2 = _mm512_set1_ps(s->beta2),
                 omb1 = _mm512_set1_ps(s->one_minus_beta1), omb2 = _mm512_set1_ps(s->one_minus_beta2),
                 decay = _mm512_set1_ps(s->decay), step_size = _mm512_set1_ps(s->step_size),
                 bc2_sqrt = _mm512_set1_ps(s->bc2_sqrt), eps = _mm512_set1_ps(s->eps),
                 grad_scale = _mm512_set1_ps(s->grad_scale);
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 g = _mm512_mul_ps(_mm512_loadu_ps(grad + i), grad_scale);
        __m512 p = _mm512_mul_ps(_mm512_loadu_ps(param + i), decay);
        __m512 mi = _mm512_add_ps(_mm512_mul_ps(beta1, _mm512_loadu_ps(m + i)), _mm512_mul_ps(omb1, g));
        __m512 vi = _mm512_add_ps(_mm512_mul_ps(beta2, _mm512_loadu_ps(v + i)), _mm512_mul_ps(_mm512_mul_ps(omb2, g), g));
        _mm512_storeu_ps(m + i, mi);
        _mm512_storeu_ps(v + i, vi);
        __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2_sqrt), eps);
        _mm512_storeu_ps(param + i, _mm512_sub_ps(p, _mm512_div_ps(_mm512_mul_ps(step_size, mi), den)));
    }
    if (i < n) adamw_avx2(param + i, grad + i, m + i, v + i, n - i, s);
}

double sum_squares_avx512(const float *g, long n) {
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512d a = _mm512_cvtps_pd(_mm256_loadu_ps(g + i)), b = _mm512_cvtps_pd(_mm256_loadu_ps(g + i + 8));
        s0 = _mm512_add_pd(s0, _mm512_mul_pd(a, a));
        s1 = _mm512_add_pd(s1, _mm512_mul_pd(b, b));
    }
    double s = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
    if (i < n) s += sum_squares_avx2(g + i, n - i);
    return s;
}

BQ_AVX512_END
#endif
