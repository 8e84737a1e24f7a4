/* The CPU kernels' instruction set, chosen at run time (after ONNX Runtime's MLAS platform struct).
 *
 * One table of function pointers per instruction set, bq_cpu() the one in use. Every caller of a vectorised
 * kernel goes through it: the choice lives here and in cpu.c only. The table starts as the build's floor
 * (AVX2 + FMA, what setup.py compiles every file for) and bq_cpu_init(), run once when bertqa._C loads, moves
 * to AVX-512 when cpuid says the CPU and the OS support it. Forcing a path:
 *   BERTQA_CPU=auto | avx2 | avx512   read by bq_cpu_init (avx512 on a CPU without it is an error, not a fallback)
 *   bq_cpu_set_isa / bertqa.ops.set_isa("avx2" | "avx512" | "auto")   at run time, e.g. from a test
 * A whole-tensor kernel reads bq_cpu() once per call (a row kernel once per row), so a switch takes effect from
 * the next call in every thread. A BERTQA_NATIVE=1 build (-march=native) lets the compiler use the build
 * machine's AVX-512 in the "avx2" variants too: forcing AVX2 there is no test of an AVX2-only CPU.
 *
 * Variants: <kernel>_avx2.c (with a scalar tail) is the reference; <kernel>_avx512.c is compiled for AVX-512 by a
 * `#pragma GCC target` so that the module still loads and runs on an AVX2-only CPU. A kernel's entry points
 * and their threads are <kernel>.c (gelu.c, layernorm.c, adamw.c, rng.c; softmax's are attention's).
 * Link-level layers, no file calling back up (tests/test_c_layering.py checks it):
 *   entry points (gelu.c, ...) -> cpu.c (the tables) -> variants (*_avx2.c, *_avx512.c) -> leaves (philox.c)
 * An AVX-512 variant may hand its last elements to the AVX2 variant of the same kernel (never the reverse), and
 * shared helpers are static inline in headers (vmath.h, vmath_avx512.h, philox.h, philox_avx512.h).
 *
 * Agreement between the two paths (tests/test_isa.py checks each): elementwise kernels compute the same
 * formula operation for operation (no FMA contraction: -std=c11 means -ffp-contract=off), so GELU, AdamW, the
 * exp and max of a row are bit-identical, and so are the layernorm parameter gradients given the same mean and
 * rstd; dropout masks (and the uniforms) are bit-identical by construction (integer threshold on the same Philox
 * words: the CUDA backend draws them too). Kernels with a sum over a row add it in another order: a softmax row
 * within 16 ulps (measured: up to 10 at T = 768), the softmax-backward row within 16 ulps of its terms' size,
 * layernorm within 16 ulps of the row's largest value, sum_squares within 1e-14 relative (double); one training
 * step of the engine gives the same loss to float32 precision and gradients within 1e-5 relative.
 */
#ifndef BERTQA_CPU_H
#define BERTQA_CPU_H
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* x86-64 with GCC or clang: the AVX-512 variants are compiled (and used where the CPU has them) */
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && defined(__AVX2__)
#define BQ_HAVE_AVX512_BUILD 1
#endif

/* Brackets around an AVX-512 file's code (after its #includes): the functions between are compiled for AVX-512
 * F, BW, DQ and VL, the rest of the module for the build's floor. */
#if defined(__clang__)
#define BQ_AVX512_BEGIN \
    _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512dq,avx512vl\"))), apply_to = function)")
#define BQ_AVX512_END _Pragma("clang attribute pop")
#else
#define BQ_AVX512_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl\")")
#define BQ_AVX512_END _Pragma("GCC pop_options")
#endif

typedef enum { BQ_ISA_AVX2 = 0, BQ_ISA_AVX512 = 1, BQ_ISA_COUNT = 2, BQ_ISA_AUTO = -1 } bq_isa;

/* What dropout_slice writes (rng_avx2.c, rng_avx512.c): y = x * keep / (1 - p); y += x * keep / (1 - p); y = keep / (1 - p);
 * y = the uniform itself. */
enum { BQ_DROPOUT_APPLY, BQ_DROPOUT_ACCUMULATE, BQ_DROPOUT_MASK, BQ_DROPOUT_UNIFORM };

/* AdamW's per-step scalars (filled by adamw.c) */
typedef struct {
    float beta1, beta2, one_minus_beta1, one_minus_beta2;
    float decay;       /* 1 - lr * weight_decay */
    float step_size;   /* lr / (1 - beta1^t) */
    float bc2_sqrt;    /* sqrt(1 - beta2^t) */
    float eps, grad_scale;
} bq_adamw_scalars;

