/* The CUDA kernels of the engine, one launcher each (defined in the .cu file named after the op, instantiated for
 * T = float and T = bf16). All run on the given stream and return a bq_status.
 *
 * Conventions (as csrc/bertqa.h): B batch, T sequence length, C hidden, NH heads, HS head size, N = B*T rows.
 * Unlike the CPU kernels, activation gradients are OVERWRITTEN (the engine needs no zeroing passes); parameter
 * gradients (fp32) ACCUMULATE, in a fixed order (no atomics), so results are bit-identical run to run.
 */
#ifndef BERTQA_CUDA_KERNELS_CUH
#define BERTQA_CUDA_KERNELS_CUH

#include "common.cuh"

/* ---- matrix products (linear.cu) --------------------------------------------------------------------- */
/* One cuBLASLt handle, workspace and a cache of matmul descriptors and chosen algorithms, per stream. */
struct bq_gemm_plan;
struct bq_gemm {
    cudaStream_t stream;
    cublasLtHandle_t lt;
    cublasHandle_t blas;          /* fallback for shapes / alignments cuBLASLt has no algorithm for */
    void *workspace;
    size_t workspace_bytes;
    bq_gemm_plan *plans;          /* [BQ_GEMM_PLANS] */
    int nplans, next_evict;
    long lt_calls, fallback_calls; /* counters, for tests and the benchmark */
};
int bq_gemm_init(bq_gemm *g, cudaStream_t stream);
void bq_gemm_destroy(bq_gemm *g);

/* Row-major, batched: for each i < batch,
 *   C_i[M,N] = alpha * op(A_i) @ op(B_i) + beta * C_i (+ bias[N] broadcast over rows, when bias != NULL)
 * A_i = A + i * sA, op(A_i) is [M,K] (transA: A_i is stored [K,M]); likewise B ([K,N]; transB: stored [N,K]).
 * ta/tb/tc: CUDA_R_32F or CUDA_R_16BF (A and B alike); bias has type tc. Compute and scale type fp32 (no TF32). */
int bq_matmul(bq_gemm *g, bool transA, bool transB, int M, int N, int K, float alpha, const void *A,
              cudaDataType_t ta, int lda, long long sA, const void *B, cudaDataType_t tb, int ldb, long long sB,
              float beta, void *C, cudaDataType_t tc, int ldc, long long sC, int batch, const void *bias);

/* y [N,OUT] = x [N,IN] @ W[OUT,IN]^T + b (b may be NULL) */
template <typename T>
int linear_forward(bq_gemm *g, T *out, const T *inp, const T *w, const T *b, int N, int IN, int OUT);
/* dinp [N,IN] = dout @ W + beta * dinp */
template <typename T>
int linear_backward_input(bq_gemm *g, T *dinp, float beta, const T *dout, const T *w, int N, int IN, int OUT);
/* dw [OUT,IN] (fp32) += dout^T @ inp */
template <typename T>
int linear_backward_weight(bq_gemm *g, float *dw, const T *dout, const T *inp, int N, int IN, int OUT);

/* Column sums, deterministic (two stages: row chunks, then chunks in order); `scratch` holds
 * colsum_scratch_floats(N, C) floats. dst[c] += sum_n x[n,c] over rows n with (rowkey == NULL || rowkey[n] == key). */
size_t colsum_scratch_floats(int N, int C);
template <typename T>
int colsum_add(cudaStream_t s, float *dst, const T *x, int N, int C, const int *rowkey, int key, float *scratch);
/* stage 2 alone: dst[c] += sum over the row chunks of partial [chunks(N), C] */
int colsum_finish(cudaStream_t s, float *dst, const float *partial, int N, int C);

/* ---- dropout (rng.cu) ---------------------------------------------------------------------------------------- */
/* u[i] = the uniform of element first + i under (seed, step, site), as bq_uniform */
int launch_uniform(cudaStream_t s, float *u, size_t n, uint64_t seed, uint32_t step, uint32_t site, uint64_t first);

