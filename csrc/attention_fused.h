/* The fused attention kernel's inner pieces, one table per instruction set (attention_fused.c: portable C and
 * AVX2 + FMA; attention_fused_avx512.c: AVX-512F). The driver in attention_fused.c cuts every (row, head) into
 * blocks of BQ queries x BK keys and calls these on the blocks; what is per instruction set is only what runs
 * per element of a block. Internal to the C core (attention_py.c uses it to force a table in tests).
 */
#ifndef BERTQA_ATTENTION_FUSED_H
#define BERTQA_ATTENTION_FUSED_H
#include "bertqa.h"

/* Block sizes: BQ queries x BK keys (a multiple of the micro-kernels' row counts, 6 for AVX2 and 4 or 8 for
 * AVX-512, wastes no tile). BK and the padded head size HSp are multiples of 16 (BQ_ATTN_VEC), so every product's
 * output columns are whole vectors. */
#define BQ_ATTN_BQ 48
#define BQ_ATTN_BK 64
#define BQ_ATTN_VEC 16
#define BQ_ATTN_LANES 16   /* floats of running sum per query (fwd_block's l) */

/* 2^r on [-1/2, 1/2] ~ C0 + r (C1 + r (C2 + r (C3 + r (C4 + r C5)))): fitted minimax in relative error, 1e-7 in
 * float (as vmath.h's exp); every table's 2^x = 2^n 2^(x - n) with it. */
#define EXP2_C5 1.327606849e-3f
#define EXP2_C4 9.675409645e-3f
#define EXP2_C3 5.550713465e-2f
#define EXP2_C2 2.402212322e-1f
#define EXP2_C1 6.931469440e-1f
#define EXP2_C0 1.000000119e+0f

/* Dropout on one block's probabilities: element (m, j) of the block is number first + m * P + j of the RNG's
 * numbering (bq_rng), keep = uniform >= p, kept ones scaled by 1 / (1 - p). */
typedef struct {
    float p;
    uint64_t seed;
    uint32_t step, tensor_id;
    uint64_t first;
    long P;
} bq_attn_dropout;

typedef struct {
    const char *name;
    /* Scores are in base-2 units in every table: the driver passes scale and bias times log2(e), and exp is 2^x
     * (so a forward and a backward by different tables agree on the saved state). */
    int bk;   /* keys per block (a multiple of 16, at most BQ_ATTN_BK): what one row of a score tile holds */
    /* C[M,N] = alpha * A B (acc = 0) or C[M,N] += A B (acc = 1, alpha unused), A[m,k] at A[m*rsa + k*csa]
     * (row-major A: rsa = lda, csa = 1; a transposed one: rsa = 1, csa = lda), B [K,N] row-major, N a multiple
     * of 16. */
    void (*gemm)(int M, int N, int K, const float *A, long rsa, long csa, const float *B, long ldb, float *C,
                 long ldc, float alpha, int acc);
    /* Forward, one block of mq queries x nk keys (nk a multiple of 16, at most bk): s = scale * q KT + bias (q
     * [mq,HS] rows ldq apart, KT [HS, nk] rows ldk apart); online softmax against the running max mx[m] and sum:
     * m_new = max(mx, max_j s), e = exp(s - m_new), sum = sum * c + sum_j e, the output rows O[m, 0..no) *= c,
     * with c = exp(mx - m_new) (0 while mx = -inf); mx = m_new. S [mq, nk] (rows lds apart) = e, times the
     * dropout mask when drop is not NULL. The sum of row m is l[16 m] + ... + l[16 m + 15] (the lanes of a
     * vector: the driver adds them up at the end). */
    void (*fwd_block)(int mq, int nk, int HS, const float *q, long ldq, const float *KT, long ldk, const float *bias,
                      float scale, float *S, long lds, float *mx, float *l, float *O, long ldo, int no,
                      const bq_attn_dropout *drop);
    /* Backward: S = exp(scale * q KT + bias - mx[m]) * inv[m], the forward's probabilities again from its row max
     * and 1 / sum (more exact than one log-sum-exp: that loses ulps of its own size, large for large scores). */
    void (*bwd_probs)(int mq, int nk, int HS, const float *q, long ldq, const float *KT, long ldk, const float *bias,
                      float scale, const float *mx, const float *inv, float *S, long lds);
    /* Backward: with g = dout VT (dout [mq,HS] rows ldd apart, VT [HS,nk]) and kp the dropout mask (drop NULL:
     * 1): dS = scale * S * (g * kp - D[m]) (the score gradient, 1/sqrt(HS) folded in), then S *= kp. */
    void (*bwd_dscores)(int mq, int nk, int HS, const float *dout, long ldd, const float *VT, long ldv,
                        const bq_attn_dropout *drop, const float *D, float scale, float *S, float *dS, long lds);
    /* A head's [T,HS] operand (rows ld apart) copied, with one read of it: into rows [Tp,HSp] (rows T..Tp-1 and
     * columns HS..HSp-1 zero) and/or transposed into tr [HS, Tp] (rows ldt apart, columns T..Tp-1 zero); either
     * may be NULL. */
    void (*pack)(float *rows, float *tr, long ldt, const float *src, int T, int Tp, int HS, int HSp, long ld);
} bq_attn_kernels;

