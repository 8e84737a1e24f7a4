/* Fused multi-head self-attention over rows of their own lengths, what the engine trains with: FlashAttention-2
 * (Dao, 2023) on CPU cores. Nothing [T,T] is stored and nothing [T,T] is allocated.
 *
 * Per (row b, head h), T = T_b tokens, q, k, v, out [T,HS] views (row stride ld, head h's columns), keep the
 * dropout draw of element (b, h, i, j) (bq_rng numbering) and pd = dropout_p:
 *   s_ij = q_i . k_j / sqrt(HS) + (1 - mask_j) * -10000            (holes: BERT's additive rule)
 *   p_ij = exp(s_ij - m_i) / l_i,   m_i = max_j s_ij,   l_i = sum_j exp(s_ij - m_i)
 *   out_i = sum_j p_ij keep_ij / (1 - pd) v_j
 * Forward, per block of BQ queries: one pass over blocks of bk keys with a running max m_i, sum l_i and the
 * unnormalised output (online softmax: rescale by exp(m_old - m_new) when the max moves); `saved` keeps m_i (in
 * base-2 units: m_i log2(e)) and 1 / l_i, [2, NH, N] (N = off[B] - off[0] tokens): saved[h * N + t] and
 * saved[NH * N + h * N + t] for token t = off[b] - off[0] + i.
 * Backward recomputes p block by block from them (the same products in the same order: the same p), with
 * D_i = dout_i . out_i, which equals sum_j dP_ij p_ij with dropout too:
 *   dP_ij = (dout_i . v_j) keep_ij / (1 - pd),   dS_ij = p_ij (dP_ij - D_i) / sqrt(HS)
 *   dv_j = sum_i p_ij keep_ij / (1 - pd) dout_i,  dq_i = sum_j dS_ij k_j,  dk_j = sum_i dS_ij q_i
 * and regenerates each block's dropout mask from the keyed RNG (row i of a block is one contiguous slice of
 * the numbering: first = ((w_b NH + h) P + i) P + j0).
 *
 * A thread takes a whole (row, head) (a query range of it in the forward when there are too few heads for
 * the threads), longest rows first, and packs that head's operands once: K^T and V^T [HS, Tp] for the
 * products over the head dimension, and [Tp, HSp] copies padded to whole vectors (Tp, HSp multiples of 16,
 * padding zero) for the products that produce rows of HS; while it computes, it prefetches the rows of the
 * head it will likely take next. Score columns past T get bias -inf, so they take probability 0 and pass no
 * gradient. The per-element work runs through a table of kernels per instruction set (attention_fused.h;
 * AVX-512 in attention_fused_avx512.c, AVX2 and the portable reference here): register-blocked products (the
 * BLAS spends its time packing at K = HS = 32 or 64), and score tiles that hold a query's whole key block in
 * registers, so that bias, max, exp, sums and the dropout mask run on the accumulators. Scores are in base 2
 * (log2(e) folded into the scale and the bias; 2^x by a degree-5 polynomial and the exponent field).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "attention_fused.h"
#include "cpu.h"
#include "vmath.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BQ BQ_ATTN_BQ
#define BK BQ_ATTN_BK

static inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
static inline int imin(int a, int b) { return a < b ? a : b; }

/* ---- packing a head's operands ---------------------------------------------------------------------------- */

/* A head's rows are HS floats ld apart: more rows in flight than the hardware prefetcher fetches on its own
 * (without this, packing a head's K waited on memory for a tenth of the forward). */
#define PREFETCH_ROWS 8
static inline void prefetch_row(const float *row, int HS, int write) {
    for (int d = 0; d < HS; d += 16) {
        if (write) __builtin_prefetch(row + d, 1);
        else __builtin_prefetch(row + d, 0);
    }
}

/* Rows i0 .. i1-1 of a head's operands into L2, for the task this thread will likely take next: its packing then
 * finds them there instead of waiting on memory (a head's rows are HS floats ld apart, which the hardware
 * prefetchers do not follow across heads). */
static inline void prefetch_next(const float *const *arrays, int n, long o, int i0, int i1, int HS, long ld) {
    for (int a = 0; a < n; a++)
        for (int i = i0; i < i1; i++)
            for (int d = 0; d < HS; d += 16) __builtin_prefetch(arrays[a] + o + (long)i * ld + d, 0, 2);
}

/* dst[d * ldt + j] = src[j * ld + d]: a head's [T,HS] operand transposed, columns T..Tp-1 zero. */
static void pack_transposed(float *dst, long ldt, const float *src, int T, int Tp, int HS, long ld) {
    for (int j = 0; j < T; j++) {   /* rows of src read once, in order; HS rows of dst written along */
        if (j + PREFETCH_ROWS < T) prefetch_row(src + (long)(j + PREFETCH_ROWS) * ld, HS, 0);
        for (int d = 0; d < HS; d++) dst[(long)d * ldt + j] = src[(long)j * ld + d];
    }
    for (int d = 0; d < HS; d++)
        for (int j = T; j < Tp; j++) dst[(long)d * ldt + j] = 0.0f;
}

/* dst[j * HSp + d] = src[j * ld + d]: rows padded to HSp columns, rows T..Tp-1 zero */
static void pack_rows(float *dst, const float *src, int T, int Tp, int HS, int HSp, long ld) {
    for (int j = 0; j < T; j++) {
        if (j + PREFETCH_ROWS < T) prefetch_row(src + (long)(j + PREFETCH_ROWS) * ld, HS, 0);
        memcpy(dst + (long)j * HSp, src + (long)j * ld, (size_t)HS * sizeof(float));
        memset(dst + (long)j * HSp + HS, 0, (size_t)(HSp - HS) * sizeof(float));
    }
    memset(dst + (long)T * HSp, 0, (size_t)(Tp - T) * HSp * sizeof(float));
}

