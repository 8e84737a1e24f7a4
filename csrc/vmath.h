/* Vector float math for the hot elementwise loops (libm's expf is one scalar call per element).
 *
 * exp: Cephes-style range reduction exp(x) = 2^n * exp(r), |r| <= ln2/2, degree-6 polynomial; relative error
 * below 2e-7; inputs below -87.3 give 0 (as a softmax wants). The AVX2 path and the scalar path compute the
 * same formula, so results do not depend on the loop tail; vmath_avx512.h has it sixteen lanes wide, also the
 * same formula (cpu.h: the AVX-512 variants are chosen at run time).
 */
#ifndef BERTQA_VMATH_H
#define BERTQA_VMATH_H
#include <stdint.h>
#include <math.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BQ_EXP_HI 88.3762626647949f
#define BQ_EXP_LO (-87.3365478515625f)
#define BQ_LOG2E 1.44269504088896341f
#define BQ_LN2_HI 0.693359375f
#define BQ_LN2_LO (-2.12194440e-4f)
#define BQ_P0 1.9875691500E-4f
#define BQ_P1 1.3981999507E-3f
#define BQ_P2 8.3334519073E-3f
#define BQ_P3 4.1665795894E-2f
#define BQ_P4 1.6666665459E-1f
#define BQ_P5 5.0000001201E-1f

static inline float bq_expf(float x) {
    int underflow = x < BQ_EXP_LO;
    x = x > BQ_EXP_HI ? BQ_EXP_HI : x;
    x = x < BQ_EXP_LO ? BQ_EXP_LO : x;
    float n = __builtin_floorf(x * BQ_LOG2E + 0.5f);
    float r = x - n * BQ_LN2_HI;   /* ln2 split in two so that n*ln2 is exact */
    r = r - n * BQ_LN2_LO;
    float p = BQ_P0;
    p = p * r + BQ_P1;
    p = p * r + BQ_P2;
    p = p * r + BQ_P3;
    p = p * r + BQ_P4;
    p = p * r + BQ_P5;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return underflow ? 0.0f : p * scale;
}

#ifdef __AVX2__
static inline __m256 bq_expf8(__m256 x) {
    __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(BQ_EXP_LO), _CMP_LT_OQ);
    x = _mm256_min_ps(x, _mm256_set1_ps(BQ_EXP_HI));
    x = _mm256_max_ps(x, _mm256_set1_ps(BQ_EXP_LO));
    __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(BQ_LOG2E)), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(BQ_LN2_HI)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(BQ_LN2_LO)));
    /* the same formula as bq_expf, eight lanes at a time */
    __m256 p = _mm256_set1_ps(BQ_P0);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(BQ_P1));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(BQ_P2));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(BQ_P3));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(BQ_P4));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(BQ_P5));
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

static inline float bq_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float bq_hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* erf(z) by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7 in exact arithmetic, ~3e-7 in float):
 * erf(|z|) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2), t = 1 / (1 + p |z|). *e gets exp(-z^2),
 * which GELU's derivative needs too. */
#define BQ_ERF_P 0.3275911f
#define BQ_ERF_A1 0.254829592f
#define BQ_ERF_A2 (-0.284496736f)
#define BQ_ERF_A3 1.421413741f
#define BQ_ERF_A4 (-1.453152027f)
#define BQ_ERF_A5 1.061405429f

static inline float bq_erff(float z, float *e) {
    float a = fabsf(z);
    float t = 1.0f / (1.0f + BQ_ERF_P * a);
    float poly = t * (BQ_ERF_A1 + t * (BQ_ERF_A2 + t * (BQ_ERF_A3 + t * (BQ_ERF_A4 + t * BQ_ERF_A5))));
    *e = bq_expf(-z * z);
    float r = 1.0f - poly * *e;
    return z < 0.0f ? -r : r;
}

#ifdef __AVX2__
static inline __m256 bq_erff8(__m256 z, __m256 *e) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_andnot_ps(sign, z);
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(_mm256_set1_ps(BQ_ERF_P), a)));
    __m256 poly = _mm256_set1_ps(BQ_ERF_A5);
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(BQ_ERF_A4));
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(BQ_ERF_A3));
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(BQ_ERF_A2));
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(BQ_ERF_A1));
    poly = _mm256_mul_ps(poly, t);
    *e = bq_expf8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(z, z)));
    __m256 r = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_mul_ps(poly, *e));
    return _mm256_or_ps(r, _mm256_and_ps(sign, z));   /* erf is odd: copy z's sign */
}
#endif

/* row[0..T) = softmax(row + (1 - mk) * -10000) in place; mk [T] of 0/1, or NULL. Through the run-time dispatch
 * (cpu.h): softmax_row_avx2 (softmax_avx2.c) or softmax_row_avx512 (softmax_avx512.c). */
#include "cpu.h"
static inline void bq_softmax_row(float *row, const float *mk, int T) { bq_cpu()->softmax_row(row, mk, T); }
#endif
