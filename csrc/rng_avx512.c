/* dropout_slice (rng.c) with sixteen Philox4x32-10 blocks at once: 64 elements per group, in element order
 * after a 4 x 16 transpose of the output words. keep is (word >> 8) >= ceil(p * 2^24) on the integers, as the
 * AVX2 and scalar paths compute it, so masks and uniforms are the same bit for bit (the CUDA backend draws them
 * too). A slice that starts off a multiple of 4 takes its first 1-3 elements from the AVX2 variant (its scalar
 * path); a last group shorter than 64 is computed whole and stored through lane masks (masked loads and stores
 * in the body would cost twice the time here: only the tail takes them). */
#include <math.h>
#include "bertqa.h"
#include "cpu.h"
#include "vmath.h"
#ifdef BQ_HAVE_AVX512_BUILD
BQ_AVX512_BEGIN
#include "vmath_avx512.h"

#define PHILOX_M0 0xD2511F53u   /* as rng.c */
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

/* Elements at .. at+15 of y (full) or the lanes of k of them, from sixteen Philox words w: the mode's output. */
static inline void emit16(float *y, const float *x, __m512i w, __m512i thr_minus_1, __m512 vscale, int mode,
                          __mmask16 k, int full) {
    __m512i bits = _mm512_srli_epi32(w, 8);
    __m512 out;
    if (mode == BQ_DROPOUT_UNIFORM) {
        out = _mm512_mul_ps(_mm512_cvtepi32_ps(bits), _mm512_set1_ps(1.0f / 16777216.0f));
    } else {
        /* keep / (1 - p) or 0, multiplied (not masked) into x, so that -0, inf and NaN come out as in AVX2 */
        __m512 keep = _mm512_maskz_mov_ps(_mm512_cmpgt_epi32_mask(bits, thr_minus_1), vscale);
        if (mode == BQ_DROPOUT_MASK) {
            out = keep;
        } else {
            out = _mm512_mul_ps(bq_load16(x, k, full), keep);
            if (mode == BQ_DROPOUT_ACCUMULATE) out = _mm512_add_ps(bq_load16(y, k, full), out);
        }
    }
    bq_store16(y, out, k, full);
}

void dropout_slice_avx512(float *y, const float *x, size_t n, float p, uint64_t seed, uint32_t step,
                          uint32_t tensor_id, uint64_t first, int mode) {
    size_t i = 0;
    if (first % 4) {   /* up to the next multiple of 4: the AVX2 variant's one-block path */
        i = 4 - first % 4 < n ? 4 - first % 4 : n;
        dropout_slice_avx2(y, x, i, p, seed, step, tensor_id, first, mode);
    }
    const __m512i thr_minus_1 = _mm512_set1_epi32((int)ceil((double)p * 16777216.0) - 1);
    const __m512 vscale = _mm512_set1_ps(1.0f / (1.0f - p));
    __m512i w[4];
    for (; i + 64 <= n; i += 64) {
        philox16(w, seed, step, tensor_id, (first + i) / 4);
        for (int q = 0; q < 4; q++)
            emit16(y + i + 16 * q, x ? x + i + 16 * q : NULL, w[q], thr_minus_1, vscale, mode, 0, 1);
    }
    if (i < n) {   /* the last 1..63 elements: one more group, stored through lane masks */
        philox16(w, seed, step, tensor_id, (first + i) / 4);
        for (int q = 0; q < 4 && i + 16 * q < n; q++)
            emit16(y + i + 16 * q, x ? x + i + 16 * q : NULL, w[q], thr_minus_1, vscale, mode,
                   bq_mask16((long)(n - i - 16 * q)), 0);
    }
}

BQ_AVX512_END
#endif