static void pack_generic(float *rows, float *tr, long ldt, const float *src, int T, int Tp, int HS, int HSp, long ld) {
    if (tr) pack_transposed(tr, ldt, src, T, Tp, HS, ld);
    if (rows) pack_rows(rows, src, T, Tp, HS, HSp, ld);
}

/* ---- portable kernels (what another architecture runs, and the reference in the tests) ------------------- */

static void gemm_generic(int M, int N, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C,
                         long ldc, float alpha, int acc) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n += 16) {
            float t[16] = {0};
            for (int k = 0; k < K; k++) {
                const float a = A[m * rsa + k * csa], *b = B + (long)k * ldb + n;
                for (int j = 0; j < 16; j++) t[j] = fmaf(a, b[j], t[j]);
            }
            float *c = C + m * ldc + n;
            for (int j = 0; j < 16; j++) c[j] = acc ? c[j] + t[j] : alpha * t[j];
        }
}

/* 2^x for x <= 0 (-inf included: 0): EXP2_C's polynomial on r = x - rint(x), 2^n put into the exponent field
 * (n = -127 gives the field 0: exactly 0). The vector tables compute the same. */
static inline float exp2_scalar(float x) {
    x = x > -127.0f ? x : -127.0f;
    const float n = rintf(x), r = x - n;
    float p = fmaf(fmaf(fmaf(fmaf(fmaf(EXP2_C5, r, EXP2_C4), r, EXP2_C3), r, EXP2_C2), r, EXP2_C1), r, EXP2_C0);
    const int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

/* Dropout of one block row in place, through rng.c (any alignment of the numbering). */
static inline void drop_row(float *s, int nk, int m, const bq_attn_dropout *d) {
    bq_dropout_slice(s, s, nk, d->p, d->seed, d->step, d->tensor_id, d->first + (uint64_t)m * d->P);
}

/* One pass over the rows of a forward block: s += bias; online softmax update; O rows rescaled; dropout. */
static void fwd_rows_generic(int mq, int nk, const float *bias, float *S, long lds, float *mx, float *l, float *O,
                             long ldo, int no, const bq_attn_dropout *drop) {
    for (int m = 0; m < mq; m++) {
        float *s = S + m * lds, bmax = -INFINITY, sum = 0.0f;
        for (int j = 0; j < nk; j++) {
            s[j] += bias[j];
            bmax = s[j] > bmax ? s[j] : bmax;
        }
        const float mnew = mx[m] > bmax ? mx[m] : bmax, c = exp2_scalar(mx[m] - mnew);   /* mx = -inf: c = 0 */
        for (int j = 0; j < nk; j++) sum += (s[j] = exp2_scalar(s[j] - mnew));
        l[BQ_ATTN_LANES * m] = l[BQ_ATTN_LANES * m] * c + sum;   /* lane 0 only */
        mx[m] = mnew;
        if (c != 1.0f)
            for (int d = 0; d < no; d++) O[m * ldo + d] *= c;
        if (drop) drop_row(s, nk, m, drop);
    }
}

static void fwd_block_generic(int mq, int nk, int HS, const float *q, long ldq, const float *KT, long ldk,
                              const float *bias, float scale, float *S, long lds, float *mx, float *l, float *O,
                              long ldo, int no, const bq_attn_dropout *drop) {
    gemm_generic(mq, nk, HS, q, ldq, 1, KT, ldk, S, lds, scale, 0);
    fwd_rows_generic(mq, nk, bias, S, lds, mx, l, O, ldo, no, drop);
}

static void bwd_probs_generic(int mq, int nk, int HS, const float *q, long ldq, const float *KT, long ldk,
                              const float *bias, float scale, const float *mx, const float *inv, float *S, long lds) {
    gemm_generic(mq, nk, HS, q, ldq, 1, KT, ldk, S, lds, scale, 0);
    for (int m = 0; m < mq; m++)
        for (int j = 0; j < nk; j++) S[m * lds + j] = exp2_scalar(S[m * lds + j] + bias[j] - mx[m]) * inv[m];
}

static void dscores_rows_generic(int mq, int nk, const bq_attn_dropout *drop, const float *D, float scale, float *S,
                                 float *dS, long lds) {
    float keep[BQ_ATTN_BK];
    for (int m = 0; m < mq; m++) {
        if (drop)
            bq_dropout_mask(keep, nk, drop->p, drop->seed, drop->step, drop->tensor_id,
                            drop->first + (uint64_t)m * drop->P);
        for (int j = 0; j < nk; j++) {
            const long e = m * lds + j;
            const float p = S[e], kp = drop ? keep[j] : 1.0f;
            dS[e] = scale * p * (dS[e] * kp - D[m]);
            S[e] = p * kp;
        }
    }
}

static void bwd_dscores_generic(int mq, int nk, int HS, const float *dout, long ldd, const float *VT, long ldv,
                                const bq_attn_dropout *drop, const float *D, float scale, float *S, float *dS,
                                long lds) {
    gemm_generic(mq, nk, HS, dout, ldd, 1, VT, ldv, dS, lds, 1.0f, 0);
    dscores_rows_generic(mq, nk, drop, D, scale, S, dS, lds);
}

const bq_attn_kernels bq_attn_generic = {"generic", BQ_ATTN_BK, gemm_generic, fwd_block_generic, bwd_probs_generic,
                                         bwd_dscores_generic, pack_generic};

/* ---- AVX2 + FMA ------------------------------------------------------------------------------------------- */
#ifdef __AVX2__
/* C[MR,16] from MR rows of A and a [K,16] panel of B: 2 * MR accumulators (MR = 6: 12 of the 16 registers). */
static inline __attribute__((always_inline)) void ukernel_avx2(const int MR, int K, const float *A, long rsa,
                                                                long csa, const float *B, long ldb, float *C,
                                                                long ldc, float alpha, int acc) {
    __m256 c0[6], c1[6];
    for (int m = 0; m < MR; m++) c0[m] = c1[m] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(B + (long)k * ldb), b1 = _mm256_loadu_ps(B + (long)k * ldb + 8);
        const float *a = A + k * csa;
        for (int m = 0; m < MR; m++) {
            const __m256 am = _mm256_broadcast_ss(a + m * rsa);
            c0[m] = _mm256_fmadd_ps(am, b0, c0[m]);
            c1[m] = _mm256_fmadd_ps(am, b1, c1[m]);
        }
    }
    const __m256 va = _mm256_set1_ps(alpha);
    for (int m = 0; m < MR; m++) {
        float *c = C + m * ldc;
        if (acc) {
            _mm256_storeu_ps(c, _mm256_add_ps(_mm256_loadu_ps(c), c0[m]));
            _mm256_storeu_ps(c + 8, _mm256_add_ps(_mm256_loadu_ps(c + 8), c1[m]));
        } else {
            _mm256_storeu_ps(c, _mm256_mul_ps(va, c0[m]));
            _mm256_storeu_ps(c + 8, _mm256_mul_ps(va, c1[m]));
        }
    }
}

