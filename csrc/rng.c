/* Counter-based RNG (Philox4x32-10) and dropout.
 *
 * A dropout mask is a pure function of (seed, step, tensor_id, element index), so backward regenerates it
 * instead of storing it, any thread can produce any element, and the CUDA backend reproduces it bit for bit.
 */
#include <limits.h>
#include <math.h>
#include "bertqa.h"
#include "cpu.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

static inline uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t *hi) {
    uint64_t p = (uint64_t)a * b;
    *hi = (uint32_t)(p >> 32);
    return (uint32_t)p;
}

void bq_philox4x32(uint32_t out[4], const uint32_t counter[4], const uint32_t key[2]) {
    uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        uint32_t hi0, hi1;
        uint32_t lo0 = mulhilo(PHILOX_M0, c0, &hi0);
        uint32_t lo1 = mulhilo(PHILOX_M1, c2, &hi1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* Four uniforms for elements 4*block .. 4*block+3. */
static inline void uniform4(float u[4], uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t block) {
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    const uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), tensor_id, step};
    uint32_t r[4];
    bq_philox4x32(r, ctr, key);
    for (int j = 0; j < 4; j++) u[j] = (float)(r[j] >> 8) * (1.0f / 16777216.0f);
}

float bq_uniform(uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t idx) {
    float u[4];
    uniform4(u, seed, step, tensor_id, idx / 4);
    return u[idx % 4];
}

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

static inline void dropout_slice(float *y, const float *x, size_t n, float p, uint64_t seed, uint32_t step,
                                 uint32_t tensor_id, uint64_t first, int mode) {
    bq_cpu()->dropout_slice(y, x, n, p, seed, step, tensor_id, first, mode);
}

void bq_dropout_slice(float *out, const float *inp, size_t n, float p, uint64_t seed, uint32_t step,
                      uint32_t tensor_id, uint64_t first) {
    dropout_slice(out, inp, n, p, seed, step, tensor_id, first, APPLY);
}

void bq_dropout_mask(float *mask, size_t n, float p, uint64_t seed, uint32_t step, uint32_t tensor_id,
                     uint64_t first) {
    dropout_slice(mask, NULL, n, p, seed, step, tensor_id, first, MASK);
}

void bq_uniform_fill(float *u, size_t n, uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t first) {
    dropout_slice(u, NULL, n, 0.0f, seed, step, tensor_id, first, UNIFORM);
}

/* Whole tensors: threads take 4096-element slices. */
static void dropout_apply(float *y, const float *x, size_t N, float p, uint64_t seed, uint32_t step,
                          uint32_t tensor_id, int mode) {
    const size_t S = 4096;
    const long nslices = (long)((N + S - 1) / S);
#pragma omp parallel for schedule(static) if (N > 32768) num_threads(bq_num_threads())
    for (long sl = 0; sl < nslices; sl++) {
        size_t a = (size_t)sl * S, n = N - a < S ? N - a : S;
        dropout_slice(y + a, x + a, n, p, seed, step, tensor_id, a, mode);
    }
}

void dropout_forward(float *out, const float *inp, size_t N, float p, uint64_t seed, uint32_t step,
                     uint32_t tensor_id) {
    dropout_apply(out, inp, N, p, seed, step, tensor_id, APPLY);
}

void dropout_backward(float *dinp, const float *dout, size_t N, float p, uint64_t seed, uint32_t step,
                      uint32_t tensor_id) {
    dropout_apply(dinp, dout, N, p, seed, step, tensor_id, ACCUMULATE);
}

/* Rows with bq_rng numbering: row b's T_b * C elements are contiguous in the buffer (from off[b] * C) and in the
 * numbering (from w_b * P * C), so rows are cut into 4096-element slices that the threads share. */
static void dropout_rows_apply(float *y, const float *x, int B, const int *off, int C, float p, bq_rng r,
                               uint32_t tensor_id, int mode) {
    const size_t S = 4096;
    long nslices = 0;
    for (int b = 0; b < B; b++) nslices += (long)(((size_t)(off[b + 1] - off[b]) * C + S - 1) / S);
    const size_t total = (size_t)(off[B] - off[0]) * C;
    int b = 0;
    long first_slice = 0;   /* slices of the rows before b */
#pragma omp parallel for schedule(static) if (total > 32768) num_threads(bq_num_threads()) firstprivate(b, first_slice)
    for (long sl = 0; sl < nslices; sl++) {
        /* this thread's slices come in order: walk b forward (from where it last stopped) to the row of sl */
        while (sl - first_slice >= (long)(((size_t)(off[b + 1] - off[b]) * C + S - 1) / S)) {
            first_slice += (long)(((size_t)(off[b + 1] - off[b]) * C + S - 1) / S);
            b++;
        }
        const size_t row = (size_t)(off[b + 1] - off[b]) * C, a = (size_t)(sl - first_slice) * S;
        const size_t n = row - a < S ? row - a : S, o = (size_t)off[b] * C + a;
        dropout_slice(y + o, x + o, n, p, r.seed, r.step, tensor_id, bq_rng_window(r, b) * (uint64_t)r.P * C + a,
                      mode);
    }
}

void dropout_rows_forward(float *out, const float *inp, int B, const int *off, int C, float p, bq_rng r,
                          uint32_t tensor_id) {
    dropout_rows_apply(out, inp, B, off, C, p, r, tensor_id, APPLY);
}

void dropout_rows_backward(float *dinp, const float *dout, int B, const int *off, int C, float p, bq_rng r,
                           uint32_t tensor_id) {
    dropout_rows_apply(dinp, dout, B, off, C, p, r, tensor_id, ACCUMULATE);
}
