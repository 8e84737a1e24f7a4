/* Low-precision matrix products on AVX-512 BF16 and VNNI: the engine's bf16 and int8 paths (cpu.h,
 * bq_lowp_kernels). Compiled for those instructions by a target pragma, called only through cpu.c's table when
 * cpuid says the CPU has them.
 *
 * Both products are blocked the GotoBLAS way. The B operand (the weights, or an activation for dW) is packed
 * whole into panels of NR = 32 columns: bf16 pairs (k, k+1) of a column side by side ([K/2][32][2]), int8
 * quads ([K/4][32][4]), so one 64-byte load holds 16 columns' next 2 (4) products. Each thread packs blocks of
 * MC rows x KC columns of A into micro-panels of MR = 12 rows ([k/2][12] words: one 32-bit broadcast per row
 * and step), rounding to bf16 (or quantizing to u8) as it packs. The micro-kernel keeps a 12 x 32 tile of C
 * in 24 zmm registers: per step two loads of B, twelve broadcasts of A and 24 vdpbf16ps / vpdpbusd.
 *
 * bf16: C (beta 0 or 1) += A B with A and B rounded to bf16 (round to nearest even, vcvtne2ps2bf16) and the
 * products summed in fp32 (vdpbf16ps: two products per lane per step). K longer than KC is summed block by
 * block into C.
 *
 * int8 (inference): B = W^T, W [N,K] quantized per output channel when packed: sw[n] = max|W[n,:]| / 127,
 * q = round(W / sw) in [-127, 127]. A is quantized to u8 (vpdpbusd multiplies u8 by s8) per row (one scale per
 * token) or per tensor as it is packed, asymmetrically (the range [lo, hi] of the values and 0, in 255 steps:
 * GELU's outputs lie in [-0.17, hi], half of a symmetric range would go unused): sa = (hi - lo) / 255,
 * za = round(-lo / sa), qa = round(a / sa) + za in [0, 255], so
 * C[m,n] = sa[m] sw[n] (sum_k qa qw - za[m] sum_k qw[n,k]); the column sums are kept at packing.
 * int32 cannot overflow: |sum| <= 255 * 127 * K < 2^31 for K < 66,000 (the driver refuses more).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bertqa.h"
#include "cpu.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef BQ_HAVE_AVX512_BUILD

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vnni"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vnni")
#endif

#include "bf16_avx512.h"

#define MR 12
#define NR 32
#define KC 768   /* k per block of A (bf16): 96 x 768 x 2 bytes = 144 KB of packed A per thread, in L2 */
#define MC 96    /* rows per block of A, a multiple of MR */

/* One growing scratch buffer per thread (the A blocks; the B operand of a call that packs it). Kept for the
 * thread's life: the next call of the same size allocates nothing. */
static _Thread_local void *tl_buf[2];
static _Thread_local size_t tl_cap[2];

static void *scratch(int which, size_t bytes) {
    if (bytes > tl_cap[which]) {
        free(tl_buf[which]);
        tl_buf[which] = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
        tl_cap[which] = tl_buf[which] ? bytes : 0;
    }
    return tl_buf[which];
}

/* ---- bf16 packing ---------------------------------------------------------------------------------------- */

size_t bf16_packed_elems_avx512(int K, int N) { return (size_t)((N + NR - 1) / NR) * (size_t)((K + 1) / 2) * NR * 2; }

/* Panels jp0 .. jp1-1 of B [K,N] (B[k,n] = transB ? B[n*ldb + k] : B[k*ldb + n]) into dst, laid out
 * [panel][K/2][32][2] bf16; columns past N and the odd k past K are zero. */