typedef struct {
    const char *name;   /* "avx2", "avx512" */
    /* gelu_avx*.c: elements [0, n): out = gelu(inp); dinp += dout * gelu'(inp) */
    void (*gelu_forward)(float *out, const float *inp, long n);
    void (*gelu_backward)(float *dinp, const float *inp, const float *dout, long n);
    /* layernorm_avx*.c, one row x [C]: out = (x - mean) * rstd * weight + bias (*mean, *rstd written);
     * dx [C] += rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight;
     * aw[c - c0] += sum_n dy[n,c] xhat[n,c], ab[c - c0] += sum_n dy[n,c] over channels c0 <= c < c1 <= c0 + 64 */
    void (*layernorm_forward_row)(float *out, float *mean, float *rstd, const float *x, const float *weight,
                                  const float *bias, int C, float eps);
    void (*layernorm_backward_row)(float *dx, const float *dy, const float *x, const float *weight, float mean,
                                   float rstd, int C);
    void (*layernorm_param_grad)(float *aw, float *ab, const float *dout, const float *inp, const float *mean,
                                 const float *rstd, long N, int C, int c0, int c1);
    /* adamw_avx*.c: one AdamW step over [n]; sum of squares of [n] in double */
    void (*adamw)(float *param, const float *grad, float *m, float *v, long n, const bq_adamw_scalars *s);
    double (*sum_squares)(const float *g, long n);
    /* rng_avx*.c: elements first .. first+n-1 of a tensor's dropout numbering, in a BQ_DROPOUT_* mode (y may alias x) */
    void (*dropout_slice)(float *y, const float *x, size_t n, float p, uint64_t seed, uint32_t step,
                          uint32_t tensor_id, uint64_t first, int mode);
    /* softmax_avx*.c, attention's rows: row[0..T) = softmax(row + (1 - mk) * -10000) in place (mk NULL: no mask);
     * max of x[0..n); y = exp(x - shift) returning the sum (y may alias x);
     * g = scale * a * (g * mk - <g * mk, a>)   (mk: the row's scaled dropout mask, or NULL) */
    void (*softmax_row)(float *row, const float *mk, int T);
    float (*max_row)(const float *x, int n);
    float (*exp_row)(float *y, const float *x, float shift, int n);
    void (*softmax_backward_row)(float *g, const float *a, const float *mk, int n, float scale);
} bq_kernels;

extern _Atomic(const bq_kernels *) bq_cpu_active;
/* The table in use (never NULL). */
static inline const bq_kernels *bq_cpu(void) { return atomic_load_explicit(&bq_cpu_active, memory_order_relaxed); }

/* Whether this CPU (and OS) can run an instruction set's table: AVX-512 needs F, BW, DQ and VL (x86-64-v4). */
int bq_cpu_supports(bq_isa isa);
/* Use isa's table (BQ_ISA_AUTO: the best supported). BQ_ERR_ARG when the CPU cannot run it; nothing changes. */
int bq_cpu_set_isa(bq_isa isa);
const char *bq_cpu_isa_name(void);   /* name of the table in use */
const char *bq_cpu_isa_label(bq_isa isa);   /* name of isa's table; NULL when this build has none */
/* "avx2" / "avx512" / "auto" -> bq_isa; BQ_ISA_COUNT for anything else */
bq_isa bq_cpu_parse_isa(const char *name);
/* Once at load: BERTQA_CPU (unset, "" or "auto": the best supported). On a bad value or an unsupported ISA it
 * returns BQ_ERR_ARG with a sentence in err (and keeps the floor); BQ_OK otherwise. */
int bq_cpu_init(char *err, size_t errlen);

/* The variants, <kernel>_avx2.c and <kernel>_avx512.c (filled into the tables by cpu.c; call them through
 * bq_cpu()). */
void gelu_forward_avx2(float *out, const float *inp, long n);
void gelu_backward_avx2(float *dinp, const float *inp, const float *dout, long n);
void layernorm_forward_row_avx2(float *out, float *mean, float *rstd, const float *x, const float *weight,
                                const float *bias, int C, float eps);
void layernorm_backward_row_avx2(float *dx, const float *dy, const float *x, const float *weight, float mean,
                                 float rstd, int C);
void layernorm_param_grad_avx2(float *aw, float *ab, const float *dout, const float *inp, const float *mean,
                               const float *rstd, long N, int C, int c0, int c1);
void adamw_avx2(float *param, const float *grad, float *m, float *v, long n, const bq_adamw_scalars *s);
double sum_squares_avx2(const float *g, long n);
void dropout_slice_avx2(float *y, const float *x, size_t n, float p, uint64_t seed, uint32_t step,
                        uint32_t tensor_id, uint64_t first, int mode);
void softmax_row_avx2(float *row, const float *mk, int T);
float max_row_avx2(const float *x, int n);
float exp_row_avx2(float *y, const float *x, float shift, int n);
void softmax_backward_row_avx2(float *g, const float *a, const float *mk, int n, float scale);

#ifdef BQ_HAVE_AVX512_BUILD
void gelu_forward_avx512(float *out, const float *inp, long n);
void gelu_backward_avx512(float *dinp, const float *inp, const float *dout, long n);
void layernorm_forward_row_avx512(float *out, float *mean, float *rstd, const float *x, const float *weight,
                                  const float *bias, int C, float eps);
void layernorm_backward_row_avx512(float *dx, const float *dy, const float *x, const float *weight, float mean,
                                   float rstd, int C);
