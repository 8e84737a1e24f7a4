/* The BERT-for-QA engine: forward, backward and AdamW over a flat parameter buffer (see model.h).
 *
 * One encoder layer (post-LayerNorm, as BERT), x [N,C] with N = B*T:
 *   q, k, v = x Wq^T + bq, x Wk^T + bk, x Wv^T + bv
 *   ctx     = attention(q, k, v, mask)                      (dropout on the probabilities)
 *   h1      = LayerNorm1(x + dropout(ctx Wo^T + bo))
 *   out     = LayerNorm2(h1 + dropout(gelu(h1 W1^T + b1) W2^T + b2))
 * Embeddings: h0 = dropout(LayerNorm(word + position + token_type)); head: logits = x_L Wqa^T + bqa.
 *
 * Dropout sites are numbered for the RNG: 0 embeddings, then per layer l: 1+3l attention probabilities,
 * 2+3l attention output, 3+3l feed-forward output.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention_fused.h"
#include "bertqa.h"
#include "cpu.h"
#include "model.h"

#ifdef _OPENMP
#include <omp.h>
static inline double now(void) { return omp_get_wtime(); }
#else
#include <time.h>
static inline double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
#endif

const char *const bq_prof_names[BQ_PROF_N] = {
    "forward.embedding", "forward.linear", "forward.attention", "forward.layernorm", "forward.gelu",
    "forward.dropout_residual", "forward.head",
    "backward.loss_head", "backward.linear", "backward.attention", "backward.layernorm", "backward.gelu",
    "backward.dropout_residual", "backward.embedding", "backward.zero", "adamw"};

/* PROF(kind, statement): run the statement and add its wall time to m->prof[kind]. */
#define PROF(kind, stmt) do { double t0_ = now(); stmt; m->prof[kind] += now() - t0_; } while (0)

#define SITE_EMB 0u
#define SITE_ATT(l) (1u + 3u * (unsigned)(l))
#define SITE_AO(l) (2u + 3u * (unsigned)(l))
#define SITE_FFN(l) (3u + 3u * (unsigned)(l))

int bq_tensor_sizes(const bq_config *c, size_t *s) {
    const size_t C = c->C, I = c->FF;
    size_t layer[BQ_LAYER_TENSORS] = {C * C, C, C * C, C, C * C, C, C * C, C, C, C, I * C, I, C * I, C, C, C};
    int n = 0;
#define PUT(x) do { if (s) s[n] = (x); n++; } while (0)
    PUT((size_t)c->V * C); PUT((size_t)c->P * C); PUT((size_t)c->NT * C); PUT(C); PUT(C);
    for (int l = 0; l < c->L; l++)
        for (int i = 0; i < BQ_LAYER_TENSORS; i++) PUT(layer[i]);
    PUT(2 * C); PUT(2);
#undef PUT
    return n;
}

static void point_params(bq_params *p, float *base, const size_t *off, int L) {
    int t = 0;
    p->wte = base + off[t++]; p->wpe = base + off[t++]; p->wtt = base + off[t++];
    p->lnw = base + off[t++]; p->lnb = base + off[t++];
    for (int l = 0; l < L; l++) {
        bq_layer_params *q = &p->layers[l];
        float **fields[BQ_LAYER_TENSORS] = {&q->qw, &q->qb, &q->kw, &q->kb, &q->vw, &q->vb, &q->aow, &q->aob,
                                            &q->ln1w, &q->ln1b, &q->fcw, &q->fcb, &q->fc2w, &q->fc2b, &q->ln2w, &q->ln2b};
        for (int i = 0; i < BQ_LAYER_TENSORS; i++) *fields[i] = base + off[t++];
    }
    p->qaw = base + off[t++]; p->qab = base + off[t++];
}