static void bf16_pack_b_panels(uint16_t *dst, const float *B, long ldb, int transB, int K, int N, int jp0, int jp1) {
    const int Kw = (K + 1) / 2;
    for (int jp = jp0; jp < jp1; jp++) {
        uint32_t *P = (uint32_t *)(dst + (size_t)jp * Kw * NR * 2);
        const int n0 = jp * NR, nn = N - n0 < NR ? N - n0 : NR;
        if (!transB) {   /* rows k and k+1 run along n: convert both and interleave */
            for (int kw = 0; kw < Kw; kw++) {
                const float *r0 = B + (long)(2 * kw) * ldb + n0, *r1 = r0 + ldb;
                const int has1 = 2 * kw + 1 < K;
                for (int h = 0; h < 2; h++) {
                    const int n = nn - 16 * h;
                    __m256i lo = bq_bf16x16(r0 + 16 * h, n), hi = has1 ? bq_bf16x16(r1 + 16 * h, n) : _mm256_setzero_si256();
                    bq_bf16_interleave16(P + (size_t)kw * NR + 16 * h, lo, hi);
                }
            }
        } else {   /* column n of B is row n of W: its pairs are consecutive; scatter them 32 words apart */
            if (nn < NR) memset(P, 0, (size_t)Kw * NR * 4);
            for (int j = 0; j < nn; j++) {
                const float *w = B + (long)(n0 + j) * ldb;
                for (int k0 = 0; k0 < K; k0 += 32) {
                    const int kn = K - k0, nw = (kn >= 32 ? 32 : kn + 1) / 2;
                    uint32_t t[16];
                    bq_bf16_words(t, w + k0, kn, nw);
                    for (int i = 0; i < nw; i++) P[(size_t)(k0 / 2 + i) * NR + j] = t[i];
                }
            }
        }
    }
}

void bf16_pack_b_avx512(uint16_t *dst, const float *B, long ldb, int transB, int K, int N) {
    const int np = (N + NR - 1) / NR;
    const int nt = (long)K * N > 65536 ? bq_num_threads() : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int jp = 0; jp < np; jp++) bf16_pack_b_panels(dst, B, ldb, transB, K, N, jp, jp + 1);
}

/* A micro-panel holds MR rows x KCW words (pairs of k) of A, in one of two layouts, whichever its source writes
 * without a transpose: by rows (A row-major: word (r, k) at r * KCW + k, each row converted in one sweep) or by
 * columns (A transposed, the dW product: word (r, k) at k * MR + r, two source rows interleaved into MR words).
 * Both strides are constants, so the micro-kernel's twelve broadcasts address with immediates. */
#define KCW (KC / 2)
#define PANEL_WORDS (MR * KCW)

/* Micro-panels of rows i0 .. i0+mr-1 (mr <= MC), k = 2 kw0 .. 2 (kw0 + kwn) - 1 of A (A[m,k] = transA ?
 * A[k*lda + m] : A[m*lda + k]) into Ap (PANEL_WORDS each); rows past M and k past K are zero. */
static void bf16_pack_a(uint32_t *Ap, const float *A, long lda, int transA, int M, int K, int i0, int mr, int kw0,
                        int kwn) {
    const int k0 = 2 * kw0;
    for (int p = 0; p < mr; p += MR) {
        uint32_t *P = Ap + (size_t)(p / MR) * PANEL_WORDS;
        const int rows = mr - p < MR ? mr - p : MR;
        if (!transA) {   /* by rows */
            for (int r = 0; r < MR; r++) {
                uint32_t *w = P + (size_t)r * KCW;
                if (r >= rows) {
                    memset(w, 0, (size_t)kwn * 4);
                    continue;
                }
                bq_bf16_words(w, A + (long)(i0 + p + r) * lda + k0, K - k0, kwn);   /* K - k0: real k left */
            }
        } else {   /* by columns: rows k and k+1 of the source run along m */
            for (int kw = 0; kw < kwn; kw++) {
                const int k = k0 + 2 * kw;
                const float *r0 = A + (long)k * lda + i0 + p, *r1 = r0 + lda;
                __m256i lo = k < K ? bq_bf16x16(r0, rows) : _mm256_setzero_si256();
                __m256i hi = k + 1 < K ? bq_bf16x16(r1, rows) : _mm256_setzero_si256();
                uint32_t t[16];
                bq_bf16_interleave16(t, lo, hi);
                memcpy(P + (size_t)kw * MR, t, MR * 4);
            }
        }
    }
}

/* ---- micro-kernels ---------------------------------------------------------------------------------------- */

/* C[mr, nr] (rows ldc apart) = (or +=, acc) the 12 x 32 product of one A micro-panel (word (r, k) at
 * A[k * ak + r * ar]) and one B panel [kw][32][2], plus bias[0 .. nr) when not acc and bias is given; then, with
 * gelu, GELU of the sum (vmath_avx512.h's bq_gelu16, bit for bit gelu_forward's) */
