/* GELU's AVX2 variant (eight lanes, a scalar tail with the same formula), the reference the AVX-512 one
 * (gelu_avx512.c: sixteen lanes, bit-identical results) is tested against. The entry points and their threads are
 * gelu.c's; callers reach the variants through bq_cpu() (cpu.h). erf comes from vmath.h (absolute error ~3e-7,
 * eight lanes at a time), which also hands back the exp(-x^2 / 2) that phi needs. */
#include <math.h>
#include "bertqa.h"
#include "cpu.h"
#include "vmath.h"

#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

/* Elements [0, n): vector body, scalar tail with the same formula. */
void gelu_forward_avx2(float *out, const float *inp, long n) {
    long i = 0;
#ifdef __AVX2__
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), k = _mm256_set1_ps(INV_SQRT2);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(inp + i), e;
        __m256 erf = bq_erff8(_mm256_mul_ps(x, k), &e);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, erf)));
    }
#endif
    for (; i < n; i++) {
        float e, x = inp[i];
        out[i] = 0.5f * x * (1.0f + bq_erff(x * INV_SQRT2, &e));
    }
}

void gelu_backward_avx2(float *dinp, const float *inp, const float *dout, long n) {
    long i = 0;
#ifdef __AVX2__
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f), k = _mm256_set1_ps(INV_SQRT2),
                 c = _mm256_set1_ps(INV_SQRT_2PI);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(inp + i), e;
        __m256 cdf = _mm256_mul_ps(half, _mm256_add_ps(one, bq_erff8(_mm256_mul_ps(x, k), &e)));
        __m256 pdf = _mm256_mul_ps(c, e);   /* e = exp(-x^2 / 2) */
        __m256 d = _mm256_mul_ps(_mm256_loadu_ps(dout + i), _mm256_add_ps(cdf, _mm256_mul_ps(x, pdf)));
        _mm256_storeu_ps(dinp + i, _mm256_add_ps(_mm256_loadu_ps(dinp + i), d));
    }
#endif
    for (; i < n; i++) {
        float e, x = inp[i];
        float cdf = 0.5f * (1.0f + bq_erff(x * INV_SQRT2, &e));
        dinp[i] += dout[i] * (cdf + x * (INV_SQRT_2PI * e));   /* grouped as the vector body */
    }
}
