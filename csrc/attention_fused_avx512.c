/* AVX-512 kernels of the fused attention (the table of attention_fused.h), compiled for AVX-512 whatever the
 * build's -m flags say (cpu.h's BQ_AVX512_BEGIN) and used when cpu.c has chosen AVX-512 (cpuid, BERTQA_CPU,
 * bertqa.ops.set_isa).
 *
 * The score products keep whole block rows in registers (4 queries x 64 keys = 16 of the 32 zmm registers), so
 * the softmax runs on the accumulators before anything is stored: the forward's bias, row max, exp, the row's
 * sum (kept as 16 lanes, added up once at the end) and the dropout mask; the backward's exp(s - lse) and
 * dS = scale * p * (dP * keep - D). Scores are in base 2 (log2(e) folded into the scale and the bias by the
 * driver), so exp is 2^x = 2^n * poly5(x - n), attention_fused.c's polynomial, and vscalefps. The dropout masks come from
 * Philox4x32-10 computed here, sixteen blocks (one 64-key block row) per call, the numbering and threshold of
 * rng.c, so they are its masks bit for bit; rows whose numbering does not start on a multiple of 4 (P % 4 != 0,
 * only the ops API makes those) go through rng.c instead.
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

#include "attention_avx512.h"

/* ---- dropout masks: rng.c's numbering (element e = lane e % 4 of Philox block e / 4) ------------------------- */

#include "philox_avx512.h"

/* keep[q] bit t: element first + 16 q + t is kept (first a multiple of 4: sixteen whole Philox blocks). */
static inline void keep64(__mmask16 keep[4], const bq_attn_dropout *d, uint64_t first, __m512i thr_minus_1) {
    __m512i w[4];
    philox16(w, d->seed, d->step, d->tensor_id, first / 4);
    for (int q = 0; q < 4; q++) keep[q] = _mm512_cmpgt_epi32_mask(_mm512_srli_epi32(w[q], 8), thr_minus_1);
}

/* keep = (word >> 8) >= ceil(p 2^24), compared as (word >> 8) > thr - 1: rng.c's threshold */
static inline __m512i keep_threshold(float p) { return _mm512_set1_epi32((int)ceil((double)p * 16777216.0) - 1); }
static inline int aligned_numbering(const bq_attn_dropout *d) { return d->first % 4 == 0 && d->P % 4 == 0; }

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
 * panels (ROWS4, COLS4: attention_avx512.h), 8 rows x 32 or 16 columns otherwise. The switches pick a tile
 * function F(MR, NV, ...) for the rows left (at most 4 or 8 taken). */