int bq_model_init(bq_model *m, const bq_config *cfg, float *params, float *grads, float *adam_m, float *adam_v) {
    memset(m, 0, sizeof *m);
    const bq_config *c = cfg;
    if (c->V < 1 || c->P < 1 || c->NT < 1 || c->C < 1 || c->L < 1 || c->NH < 1 || c->FF < 1 || c->C % c->NH ||
        !(c->eps >= 0) || !(c->hidden_dropout >= 0 && c->hidden_dropout < 1) ||
        !(c->attn_dropout >= 0 && c->attn_dropout < 1))
        return BQ_ERR_ARG;
    m->cfg = *cfg;
    m->ntensors = bq_tensor_sizes(c, NULL);
    size_t *sizes = malloc(sizeof(size_t) * m->ntensors);
    m->offsets = malloc(sizeof(size_t) * (m->ntensors + 1));
    m->p.layers = calloc(c->L, sizeof(bq_layer_params));
    m->g.layers = calloc(c->L, sizeof(bq_layer_params));
    m->acts = calloc(c->L, sizeof(bq_layer_acts));
    if (!sizes || !m->offsets || !m->p.layers || !m->g.layers || !m->acts) {
        free(sizes);
        bq_model_free(m);
        return BQ_ERR_NOMEM;
    }
    bq_tensor_sizes(c, sizes);
    size_t off = 0;
    for (int i = 0; i < m->ntensors; i++) {
        m->offsets[i] = off;
        off += sizes[i];
    }
    m->offsets[m->ntensors] = m->nparams = off;
    free(sizes);
    m->params = params;
    m->grads = grads;
    m->m = adam_m;
    m->v = adam_v;
    point_params(&m->p, params, m->offsets, c->L);
    if (grads) point_params(&m->g, grads, m->offsets, c->L);
    return BQ_OK;
}

void bq_model_free(bq_model *m) {
    free(m->lw);
    free(m->lw_mem);
    free(m->arena);
    free(m->off);
    free(m->offsets);
    free(m->p.layers);
    free(m->g.layers);
    free(m->acts);
    memset(m, 0, sizeof *m);
}

/* ---- precision ------------------------------------------------------------------------------- */

/* [OUT, IN] of weight matrix i of a layer */
static void weight_shape(const bq_config *c, int i, int *OUT, int *IN) {
    *OUT = i == BQ_W_FC ? c->FF : c->C;
    *IN = i == BQ_W_FC2 ? c->FF : c->C;
}

static const float *layer_weight(const bq_layer_params *w, int i) {
    const float *const all[BQ_W_N] = {w->qw, w->kw, w->vw, w->aow, w->fcw, w->fc2w};
    return all[i];
}

/* Lays out the low-precision weights in one block (every matrix's packed copy 64-byte aligned, int8's scales and
 * sums after it), pointing m->lw into base; with base == NULL only counts the bytes (as layout() does the arena). */
static size_t layout_lowp(bq_model *m, const bq_lowp_kernels *k, int precision, char *base) {
    const bq_config *c = &m->cfg;
    size_t used = 0;
    for (int l = 0; l < c->L; l++)
        for (int i = 0; i < BQ_W_N; i++) {
            int OUT, IN;
            weight_shape(c, i, &OUT, &IN);
            size_t b = precision == BQ_PREC_BF16 ? k->bf16_packed_elems(IN, OUT) * 2 : k->i8_packed_bytes(IN, OUT);
            if (base) {
                bq_lowp_weight *w = &m->lw[l * BQ_W_N + i];
                w->w = base + used;
                w->sw = precision == BQ_PREC_INT8 ? (float *)(base + used + b) : NULL;
                w->qsum = precision == BQ_PREC_INT8 ? (int32_t *)(base + used + b + (size_t)OUT * sizeof(float)) : NULL;
            }
            if (precision == BQ_PREC_INT8) b += (size_t)OUT * (sizeof(float) + sizeof(int32_t));
            used += (b + 63) & ~(size_t)63;
        }
    return used;
}

int bq_model_set_precision(bq_model *m, int precision, int per_tensor) {
    const bq_lowp_kernels *k = NULL;
    if (precision != BQ_PREC_FP32 && !(k = bq_cpu_lowp(precision, NULL))) return BQ_ERR_ARG;
    if (precision == BQ_PREC_INT8 && m->grads) return BQ_ERR_ARG;
    free(m->lw);
    free(m->lw_mem);
    m->lw = NULL;
    m->lw_mem = NULL;
    m->lw_fresh = 0;
    m->precision = precision;
    m->lowp = k;
    m->per_tensor = per_tensor;
    if (!k) return BQ_OK;
    m->lw = calloc((size_t)m->cfg.L * BQ_W_N, sizeof(bq_lowp_weight));
    m->lw_mem = aligned_alloc(64, layout_lowp(m, k, precision, NULL));
    if (!m->lw || !m->lw_mem) {
        bq_model_set_precision(m, BQ_PREC_FP32, 0);
        return BQ_ERR_NOMEM;
    }
    layout_lowp(m, k, precision, m->lw_mem);
    return BQ_OK;
}

