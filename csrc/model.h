/* The BERT-for-QA engine on the CPU: one model = a flat parameter buffer (+ gradients, Adam m and v laid out
 * the same way) and an activation arena, with forward, backward and the AdamW step over a batch.
 *
 * Parameter order is Hugging Face's BertForQuestionAnswering state_dict order (bertqa.checkpoint's table):
 *   embeddings: word [V,C], position [P,C], token_type [NT,C], LayerNorm weight [C], bias [C]
 *   per layer:  query W [C,C] b [C], key W b, value W b, attention.output.dense W [C,C] b, LayerNorm w b,
 *               intermediate.dense W [I,C] b [I], output.dense W [C,I] b [C], LayerNorm w b
 *   qa_outputs: W [2,C], b [2]
 * The engine does not own the four buffers (the Python module keeps them as NumPy arrays).
 */
#ifndef BERTQA_MODEL_H
#define BERTQA_MODEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int V, P, NT, C, L, NH, FF;  /* vocab, max positions, token types, hidden, layers, heads, intermediate (feed-forward) */
    float eps;                   /* layer_norm_eps */
    float hidden_dropout, attn_dropout;
    int64_t pad_id;              /* pad_token_id: the word-embedding row that gets no gradient (-1: none) */
} bq_config;

#define BQ_LAYER_TENSORS 16
#define BQ_NUM_TENSORS(L) (5 + BQ_LAYER_TENSORS * (L) + 2)

typedef struct {
    float *qw, *qb, *kw, *kb, *vw, *vb, *aow, *aob, *ln1w, *ln1b, *fcw, *fcb, *fc2w, *fc2b, *ln2w, *ln2b;
} bq_layer_params;

typedef struct {
    float *wte, *wpe, *wtt, *lnw, *lnb;
    bq_layer_params *layers;   /* [L] */
    float *qaw, *qab;
} bq_params;

/* Activations of one layer for one (B, T). In eval mode all layers share one set, with no probabilities
 * (att = NULL) and GELU in place (gelu = fc). */
typedef struct {
    float *q, *k, *v;        /* [N,C] each, heads side by side ([B,T,NH,HS]) */
    float *att;              /* [B,NH,T,T] softmax probabilities (before dropout) */
    float *ctx;              /* [N,C] attention output */
    float *res1;             /* [N,C] x + dropout(ctx Wo^T + bo): input of LayerNorm 1 */
    float *mean1, *rstd1;    /* [N] */
    float *h1;               /* [N,C] LayerNorm 1 output */
    float *fc;               /* [N,I] before GELU */
    float *gelu;             /* [N,I] */
    float *res2;             /* [N,C] h1 + dropout(gelu W2^T + b2): input of LayerNorm 2 */
    float *mean2, *rstd2;    /* [N] */
    float *out;              /* [N,C] LayerNorm 2 output = the next layer's input */
} bq_layer_acts;

/* The weight matrices of a layer, in the order of bq_lowp_weight's copies */
enum { BQ_W_Q, BQ_W_K, BQ_W_V, BQ_W_AO, BQ_W_FC, BQ_W_FC2, BQ_W_N };

/* One weight matrix as a bf16 or int8 product reads it (cpu.h, bq_lowp_kernels): packed, and for int8 with its
 * per-output-channel scales and sums. */
typedef struct {
    void *w;
    float *sw;
    int32_t *qsum;
} bq_lowp_weight;

/* Seconds spent per kind of work since the last reset (bq_model.prof): a cheap, always-on breakdown. */
enum {
    BQ_PROF_FWD_EMBEDDING, BQ_PROF_FWD_LINEAR, BQ_PROF_FWD_ATTENTION, BQ_PROF_FWD_LAYERNORM, BQ_PROF_FWD_GELU,
    BQ_PROF_FWD_DROPOUT_RESIDUAL, BQ_PROF_FWD_HEAD,
    BQ_PROF_BWD_LOSS_HEAD, BQ_PROF_BWD_LINEAR, BQ_PROF_BWD_ATTENTION, BQ_PROF_BWD_LAYERNORM, BQ_PROF_BWD_GELU,
    BQ_PROF_BWD_DROPOUT_RESIDUAL, BQ_PROF_BWD_EMBEDDING, BQ_PROF_BWD_ZERO, BQ_PROF_ADAMW, BQ_PROF_N
};
extern const char *const bq_prof_names[BQ_PROF_N];

