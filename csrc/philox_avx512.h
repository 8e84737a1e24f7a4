/* Philox4x32-10 on sixteen blocks at once (AVX-512), philox.h's generator: key = seed, counter = (block as 64 bits,
 * tensor_id, step); element e of a tensor is word e % 4 of block e / 4. Shared by rng_avx512.c (dropout slices)
 * and attention_fused_avx512.c (masks drawn in the score tiles). Include it after BQ_AVX512_BEGIN (and
 * <immintrin.h>), inside the AVX-512 part of the including file. */
#ifndef BERTQA_PHILOX_AVX512_H
#define BERTQA_PHILOX_AVX512_H

#define PHILOX_M0 0xD2511F53u   /* as philox.h */
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* (lo, hi) 32-bit halves of a * M for sixteen 32-bit lanes. */
static inline void mulhilo16(__m512i a, __m512i M, __m512i *lo, __m512i *hi) {
    __m512i even = _mm512_mul_epu32(a, M);                        /* lanes 0,2,..,14 as 64-bit products */
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), M);  /* lanes 1,3,..,15 */
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

/* The Philox words of blocks block .. block+15 in element order: w[q] lane 4 * b + j is word j of block
 * block + 4 * q + b, i.e. element 16 * q + 4 * b + j of the group. */
static inline void philox16(__m512i w[4], uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t block) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i lo = _mm512_set1_epi32((int)(uint32_t)block);
    __m512i c0 = _mm512_add_epi32(lo, lane);
    /* the high word of the block counter, with the carry out of the low word per lane */
    __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lo);
    __m512i c1 = _mm512_set1_epi32((int)(uint32_t)(block >> 32));
    c1 = _mm512_mask_add_epi32(c1, carry, c1, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_set1_epi32((int)tensor_id), c3 = _mm512_set1_epi32((int)step);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    const __m512i M0 = _mm512_set1_epi32((int)PHILOX_M0), M1 = _mm512_set1_epi32((int)PHILOX_M1);
    for (int r = 0; r < 10; r++) {
        __m512i lo0, hi0, lo1, hi1;
        mulhilo16(c0, M0, &lo0, &hi0);
        mulhilo16(c2, M1, &lo1, &hi1);
        c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32((int)k0));
        c1 = lo1;
        c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32((int)k1));
        c3 = lo0;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    /* 4 x 16 transpose: in each 128-bit lane L (blocks 4L .. 4L+3), u_b = block 4L + b's four words ... */
    __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
    __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
    /* ... then w[q] = lane q of u0, u1, u2, u3 */
    __m512i x0 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0)), x1 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));
    __m512i x2 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2)), x3 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));
    w[0] = _mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));
    w[1] = _mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));
    w[2] = _mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(2, 0, 2, 0));
    w[3] = _mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(3, 1, 3, 1));
}

#endif /* BERTQA_PHILOX_AVX512_H */
