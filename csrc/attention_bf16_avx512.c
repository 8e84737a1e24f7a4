/* The fused attention's forward in bf16 (AVX-512 BF16), for inference in the engine's bf16 and int8 precisions
 * (attention_fused.h, bq_attn_bf16_kernels; the driver is attention_fused.c's bq_attention_forward_rows_bf16).
 *
 * The same FlashAttention-2 blocks as the fp32 table, with the two products in bf16 and fp32 sums (vdpbf16ps):
 *   scores = q K^T: q and K rounded to bf16, K packed per head as pair words along the head dimension
 *     ([HS/2][Tp] words: word (d, j) = (K[j, 2d], K[j, 2d+1])), q per block of queries likewise ([mq][HS/2]);
 *   the softmax (scale, bias, running max, 2^x, sums) in fp32 on the accumulators, as attention_fused_avx512.c;
 *   O += P V: P rounded to bf16 as it leaves the registers, pairs of keys side by side ([mq][BK/2] words), and V
 *     packed per head as pair words along the keys ([Tp/2][HSp] words: word (j, d) = (V[2j, d], V[2j+1, d])).
 * The row sums take the unrounded probabilities; the normalised output differs from the exact one by the
 * rounding of q, K, V and P (2^-8 relative each; tests/test_lowp.py derives the bound).
 */
#include <stdint.h>
#include <string.h>

#include "attention_fused.h"
#include "cpu.h"

#ifdef BQ_HAVE_AVX512_BUILD

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")
#endif

#include "attention_avx512.h"
#include "bf16_avx512.h"

#define UNROLL _Pragma("GCC unroll 16")

/* K of one head [T, HS] (rows ld apart) -> KTw[d * ldk + j] = (K[j, 2d], K[j, 2d+1]), columns T..Tp-1 zero */
static void pack_kt(uint32_t *KTw, long ldk, const float *k, int T, int Tp, int HS, long ld) {
    const int HSw = (HS + 1) / 2;
    uint32_t w[64];
    for (int j = 0; j < T; j++) {
        for (int d0 = 0; d0 < HS; d0 += 128) {
            const int n = HS - d0 < 128 ? HS - d0 : 128;
            bq_bf16_words(w, k + (long)j * ld + d0, n, (n + 1) / 2);
            for (int d = 0; d < (n + 1) / 2; d++) KTw[(long)(d0 / 2 + d) * ldk + j] = w[d];
        }
    }
    for (int d = 0; d < HSw; d++) memset(KTw + (long)d * ldk + T, 0, (size_t)(Tp - T) * 4);
}

/* V of one head [T, HS] -> Vw[j * HSp + d] = (V[2j, d], V[2j+1, d]) for j < Tp / 2 + 16 (keys past T zero, and
 * 32 more: a block's odd last 16 keys read one padding word row), d < HSp (columns past HS zero) */
static void pack_v(uint32_t *Vw, const float *v, int T, int Tp, int HS, int HSp, long ld) {
    const int rows = Tp / 2 + 16;
    for (int j = 0; j < rows; j++) {
        const int r0 = 2 * j, r1 = 2 * j + 1;
        for (int d = 0; d < HSp; d += 16) {
            const int n = HS - d;
            const __m256i lo = r0 < T ? bq_bf16x16(v + (long)r0 * ld + d, n) : _mm256_setzero_si256();
            const __m256i hi = r1 < T ? bq_bf16x16(v + (long)r1 * ld + d, n) : _mm256_setzero_si256();
            bq_bf16_interleave16(Vw + (long)j * HSp + d, lo, hi);
        }
    }
}

/* mq query rows [mq, HS] (ld apart) -> qw[m * HSw + d] = (q[m, 2d], q[m, 2d+1]) */
static void pack_q(uint32_t *qw, const float *q, int mq, int HS, long ld) {
    const int HSw = (HS + 1) / 2;
    for (int m = 0; m < mq; m++) bq_bf16_words(qw + (long)m * HSw, q + (long)m * ld, HS, HSw);
}

/* One tile of MR queries x 16 NV keys: scores, bias, running max, e = 2^(s - max) (the tile's row sums as 16
 * lanes in rs, mx_old - mx_new in dm), e stored as bf16 pair words in Sw (rows BK / 2 words apart; an odd last
 * vector of keys pairs with zeros). */
