/* The CUDA kernels one by one on host arrays (bertqa_cuda.h, "kernels one by one"): each call makes a stream,
 * copies its inputs in (rounded to bf16 on the device in bf16 mode), runs the engine's kernels, copies the results
 * back (widened to fp32) and frees everything. For the tests that hold each kernel against the CPU kernels; not
 * a fast path. */
#include <stdlib.h>
#include <string.h>

#include <type_traits>
#include <vector>

#include "kernels.cuh"

namespace {

/* What one call allocated; released (after the stream drains) on every way out. */
struct scope {
    cudaStream_t s = nullptr;
    std::vector<void *> ptrs;
    bq_gemm g;
    bool gemm = false;
    ~scope() {
        if (s) cudaStreamSynchronize(s);
        for (void *p : ptrs) cudaFree(p);
        if (gemm) bq_gemm_destroy(&g);
        if (s) cudaStreamDestroy(s);
    }
    int init(bool with_gemm = false) {
        char reason[256];
        if (bq_cuda_device_count(reason, sizeof reason) == 0) return bq_cuda_fail(BQ_ERR_DEVICE, "%s", reason);
        CUDA_TRY(cudaSetDevice(0));
        CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
        if (with_gemm) {
            TRY(bq_gemm_init(&g, s));
            gemm = true;
        }
        return BQ_OK;
    }
    template <typename X> int alloc(X **p, size_t n) {
        *p = nullptr;
        void *q = nullptr;
        CUDA_TRY(cudaMalloc(&q, n ? n * sizeof(X) : 1));
        ptrs.push_back(q);
        *p = (X *)q;
        return BQ_OK;
    }
    template <typename X> int zeros(X **p, size_t n) {
        TRY(alloc(p, n));
        CUDA_TRY(cudaMemsetAsync(*p, 0, n * sizeof(X), s));
        return BQ_OK;
    }
    /* host fp32 [n] -> device T [n]; h == NULL gives NULL */
    template <typename T> int up(T **d, const float *h, size_t n) {
        *d = nullptr;
        if (!h) return BQ_OK;
        float *f;
        TRY(alloc(&f, n));
        CUDA_TRY(cudaMemcpyAsync(f, h, n * sizeof(float), cudaMemcpyHostToDevice, s));
        if constexpr (std::is_same<T, float>::value) {
            *d = f;
        } else {
            bf16 *b;
            TRY(alloc(&b, n));
            TRY(launch_f32_to_bf16(s, b, f, n));
            *d = b;
        }
        return BQ_OK;
    }
    template <typename T> int down(float *h, const T *d, size_t n) {
        if (!h) return BQ_OK;
        const float *f;
        if constexpr (std::is_same<T, float>::value) {
            f = d;
        } else {
            float *w;
            TRY(alloc(&w, n));
            TRY(launch_bf16_to_f32(s, w, d, n));
            f = w;
        }
        CUDA_TRY(cudaMemcpyAsync(h, f, n * sizeof(float), cudaMemcpyDeviceToHost, s));
        CUDA_TRY(cudaStreamSynchronize(s));
        return BQ_OK;
    }
    int up_f32(float **d, const float *h, size_t n) { return up<float>(d, h, n); }
    int down_f32(float *h, const float *d, size_t n) { return down<float>(h, d, n); }
    int up_ints(int **d, const int64_t *h, size_t n) {
        *d = nullptr;
        if (!h) return BQ_OK;
        std::vector<int> v(h, h + n);
        TRY(alloc(d, n));
        CUDA_TRY(cudaMemcpyAsync(*d, v.data(), n * sizeof(int), cudaMemcpyHostToDevice, s));
        CUDA_TRY(cudaStreamSynchronize(s));
        return BQ_OK;
    }
};

/* The one-kernel entry points number dropout elements flat over their buffer, as bertqa.ops does (rows of T
 * positions, win NULL, P = T: see bq_drop). */
bq_drop key(float p, uint64_t seed, uint32_t step, uint32_t site, int T) { return drop_flat(p, seed, step, site, T); }

#define DISPATCH(precision, fn, ...) \
    ((precision) == BQ_BF16 ? fn<bf16>(__VA_ARGS__) : (precision) == BQ_FP32 ? fn<float>(__VA_ARGS__) \
                                                    : bq_cuda_fail(BQ_ERR_ARG, "precision must be fp32 or bf16"))

template <typename T>
int dropout_op(float *out, const float *inp, size_t N, float p, uint64_t seed, uint32_t step, uint32_t site) {
    scope sc;
    TRY(sc.init());
    T *x, *y;
    TRY(sc.up(&x, inp, N));
    TRY(sc.alloc(&y, N));
    TRY(launch_dropout<T>(sc.s, y, x, N, key(p, seed, step, site, 1), 0));
    return sc.down(out, y, N);
}

template <typename T>
int residual_layernorm_op(float *res, float *out, float *mean, float *rstd, const float *x, const float *y,
                          const float *w, const float *b, int N, int C, float eps, float p, uint64_t seed, uint32_t step,
                          uint32_t site) {
    scope sc;
    TRY(sc.init());
    const size_t NC = (size_t)N * C;
    T *dx, *dy, *dw, *db, *dres, *dout;
    float *dm, *dr;
    TRY(sc.up(&dx, x, NC));
    TRY(sc.up(&dy, y, NC));
    TRY(sc.up(&dw, w, C));
    TRY(sc.up(&db, b, C));
    TRY(sc.alloc(&dres, NC));
    TRY(sc.alloc(&dout, NC));
    TRY(sc.alloc(&dm, N));
    TRY(sc.alloc(&dr, N));
    TRY(residual_layernorm_forward<T>(sc.s, dres, dout, dm, dr, dx, dy, dw, db, N, C, eps,
                                      key(p, seed, step, site, N)));
    TRY(sc.down(res, dres, NC));
    TRY(sc.down(out, dout, NC));
    TRY(sc.down_f32(mean, dm, N));
    return sc.down_f32(rstd, dr, N);
}

template <typename T>
int layernorm_backward_op(float *dinp, float *branch, float *dw, float *db, const float *dout, const float *inp,
                          const float *w, const float *mean, const float *rstd, int N, int C, float p_in,
                          uint32_t in_site, float p_out, uint32_t out_site, uint64_t seed, uint32_t step) {
    scope sc;
    TRY(sc.init());
    const size_t NC = (size_t)N * C;
    T *ddout, *dinpt, *dw_t, *dx, *dbranch = nullptr;
    float *dm, *dr, *gw, *gb, *scratch;
    TRY(sc.up(&ddout, dout, NC));
    TRY(sc.up(&dx, inp, NC));
    TRY(sc.up(&dw_t, w, C));
    TRY(sc.up_f32(&dm, mean, N));
    TRY(sc.up_f32(&dr, rstd, N));
    TRY(sc.alloc(&dinpt, NC));
    if (branch) TRY(sc.alloc(&dbranch, NC));
    const bq_drop din = key(p_in, seed, step, in_site, N), dout_k = key(p_out, seed, step, out_site, N);
    TRY(layernorm_backward<T>(sc.s, dinpt, dbranch, ddout, dx, dw_t, dm, dr, N, C, din, dout_k));
    TRY(sc.down(dinp, dinpt, NC));
    TRY(sc.down(branch, dbranch, NC));
    if (dw || db) {
        std::vector<float> zw, zb;
        if (!dw) zw.assign(C, 0.0f);
        if (!db) zb.assign(C, 0.0f);
        TRY(sc.up_f32(&gw, dw ? dw : zw.data(), C));
        TRY(sc.up_f32(&gb, db ? db : zb.data(), C));
        TRY(sc.alloc(&scratch, 2 * colsum_scratch_floats(N, C)));
        TRY(layernorm_param_grads<T>(sc.s, gw, gb, ddout, dx, dm, dr, N, C, din, scratch));
        TRY(sc.down_f32(dw, gw, C));
        TRY(sc.down_f32(db, gb, C));
    }
    return BQ_OK;
}

int check_ids(const int64_t *ids, const int64_t *types, int B, int T, int V, int P, int NT) {
    if (T > P) return bq_cuda_fail(BQ_ERR_INDEX, "T=%d is more than the %d positions", T, P);
    for (long i = 0; i < (long)B * T; i++) {
        if (ids[i] < 0 || ids[i] >= V) return bq_cuda_fail(BQ_ERR_INDEX, "id %lld outside [0, %d)", (long long)ids[i], V);
        if (types && (types[i] < 0 || types[i] >= NT))
            return bq_cuda_fail(BQ_ERR_INDEX, "type %lld outside [0, %d)", (long long)types[i], NT);
    }
    return BQ_OK;
}

template <typename T>
int embedding_layernorm_op(float *emb, float *out, float *mean, float *rstd, const int64_t *ids, const int64_t *types,
                           const float *wte, const float *wpe, const float *wtt, const float *lnw, const float *lnb,
                           int B, int T_, int C, int V, int P, int NT, float eps, float p, uint64_t seed,
                           uint32_t step) {
    TRY(check_ids(ids, types, B, T_, V, P, NT));
    scope sc;
    TRY(sc.init());
    const size_t N = (size_t)B * T_, NC = N * C;
    int *di, *dt;
    T *we, *pe, *te, *lw, *lb, *de, *dout;
    float *dm, *dr;
    TRY(sc.up_ints(&di, ids, N));
    TRY(sc.up_ints(&dt, types, N));
    TRY(sc.up(&we, wte, (size_t)V * C));
    TRY(sc.up(&pe, wpe, (size_t)P * C));
    TRY(sc.up(&te, wtt, (size_t)NT * C));
    TRY(sc.up(&lw, lnw, C));
    TRY(sc.up(&lb, lnb, C));
    TRY(sc.alloc(&de, NC));
    TRY(sc.alloc(&dout, NC));
    TRY(sc.alloc(&dm, N));
    TRY(sc.alloc(&dr, N));
    TRY(embedding_layernorm_forward<T>(sc.s, de, dout, dm, dr, di, dt, we, pe, te, lw, lb, B, T_, C, eps,
                                       key(p, seed, step, 0, T_)));
    TRY(sc.down(emb, de, NC));
    TRY(sc.down(out, dout, NC));
    TRY(sc.down_f32(mean, dm, N));
    return sc.down_f32(rstd, dr, N);
}

template <typename T>
int embedding_backward_op(float *dwte, float *dwpe, float *dwtt, const float *dout, const int64_t *ids,
                          const int64_t *types, int B, int T_, int C, int V, int P, int NT, int64_t pad_id) {
    TRY(check_ids(ids, types, B, T_, V, P, NT));
    scope sc;
    TRY(sc.init());
    const int N = B * T_;
    /* group the tokens by id, as model.cu does */
    std::vector<int> ids32(ids, ids + N), count(V, 0), uniq(N + 1), start(N + 2), tok(N + 1);
    const int U = bq_cuda_group_ids(ids32.data(), N, pad_id, count.data(), uniq.data(), start.data(), tok.data());
    uniq.resize(U);
    start.resize(U + 1);
    tok.resize(start[U]);
    int *du = nullptr, *ds = nullptr, *dk = nullptr, *dt;
    TRY(sc.alloc(&du, uniq.size() + 1));
    TRY(sc.alloc(&ds, start.size()));
    TRY(sc.alloc(&dk, tok.size() + 1));
    if (!uniq.empty()) {
        CUDA_TRY(cudaMemcpyAsync(du, uniq.data(), uniq.size() * sizeof(int), cudaMemcpyHostToDevice, sc.s));
        CUDA_TRY(cudaMemcpyAsync(ds, start.data(), start.size() * sizeof(int), cudaMemcpyHostToDevice, sc.s));
        CUDA_TRY(cudaMemcpyAsync(dk, tok.data(), tok.size() * sizeof(int), cudaMemcpyHostToDevice, sc.s));
    }
    TRY(sc.up_ints(&dt, types, N));
    T *dd;
    float *gwte, *gwpe, *gwtt, *scratch;
    TRY(sc.up(&dd, dout, (size_t)N * C));
    TRY(sc.up_f32(&gwte, dwte, (size_t)V * C));
    TRY(sc.up_f32(&gwpe, dwpe, (size_t)P * C));
    TRY(sc.up_f32(&gwtt, dwtt, (size_t)NT * C));
    TRY(sc.alloc(&scratch, colsum_scratch_floats(N, C)));
    const bq_id_groups groups = {(int)uniq.size(), du, ds, dk};
    TRY(embedding_backward<T>(sc.s, gwte, gwpe, gwtt, dd, groups, dt, B, T_, C, NT, scratch));
    TRY(sc.down_f32(dwte, gwte, (size_t)V * C));
    TRY(sc.down_f32(dwpe, gwpe, (size_t)P * C));
    return sc.down_f32(dwtt, gwtt, (size_t)NT * C);
}

template <typename T> int gelu_op(float *out, const float *inp, size_t N) {
    scope sc;
    TRY(sc.init());
    T *x, *y;
    TRY(sc.up(&x, inp, N));
    TRY(sc.alloc(&y, N));
    TRY(gelu_forward<T>(sc.s, y, x, N));
    return sc.down(out, y, N);
}

template <typename T> int gelu_backward_op(float *dinp, const float *inp, const float *dout, size_t N) {
    scope sc;
    TRY(sc.init());
    T *x, *dy, *dx;
    TRY(sc.up(&x, inp, N));
    TRY(sc.up(&dy, dout, N));
    TRY(sc.alloc(&dx, N));
    TRY(gelu_backward<T>(sc.s, dx, x, dy, N));
    return sc.down(dinp, dx, N);
}

template <typename T>
int linear_op(float *out, const float *inp, const float *w, const float *b, int N, int IN, int OUT) {
    scope sc;
    TRY(sc.init(true));
    T *x, *dw, *db, *y;
    TRY(sc.up(&x, inp, (size_t)N * IN));
    TRY(sc.up(&dw, w, (size_t)OUT * IN));
    TRY(sc.up(&db, b, OUT));
    TRY(sc.alloc(&y, (size_t)N * OUT));
    TRY(linear_forward<T>(&sc.g, y, x, dw, db, N, IN, OUT));
    return sc.down(out, y, (size_t)N * OUT);
}

template <typename T>
int linear_backward_op(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w, int N,
                       int IN, int OUT) {
    scope sc;
    TRY(sc.init(true));
    T *dy, *x, *wt, *dx;
    TRY(sc.up(&dy, dout, (size_t)N * OUT));
    TRY(sc.up(&x, inp, (size_t)N * IN));
    TRY(sc.up(&wt, w, (size_t)OUT * IN));
    if (dinp) {
        TRY(sc.alloc(&dx, (size_t)N * IN));
        TRY(linear_backward_input<T>(&sc.g, dx, 0.0f, dy, wt, N, IN, OUT));
        TRY(sc.down(dinp, dx, (size_t)N * IN));
    }
    if (dw) {
        float *g;
        TRY(sc.up_f32(&g, dw, (size_t)OUT * IN));
        TRY(linear_backward_weight<T>(&sc.g, g, dy, x, N, IN, OUT));
        TRY(sc.down_f32(dw, g, (size_t)OUT * IN));
    }
    if (db) {
        float *g, *scratch;
        TRY(sc.up_f32(&g, db, OUT));
        TRY(sc.alloc(&scratch, colsum_scratch_floats(N, OUT)));
        TRY(colsum_add<T>(sc.s, g, dy, N, OUT, nullptr, 0, scratch));
        TRY(sc.down_f32(db, g, OUT));
    }
    return BQ_OK;
}

template <typename T>
int attention_op(float *out, float *att, const float *q, const float *k, const float *v, const float *mask, int B,
                 int NH, int T_, int HS, float p, uint64_t seed, uint32_t step, uint32_t site) {
    scope sc;
    TRY(sc.init(true));
    const size_t NC = (size_t)B * T_ * NH * HS, A = (size_t)B * NH * T_ * T_;
    T *dq, *dk, *dv, *qh, *kh, *vh, *ctx, *datt, *pdrop, *head;
    float *dmask, *scores;
    TRY(sc.up(&dq, q, NC));
    TRY(sc.up(&dk, k, NC));
    TRY(sc.up(&dv, v, NC));
    TRY(sc.up_f32(&dmask, mask, (size_t)B * T_));
    TRY(sc.alloc(&qh, NC));
    TRY(sc.alloc(&kh, NC));
    TRY(sc.alloc(&vh, NC));
    TRY(sc.alloc(&ctx, NC));
    TRY(sc.alloc(&datt, A));
    TRY(sc.alloc(&pdrop, A));
    TRY(sc.alloc(&head, 3 * NC));
    TRY(sc.alloc(&scores, A));
    TRY(split_heads<T>(sc.s, qh, dq, B, T_, NH, HS));
    TRY(split_heads<T>(sc.s, kh, dk, B, T_, NH, HS));
    TRY(split_heads<T>(sc.s, vh, dv, B, T_, NH, HS));
    const bq_attn_bufs bufs = {scores, pdrop, head};
    TRY(attention_forward<T>(&sc.g, ctx, datt, qh, kh, vh, dmask, B, NH, T_, HS, key(p, seed, step, site, T_), bufs));
    TRY(sc.down(out, ctx, NC));
    return sc.down(att, datt, A);
}

template <typename T>
int attention_backward_op(float *dq, float *dk, float *dv, const float *dout, const float *att, const float *q,
                          const float *k, const float *v, int B, int NH, int T_, int HS, float p, uint64_t seed,
                          uint32_t step, uint32_t site) {
    scope sc;
    TRY(sc.init(true));
    const size_t NC = (size_t)B * T_ * NH * HS, A = (size_t)B * NH * T_ * T_;
    T *tq, *tk, *tv, *qh, *kh, *vh, *dctx, *datt, *pdrop, *head, *gq, *gk, *gv;
    float *scores;
    TRY(sc.up(&tq, q, NC));
    TRY(sc.up(&tk, k, NC));
    TRY(sc.up(&tv, v, NC));
    TRY(sc.up(&dctx, dout, NC));
    TRY(sc.up(&datt, att, A));
    TRY(sc.alloc(&qh, NC));
    TRY(sc.alloc(&kh, NC));
    TRY(sc.alloc(&vh, NC));
    TRY(sc.alloc(&pdrop, A));
    TRY(sc.alloc(&head, 3 * NC));
    TRY(sc.alloc(&scores, A));
    TRY(sc.alloc(&gq, NC));
    TRY(sc.alloc(&gk, NC));
    TRY(sc.alloc(&gv, NC));
    TRY(split_heads<T>(sc.s, qh, tq, B, T_, NH, HS));
    TRY(split_heads<T>(sc.s, kh, tk, B, T_, NH, HS));
    TRY(split_heads<T>(sc.s, vh, tv, B, T_, NH, HS));
    const bq_attn_bufs bufs = {scores, pdrop, head};
    TRY(attention_backward<T>(&sc.g, gq, gk, gv, dctx, datt, qh, kh, vh, B, NH, T_, HS, key(p, seed, step, site, T_),
                              bufs));
    TRY(sc.down(dq, gq, NC));
    TRY(sc.down(dk, gk, NC));
    return sc.down(dv, gv, NC);
}

}  // namespace

