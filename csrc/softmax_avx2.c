/* Attention's row kernels, AVX2 (8 lanes, scalar tail with the same formula): the reference the AVX-512
 * variants (softmax_avx512.c) are tested against. Callers reach them through bq_cpu() (cpu.h). */
#include <math.h>
#include "cpu.h"
#include "vmath.h"

/* row[0..T) = softmax(row + (1 - mk) * -10000) in place; mk [T] of 0/1, or NULL. */
void softmax_row_avx2(float *row, const float *mk, int T) {
    int j = 0;
    float mx = -INFINITY, sum = 0.0f;
    if (mk)
        for (j = 0; j < T; j++) row[j] += (1.0f - mk[j]) * -10000.0f;
    j = 0;
#ifdef __AVX2__
    __m256 vmx = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= T; j += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(row + j));
    mx = bq_hmax8(vmx);
#endif
    for (; j < T; j++) mx = row[j] > mx ? row[j] : mx;
    j = 0;
#ifdef __AVX2__
    __m256 vsum = _mm256_setzero_ps(), vm = _mm256_set1_ps(mx);
    for (; j + 8 <= T; j += 8) {
        __m256 e = bq_expf8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm));
        _mm256_storeu_ps(row + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    sum = bq_hsum8(vsum);
#endif
    for (; j < T; j++) {
        float e = bq_expf(row[j] - mx);
        row[j] = e;
        sum += e;
    }
    const float inv = 1.0f / sum;
    for (j = 0; j < T; j++) row[j] *= inv;
}

/* max of x[0..n) (-inf for n = 0) */
float max_row_avx2(const float *x, int n) {
    int j = 0;
    float mx = -INFINITY;
#ifdef __AVX2__
    __m256 vmx = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= n; j += 8) vmx = _mm256_max_ps(vmx, _mm256_loadu_ps(x + j));
    mx = bq_hmax8(vmx);
#endif
    for (; j < n; j++) mx = x[j] > mx ? x[j] : mx;
    return mx;
}

/* y[0..n) = exp(x - shift), returns the sum; y may alias x */
float exp_row_avx2(float *y, const float *x, float shift, int n) {
    int j = 0;
    float sum = 0.0f;
#ifdef __AVX2__
    __m256 vsum = _mm256_setzero_ps(), vs = _mm256_set1_ps(shift);
    for (; j + 8 <= n; j += 8) {
        __m256 e = bq_expf8(_mm256_sub_ps(_mm256_loadu_ps(x + j), vs));
        _mm256_storeu_ps(y + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    sum = bq_hsum8(vsum);
#endif
    for (; j < n; j++) {
        float e = bq_expf(x[j] - shift);
        y[j] = e;
        sum += e;
    }
    return sum;
}

/* Softmax backward of one probability row a [n] with the 1/sqrt(HS) of the scores folded in, through the row's
 * scaled dropout mask mk (or NULL):  g = scale * a * (g * mk - <g * mk, a>). */
void softmax_backward_row_avx2(float *g, const float *a, const float *mk, int n, float scale) {
    if (mk)
        for (int j = 0; j < n; j++) g[j] *= mk[j];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int j = 0; j < n; j++) dot += g[j] * a[j];
#pragma omp simd
    for (int j = 0; j < n; j++) g[j] = scale * a[j] * (g[j] - dot);
}