#define ROWS8(F, NV, rows, ...)                                                                    \
    switch ((rows) < 8 ? (rows) : 8) {                                                             \
    case 8: F(8, NV, __VA_ARGS__); break;                                                          \
    case 7: F(7, NV, __VA_ARGS__); break;                                                          \
    case 6: F(6, NV, __VA_ARGS__); break;                                                          \
    case 5: F(5, NV, __VA_ARGS__); break;                                                          \
    default: ROWS4(F, NV, rows, __VA_ARGS__)                                                       \
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

/* The forward's tile: scores, bias, the row max against the running one, 2^(s - max) (times the dropout mask
 * when drop is given: the row's sum takes the undropped values), stored; the row's block sum as 16 lanes in
 * rs[16 m ..] and mx_old - mx_new in dm[m] (2^ taken for all rows at once by the caller). */
static inline __attribute__((always_inline)) void fwd_tile(const int MR, const int NV, int HS, const float *q,
                                                            long ldq, const float *KT, long ldk, const float *bias,
                                                            float scale, float *S, long lds, float *mx, float *dm,
                                                            float *rs, const bq_attn_dropout *drop, uint64_t first,
                                                            __m512i thr_minus_1, __m512 vkeep) {
    __m512 c[8][4];
    TILE(MR, NV, HS, q, ldq, 1, KT, ldk, c);
    const __m512 vs = _mm512_set1_ps(scale);
    UNROLL for (int m = 0; m < MR; m++) {
        __m512 vsum = _mm512_setzero_ps();
        const float mnew = scores_max(NV, c[m], vs, bias, mx[m]);
        const __m512 vm = _mm512_set1_ps(mnew);
        __mmask16 keep[4];
        if (drop) keep64(keep, drop, first + (uint64_t)m * drop->P, thr_minus_1);
        UNROLL for (int v = 0; v < NV; v++) {
            const __m512 e = exp2_16(_mm512_sub_ps(c[m][v], vm));
            vsum = _mm512_add_ps(vsum, e);
            _mm512_storeu_ps(S + m * lds + 16 * v, drop ? _mm512_maskz_mul_ps(keep[v], e, vkeep) : e);
        }
        dm[m] = mx[m] - mnew;   /* mx = -inf: -inf, 2^ 0 */
        _mm512_storeu_ps(rs + 16 * m, vsum);
        mx[m] = mnew;
    }
}

static void fwd_block_avx512(int mq, int nk, int HS, const float *q, long ldq, const float *KT, long ldk,
                             const float *bias, float scale, float *S, long lds, float *mx, float *l, float *O,
                             long ldo, int no, const bq_attn_dropout *drop) {
    float cr[BQ_ATTN_BQ + 16], rs[16 * (BQ_ATTN_BQ + 4)];
    const bq_attn_dropout *inl = drop && aligned_numbering(drop) ? drop : NULL;   /* masks made here */
    const __m512i thr = keep_threshold(drop ? drop->p : 0.0f);
    const __m512 vkeep = _mm512_set1_ps(drop ? 1.0f / (1.0f - drop->p) : 1.0f);
    for (int m = 0; m < mq; m += 4) {
        COLS4(fwd_tile, nk / 16, mq - m, HS, q + m * ldq, ldq, KT, ldk, bias, scale, S + m * lds, lds, mx + m, cr + m,
              rs + 16 * m, inl, inl ? inl->first + (uint64_t)m * inl->P : 0, thr, vkeep)
    }
    rescale_rows(mq, cr, l, rs, O, ldo, no);   /* the running sums and output rows follow their max */
    for (int m = 0; m < mq && drop && !inl; m++)
        bq_dropout_slice(S + m * lds, S + m * lds, nk, drop->p, drop->seed, drop->step, drop->tensor_id,
                         drop->first + (uint64_t)m * drop->P);
}

static inline __attribute__((always_inline)) void probs_tile(const int MR, const int NV, int HS, const float *q,
                                                              long ldq, const float *KT, long ldk, const float *bias,
                                                              float scale, const float *mx, const float *inv,
                                                              float *S, long lds) {
    __m512 c[8][4], bv[4];
    TILE(MR, NV, HS, q, ldq, 1, KT, ldk, c);
    const __m512 vs = _mm512_set1_ps(scale);
    UNROLL for (int v = 0; v < NV; v++) bv[v] = _mm512_loadu_ps(bias + 16 * v);
    UNROLL for (int m = 0; m < MR; m++) {
        const __m512 vm = _mm512_set1_ps(mx[m]), vi = _mm512_set1_ps(inv[m]);
        UNROLL for (int v = 0; v < NV; v++) {
            const __m512 s = _mm512_fmadd_ps(c[m][v], vs, bv[v]);
            _mm512_storeu_ps(S + m * lds + 16 * v, _mm512_mul_ps(exp2_16(_mm512_sub_ps(s, vm)), vi));
        }
    }
}

static void bwd_probs_avx512(int mq, int nk, int HS, const float *q, long ldq, const float *KT, long ldk,
                             const float *bias, float scale, const float *mx, const float *inv, float *S, long lds) {
    for (int m = 0; m < mq; m += 4) {
        COLS4(probs_tile, nk / 16, mq - m, HS, q + m * ldq, ldq, KT, ldk, bias, scale, mx + m, inv + m, S + m * lds,
              lds)
    }
}

static inline __attribute__((always_inline)) void dscores_tile(const int MR, const int NV, int HS, const float *dout,
                                                                long ldd, const float *VT, long ldv,
                                                                const bq_attn_dropout *drop, uint64_t first,
                                                                __m512i thr_minus_1, __m512 vkeep, const float *D,
                                                                float scale, float *S, float *dS, long lds) {
    __m512 c[8][4];
    TILE(MR, NV, HS, dout, ldd, 1, VT, ldv, c);
    const __m512 vs = _mm512_set1_ps(scale);
    UNROLL for (int m = 0; m < MR; m++) {
        const __m512 d = _mm512_set1_ps(D[m]);
        __mmask16 keep[4];
        if (drop) keep64(keep, drop, first + (uint64_t)m * drop->P, thr_minus_1);
        UNROLL for (int v = 0; v < NV; v++) {
            const long e = m * lds + 16 * v;
            const __m512 p = _mm512_loadu_ps(S + e);
            __m512 g = c[m][v];
            if (drop) {
                g = _mm512_maskz_mul_ps(keep[v], g, vkeep);
                _mm512_storeu_ps(S + e, _mm512_maskz_mul_ps(keep[v], p, vkeep));
            }
            _mm512_storeu_ps(dS + e, _mm512_mul_ps(_mm512_mul_ps(vs, p), _mm512_sub_ps(g, d)));
        }
    }
}

/* The rows of a block whose numbering is not on a multiple of 4: the masks from rng.c, applied after the tiles. */
static void dscores_rows_rng(int mq, int nk, const bq_attn_dropout *drop, const float *D, float scale, float *S,
                             float *dS, long lds) {
    float keep[BQ_ATTN_BK];
    const __m512 vs = _mm512_set1_ps(scale);
    for (int m = 0; m < mq; m++) {
        bq_dropout_mask(keep, nk, drop->p, drop->seed, drop->step, drop->tensor_id,
                        drop->first + (uint64_t)m * drop->P);
        const __m512 d = _mm512_set1_ps(D[m]);
        for (int j = 0; j < nk; j += 16) {
            const long e = m * lds + j;
            const __m512 p = _mm512_loadu_ps(S + e), kp = _mm512_loadu_ps(keep + j);
            const __m512 g = _mm512_mul_ps(_mm512_loadu_ps(dS + e), kp);
            _mm512_storeu_ps(dS + e, _mm512_mul_ps(_mm512_mul_ps(vs, p), _mm512_sub_ps(g, d)));
            _mm512_storeu_ps(S + e, _mm512_mul_ps(p, kp));
        }
    }
}

static void bwd_dscores_avx512(int mq, int nk, int HS, const float *dout, long ldd, const float *VT, long ldv,
                               const bq_attn_dropout *drop, const float *D, float scale, float *S, float *dS,
                               long lds) {
    if (drop && !aligned_numbering(drop)) {
        gemm_avx512(mq, nk, HS, dout, ldd, 1, VT, ldv, dS, lds, 1.0f, 0);
        dscores_rows_rng(mq, nk, drop, D, scale, S, dS, lds);
        return;
    }
    const __m512i thr = keep_threshold(drop ? drop->p : 0.0f);
    const __m512 vkeep = _mm512_set1_ps(drop ? 1.0f / (1.0f - drop->p) : 1.0f);
    for (int m = 0; m < mq; m += 4) {
        COLS4(dscores_tile, nk / 16, mq - m, HS, dout + m * ldd, ldd, VT, ldv, drop,
              drop ? drop->first + (uint64_t)m * drop->P : 0, thr, vkeep, D + m, scale, S + m * lds, dS + m * lds, lds)
    }
}

/* r[j] = column j of the 16 x 16 block whose rows are r[0..15] (unpack, shuffle within 128-bit lanes, then two
 * rounds of 128-bit lane shuffles). */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {   /* r[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i+3 */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int c = 0; c < 4; c++) {
        t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);        /* lanes 0, 2 of both */
        t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);    /* lanes 1, 3 */
        t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
        t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xDD);
        r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);
        r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xDD);
    }
}