static void gemm_avx2(int M, int N, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C,
                      long ldc, float alpha, int acc) {
    for (int n = 0; n < N; n += 16)   /* the [K,16] panel of B stays in L1 over all rows */
        for (int m = 0; m < M; m += 6) {
            const float *a = A + m * rsa, *b = B + n;
            float *c = C + m * ldc + n;
            switch (M - m < 6 ? M - m : 6) {
            case 6: ukernel_avx2(6, K, a, rsa, csa, b, ldb, c, ldc, alpha, acc); break;
            case 5: ukernel_avx2(5, K, a, rsa, csa, b, ldb, c, ldc, alpha, acc); break;
            case 4: ukernel_avx2(4, K, a, rsa, csa, b, ldb, c, ldc, alpha, acc); break;
            case 3: ukernel_avx2(3, K, a, rsa, csa, b, ldb, c, ldc, alpha, acc); break;
            case 2: ukernel_avx2(2, K, a, rsa, csa, b, ldb, c, ldc, alpha, acc); break;
            default: ukernel_avx2(1, K, a, rsa, csa, b, ldb, c, ldc, alpha, acc); break;
            }
        }
}

/* exp2_scalar on 8 lanes */
static inline __m256 exp2_8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), r = _mm256_sub_ps(x, n);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(EXP2_C5), r, _mm256_set1_ps(EXP2_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP2_C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP2_C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP2_C1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP2_C0));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* Score tiles: one query x a 64-key block row (up to 8 accumulators; 3 x 32 spilled with GCC 12, and shorter key
 * blocks cost more in the three products that follow them than the reloads of B cost here) */
#define UNROLL8 _Pragma("GCC unroll 8")
#define TILE8(NV, K, a, B, ldb, c)                                                                 \
    do {                                                                                           \
        UNROLL8 for (int v_ = 0; v_ < (NV); v_++) c[v_] = _mm256_setzero_ps();                     \
        for (int k_ = 0; k_ < (K); k_++) {                                                         \
            const float *b_ = (B) + (long)k_ * (ldb);                                              \
            const __m256 am_ = _mm256_broadcast_ss((a) + k_);                                      \
            UNROLL8 for (int v_ = 0; v_ < (NV); v_++)                                              \
                c[v_] = _mm256_fmadd_ps(am_, _mm256_loadu_ps(b_ + 8 * v_), c[v_]);                 \
        }                                                                                          \
    } while (0)
/* a tile function F(NV, ...) for the key block's nk columns (16 .. 64) */
#define COLS8(F, nk, ...)                                                                          \
    switch ((nk) / 16) {                                                                           \
    case 4: F(8, __VA_ARGS__); break;                                                              \
    case 3: F(6, __VA_ARGS__); break;                                                              \
    case 2: F(4, __VA_ARGS__); break;                                                              \
    default: F(2, __VA_ARGS__); break;                                                             \
    }

static inline __attribute__((always_inline)) void fwd_tile8(const int NV, int HS, const float *q, const float *KT,
                                                             long ldk, const float *bias, float scale, float *S,
                                                             float *mx, float *dm, float *rs) {
    __m256 c[8], vmax = _mm256_set1_ps(-INFINITY), vsum = _mm256_setzero_ps();
    TILE8(NV, HS, q, KT, ldk, c);
    const __m256 vs = _mm256_set1_ps(scale);
    UNROLL8 for (int v = 0; v < NV; v++) {
        c[v] = _mm256_fmadd_ps(c[v], vs, _mm256_loadu_ps(bias + 8 * v));
        vmax = _mm256_max_ps(vmax, c[v]);
    }
    const float bmax = bq_hmax8(vmax), mnew = *mx > bmax ? *mx : bmax;
    const __m256 vm = _mm256_set1_ps(mnew);
    UNROLL8 for (int v = 0; v < NV; v++) {
        const __m256 e = exp2_8(_mm256_sub_ps(c[v], vm));
        vsum = _mm256_add_ps(vsum, e);
        _mm256_storeu_ps(S + 8 * v, e);
    }
    *dm = *mx - mnew;   /* mx = -inf: -inf, 2^ 0 */
    _mm256_storeu_ps(rs, vsum);
    *mx = mnew;
}

