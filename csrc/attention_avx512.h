/* What the AVX-512 attention kernels share (attention_fused_avx512.c, fp32; attention_bf16_avx512.c, bf16):
 * include it after the file's target pragma. */
#ifndef BERTQA_ATTENTION_AVX512_H
#define BERTQA_ATTENTION_AVX512_H
#include <immintrin.h>
#include <math.h>
#include "attention_fused.h"

/* 2^x for x <= 0 (-inf included: 0): attention_fused.c's exp2_scalar on 16 lanes, 2^n by vscalefps. */
static inline __m512 exp2_16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-200.0f));   /* -inf - -inf would be NaN below; 2^-200 is 0 anyway */
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(x, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(EXP2_C5), r, _mm512_set1_ps(EXP2_C4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP2_C3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP2_C2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP2_C1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP2_C0));
    return _mm512_scalef_ps(p, n);
}
#endif
