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

/* One score row's NV vectors: c = scale c + bias (base-2 units) in place; returns the new running max,
 * max(mx, max_j c_j). */
static inline __attribute__((always_inline)) float scores_max(const int NV, __m512 *c, __m512 vs, const float *bias,
                                                              float mx) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {
        c[v] = _mm512_fmadd_ps(c[v], vs, _mm512_loadu_ps(bias + 16 * v));
        vmax = _mm512_max_ps(vmax, c[v]);
    }
    const float bmax = _mm512_reduce_max_ps(vmax);
    return mx > bmax ? mx : bmax;
}

/* Tiles of 4 rows x 16 NV columns: a switch picks a tile function F(MR, NV, ...) for the rows left (at most 4)
 * and, with COLS4, the vectors of a 64-key block (1 .. 4). */
#define ROWS4(F, NV, rows, ...)                                                                    \
    switch ((rows) < 4 ? (rows) : 4) {                                                             \
    case 4: F(4, NV, __VA_ARGS__); break;                                                          \
    case 3: F(3, NV, __VA_ARGS__); break;                                                          \
    case 2: F(2, NV, __VA_ARGS__); break;                                                          \
    default: F(1, NV, __VA_ARGS__); break;                                                         \
    }
#define COLS4(F, nv, rows, ...)                                                                    \
    switch (nv) {                                                                                  \
    case 4: ROWS4(F, 4, rows, __VA_ARGS__) break;                                                  \
    case 3: ROWS4(F, 3, rows, __VA_ARGS__) break;                                                  \
    case 2: ROWS4(F, 2, rows, __VA_ARGS__) break;                                                  \
    default: ROWS4(F, 1, rows, __VA_ARGS__) break;                                                 \
    }

/* The online softmax's bookkeeping after a block's score tiles: cr[m] (mx_old - mx_new on entry) becomes the
 * rescale factor 2^cr, the running sum's lanes l = l cr + rs (the block's lanes), and output rows O[m, 0..no)
 * are rescaled (rows ldo apart). */
static inline void rescale_rows(int mq, float *cr, float *l, const float *rs, float *O, long ldo, int no) {
    for (int m = 0; m < mq; m += 16) {   /* 16 rows at a time */
        const __mmask16 k = mq - m >= 16 ? 0xFFFF : (__mmask16)((1u << (mq - m)) - 1);
        _mm512_mask_storeu_ps(cr + m, k, exp2_16(_mm512_maskz_loadu_ps(k, cr + m)));
    }
    for (int m = 0; m < mq; m++) {
        const __m512 vc = _mm512_set1_ps(cr[m]);
        float *lm = l + BQ_ATTN_LANES * m;
        _mm512_storeu_ps(lm, _mm512_fmadd_ps(_mm512_loadu_ps(lm), vc, _mm512_loadu_ps(rs + 16 * m)));
        if (cr[m] != 1.0f)
            for (int d = 0; d < no; d += 16) _mm512_storeu_ps(O + m * ldo + d, _mm512_mul_ps(vc, _mm512_loadu_ps(O + m * ldo + d)));
    }
}
#endif