/* ---- elementwise --------------------------------------------------------------------------------------- */
template <typename T> int gelu_forward(cudaStream_t s, T *out, const T *inp, size_t N);
/* dinp = dout * gelu'(inp); dinp may alias dout */
template <typename T> int gelu_backward(cudaStream_t s, T *dinp, const T *inp, const T *dout, size_t N);

/* ---- layernorm (layernorm.cu) ------------------------------------------------------------------------------ */
/* res = x + dropout(y, d) (x may be NULL); out = LN(res) with stats of the stored res; mean/rstd [N] fp32. */
template <typename T>
int residual_layernorm_forward(cudaStream_t s, T *res, T *out, float *mean, float *rstd, const T *x, const T *y,
                               const T *w, const T *b, int N, int C, float eps, bq_drop d);
/* g = dropout'(dout, d_in) (identity when d_in.p == 0); dinp = LN'(g); branch = dropout'(dinp, d_out) if non-NULL.
 * dinp may not alias dout. */
template <typename T>
int layernorm_backward(cudaStream_t s, T *dinp, T *branch, const T *dout, const T *inp, const T *w, const float *mean,
                       const float *rstd, int N, int C, bq_drop d_in, bq_drop d_out);
/* dw += sum_n g * xhat, db += sum_n g (fp32); scratch: 2 * colsum_scratch_floats(N, C) floats */
template <typename T>
int layernorm_param_grads(cudaStream_t s, float *dw, float *db, const T *dout, const T *inp, const float *mean,
                          const float *rstd, int N, int C, bq_drop d_in, float *scratch);

/* ---- embeddings (embedding.cu) ----------------------------------------------------------------------------- */
/* emb = wte[ids] + wpe[t] + wtt[types] (types NULL: 0); out = dropout(LN(emb), d). ids/types int32, validated. */
template <typename T>
int embedding_layernorm_forward(cudaStream_t s, T *emb, T *out, float *mean, float *rstd, const int *ids,
                                const int *types, const T *wte, const T *wpe, const T *wtt, const T *lnw,
                                const T *lnb, int B, int T_, int C, float eps, bq_drop d);
/* The host's grouping of a batch's token ids for a deterministic scatter: tokens sorted by id (ascending token
 * order within an id), pad tokens left out. uniq [U], start [U+1], tok [start[U]]. */
struct bq_id_groups {
    int U;
    const int *uniq, *start, *tok;   /* device */
};
/* dwte[uniq[g]] += sum of dout over the group's tokens; dwpe[t] += sum_b dout[b,t]; dwtt[k] += sum over type k. */
template <typename T>
int embedding_backward(cudaStream_t s, float *dwte, float *dwpe, float *dwtt, const T *dout, bq_id_groups groups,
                       const int *types, int B, int T_, int C, int NT, float *scratch);

/* ---- attention (attention.cu) ------------------------------------------------------------------------------ */
/* [B,T,NH,HS] <-> [B,NH,T,HS] */
template <typename T> int split_heads(cudaStream_t s, T *out, const T *inp, int B, int T_, int NH, int HS);
template <typename T> int merge_heads(cudaStream_t s, T *out, const T *inp, int B, int T_, int NH, int HS);

struct bq_attn_bufs {
    float *scores;   /* [B,NH,T,T] fp32 scratch: scores, then dP in backward */
    void *pdrop;     /* [B,NH,T,T] T scratch: dropout(att), then dS in backward */
    void *headbuf;   /* [B,NH,T,HS] x 3 T scratch */
};
/* ctx [B,T,C] from head-major qh, kh, vh [B,NH,T,HS]; att [B,NH,T,T] keeps the pre-dropout probabilities. */
template <typename T>
int attention_forward(bq_gemm *g, T *ctx, T *att, const T *qh, const T *kh, const T *vh, const float *mask, int B,
                      int NH, int T_, int HS, bq_drop d, bq_attn_bufs bufs);
