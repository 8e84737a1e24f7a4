/* The BERT-for-QA engine on the GPU: csrc/model.c's forward, backward and AdamW over the same flat parameter
 * layout (HF state_dict order, csrc/model.h), with everything resident on the device between calls. Host <->
 * device traffic per step: the token batch in; the loss (training) or the logits (inference) and the gradient norm
 * out.
 *
 * Buffers on the device: fp32 parameters (the master copy), fp32 gradients, fp32 Adam m and v, and in bf16 mode a
 * bf16 copy of the parameters that the kernels compute with (refreshed by every upload and by the AdamW kernel).
 * Activations live in one arena laid out per (B, T, train), grown when a call needs more.
 *
 * One encoder layer, x [N,C], N = B*T (as model.c; dropout sites: 0 embeddings, 1+3l attention probabilities,
 * 2+3l attention output, 3+3l feed-forward output; each site's elements numbered by the rows' window ids, see
 * bq_drop in common.cuh):
 *   q,k,v = x W^T + b  (cuBLASLt, bias epilogue) -> split heads -> attention -> ctx
 *   res1 = x + dropout(ctx Wo^T + bo);  h1 = LN1(res1)          (one fused kernel)
 *   fc = h1 W1^T + b1;  gelu = GELU(fc)
 *   res2 = h1 + dropout(gelu W2^T + b2);  out = LN2(res2)       (one fused kernel)
 * Head: logits [N,2] (fp32) = x_L Wqa^T, + bqa while de-interleaving into start/end.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cstdio>
#include <type_traits>

#include "kernels.cuh"

#define SITE_EMB 0u
#define SITE_ATT(l) (1u + 3u * (unsigned)(l))
#define SITE_AO(l) (2u + 3u * (unsigned)(l))
#define SITE_FFN(l) (3u + 3u * (unsigned)(l))

/* tensor indices: embeddings, then BQ_LAYER_TENSORS per layer (model.h's order), then the QA head */
enum { E_WTE = 0, E_WPE, E_WTT, E_LNW, E_LNB };
enum { QW = 0, QB, KW, KB, VW, VB, AOW, AOB, LN1W, LN1B, FCW, FCB, FC2W, FC2B, LN2W, LN2B };
#define LT(l, i) (5 + BQ_LAYER_TENSORS * (l) + (i))
#define QAW(L) (5 + BQ_LAYER_TENSORS * (L))
#define QAB(L) (6 + BQ_LAYER_TENSORS * (L))

struct layer_acts {
    void *qh, *kh, *vh;      /* [B,NH,T,HS] each (head-major: what the batched products take) */
    void *att;               /* [B,NH,T,T] probabilities before dropout */
    void *ctx;               /* [N,C] */
    void *res1, *h1;         /* [N,C] LayerNorm 1 input and output */
    float *mean1, *rstd1;    /* [N] */
    void *fc, *gelu;         /* [N,I] */
    void *res2, *out;        /* [N,C] LayerNorm 2 input and output */
    float *mean2, *rstd2;
};

struct bq_cuda_model {
    bq_config cfg;
    int precision, dev, training;
    size_t nparams;
    int ntensors;
    size_t *offsets;   /* host [ntensors + 1] */
    cudaStream_t stream;
    bq_gemm gemm;
    int gemm_ready;
    float *params, *grads, *m, *v;
    bf16 *params_bf16;
    /* optimizer */
    long long *adam_start;
    int *adam_len, *adam_tensor, adam_nblocks;
    uint8_t *decay, *host_decay;   /* per-tensor weight-decay flags, uploaded with each step */
    float *lrs, *host_lrs;         /* [2 * ntensors]: each tensor's lr, then its lr / (1 - beta1^step), per step */
    double *norm_partials, *norm;
    /* activation arena for (B, T, train) */
    char *arena;
    size_t arena_bytes;
    int B, T, train, laid_out;
    void *emb, *h0, *dlogits;
    float *emb_mean, *emb_rstd, *logits, *start_l, *end_l;
    double *rowloss;
    layer_acts *acts;   /* [L] */
    void *qkv, *ytmp, *pdrop, *headbuf;
    float *scores, *colsum_scratch;
    void *dout, *dres, *dy, *dgelu;
    int *ids, *types, *pos, *len, *g_uniq, *g_start, *g_tok;   /* len [B]: each row's length (csrc's rows) */
    int64_t *win;      /* [B] window ids of the batch rows (dropout numbering), when has_win */
    float *mask;
    int has_types, has_mask, has_win;
    /* attention: cuDNN's fused SDPA (cudnn_attention.cu, bf16) or the own kernels (attention.cu) */
    int attn_mode;          /* BQ_ATTN_CUDNN (default: where cuDNN takes the batch) or BQ_ATTN_OWN */
    bq_cudnn *cudnn;        /* created by the first forward that may use it */
    int cudnn_tried;
    char cudnn_why[256];    /* why there is no handle */
    int mask_prefix;        /* every row of this batch: real tokens, then padding only (no hole) */
    int batch_cudnn;        /* this batch's forward ran on cuDNN: so does its backward */
    char attn_used[400];    /* what the last forward used, and why */
    /* host staging */
    int *h_ids, *h_types, *h_pos, *h_len, *h_uniq, *h_start, *h_tok, *h_count;
    size_t h_cap;
};

/* ---- parameter table (csrc/model.c's bq_tensor_sizes) ----------------------------------------------------- */

static int tensor_sizes(const bq_config *c, size_t *s) {
    const size_t C = c->C, I = c->FF;
    const size_t layer[BQ_LAYER_TENSORS] = {C * C, C, C * C, C, C * C, C, C * C, C, C, C, I * C, I, C * I, C, C, C};
    int n = 0;
#define PUT(x) do { if (s) s[n] = (x); n++; } while (0)
    PUT((size_t)c->V * C); PUT((size_t)c->P * C); PUT((size_t)c->NT * C); PUT(C); PUT(C);
    for (int l = 0; l < c->L; l++)
        for (int i = 0; i < BQ_LAYER_TENSORS; i++) PUT(layer[i]);
    PUT(2 * C); PUT(2);
#undef PUT
    return n;
}

