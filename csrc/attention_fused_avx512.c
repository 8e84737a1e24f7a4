/* AVX-512F kernels of the fused attention (the table of attention_fused.h), compiled for AVX-512 whatever the
 * build's -m flags say (cpu.h's BQ_AVX512_BEGIN) and used when cpu.c has chosen AVX-512 (cpuid, BERTQA_CPU,
 * bertqa.ops.set_isa).
 *
 * The score products keep whole block rows in registers (4 queries x 64 keys = 16 of the 32 zmm registers), so
 * the softmax pieces run on the accumulators before anything is stored: the forward's bias, row max, exp, row
 * sum; the backward's exp(s - lse) and dS = scale * p * (dP * keep - D). exp here is the Cephes polynomial of
 * vmath.h evaluated with fused multiply-adds and vscalefps (inputs below -104, -inf included, give 0 or a
 * denormal: probability nothing).
 */
#include <math.h>
#include "attention_fused.h"
#include "cpu.h"
#include "vmath.h"

#ifdef BQ_HAVE_AVX512_BUILD
BQ_AVX512_BEGIN
#include <immintrin.h>

#if BQ_ATTN_BK != 64
#error "the fused score tiles hold a 64-key block row in four zmm registers"
#endif

static inline __m512 attn_exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(BQ_EXP_HI));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(BQ_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(BQ_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(BQ_LN2_LO), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(BQ_P0), r, _mm512_set1_ps(BQ_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(BQ_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(BQ_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(BQ_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(BQ_P5));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* loops over tile rows and vectors unroll completely, so the accumulators live in registers */
#define UNROLL _Pragma("GCC unroll 16")

/* c[m][v] = sum_k A[m*rsa + k*csa] B[k*ldb + 16v], m < MR, v < NV (MR * NV <= 16 accumulators) */
#define TILE(MR, NV, K, A, rsa, csa, B, ldb, c)                                                    \
    do {                                                                                           \
        UNROLL for (int m_ = 0; m_ < (MR); m_++)                                                   \
            UNROLL for (int v_ = 0; v_ < (NV); v_++) c[m_][v_] = _mm512_setzero_ps();              \
        for (int k_ = 0; k_ < (K); k_++) {                                                         \
            __m512 b_[4];                                                                          \
            UNROLL for (int v_ = 0; v_ < (NV); v_++) b_[v_] = _mm512_loadu_ps((B) + (long)k_ * (ldb) + 16 * v_); \
            const float *a_ = (A) + k_ * (csa);                                                    \
            UNROLL for (int m_ = 0; m_ < (MR); m_++) {                                             \
                const __m512 am_ = _mm512_set1_ps(a_[m_ * (rsa)]);                                 \
                UNROLL for (int v_ = 0; v_ < (NV); v_++) c[m_][v_] = _mm512_fmadd_ps(am_, b_[v_], c[m_][v_]); \
            }                                                                                      \
        }                                                                                          \
    } while (0)

static inline __attribute__((always_inline)) void gemm_tile(const int MR, const int NV, int K, const float *A,
                                                             long rsa, long csa, const float *B, long ldb, float *C,
                                                             long ldc, float alpha, int acc) {
    __m512 c[8][4];
    TILE(MR, NV, K, A, rsa, csa, B, ldb, c);
    const __m512 va = _mm512_set1_ps(alpha);
    UNROLL for (int m = 0; m < MR; m++)
        UNROLL for (int v = 0; v < NV; v++) {
            float *cp = C + m * ldc + 16 * v;
            _mm512_storeu_ps(cp, acc ? _mm512_add_ps(_mm512_loadu_ps(cp), c[m][v]) : _mm512_mul_ps(va, c[m][v]));
        }
}

/* Tiles: 4 rows x 64 columns (16 accumulators; 6 x 64 spills with GCC 12) for the score blocks and 64-column
 * panels, 8 rows x 32 or 16 columns otherwise. The switches pick a tile function F(MR, NV, ...) for the rows
 * left (at most 4 or 8 taken). */
#define ROWS4(F, NV, rows, ...)                                                                    \
    switch ((rows) < 4 ? (rows) : 4) {                                                             \
    case 4: F(4, NV, __VA_ARGS__); break;                                                          \
    case 3: F(3, NV, __VA_ARGS__); break;                                                          \
    case 2: F(2, NV, __VA_ARGS__); break;                                                          \
    default: F(1, NV, __VA_ARGS__); break;                                                         \
    }
#define ROWS8(F, NV, rows, ...)                                                                    \
    switch ((rows) < 8 ? (rows) : 8) {                                                             \
    case 8: F(8, NV, __VA_ARGS__); break;                                                          \
    case 7: F(7, NV, __VA_ARGS__); break;                                                          \
    case 6: F(6, NV, __VA_ARGS__); break;                                                          \
    case 5: F(5, NV, __VA_ARGS__); break;                                                          \
    default: ROWS4(F, NV, rows, __VA_ARGS__)                                                       \
    }
/* over the 16-column vectors of a 64-key block (1 .. 4) */
#define COLS4(F, nv, rows, ...)                                                                    \
    switch (nv) {                                                                                  \
    case 4: ROWS4(F, 4, rows, __VA_ARGS__) break;                                                  \
    case 3: ROWS4(F, 3, rows, __VA_ARGS__) break;                                                  \
    case 2: ROWS4(F, 2, rows, __VA_ARGS__) break;                                                  \
    default: ROWS4(F, 1, rows, __VA_ARGS__) break;                                                 \
    }

static void gemm_avx512(int M, int N, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C,
                        long ldc, float alpha, int acc) {
    int n = 0;
    for (; N - n >= 64; n += 64)
        for (int m = 0; m < M; m += 4) {
            ROWS4(gemm_tile, 4, M - m, K, A + m * rsa, rsa, csa, B + n, ldb, C + m * ldc + n, ldc, alpha, acc)
        }
    for (; n < N;) {
        const int w = N - n >= 32 ? 32 : 16;
        for (int m = 0; m < M; m += 8) {
            if (w == 32) {
                ROWS8(gemm_tile, 2, M - m, K, A + m * rsa, rsa, csa, B + n, ldb, C + m * ldc + n, ldc, alpha, acc)
            } else {
                ROWS8(gemm_tile, 1, M - m, K, A + m * rsa, rsa, csa, B + n, ldb, C + m * ldc + n, ldc, alpha, acc)
            }
        }
        n += w;
    }
}

/* The forward's tile: scores, bias, the row max against the running one, exp, stored; the row's block sum in
 * rs[m] and mx_old - mx_new in dm[m] (exp'd for all rows at once by the caller). */
static inline __attribute__((always_inline)) void fwd_tile(const int MR, const int NV, int HS, const float *q,
                                                            long ldq, const float *KT, long ldk, const float *bias,
                                                            float scale, float *S, long lds, float *mx, float *dm,
                                                            float *rs) {
    __m512 c[8][4];
    TILE(MR, NV, HS, q, ldq, 1, KT, ldk, c);
    const __m512 vs = _mm512_set1_ps(scale);
    UNROLL for (int m = 0; m < MR; m++) {
        __m512 vmax = _mm512_set1_ps(-INFINITY), vsum = _mm512_setzero_ps();
        UNROLL for (int v = 0; v < NV; v++) {
            c[m][v] = _mm512_fmadd_ps(c[m][v], vs, _mm512_loadu_ps(bias + 16 * v));
            vmax = _mm512_max_ps(vmax, c[m][v]);
        }
        const float bmax = _mm512_reduce_max_ps(vmax), mnew = mx[m] > bmax ? mx[m] : bmax;
        const __m512 vm = _mm512_set1_ps(mnew);
        UNROLL for (int v = 0; v < NV; v++) {
            const __m512 e = attn_exp16(_mm512_sub_ps(c[m][v], vm));
            _mm512_storeu_ps(S + m * lds + 16 * v, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        dm[m] = mx[m] - mnew;   /* mx = -inf: -inf, exp 0 */
        rs[m] = _mm512_reduce_add_ps(vsum);
        mx[m] = mnew;
    }
}

static void fwd_block_avx512(int mq, int nk, int HS, const float *q, long ldq, const float *KT, long ldk,
                             const float *bias, float scale, float *S, long lds, float *mx, float *l, float *O,
                             long ldo, int no) {
    float cr[BQ_ATTN_BQ + 16], rs[BQ_ATTN_BQ + 16];
    for (int m = 0; m < mq; m += 4) {
        COLS4(fwd_tile, nk / 16, mq - m, HS, q + m * ldq, ldq, KT, ldk, bias, scale, S + m * lds, lds, mx + m, cr + m,
              rs + m)
    }
    for (int m = 0; m < mq; m += 16) {   /* l = l * exp(mx_old - mx_new) + block sum, 16 rows at a time */
        const __mmask16 k = mq - m >= 16 ? 0xFFFF : (__mmask16)((1u << (mq - m)) - 1);
        const __m512 c = attn_exp16(_mm512_maskz_loadu_ps(k, cr + m));
        _mm512_mask_storeu_ps(cr + m, k, c);
        _mm512_mask_storeu_ps(l + m, k, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, l + m), c, _mm512_maskz_loadu_ps(k, rs + m)));
    }
    for (int m = 0; m < mq; m++)   /* the output rows follow their max */
        if (cr[m] != 1.0f) {
            const __m512 vc = _mm512_set1_ps(cr[m]);
            for (int d = 0; d < no; d += 16)
                _mm512_storeu_ps(O + m * ldo + d, _mm512_mul_ps(vc, _mm512_loadu_ps(O + m * ldo + d)));
        }
}

static inline __attribute__((always_inline)) void probs_tile(const int MR, const int NV, int HS, const float *q,
                                                              long ldq, const float *KT, long ldk, const float *bias,
                                                              float scale, const float *lse, float *S, long lds) {
    __m512 c[8][4], bv[4];
    TILE(MR, NV, HS, q, ldq, 1, KT, ldk, c);
    const __m512 vs = _mm512_set1_ps(scale);
    UNROLL for (int v = 0; v < NV; v++) bv[v] = _mm512_loadu_ps(bias + 16 * v);
    UNROLL for (int m = 0; m < MR; m++) {
        const __m512 L = _mm512_set1_ps(lse[m]);
        UNROLL for (int v = 0; v < NV; v++)
            _mm512_storeu_ps(S + m * lds + 16 * v, attn_exp16(_mm512_sub_ps(_mm512_fmadd_ps(c[m][v], vs, bv[v]), L)));
    }
}

static void bwd_probs_avx512(int mq, int nk, int HS, const float *q, long ldq, const float *KT, long ldk,
                             const float *bias, float scale, const float *lse, float *S, long lds) {
    for (int m = 0; m < mq; m += 4) {
        COLS4(probs_tile, nk / 16, mq - m, HS, q + m * ldq, ldq, KT, ldk, bias, scale, lse + m, S + m * lds, lds)
    }
}

static inline __attribute__((always_inline)) void dscores_tile(const int MR, const int NV, int HS, const float *dout,
                                                                long ldd, const float *VT, long ldv, const float *keep,
                                                                const float *D, float scale, float *S, float *dS,
                                                                long lds) {
    __m512 c[8][4];
    TILE(MR, NV, HS, dout, ldd, 1, VT, ldv, c);
    const __m512 vs = _mm512_set1_ps(scale);
    UNROLL for (int m = 0; m < MR; m++) {
        const __m512 d = _mm512_set1_ps(D[m]);
        UNROLL for (int v = 0; v < NV; v++) {
            const long e = m * lds + 16 * v;
            const __m512 p = _mm512_loadu_ps(S + e);
            __m512 g = c[m][v];
            if (keep) {
                const __m512 kp = _mm512_loadu_ps(keep + e);
                g = _mm512_mul_ps(g, kp);
                _mm512_storeu_ps(S + e, _mm512_mul_ps(p, kp));
            }
            _mm512_storeu_ps(dS + e, _mm512_mul_ps(_mm512_mul_ps(vs, p), _mm512_sub_ps(g, d)));
        }
    }
}

static void bwd_dscores_avx512(int mq, int nk, int HS, const float *dout, long ldd, const float *VT, long ldv,
                               const float *keep, const float *D, float scale, float *S, float *dS, long lds) {
    for (int m = 0; m < mq; m += 4) {
        COLS4(dscores_tile, nk / 16, mq - m, HS, dout + m * ldd, ldd, VT, ldv, keep ? keep + m * lds : NULL, D + m,
              scale, S + m * lds, dS + m * lds, lds)
    }
}

static const bq_attn_kernels table = {"avx512", gemm_avx512, fwd_block_avx512, bwd_probs_avx512, bwd_dscores_avx512};
BQ_AVX512_END

const bq_attn_kernels *bq_attn_avx512(void) { return &table; }
#else
const bq_attn_kernels *bq_attn_avx512(void) { return NULL; }
#endif