void bq_model_weights_changed(bq_model *m) { m->lw_fresh = 0; }

/* the low-precision copies of the weights, remade when the parameters changed */
static void refresh_lowp_weights(bq_model *m) {
    const bq_lowp_kernels *k = m->lowp;
    if (!k || m->lw_fresh) return;
    const bq_config *c = &m->cfg;
    for (int l = 0; l < c->L; l++)
        for (int i = 0; i < BQ_W_N; i++) {
            int OUT, IN;
            weight_shape(c, i, &OUT, &IN);
            bq_lowp_weight *w = &m->lw[l * BQ_W_N + i];
            const float *W = layer_weight(&m->p.layers[l], i);
            if (m->precision == BQ_PREC_BF16)
                k->bf16_pack_b(w->w, W, IN, 1, IN, OUT);   /* B[k,n] = W[n,k]: the forward's W^T */
            else
                k->i8_pack_weights(w->w, w->sw, w->qsum, W, IN, OUT, IN);
        }
    m->lw_fresh = 1;
}

/* out = x W^T + b for weight matrix i of layer l, in the model's precision, then GELU of it with gelu (in bf16 /
 * int8 applied as the product stores its results) */
static int lin_fwd(bq_model *m, int l, int i, float *out, const float *x, const float *b, int N, int gelu) {
    int OUT, IN;
    weight_shape(&m->cfg, i, &OUT, &IN);
    const float *W = layer_weight(&m->p.layers[l], i);
    if (!m->lowp) {
        linear_forward(out, x, W, b, N, IN, OUT);
        if (gelu) gelu_forward(out, out, (size_t)N * OUT);
        return BQ_OK;
    }
    const bq_lowp_weight *w = &m->lw[l * BQ_W_N + i];
    return linear_forward_lowp(m->lowp, m->precision, w->w, w->sw, w->qsum, m->per_tensor, out, x, b, N, IN, OUT,
                               gelu);
}

/* the backward of lin_fwd: dx += dout W, dW += dout^T x, db += sum dout */
static int lin_bwd(bq_model *m, int l, int i, float *dx, float *dW, float *db, const float *dout, const float *x,
                   int N) {
    int OUT, IN;
    weight_shape(&m->cfg, i, &OUT, &IN);
    const float *W = layer_weight(&m->p.layers[l], i);
    if (!m->lowp) {
        linear_backward(dx, dW, db, dout, x, W, N, IN, OUT);
        return BQ_OK;
    }
    return linear_backward_bf16(m->lowp, dx, dW, db, dout, x, W, N, IN, OUT);
}

/* ---- activation arena ------------------------------------------------------------------------- */

/* Lays the arena out for N tokens (rows packed one after the other) and A floats of saved attention state,
 * growing it if needed; with ptr == NULL only counts floats. */
static size_t layout(bq_model *m, size_t N, size_t A, int train, float *ptr) {
    const bq_config *c = &m->cfg;
    const size_t C = c->C, I = c->FF;
    size_t used = 0;
#define TAKE(dst, n) do { if (ptr) (dst) = ptr + used; used += (n); } while (0)
    TAKE(m->emb, N * C); TAKE(m->emb_mean, N); TAKE(m->emb_rstd, N); TAKE(m->h0, N * C);
    TAKE(m->logits, N * 2); TAKE(m->start_l, N); TAKE(m->end_l, N); TAKE(m->dlogits, N * 2); TAKE(m->dse, N * 2);
    /* eval: one set of layer buffers shared by all layers; each layer writes its output over its input */
    const int sets = train ? c->L : 1;
    for (int l = 0; l < sets; l++) {
        bq_layer_acts *a = &m->acts[l];
        TAKE(a->q, N * C); TAKE(a->k, N * C); TAKE(a->v, N * C); TAKE(a->ctx, N * C);
        TAKE(a->res1, N * C); TAKE(a->mean1, N); TAKE(a->rstd1, N); TAKE(a->h1, N * C);
        TAKE(a->fc, N * I);
        if (train) {   /* what only backward needs: attention's saved state, and the GELU input beside its output */
            TAKE(a->att, A); TAKE(a->gelu, N * I);
        } else if (ptr) {
            a->att = NULL;
            a->gelu = a->fc;
        }
        TAKE(a->res2, N * C); TAKE(a->mean2, N); TAKE(a->rstd2, N);
        if (train) TAKE(a->out, N * C);
    }
    if (ptr && !train) {
        m->acts[0].out = m->h0;
        for (int l = 1; l < c->L; l++) m->acts[l] = m->acts[0];
    }
    if (train) {
        for (int i = 0; i < 6; i++) TAKE(m->d_buf[i], N * C);
        TAKE(m->d_buf[6], 2 * N * I);
    }
#undef TAKE
    return used;
}