static void fwd_block_avx2(int mq, int nk, int HS, const float *q, long ldq, const float *KT, long ldk,
                           const float *bias, float scale, float *S, long lds, float *mx, float *l, float *O, long ldo,
                           int no, const bq_attn_dropout *drop) {
    float cr[BQ_ATTN_BQ + 8], rs[8 * BQ_ATTN_BQ];
    for (int m = 0; m < mq; m++)
        COLS8(fwd_tile8, nk, HS, q + m * ldq, KT, ldk, bias, scale, S + m * lds, mx + m, cr + m, rs + 8 * m)
    int m = 0;
    for (; m + 8 <= mq; m += 8) _mm256_storeu_ps(cr + m, exp2_8(_mm256_loadu_ps(cr + m)));
    for (; m < mq; m++) {   /* the last rows one at a time (lane 0 of a broadcast) */
        cr[m] = _mm256_cvtss_f32(exp2_8(_mm256_set1_ps(cr[m])));
    }
    for (m = 0; m < mq; m++) {   /* the running sums (8 of the 16 lanes) and output rows follow their max */
        const __m256 vc = _mm256_set1_ps(cr[m]);
        float *lm = l + BQ_ATTN_LANES * m;
        _mm256_storeu_ps(lm, _mm256_fmadd_ps(_mm256_loadu_ps(lm), vc, _mm256_loadu_ps(rs + 8 * m)));
        if (cr[m] != 1.0f)
            for (int d = 0; d < no; d += 8)
                _mm256_storeu_ps(O + m * ldo + d, _mm256_mul_ps(vc, _mm256_loadu_ps(O + m * ldo + d)));
        if (drop) drop_row(S + m * lds, nk, m, drop);
    }
}

static inline __attribute__((always_inline)) void probs_tile8(const int NV, int HS, const float *q, const float *KT,
                                                               long ldk, const float *bias, float scale, float mx,
                                                               float inv, float *S) {
    __m256 c[8];
    TILE8(NV, HS, q, KT, ldk, c);
    const __m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(mx), vi = _mm256_set1_ps(inv);
    UNROLL8 for (int v = 0; v < NV; v++) {
        const __m256 s = _mm256_fmadd_ps(c[v], vs, _mm256_loadu_ps(bias + 8 * v));
        _mm256_storeu_ps(S + 8 * v, _mm256_mul_ps(exp2_8(_mm256_sub_ps(s, vm)), vi));
    }
}

static void bwd_probs_avx2(int mq, int nk, int HS, const float *q, long ldq, const float *KT, long ldk,
                           const float *bias, float scale, const float *mx, const float *inv, float *S, long lds) {
    for (int m = 0; m < mq; m++)
        COLS8(probs_tile8, nk, HS, q + m * ldq, KT, ldk, bias, scale, mx[m], inv[m], S + m * lds)
}

static inline __attribute__((always_inline)) void dscores_tile8(const int NV, int HS, const float *dout,
                                                                 const float *VT, long ldv, const bq_attn_dropout *drop,
                                                                 uint64_t first, float D, float scale, float *S,
                                                                 float *dS) {
    __m256 c[8];
    TILE8(NV, HS, dout, VT, ldv, c);
    const __m256 vs = _mm256_set1_ps(scale), d = _mm256_set1_ps(D);
    float keep[BQ_ATTN_BK];
    if (drop) bq_dropout_mask(keep, 8 * NV, drop->p, drop->seed, drop->step, drop->tensor_id, first);
    UNROLL8 for (int v = 0; v < NV; v++) {
        const __m256 p = _mm256_loadu_ps(S + 8 * v);
        __m256 g = c[v];
        if (drop) {
            const __m256 kp = _mm256_loadu_ps(keep + 8 * v);
            g = _mm256_mul_ps(g, kp);
            _mm256_storeu_ps(S + 8 * v, _mm256_mul_ps(p, kp));
        }
        _mm256_storeu_ps(dS + 8 * v, _mm256_mul_ps(_mm256_mul_ps(vs, p), _mm256_sub_ps(g, d)));
    }
}

static void bwd_dscores_avx2(int mq, int nk, int HS, const float *dout, long ldd, const float *VT, long ldv,
                             const bq_attn_dropout *drop, const float *D, float scale, float *S, float *dS, long lds) {
    for (int m = 0; m < mq; m++)
        COLS8(dscores_tile8, nk, HS, dout + m * ldd, VT, ldv, drop, drop ? drop->first + (uint64_t)m * drop->P : 0,
              D[m], scale, S + m * lds, dS + m * lds)
}

/* r[j] = column j of the 8 x 8 block whose rows are r[0..7] */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
        r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
    }
}

/* 8 x 8 blocks, as pack_generic writes them */
static void pack_avx2(float *rows, float *tr, long ldt, const float *src, int T, int Tp, int HS, int HSp, long ld) {
    static const int lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    for (int j0 = 0; j0 < Tp; j0 += 8) {
        for (int i = 0; i < 8 && j0 + 8 + i < T; i++)
            for (int d = 0; d < HS; d += 16) __builtin_prefetch(src + (long)(j0 + 8 + i) * ld + d);
        for (int d0 = 0; d0 < HSp; d0 += 8) {
            const int nd = HS - d0 < 8 ? (HS - d0 > 0 ? HS - d0 : 0) : 8;
            const __m256i k = _mm256_loadu_si256((const __m256i *)(lanes + 8 - nd));
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                const float *x = src + (long)(j0 + i) * ld + d0;
                r[i] = j0 + i >= T || nd == 0 ? _mm256_setzero_ps()
                       : nd == 8              ? _mm256_loadu_ps(x)
                                              : _mm256_maskload_ps(x, k);
            }
            if (rows)
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(rows + (long)(j0 + i) * HSp + d0, r[i]);
            if (tr && nd > 0) {
                transpose8(r);
                for (int i = 0; i < nd; i++) _mm256_storeu_ps(tr + (long)(d0 + i) * ldt + j0, r[i]);
            }
        }
    }
}

const bq_attn_kernels bq_attn_avx2 = {"avx2", 64, gemm_avx2, fwd_block_avx2, bwd_probs_avx2, bwd_dscores_avx2,
                                      pack_avx2};