extern "C" int bq_cuda_uniform(float *u, size_t n, uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t first) {
    scope sc;
    TRY(sc.init());
    float *d;
    TRY(sc.alloc(&d, n));
    TRY(launch_uniform(sc.s, d, n, seed, step, tensor_id, first));
    return sc.down_f32(u, d, n);
}

extern "C" int bq_cuda_dropout(float *out, const float *inp, size_t N, float p, uint64_t seed, uint32_t step,
                               uint32_t tensor_id, int precision) {
    return DISPATCH(precision, dropout_op, out, inp, N, p, seed, step, tensor_id);
}

extern "C" int bq_cuda_residual_layernorm(float *res, float *out, float *mean, float *rstd, const float *x,
                                          const float *y, const float *w, const float *b, int N, int C, float eps,
                                          float p, uint64_t seed, uint32_t step, uint32_t site, int precision) {
    return DISPATCH(precision, residual_layernorm_op, res, out, mean, rstd, x, y, w, b, N, C, eps, p, seed, step, site);
}

extern "C" int bq_cuda_layernorm_backward(float *dinp, float *branch, float *dw, float *db, const float *dout,
                                          const float *inp, const float *w, const float *mean, const float *rstd, int N,
                                          int C, float p_in, uint32_t in_site, float p_out, uint32_t out_site,
                                          uint64_t seed, uint32_t step, int precision) {
    return DISPATCH(precision, layernorm_backward_op, dinp, branch, dw, db, dout, inp, w, mean, rstd, N, C, p_in, in_site,
                    p_out, out_site, seed, step);
}

