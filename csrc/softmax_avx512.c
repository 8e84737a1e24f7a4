/* Attention's row kernels (softmax.c) sixteen lanes at a time, the last n % 16 through lane masks (rows of
 * their own lengths are often short: a scalar tail would cost as much as the body). exp, the mask's -10000 and
 * the max are the AVX2 variant's operations (bit-identical); sums and dot products add sixteen partial sums
 * instead of eight, so normalised rows and the softmax-backward row can differ by a few float32 ulps. */
#include <math.h>
#include "bertqa.h"
#include "cpu.h"
#include "vmath.h"
#ifdef BQ_HAVE_AVX512_BUILD
BQ_AVX512_BEGIN
#include "vmath_avx512.h"

float max_row_avx512(const float *x, int n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, bq_mask16(n - j), x + j));
    return _mm512_reduce_max_ps(m);
}

float exp_row_avx512(float *y, const float *x, float shift, int n) {
    const __m512 vs = _mm512_set1_ps(shift);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
        const __mmask16 k = bq_mask16(n - j);
        __m512 e = _mm512_maskz_mov_ps(k, bq_expf16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), vs)));
        _mm512_mask_storeu_ps(y + j, k, e);
        sum = _mm512_add_ps(sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

void softmax_row_avx512(float *row, const float *mk, int T) {
    if (mk) {
        const __m512 one = _mm512_set1_ps(1.0f), big = _mm512_set1_ps(-10000.0f);
        for (int j = 0; j < T; j += 16) {
            const __mmask16 k = bq_mask16(T - j);
            __m512 add = _mm512_mul_ps(_mm512_sub_ps(one, _mm512_maskz_loadu_ps(k, mk + j)), big);
            _mm512_mask_storeu_ps(row + j, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, row + j), add));
        }
    }
    const float sum = exp_row_avx512(row, row, max_row_avx512(row, T), T);
    const __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (int j = 0; j < T; j += 16) {
        const __mmask16 k = bq_mask16(T - j);
        _mm512_mask_storeu_ps(row + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, row + j), inv));
    }
}

void softmax_backward_row_avx512(float *g, const float *a, const float *mk, int n, float scale) {
    __m512 dot = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16) {
        const __mmask16 k = bq_mask16(n - j);
        __m512 gj = _mm512_maskz_loadu_ps(k, g + j);
        if (mk) {
            gj = _mm512_mul_ps(gj, _mm512_maskz_loadu_ps(k, mk + j));
            _mm512_mask_storeu_ps(g + j, k, gj);
        }
        dot = _mm512_add_ps(dot, _mm512_mul_ps(gj, _mm512_maskz_loadu_ps(k, a + j)));
    }
    const __m512 vd = _mm512_set1_ps(_mm512_reduce_add_ps(dot)), vs = _mm512_set1_ps(scale);
    for (int j = 0; j < n; j += 16) {
        const __mmask16 k = bq_mask16(n - j);
        __m512 aj = _mm512_maskz_loadu_ps(k, a + j);
        __m512 r = _mm512_mul_ps(_mm512_mul_ps(vs, aj), _mm512_sub_ps(_mm512_maskz_loadu_ps(k, g + j), vd));
        _mm512_mask_storeu_ps(g + j, k, r);
    }
}

BQ_AVX512_END
#endif