static inline __attribute__((always_inline)) void kernel_bf16(const int ak, const int ar, int kw, const uint32_t *A,
                                                               const uint16_t *B, float *C, long ldc, int mr, int nr,
                                                               int acc, const float *bias, int gelu) {
    __m512 c[MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) c[r][0] = c[r][1] = _mm512_setzero_ps();
    for (int k = 0; k < kw; k++) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + (size_t)k * 64);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + (size_t)k * 64 + 32);
#pragma GCC unroll 12
        for (int r = 0; r < MR; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)A[(size_t)k * ak + r * ar]);
            c[r][0] = _mm512_dpbf16_ps(c[r][0], a, b0);
            c[r][1] = _mm512_dpbf16_ps(c[r][1], a, b1);
        }
    }
    /* through a tile in memory with constant indices: reading c[r] at a variable r would keep c on the stack */
    __m512 tile[MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) tile[r][0] = c[r][0], tile[r][1] = c[r][1];
    const __mmask16 m0 = bq_mask16(nr), m1 = bq_mask16(nr - 16);
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    for (int r = 0; r < mr; r++) {
        float *o = C + (long)r * ldc;
        __m512 v0 = tile[r][0], v1 = tile[r][1];
        if (acc) {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, o));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, o + 16));
        } else if (bias) {
            v0 = _mm512_add_ps(v0, b0);
            v1 = _mm512_add_ps(v1, b1);
        }
        if (gelu) v0 = bq_gelu16(v0), v1 = bq_gelu16(v1);
        _mm512_mask_storeu_ps(o, m0, v0);
        _mm512_mask_storeu_ps(o + 16, m1, v1);
    }
}

static void kernel_bf16_rows(int kw, const uint32_t *A, const uint16_t *B, float *C, long ldc, int mr, int nr, int acc,
                             const float *bias, int gelu) {
    kernel_bf16(1, KCW, kw, A, B, C, ldc, mr, nr, acc, bias, gelu);
}

static void kernel_bf16_cols(int kw, const uint32_t *A, const uint16_t *B, float *C, long ldc, int mr, int nr, int acc,
                             const float *bias, int gelu) {
    kernel_bf16(MR, 1, kw, A, B, C, ldc, mr, nr, acc, bias, gelu);
}

/* C = sa[r] * sw[n] * (sum_k a_u8 w_s8 - za[r] * qsum[n]) (+ C when acc, else + bias[n] when given; then GELU of
 * it with gelu), one 12 x 32 tile over kq quads of k */
static void kernel_i8(int kq, const uint32_t *A, const int8_t *B, float *C, long ldc, int mr, int nr, int acc,
                      const float *sa, const int32_t *za, const float *sw, const int32_t *qsum, const float *bias,
                      int gelu) {
    __m512i c[MR][2];
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) c[r][0] = c[r][1] = _mm512_setzero_si512();
    for (int k = 0; k < kq; k++) {
        const __m512i b0 = _mm512_loadu_si512(B + (size_t)k * 128);
        const __m512i b1 = _mm512_loadu_si512(B + (size_t)k * 128 + 64);
#pragma GCC unroll 12
        for (int r = 0; r < MR; r++) {
            const __m512i a = _mm512_set1_epi32((int)A[(size_t)k * MR + r]);
            c[r][0] = _mm512_dpbusd_epi32(c[r][0], a, b0);
            c[r][1] = _mm512_dpbusd_epi32(c[r][1], a, b1);
        }
    }
    __m512i tile[MR][2];   /* as kernel_bf16 */
