/* dropout_slice's AVX2 variant: eight Philox blocks at once (philox8), a scalar path (philox.h's uniform4) for
 * slices off a multiple of 4 and for the tail. The reference rng_avx512.c's variant is tested against (the same
 * masks and uniforms bit for bit); the entry points are rng.c's, which reach it through bq_cpu() (cpu.h). */
#include <limits.h>
#include <math.h>
#include "bertqa.h"
#include "cpu.h"
#include "philox.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

#ifdef __AVX2__
/* (lo, hi) 32-bit halves of a * M for eight 32-bit lanes at once. */
static inline void mulhilo8(__m256i a, __m256i M, __m256i *lo, __m256i *hi) {
    __m256i even = _mm256_mul_epu32(a, M);                        /* lanes 0,2,4,6 as 64-bit products */
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), M);  /* lanes 1,3,5,7 */
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

/* The four Philox output words of blocks block .. block+7 (lane b = block + b). */
static inline void philox8(__m256i w[4], uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t block) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)block), lane);
    /* the high word of the block counter, with the carry out of the low word per lane */
    __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(_mm256_set1_epi32((int)(uint32_t)block), _mm256_set1_epi32(INT32_MIN)),
                                       _mm256_xor_si256(c0, _mm256_set1_epi32(INT32_MIN)));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32((int)(uint32_t)(block >> 32)), carry);
    __m256i c2 = _mm256_set1_epi32((int)tensor_id), c3 = _mm256_set1_epi32((int)step);
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    const __m256i M0 = _mm256_set1_epi32((int)PHILOX_M0), M1 = _mm256_set1_epi32((int)PHILOX_M1);
    for (int r = 0; r < 10; r++) {
        __m256i lo0, hi0, lo1, hi1;
        mulhilo8(c0, M0, &lo0, &hi0);
        mulhilo8(c2, M1, &lo1, &hi1);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)k0));
        c1 = lo1;
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)k1));
        c3 = lo0;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    w[0] = c0; w[1] = c1; w[2] = c2; w[3] = c3;
}

/* The uniforms of elements 4*block .. 4*block+31 (eight Philox blocks at once), in element order. */
static inline void uniform32(float u[32], uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t block) {
    __m256i words[4];
    philox8(words, seed, step, tensor_id, block);
    const __m256 scale = _mm256_set1_ps(1.0f / 16777216.0f);
    float w[4][8];
    for (int j = 0; j < 4; j++)
        _mm256_storeu_ps(w[j], _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(words[j], 8)), scale));
    for (int b = 0; b < 8; b++)
        for (int j = 0; j < 4; j++) u[4 * b + j] = w[j][b];
}

/* keep / (1 - p) for elements 4*block .. 4*block+31, in element order, as four vectors of eight. keep is
 * (word >> 8) * 2^-24 >= p, computed on the integers: (word >> 8) >= thr with thr = ceil(p * 2^24), which is
 * exactly the float comparison (both sides are exact), so the masks equal the scalar path's bit for bit. */
static inline void keep32(__m256 out[4], uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t block,
                          __m256i thr_minus_1, __m256 scale) {
    __m256i words[4];
    philox8(words, seed, step, tensor_id, block);
    __m256 v[4];   /* v[j] lane b: element 4 * b + j */
    for (int j = 0; j < 4; j++)
        v[j] = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_srli_epi32(words[j], 8), thr_minus_1)),
                             scale);
    /* 4 x 8 transpose into element order */
    __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));   /* elements 0-3 | 16-19 */
    __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));   /* 4-7 | 20-23 */
    __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));   /* 8-11 | 24-27 */
    __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));   /* 12-15 | 28-31 */
    out[0] = _mm256_permute2f128_ps(u0, u1, 0x20);
    out[1] = _mm256_permute2f128_ps(u2, u3, 0x20);
    out[2] = _mm256_permute2f128_ps(u0, u1, 0x31);
    out[3] = _mm256_permute2f128_ps(u2, u3, 0x31);
}
#endif

enum { APPLY = BQ_DROPOUT_APPLY, ACCUMULATE = BQ_DROPOUT_ACCUMULATE, MASK = BQ_DROPOUT_MASK, UNIFORM = BQ_DROPOUT_UNIFORM };

static inline void emit(float *y, const float *x, size_t i, float u, float p, float scale, int mode) {
    float keep = u >= p ? scale : 0.0f;
    switch (mode) {
    case APPLY: y[i] = x[i] * keep; break;
    case ACCUMULATE: y[i] += x[i] * keep; break;
    case MASK: y[i] = keep; break;
    default: y[i] = u; break;
    }
}

/* Over i in [0, n), a slice of a tensor's element numbering starting at `first`: APPLY y = x * keep / (1 - p),
 * ACCUMULATE y += x * keep / (1 - p), MASK y = keep / (1 - p), UNIFORM y = the uniform itself. One Philox call
 * per 4 elements (8 at once with AVX2); the slice need not start on a multiple of 4. y may alias x.
 * The AVX2 variant; rng_avx512.c has the AVX-512 one (sixteen Philox blocks at once, the same masks bit for bit),
 * and dropout_slice below takes the one bq_cpu() says. */
void dropout_slice_avx2(float *y, const float *x, size_t n, float p, uint64_t seed, uint32_t step,
                        uint32_t tensor_id, uint64_t first, int mode) {
    const float scale = 1.0f / (1.0f - p);
    size_t i = 0;
#ifdef __AVX2__
    const __m256i thr_minus_1 = _mm256_set1_epi32((int)ceil((double)p * 16777216.0) - 1);
    const __m256 vscale = _mm256_set1_ps(scale);
#endif
    while (i < n) {
        const uint64_t idx = first + i;
#ifdef __AVX2__
        if (idx % 4 == 0 && n - i >= 32 && mode != UNIFORM) {   /* whole groups of 32 elements, vectorised */
            __m256 k[4];
            keep32(k, seed, step, tensor_id, idx / 4, thr_minus_1, vscale);
            for (int j = 0; j < 4; j++, i += 8) {
                if (mode == MASK) {
                    _mm256_storeu_ps(y + i, k[j]);
                } else {
                    __m256 xk = _mm256_mul_ps(_mm256_loadu_ps(x + i), k[j]);
                    _mm256_storeu_ps(y + i, mode == APPLY ? xk : _mm256_add_ps(_mm256_loadu_ps(y + i), xk));
                }
            }
            continue;
        }
        if (idx % 4 == 0 && n - i >= 32) {   /* whole groups of 32 elements */
            float u[32];
            uniform32(u, seed, step, tensor_id, idx / 4);
            for (int j = 0; j < 32; j++, i++) emit(y, x, i, u[j], p, scale, mode);
            continue;
        }
#endif
        float u[4];
        uniform4(u, seed, step, tensor_id, idx / 4);
        for (unsigned lane = (unsigned)(idx % 4); lane < 4 && i < n; lane++, i++) emit(y, x, i, u[lane], p, scale, mode);
    }
}
