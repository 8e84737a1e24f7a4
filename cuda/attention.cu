/* Multi-head self-attention with the padding mask and dropout on the probabilities (csrc/attention.c on the GPU):
 * the two products per head through strided-batched cuBLASLt calls over all B*NH heads, and one warp per score row
 * for the masked softmax + dropout. Scores and dP stay fp32 in both precisions (the softmax sees fp32 logits).
 *
 *   S = q k^T / sqrt(HS)    (fp32)            att = softmax(S + (1 - mask) * -10000)     (stored, pre-dropout)
 *   out = dropout(att) v                      dropout numbering by window (drop_attn_base, common.cuh), as the CPU
 *
 * Backward regenerates dropout(att) from the stored att and the key; dS = scale * att * (g - <g, att>) with
 * g = dropout'(dP).
 *
 * The issue's goal for attention is cuDNN's fused SDPA through the graph API; this file is the backend's own path
 * (and would stay as the fallback for shapes cuDNN does not take).
 */
#include "kernels.cuh"

/* [B,T,NH,HS] -> [B,NH,T,HS] */
template <typename T> __global__ void split_heads_kernel(T *out, const T *inp, int B, int T_, int NH, int HS) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, n = (size_t)B * T_ * NH * HS;
    if (i >= n) return;
    const int d = (int)(i % HS), t = (int)((i / HS) % T_), h = (int)((i / ((size_t)HS * T_)) % NH);
    const size_t b = i / ((size_t)HS * T_ * NH);
    out[i] = inp[((b * T_ + t) * NH + h) * HS + d];
}

/* [B,NH,T,HS] -> [B,T,NH,HS] */
template <typename T> __global__ void merge_heads_kernel(T *out, const T *inp, int B, int T_, int NH, int HS) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, n = (size_t)B * T_ * NH * HS;
    if (i >= n) return;
    const int d = (int)(i % HS), h = (int)((i / HS) % NH), t = (int)((i / ((size_t)HS * NH)) % T_);
    const size_t b = i / ((size_t)HS * NH * T_);
    out[i] = inp[((b * NH + h) * T_ + t) * HS + d];
}

template <typename T> int split_heads(cudaStream_t s, T *out, const T *inp, int B, int T_, int NH, int HS) {
    const size_t n = (size_t)B * T_ * NH * HS;
    split_heads_kernel<T><<<ceil_div(n, 256), 256, 0, s>>>(out, inp, B, T_, NH, HS);
    LAUNCH_CHECK("split_heads_kernel");
    return BQ_OK;
}

template <typename T> int merge_heads(cudaStream_t s, T *out, const T *inp, int B, int T_, int NH, int HS) {
    const size_t n = (size_t)B * T_ * NH * HS;
    merge_heads_kernel<T><<<ceil_div(n, 256), 256, 0, s>>>(out, inp, B, T_, NH, HS);
    LAUNCH_CHECK("merge_heads_kernel");
    return BQ_OK;
}

#define SM_WARPS 8

/* One warp per row r = (b*NH + h)*T + i of the [B*NH*T, T] scores; the row's dropout numbering starts at
 * drop_attn_base(d, r, NH). */
template <typename T>
__global__ void softmax_forward_kernel(T *att, T *pdrop, const float *S, const float *mask, int rows, int NH, int T_,
                                       bq_drop d) {
    const int lane = threadIdx.x % 32;
    const long long r = (long long)blockIdx.x * SM_WARPS + threadIdx.x / 32;
    if (r >= rows) return;
    const size_t base = (size_t)r * T_;
    const float *s = S + base;
    const float *mk = mask ? mask + (size_t)(r / T_ / NH) * T_ : nullptr;   /* batch row b = r / (T * NH) */
    float mx = -INFINITY;
    for (int j = lane; j < T_; j += 32) mx = fmaxf(mx, s[j] + (mk ? (1.0f - mk[j]) * -10000.0f : 0.0f));
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j < T_; j += 32) sum += expf(s[j] + (mk ? (1.0f - mk[j]) * -10000.0f : 0.0f) - mx);
    const float inv = 1.0f / warp_sum(sum);
    const float scale = drop_scale(d);
    for_row_quads(drop_attn_base(d, r, NH), T_, lane, 32, d, [&](int j, bool keep) {
        const float e = expf(s[j] + (mk ? (1.0f - mk[j]) * -10000.0f : 0.0f) - mx);
        const T a = from_f<T>(e * inv);
        att[base + j] = a;
        if (pdrop) pdrop[base + j] = from_f<T>(keep ? to_f(a) * scale : 0.0f);
    });
}