static int dalloc(void **p, size_t bytes, const char *what, const char *file, int line) {
    *p = nullptr;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();
        *p = nullptr;
        return bq_cuda_fail(e == cudaErrorMemoryAllocation ? BQ_ERR_NOMEM : BQ_ERR_CUDA,
                            "cudaMalloc(%s, %zu bytes) failed: %s (%s) at %s:%d", what, bytes, cudaGetErrorString(e),
                            cudaGetErrorName(e), file, line);
    }
    return BQ_OK;
}
#define DALLOC(ptr, bytes) dalloc((void **)&(ptr), (bytes), #ptr, __FILE__, __LINE__)

static int select_device(bq_cuda_model *m) {
    CUDA_TRY(cudaSetDevice(m->dev));
    return BQ_OK;
}

extern "C" size_t bq_cuda_model_nparams(const bq_cuda_model *m) { return m->nparams; }
extern "C" int bq_cuda_model_ntensors(const bq_cuda_model *m) { return m->ntensors; }
extern "C" const size_t *bq_cuda_model_offsets(const bq_cuda_model *m) { return m->offsets; }
extern "C" int bq_cuda_model_precision(const bq_cuda_model *m) { return m->precision; }
extern "C" int bq_cuda_model_training(const bq_cuda_model *m) { return m->training; }
extern "C" size_t bq_cuda_model_arena_bytes(const bq_cuda_model *m) { return m->arena_bytes; }
extern "C" void bq_cuda_model_gemm_stats(const bq_cuda_model *m, long *lt_calls, long *fallback_calls) {
    *lt_calls = m->gemm.lt_calls;
    *fallback_calls = m->gemm.fallback_calls;
}

extern "C" void bq_cuda_model_free(bq_cuda_model *m) {
    if (!m) return;
    cudaSetDevice(m->dev);
    if (m->stream) cudaStreamSynchronize(m->stream);
    void *dev_ptrs[] = {m->params, m->grads, m->m, m->v, m->params_bf16, m->adam_start, m->adam_len, m->adam_tensor,
                        m->decay, m->lrs, m->norm_partials, m->norm, m->arena};
    for (void *p : dev_ptrs)
        if (p) cudaFree(p);
    if (m->gemm_ready) bq_gemm_destroy(&m->gemm);
    bq_cudnn_destroy(m->cudnn);
    if (m->stream) cudaStreamDestroy(m->stream);
    free(m->offsets);
    free(m->acts);
    free(m->host_decay);
    free(m->host_lrs);
    free(m->h_ids);
    free(m->h_types);
    free(m->h_pos);
    free(m->h_len);
    free(m->h_uniq);
    free(m->h_start);
    free(m->h_tok);
    free(m->h_count);
    free(m);
}

static int refresh_bf16(bq_cuda_model *m) {
    if (m->params_bf16) TRY(launch_f32_to_bf16(m->stream, m->params_bf16, m->params, m->nparams));
    return BQ_OK;
}

extern "C" int bq_cuda_model_enable_training(bq_cuda_model *m) {
    if (m->training) return BQ_OK;
    TRY(select_device(m));
    const size_t bytes = m->nparams * sizeof(float);
    TRY(DALLOC(m->grads, bytes));
    TRY(DALLOC(m->m, bytes));
    TRY(DALLOC(m->v, bytes));
    CUDA_TRY(cudaMemsetAsync(m->grads, 0, bytes, m->stream));
    CUDA_TRY(cudaMemsetAsync(m->m, 0, bytes, m->stream));
    CUDA_TRY(cudaMemsetAsync(m->v, 0, bytes, m->stream));
    CUDA_TRY(cudaStreamSynchronize(m->stream));
    m->training = 1;
    return BQ_OK;
}

static int init(bq_cuda_model *m, const bq_config *c, const float *host_params, int precision, int training, int dev) {
    if (c->V < 1 || c->P < 1 || c->NT < 1 || c->C < 1 || c->L < 1 || c->NH < 1 || c->FF < 1 || c->C % c->NH ||
        !(c->eps >= 0) || !(c->hidden_dropout >= 0 && c->hidden_dropout < 1) ||
        !(c->attn_dropout >= 0 && c->attn_dropout < 1))
        return bq_cuda_fail(BQ_ERR_ARG, "bad model configuration");
    if (precision != BQ_FP32 && precision != BQ_BF16) return bq_cuda_fail(BQ_ERR_ARG, "precision must be fp32 or bf16");
    char reason[256];
    const int ndev = bq_cuda_device_count(reason, sizeof reason);
    if (ndev == 0) return bq_cuda_fail(BQ_ERR_DEVICE, "%s", reason);
    if (dev < 0 || dev >= ndev) return bq_cuda_fail(BQ_ERR_DEVICE, "CUDA device %d requested, %d usable", dev, ndev);
    m->cfg = *c;
    m->precision = precision;
    m->attn_mode = BQ_ATTN_CUDNN;
    snprintf(m->attn_used, sizeof m->attn_used, "none yet (no forward)");
    m->dev = dev;
    TRY(select_device(m));
    m->ntensors = tensor_sizes(c, nullptr);
    m->offsets = (size_t *)malloc(sizeof(size_t) * (m->ntensors + 1));
    m->acts = (layer_acts *)calloc(c->L, sizeof(layer_acts));
    m->host_decay = (uint8_t *)calloc(m->ntensors, 1);
    m->host_lrs = (float *)calloc(2 * (size_t)m->ntensors, sizeof(float));
    if (!m->offsets || !m->acts || !m->host_decay || !m->host_lrs)
        return bq_cuda_fail(BQ_ERR_NOMEM, "out of host memory");
    tensor_sizes(c, m->offsets + 1);
    m->offsets[0] = 0;
    for (int i = 0; i < m->ntensors; i++) m->offsets[i + 1] += m->offsets[i];
    m->nparams = m->offsets[m->ntensors];

    CUDA_TRY(cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking));
    TRY(bq_gemm_init(&m->gemm, m->stream));
    m->gemm_ready = 1;
    TRY(DALLOC(m->params, m->nparams * sizeof(float)));
    if (precision == BQ_BF16) TRY(DALLOC(m->params_bf16, m->nparams * sizeof(bf16)));
    /* every copy goes on the engine's stream: a non-blocking stream does not wait for the legacy default stream */
    CUDA_TRY(cudaMemcpyAsync(m->params, host_params, m->nparams * sizeof(float), cudaMemcpyHostToDevice, m->stream));
    TRY(refresh_bf16(m));

    /* AdamW blocks: each tensor cut into BQ_ADAM_CHUNK pieces, so a block knows its tensor's weight decay */
    int nb = 0;
    for (int t = 0; t < m->ntensors; t++) nb += (int)ceil_div(m->offsets[t + 1] - m->offsets[t], BQ_ADAM_CHUNK);
    long long *hs = (long long *)malloc(sizeof(long long) * nb);
    int *hl = (int *)malloc(sizeof(int) * nb), *ht = (int *)malloc(sizeof(int) * nb);
    int st = BQ_OK;
    if (!hs || !hl || !ht) st = bq_cuda_fail(BQ_ERR_NOMEM, "out of host memory");
    if (!st) {
        int b = 0;
        for (int t = 0; t < m->ntensors; t++)
            for (size_t o = m->offsets[t]; o < m->offsets[t + 1]; o += BQ_ADAM_CHUNK, b++) {
                hs[b] = (long long)o;
                hl[b] = (int)(m->offsets[t + 1] - o < BQ_ADAM_CHUNK ? m->offsets[t + 1] - o : BQ_ADAM_CHUNK);
                ht[b] = t;
            }
        m->adam_nblocks = nb;
        st = DALLOC(m->adam_start, sizeof(long long) * nb);
        if (!st) st = DALLOC(m->adam_len, sizeof(int) * nb);
        if (!st) st = DALLOC(m->adam_tensor, sizeof(int) * nb);
        if (!st) st = DALLOC(m->decay, m->ntensors);
        if (!st) st = DALLOC(m->lrs, 2 * sizeof(float) * m->ntensors);
        if (!st) st = DALLOC(m->norm_partials, sizeof(double) * BQ_NORM_BLOCKS);
        if (!st) st = DALLOC(m->norm, sizeof(double));
        cudaError_t e = cudaSuccess;
        if (!st) e = cudaMemcpyAsync(m->adam_start, hs, sizeof(long long) * nb, cudaMemcpyHostToDevice, m->stream);
        if (!st && e == cudaSuccess)
            e = cudaMemcpyAsync(m->adam_len, hl, sizeof(int) * nb, cudaMemcpyHostToDevice, m->stream);
        if (!st && e == cudaSuccess)
            e = cudaMemcpyAsync(m->adam_tensor, ht, sizeof(int) * nb, cudaMemcpyHostToDevice, m->stream);
        if (!st && e == cudaSuccess) e = cudaStreamSynchronize(m->stream);   /* before the host tables are freed */
        if (!st && e != cudaSuccess) st = bq_cuda_fail_cuda(e, "cudaMemcpy(AdamW block table)", __FILE__, __LINE__);
    }
    free(hs);
    free(hl);
    free(ht);
    TRY(st);
    if (training) TRY(bq_cuda_model_enable_training(m));
    CUDA_TRY(cudaStreamSynchronize(m->stream));
    return BQ_OK;
}

