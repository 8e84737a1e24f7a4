/* LayerNorm over the last dimension (torch semantics: biased variance, eps inside the sqrt), fused with the
 * residual add and dropout before it (forward) and with the dropout of the branch (backward).
 *
 * One warp per row; the row's dropout uniforms are drawn a Philox quad at a time (for_row_quads), numbered by window
 * (drop_hidden_base, common.cuh: (win[b] * P + t) * C + c for row n = b*T + t) as the CPU engine numbers them.
 * In bf16 mode the statistics are those of the stored (rounded) residual, so backward sees exactly the
 * normalisation the forward applied.
 */
#include "kernels.cuh"

#define LN_WARPS 8

template <typename T>
__global__ void residual_layernorm_kernel(T *res, T *out, float *mean, float *rstd, const T *x, const T *y,
                                          const T *w, const T *b, int N, int C, float eps, bq_drop d) {
    const int lane = threadIdx.x % 32, n = blockIdx.x * LN_WARPS + threadIdx.x / 32;
    if (n >= N) return;
    const size_t base = (size_t)n * C;
    const float scale = drop_scale(d);
    float s = 0.0f;
    for_row_quads(drop_hidden_base(d, n, C), C, lane, 32, d, [&](int c, bool keep) {
        const float r = (x ? to_f(x[base + c]) : 0.0f) + (keep ? to_f(y[base + c]) * scale : 0.0f);
        const T rt = from_f<T>(r);
        res[base + c] = rt;
        s += to_f(rt);
    });
    const float m = warp_sum(s) / C;
    __syncwarp();
    float v = 0.0f;   /* two passes, as the CPU: no cancellation from E[x^2] - m^2 */
    for (int c = lane; c < C; c += 32) {
        const float dd = to_f(res[base + c]) - m;
        v += dd * dd;
    }
    const float r = 1.0f / sqrtf(warp_sum(v) / C + eps);
    for (int c = lane; c < C; c += 32)
        out[base + c] = from_f<T>((to_f(res[base + c]) - m) * r * to_f(w[c]) + to_f(b[c]));
    if (lane == 0) {
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = r;
    }
}

template <typename T>
int residual_layernorm_forward(cudaStream_t s, T *res, T *out, float *mean, float *rstd, const T *x, const T *y,
                               const T *w, const T *b, int N, int C, float eps, bq_drop d) {
    residual_layernorm_kernel<T><<<ceil_div(N, LN_WARPS), 32 * LN_WARPS, 0, s>>>(res, out, mean, rstd, x, y, w, b, N,
                                                                                 C, eps, d);
    LAUNCH_CHECK("residual_layernorm_kernel");
    return BQ_OK;
}

/* dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dout_eff * w,  xhat = (x - mean) * rstd */
template <typename T>
__global__ void layernorm_backward_kernel(T *dinp, T *branch, const T *dout, const T *inp, const T *w,
                                          const float *mean, const float *rstd, int N, int C, bq_drop d_in,
                                          bq_drop d_out) {
    const int lane = threadIdx.x % 32, n = blockIdx.x * LN_WARPS + threadIdx.x / 32;
    if (n >= N) return;
    const size_t base = (size_t)n * C;
    const uint64_t key_in = drop_hidden_base(d_in, n, C);
    const float m = mean[n], r = rstd[n], sin = drop_scale(d_in);
    float sg = 0.0f, sgx = 0.0f;
    for_row_quads(key_in, C, lane, 32, d_in, [&](int c, bool keep) {
        const float g = (keep ? to_f(dout[base + c]) * sin : 0.0f) * to_f(w[c]);
        sg += g;
        sgx += g * (to_f(inp[base + c]) - m) * r;
    });
    sg = warp_sum(sg) / C;
    sgx = warp_sum(sgx) / C;
    for_row_quads(key_in, C, lane, 32, d_in, [&](int c, bool keep) {
        const float g = (keep ? to_f(dout[base + c]) * sin : 0.0f) * to_f(w[c]);
        const float xhat = (to_f(inp[base + c]) - m) * r;
        dinp[base + c] = from_f<T>(r * (g - sg - xhat * sgx));
    });
    if (branch) {
        __syncwarp();
        const float so = drop_scale(d_out);
        for_row_quads(drop_hidden_base(d_out, n, C), C, lane, 32, d_out, [&](int c, bool keep) {
            branch[base + c] = from_f<T>(keep ? to_f(dinp[base + c]) * so : 0.0f);
        });
    }
}