#pragma GCC unroll 12
    for (int r = 0; r < MR; r++) tile[r][0] = c[r][0], tile[r][1] = c[r][1];
    const __mmask16 m0 = bq_mask16(nr), m1 = bq_mask16(nr - 16);
    const __m512 w0 = _mm512_maskz_loadu_ps(m0, sw), w1 = _mm512_maskz_loadu_ps(m1, sw + 16);
    const __m512i s0 = _mm512_maskz_loadu_epi32(m0, qsum), s1 = _mm512_maskz_loadu_epi32(m1, qsum + 16);
    for (int r = 0; r < mr; r++) {
        float *o = C + (long)r * ldc;
        const __m512 a = _mm512_set1_ps(sa[r]);
        const __m512i z = _mm512_set1_epi32(za[r]);
        __m512 v0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(tile[r][0], _mm512_mullo_epi32(z, s0)));
        __m512 v1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(tile[r][1], _mm512_mullo_epi32(z, s1)));
        v0 = _mm512_mul_ps(_mm512_mul_ps(v0, w0), a);
        v1 = _mm512_mul_ps(_mm512_mul_ps(v1, w1), a);
        if (acc) {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, o));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, o + 16));
        } else if (bias) {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, bias));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, bias + 16));
        }
        if (gelu) v0 = bq_gelu16(v0), v1 = bq_gelu16(v1);
        _mm512_mask_storeu_ps(o, m0, v0);
        _mm512_mask_storeu_ps(o + 16, m1, v1);
    }
}

/* ---- drivers ---------------------------------------------------------------------------------------------- */

/* This thread's number and the team's size inside a parallel region (0 of 1 without OpenMP) */
static inline void thread_slot(int *t, int *nt) {
#ifdef _OPENMP
    *t = omp_get_thread_num();
    *nt = omp_get_num_threads();
#else
    *t = 0;
    *nt = 1;
#endif
}

/* How a call is cut over the threads: by blocks of rows when there are at least two per thread, else every
 * thread takes all rows and a share of the column panels (a B=1 inference product has 384 rows, not enough). */
typedef struct {
    int nt, mc, mblocks, by_rows;
} plan;

static plan make_plan(int M, int N, int K) {
    plan p;
    p.nt = (double)M * N * K > 4e5 ? bq_num_threads() : 1;
    const int np = (N + NR - 1) / NR;
    p.by_rows = M >= 2 * MC * p.nt || np < p.nt;
    if (p.by_rows) {   /* blocks of at most MC rows, as many as a multiple of the threads when that is cheap */
        int nb = (M + MC - 1) / MC;
        nb = ((nb + p.nt - 1) / p.nt) * p.nt;
        int mc = (M + nb - 1) / nb;
        p.mc = ((mc + MR - 1) / MR) * MR;
    } else {
        p.mc = M < MC ? ((M + MR - 1) / MR) * MR : MC;
    }
    p.mblocks = (M + p.mc - 1) / p.mc;
    return p;
}

/* Rows [i0, i0+mr) x panels [jp0, jp1) of C for one k block, A's micro-panels packed in Ap */
static void tile_bf16(int transA, const uint32_t *Ap, const uint16_t *Bp, int Kw, int kw0, int kwn, float *C, long ldc,
                      int i0, int mr, int N, int jp0, int jp1, int acc, const float *bias, int gelu) {
    for (int jp = jp0; jp < jp1; jp++) {
        const uint16_t *B = Bp + ((size_t)jp * Kw + kw0) * NR * 2;
        const int nr = N - jp * NR < NR ? N - jp * NR : NR;
        for (int p = 0; p < mr; p += MR) {
            const uint32_t *A = Ap + (size_t)(p / MR) * PANEL_WORDS;
            float *c = C + (long)(i0 + p) * ldc + jp * NR;
            const int rows = mr - p < MR ? mr - p : MR;
            const float *bj = bias ? bias + jp * NR : NULL;
            if (transA) kernel_bf16_cols(kwn, A, B, c, ldc, rows, nr, acc, bj, gelu);
            else kernel_bf16_rows(kwn, A, B, c, ldc, rows, nr, acc, bj, gelu);
        }
    }
}

/* beta is 0 (C = A B, + bias[n] when given) or 1 (C += A B); with gelu, C = GELU of that as the last k block stores
 * it. Cut by blocks of rows (each thread packs its own A blocks), or, with
 * few rows, by column panels: then the threads pack all of A once between them, one k block at a time. */