extern const bq_attn_kernels bq_attn_generic, bq_attn_avx2;
/* The AVX-512 table, or NULL when this build has none (cpu.h: BQ_HAVE_AVX512_BUILD). */
const bq_attn_kernels *bq_attn_avx512(void);
/* The table of the instruction set cpu.c has chosen (bq_cpu_isa_name: "avx512" or the AVX2 floor; the portable
 * one on other architectures). */
const bq_attn_kernels *bq_attn_kernels_best(void);
/* By name ("generic", "avx2", "avx512"; NULL: bq_attn_kernels_best), for tests and benchmarks; NULL when the
 * named one cannot run here (not built, or the CPU lacks the instructions). */
const bq_attn_kernels *bq_attn_kernels_named(const char *name);

/* The forward in bf16, for inference (attention_bf16_avx512.c): a head's K and V packed once as bf16 pair words
 * (pack_kt: [ceil(HS/2)] rows of ldk words, word (d, j) = (K[j, 2d], K[j, 2d+1]), columns T..Tp-1 zero;
 * pack_v: [Tp/2 + 16] rows of HSp words, word (j, d) = (V[2j, d], V[2j+1, d]), zero past T and HS), a block's
 * queries as words [mq][ceil(HS/2)] (pack_q); fwd_block = the fp32 table's fwd_block (no dropout) followed by
 * O += P V, with P rounded to bf16 into Sw [BQ_ATTN_BQ][BQ_ATTN_BK/2] words and Vw the block's first word row. */
typedef struct {
    void (*pack_kt)(uint32_t *KTw, long ldk, const float *k, int T, int Tp, int HS, long ld);
    void (*pack_v)(uint32_t *Vw, const float *v, int T, int Tp, int HS, int HSp, long ld);
    void (*pack_q)(uint32_t *qw, const float *q, int mq, int HS, long ld);
    void (*fwd_block)(int mq, int nk, int HS, const uint32_t *qw, const uint32_t *KTw, long ldk, const float *bias,
                      float scale, const uint32_t *Vw, int HSp, float *mx, float *l, float *O, uint32_t *Sw);
} bq_attn_bf16_kernels;
/* The bf16 table of this build (NULL: none); bq_attn_bf16_best: it, when the CPU has AVX-512 BF16 and the
 * AVX-512 kernels are in use, else NULL. */
const bq_attn_bf16_kernels *bq_attn_bf16(void);
const bq_attn_bf16_kernels *bq_attn_bf16_best(void);
/* attention_forward_rows in bf16 (no dropout, nothing saved: inference); BQ_ERR_ARG as it, BQ_ERR_NOMEM. */
int bq_attention_forward_rows_bf16(const bq_attn_bf16_kernels *kb, float *out, const float *q, const float *k,
                                   const float *v, const float *mask, int Tpad, int B, const int *off, int NH, int HS,
                                   int ld);

/* attention_forward_rows / attention_backward_rows (bertqa.h) with the kernel table given. */
int bq_attention_forward_rows_with(const bq_attn_kernels *kern, float *out, float *saved, const float *q,
                                   const float *k, const float *v, const float *mask, int Tpad, int B,
                                   const int *off, int NH, int HS, int ld, float p, bq_rng r, uint32_t tensor_id);
int bq_attention_backward_rows_with(const bq_attn_kernels *kern, float *dq, float *dk, float *dv, const float *dout,
                                    const float *out, const float *saved, const float *q, const float *k,
                                    const float *v, const float *mask, int Tpad, int B, const int *off, int NH,
                                    int HS, int ld, float p, bq_rng r, uint32_t tensor_id);
#endif
