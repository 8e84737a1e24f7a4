/* bertqa CUDA backend: the engine of csrc/model.c on an NVIDIA GPU, and its kernels one by one.
 *
 * Plain C, so the CPython module (cuda/module.c, built by the host C compiler) can include it without the
 * CUDA headers. Device code lives in the .cu files beside it (nvcc).
 *
 * Errors: every function returns a bq_status (BQ_OK = 0) and never exits. A failure of a CUDA, cuBLAS or
 * cuBLASLt call returns BQ_ERR_CUDA / BQ_ERR_CUBLAS and leaves a message on the calling thread,
 * bq_cuda_last_error(), naming the call, the library's error string and file:line, e.g.
 *   "cudaMalloc(&p, 1073741824 bytes) failed: out of memory (cudaErrorMemoryAllocation) at cuda/model.cu:212"
 * Kernels run asynchronously on the engine's stream, so an error inside a kernel surfaces at the next
 * synchronising call (the message then says which one).
 *
 * Precision: BQ_FP32 computes like the CPU engine (fp32 storage, fp32 matrix products without TF32) for parity
 * checks. BQ_BF16 keeps fp32 master weights, fp32 gradients and fp32 Adam state, and computes with a bf16 copy of
 * the weights and bf16 activations; every sum (matrix products, LayerNorm, softmax, losses, norms) accumulates
 * in fp32 or wider.
 */
#ifndef BERTQA_CUDA_H
#define BERTQA_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "bertqa.h"   /* bq_status */
#include "model.h"    /* bq_config, BQ_NUM_TENSORS */

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes of the CUDA backend, beyond bertqa.h's (kept apart from its range). */
#define BQ_ERR_CUDA 101     /* a CUDA runtime call or a kernel launch failed (message: bq_cuda_last_error) */
#define BQ_ERR_CUBLAS 102   /* a cuBLAS / cuBLASLt call failed */
#define BQ_ERR_DEVICE 103   /* no usable GPU (no driver, no device, compute capability below 8.0) */
#define BQ_ERR_NCCL 104     /* NCCL could not be loaded, or an NCCL call failed */

enum { BQ_FP32 = 0, BQ_BF16 = 1 };

/* The message of the last failure on this thread ("" if none). */
const char *bq_cuda_last_error(void);
/* A short name for a status: "out of memory", "CUDA error", ... */
const char *bq_cuda_status_string(int status);
/* Leaves a printf-formatted message for bq_cuda_last_error() and returns status (every failure path's last call). */
int bq_cuda_fail(int status, const char *fmt, ...);

/* ---- devices ----------------------------------------------------------------------------------- */
/* Number of usable devices (compute capability >= 8.0), 0 with a message in *reason (buffer of n bytes) when
 * none: no driver, no device, too old. Never fails otherwise. */
int bq_cuda_device_count(char *reason, size_t n);
/* Name, compute capability and memory of device `dev`. */
int bq_cuda_device_info(int dev, char *name, size_t n, int *major, int *minor, size_t *total_mem, int *sms);
/* Runtime and driver versions (e.g. 13000 = 13.0; driver 0 when no driver is installed). */
void bq_cuda_versions(int *runtime, int *driver);

/* ---- the engine ---------------------------------------------------------------------------------- */
typedef struct bq_cuda_model bq_cuda_model;

/* Creates a model on device `dev` and uploads the parameters (host float32 [nparams], HF state_dict order, the
 * layout of csrc/model.h). training = 1 also allocates gradients and Adam m, v (zeroed). */
int bq_cuda_model_init(bq_cuda_model **out, const bq_config *cfg, const float *host_params, int precision,
                       int training, int dev);
void bq_cuda_model_free(bq_cuda_model *m);
size_t bq_cuda_model_nparams(const bq_cuda_model *m);
int bq_cuda_model_ntensors(const bq_cuda_model *m);
const size_t *bq_cuda_model_offsets(const bq_cuda_model *m);   /* [ntensors + 1], host memory */
int bq_cuda_model_precision(const bq_cuda_model *m);
int bq_cuda_model_training(const bq_cuda_model *m);
/* Attention: BQ_ATTN_CUDNN (the default) runs cuDNN's fused scaled-dot-product attention wherever it takes the batch
 * (bf16 engine, a mask of real tokens then padding, T >= 2, a shape cuDNN supports, a build and a machine with
 * cuDNN) and the own kernels otherwise; BQ_ATTN_OWN always the own kernels (exact CPU parity with attention dropout:
 * cuDNN's dropout draws its own Philox stream). attention_used: what the last forward ran and why ("cudnn", or
 * "own (<reason>)"). cudnn_version: cudnnGetVersion() of the cuDNN in use, 0 in a build without cuDNN. */