/* The rows of a [B,T] batch as the engine runs them: each row's tokens up to its last real one (bq_row_length;
 * all T without a mask), packed one after the other: row b is tokens off[b] .. off[b+1]-1 (m->off, [B+1]). */
static int set_rows(bq_model *m, const float *mask, int B, int T) {
    if (B + 1 > m->off_cap) {
        int *off = malloc(sizeof(int) * ((size_t)B + 1));
        if (!off) return BQ_ERR_NOMEM;
        free(m->off);
        m->off = off;
        m->off_cap = B + 1;
    }
    m->off[0] = 0;
    for (int b = 0; b < B; b++) m->off[b + 1] = m->off[b] + (mask ? bq_row_length(mask + (long)b * T, T) : T);
    m->B = B;
    m->T = T;
    m->N = m->off[B];
    return BQ_OK;
}

static int prepare_arena(bq_model *m, int train) {
    const size_t A = train ? attention_saved_floats(m->B, m->off, m->cfg.NH) : 0;
    size_t need = layout(m, (size_t)m->N, A, train, NULL);
    if (need > m->arena_floats) {
        float *a = malloc(need * sizeof(float));
        if (!a) return BQ_ERR_NOMEM;
        free(m->arena);
        m->arena = a;
        m->arena_floats = need;
    }
    layout(m, (size_t)m->N, A, train, m->arena);
    m->train = train;
    return BQ_OK;
}

/* ---- forward ---------------------------------------------------------------------------------- */

static void add3(float *out, const float *a, const float *b, size_t n) {
#pragma omp parallel for simd schedule(static) if (n > 65536) num_threads(bq_num_threads())
    for (long i = 0; i < (long)n; i++) out[i] = a[i] + b[i];
}

/* out = x + dropout(y) over the model's rows (dropout in place on y first when training) */
static void residual(bq_model *m, float *out, const float *x, float *y, float p, int train, bq_rng r,
                     uint32_t site) {
    const int C = m->cfg.C;
    if (train && p > 0.0f) dropout_rows_forward(y, y, m->B, m->off, C, p, r, site);
    add3(out, x, y, (size_t)m->N * C);
}

