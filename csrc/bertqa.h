/* bertqa compute core: float32 CPU kernels for BERT question answering.
 *
 * Conventions (the same in every file, after llm.c):
 *   B  batch size          T  sequence length       C  hidden size (channels)
 *   NH attention heads     HS head size (C / NH)    V  vocabulary size
 *   N  rows of a 2-D view (usually B*T)
 * Tensors are row-major and contiguous unless strides are passed. Shapes are given in brackets.
 *
 * Every backward kernel ADDS into its gradient outputs (dinp, dweight, dbias...), so callers zero
 * gradient buffers once and gradients of shared inputs (residuals, tied weights) sum for free.
 * Every function that can fail returns a bq_status; none calls exit() or abort().
 */
#ifndef BERTQA_H
#define BERTQA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    BQ_OK = 0,
    BQ_ERR_NOMEM = 1,   /* an allocation failed */
    BQ_ERR_INDEX = 2,   /* a token id / type id / position is outside its table */
    BQ_ERR_ARG = 3,     /* a size or value that the kernel cannot handle */
} bq_status;

const char *bq_status_string(int status);

/* ---- threading / BLAS information (threads.c) ------------------------------------------------- */
int bq_num_threads(void);            /* threads of every parallel region: bq_set_num_threads, else OMP_NUM_THREADS/cores */
int bq_blas_num_threads(void);       /* threads the BLAS spawns itself: 1 after bq_init_threads */
void bq_init_threads(void);          /* once at load: the BLAS runs single-threaded inside our threads */
void bq_set_num_threads(int n);      /* threads for kernels and (through bq_sgemm) matrix products, in every thread */
const char *bq_blas_config(void);    /* BLAS build description, e.g. "OpenBLAS 0.3.34 DYNAMIC_ARCH Haswell" */
const char *bq_blas_corename(void);  /* the kernel set the BLAS chose at run time */

/* C[M,N] = alpha * op(A) @ op(B) + beta * C, row-major. bq_sgemm splits the work over the OpenMP threads
 * (one BLAS call per block); bq_sgemm1 is one single-threaded BLAS call, for use inside parallel regions. */
void bq_sgemm1(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
               const float *B, int ldb, float beta, float *C, int ldc);
void bq_sgemm(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc);

/* ---- counter-based RNG (philox.c) and dropout (rng.c) ---------------------------------------- */
/* Philox4x32-10 (Salmon et al., SC'11): out = philox(counter[4], key[2]). */
void bq_philox4x32(uint32_t out[4], const uint32_t counter[4], const uint32_t key[2]);
/* Uniform float in [0, 1) for element `idx` of tensor `tensor_id` at training step `step`:
 * key = seed, counter = (idx / 4, tensor_id, step), lane idx % 4; 24 random bits. The CUDA backend
 * computes the same function, so dropout masks agree across backends. */
float bq_uniform(uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t idx);
/* keep[i] = (uniform(i) >= p); out = inp * keep / (1 - p). out may alias inp. [N] */
void dropout_forward(float *out, const float *inp, size_t N, float p, uint64_t seed, uint32_t step,
                     uint32_t tensor_id);
/* out[i] = inp[i] * keep(first + i) / (1 - p), i < n: elements first .. first+n-1 of a larger tensor. */
void bq_dropout_slice(float *out, const float *inp, size_t n, float p, uint64_t seed, uint32_t step,
                      uint32_t tensor_id, uint64_t first);
/* mask[i] = keep(first + i) / (1 - p): the scaled mask itself, to apply to several tensors. */
void bq_dropout_mask(float *mask, size_t n, float p, uint64_t seed, uint32_t step, uint32_t tensor_id,
                     uint64_t first);
/* u[i] = the uniform of element first + i (what dropout compares with p). */
void bq_uniform_fill(float *u, size_t n, uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t first);
/* dinp += dout * keep / (1 - p), keep regenerated from (seed, step, tensor_id). [N] */
void dropout_backward(float *dinp, const float *dout, size_t N, float p, uint64_t seed, uint32_t step,
                      uint32_t tensor_id);