enum { BQ_ATTN_OWN = 0, BQ_ATTN_CUDNN = 1 };
int bq_cuda_model_set_attention(bq_cuda_model *m, int mode);
int bq_cuda_model_attention(const bq_cuda_model *m);
const char *bq_cuda_model_attention_used(const bq_cuda_model *m);
size_t bq_cuda_cudnn_version(void);
/* Allocates (zeroed) gradients and Adam state if not there yet. */
int bq_cuda_model_enable_training(bq_cuda_model *m);
int bq_cuda_model_zero_grad(bq_cuda_model *m);

/* Host <-> device copies of a whole flat buffer. which: 0 parameters, 1 gradients, 2 Adam m, 3 Adam v.
 * Uploading parameters also refreshes the bf16 copy. Synchronous. */
enum { BQ_BUF_PARAMS = 0, BQ_BUF_GRADS = 1, BQ_BUF_M = 2, BQ_BUF_V = 3 };
int bq_cuda_model_download(bq_cuda_model *m, int which, float *host);
int bq_cuda_model_upload(bq_cuda_model *m, int which, const float *host);

/* As bq_forward (csrc/model.h): host ids/types [B,T] (types may be NULL), mask [B,T] 0/1 (NULL: all real);
 * start/end [B,T] host outputs (either may be NULL: not copied back). BQ_ERR_INDEX for an id out of range.
 * window_ids [B] (NULL: row b is window b) key the dropout masks of a train forward: hidden element (b, t, c) is
 * number (window_ids[b] * P + t) * C + c, attention element (b, h, i, j) ((window_ids[b] * NH + h) * P + i) * P + j
 * (P = max_position_embeddings), so a window's mask depends neither on its row in the batch nor on T; BQ_ERR_ARG
 * for a negative id (or one so large an index would pass 2^64). */
int bq_cuda_forward(bq_cuda_model *m, const int64_t *ids, const int64_t *types, const float *mask,
                    const int64_t *window_ids, int B, int T, int train, uint64_t seed, uint32_t step, float *start,
                    float *end);
/* As bq_backward: after a train forward with the same ids/types/seed/step (and the forward's window ids). Gradients
 * ACCUMULATE (times loss_scale); *loss gets the unscaled loss. */
int bq_cuda_backward(bq_cuda_model *m, const int64_t *ids, const int64_t *types, const int64_t *start_pos,
                     const int64_t *end_pos, uint64_t seed, uint32_t step, float loss_scale, float *loss);
/* As bq_adamw_step: global norm (deterministic), clipping, AdamW over the flat buffer (tensor i at lr * lr_scale[i],
 * lr_scale NULL: all 1); *norm gets the norm before clipping; a non-finite norm skips the update (and returns BQ_OK:
 * the caller reports it). */
int bq_cuda_adamw_step(bq_cuda_model *m, const uint8_t *decay, const float *lr_scale, float lr, float beta1,
                       float beta2, float eps, float weight_decay, float max_norm, int step, double *norm);
size_t bq_cuda_model_arena_bytes(const bq_cuda_model *m);
int bq_cuda_model_release_arena(bq_cuda_model *m);
int bq_cuda_model_synchronize(bq_cuda_model *m);
/* Matrix products so far that ran through cuBLASLt and through the cuBLAS fallback. */
void bq_cuda_model_gemm_stats(const bq_cuda_model *m, long *lt_calls, long *fallback_calls);

/* The device gradient buffer (fp32 [*n], the flat parameter layout) and the engine's stream (a cudaStream_t) and
 * device, for a collective over it (BQ_ERR_ARG on an inference-only model). */
int bq_cuda_model_grad_buffer(bq_cuda_model *m, float **grads, size_t *n, void **stream, int *dev);

/* ---- NCCL, loaded at run time (cuda/nccl.c) ------------------------------------------------------- */
/* bertqa._cuda never links libnccl: it builds, imports and runs without it, and loads libnccl.so.2 on first use:
 * $BERTQA_NCCL_LIBRARY when set (that file and no other), else `wheel_lib` (the nvidia-nccl-cu13 wheel's
 * nvidia/nccl/lib/libnccl.so.2 that the module finds on sys.path; may be NULL), else the loader's libnccl.so.2
 * (LD_LIBRARY_PATH, this module's runpath = the CUDA toolkit's lib, the system's). A failure (BQ_ERR_NCCL) says what
 * was tried and why each failed. Thread-safe; once loaded, later calls return at once. */