/* pd = dropout(att): the forward's P regenerated, one warp per row as softmax_forward_kernel */
template <typename T>
__global__ void attn_dropout_kernel(T *pd, const T *att, int rows, int NH, int T_, bq_drop d) {
    const int lane = threadIdx.x % 32;
    const long long r = (long long)blockIdx.x * SM_WARPS + threadIdx.x / 32;
    if (r >= rows) return;
    const size_t base = (size_t)r * T_;
    const float scale = drop_scale(d);
    for_row_quads(drop_attn_base(d, r, NH), T_, lane, 32, d, [&](int j, bool keep) {
        pd[base + j] = from_f<T>(keep ? to_f(att[base + j]) * scale : 0.0f);
    });
}

/* dS = scale * a * (g - sum_j g_j a_j), g = dropout'(dP) */
template <typename T>
__global__ void softmax_backward_kernel(T *dS, const T *att, const float *dP, int rows, int NH, int T_, float scale,
                                        bq_drop d) {
    const int lane = threadIdx.x % 32;
    const long long r = (long long)blockIdx.x * SM_WARPS + threadIdx.x / 32;
    if (r >= rows) return;
    const size_t base = (size_t)r * T_;
    const uint64_t key = drop_attn_base(d, r, NH);
    const float ds = drop_scale(d);
    float dot = 0.0f;
    for_row_quads(key, T_, lane, 32, d, [&](int j, bool keep) {
        dot += (keep ? dP[base + j] * ds : 0.0f) * to_f(att[base + j]);
    });
    dot = warp_sum(dot);
    for_row_quads(key, T_, lane, 32, d, [&](int j, bool keep) {
        const float g = keep ? dP[base + j] * ds : 0.0f, a = to_f(att[base + j]);
        dS[base + j] = from_f<T>(scale * a * (g - dot));
    });
}

template <typename T>
int attention_forward(bq_gemm *g, T *ctx, T *att, const T *qh, const T *kh, const T *vh, const float *mask, int B,
                      int NH, int T_, int HS, bq_drop d, bq_attn_bufs bufs) {
    const cudaDataType_t t = dtype_of<T>::value;
    const int BH = B * NH, rows = BH * T_;
    const long long TT = (long long)T_ * T_, TH = (long long)T_ * HS;
    const float scale = 1.0f / sqrtf((float)HS);
    T *pdrop = d.p > 0.0f ? (T *)bufs.pdrop : nullptr, *ctxh = (T *)bufs.headbuf;
    /* S[bh] = scale * q[bh] @ k[bh]^T   [T,T] fp32 */
    TRY(bq_matmul(g, false, true, T_, T_, HS, scale, qh, t, HS, TH, kh, t, HS, TH, 0.0f, bufs.scores, CUDA_R_32F, T_, TT,
                  BH, nullptr));
    softmax_forward_kernel<T><<<ceil_div(rows, SM_WARPS), 32 * SM_WARPS, 0, g->stream>>>(att, pdrop, bufs.scores, mask,
                                                                                         rows, NH, T_, d);
    LAUNCH_CHECK("softmax_forward_kernel");
    /* ctxh[bh] = P[bh] @ v[bh]   [T,HS] */
    TRY(bq_matmul(g, false, false, T_, HS, T_, 1.0f, pdrop ? pdrop : att, t, T_, TT, vh, t, HS, TH, 0.0f, ctxh, t, HS, TH,
                  BH, nullptr));
    return merge_heads<T>(g->stream, ctx, ctxh, B, T_, NH, HS);
}