static inline __attribute__((always_inline)) void score_tile(const int MR, const int NV, int HSw, const uint32_t *qw,
                                                              const uint32_t *KTw, long ldk, const float *bias,
                                                              float scale, uint32_t *Sw, float *mx, float *dm,
                                                              float *rs) {
    __m512 c[4][4];
    UNROLL for (int m = 0; m < MR; m++) UNROLL for (int v = 0; v < NV; v++) c[m][v] = _mm512_setzero_ps();
    for (int d = 0; d < HSw; d++) {
        __m512bh b[4];
        UNROLL for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512(KTw + (long)d * ldk + 16 * v);
        UNROLL for (int m = 0; m < MR; m++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)qw[m * HSw + d]);
            UNROLL for (int v = 0; v < NV; v++) c[m][v] = _mm512_dpbf16_ps(c[m][v], a, b[v]);
        }
    }
    const __m512 vs = _mm512_set1_ps(scale);
    UNROLL for (int m = 0; m < MR; m++) {
        __m512 vsum = _mm512_setzero_ps();
        const float mnew = scores_max(NV, c[m], vs, bias, mx[m]);
        const __m512 vm = _mm512_set1_ps(mnew);
        __m512 e[4];
        UNROLL for (int v = 0; v < NV; v++) {
            e[v] = exp2_16(_mm512_sub_ps(c[m][v], vm));
            vsum = _mm512_add_ps(vsum, e[v]);
        }
        UNROLL for (int v = 0; v < NV; v += 2) {
            const __m512 hi = v + 1 < NV ? e[v + 1] : _mm512_setzero_ps();
            _mm512_storeu_si512(Sw + m * (BQ_ATTN_BK / 2) + 8 * v, (__m512i)_mm512_cvtne2ps_pbh(hi, e[v]));
        }
        dm[m] = mx[m] - mnew;
        _mm512_storeu_ps(rs + 16 * m, vsum);
        mx[m] = mnew;
    }
}

/* O[m, 16 v ..] += sum_k Sw[m, k] Vw[k, 16 v ..] over nw words (pairs of keys), MR rows x NV vectors */
static inline __attribute__((always_inline)) void pv_tile(const int MR, const int NV, int nw, const uint32_t *Sw,
                                                           const uint32_t *Vw, long ldv, float *O, long ldo) {
    __m512 c[4][4];
    UNROLL for (int m = 0; m < MR; m++) UNROLL for (int v = 0; v < NV; v++) c[m][v] = _mm512_loadu_ps(O + m * ldo + 16 * v);
    for (int k = 0; k < nw; k++) {
        __m512bh b[4];
        UNROLL for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512(Vw + (long)k * ldv + 16 * v);
        UNROLL for (int m = 0; m < MR; m++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)Sw[m * (BQ_ATTN_BK / 2) + k]);
            UNROLL for (int v = 0; v < NV; v++) c[m][v] = _mm512_dpbf16_ps(c[m][v], a, b[v]);
        }
    }
    UNROLL for (int m = 0; m < MR; m++) UNROLL for (int v = 0; v < NV; v++) _mm512_storeu_ps(O + m * ldo + 16 * v, c[m][v]);
}

/* One block of mq queries x nk keys (nk a multiple of 16, at most BQ_ATTN_BK): the fp32 table's fwd_block (no
 * dropout: inference) followed by O += P V, with Vw the block's first word row (key j0 / 2) */
static void fwd_block_bf16(int mq, int nk, int HS, const uint32_t *qw, const uint32_t *KTw, long ldk,
                           const float *bias, float scale, const uint32_t *Vw, int HSp, float *mx, float *l, float *O,
                           uint32_t *Sw) {
    const int HSw = (HS + 1) / 2, nv = nk / 16, nw = (nv + 1) / 2 * 16;
    float cr[BQ_ATTN_BQ + 16], rs[16 * (BQ_ATTN_BQ + 4)];
    for (int m = 0; m < mq; m += 4) {
        COLS4(score_tile, nv, mq - m, HSw, qw + (long)m * HSw, KTw, ldk, bias, scale, Sw + m * (BQ_ATTN_BK / 2),
              mx + m, cr + m, rs + 16 * m)
    }
    rescale_rows(mq, cr, l, rs, O, HSp, HSp);
    for (int d0 = 0; d0 < HSp; d0 += 64) {
        const int nvo = (HSp - d0 < 64 ? HSp - d0 : 64) / 16;
        for (int m = 0; m < mq; m += 4) {
            COLS4(pv_tile, nvo, mq - m, nw, Sw + m * (BQ_ATTN_BK / 2), Vw + d0, HSp, O + (long)m * HSp + d0, HSp)
        }
    }
}

static const bq_attn_bf16_kernels table = {pack_kt, pack_v, pack_q, fwd_block_bf16};

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const bq_attn_bf16_kernels *bq_attn_bf16(void) { return &table; }
#else
const bq_attn_bf16_kernels *bq_attn_bf16(void) { return NULL; }
#endif