int bq_nccl_load(const char *wheel_lib);
/* The file loaded ("" before a successful bq_nccl_load). */
const char *bq_nccl_library(void);
/* NCCL's version code, e.g. 22809 for 2.28.9 (loads NCCL). */
int bq_nccl_version(int *version);
#define BQ_NCCL_ID_BYTES 128
/* A new unique id (rank 0 makes it and sends it to the others, e.g. over MPI). Needs no GPU. */
int bq_nccl_unique_id(unsigned char id[BQ_NCCL_ID_BYTES]);

/* One rank's communicator, bound to CUDA device dev. */
typedef struct bq_nccl_comm bq_nccl_comm;
/* Collective over all nranks ranks (each calls it with the same id): blocks until every rank has joined. Arguments
 * are checked (BQ_ERR_ARG) before NCCL or CUDA is touched. */
int bq_nccl_comm_init(bq_nccl_comm **out, const unsigned char id[BQ_NCCL_ID_BYTES], int nranks, int rank, int dev);
/* buf[i] = sum over ranks of buf[i], fp32 [n] in place on device dev, queued on `stream` (a cudaStream_t), then
 * waited for while polling NCCL's asynchronous error, so a failed peer is an error rather than a hang. timeout_s > 0:
 * past it, the communicator is aborted and BQ_ERR_NCCL returned. After any NCCL failure the communicator only takes
 * abort / free. */
int bq_nccl_allreduce_sum(bq_nccl_comm *c, float *buf, size_t n, void *stream, int dev, double timeout_s);
/* ncclCommDestroy (waits for its pending work) or ncclCommAbort (does not); the communicator is then closed and
 * later calls but free fail with BQ_ERR_ARG. Closing a closed one is BQ_OK. */
int bq_nccl_comm_close(bq_nccl_comm *c, int abort);
int bq_nccl_comm_closed(const bq_nccl_comm *c);
/* Aborts if still open, frees. */
void bq_nccl_comm_free(bq_nccl_comm *c);

/* ---- kernels one by one, on host arrays (for tests and the lab) --------------------------------- */
/* Each copies its inputs to the device, runs the CUDA kernel(s) in the given precision (BQ_BF16: inputs rounded
 * to bf16 on the device, outputs widened back) and copies the results back; the semantics are those of the
 * CPU kernel of the same name in bertqa.h, except where noted. Outputs are overwritten. */

/* u[i] = bq_uniform(seed, step, tensor_id, first + i), i < n */
int bq_cuda_uniform(float *u, size_t n, uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t first);
/* out = dropout_forward(inp) [N] */
int bq_cuda_dropout(float *out, const float *inp, size_t N, float p, uint64_t seed, uint32_t step,
                    uint32_t tensor_id, int precision);
/* res = x + dropout(y, site); out = LayerNorm(res); x may be NULL (res = dropout(y)). [N,C] */
int bq_cuda_residual_layernorm(float *res, float *out, float *mean, float *rstd, const float *x, const float *y,
                               const float *w, const float *b, int N, int C, float eps, float p, uint64_t seed,
                               uint32_t step, uint32_t site, int precision);
/* dinp = LayerNorm'(dout_eff), dout_eff = dropout'(dout, in_site) when p_in > 0 else dout;
 * branch = dropout'(dinp, out_site) when branch != NULL; dw += ..., db += ... (fp32, host arrays accumulate). */
int bq_cuda_layernorm_backward(float *dinp, float *branch, float *dw, float *db, const float *dout, const float *inp,
                               const float *w, const float *mean, const float *rstd, int N, int C, float p_in,
                               uint32_t in_site, float p_out, uint32_t out_site, uint64_t seed, uint32_t step,
                               int precision);
/* emb = wte[ids] + wpe[t] + wtt[types]; out = dropout(LayerNorm(emb), site 0). ids/types [B,T] int64. */
int bq_cuda_embedding_layernorm(float *emb, float *out, float *mean, float *rstd, const int64_t *ids,
                                const int64_t *types, const float *wte, const float *wpe, const float *wtt,
                                const float *lnw, const float *lnb, int B, int T, int C, int V, int P, int NT,
                                float eps, float p, uint64_t seed, uint32_t step, int precision);
/* dwte/dwpe/dwtt += scatter of dout [B,T,C] (host arrays accumulate), pad_id rows excluded. */
int bq_cuda_embedding_backward(float *dwte, float *dwpe, float *dwtt, const float *dout, const int64_t *ids,
                               const int64_t *types, int B, int T, int C, int V, int P, int NT, int64_t pad_id,
                               int precision);