#else
const bq_attn_kernels bq_attn_avx2 = {NULL, 0, NULL, NULL, NULL, NULL, NULL};   /* not built (named: NULL) */
#endif

/* ---- which table ------------------------------------------------------------------------------------------ */
/* The instruction set is cpu.c's choice (cpuid, BERTQA_CPU, bertqa.ops.set_isa); this maps it to a table. */

const bq_attn_kernels *bq_attn_kernels_named(const char *name) {
    if (!name) return bq_attn_kernels_best();
    if (!strcmp(name, "generic")) return &bq_attn_generic;
    if (!strcmp(name, "avx2")) return bq_attn_avx2.gemm ? &bq_attn_avx2 : NULL;
    if (!strcmp(name, "avx512")) return bq_cpu_supports(BQ_ISA_AVX512) ? bq_attn_avx512() : NULL;
    return NULL;
}

const bq_attn_kernels *bq_attn_kernels_best(void) {
    const bq_attn_kernels *k = NULL;
    if (!strcmp(bq_cpu_isa_name(), "avx512")) k = bq_attn_avx512();
    if (!k && bq_attn_avx2.gemm) k = &bq_attn_avx2;
    return k ? k : &bq_attn_generic;
}

/* ---- the driver ------------------------------------------------------------------------------------------- */

/* 64-byte aligned floats (n > 0), for a thread's scratch */
static float *floats(size_t n) {
    size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    return aligned_alloc(64, bytes ? bytes : 64);
}

/* dst[j * ld + d] = src[j * HSp + d], j < T, d < HS: a head's result rows back into its columns */
static void unpack_rows(float *dst, const float *src, int T, int HS, int HSp, long ld) {
    for (int j = 0; j < T; j++) {
        if (j + PREFETCH_ROWS < T) prefetch_row(dst + (long)(j + PREFETCH_ROWS) * ld, HS, 1);
        float *y = dst + (long)j * ld;
        const float *x = src + (long)j * HSp;
        for (int d = 0; d < HS; d++) y[d] = x[d];
    }
}

/* The score bias of the keys in base-2 units: (1 - mask) * -10000 * log2(e) for the row's keys, -inf for the
 * padding columns T..Tp-1. */
static void key_bias(float *bias, const float *mk, int T, int Tp) {
    const float hole = -10000.0f * BQ_LOG2E;
    for (int j = 0; j < T; j++) bias[j] = mk ? (1.0f - mk[j]) * hole : 0.0f;
    for (int j = T; j < Tp; j++) bias[j] = -INFINITY;
}

/* Element index of probability (b, h, 0, 0) in the dropout RNG's numbering (bq_rng). */
static inline uint64_t head_first(bq_rng r, int b, int h, int NH) {
    return (bq_rng_window(r, b) * NH + h) * (uint64_t)r.P * (uint64_t)r.P;
}

typedef struct {
    int b, h, i0, i1;   /* queries i0 .. i1-1 of row b, head h */
} attn_task;

/* Tasks over (row, head[, query range]), longest rows first (schedule(dynamic) then balances rows of different
 * lengths). A (row, head) is cut into query ranges of whole blocks only when there are fewer than 4 heads of
 * work per thread (split = 1 for backward: a task owns its head's dk, dv). NULL when out of memory. */
static attn_task *make_tasks(int B, const int *off, int NH, int split, int *ntasks, int *Tmax) {
    int *order = malloc((size_t)(B > 0 ? B : 1) * sizeof(int)), nrows = 0, n = 0;
    if (!order) return NULL;
    *Tmax = 1;
    for (int b = 0; b < B; b++) {
        const int T = off[b + 1] - off[b];
        if (T <= 0) continue;
        if (T > *Tmax) *Tmax = T;
        int at = nrows++;   /* insertion sort by length, descending (B is a batch: small) */
        while (at > 0 && off[order[at - 1] + 1] - off[order[at - 1]] < T) {
            order[at] = order[at - 1];
            at--;
        }
        order[at] = b;
    }
    const int want = 4 * bq_num_threads();
    split = split && nrows > 0 && nrows * NH < want ? (want + nrows * NH - 1) / (nrows * NH) : 1;
    for (int i = 0; i < nrows; i++) n += NH * imin(split, (off[order[i] + 1] - off[order[i]] + BQ - 1) / BQ);
    attn_task *t = malloc((size_t)(n > 0 ? n : 1) * sizeof(attn_task));
    if (t) {
        n = 0;
        for (int i = 0; i < nrows; i++) {
            const int b = order[i], T = off[b + 1] - off[b], nblk = (T + BQ - 1) / BQ, nc = imin(split, nblk);
            for (int h = 0; h < NH; h++)
                for (int c = 0; c < nc; c++)
                    t[n++] = (attn_task){b, h, imin(T, c * nblk / nc * BQ), imin(T, (c + 1) * nblk / nc * BQ)};
        }
    }
    free(order);
    *ntasks = n;
    return t;
}

size_t attention_saved_floats(int B, const int *off, int NH) { return 2 * (size_t)NH * (size_t)(off[B] - off[0]); }

/* What the kernels cannot handle: BQ_ERR_ARG (nothing is written). */
static int check_args(int B, const int *off, int NH, int HS, int ld, const float *mask, int Tpad, float p, bq_rng r) {
    if (B < 0 || NH < 1 || HS < 1 || (long)ld < (long)NH * HS || !(p >= 0.0f && p < 1.0f)) return BQ_ERR_ARG;
    for (int b = 0; b < B; b++) {
        const int T = off[b + 1] - off[b];
        if (T < 0 || (mask && T > Tpad) || (p > 0.0f && T > r.P)) return BQ_ERR_ARG;
    }
    return BQ_OK;
}

