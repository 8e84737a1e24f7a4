/* BERT embeddings: word + position + token type, fused with the embedding LayerNorm and its dropout (forward);
 * the scatter of the gradient into the three tables (backward), deterministic without atomics: word rows through
 * the host's grouping of the batch by token id, positions by a sum over the batch, token types by a keyed column
 * sum. */
#include "kernels.cuh"

#define EMB_WARPS 8

template <typename T>
__global__ void embedding_layernorm_kernel(T *emb, T *out, float *mean, float *rstd, const int *ids, const int *types,
                                           const T *wte, const T *wpe, const T *wtt, const T *lnw, const T *lnb,
                                           int N, int T_, int C, float eps, bq_drop d) {
    const int lane = threadIdx.x % 32, n = blockIdx.x * EMB_WARPS + threadIdx.x / 32;
    if (n >= N) return;
    const size_t base = (size_t)n * C;
    const T *we = wte + (size_t)ids[n] * C, *pe = wpe + (size_t)(n % T_) * C, *te = wtt + (size_t)(types ? types[n] : 0) * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const T e = from_f<T>(to_f(we[c]) + to_f(pe[c]) + to_f(te[c]));
        emb[base + c] = e;
        s += to_f(e);
    }
    const float m = warp_sum(s) / C;
    float v = 0.0f;
    for (int c = lane; c < C; c += 32) {   /* each lane reads back only what it wrote */
        const float dd = to_f(emb[base + c]) - m;
        v += dd * dd;
    }
    const float r = 1.0f / sqrtf(warp_sum(v) / C + eps);
    __syncwarp();
    const float scale = drop_scale(d);
    for_row_quads(drop_hidden_base(d, n, C), C, lane, 32, d, [&](int c, bool keep) {
        const float y = (to_f(emb[base + c]) - m) * r * to_f(lnw[c]) + to_f(lnb[c]);
        out[base + c] = from_f<T>(keep ? y * scale : 0.0f);
    });
    if (lane == 0) {
        mean[n] = m;
        rstd[n] = r;
    }
}

template <typename T>
int embedding_layernorm_forward(cudaStream_t s, T *emb, T *out, float *mean, float *rstd, const int *ids,
                                const int *types, const T *wte, const T *wpe, const T *wtt, const T *lnw,
                                const T *lnb, int B, int T_, int C, float eps, bq_drop d) {
    const int N = B * T_;
    embedding_layernorm_kernel<T><<<ceil_div(N, EMB_WARPS), 32 * EMB_WARPS, 0, s>>>(emb, out, mean, rstd, ids, types, wte,
                                                                                    wpe, wtt, lnw, lnb, N, T_, C, eps, d);
    LAUNCH_CHECK("embedding_layernorm_kernel");
    return BQ_OK;
}

/* one block per distinct token id: its row gets the sum of its tokens' gradients, in token order */
template <typename T>
__global__ void word_grad_kernel(float *dwte, const T *dout, const int *uniq, const int *start, const int *tok, int C) {
    const int g = blockIdx.x, t0 = start[g], t1 = start[g + 1];
    float *row = dwte + (size_t)uniq[g] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (int i = t0; i < t1; i++) acc += to_f(dout[(size_t)tok[i] * C + c]);
        row[c] += acc;
    }
}

/* dwpe[t, c] += sum_b dout[b, t, c] */
template <typename T>
__global__ void position_grad_kernel(float *dwpe, const T *dout, int B, int T_, int C) {
    const int t = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.0f;
    for (int b = 0; b < B; b++) acc += to_f(dout[((size_t)b * T_ + t) * C + c]);
    dwpe[(size_t)t * C + c] += acc;
}

template <typename T>
int embedding_backward(cudaStream_t s, float *dwte, float *dwpe, float *dwtt, const T *dout, bq_id_groups groups,
                       const int *types, int B, int T_, int C, int NT, float *scratch) {
    const int N = B * T_;
    if (dwte && groups.U > 0) {
        word_grad_kernel<T><<<groups.U, 128, 0, s>>>(dwte, dout, groups.uniq, groups.start, groups.tok, C);
        LAUNCH_CHECK("word_grad_kernel");
    }
    if (dwpe) {
        dim3 grid(ceil_div(C, 128), T_);
        position_grad_kernel<T><<<grid, 128, 0, s>>>(dwpe, dout, B, T_, C);
        LAUNCH_CHECK("position_grad_kernel");
    }
    if (dwtt) {
        if (!types) return colsum_add<T>(s, dwtt, dout, N, C, NULL, 0, scratch);   /* every token has type 0 */
        for (int k = 0; k < NT; k++) TRY(colsum_add<T>(s, dwtt + (size_t)k * C, dout, N, C, types, k, scratch));
    }
    return BQ_OK;
}

#define INSTANTIATE_EMB(T)                                                                                          \
    template int embedding_layernorm_forward<T>(cudaStream_t, T *, T *, float *, float *, const int *, const int *, \
                                                const T *, const T *, const T *, const T *, const T *, int, int,    \
                                                int, float, bq_drop);                                               \
    template int embedding_backward<T>(cudaStream_t, float *, float *, float *, const T *, bq_id_groups,            \
                                       const int *, int, int, int, int, float *);
INSTANTIATE_EMB(float)
INSTANTIATE_EMB(bf16)

extern "C" int bq_cuda_group_ids(const int *ids, int N, int64_t pad_id, int *count, int *uniq, int *start, int *tok) {
    int U = 0, total = 0;
    for (int n = 0; n < N; n++) {
        const int id = ids[n];
        if (id == pad_id) continue;
        if (count[id]++ == 0) uniq[U++] = id;
    }
    for (int u = 0; u < U; u++) {   /* count becomes each group's write cursor */
        const int c = count[uniq[u]];
        start[u] = total;
        count[uniq[u]] = total;
        total += c;
    }
    start[U] = total;
    for (int n = 0; n < N; n++)
        if (ids[n] != pad_id) tok[count[ids[n]]++] = n;
    for (int u = 0; u < U; u++) count[uniq[u]] = 0;
    return U;
}
