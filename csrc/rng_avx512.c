/* dropout_slice (rng_avx2.c) with sixteen Philox4x32-10 blocks at once: 64 elements per group, in element order
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

#include "philox_avx512.h"

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