extern "C" int bq_cuda_embedding_layernorm(float *emb, float *out, float *mean, float *rstd, const int64_t *ids,
                                           const int64_t *types, const float *wte, const float *wpe, const float *wtt,
                                           const float *lnw, const float *lnb, int B, int T, int C, int V, int P,
                                           int NT, float eps, float p, uint64_t seed, uint32_t step, int precision) {
    return DISPATCH(precision, embedding_layernorm_op, emb, out, mean, rstd, ids, types, wte, wpe, wtt, lnw, lnb, B, T, C,
                    V, P, NT, eps, p, seed, step);
}

extern "C" int bq_cuda_embedding_backward(float *dwte, float *dwpe, float *dwtt, const float *dout, const int64_t *ids,
                                          const int64_t *types, int B, int T, int C, int V, int P, int NT,
                                          int64_t pad_id, int precision) {
    return DISPATCH(precision, embedding_backward_op, dwte, dwpe, dwtt, dout, ids, types, B, T, C, V, P, NT, pad_id);
}

extern "C" int bq_cuda_gelu(float *out, const float *inp, size_t N, int precision) {
    return DISPATCH(precision, gelu_op, out, inp, N);
}

extern "C" int bq_cuda_gelu_backward(float *dinp, const float *inp, const float *dout, size_t N, int precision) {
    return DISPATCH(precision, gelu_backward_op, dinp, inp, dout, N);
}