template <typename T>
int layernorm_backward(cudaStream_t s, T *dinp, T *branch, const T *dout, const T *inp, const T *w, const float *mean,
                       const float *rstd, int N, int C, bq_drop d_in, bq_drop d_out) {
    layernorm_backward_kernel<T><<<ceil_div(N, LN_WARPS), 32 * LN_WARPS, 0, s>>>(dinp, branch, dout, inp, w, mean, rstd,
                                                                                 N, C, d_in, d_out);
    LAUNCH_CHECK("layernorm_backward_kernel");
    return BQ_OK;
}

/* Stage 1 of dw = sum_n g xhat, db = sum_n g (g = dropout'(dout, d_in)): the column-sum scheme of linear.cu. */
#define LN_COLSUM_ROWS 256
template <typename T>
__global__ void layernorm_param_partial_kernel(float *pw, float *pb, const T *dout, const T *inp, const float *mean,
                                               const float *rstd, int N, int C, bq_drop d_in) {
    __shared__ float aw[8][33], ab[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y;
    const int r0 = chunk * LN_COLSUM_ROWS, r1 = min(N, r0 + LN_COLSUM_ROWS);
    const float sin = drop_scale(d_in);
    float sw = 0.0f, sb = 0.0f;
    if (c < C)
        for (int n = r0 + threadIdx.y; n < r1; n += 8) {
            const size_t i = (size_t)n * C + c;
            const float g = drop_keep(d_in, drop_hidden_base(d_in, n, C) + c) ? to_f(dout[i]) * sin : 0.0f;
            sw += g * (to_f(inp[i]) - mean[n]) * rstd[n];
            sb += g;
        }
    aw[threadIdx.y][threadIdx.x] = sw;
    ab[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float tw = aw[0][threadIdx.x], tb = ab[0][threadIdx.x];
        for (int y = 1; y < 8; y++) {
            tw += aw[y][threadIdx.x];
            tb += ab[y][threadIdx.x];
        }
        pw[(size_t)chunk * C + c] = tw;
        pb[(size_t)chunk * C + c] = tb;
    }
}

template <typename T>
int layernorm_param_grads(cudaStream_t s, float *dw, float *db, const T *dout, const T *inp, const float *mean,
                          const float *rstd, int N, int C, bq_drop d_in, float *scratch) {
    static_assert(LN_COLSUM_ROWS == 256, "must match COLSUM_ROWS of linear.cu (colsum_finish)");
    const size_t part = colsum_scratch_floats(N, C);
    dim3 grid(ceil_div(C, 32), ceil_div(N, LN_COLSUM_ROWS)), block(32, 8);
    layernorm_param_partial_kernel<T><<<grid, block, 0, s>>>(scratch, scratch + part, dout, inp, mean, rstd, N, C, d_in);
    LAUNCH_CHECK("layernorm_param_partial_kernel");
    TRY(colsum_finish(s, dw, scratch, N, C));
    return colsum_finish(s, db, scratch + part, N, C);
}

#define INSTANTIATE_LN(T)                                                                                          \
    template int residual_layernorm_forward<T>(cudaStream_t, T *, T *, float *, float *, const T *, const T *,     \
                                               const T *, const T *, int, int, float, bq_drop);                    \
    template int layernorm_backward<T>(cudaStream_t, T *, T *, const T *, const T *, const T *, const float *,     \
                                       const float *, int, int, bq_drop, bq_drop);                                 \
    template int layernorm_param_grads<T>(cudaStream_t, float *, float *, const T *, const T *, const float *,     \
                                          const float *, int, int, bq_drop, float *);
INSTANTIATE_LN(float)
INSTANTIATE_LN(bf16)
