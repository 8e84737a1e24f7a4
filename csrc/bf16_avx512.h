/* Rounding to bf16 and pairing, shared by the AVX-512 BF16 files (gemm_lowp_avx512.c, attention_bf16_avx512.c):
 * include it after the file's target pragma. A "word" is two bf16 numbers side by side, the operand unit of
 * vdpbf16ps: the lower half is the first. Rounding is to nearest even (vcvtne2ps2bf16 / vcvtneps2bf16). */
#ifndef BERTQA_BF16_AVX512_H
#define BERTQA_BF16_AVX512_H
#include <immintrin.h>
#include <stdint.h>
#include "vmath_avx512.h"

/* 16 floats (the first n; the rest read as 0) -> 16 bf16 */
static inline __m256i bq_bf16x16(const float *x, int n) {
    return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(bq_mask16(n), x));
}

/* dst[i] = the word (lo[i], hi[i]), i < 16 */
static inline void bq_bf16_interleave16(uint32_t *dst, __m256i lo, __m256i hi) {
    const __m256i u = _mm256_unpacklo_epi16(lo, hi), v = _mm256_unpackhi_epi16(lo, hi);
    _mm256_storeu_si256((__m256i *)dst, _mm256_permute2x128_si256(u, v, 0x20));
    _mm256_storeu_si256((__m256i *)(dst + 8), _mm256_permute2x128_si256(u, v, 0x31));
}

/* words[i] = (x[2i], x[2i+1]) for i < nw, of x's first n floats (those past n read as 0) */
static inline void bq_bf16_words(uint32_t *words, const float *x, int n, int nw) {
    for (int i = 0; i < nw; i += 16) {
        const __m512 a = _mm512_maskz_loadu_ps(bq_mask16(n - 2 * i), x + 2 * i);
        const __m512 b = _mm512_maskz_loadu_ps(bq_mask16(n - 2 * i - 16), x + 2 * i + 16);
        _mm512_mask_storeu_epi32(words + i, bq_mask16(nw - i), (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
}
#endif