int bq_attention_forward_rows_with(const bq_attn_kernels *kern, float *out, float *saved, const float *q,
                                   const float *k, const float *v, const float *mask, int Tpad, int B,
                                   const int *off, int NH, int HS, int ld, float p, bq_rng r, uint32_t tensor_id) {
    int ntasks, Tmax, st = check_args(B, off, NH, HS, ld, mask, Tpad, p, r);
    if (st) return st;
    attn_task *tasks = make_tasks(B, off, NH, 1, &ntasks, &Tmax);
    if (!tasks) return BQ_ERR_NOMEM;
    const int HSp = round_up(HS, BQ_ATTN_VEC), Tpm = round_up(Tmax, BQ_ATTN_VEC);
    const long N = off[B] - off[0];
    const float scale = 1.0f / sqrtf((float)HS), kscale = scale * BQ_LOG2E;   /* base-2 scores */
    const int nthreads = ntasks > 1 ? bq_num_threads() : 1;
    int status = BQ_OK;
#pragma omp parallel num_threads(nthreads) if (ntasks > 1)
    {
        /* this thread's scratch: K^T [HS,Tp], V [Tp,HSp], the key bias [Tp], a score block S [BQ,BK], the output
         * block [BQ,HSp] and per query the running max and the lanes of the running sum */
        /* (K^T's rows are Tp + 16 floats apart: at T = 512 rows 2 KB apart would share a few L1 sets) */
        float *KT = floats((size_t)HS * (Tpm + 16)), *Vp = floats((size_t)Tpm * HSp), *bias = floats(Tpm);
        float *S = floats(BQ * BK), *O = floats((size_t)BQ * HSp), *ml = floats((1 + BQ_ATTN_LANES) * BQ);
        const int ok = KT && Vp && bias && S && O && ml;
        if (!ok) {
#pragma omp atomic write
            status = BQ_ERR_NOMEM;
        }
        float *mx = ml, *l = ml + BQ;   /* l: BQ_ATTN_LANES per query */
        int last_b = -1, last_h = -1;   /* the head whose operands are packed */
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < ntasks; t++) {
            if (!ok) continue;
            const int b = tasks[t].b, h = tasks[t].h, T = off[b + 1] - off[b], Tp = round_up(T, BQ_ATTN_VEC);
            const long o = (long)off[b] * ld + (long)h * HS;
            const float *qb = q + o;
            float *ob = out + o, *smx = saved ? saved + h * N + (off[b] - off[0]) : NULL, *sinv = smx + NH * N;
            if (b != last_b || h != last_h) {
                kern->pack(NULL, KT, Tp + 16, k + o, T, Tp, HS, HSp, ld);
                kern->pack(Vp, NULL, 0, v + o, T, Tp, HS, HSp, ld);
                key_bias(bias, mask ? mask + (long)b * Tpad : NULL, T, Tp);
                last_b = b, last_h = h;
            }
            bq_attn_dropout drop = {p, r.seed, r.step, tensor_id, 0, r.P};
            const uint64_t first = head_first(r, b, h, NH);
            const int tn = t + nthreads < ntasks ? t + nthreads : -1;   /* likely this thread's next task */
            const int Tn = tn < 0 ? 0 : off[tasks[tn].b + 1] - off[tasks[tn].b];
            const long on = tn < 0 ? 0 : (long)off[tasks[tn].b] * ld + (long)tasks[tn].h * HS;
            const int fresh = tn >= 0 && (tasks[tn].b != b || tasks[tn].h != h);
            const int nblk = (tasks[t].i1 - tasks[t].i0 + BQ - 1) / BQ;
            const float *next[3] = {k, v, q};
            for (int i0 = tasks[t].i0; i0 < tasks[t].i1; i0 += BQ) {
                const int mq = imin(BQ, T - i0), c = (i0 - tasks[t].i0) / BQ;
                if (fresh) prefetch_next(next, 3, on, c * Tn / nblk, (c + 1) * Tn / nblk, HS, ld);
                for (int m = 0; m < mq; m++) mx[m] = -INFINITY;
                memset(l, 0, (size_t)mq * BQ_ATTN_LANES * sizeof(float));
                memset(O, 0, (size_t)mq * HSp * sizeof(float));
                for (int j0 = 0; j0 < T; j0 += kern->bk) {
                    const int nk = imin(kern->bk, Tp - j0);
                    drop.first = first + (uint64_t)i0 * r.P + j0;
                    kern->fwd_block(mq, nk, HS, qb + (long)i0 * ld, ld, KT + j0, Tp + 16, bias + j0, kscale, S, BK, mx,
                                    l, O, HSp, HSp, p > 0.0f ? &drop : NULL);
                    kern->gemm(mq, HSp, nk, S, BK, 1, Vp + (long)j0 * HSp, HSp, O, HSp, 1.0f, 1);   /* O += S v */
                }
                for (int m = 0; m < mq; m++) {
                    float sum = 0.0f;
                    for (int e = 0; e < BQ_ATTN_LANES; e++) sum += l[BQ_ATTN_LANES * m + e];
                    const float inv = 1.0f / sum;
                    float *orow = ob + (long)(i0 + m) * ld;
                    if (m + PREFETCH_ROWS < mq) prefetch_row(orow + PREFETCH_ROWS * ld, HS, 1);
                    for (int d = 0; d < HS; d++) orow[d] = O[m * HSp + d] * inv;
                    if (smx) smx[i0 + m] = mx[m], sinv[i0 + m] = inv;
                }
            }
        }
        free(KT); free(Vp); free(bias); free(S); free(O); free(ml);
    }
    free(tasks);
    return status;
}