int bq_forward(bq_model *m, const int64_t *ids, const int64_t *types, const float *mask, int B, int T, int train,
               uint64_t seed, uint32_t step, const int64_t *window, float *start, float *end) {
    const bq_config *c = &m->cfg;
    const bq_rng r = {seed, step, window, c->P};
    const int C = c->C, I = c->FF, NH = c->NH, HS = C / NH;
    const float pd = train ? c->hidden_dropout : 0.0f, pa = train ? c->attn_dropout : 0.0f;
    /* Padding is never computed, in training as in inference: the rows are packed one after the other without
     * their trailing padding, so every per-token kernel (the linear layers, LayerNorm, GELU, dropout) runs on
     * real tokens only and attention runs per row on its own length. Dropout numbers a row's elements by
     * (window, position) (bq_rng), not by place in the packed buffer. */
    if (T > c->P) return BQ_ERR_INDEX;
    if (train && m->precision == BQ_PREC_INT8) return BQ_ERR_ARG;   /* int8 is for inference */
    int st = set_rows(m, mask, B, T);
    if (!st) st = prepare_arena(m, train);
    if (st) return st;
    const int *off = m->off;
    const int N = m->N;
    PROF(BQ_PROF_FWD_LINEAR, refresh_lowp_weights(m));
    const bq_attn_bf16_kernels *attn16 = m->lowp && !train ? bq_attn_bf16_best() : NULL;
    PROF(BQ_PROF_FWD_EMBEDDING, {   /* each row's tokens at positions 0..T_b-1 */
        for (int b = 0; b < B && !st; b++)
            st = embedding_forward(m->emb + (long)off[b] * C, ids + (long)b * T, types ? types + (long)b * T : NULL,
                                   m->p.wte, m->p.wpe, m->p.wtt, 1, off[b + 1] - off[b], C, c->V, c->P, c->NT);
    });
    if (st) return st;
    PROF(BQ_PROF_FWD_LAYERNORM,
         layernorm_forward(m->h0, m->emb_mean, m->emb_rstd, m->emb, m->p.lnw, m->p.lnb, N, C, c->eps));
    if (pd > 0.0f) PROF(BQ_PROF_FWD_DROPOUT_RESIDUAL, dropout_rows_forward(m->h0, m->h0, B, off, C, pd, r, SITE_EMB));
    const float *x = m->h0;
    for (int l = 0; l < c->L; l++) {
        bq_layer_acts *a = &m->acts[l];
        const bq_layer_params *w = &m->p.layers[l];
        PROF(BQ_PROF_FWD_LINEAR, {
            st = lin_fwd(m, l, BQ_W_Q, a->q, x, w->qb, N, 0);
            if (!st) st = lin_fwd(m, l, BQ_W_K, a->k, x, w->kb, N, 0);
            if (!st) st = lin_fwd(m, l, BQ_W_V, a->v, x, w->vb, N, 0);
        });
        if (st) return st;
        if (attn16)   /* inference in bf16 or int8: attention's products in bf16 too */
            PROF(BQ_PROF_FWD_ATTENTION, st = bq_attention_forward_rows_bf16(attn16, a->ctx, a->q, a->k, a->v, mask, T,
                                                                             B, off, NH, HS, C));
        else
            PROF(BQ_PROF_FWD_ATTENTION, st = attention_forward_rows(a->ctx, train ? a->att : NULL, a->q, a->k, a->v,
                                                                    mask, T, B, off, NH, HS, C, pa, r, SITE_ATT(l)));
        if (st) return st;
        PROF(BQ_PROF_FWD_LINEAR, st = lin_fwd(m, l, BQ_W_AO, a->res1, a->ctx, w->aob, N, 0));   /* attention output */
        if (st) return st;
        PROF(BQ_PROF_FWD_DROPOUT_RESIDUAL, residual(m, a->res1, x, a->res1, pd, train, r, SITE_AO(l)));
        PROF(BQ_PROF_FWD_LAYERNORM,
             layernorm_forward(a->h1, a->mean1, a->rstd1, a->res1, w->ln1w, w->ln1b, N, C, c->eps));
        /* in bf16 / int8 inference the product stores GELU of its sums (GELU is in place there: gelu == fc);
         * training keeps the GELU input for the backward */
        const int fused_gelu = m->lowp && !train;
        PROF(BQ_PROF_FWD_LINEAR, st = lin_fwd(m, l, BQ_W_FC, a->fc, a->h1, w->fcb, N, fused_gelu));
        if (st) return st;
        if (!fused_gelu) PROF(BQ_PROF_FWD_GELU, gelu_forward(a->gelu, a->fc, (size_t)N * I));
        PROF(BQ_PROF_FWD_LINEAR, st = lin_fwd(m, l, BQ_W_FC2, a->res2, a->gelu, w->fc2b, N, 0));
        if (st) return st;
        PROF(BQ_PROF_FWD_DROPOUT_RESIDUAL, residual(m, a->res2, a->h1, a->res2, pd, train, r, SITE_FFN(l)));
        PROF(BQ_PROF_FWD_LAYERNORM,
             layernorm_forward(a->out, a->mean2, a->rstd2, a->res2, w->ln2w, w->ln2b, N, C, c->eps));
        x = a->out;
    }
    PROF(BQ_PROF_FWD_HEAD, {
        linear_forward(m->logits, x, m->p.qaw, m->p.qab, N, C, 2);   /* [N,2]: start and end interleaved */
        for (long i = 0; i < N; i++) {
            m->start_l[i] = m->logits[2 * i];
            m->end_l[i] = m->logits[2 * i + 1];
        }
    });
    /* back to [B,T]; the positions after a row's last real token were not computed: -inf */
    for (int b = 0; b < B && (start || end); b++) {
        const int L = off[b + 1] - off[b];
        for (int t = 0; t < T; t++) {
            const long i = (long)b * T + t;
            if (start) start[i] = t < L ? m->start_l[off[b] + t] : -INFINITY;
            if (end) end[i] = t < L ? m->end_l[off[b] + t] : -INFINITY;
        }
    }
    return BQ_OK;
}