template <typename T>
int attention_backward(bq_gemm *g, T *dq, T *dk, T *dv, const T *dctx, const T *att, const T *qh, const T *kh,
                       const T *vh, int B, int NH, int T_, int HS, bq_drop d, bq_attn_bufs bufs) {
    const cudaDataType_t t = dtype_of<T>::value;
    const int BH = B * NH, rows = BH * T_;
    const long long TT = (long long)T_ * T_, TH = (long long)T_ * HS;
    const size_t NC = (size_t)B * T_ * NH * HS;
    const float scale = 1.0f / sqrtf((float)HS);
    T *dctxh = (T *)bufs.headbuf, *dvh = dctxh + NC, *dqkh = dctxh + 2 * NC, *pd = (T *)bufs.pdrop;
    TRY(split_heads<T>(g->stream, dctxh, dctx, B, T_, NH, HS));
    const T *P = att;   /* what multiplied v in the forward */
    if (d.p > 0.0f) {
        attn_dropout_kernel<T><<<ceil_div(rows, SM_WARPS), 32 * SM_WARPS, 0, g->stream>>>(pd, att, rows, NH, T_, d);
        LAUNCH_CHECK("attn_dropout_kernel");
        P = pd;
    }
    /* dv[bh] = P^T @ dctx   [T,HS] */
    TRY(bq_matmul(g, true, false, T_, HS, T_, 1.0f, P, t, T_, TT, dctxh, t, HS, TH, 0.0f, dvh, t, HS, TH, BH, nullptr));
    /* dP[bh] = dctx @ v^T   [T,T] fp32 */
    TRY(bq_matmul(g, false, true, T_, T_, HS, 1.0f, dctxh, t, HS, TH, vh, t, HS, TH, 0.0f, bufs.scores, CUDA_R_32F, T_, TT,
                  BH, nullptr));
    /* dS over P's buffer (the dv product above has consumed P: same stream) */
    softmax_backward_kernel<T><<<ceil_div(rows, SM_WARPS), 32 * SM_WARPS, 0, g->stream>>>(pd, att, bufs.scores, rows,
                                                                                          NH, T_, scale, d);
    LAUNCH_CHECK("softmax_backward_kernel");
    /* dq[bh] = dS @ k ; dk[bh] = dS^T @ q */
    TRY(bq_matmul(g, false, false, T_, HS, T_, 1.0f, pd, t, T_, TT, kh, t, HS, TH, 0.0f, dqkh, t, HS, TH, BH, nullptr));
    TRY(merge_heads<T>(g->stream, dq, dqkh, B, T_, NH, HS));
    TRY(bq_matmul(g, true, false, T_, HS, T_, 1.0f, pd, t, T_, TT, qh, t, HS, TH, 0.0f, dqkh, t, HS, TH, BH, nullptr));
    TRY(merge_heads<T>(g->stream, dk, dqkh, B, T_, NH, HS));
    return merge_heads<T>(g->stream, dv, dvh, B, T_, NH, HS);
}

#define INSTANTIATE_ATTN(T)                                                                                         \
    template int split_heads<T>(cudaStream_t, T *, const T *, int, int, int, int);                                  \
    template int merge_heads<T>(cudaStream_t, T *, const T *, int, int, int, int);                                  \
    template int attention_forward<T>(bq_gemm *, T *, T *, const T *, const T *, const T *, const float *, int, int, \
                                      int, int, bq_drop, bq_attn_bufs);                                             \
    template int attention_backward<T>(bq_gemm *, T *, T *, T *, const T *, const T *, const T *, const T *,        \
                                       const T *, int, int, int, int, bq_drop, bq_attn_bufs);
INSTANTIATE_ATTN(float)
INSTANTIATE_ATTN(bf16)