/* Which random numbers a training step's dropout masks take. Element (b, t, c) of a [B,T,C] activation draws the
 * uniform of index (w_b * P + t) * C + c, and element (b, h, i, j) of [B,NH,T,T] attention probabilities that of
 * ((w_b * NH + h) * P + i) * P + j, with w_b = window[b] (window NULL: w_b = b) and P >= T. With the window ids
 * of the rows and P = the model's positions, a mask is a function of (seed, step, window, position, feature):
 * not of the batch the window sits in, its place there or the batch's padded width, which is what lets N
 * data-parallel ranks x b windows draw the masks of one process x N*b windows. window NULL and P = T number the
 * elements by plain position in the buffer (what the one-kernel ops API does). */
typedef struct {
    uint64_t seed;
    uint32_t step;
    const int64_t *window;   /* [B] or NULL */
    long P;
} bq_rng;
static inline uint64_t bq_rng_window(bq_rng r, int b) { return r.window ? (uint64_t)r.window[b] : (uint64_t)b; }
/* Rows of tokens: row b is tokens off[b] .. off[b+1]-1 of a [off[B], C] activation (packed rows of their own
 * lengths, or off[b] = b * T for a padded [B,T,C] batch); its token t is position t of window w_b. */
/* out = dropout(inp) over such rows, numbered as bq_rng says (out may alias inp); _backward: dinp += dout * mask. */
void dropout_rows_forward(float *out, const float *inp, int B, const int *off, int C, float p, bq_rng r,
                          uint32_t tensor_id);
void dropout_rows_backward(float *dinp, const float *dout, int B, const int *off, int C, float p, bq_rng r,
                           uint32_t tensor_id);

/* ---- embeddings (embedding.c) ----------------------------------------------------------------- */
/* out[b,t,:] = wte[ids[b,t]] + wpe[t] + wtt[types[b,t]]   (types may be NULL: all 0)
 * ids, types [B,T]; wte [V,C]; wpe [P,C] with T <= P; wtt [NT,C]; out [B,T,C].
 * Returns BQ_ERR_INDEX (and writes nothing) if an id or type is out of range or T > P. */
int embedding_forward(float *out, const int64_t *ids, const int64_t *types, const float *wte,
                      const float *wpe, const float *wtt, int B, int T, int C, int V, int P, int NT);
/* dwte[ids[b,t]] += dout[b,t]; dwpe[t] += sum_b dout[b,t]; dwtt[types[b,t]] += dout[b,t]
 * (any of dwte/dwpe/dwtt may be NULL). Tokens whose id is pad_id add nothing to dwte (torch's padding_idx,
 * which BERT's word embeddings use: the [PAD] row never trains); pad_id < 0 disables that.
 * Deterministic: threads split channels, not tokens. */
int embedding_backward(float *dwte, float *dwpe, float *dwtt, const float *dout, const int64_t *ids,
                       const int64_t *types, int B, int T, int C, int V, int P, int NT, int64_t pad_id);

/* ---- linear (linear.c): y = x @ W.T + b, W in the Hugging Face [OUT, IN] layout ---------------- */
/* out [N,OUT], inp [N,IN], weight [OUT,IN], bias [OUT] or NULL. */
void linear_forward(float *out, const float *inp, const float *weight, const float *bias, int N, int IN,
                    int OUT);
/* dinp [N,IN] += dout @ W; dweight [OUT,IN] += dout.T @ inp; dbias [OUT] += sum_n dout.
 * Any of dinp / dweight / dbias may be NULL. */
void linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                     const float *weight, int N, int IN, int OUT);