extern "C" int bq_cuda_linear(float *out, const float *inp, const float *w, const float *b, int N, int IN, int OUT,
                              int precision) {
    return DISPATCH(precision, linear_op, out, inp, w, b, N, IN, OUT);
}

extern "C" int bq_cuda_linear_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                                       const float *w, int N, int IN, int OUT, int precision) {
    return DISPATCH(precision, linear_backward_op, dinp, dw, db, dout, inp, w, N, IN, OUT);
}

extern "C" int bq_cuda_attention(float *out, float *att, const float *q, const float *k, const float *v,
                                 const float *mask, int B, int NH, int T, int HS, float p, uint64_t seed, uint32_t step,
                                 uint32_t site, int precision) {
    return DISPATCH(precision, attention_op, out, att, q, k, v, mask, B, NH, T, HS, p, seed, step, site);
}

extern "C" int bq_cuda_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                                          const float *q, const float *k, const float *v, int B, int NH, int T, int HS,
                                          float p, uint64_t seed, uint32_t step, uint32_t site, int precision) {
    return DISPATCH(precision, attention_backward_op, dq, dk, dv, dout, att, q, k, v, B, NH, T, HS, p, seed, step, site);
}

extern "C" int bq_cuda_cudnn_attention(float *out, float *dq, float *dk, float *dv, const float *dout, const float *q,
                                       const float *k, const float *v, const int64_t *lengths, int B, int NH, int T,
                                       int HS, float p, uint64_t seed) {
    scope sc;
    TRY(sc.init());
    char why[256];
    bq_cudnn *c = nullptr;
    if (!bq_cudnn_create(&c, why, sizeof why)) return bq_cuda_fail(BQ_ERR_ARG, "%s", why);
    struct guard {
        bq_cudnn *c;
        cudaStream_t s;
        ~guard() {
            cudaStreamSynchronize(s);
            bq_cudnn_destroy(c);
        }
    } g{c, sc.s};
    const size_t NC = (size_t)B * T * NH * HS;
    const int training = dout != nullptr;
    std::vector<int> lens(B);
    for (int b = 0; b < B; b++) {
        if (lengths[b] < 1 || lengths[b] > T)
            return bq_cuda_fail(BQ_ERR_ARG, "lengths[%d] = %lld: each row needs 1..T = %d keys", b,
                                (long long)lengths[b], T);
        lens[b] = (int)lengths[b];
    }
    bf16 *dq_, *dk_, *dv_, *ddo = nullptr, *o, *gq, *gk, *gv;
    float *stats;
    int *dlen;
    TRY(sc.up(&dq_, q, NC));
    TRY(sc.up(&dk_, k, NC));
    TRY(sc.up(&dv_, v, NC));
    TRY(sc.alloc(&o, NC));
    TRY(sc.alloc(&stats, (size_t)B * NH * T));
    TRY(sc.alloc(&dlen, (size_t)B));
    CUDA_TRY(cudaMemcpyAsync(dlen, lens.data(), B * sizeof(int), cudaMemcpyHostToDevice, sc.s));
    if (!bq_cudnn_prepare(c, B, T, NH, HS, p, training))
        return bq_cuda_fail(BQ_ERR_ARG, "cuDNN refused the %s", bq_cudnn_why(c));
    TRY(bq_cudnn_forward(c, sc.s, o, stats, dq_, dk_, dv_, dlen, B, T, NH, HS, p, seed, training));
    TRY(sc.down(out, o, NC));
    if (!training) return BQ_OK;
    TRY(sc.up(&ddo, dout, NC));
    TRY(sc.alloc(&gq, NC));
    TRY(sc.alloc(&gk, NC));
    TRY(sc.alloc(&gv, NC));
    TRY(bq_cudnn_backward(c, sc.s, gq, gk, gv, ddo, o, stats, dq_, dk_, dv_, dlen, B, T, NH, HS, p, seed));
    TRY(sc.down(dq, gq, NC));
    TRY(sc.down(dk, gk, NC));
    return sc.down(dv, gv, NC);
}