typedef struct bq_model {
    bq_config cfg;
    size_t nparams;
    float *params, *grads, *m, *v;   /* [nparams] each, borrowed; grads/m/v may be NULL (inference only) */
    bq_params p, g;                  /* tensor pointers into params and grads */
    size_t *offsets;                 /* [ntensors + 1]: tensor i starts at offsets[i]; offsets[ntensors] = nparams */
    int ntensors;
    /* activation arena, grown as needed, laid out per call for the rows and mode at hand */
    float *arena;
    size_t arena_floats;
    int B, T, train;                         /* the [B,T] batch of the last forward */
    int *off, off_cap;                       /* its rows: row b is tokens off[b] .. off[b+1]-1 (trailing padding cut) */
    int N;                                   /* tokens run: off[B] */
    float *emb, *emb_mean, *emb_rstd, *h0;   /* [N,C] embedding sum, [N] LN stats, [N,C] embedding output */
    bq_layer_acts *acts;                     /* [L] */
    float *logits;                           /* [N,2] head output, start and end interleaved */
    float *start_l, *end_l;                  /* [N] each, de-interleaved */
    float *dlogits, *dse;                    /* [N,2] and [2N]: span-loss gradients */
    float *d_buf[7];                         /* backward scratch: 6 of [N,C], 1 of [N,I] x 2 */
    double prof[BQ_PROF_N];                  /* seconds per kind of work (see bq_prof_names) */
    /* precision of the matrix products (cpu.h BQ_PREC_*): fp32 (the BLAS), bf16 (training and inference) or
     * int8 (inference). Master weights, gradients, AdamW, LayerNorm, softmax, GELU, the head and the loss stay
     * fp32; attention's products stay fp32 (the fused kernel). */
    int precision;
    const void *lowp;                        /* cpu.h's bq_lowp_kernels for it; NULL in fp32 */
    int per_tensor;                          /* int8: one activation scale per tensor (1) or per token (0) */
    bq_lowp_weight *lw;                      /* [L * BQ_W_N]: the linear layers' weights as the products read them */
    void *lw_mem;
    int lw_fresh;                            /* lw holds the current parameters (cleared by an AdamW step and by
                                                bq_model_weights_changed) */
} bq_model;

/* Tensor sizes in table order; returns the count (BQ_NUM_TENSORS(L)). sizes may be NULL. */
int bq_tensor_sizes(const bq_config *cfg, size_t *sizes);
/* Checks cfg, computes offsets and points p (and g when grads) into the buffers. BQ_ERR_ARG for a bad config
 * (C % NH != 0, non-positive sizes); BQ_ERR_NOMEM. */
int bq_model_init(bq_model *m, const bq_config *cfg, float *params, float *grads, float *adam_m, float *adam_v);
void bq_model_free(bq_model *m);
/* The products' precision (BQ_PREC_FP32, _BF16, _INT8; per_tensor: int8 activation scales per tensor instead of
 * per token). BQ_ERR_ARG when this CPU cannot run it (cpu.h bq_cpu_lowp says why) or int8 is asked of a model
 * with gradients; BQ_ERR_NOMEM. The low-precision copies of the weights are made at the next forward. */
int bq_model_set_precision(bq_model *m, int precision, int per_tensor);
/* The parameters were written outside the engine: remake the low-precision copies at the next forward. */
void bq_model_weights_changed(bq_model *m);

/* Eval or train forward. ids/types [B,T] (types may be NULL), mask [B,T] of 0/1 floats (NULL: all real).
 * Writes start/end [B,T] (either may be NULL). train = 1 applies dropout and keeps what backward needs; its masks are
 * keyed by (seed, step, window[b], position, feature) as bq_rng says with P = the model's positions (window NULL:
 * row b is window b).
 * No padding is computed (eval or train): the positions after each row's last real token are not run through the
 * model and read -inf in start/end (an all-padding row is computed in full). */
int bq_forward(bq_model *m, const int64_t *ids, const int64_t *types, const float *mask, int B, int T, int train,
               uint64_t seed, uint32_t step, const int64_t *window, float *start, float *end);
/* After a train forward with the same arguments: span loss (over each row's real tokens, span_loss_rows) and
 * backward; gradients ACCUMULATE into grads, scaled by loss_scale. Returns BQ status; *loss gets the (unscaled)
 * loss. */
int bq_backward(bq_model *m, const int64_t *ids, const int64_t *types, const float *mask, const int64_t *start_pos,
                const int64_t *end_pos, uint64_t seed, uint32_t step, const int64_t *window, float loss_scale,
                float *loss);
/* Global gradient norm, clipping (max_norm <= 0: none) and one AdamW step over all tensors; decay[i] != 0 marks
 * the tensors that get weight decay; tensor i steps at lr * lr_scale[i] (NULL: all 1; layer-wise learning-rate
 * decay), its weight decay scaled with it as torch's per-group lr does. A non-finite norm skips the update.
 * Returns the norm before clipping. */
double bq_adamw_step(bq_model *m, const uint8_t *decay, const float *lr_scale, float lr, float beta1, float beta2,
                     float eps, float weight_decay, float max_norm, int step);

#ifdef __cplusplus
}
#endif
#endif