/* ---- backward --------------------------------------------------------------------------------- */

static void zero(float *p, size_t n) { memset(p, 0, n * sizeof(float)); }

/* dx (+)= d(x + dropout(y))/dx = dres;  dy = dropout_backward(dres) into a zeroed buffer */
static void residual_backward(bq_model *m, float *dy, const float *dres, float p, bq_rng r, uint32_t site) {
    const size_t n = (size_t)m->N * m->cfg.C;
    if (p > 0.0f) {
        zero(dy, n);
        dropout_rows_backward(dy, dres, m->B, m->off, m->cfg.C, p, r, site);
    } else {
        memcpy(dy, dres, n * sizeof(float));
    }
}

int bq_backward(bq_model *m, const int64_t *ids, const int64_t *types, const float *mask, const int64_t *start_pos,
                const int64_t *end_pos, uint64_t seed, uint32_t step, const int64_t *window, float loss_scale,
                float *loss) {
    const bq_config *c = &m->cfg;
    const bq_rng r = {seed, step, window, c->P};
    if (!m->train || !m->grads) return BQ_ERR_ARG;
    const int B = m->B, T = m->T, C = c->C, I = c->FF, NH = c->NH, HS = C / NH, N = m->N;
    const int *off = m->off;
    const size_t NC = (size_t)N * C, NI = (size_t)N * I;
    const float pd = c->hidden_dropout, pa = c->attn_dropout;
    float *dout = m->d_buf[0], *dres = m->d_buf[1], *dy = m->d_buf[2];
    float *dq = m->d_buf[3], *dk = m->d_buf[4], *dv = m->d_buf[5];
    float *dgelu = m->d_buf[6], *dfc = m->d_buf[6] + NI;
    int st = BQ_OK;

    /* span loss over each row's real tokens -> dlogits [N,2], start and end interleaved as the head wrote them */
    float *dstart = m->dse, *dend = m->dse + N, *dlogits = m->dlogits;
    const float *x_last = m->acts[c->L - 1].out;
    PROF(BQ_PROF_BWD_LOSS_HEAD, {
        *loss = span_loss_rows(dstart, dend, m->start_l, m->end_l, start_pos, end_pos, B, off, T, loss_scale);
        for (long i = 0; i < N; i++) {
            dlogits[2 * i] = dstart[i];
            dlogits[2 * i + 1] = dend[i];
        }
        zero(dout, NC);
        linear_backward(dout, m->g.qaw, m->g.qab, dlogits, x_last, m->p.qaw, N, C, 2);
    });

    for (int l = c->L - 1; l >= 0; l--) {
        bq_layer_acts *a = &m->acts[l];
        const bq_layer_params *w = &m->p.layers[l];
        bq_layer_params *gw = &m->g.layers[l];
        const float *x = l ? m->acts[l - 1].out : m->h0;
        /* out = LN2(res2): dout -> dres */
        PROF(BQ_PROF_BWD_ZERO, zero(dres, NC));
        PROF(BQ_PROF_BWD_LAYERNORM,
             layernorm_backward(dres, gw->ln2w, gw->ln2b, dout, a->res2, w->ln2w, a->mean2, a->rstd2, N, C));
        /* res2 = h1 + dropout(ffn): dh1 = dres (dout is free now), dffn = dropout'(dres) into dy */
        PROF(BQ_PROF_BWD_DROPOUT_RESIDUAL, residual_backward(m, dy, dres, pd, r, SITE_FFN(l)));
        float *dh1 = dres;
        PROF(BQ_PROF_BWD_ZERO, zero(dgelu, NI));
        PROF(BQ_PROF_BWD_LINEAR, st = lin_bwd(m, l, BQ_W_FC2, dgelu, gw->fc2w, gw->fc2b, dy, a->gelu, N));
        if (st) return st;
        PROF(BQ_PROF_BWD_ZERO, zero(dfc, NI));
        PROF(BQ_PROF_BWD_GELU, gelu_backward(dfc, a->fc, dgelu, NI));
        PROF(BQ_PROF_BWD_LINEAR, st = lin_bwd(m, l, BQ_W_FC, dh1, gw->fcw, gw->fcb, dfc, a->h1, N));   /* dh1 += dfc W1 */
        if (st) return st;
        /* h1 = LN1(res1): dh1 -> dres1 (in dout) */
        float *dres1 = dout;
        PROF(BQ_PROF_BWD_ZERO, zero(dres1, NC));
        PROF(BQ_PROF_BWD_LAYERNORM,
             layernorm_backward(dres1, gw->ln1w, gw->ln1b, dh1, a->res1, w->ln1w, a->mean1, a->rstd1, N, C));
        /* res1 = x + dropout(ctx Wo^T + bo): dx = dres1 (stays in dout), dao = dropout'(dres1) into dy */
        PROF(BQ_PROF_BWD_DROPOUT_RESIDUAL, residual_backward(m, dy, dres1, pd, r, SITE_AO(l)));
        float *dctx = dres;   /* dh1 is consumed */
        PROF(BQ_PROF_BWD_ZERO, zero(dctx, NC));
        PROF(BQ_PROF_BWD_LINEAR, st = lin_bwd(m, l, BQ_W_AO, dctx, gw->aow, gw->aob, dy, a->ctx, N));
        if (st) return st;
        PROF(BQ_PROF_BWD_ATTENTION,   /* overwrites dq, dk, dv */
             st = attention_backward_rows(dq, dk, dv, dctx, a->ctx, a->att, a->q, a->k, a->v, mask, T, B, off, NH, HS, C,
                                          pa, r, SITE_ATT(l)));
        if (st) return st;
        float *dx = dout;   /* already holds the residual path; the projections add to it */
        PROF(BQ_PROF_BWD_LINEAR, {
            st = lin_bwd(m, l, BQ_W_Q, dx, gw->qw, gw->qb, dq, x, N);
            if (!st) st = lin_bwd(m, l, BQ_W_K, dx, gw->kw, gw->kb, dk, x, N);
            if (!st) st = lin_bwd(m, l, BQ_W_V, dx, gw->vw, gw->vb, dv, x, N);
        });
        if (st) return st;
    }
    /* h0 = dropout(LN(emb)) */
    float *dln = dy;
    PROF(BQ_PROF_BWD_DROPOUT_RESIDUAL, residual_backward(m, dln, dout, pd, r, SITE_EMB));
    PROF(BQ_PROF_BWD_ZERO, zero(dres, NC));
    PROF(BQ_PROF_BWD_LAYERNORM,
         layernorm_backward(dres, m->g.lnw, m->g.lnb, dln, m->emb, m->p.lnw, m->emb_mean, m->emb_rstd, N, C));
    PROF(BQ_PROF_BWD_EMBEDDING, {
        for (int b = 0; b < B && !st; b++)
            st = embedding_backward(m->g.wte, m->g.wpe, m->g.wtt, dres + (long)off[b] * C, ids + (long)b * T,
                                    types ? types + (long)b * T : NULL, 1, off[b + 1] - off[b], C, c->V, c->P, c->NT,
                                    c->pad_id);
    });
    return st;
}