/* The same in bf16 or int8 (cpu.h's bq_lowp_kernels k, prec BQ_PREC_BF16 / BQ_PREC_INT8): the weight comes
 * packed (wp: k->bf16_pack_b of W^T, or k->i8_pack_weights with its scales sw and sums qsum), the activations are
 * rounded / quantized as the product reads them (int8: one scale per row, or per tensor when per_tensor), the
 * bias added in fp32; with gelu, out = GELU of that (gelu_forward's bit for bit), applied as the results are
 * stored. BQ_ERR_NOMEM when a scratch buffer cannot be had. */
int linear_forward_lowp(const void *k, int prec, const void *wp, const float *sw, const int32_t *qsum, int per_tensor,
                        float *out, const float *inp, const float *bias, int N, int IN, int OUT, int gelu);
/* bf16 backward: dinp += dout @ W and dweight += dout.T @ inp with the operands rounded to bf16 and fp32 sums;
 * dbias in fp32 as linear_backward. */
int linear_backward_bf16(const void *k, float *dinp, float *dweight, float *dbias, const float *dout,
                         const float *inp, const float *weight, int N, int IN, int OUT);

/* ---- layernorm over the last dimension (layernorm.c) ------------------------------------------ */
/* out = (inp - mean) * rstd * weight + bias, rstd = 1/sqrt(var + eps), var biased (as torch).
 * inp/out [N,C]; weight/bias [C]; mean/rstd [N] (may be NULL: not stored). out may alias inp. */
void layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *weight,
                       const float *bias, int N, int C, float eps);
/* dinp [N,C] += ...; dweight/dbias [C] += ... (each may be NULL); mean/rstd from the forward. */
void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                        const float *weight, const float *mean, const float *rstd, int N, int C);

/* ---- GELU, exact erf form: 0.5 * x * (1 + erf(x / sqrt(2))) (gelu.c) --------------------------- */
void gelu_forward(float *out, const float *inp, size_t N);               /* out may alias inp */
void gelu_backward(float *dinp, const float *inp, const float *dout, size_t N);   /* dinp += */

/* ---- multi-head self-attention (attention.c) -------------------------------------------------- */
/* Element strides of q, k, v, out and their gradients (all four share one layout):
 *   [B,NH,T,HS] contiguous: sb = NH*T*HS, sh = T*HS, st = HS
 *   [B,T,NH,HS] (= [B,T,C], heads side by side, as a linear layer writes them): sb = T*C, sh = HS, st = C
 * The last dimension (HS) is always contiguous. */
typedef struct {
    int B, NH, T, HS;
    long sb, sh, st;
} bq_attn_shape;

/* A padded row's length: up to its last real token (mask row of 0/1), or all T when every token is padding (an
 * all-padding row is computed in full: every key gets the same -10000, so the softmax is uniform over them).
 * What attention computes of a row's keys, and what packed inference keeps of it. */
static inline int bq_row_length(const float *mask_row, int T) {
    int L = T;
    while (L > 0 && mask_row[L - 1] == 0.0f) L--;
    return L ? L : T;
}

/* att[b,h] = softmax(q k^T / sqrt(HS) + (1 - mask[b]) * -10000)   [B,NH,T,T], stored for backward
 * out[b,h] = dropout(att[b,h]) @ v                       (dropout numbered as bq_rng says, keyed by tensor_id)
 * mask [B,T] of 0/1 (1 = real token) or NULL. dropout_p = 0 disables dropout. att may be NULL when no backward
 * follows: each thread then works in one [T,T] block of its own instead of B*NH of them.
 * Returns BQ_ERR_NOMEM if a thread's [T,T] dropout scratch cannot be allocated. */
int attention_forward(float *out, float *att, const float *q, const float *k, const float *v,
                      const float *mask, bq_attn_shape s, float dropout_p, bq_rng r, uint32_t tensor_id);
/* Inference on packed rows (no padding stored): row b's T_b = row_off[b+1] - row_off[b] tokens are rows
 * row_off[b] .. row_off[b+1]-1 of q, k, v, out ([Ntok, ld] with head h in columns h*HS .. h*HS+HS-1); mask is
 * the [B,Tpad] padding mask the rows came from (holes inside a row stay masked) or NULL. No dropout, nothing kept
 * for backward. Returns BQ_ERR_NOMEM if a thread's [Tmax,Tmax] scratch cannot be allocated. */