int gemm_bf16_avx512(int transA, int M, int N, int K, const float *A, long lda, const uint16_t *Bp, float beta,
                     float *C, long ldc, const float *bias, int gelu) {
    if (M <= 0 || N <= 0) return BQ_OK;
    if (K <= 0) {   /* nothing to add */
        for (int i = 0; i < M; i++) {
            for (int j = 0; j < N && beta == 0.0f; j++) C[(long)i * ldc + j] = bias ? bias[j] : 0.0f;
            if (gelu) gelu_forward_avx512(C + (long)i * ldc, C + (long)i * ldc, N);
        }
        return BQ_OK;
    }
    const plan pl = make_plan(M, N, K);
    const int Kw = (K + 1) / 2, np = (N + NR - 1) / NR, npanels = (M + MR - 1) / MR;
    const int acc0 = beta != 0.0f;
    /* the shared A of the column split: all rows, one k block */
    uint32_t *As = pl.by_rows ? NULL : scratch(0, (size_t)npanels * PANEL_WORDS * 4);
    if (!pl.by_rows && !As) return BQ_ERR_NOMEM;
    int st = BQ_OK;
#pragma omp parallel num_threads(pl.nt)
    {
        int t, nt;
        thread_slot(&t, &nt);
        if (pl.by_rows) {
            uint32_t *Ap = scratch(0, (size_t)pl.mc * KCW * 4);
            if (!Ap) {
#pragma omp atomic write
                st = BQ_ERR_NOMEM;
            }
            for (int ib = t; ib < pl.mblocks && Ap; ib += nt) {
                const int i0 = ib * pl.mc, mr = M - i0 < pl.mc ? M - i0 : pl.mc;
                for (int kw0 = 0; kw0 < Kw; kw0 += KCW) {
                    const int kwn = Kw - kw0 < KCW ? Kw - kw0 : KCW;
                    bf16_pack_a(Ap, A, lda, transA, M, K, i0, mr, kw0, kwn);
                    tile_bf16(transA, Ap, Bp, Kw, kw0, kwn, C, ldc, i0, mr, N, 0, np, kw0 > 0 || acc0, bias,
                              gelu && kw0 + kwn == Kw);
                }
            }
        } else {
            const int jp0 = (int)((long)np * t / nt), jp1 = (int)((long)np * (t + 1) / nt);
            for (int kw0 = 0; kw0 < Kw; kw0 += KCW) {
                const int kwn = Kw - kw0 < KCW ? Kw - kw0 : KCW;
#pragma omp for schedule(static)
                for (int p = 0; p < npanels; p++) {
                    const int i0 = p * MR;
                    bf16_pack_a(As + (size_t)p * PANEL_WORDS, A, lda, transA, M, K, i0, M - i0 < MR ? M - i0 : MR,
                                kw0, kwn);
                }
                tile_bf16(transA, As, Bp, Kw, kw0, kwn, C, ldc, 0, M, N, jp0, jp1, kw0 > 0 || acc0, bias,
                          gelu && kw0 + kwn == Kw);
#pragma omp barrier
            }
        }
    }
    return st;
}

/* Both operands as floats: B packed into this thread's scratch first. */
int gemm_bf16_full_avx512(int transA, int transB, int M, int N, int K, const float *A, long lda, const float *B,
                          long ldb, float beta, float *C, long ldc) {
    uint16_t *Bp = scratch(1, bf16_packed_elems_avx512(K, N) * 2);
    if (!Bp) return BQ_ERR_NOMEM;
    bf16_pack_b_avx512(Bp, B, ldb, transB, K, N);
    return gemm_bf16_avx512(transA, M, N, K, A, lda, Bp, beta, C, ldc, NULL, 0);
}

/* ---- int8 ------------------------------------------------------------------------------------------------- */

size_t i8_packed_bytes_avx512(int K, int N) { return (size_t)((N + NR - 1) / NR) * (size_t)((K + 3) / 4) * NR * 4; }

static float absmax(const float *x, long n) {
    __m512 m = _mm512_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    if (i < n) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(bq_mask16((int)(n - i)), x + i)));
    return _mm512_reduce_max_ps(m);
}

/* W [N,K] (rows ldw apart) quantized per row (output channel) into panels [N/32][K/4][32][4] of int8, sw[n] its
 * scales, qsum[n] = sum_k q[n,k]. A row of zeros gets scale 0 (and quantizes to zeros). */