/* 16 x 16 blocks: 16 rows read (the next 16 prefetched), written as padded rows and/or transposed in registers. */
static void pack_avx512(float *rows, float *tr, long ldt, const float *src, int T, int Tp, int HS, int HSp, long ld) {
    for (int j0 = 0; j0 < Tp; j0 += 16) {
        for (int i = 0; i < 16 && j0 + 16 + i < T; i++)
            for (int d = 0; d < HS; d += 16) __builtin_prefetch(src + (long)(j0 + 16 + i) * ld + d);
        for (int d0 = 0; d0 < HSp; d0 += 16) {
            const int nd = HS - d0 < 16 ? HS - d0 : 16;
            const __mmask16 k = (__mmask16)((1u << nd) - 1);
            __m512 r[16];
            for (int i = 0; i < 16; i++) {
                const float *x = src + (long)(j0 + i) * ld + d0;
                r[i] = j0 + i >= T ? _mm512_setzero_ps() : nd == 16 ? _mm512_loadu_ps(x) : _mm512_maskz_loadu_ps(k, x);
            }
            if (rows)
                for (int i = 0; i < 16; i++) _mm512_storeu_ps(rows + (long)(j0 + i) * HSp + d0, r[i]);
            if (tr) {
                transpose16(r);
                for (int i = 0; i < nd; i++) _mm512_storeu_ps(tr + (long)(d0 + i) * ldt + j0, r[i]);
            }
        }
    }
}

static const bq_attn_kernels table = {"avx512", BQ_ATTN_BK, gemm_avx512, fwd_block_avx512, bwd_probs_avx512,
                                      bwd_dscores_avx512, pack_avx512};
BQ_AVX512_END

const bq_attn_kernels *bq_attn_avx512(void) { return &table; }
#else
const bq_attn_kernels *bq_attn_avx512(void) { return NULL; }
#endif