int attention_forward_packed(float *out, const float *q, const float *k, const float *v, const float *mask, int Tpad,
                             const int *row_off, int B, int NH, int HS, int ld);
/* Training (and inference) attention over rows of their own lengths, what the engine runs: q, k, v, out are
 * [off[B], ld] (head h in columns h*HS .. h*HS+HS-1), row b's T_b = off[b+1] - off[b] tokens attend to each
 * other; mask [B,Tpad] of 0/1 (NULL: all real; holes inside a row stay masked with -10000). Dropout on the
 * probabilities (p > 0) numbers element (b, h, i, j) as bq_rng says. `saved` (attention_saved_floats of them, or
 * NULL when no backward follows) keeps what backward needs; backward OVERWRITES dq, dk, dv. BQ_ERR_NOMEM when a
 * thread's scratch cannot be allocated. */
size_t attention_saved_floats(int B, const int *off, int NH);
int attention_forward_rows(float *out, float *saved, const float *q, const float *k, const float *v,
                           const float *mask, int Tpad, int B, const int *off, int NH, int HS, int ld, float p,
                           bq_rng r, uint32_t tensor_id);
int attention_backward_rows(float *dq, float *dk, float *dv, const float *dout, const float *out, const float *saved,
                            const float *q, const float *k, const float *v, const float *mask, int Tpad, int B,
                            const int *off, int NH, int HS, int ld, float p, bq_rng r, uint32_t tensor_id);
/* dq, dk, dv += gradients; att is the forward's (pre-dropout) probabilities; the dropout mask is regenerated.
 * Each thread allocates one or two [T,T] scratch blocks (BQ_ERR_NOMEM if that fails). */
int attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                       const float *q, const float *k, const float *v, bq_attn_shape s, float dropout_p,
                       bq_rng r, uint32_t tensor_id);

/* ---- span loss (span_loss.c) ------------------------------------------------------------------ */
/* Hugging Face BertForQuestionAnswering: positions are clamped to [0, T]; a position equal to T is
 * ignored; loss = (CE(start) + CE(end)) / 2, each CE the mean over its non-ignored rows (0 if none).
 * start/end logits [B,T]; positions [B]; dstart/dend [B,T] are OVERWRITTEN with d(loss)/d(logits)
 * times grad_scale (either may be NULL). Returns the loss. */
float span_loss(float *dstart, float *dend, const float *start_logits, const float *end_logits,
                const int64_t *start_pos, const int64_t *end_pos, int B, int T, float grad_scale);
/* The engine's span loss over rows of their own lengths (row b: logits off[b] .. off[b+1]-1 of [off[B]]): each
 * row's softmax over its real tokens only, so padding cannot hold an answer (BertForQuestionAnswering's includes
 * the padded positions of the batch). Positions are clamped to [0, T] and T ignored as above; a position at or
 * after the row's end is ignored as well. dstart/dend [off[B]] are overwritten. */
float span_loss_rows(float *dstart, float *dend, const float *start_logits, const float *end_logits,
                     const int64_t *start_pos, const int64_t *end_pos, int B, const int *off, int T, float grad_scale);

/* ---- optimizer (adamw.c) ---------------------------------------------------------------------- */
/* torch.optim.AdamW, one step (step counts from 1), with the gradient multiplied by grad_scale first
 * (global-norm clipping without touching the gradient buffer):
 *   p -= lr * wd * p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
 *   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)            [N] */
void adamw_update(float *param, const float *grad, float *m, float *v, size_t N, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int step, float grad_scale);
/* sum of squares of g [N], accumulated in double (deterministic for a given thread count). */
double sum_squares(const float *g, size_t N);
/* g *= scale [N] */
void scale_inplace(float *g, size_t N, float scale);

#ifdef __cplusplus
}
#endif
#endif /* BERTQA_H */