extern "C" int bq_cuda_model_init(bq_cuda_model **out, const bq_config *cfg, const float *host_params, int precision,
                                  int training, int dev) {
    *out = nullptr;
    bq_cuda_model *m = (bq_cuda_model *)calloc(1, sizeof(bq_cuda_model));
    if (!m) return bq_cuda_fail(BQ_ERR_NOMEM, "out of host memory");
    int st = init(m, cfg, host_params, precision, training, dev);
    if (st) {
        bq_cuda_model_free(m);
        return st;
    }
    *out = m;
    return BQ_OK;
}

extern "C" int bq_cuda_model_set_attention(bq_cuda_model *m, int mode) {
    if (mode != BQ_ATTN_OWN && mode != BQ_ATTN_CUDNN)
        return bq_cuda_fail(BQ_ERR_ARG, "attention must be 'cudnn' or 'own'");
    m->attn_mode = mode;
    return BQ_OK;
}

extern "C" int bq_cuda_model_attention(const bq_cuda_model *m) { return m->attn_mode; }

extern "C" const char *bq_cuda_model_attention_used(const bq_cuda_model *m) { return m->attn_used; }

extern "C" size_t bq_cuda_cudnn_version(void) { return bq_cudnn_version(); }

extern "C" int bq_cuda_model_zero_grad(bq_cuda_model *m) {
    if (!m->training) return bq_cuda_fail(BQ_ERR_ARG, "zero_grad: this model has no gradients (inference only)");
    TRY(select_device(m));
    CUDA_TRY(cudaMemsetAsync(m->grads, 0, m->nparams * sizeof(float), m->stream));
    return BQ_OK;
}

static int flat_buffer(bq_cuda_model *m, int which, float **buf) {
    float *b = which == BQ_BUF_PARAMS ? m->params : which == BQ_BUF_GRADS ? m->grads : which == BQ_BUF_M ? m->m
             : which == BQ_BUF_V ? m->v : nullptr;
    if (which < 0 || which > 3) return bq_cuda_fail(BQ_ERR_ARG, "no buffer number %d", which);
    if (!b) return bq_cuda_fail(BQ_ERR_ARG, "this model has no gradients or optimizer state (inference only)");
    *buf = b;
    return BQ_OK;
}