/* dq, dk, dv [B,T,C] (overwritten) from dctx [B,T,C] */
template <typename T>
int attention_backward(bq_gemm *g, T *dq, T *dk, T *dv, const T *dctx, const T *att, const T *qh, const T *kh,
                       const T *vh, int B, int NH, int T_, int HS, bq_drop d, bq_attn_bufs bufs);

/* ---- attention through cuDNN's fused SDPA (cudnn_attention.cu; bf16) ------------------------------------------ */
/* q, k, v, o, dout, dq, dk, dv: the engine's [B*T, NH*HS] buffers; stats [B,NH,T] fp32; seq_kv [B] (device) each
 * row's key length. Every function is there in a build without cuDNN too (create then says why). */
struct bq_cudnn;
int bq_cudnn_create(bq_cudnn **out, char *why, size_t n);   /* 1, or 0 with the reason in why */
void bq_cudnn_destroy(bq_cudnn *c);
/* 1 when cuDNN takes this shape (its graphs, forward and for training backward, built and cached), else 0 with
 * the reason in bq_cudnn_why; no CUDA error is left behind either way */
int bq_cudnn_prepare(bq_cudnn *c, int B, int T, int NH, int HS, float p, int training);
const char *bq_cudnn_why(const bq_cudnn *c);
size_t bq_cudnn_version(void);   /* cudnnGetVersion() of the library in use; 0 in a build without cuDNN */
int bq_cudnn_forward(bq_cudnn *c, cudaStream_t s, bf16 *o, float *stats, const bf16 *q, const bf16 *k,
                     const bf16 *v, const int *seq_kv, int B, int T, int NH, int HS, float p, uint64_t seed,
                     int training);
int bq_cudnn_backward(bq_cudnn *c, cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout, const bf16 *o,
                      const float *stats, const bf16 *q, const bf16 *k, const bf16 *v, const int *seq_kv, int B,
                      int T, int NH, int HS, float p, uint64_t seed);

/* ---- head and loss (span_loss.cu) -------------------------------------------------------------------------- */
/* start[n] = logits[2n] + qab[0], end[n] = logits[2n+1] + qab[1] */
int qa_split(cudaStream_t s, float *start, float *end, const float *logits, const float *qab, int N);
/* Per row: rowloss[w*B + b] = CE of row b (w = 0 start, 1 end; 0 when ignored), and the gradient
 * dlogits[(b*T + t)*2 + w] = gscale[w] * (softmax - onehot) (0 for ignored rows). pos: clamped to [0, T] by the
 * caller (T = ignored). len [B] (device) or nullptr: the softmax of row b runs over its first len[b] positions
 * (the caller marks positions >= len[b] ignored); positions from len[b] on get gradient 0. */
template <typename T>
int span_loss_rows(cudaStream_t s, T *dlogits, double *rowloss, const float *start, const float *end,
                   const int *pos, const int *len, int B, int T_, double gscale_start, double gscale_end);

/* ---- optimizer (adamw.cu) ---------------------------------------------------------------------------------- */
#define BQ_NORM_BLOCKS 1024
/* out[0] = sum g^2 in double; partials: BQ_NORM_BLOCKS doubles. Fixed grid: the same result on any GPU. */
int sum_squares(cudaStream_t s, double *out, const float *g, size_t N, double *partials);
/* The blocks of an AdamW launch, each inside one tensor (so each knows its weight decay). */
struct bq_adam_blocks {
    int nblocks;
    const long long *start;    /* [nblocks] first element, device */
    const int *len, *tensor;   /* [nblocks] element count and tensor index, device */
};
#define BQ_ADAM_CHUNK 4096
/* lr, step_size: [ntensors] device arrays, tensor t's learning rate and lr / (1 - beta1^step) (layer-wise decay). */
int adamw_flat(cudaStream_t s, float *param, bf16 *param_bf16, const float *grad, float *m, float *v,
               bq_adam_blocks blocks, const uint8_t *decay, const float *lr, const float *step_size, float beta1,
               float beta2, float eps, float weight_decay, float bc2_sqrt, float grad_scale);

#endif