extern "C" int bq_cuda_span_loss(float *loss, float *dstart, float *dend, const float *start_logits,
                                 const float *end_logits, const int64_t *start_pos, const int64_t *end_pos, int B, int T,
                                 float grad_scale) {
    scope sc;
    TRY(sc.init());
    const size_t N = (size_t)B * T;
    std::vector<int> pos(2 * B);
    int nv[2] = {0, 0};
    for (int w = 0; w < 2; w++)
        for (int b = 0; b < B; b++) {
            const int64_t p = (w ? end_pos : start_pos)[b];
            pos[w * B + b] = p < 0 ? 0 : (p > T ? T : (int)p);
            nv[w] += pos[w * B + b] != T;
        }
    float *ds, *de, *dl;
    int *dp;
    double *rl;
    TRY(sc.up_f32(&ds, start_logits, N));
    TRY(sc.up_f32(&de, end_logits, N));
    TRY(sc.alloc(&dp, 2 * (size_t)B));
    TRY(sc.alloc(&dl, 2 * N));
    TRY(sc.alloc(&rl, 2 * (size_t)B));
    CUDA_TRY(cudaMemcpyAsync(dp, pos.data(), 2 * B * sizeof(int), cudaMemcpyHostToDevice, sc.s));
    const float half = 0.5f * grad_scale;
    TRY(span_loss_rows<float>(sc.s, dl, rl, ds, de, dp, nullptr, B, T, nv[0] ? (double)half / nv[0] : 0.0,
                              nv[1] ? (double)half / nv[1] : 0.0));
    std::vector<float> inter(2 * N);
    std::vector<double> rows(2 * B);
    TRY(sc.down_f32(inter.data(), dl, 2 * N));
    CUDA_TRY(cudaMemcpyAsync(rows.data(), rl, 2 * B * sizeof(double), cudaMemcpyDeviceToHost, sc.s));
    CUDA_TRY(cudaStreamSynchronize(sc.s));
    double ls = 0.0, le = 0.0;
    for (int b = 0; b < B; b++) {
        ls += rows[b];
        le += rows[B + b];
    }
    *loss = (float)(0.5 * ((nv[0] ? ls / nv[0] : 0.0) + (nv[1] ? le / nv[1] : 0.0)));
    for (size_t i = 0; i < N; i++) {
        if (dstart) dstart[i] = inter[2 * i];
        if (dend) dend[i] = inter[2 * i + 1];
    }
    return BQ_OK;
}