extern "C" int bq_cuda_model_download(bq_cuda_model *m, int which, float *host) {
    float *b = nullptr;
    TRY(flat_buffer(m, which, &b));
    TRY(select_device(m));
    CUDA_TRY(cudaMemcpyAsync(host, b, m->nparams * sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    CUDA_TRY(cudaStreamSynchronize(m->stream));
    return BQ_OK;
}

extern "C" int bq_cuda_model_upload(bq_cuda_model *m, int which, const float *host) {
    float *b = nullptr;
    TRY(flat_buffer(m, which, &b));
    TRY(select_device(m));
    CUDA_TRY(cudaMemcpyAsync(b, host, m->nparams * sizeof(float), cudaMemcpyHostToDevice, m->stream));
    if (which == BQ_BUF_PARAMS) TRY(refresh_bf16(m));
    CUDA_TRY(cudaStreamSynchronize(m->stream));
    return BQ_OK;
}

extern "C" int bq_cuda_model_grad_buffer(bq_cuda_model *m, float **grads, size_t *n, void **stream, int *dev) {
    if (!m->training) return bq_cuda_fail(BQ_ERR_ARG, "this model has no gradients (inference only)");
    *grads = m->grads;
    *n = m->nparams;
    *stream = (void *)m->stream;
    *dev = m->dev;
    return BQ_OK;
}

extern "C" int bq_cuda_model_synchronize(bq_cuda_model *m) {
    TRY(select_device(m));
    CUDA_TRY(cudaStreamSynchronize(m->stream));
    return BQ_OK;
}

extern "C" int bq_cuda_model_release_arena(bq_cuda_model *m) {
    TRY(select_device(m));
    CUDA_TRY(cudaStreamSynchronize(m->stream));
    if (m->arena) CUDA_TRY(cudaFree(m->arena));
    m->arena = nullptr;
    m->arena_bytes = 0;
    m->laid_out = 0;
    m->train = 0;
    return BQ_OK;
}

/* ---- activation arena -------------------------------------------------------------------------------------- */

struct carver {
    char *base;
    size_t used;
    void *take(size_t bytes) {
        const size_t off = (used + 255) & ~(size_t)255;   /* 256-byte aligned: what cuBLASLt likes best */
        used = off + bytes;
        return base ? base + off : nullptr;
    }
};

/* Lays the arena out for (B, T, train); with base == NULL only counts bytes. */
static size_t layout(bq_cuda_model *m, int B, int T, int train, char *base) {
    const bq_config *c = &m->cfg;
    const size_t N = (size_t)B * T, C = c->C, I = c->FF, A = (size_t)B * c->NH * T * T;
    const size_t es = m->precision == BQ_BF16 ? 2 : 4, f = sizeof(float);
    carver k = {base, 0};
#define TAKE(dst, bytes) ((dst) = (decltype(dst))k.take(bytes))
    TAKE(m->emb, N * C * es); TAKE(m->h0, N * C * es); TAKE(m->emb_mean, N * f); TAKE(m->emb_rstd, N * f);
    TAKE(m->logits, 2 * N * f); TAKE(m->start_l, N * f); TAKE(m->end_l, N * f); TAKE(m->dlogits, 2 * N * es);
    TAKE(m->rowloss, 2 * (size_t)B * sizeof(double));
    const int sets = train ? c->L : 1;
    for (int l = 0; l < sets; l++) {
        layer_acts *a = &m->acts[l];
        TAKE(a->qh, N * C * es); TAKE(a->kh, N * C * es); TAKE(a->vh, N * C * es); TAKE(a->att, A * es);
        TAKE(a->ctx, N * C * es); TAKE(a->res1, N * C * es); TAKE(a->h1, N * C * es);
        TAKE(a->mean1, N * f); TAKE(a->rstd1, N * f); TAKE(a->fc, N * I * es); TAKE(a->gelu, N * I * es);
        TAKE(a->res2, N * C * es); TAKE(a->mean2, N * f); TAKE(a->rstd2, N * f);
        if (train) TAKE(a->out, N * C * es);
    }
    if (base && !train) {   /* eval: every layer writes its output over its input */
        m->acts[0].out = m->h0;
        for (int l = 1; l < c->L; l++) m->acts[l] = m->acts[0];
    }
    TAKE(m->qkv, 3 * N * C * es); TAKE(m->ytmp, N * C * es); TAKE(m->scores, A * f); TAKE(m->headbuf, 3 * N * C * es);
    m->pdrop = m->dout = m->dres = m->dy = m->dgelu = nullptr;
    m->colsum_scratch = nullptr;
    if (train) {
        TAKE(m->pdrop, A * es);
        TAKE(m->dout, N * C * es); TAKE(m->dres, N * C * es); TAKE(m->dy, N * C * es); TAKE(m->dgelu, N * I * es);
        TAKE(m->colsum_scratch, 2 * colsum_scratch_floats((int)N, (int)(C > I ? C : I)) * f);
    }
    /* the batch */
    TAKE(m->ids, N * sizeof(int)); TAKE(m->types, N * sizeof(int)); TAKE(m->mask, N * f);
    TAKE(m->pos, 2 * (size_t)B * sizeof(int)); TAKE(m->len, (size_t)B * sizeof(int)); TAKE(m->g_uniq, N * sizeof(int)); TAKE(m->g_start, (N + 1) * sizeof(int));
    TAKE(m->g_tok, N * sizeof(int)); TAKE(m->win, (size_t)B * sizeof(int64_t));
#undef TAKE
    return k.used;
}

static int prepare_arena(bq_cuda_model *m, int B, int T, int train) {
    m->laid_out = 0;
    const size_t need = layout(m, B, T, train, nullptr);
    if (need > m->arena_bytes) {
        CUDA_TRY(cudaStreamSynchronize(m->stream));
        if (m->arena) CUDA_TRY(cudaFree(m->arena));
        m->arena = nullptr;
        m->arena_bytes = 0;
        TRY(DALLOC(m->arena, need));
        m->arena_bytes = need;
    }
    layout(m, B, T, train, m->arena);
    m->B = B;
    m->T = T;
    m->train = train;
    m->laid_out = 1;
    /* host staging for the batch */
    const size_t N = (size_t)B * T;
    if (N > m->h_cap || !m->h_count) {
        free(m->h_ids); free(m->h_types); free(m->h_pos); free(m->h_len); free(m->h_uniq); free(m->h_start);
        free(m->h_tok);
        m->h_ids = (int *)malloc(N * sizeof(int));
        m->h_len = (int *)malloc(N * sizeof(int));   /* B <= N */
        m->h_types = (int *)malloc(N * sizeof(int));
        m->h_pos = (int *)malloc(2 * N * sizeof(int));   /* 2B <= 2N */
        m->h_uniq = (int *)malloc(N * sizeof(int));
        m->h_start = (int *)malloc((N + 1) * sizeof(int));
        m->h_tok = (int *)malloc(N * sizeof(int));
        if (!m->h_count) m->h_count = (int *)calloc(m->cfg.V, sizeof(int));
        if (!m->h_ids || !m->h_types || !m->h_pos || !m->h_len || !m->h_uniq || !m->h_start || !m->h_tok || !m->h_count) {
            m->h_cap = 0;
            return bq_cuda_fail(BQ_ERR_NOMEM, "out of host memory for the batch staging");
        }
        m->h_cap = N;
    }
    return BQ_OK;
}

/* ---- forward ----------------------------------------------------------------------------------------------- */

/* A dropout site of the batch laid out now: rows numbered by their window ids (row b itself without them), positions
 * strided by max_position_embeddings, as csrc/model.c. */
static bq_drop drop(const bq_cuda_model *m, float p, uint64_t seed, uint32_t step, uint32_t site) {
    return bq_drop{p, seed, step, site, m->has_win ? m->win : nullptr, m->T, m->cfg.P};
}

template <typename T> static T *weights(bq_cuda_model *m, int idx) {
    T *base = m->precision == BQ_BF16 ? (T *)(void *)m->params_bf16 : (T *)(void *)m->params;
    return base + m->offsets[idx];
}
static float *grad(bq_cuda_model *m, int idx) { return m->grads + m->offsets[idx]; }

/* cuDNN's Philox seed for one dropout site of one step (cudnn_attention.cu): splitmix64 of the three */
static uint64_t cudnn_seed(uint64_t seed, uint32_t step, uint32_t site) {
    uint64_t z = seed ^ ((uint64_t)step << 32 | site) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* cuDNN or the own kernels for this batch's attention (every layer alike); the choice and its reason go to
 * attn_used. A refusal is not an error: the own kernels take the batch. */
static void choose_attention(bq_cuda_model *m, int B, int T_, float pa, int train) {
    const int NH = m->cfg.NH, HS = m->cfg.C / m->cfg.NH;
    const size_t n = sizeof m->attn_used;
    m->batch_cudnn = 0;
    if (m->attn_mode == BQ_ATTN_OWN) {
        snprintf(m->attn_used, n, "own (attention='own')");
        return;
    }
    if (m->precision != BQ_BF16) {
        snprintf(m->attn_used, n, "own (cuDNN's fused attention takes bf16; this engine is fp32)");
        return;
    }
    if (T_ < 2) {
        snprintf(m->attn_used, n, "own (T = 1)");
        return;
    }
    if (!m->mask_prefix) {
        snprintf(m->attn_used, n, "own (a row's mask has a hole: cuDNN takes per-row key lengths only)");
        return;
    }
    if (!m->cudnn_tried) {
        m->cudnn_tried = 1;
        if (!bq_cudnn_create(&m->cudnn, m->cudnn_why, sizeof m->cudnn_why)) m->cudnn = nullptr;
    }
    if (!m->cudnn) {
        snprintf(m->attn_used, n, "own (%s)", m->cudnn_why);
        return;
    }
    if (!bq_cudnn_prepare(m->cudnn, B, T_, NH, HS, pa, train)) {
        snprintf(m->attn_used, n, "own (cuDNN refused the %s)", bq_cudnn_why(m->cudnn));
        return;
    }
    m->batch_cudnn = 1;
    snprintf(m->attn_used, n, "cudnn");
}

template <typename T>
static int forward_impl(bq_cuda_model *m, int B, int T_, int train, uint64_t seed, uint32_t step) {
    const bq_config *c = &m->cfg;
    const int C = c->C, I = c->FF, NH = c->NH, HS = C / NH, N = B * T_;
    const size_t NC = (size_t)N * C;
    const float pd = train ? c->hidden_dropout : 0.0f, pa = train ? c->attn_dropout : 0.0f;
    cudaStream_t s = m->stream;
    bq_gemm *g = &m->gemm;
    const float *mask = m->has_mask ? m->mask : nullptr;
    const bq_attn_bufs bufs = {m->scores, m->pdrop, m->headbuf};
    TRY(embedding_layernorm_forward<T>(s, (T *)m->emb, (T *)m->h0, m->emb_mean, m->emb_rstd, m->ids,
                                       m->has_types ? m->types : nullptr, weights<T>(m, E_WTE), weights<T>(m, E_WPE),
                                       weights<T>(m, E_WTT), weights<T>(m, E_LNW), weights<T>(m, E_LNB), B, T_, C,
                                       c->eps, drop(m, pd, seed, step, SITE_EMB)));
    const T *x = (const T *)m->h0;
    T *q = (T *)m->qkv, *k = q + NC, *v = k + NC, *y = (T *)m->ytmp;
    choose_attention(m, B, T_, pa, train);
    const bool fused = std::is_same<T, bf16>::value && m->batch_cudnn;
    for (int l = 0; l < c->L; l++) {
        layer_acts *a = &m->acts[l];
#define W(i) weights<T>(m, LT(l, i))
        if (fused) {
            /* cuDNN reads q, k, v as [B,NH,T,HS] in place (strides): qh/kh/vh hold them [N,C], att the Stats */
            TRY(linear_forward<T>(g, (T *)a->qh, x, W(QW), W(QB), N, C, C));
            TRY(linear_forward<T>(g, (T *)a->kh, x, W(KW), W(KB), N, C, C));
            TRY(linear_forward<T>(g, (T *)a->vh, x, W(VW), W(VB), N, C, C));
            TRY(bq_cudnn_forward(m->cudnn, s, (bf16 *)a->ctx, (float *)a->att, (const bf16 *)a->qh,
                                 (const bf16 *)a->kh, (const bf16 *)a->vh, m->len, B, T_, NH, HS, pa,
                                 cudnn_seed(seed, step, SITE_ATT(l)), train));
        } else {
            TRY(linear_forward<T>(g, q, x, W(QW), W(QB), N, C, C));
            TRY(linear_forward<T>(g, k, x, W(KW), W(KB), N, C, C));
            TRY(linear_forward<T>(g, v, x, W(VW), W(VB), N, C, C));
            TRY(split_heads<T>(s, (T *)a->qh, q, B, T_, NH, HS));
            TRY(split_heads<T>(s, (T *)a->kh, k, B, T_, NH, HS));
            TRY(split_heads<T>(s, (T *)a->vh, v, B, T_, NH, HS));
            TRY(attention_forward<T>(g, (T *)a->ctx, (T *)a->att, (T *)a->qh, (T *)a->kh, (T *)a->vh, mask, B, NH, T_,
                                     HS, drop(m, pa, seed, step, SITE_ATT(l)), bufs));
        }
        TRY(linear_forward<T>(g, y, (T *)a->ctx, W(AOW), W(AOB), N, C, C));
        TRY(residual_layernorm_forward<T>(s, (T *)a->res1, (T *)a->h1, a->mean1, a->rstd1, x, y, W(LN1W), W(LN1B), N, C,
                                          c->eps, drop(m, pd, seed, step, SITE_AO(l))));
        TRY(linear_forward<T>(g, (T *)a->fc, (T *)a->h1, W(FCW), W(FCB), N, C, I));
        TRY(gelu_forward<T>(s, (T *)a->gelu, (T *)a->fc, (size_t)N * I));
        TRY(linear_forward<T>(g, y, (T *)a->gelu, W(FC2W), W(FC2B), N, I, C));
        TRY(residual_layernorm_forward<T>(s, (T *)a->res2, (T *)a->out, a->mean2, a->rstd2, (T *)a->h1, y, W(LN2W),
                                          W(LN2B), N, C, c->eps, drop(m, pd, seed, step, SITE_FFN(l))));
#undef W
        x = (const T *)a->out;
    }
    /* logits [N,2] fp32 = x Wqa^T; the bias (fp32 master) is added while splitting into start / end */
    TRY(bq_matmul(g, false, true, N, 2, C, 1.0f, x, dtype_of<T>::value, C, 0, weights<T>(m, QAW(c->L)),
                  dtype_of<T>::value, C, 0, 0.0f, m->logits, CUDA_R_32F, 2, 0, 1, nullptr));
    return qa_split(s, m->start_l, m->end_l, m->logits, m->params + m->offsets[QAB(c->L)], N);
}

static int check_batch(const bq_config *c, const int64_t *ids, const int64_t *types, int B, int T) {
    if (B < 1 || T < 1) return bq_cuda_fail(BQ_ERR_ARG, "empty batch (B=%d, T=%d)", B, T);
    if (T > c->P) return bq_cuda_fail(BQ_ERR_INDEX, "T=%d is more than max_position_embeddings=%d", T, c->P);
    for (long i = 0; i < (long)B * T; i++) {
        if (ids[i] < 0 || ids[i] >= c->V)
            return bq_cuda_fail(BQ_ERR_INDEX, "input id %lld at %ld is outside [0, %d)", (long long)ids[i], i, c->V);
        if (types && (types[i] < 0 || types[i] >= c->NT))
            return bq_cuda_fail(BQ_ERR_INDEX, "token type %lld at %ld is outside [0, %d)", (long long)types[i], i, c->NT);
    }
    return BQ_OK;
}

/* Window ids >= 0, small enough that no dropout index (bq_drop) passes 2^64. */
static int check_windows(const bq_config *c, const int64_t *win, int B) {
    const uint64_t P = (uint64_t)c->P, per_att = (uint64_t)c->NH * P * P, per_hid = P * (uint64_t)c->C;
    const uint64_t limit = UINT64_MAX / (per_att > per_hid ? per_att : per_hid) - 1;
    for (int b = 0; b < B; b++)
        if (win[b] < 0 || (uint64_t)win[b] > limit)
            return bq_cuda_fail(BQ_ERR_ARG, "window id %lld of batch row %d is outside [0, %llu]", (long long)win[b], b,
                                (unsigned long long)limit);
    return BQ_OK;
}

extern "C" int bq_cuda_forward(bq_cuda_model *m, const int64_t *ids, const int64_t *types, const float *mask,
                               const int64_t *window_ids, int B, int T, int train, uint64_t seed, uint32_t step,
                               float *start, float *end) {
    TRY(check_batch(&m->cfg, ids, types, B, T));
    if (window_ids) TRY(check_windows(&m->cfg, window_ids, B));
    if (train && !m->training) return bq_cuda_fail(BQ_ERR_ARG, "train forward on an inference-only model");
    TRY(select_device(m));
    TRY(prepare_arena(m, B, T, train));
    const size_t N = (size_t)B * T;
    for (size_t i = 0; i < N; i++) m->h_ids[i] = (int)ids[i];
    /* pageable copies: the call returns once the host buffer is staged, so the staging buffers can be reused */
    CUDA_TRY(cudaMemcpyAsync(m->ids, m->h_ids, N * sizeof(int), cudaMemcpyHostToDevice, m->stream));
    m->has_types = types != nullptr;
    if (types) {
        for (size_t i = 0; i < N; i++) m->h_types[i] = (int)types[i];
        CUDA_TRY(cudaMemcpyAsync(m->types, m->h_types, N * sizeof(int), cudaMemcpyHostToDevice, m->stream));
    }
    m->has_mask = mask != nullptr;
    if (mask) CUDA_TRY(cudaMemcpyAsync(m->mask, mask, N * sizeof(float), cudaMemcpyHostToDevice, m->stream));
    /* each row's length as the CPU engine cuts it (bq_row_length: up to its last real token, all T for an
     * all-padding row): the span loss runs over it */
    m->mask_prefix = 1;
    for (int b = 0; b < B; b++) {
        int L = T;
        if (mask) {
            while (L > 0 && mask[(size_t)b * T + L - 1] == 0.0f) L--;
            for (int t = 0; t < L; t++)   /* a hole inside the row: cuDNN's per-row key lengths cannot say it */
                if (mask[(size_t)b * T + t] == 0.0f) m->mask_prefix = 0;
        }
        m->h_len[b] = L ? L : T;
    }
    CUDA_TRY(cudaMemcpyAsync(m->len, m->h_len, (size_t)B * sizeof(int), cudaMemcpyHostToDevice, m->stream));
    m->has_win = window_ids != nullptr;   /* kept for the backward of this batch */
    if (window_ids)
        CUDA_TRY(cudaMemcpyAsync(m->win, window_ids, (size_t)B * sizeof(int64_t), cudaMemcpyHostToDevice, m->stream));
    TRY(m->precision == BQ_BF16 ? forward_impl<bf16>(m, B, T, train, seed, step)
                                : forward_impl<float>(m, B, T, train, seed, step));
    if (start) CUDA_TRY(cudaMemcpyAsync(start, m->start_l, N * sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    if (end) CUDA_TRY(cudaMemcpyAsync(end, m->end_l, N * sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    if (start || end) CUDA_TRY(cudaStreamSynchronize(m->stream));
    return BQ_OK;
}

/* ---- backward ---------------------------------------------------------------------------------------------- */

/* Groups the batch's tokens by word id on the host (bq_cuda_group_ids: pad_id left out, token order within an id)
 * and uploads the grouping, for a scatter-add with a fixed order. */
static int group_ids(bq_cuda_model *m, bq_id_groups *out) {
    const int N = m->B * m->T;
    const int U = bq_cuda_group_ids(m->h_ids, N, m->cfg.pad_id, m->h_count, m->h_uniq, m->h_start, m->h_tok);
    const int total = m->h_start[U];
    if (U) {
        CUDA_TRY(cudaMemcpyAsync(m->g_uniq, m->h_uniq, U * sizeof(int), cudaMemcpyHostToDevice, m->stream));
        CUDA_TRY(cudaMemcpyAsync(m->g_start, m->h_start, (U + 1) * sizeof(int), cudaMemcpyHostToDevice, m->stream));
        CUDA_TRY(cudaMemcpyAsync(m->g_tok, m->h_tok, total * sizeof(int), cudaMemcpyHostToDevice, m->stream));
    }
    *out = bq_id_groups{U, m->g_uniq, m->g_start, m->g_tok};
    return BQ_OK;
}

template <typename T>
static int backward_impl(bq_cuda_model *m, uint64_t seed, uint32_t step, double gs0, double gs1, bq_id_groups groups) {
    const bq_config *c = &m->cfg;
    const int B = m->B, T_ = m->T, C = c->C, I = c->FF, NH = c->NH, HS = C / NH, N = B * T_, L = c->L;
    const size_t NC = (size_t)N * C;
    const float pd = c->hidden_dropout, pa = c->attn_dropout;
    const bq_drop none = drop(m, 0.0f, seed, step, 0);
    cudaStream_t s = m->stream;
    bq_gemm *g = &m->gemm;
    float *scratch = m->colsum_scratch;
    const bq_attn_bufs bufs = {m->scores, m->pdrop, m->headbuf};
    T *dout = (T *)m->dout, *dres = (T *)m->dres, *dy = (T *)m->dy, *dgelu = (T *)m->dgelu, *dlogits = (T *)m->dlogits;
    T *dq = (T *)m->qkv, *dk = dq + NC, *dv = dk + NC;

    TRY(span_loss_rows<T>(s, dlogits, m->rowloss, m->start_l, m->end_l, m->pos, m->len, B, T_, gs0, gs1));
    const T *xL = (const T *)m->acts[L - 1].out;
    TRY(linear_backward_weight<T>(g, grad(m, QAW(L)), dlogits, xL, N, C, 2));
    TRY(colsum_add<T>(s, grad(m, QAB(L)), dlogits, N, 2, nullptr, 0, scratch));
    TRY(linear_backward_input<T>(g, dout, 0.0f, dlogits, weights<T>(m, QAW(L)), N, C, 2));

    for (int l = L - 1; l >= 0; l--) {
        layer_acts *a = &m->acts[l];
        const T *x = l ? (const T *)m->acts[l - 1].out : (const T *)m->h0;
#define W(i) weights<T>(m, LT(l, i))
#define G(i) grad(m, LT(l, i))
        /* out = LN2(res2), res2 = h1 + dropout(ffn): dres = d res2, dy = d ffn */
        TRY(layernorm_backward<T>(s, dres, dy, dout, (T *)a->res2, W(LN2W), a->mean2, a->rstd2, N, C, none,
                                  drop(m, pd, seed, step, SITE_FFN(l))));
        TRY(layernorm_param_grads<T>(s, G(LN2W), G(LN2B), dout, (T *)a->res2, a->mean2, a->rstd2, N, C, none, scratch));
        TRY(linear_backward_weight<T>(g, G(FC2W), dy, (T *)a->gelu, N, I, C));
        TRY(colsum_add<T>(s, G(FC2B), dy, N, C, nullptr, 0, scratch));
        TRY(linear_backward_input<T>(g, dgelu, 0.0f, dy, W(FC2W), N, I, C));
        TRY(gelu_backward<T>(s, dgelu, (T *)a->fc, dgelu, (size_t)N * I));   /* now d fc */
        TRY(linear_backward_weight<T>(g, G(FCW), dgelu, (T *)a->h1, N, C, I));
        TRY(colsum_add<T>(s, G(FCB), dgelu, N, I, nullptr, 0, scratch));
        TRY(linear_backward_input<T>(g, dres, 1.0f, dgelu, W(FCW), N, C, I));   /* dres = d h1 */
        /* h1 = LN1(res1), res1 = x + dropout(ao): dout = d res1 (the residual part of dx), dy = d ao */
        TRY(layernorm_backward<T>(s, dout, dy, dres, (T *)a->res1, W(LN1W), a->mean1, a->rstd1, N, C, none,
                                  drop(m, pd, seed, step, SITE_AO(l))));
        TRY(layernorm_param_grads<T>(s, G(LN1W), G(LN1B), dres, (T *)a->res1, a->mean1, a->rstd1, N, C, none, scratch));
        TRY(linear_backward_weight<T>(g, G(AOW), dy, (T *)a->ctx, N, C, C));
        TRY(colsum_add<T>(s, G(AOB), dy, N, C, nullptr, 0, scratch));
        TRY(linear_backward_input<T>(g, dres, 0.0f, dy, W(AOW), N, C, C));   /* dres = d ctx */
        if (std::is_same<T, bf16>::value && m->batch_cudnn)
            TRY(bq_cudnn_backward(m->cudnn, s, (bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)dres,
                                  (const bf16 *)a->ctx, (const float *)a->att, (const bf16 *)a->qh,
                                  (const bf16 *)a->kh, (const bf16 *)a->vh, m->len, B, T_, NH, HS, pa,
                                  cudnn_seed(seed, step, SITE_ATT(l))));
        else
            TRY(attention_backward<T>(g, dq, dk, dv, dres, (T *)a->att, (T *)a->qh, (T *)a->kh, (T *)a->vh, B, NH, T_,
                                      HS, drop(m, pa, seed, step, SITE_ATT(l)), bufs));
        const int wi[3] = {QW, KW, VW};
        T *dqkv[3] = {dq, dk, dv};
        for (int j = 0; j < 3; j++) {
            TRY(linear_backward_weight<T>(g, G(wi[j]), dqkv[j], x, N, C, C));
            TRY(colsum_add<T>(s, G(wi[j] + 1), dqkv[j], N, C, nullptr, 0, scratch));
            TRY(linear_backward_input<T>(g, dout, 1.0f, dqkv[j], W(wi[j]), N, C, C));   /* dx += dq Wq ... */
        }
#undef W
#undef G
    }
    /* h0 = dropout(LN(emb)): the dropout mask applies to the incoming gradient */
    const bq_drop demb = drop(m, pd, seed, step, SITE_EMB);
    TRY(layernorm_backward<T>(s, dres, nullptr, dout, (T *)m->emb, weights<T>(m, E_LNW), m->emb_mean, m->emb_rstd, N, C,
                              demb, none));
    TRY(layernorm_param_grads<T>(s, grad(m, E_LNW), grad(m, E_LNB), dout, (T *)m->emb, m->emb_mean, m->emb_rstd, N, C,
                                 demb, scratch));
    return embedding_backward<T>(s, grad(m, E_WTE), grad(m, E_WPE), grad(m, E_WTT), dres, groups,
                                 m->has_types ? m->types : nullptr, B, T_, C, c->NT, scratch);
}

extern "C" int bq_cuda_backward(bq_cuda_model *m, const int64_t *ids, const int64_t *types, const int64_t *start_pos,
                                const int64_t *end_pos, uint64_t seed, uint32_t step, float loss_scale, float *loss) {
    (void)ids;   /* the forward's, still staged in h_ids (the CPU API passes them again) */
    (void)types;
    if (!m->training || !m->laid_out || !m->train)
        return bq_cuda_fail(BQ_ERR_ARG, "backward needs a train-mode forward first (and a model with gradients)");
    TRY(select_device(m));
    const int B = m->B, T = m->T;
    /* positions clamped to [0, T] (T = ignored), as Hugging Face; one at or after its row's end is ignored too
     * (csrc/span_loss.c's span_loss_rows: the softmax runs over the row's real tokens) */
    int *pos = m->h_pos, nv[2] = {0, 0};
    for (int w = 0; w < 2; w++)
        for (int b = 0; b < B; b++) {
            const int64_t p = (w ? end_pos : start_pos)[b];
            int q = p < 0 ? 0 : (p > T ? T : (int)p);
            if (q >= m->h_len[b]) q = T;
            pos[w * B + b] = q;
            nv[w] += q != T;
        }
    CUDA_TRY(cudaMemcpyAsync(m->pos, pos, 2 * (size_t)B * sizeof(int), cudaMemcpyHostToDevice, m->stream));
    const float half = 0.5f * loss_scale;   /* csrc/span_loss.c: scale 0.5f * grad_scale, then / n_valid in double */
    const double gs0 = nv[0] ? (double)half / nv[0] : 0.0, gs1 = nv[1] ? (double)half / nv[1] : 0.0;
    bq_id_groups groups;
    TRY(group_ids(m, &groups));
    TRY(m->precision == BQ_BF16 ? backward_impl<bf16>(m, seed, step, gs0, gs1, groups)
                                : backward_impl<float>(m, seed, step, gs0, gs1, groups));
    double *rl = (double *)malloc(2 * (size_t)B * sizeof(double));
    if (!rl) return bq_cuda_fail(BQ_ERR_NOMEM, "out of host memory");
    cudaError_t e = cudaMemcpyAsync(rl, m->rowloss, 2 * (size_t)B * sizeof(double), cudaMemcpyDeviceToHost, m->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(m->stream);
    if (e != cudaSuccess) {
        free(rl);
        return bq_cuda_fail_cuda(e, "cudaStreamSynchronize after backward", __FILE__, __LINE__);
    }
    double ls = 0.0, le = 0.0;
    for (int b = 0; b < B; b++) {
        ls += rl[b];
        le += rl[B + b];
    }
    free(rl);
    ls = nv[0] ? ls / nv[0] : 0.0;
    le = nv[1] ? le / nv[1] : 0.0;
    *loss = (float)(0.5 * (ls + le));
    return BQ_OK;
}

/* ---- optimizer --------------------------------------------------------------------------------------------- */

extern "C" int bq_cuda_adamw_step(bq_cuda_model *m, const uint8_t *decay, const float *lr_scale, float lr,
                                  float beta1, float beta2, float eps, float weight_decay, float max_norm, int step,
                                  double *norm_out) {
    if (!m->training) return bq_cuda_fail(BQ_ERR_ARG, "adamw_step: this model has no gradients (inference only)");
    if (step < 1) return bq_cuda_fail(BQ_ERR_ARG, "step counts from 1, got %d", step);
    TRY(select_device(m));
    for (int t = 0; t < m->ntensors; t++) m->host_decay[t] = decay[t] ? 1 : 0;
    CUDA_TRY(cudaMemcpyAsync(m->decay, m->host_decay, m->ntensors, cudaMemcpyHostToDevice, m->stream));
    TRY(sum_squares(m->stream, m->norm, m->grads, m->nparams, m->norm_partials));
    double sq = 0.0;
    CUDA_TRY(cudaMemcpyAsync(&sq, m->norm, sizeof(double), cudaMemcpyDeviceToHost, m->stream));
    CUDA_TRY(cudaStreamSynchronize(m->stream));
    const double norm = sqrt(sq);
    *norm_out = norm;
    if (!isfinite(norm)) return BQ_OK;   /* NaN/inf gradient: skip the step, the caller reports it */
    float scale = 1.0f;
    if (max_norm > 0.0f) {
        const double coef = max_norm / (norm + 1e-6);   /* torch.nn.utils.clip_grad_norm_ */
        if (coef < 1.0) scale = (float)coef;
    }
    /* the scalars as csrc/model.c and adamw.c compute them (double on the host), per tensor */
    const double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);
    const float bc2_sqrt = (float)sqrt(bc2);
    const int nt = m->ntensors;
    for (int t = 0; t < nt; t++) {
        const float lr_t = lr_scale ? (float)((double)lr * lr_scale[t]) : lr;
        m->host_lrs[t] = lr_t;
        m->host_lrs[nt + t] = (float)(lr_t / bc1);
    }
    CUDA_TRY(cudaMemcpyAsync(m->lrs, m->host_lrs, 2 * sizeof(float) * nt, cudaMemcpyHostToDevice, m->stream));
    const bq_adam_blocks blocks = {m->adam_nblocks, m->adam_start, m->adam_len, m->adam_tensor};
    TRY(adamw_flat(m->stream, m->params, m->params_bf16, m->grads, m->m, m->v, blocks, m->decay, m->lrs, m->lrs + nt,
                   beta1, beta2, eps, weight_decay, bc2_sqrt, scale));
    /* host_lrs is rewritten by the next step: that copy must have left it */
    CUDA_TRY(cudaStreamSynchronize(m->stream));
    return BQ_OK;
}
