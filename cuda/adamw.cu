/* AdamW fused over the flat parameter buffer (torch.optim.AdamW semantics, as csrc/adamw.c), and the global
 * gradient norm as a deterministic two-stage reduction in double over a fixed grid (the same bits on any GPU). */
#include "kernels.cuh"

#define NORM_THREADS 256

__global__ void sum_squares_partial_kernel(double *partials, const float *g, size_t N) {
    __shared__ double sh[NORM_THREADS];
    double acc = 0.0;
    for (size_t i = (size_t)blockIdx.x * NORM_THREADS + threadIdx.x; i < N; i += (size_t)BQ_NORM_BLOCKS * NORM_THREADS)
        acc += (double)g[i] * g[i];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int o = NORM_THREADS / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = sh[0];
}

__global__ void sum_squares_finish_kernel(double *out, const double *partials) {
    __shared__ double sh[BQ_NORM_BLOCKS];
    sh[threadIdx.x] = partials[threadIdx.x];
    __syncthreads();
    for (int o = BQ_NORM_BLOCKS / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = sh[0];
}

int sum_squares(cudaStream_t s, double *out, const float *g, size_t N, double *partials) {
    sum_squares_partial_kernel<<<BQ_NORM_BLOCKS, NORM_THREADS, 0, s>>>(partials, g, N);
    LAUNCH_CHECK("sum_squares_partial_kernel");
    sum_squares_finish_kernel<<<1, BQ_NORM_BLOCKS, 0, s>>>(out, partials);
    LAUNCH_CHECK("sum_squares_finish_kernel");
    return BQ_OK;
}

/* One block per BQ_ADAM_CHUNK elements of one tensor t (lr = lr[t], step_size = step_size[t]):
 *   p -= lr * wd * p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
 * with g = grad * grad_scale; the bf16 copy of p (when present) is refreshed in the same pass. */
__global__ void adamw_kernel(float *param, bf16 *param_bf16, const float *grad, float *m, float *v,
                             const long long *bstart, const int *blen, const int *btensor, const uint8_t *decay,
                             const float *lrs, const float *step_sizes, float beta1, float beta2, float eps,
                             float weight_decay, float bc2_sqrt, float grad_scale) {
    const long long s0 = bstart[blockIdx.x];
    const int n = blen[blockIdx.x], t = btensor[blockIdx.x];
    const float dec = 1.0f - lrs[t] * (decay[t] ? weight_decay : 0.0f), step_size = step_sizes[t];
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const long long i = s0 + j;
        const float g = grad[i] * grad_scale;
        const float p = param[i] * dec;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float out = p - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        param[i] = out;
        if (param_bf16) param_bf16[i] = __float2bfloat16(out);
    }
}

int adamw_flat(cudaStream_t s, float *param, bf16 *param_bf16, const float *grad, float *m, float *v,
               bq_adam_blocks blocks, const uint8_t *decay, const float *lr, const float *step_size, float beta1,
               float beta2, float eps, float weight_decay, float bc2_sqrt, float grad_scale) {
    if (!blocks.nblocks) return BQ_OK;
    adamw_kernel<<<blocks.nblocks, 256, 0, s>>>(param, param_bf16, grad, m, v, blocks.start, blocks.len, blocks.tensor,
                                                decay, lr, step_size, beta1, beta2, eps, weight_decay, bc2_sqrt,
                                                grad_scale);
    LAUNCH_CHECK("adamw_kernel");
    return BQ_OK;
}