void layernorm_param_grad_avx512(float *aw, float *ab, const float *dout, const float *inp, const float *mean,
                                 const float *rstd, long N, int C, int c0, int c1);
void adamw_avx512(float *param, const float *grad, float *m, float *v, long n, const bq_adamw_scalars *s);
double sum_squares_avx512(const float *g, long n);
void dropout_slice_avx512(float *y, const float *x, size_t n, float p, uint64_t seed, uint32_t step,
                          uint32_t tensor_id, uint64_t first, int mode);
void softmax_row_avx512(float *row, const float *mk, int T);
float max_row_avx512(const float *x, int n);
float exp_row_avx512(float *y, const float *x, float shift, int n);
void softmax_backward_row_avx512(float *g, const float *a, const float *mk, int n, float scale);
#endif

/* ---- low precision (gemm_lowp_avx512.c): bf16 products on AVX-512 BF16, int8 ones on AVX-512 VNNI ---------------
 * Not part of bq_kernels: these are extra instructions on top of the AVX-512 table, and an engine asks for them
 * once, when it is made for a precision (bq_cpu_lowp), instead of every call choosing. */
enum { BQ_PREC_FP32 = 0, BQ_PREC_BF16 = 1, BQ_PREC_INT8 = 2 };

typedef struct {
    /* bf16: B [K,N] (B[k,n] = transB ? B[n*ldb + k] : B[k*ldb + n]) rounded to bf16 into a packed buffer of
     * bf16_packed_elems(K, N) uint16; C[M,N] = (beta 0) or += (beta 1) op(A) B with A rounded as it is read
     * (A[m,k] = transA ? A[k*lda + m] : A[m*lda + k]) and fp32 sums, plus bias[N] (beta 0; NULL: none), then
     * with gelu GELU of each result as it is stored (bit for bit gelu_forward's); gemm_bf16_full packs B itself. */
    size_t (*bf16_packed_elems)(int K, int N);
    void (*bf16_pack_b)(uint16_t *dst, const float *B, long ldb, int transB, int K, int N);
    int (*gemm_bf16)(int transA, int M, int N, int K, const float *A, long lda, const uint16_t *Bp, float beta,
                     float *C, long ldc, const float *bias, int gelu);
    int (*gemm_bf16_full)(int transA, int transB, int M, int N, int K, const float *A, long lda, const float *B,
                          long ldb, float beta, float *C, long ldc);
    /* int8: W [N,K] quantized per output channel into i8_packed_bytes(K, N) bytes, sw [N] its scales, qsum [N]
     * its quantized rows' sums; C[M,N] = (beta 0) or += (beta 1) A W^T with A quantized to u8 with a zero point,
     * per row (per_tensor 0) or per tensor, plus bias[N] (beta 0; NULL: none), then GELU with gelu, as
     * gemm_bf16. BQ_ERR_ARG for K >= 66,000 (int32 sums could overflow). */
    size_t (*i8_packed_bytes)(int K, int N);
    void (*i8_pack_weights)(int8_t *dst, float *sw, int32_t *qsum, const float *W, long ldw, int N, int K);
    int (*gemm_i8)(int M, int N, int K, const float *A, long lda, const int8_t *Bp, const float *sw,
                   const int32_t *qsum, int per_tensor, float beta, float *C, long ldc, const float *bias, int gelu);
} bq_lowp_kernels;

/* The table for a precision's products (BQ_PREC_BF16 or BQ_PREC_INT8) when this build, the CPU and the
 * instruction set in use (BERTQA_CPU) can run them; else NULL, with *missing (when not NULL) naming what is
 * lacking in words. */
const bq_lowp_kernels *bq_cpu_lowp(int precision, const char **missing);
/* cpuid: the CPU (and OS) have AVX-512 BF16 / AVX-512 VNNI */
int bq_cpu_has_avx512_bf16(void);
int bq_cpu_has_avx512_vnni(void);

#ifdef BQ_HAVE_AVX512_BUILD
size_t bf16_packed_elems_avx512(int K, int N);
void bf16_pack_b_avx512(uint16_t *dst, const float *B, long ldb, int transB, int K, int N);
int gemm_bf16_avx512(int transA, int M, int N, int K, const float *A, long lda, const uint16_t *Bp, float beta,
                     float *C, long ldc, const float *bias, int gelu);
int gemm_bf16_full_avx512(int transA, int transB, int M, int N, int K, const float *A, long lda, const float *B,
                          long ldb, float beta, float *C, long ldc);
size_t i8_packed_bytes_avx512(int K, int N);
void i8_pack_weights_avx512(int8_t *dst, float *sw, int32_t *qsum, const float *W, long ldw, int N, int K);
int gemm_i8_avx512(int M, int N, int K, const float *A, long lda, const int8_t *Bp, const float *sw,
                   const int32_t *qsum, int per_tensor, float beta, float *C, long ldc, const float *bias, int gelu);
#endif

#endif /* BERTQA_CPU_H */