void i8_pack_weights_avx512(int8_t *dst, float *sw, int32_t *qsum, const float *W, long ldw, int N, int K) {
    const int Kq = (K + 3) / 4, np = (N + NR - 1) / NR;
    const int nt = (long)K * N > 65536 ? bq_num_threads() : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int jp = 0; jp < np; jp++) {
        int8_t *P = dst + (size_t)jp * Kq * NR * 4;
        memset(P, 0, (size_t)Kq * NR * 4);
        for (int j = 0; j < NR && jp * NR + j < N; j++) {
            const int n = jp * NR + j;
            const float *w = W + (long)n * ldw;
            const float mx = absmax(w, K);
            const float s = mx / 127.0f, inv = mx > 0.0f ? 127.0f / mx : 0.0f;
            int32_t sum = 0;
            for (int k = 0; k < K; k++) {
                float q = nearbyintf(w[k] * inv);
                q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
                P[((size_t)(k / 4) * NR + j) * 4 + k % 4] = (int8_t)q;
                sum += (int32_t)q;
            }
            sw[n] = s;
            qsum[n] = sum;
        }
    }
}

/* lo = min(0, min x), hi = max(0, max x) over x[0..n) */
static void range_of(const float *x, long n, float *lo, float *hi) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        a = _mm512_min_ps(a, v);
        b = _mm512_max_ps(b, v);
    }
    if (i < n) {   /* masked-off lanes read as 0, inside the range already */
        const __m512 v = _mm512_maskz_loadu_ps(bq_mask16((int)(n - i)), x + i);
        a = _mm512_min_ps(a, v);
        b = _mm512_max_ps(b, v);
    }
    *lo = _mm512_reduce_min_ps(a);
    *hi = _mm512_reduce_max_ps(b);
}

/* Rows i0 .. i0+mr-1 of A [M,K] quantized to u8 into micro-panels [K/4][MR] words; sa[r], za[r] the scale and
 * zero point of row i0 + r: from the row's own range, or from [t_lo, t_hi] when per tensor (t_hi >= t_lo). */
static void i8_pack_a(uint32_t *Ap, float *sa, int32_t *za, const float *A, long lda, int K, int i0, int mr,
                      int per_tensor, float t_lo, float t_hi) {
    const int Kq = (K + 3) / 4;
    for (int p = 0; p < mr; p += MR) {
        uint32_t *P = Ap + (size_t)(p / MR) * Kq * MR;
        const int rows = mr - p < MR ? mr - p : MR;
        if (rows < MR) memset(P, 0, (size_t)Kq * MR * 4);
        for (int r = 0; r < rows; r++) {
            const float *a = A + (long)(i0 + p + r) * lda;
            float lo = t_lo, hi = t_hi;
            if (!per_tensor) range_of(a, K, &lo, &hi);
            const float range = hi - lo, inv_s = range > 0.0f ? 255.0f / range : 0.0f;
            const int32_t z = (int32_t)nearbyintf(-lo * inv_s);
            sa[p + r] = range / 255.0f;
            za[p + r] = z;
            const __m512 inv = _mm512_set1_ps(inv_s);
            const __m512i zv = _mm512_set1_epi32(z), top = _mm512_set1_epi32(255), zero = _mm512_setzero_si512();
            for (int k0 = 0; k0 < K; k0 += 64) {
                uint32_t t[16];
                for (int h = 0; h < 4; h++) {
                    __m512 x = _mm512_maskz_loadu_ps(bq_mask16(K - k0 - 16 * h), a + k0 + 16 * h);
                    __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(x, inv)), zv);   /* RNE */
                    q = _mm512_max_epi32(_mm512_min_epi32(q, top), zero);
                    _mm_storeu_si128((__m128i *)(t + 4 * h), _mm512_cvtepi32_epi8(q));
                }
                const int nw = K - k0 >= 64 ? 16 : (K - k0 + 3) / 4;
                for (int i = 0; i < nw; i++) P[(size_t)(k0 / 4 + i) * MR + r] = t[i];
            }
        }
    }
}

/* Rows [i0, i0+mr) x panels [jp0, jp1) of C, A's micro-panels packed in Ap ([Kq][MR] words each), their rows'
 * scales and zero points in sa, za */
