/* vmath.h's exp and erf sixteen lanes at a time, for the *_avx512.c files only (include it after their
 * BQ_AVX512_BEGIN, cpu.h). The same formula as bq_expf / bq_expf8 and bq_erff / bq_erff8, operation for
 * operation (no fused multiply-add), so every lane's result equals theirs bit for bit. */
#ifndef BERTQA_VMATH_AVX512_H
#define BERTQA_VMATH_AVX512_H
#include <immintrin.h>
#include "vmath.h"

static inline __m512 bq_expf16(__m512 x) {
    __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(BQ_EXP_LO), _CMP_LT_OQ);
    x = _mm512_min_ps(x, _mm512_set1_ps(BQ_EXP_HI));
    x = _mm512_max_ps(x, _mm512_set1_ps(BQ_EXP_LO));
    __m512 n = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(BQ_LOG2E)), _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(BQ_LN2_HI)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(BQ_LN2_LO)));
    __m512 p = _mm512_set1_ps(BQ_P0);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(BQ_P1));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(BQ_P2));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(BQ_P3));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(BQ_P4));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(BQ_P5));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps((__mmask16)~underflow, p, _mm512_castsi512_ps(e));   /* underflow lanes: +0 */
}

static inline __m512 bq_erff16(__m512 z, __m512 *e) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    __m512 a = _mm512_andnot_ps(sign, z);
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), _mm512_mul_ps(_mm512_set1_ps(BQ_ERF_P), a)));
    __m512 poly = _mm512_set1_ps(BQ_ERF_A5);
    poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(BQ_ERF_A4));
    poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(BQ_ERF_A3));
    poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(BQ_ERF_A2));
    poly = _mm512_add_ps(_mm512_mul_ps(poly, t), _mm512_set1_ps(BQ_ERF_A1));
    poly = _mm512_mul_ps(poly, t);
    *e = bq_expf16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(z, z)));
    __m512 r = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_mul_ps(poly, *e));
    return _mm512_or_ps(r, _mm512_and_ps(sign, z));   /* erf is odd: copy z's sign */
}

/* GELU, exact erf form 0.5 x (1 + erf(x / sqrt(2))), sixteen lanes: gelu_avx2.c's formula operation for operation
 * (gelu_forward_avx512 and the low-precision products' epilogue share it, so their results are equal bit for bit) */
static inline __m512 bq_gelu16(__m512 x) {
    __m512 e;
    const __m512 erf = bq_erff16(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752440f)), &e);
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), erf));
}

/* lanes 0 .. n-1 (none for n <= 0, all 16 for n >= 16) */
static inline __mmask16 bq_mask16(long n) {
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* Load / store sixteen floats, all of them (full, a constant after inlining: plain vmovups) or the lanes of k
 * (zero elsewhere): a row's body and its last n % 16 share one step function. Masked loads and stores in the
 * body cost ~20% on this machine (AMD EPYC, AVX-512), so only the tail takes them. */
static inline __m512 bq_load16(const float *p, __mmask16 k, int full) {
    return full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p);
}
static inline void bq_store16(float *p, __m512 v, __mmask16 k, int full) {
    if (full) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, k, v);
}

/* Elements of p before its next 64-byte boundary (0..15, at most n). A pass that only stores elementwise results
 * takes them through a lane mask first, so that its full stores are aligned: a store across two cache lines
 * (every one of them when p is 16 bytes off, as malloc and NumPy give) made LayerNorm's dx pass twice as slow
 * as AVX2's. Passes that sum do not: their order, hence their rounding, must not depend on the address. */
static inline int bq_head16(const float *p, int n) {
    int h = (int)(((64 - ((uintptr_t)p & 63)) & 63) / 4);
    return h < n ? h : n;
}
#endif /* BERTQA_VMATH_AVX512_H */