int bq_attention_backward_rows_with(const bq_attn_kernels *kern, float *dq, float *dk, float *dv, const float *dout,
                                    const float *out, const float *saved, const float *q, const float *k,
                                    const float *v, const float *mask, int Tpad, int B, const int *off, int NH,
                                    int HS, int ld, float p, bq_rng r, uint32_t tensor_id) {
    int ntasks, Tmax, st = check_args(B, off, NH, HS, ld, mask, Tpad, p, r);
    if (st || !saved) return st ? st : BQ_ERR_ARG;
    attn_task *tasks = make_tasks(B, off, NH, 0, &ntasks, &Tmax);
    if (!tasks) return BQ_ERR_NOMEM;
    const int HSp = round_up(HS, BQ_ATTN_VEC), Tpm = round_up(Tmax, BQ_ATTN_VEC);
    const long N = off[B] - off[0];
    const size_t TH = (size_t)Tpm * HSp;
    const float scale = 1.0f / sqrtf((float)HS), kscale = scale * BQ_LOG2E;   /* base-2 scores */
    const int nthreads = ntasks > 1 ? bq_num_threads() : 1;
    int status = BQ_OK;
#pragma omp parallel num_threads(nthreads) if (ntasks > 1)
    {
        /* this thread's scratch: K^T, V^T [HS,Tp]; q, k, dout and the three gradient accumulators [Tp,HSp]; the
         * key bias and D [Tp]; the blocks S and dP [BQ,BK] */
        float *KT = floats((size_t)HS * (Tpm + 16)), *VT = floats((size_t)HS * (Tpm + 16)), *rows = floats(6 * TH);
        float *vec = floats(2 * (size_t)Tpm), *blk = floats(2 * BQ * BK);
        const int ok = KT && VT && rows && vec && blk;
        if (!ok) {
#pragma omp atomic write
            status = BQ_ERR_NOMEM;
        }
        float *Qp = rows, *Kp = rows + TH, *dOp = rows + 2 * TH, *dQa = rows + 3 * TH, *dKa = rows + 4 * TH;
        float *dVa = rows + 5 * TH, *bias = vec, *D = vec + Tpm, *S = blk, *dP = blk + BQ * BK;
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < ntasks; t++) {
            if (!ok) continue;
            const int b = tasks[t].b, h = tasks[t].h, T = off[b + 1] - off[b], Tp = round_up(T, BQ_ATTN_VEC);
            const long o = (long)off[b] * ld + (long)h * HS;
            const float *qb = q + o, *dob = dout + o, *smx = saved + h * N + (off[b] - off[0]), *sinv = smx + NH * N;
            kern->pack(Kp, KT, Tp + 16, k + o, T, Tp, HS, HSp, ld);
            kern->pack(NULL, VT, Tp + 16, v + o, T, Tp, HS, HSp, ld);
            kern->pack(Qp, NULL, 0, qb, T, Tp, HS, HSp, ld);
            kern->pack(dOp, NULL, 0, dob, T, Tp, HS, HSp, ld);
            memset(dQa, 0, (size_t)Tp * HSp * sizeof(float));
            memset(dKa, 0, (size_t)Tp * HSp * sizeof(float));
            memset(dVa, 0, (size_t)Tp * HSp * sizeof(float));
            key_bias(bias, mask ? mask + (long)b * Tpad : NULL, T, Tp);
            for (int i = 0; i < T; i++) {   /* D = rowsum(dout * out), dout from its packed copy */
                const float *g = dOp + (long)i * HSp, *y = out + o + (long)i * ld;
                if (i + PREFETCH_ROWS < T) prefetch_row(y + PREFETCH_ROWS * ld, HS, 0);
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < HS; d++) s += g[d] * y[d];
                D[i] = s;
            }
            bq_attn_dropout drop = {p, r.seed, r.step, tensor_id, 0, r.P};
            const uint64_t first = head_first(r, b, h, NH);
            const int tn = t + nthreads < ntasks ? t + nthreads : -1;   /* likely this thread's next task */
            const int Tn = tn < 0 ? 0 : off[tasks[tn].b + 1] - off[tasks[tn].b], nblk = (T + BQ - 1) / BQ;
            const long on = tn < 0 ? 0 : (long)off[tasks[tn].b] * ld + (long)tasks[tn].h * HS;
            const float *next[5] = {k, v, q, dout, out};
            for (int i0 = 0; i0 < T; i0 += BQ) {
                const int mq = imin(BQ, T - i0), c = i0 / BQ;
                if (tn >= 0) prefetch_next(next, 5, on, c * Tn / nblk, (c + 1) * Tn / nblk, HS, ld);
                for (int j0 = 0; j0 < T; j0 += kern->bk) {
                    const int nk = imin(kern->bk, Tp - j0);
                    drop.first = first + (uint64_t)i0 * r.P + j0;
                    kern->bwd_probs(mq, nk, HS, qb + (long)i0 * ld, ld, KT + j0, Tp + 16, bias + j0, kscale, smx + i0,
                                    sinv + i0, S, BK);
                    kern->bwd_dscores(mq, nk, HS, dob + (long)i0 * ld, ld, VT + j0, Tp + 16, p > 0.0f ? &drop : NULL,
                                      D + i0, scale, S, dP, BK);
                    /* dv[J] += S^T dout[I]; dk[J] += dS^T q[I]; dq[I] += dS k[J] */
                    kern->gemm(nk, HSp, mq, S, 1, BK, dOp + (long)i0 * HSp, HSp, dVa + (long)j0 * HSp, HSp, 1.0f, 1);
                    kern->gemm(nk, HSp, mq, dP, 1, BK, Qp + (long)i0 * HSp, HSp, dKa + (long)j0 * HSp, HSp, 1.0f, 1);
                    kern->gemm(mq, HSp, nk, dP, BK, 1, Kp + (long)j0 * HSp, HSp, dQa + (long)i0 * HSp, HSp, 1.0f, 1);
                }
            }
            unpack_rows(dq + o, dQa, T, HS, HSp, ld);
            unpack_rows(dk + o, dKa, T, HS, HSp, ld);
            unpack_rows(dv + o, dVa, T, HS, HSp, ld);
        }
        free(KT); free(VT); free(rows); free(vec); free(blk);
    }
    free(tasks);
    return status;
}