static void tile_i8(const uint32_t *Ap, const float *sa, const int32_t *za, const int8_t *Bp, int Kq, float *C,
                    long ldc, int i0, int mr, int N, int jp0, int jp1, int acc, const float *sw, const int32_t *qsum,
                    const float *bias, int gelu) {
    for (int jp = jp0; jp < jp1; jp++) {
        const int8_t *B = Bp + (size_t)jp * Kq * NR * 4;
        const int nr = N - jp * NR < NR ? N - jp * NR : NR;
        for (int p = 0; p < mr; p += MR)
            kernel_i8(Kq, Ap + (size_t)(p / MR) * Kq * MR, B, C + (long)(i0 + p) * ldc + jp * NR, ldc,
                      mr - p < MR ? mr - p : MR, nr, acc, sa + p, za + p, sw + jp * NR, qsum + jp * NR,
                      bias ? bias + jp * NR : NULL, gelu);
    }
}

/* Cut as gemm_bf16_avx512: by blocks of rows, or by column panels with A quantized once between the threads. */
int gemm_i8_avx512(int M, int N, int K, const float *A, long lda, const int8_t *Bp, const float *sw,
                   const int32_t *qsum, int per_tensor, float beta, float *C, long ldc, const float *bias, int gelu) {
    if (K >= 66000) return BQ_ERR_ARG;
    if (M <= 0 || N <= 0 || K <= 0) return M > 0 && N > 0 ? BQ_ERR_ARG : BQ_OK;
    const plan pl = make_plan(M, N, K);
    const int Kq = (K + 3) / 4, np = (N + NR - 1) / NR, npanels = (M + MR - 1) / MR;
    float t_lo = 0.0f, t_hi = 0.0f;
    for (int i = 0; i < M && per_tensor; i++) {
        float lo, hi;
        range_of(A + (long)i * lda, K, &lo, &hi);
        t_lo = lo < t_lo ? lo : t_lo;
        t_hi = hi > t_hi ? hi : t_hi;
    }
    const int acc = beta != 0.0f;
    /* A's blocks: mc rows per thread (by rows), or all rows shared (by columns); then the rows' scales and zeros */
    const int rows = pl.by_rows ? pl.mc : npanels * MR;
    const size_t bytes = (size_t)rows * Kq * 4 + (size_t)rows * (sizeof(float) + sizeof(int32_t));
    uint32_t *As = pl.by_rows ? NULL : scratch(0, bytes);
    if (!pl.by_rows && !As) return BQ_ERR_NOMEM;
    int st = BQ_OK;
#pragma omp parallel num_threads(pl.nt)
    {
        int t, nt;
        thread_slot(&t, &nt);
        uint32_t *Ap = pl.by_rows ? scratch(0, bytes) : As;
        if (!Ap) {
#pragma omp atomic write
            st = BQ_ERR_NOMEM;
        }
        float *sa = Ap ? (float *)(Ap + (size_t)rows * Kq) : NULL;
        int32_t *za = Ap ? (int32_t *)(sa + rows) : NULL;
        if (pl.by_rows) {
            for (int ib = t; ib < pl.mblocks && Ap; ib += nt) {
                const int i0 = ib * pl.mc, mr = M - i0 < pl.mc ? M - i0 : pl.mc;
                i8_pack_a(Ap, sa, za, A, lda, K, i0, mr, per_tensor, t_lo, t_hi);
                tile_i8(Ap, sa, za, Bp, Kq, C, ldc, i0, mr, N, 0, np, acc, sw, qsum, bias, gelu);
            }
        } else {
#pragma omp for schedule(static)
            for (int p = 0; p < npanels; p++) {
                const int i0 = p * MR;
                i8_pack_a(Ap + (size_t)p * Kq * MR, sa + i0, za + i0, A, lda, K, i0, M - i0 < MR ? M - i0 : MR,
                          per_tensor, t_lo, t_hi);
            }
            const int jp0 = (int)((long)np * t / nt), jp1 = (int)((long)np * (t + 1) / nt);
            tile_i8(Ap, sa, za, Bp, Kq, C, ldc, 0, M, N, jp0, jp1, acc, sw, qsum, bias, gelu);
        }
    }
    return st;
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif /* BQ_HAVE_AVX512_BUILD */
