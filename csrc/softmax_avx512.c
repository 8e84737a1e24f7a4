/* Attention's row kernels (softmax_avx2.c) sixteen lanes at a time, the last n % 16 through lane masks (rows of their
 * own lengths are often short: a scalar tail would cost as much as the body). exp, the mask's -10000 and the max
 * are the AVX2 variant's operations (bit-identical); sums and dot products add sixteen partial sums instead of
 * eight, so a normalised row and the softmax-backward row can differ from AVX2 by a few float32 ulps. */
#include <math.h>
#include "bertqa.h"
#include "cpu.h"
#include "vmath.h"
#ifdef BQ_HAVE_AVX512_BUILD
BQ_AVX512_BEGIN
#include "vmath_avx512.h"

/* Each step handles elements j .. j+15 (full) or the lanes of k of them (the row's tail). */

static inline __m512 max_step(__m512 m, const float *x, __mmask16 k, int full) {
    return _mm512_max_ps(m, full ? _mm512_loadu_ps(x) : _mm512_mask_loadu_ps(m, k, x));
}

float max_row_avx512(const float *x, int n) {
    const int body = n & ~15;
    const __mmask16 tail = bq_mask16(n - body);
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < body; j += 16) m = max_step(m, x + j, 0, 1);
    if (tail) m = max_step(m, x + body, tail, 0);
    return _mm512_reduce_max_ps(m);
}

static inline __m512 exp_step(__m512 sum, float *y, const float *x, __m512 shift, __mmask16 k, int full) {
    __m512 e = bq_expf16(_mm512_sub_ps(bq_load16(x, k, full), shift));
    if (!full) e = _mm512_maskz_mov_ps(k, e);   /* lanes past the row add nothing */
    bq_store16(y, e, k, full);
    return _mm512_add_ps(sum, e);
}

float exp_row_avx512(float *y, const float *x, float shift, int n) {
    const int body = n & ~15;
    const __mmask16 tail = bq_mask16(n - body);
    const __m512 vs = _mm512_set1_ps(shift);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < body; j += 16) sum = exp_step(sum, y + j, x + j, vs, 0, 1);
    if (tail) sum = exp_step(sum, y + body, x + body, vs, tail, 0);
    return _mm512_reduce_add_ps(sum);
}

/* row += (1 - mk) * -10000 */
static inline void mask_step(float *row, const float *mk, __mmask16 k, int full) {
    __m512 add = _mm512_mul_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), bq_load16(mk, k, full)), _mm512_set1_ps(-10000.0f));
    bq_store16(row, _mm512_add_ps(bq_load16(row, k, full), add), k, full);
}

static inline void scale_step(float *row, __m512 s, __mmask16 k, int full) {
    bq_store16(row, _mm512_mul_ps(bq_load16(row, k, full), s), k, full);
}

void softmax_row_avx512(float *row, const float *mk, int T) {
    const int h = bq_head16(row, T);   /* the elementwise passes' stores aligned (vmath_avx512.h) */
    int j;
    if (mk) {
        if (h) mask_step(row, mk, bq_mask16(h), 0);
        for (j = h; j + 16 <= T; j += 16) mask_step(row + j, mk + j, 0, 1);
        if (j < T) mask_step(row + j, mk + j, bq_mask16(T - j), 0);
    }
    const float sum = exp_row_avx512(row, row, max_row_avx512(row, T), T);
    const __m512 inv = _mm512_set1_ps(1.0f / sum);
    if (h) scale_step(row, inv, bq_mask16(h), 0);
    for (j = h; j + 16 <= T; j += 16) scale_step(row + j, inv, 0, 1);
    if (j < T) scale_step(row + j, inv, bq_mask16(T - j), 0);
}

/* g *= mk (when given); dot += g * a */
static inline __m512 dot_step(__m512 dot, float *g, const float *a, const float *mk, __mmask16 k, int full) {
    __m512 gj = bq_load16(g, k, full);
    if (mk) {
        gj = _mm512_mul_ps(gj, bq_load16(mk, k, full));
        bq_store16(g, gj, k, full);
    }
    return _mm512_add_ps(dot, _mm512_mul_ps(gj, bq_load16(a, k, full)));
}

/* g = scale * a * (g - dot) */
static inline void grad_step(float *g, const float *a, __m512 dot, __m512 scale, __mmask16 k, int full) {
    bq_store16(g, _mm512_mul_ps(_mm512_mul_ps(scale, bq_load16(a, k, full)), _mm512_sub_ps(bq_load16(g, k, full), dot)), k, full);
}

void softmax_backward_row_avx512(float *g, const float *a, const float *mk, int n, float scale) {
    const int body = n & ~15;
    const __mmask16 tail = bq_mask16(n - body);
    __m512 dot = _mm512_setzero_ps();
    for (int j = 0; j < body; j += 16) dot = dot_step(dot, g + j, a + j, mk ? mk + j : NULL, 0, 1);
    if (tail) dot = dot_step(dot, g + body, a + body, mk ? mk + body : NULL, tail, 0);
    const __m512 vd = _mm512_set1_ps(_mm512_reduce_add_ps(dot)), vs = _mm512_set1_ps(scale);
    const int h = bq_head16(g, n);   /* elementwise: its stores aligned (vmath_avx512.h) */
    if (h) grad_step(g, a, vd, vs, bq_mask16(h), 0);
    int j = h;
    for (; j + 16 <= n; j += 16) grad_step(g + j, a + j, vd, vs, 0, 1);
    if (j < n) grad_step(g + j, a + j, vd, vs, bq_mask16(n - j), 0);
}

BQ_AVX512_END
#endif