int bq_cuda_gelu(float *out, const float *inp, size_t N, int precision);
/* dinp = dout * gelu'(inp) (overwritten, not accumulated) */
int bq_cuda_gelu_backward(float *dinp, const float *inp, const float *dout, size_t N, int precision);
/* out [N,OUT] = inp [N,IN] @ W[OUT,IN]^T + b (b may be NULL); through cuBLASLt (bias epilogue) or cuBLAS. */
int bq_cuda_linear(float *out, const float *inp, const float *w, const float *b, int N, int IN, int OUT,
                   int precision);
/* dinp = dout @ W (overwritten); dw += dout^T inp; db += colsum(dout) (host arrays accumulate). Any may be NULL. */
int bq_cuda_linear_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                            int N, int IN, int OUT, int precision);
/* q, k, v, out: [B,T,NH*HS] (heads side by side); att [B,NH,T,T] (pre-dropout probabilities). */
int bq_cuda_attention(float *out, float *att, const float *q, const float *k, const float *v, const float *mask,
                      int B, int NH, int T, int HS, float p, uint64_t seed, uint32_t step, uint32_t site,
                      int precision);
/* dq, dk, dv overwritten; att from bq_cuda_attention. */
int bq_cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                               const float *q, const float *k, const float *v, int B, int NH, int T, int HS, float p,
                               uint64_t seed, uint32_t step, uint32_t site, int precision);
/* cuDNN's fused attention alone (cuda/cudnn_attention.cu; bf16 on the device): q, k, v, out [B,T,NH,HS]; each row b
 * attends to its first lengths[b] keys (1..T). With dout (else NULL) also the backward into dq, dk, dv. BQ_ERR_ARG
 * (and the reason) where there is no cuDNN or it refuses the shape. */
int bq_cuda_cudnn_attention(float *out, float *dq, float *dk, float *dv, const float *dout, const float *q,
                            const float *k, const float *v, const int64_t *lengths, int B, int NH, int T, int HS,
                            float p, uint64_t seed);
/* As span_loss: *loss, dstart/dend [B,T] overwritten (either may be NULL) */
int bq_cuda_span_loss(float *loss, float *dstart, float *dend, const float *start_logits, const float *end_logits,
                      const int64_t *start_pos, const int64_t *end_pos, int B, int T, float grad_scale);
/* As adamw_update, in place on host arrays. */
int bq_cuda_adamw(float *param, const float *grad, float *m, float *v, size_t N, float lr, float beta1, float beta2,
                  float eps, float weight_decay, int step, float grad_scale);
/* Sum of squares in double with the engine's deterministic two-stage reduction. */
int bq_cuda_sum_squares(double *out, const float *g, size_t N);

/* ---- host builds of device logic (run without a GPU) --------------------------------------------- */
/* The kernels' Philox code compiled for the host: u[i] = uniform of element first + i. */
void bq_cuda_host_uniform(float *u, size_t n, uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t first);
/* The kernels' row walk (for_row_quads, 32 lanes) on the host: out = dropout(x) over rows [rows, cols] numbered
 * from `first`; must equal dropout_forward of csrc/rng.c (its Philox: csrc/philox.c). */
void bq_cuda_host_dropout_rows(float *out, const float *x, int rows, int cols, float p, uint64_t seed, uint32_t step,
                               uint32_t tensor_id, uint64_t first);
/* The same walk with the engine's window-keyed numbering (bq_drop in common.cuh): out = dropout(x) of a hidden
 * state [B,T,C], element (b, t, c) numbered (win[b] * P + t) * C + c, and of attention probabilities [B,NH,T,T],
 * element (b, h, i, j) numbered ((win[b] * NH + h) * P + i) * P + j. win [B] host memory, NULL: win[b] = b. */
void bq_cuda_host_dropout_hidden(float *out, const float *x, int B, int T, int C, int P, const int64_t *win, float p,
                                 uint64_t seed, uint32_t step, uint32_t site);
void bq_cuda_host_dropout_attention(float *out, const float *x, int B, int NH, int T, int P, const int64_t *win,
                                    float p, uint64_t seed, uint32_t step, uint32_t site);
/* The engine's grouping of token ids for the deterministic embedding scatter (cuda/embedding.cu): uniq [U] ids in
 * order of first appearance, start [U+1], tok [start[U]] token indices ascending within a group; tokens equal to
 * pad_id are left out. count [V] must be zero on entry and is zero again on return. Returns U. */
int bq_cuda_group_ids(const int *ids, int N, int64_t pad_id, int *count, int *uniq, int *start, int *tok);

#ifdef __cplusplus
}
#endif
#endif /* BERTQA_CUDA_H */