/* ---- optimizer -------------------------------------------------------------------------------- */

double bq_adamw_step(bq_model *m, const uint8_t *decay, const float *lr_scale, float lr, float beta1, float beta2,
                     float eps, float weight_decay, float max_norm, int step) {
    const double t0 = now();
    const double norm = sqrt(sum_squares(m->grads, m->nparams));
    if (!isfinite(norm)) return norm;   /* a NaN/inf gradient: skip the step, the caller reports it */
    float scale = 1.0f;
    if (max_norm > 0.0f) {
        double coef = max_norm / (norm + 1e-6);   /* torch.nn.utils.clip_grad_norm_ */
        if (coef < 1.0) scale = (float)coef;
    }
    for (int t = 0; t < m->ntensors; t++) {
        size_t o = m->offsets[t], n = m->offsets[t + 1] - o;
        const float lr_t = lr_scale ? (float)((double)lr * lr_scale[t]) : lr;
        adamw_update(m->params + o, m->grads + o, m->m + o, m->v + o, n, lr_t, beta1, beta2, eps,
                     decay[t] ? weight_decay : 0.0f, step, scale);
    }
    m->lw_fresh = 0;   /* the low-precision copies are remade at the next forward: once per step */
    m->prof[BQ_PROF_ADAMW] += now() - t0;
    return norm;
}