extern "C" int bq_cuda_adamw(float *param, const float *grad, float *m, float *v, size_t N, float lr, float beta1,
                             float beta2, float eps, float weight_decay, int step, float grad_scale) {
    if (step < 1) return bq_cuda_fail(BQ_ERR_ARG, "step counts from 1, got %d", step);
    scope sc;
    TRY(sc.init());
    std::vector<long long> start;
    std::vector<int> len, tensor;
    for (size_t o = 0; o < N; o += BQ_ADAM_CHUNK) {
        start.push_back((long long)o);
        len.push_back((int)(N - o < BQ_ADAM_CHUNK ? N - o : BQ_ADAM_CHUNK));
        tensor.push_back(0);
    }
    const int nb = (int)start.size();
    long long *ds;
    int *dl, *dt;
    uint8_t *decay;
    const uint8_t one = 1;
    TRY(sc.alloc(&ds, nb));
    TRY(sc.alloc(&dl, nb));
    TRY(sc.alloc(&dt, nb));
    TRY(sc.alloc(&decay, 1));
    CUDA_TRY(cudaMemcpyAsync(ds, start.data(), nb * sizeof(long long), cudaMemcpyHostToDevice, sc.s));
    CUDA_TRY(cudaMemcpyAsync(dl, len.data(), nb * sizeof(int), cudaMemcpyHostToDevice, sc.s));
    CUDA_TRY(cudaMemcpyAsync(dt, tensor.data(), nb * sizeof(int), cudaMemcpyHostToDevice, sc.s));
    CUDA_TRY(cudaMemcpyAsync(decay, &one, 1, cudaMemcpyHostToDevice, sc.s));
    float *dp, *dg, *dm, *dv;
    TRY(sc.up_f32(&dp, param, N));
    TRY(sc.up_f32(&dg, grad, N));
    TRY(sc.up_f32(&dm, m, N));
    TRY(sc.up_f32(&dv, v, N));
    const double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);
    const bq_adam_blocks blocks = {nb, ds, dl, dt};
    /* one tensor: its learning rate and step size lr / (1 - beta1^step) as the one-element arrays adamw_flat takes */
    const float lrs[2] = {lr, (float)(lr / bc1)};
    float *dlr;
    TRY(sc.up_f32(&dlr, lrs, 2));
    TRY(adamw_flat(sc.s, dp, nullptr, dg, dm, dv, blocks, decay, dlr, dlr + 1, beta1, beta2, eps, weight_decay,
                   (float)sqrt(bc2), grad_scale));
    TRY(sc.down_f32(param, dp, N));
    TRY(sc.down_f32(m, dm, N));
    return sc.down_f32(v, dv, N);
}

extern "C" int bq_cuda_sum_squares(double *out, const float *g, size_t N) {
    scope sc;
    TRY(sc.init());
    float *dg;
    double *partials, *res;
    TRY(sc.up_f32(&dg, g, N));
    TRY(sc.alloc(&partials, BQ_NORM_BLOCKS));
    TRY(sc.alloc(&res, 1));
    TRY(sum_squares(sc.s, res, dg, N, partials));
    CUDA_TRY(cudaMemcpyAsync(out, res, sizeof(double), cudaMemcpyDeviceToHost, sc.s));
    CUDA_TRY(cudaStreamSynchronize(sc.s));
    return BQ_OK;
}