const bq_attn_bf16_kernels *bq_attn_bf16_best(void) {
    return bq_cpu_has_avx512_bf16() && bq_attn_kernels_best() == bq_attn_avx512() ? bq_attn_bf16() : NULL;
}

int bq_attention_forward_rows_bf16(const bq_attn_bf16_kernels *kb, float *out, const float *q, const float *k,
                                   const float *v, const float *mask, int Tpad, int B, const int *off, int NH, int HS,
                                   int ld) {
    const bq_rng none = {0, 0, NULL, 0};
    int ntasks, Tmax, st = check_args(B, off, NH, HS, ld, mask, Tpad, 0.0f, none);
    if (st) return st;
    if (!kb) return BQ_ERR_ARG;
    attn_task *tasks = make_tasks(B, off, NH, 1, &ntasks, &Tmax);
    if (!tasks) return BQ_ERR_NOMEM;
    const int HSp = round_up(HS, BQ_ATTN_VEC), HSw = (HS + 1) / 2, Tpm = round_up(Tmax, BQ_ATTN_VEC);
    const float kscale = BQ_LOG2E / sqrtf((float)HS);   /* base-2 scores */
    const int nthreads = ntasks > 1 ? bq_num_threads() : 1;
    int status = BQ_OK;
#pragma omp parallel num_threads(nthreads) if (ntasks > 1)
    {
        /* this thread's scratch (words are floats' size): K^T words [HSw, Tp + 16], V words [Tp/2 + 16, HSp], the
         * key bias [Tp], a block's query words [BQ, HSw] and probabilities [BQ, BK/2], the output block [BQ, HSp],
         * per query the running max and the lanes of the running sum */
        uint32_t *KTw = (uint32_t *)floats((size_t)HSw * (Tpm + 16)), *Vw = (uint32_t *)floats((size_t)(Tpm / 2 + 16) * HSp);
        uint32_t *qw = (uint32_t *)floats((size_t)BQ * HSw), *Sw = (uint32_t *)floats(BQ * BK / 2);
        float *bias = floats(Tpm), *O = floats((size_t)BQ * HSp), *ml = floats((1 + BQ_ATTN_LANES) * BQ);
        const int ok = KTw && Vw && qw && Sw && bias && O && ml;
        if (!ok) {
#pragma omp atomic write
            status = BQ_ERR_NOMEM;
        }
        float *mx = ml, *l = ml + BQ;
        int last_b = -1, last_h = -1;
#pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < ntasks; t++) {
            if (!ok) continue;
            const int b = tasks[t].b, h = tasks[t].h, T = off[b + 1] - off[b], Tp = round_up(T, BQ_ATTN_VEC);
            const long o = (long)off[b] * ld + (long)h * HS;
            if (b != last_b || h != last_h) {
                kb->pack_kt(KTw, Tp + 16, k + o, T, Tp, HS, ld);
                kb->pack_v(Vw, v + o, T, Tp, HS, HSp, ld);
                key_bias(bias, mask ? mask + (long)b * Tpad : NULL, T, Tp);
                last_b = b, last_h = h;
            }
            for (int i0 = tasks[t].i0; i0 < tasks[t].i1; i0 += BQ) {
                const int mq = imin(BQ, T - i0);
                kb->pack_q(qw, q + o + (long)i0 * ld, mq, HS, ld);
                for (int m = 0; m < mq; m++) mx[m] = -INFINITY;
                memset(l, 0, (size_t)mq * BQ_ATTN_LANES * sizeof(float));
                memset(O, 0, (size_t)mq * HSp * sizeof(float));
                for (int j0 = 0; j0 < T; j0 += BK) {
                    const int nk = imin(BK, Tp - j0);
                    kb->fwd_block(mq, nk, HS, qw, KTw + j0, Tp + 16, bias + j0, kscale, Vw + (long)(j0 / 2) * HSp, HSp,
                                  mx, l, O, Sw);
                }
                for (int m = 0; m < mq; m++) {
                    float sum = 0.0f;
                    for (int e = 0; e < BQ_ATTN_LANES; e++) sum += l[BQ_ATTN_LANES * m + e];
                    const float inv = 1.0f / sum;
                    float *orow = out + o + (long)(i0 + m) * ld;
                    for (int d = 0; d < HS; d++) orow[d] = O[m * HSp + d] * inv;
                }
            }
        }
        free(KTw); free(Vw); free(qw); free(Sw); free(bias); free(O); free(ml);
    }
    free(tasks);
    return status;
}

int attention_forward_rows(float *out, float *saved, const float *q, const float *k, const float *v,
                           const float *mask, int Tpad, int B, const int *off, int NH, int HS, int ld, float p,
                           bq_rng r, uint32_t tensor_id) {
    return bq_attention_forward_rows_with(bq_attn_kernels_best(), out, saved, q, k, v, mask, Tpad, B, off, NH, HS, ld,
                                          p, r, tensor_id);
}

int attention_backward_rows(float *dq, float *dk, float *dv, const float *dout, const float *out, const float *saved,
                            const float *q, const float *k, const float *v, const float *mask, int Tpad, int B,
                            const int *off, int NH, int HS, int ld, float p, bq_rng r, uint32_t tensor_id) {
    return bq_attention_backward_rows_with(bq_attn_kernels_best(), dq, dk, dv, dout, out, saved, q, k, v, mask, Tpad,
                                           B, off, NH, HS, ld, p, r, tensor_id);
}
