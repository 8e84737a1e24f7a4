/* GELU, the exact erf form BERT uses (hidden_act = "gelu"), as csrc/gelu.c. */
#include "kernels.cuh"

#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

template <typename T> __global__ void gelu_forward_kernel(T *out, const T *inp, size_t N) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += (size_t)gridDim.x * blockDim.x) {
        const float x = to_f(inp[i]);
        out[i] = from_f<T>(0.5f * x * (1.0f + erff(x * INV_SQRT2)));
    }
}

/* d/dx [x Phi(x)] = Phi(x) + x phi(x) */
template <typename T> __global__ void gelu_backward_kernel(T *dinp, const T *inp, const T *dout, size_t N) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += (size_t)gridDim.x * blockDim.x) {
        const float x = to_f(inp[i]);
        const float cdf = 0.5f * (1.0f + erff(x * INV_SQRT2));
        const float pdf = INV_SQRT_2PI * expf(-0.5f * x * x);
        dinp[i] = from_f<T>(to_f(dout[i]) * (cdf + x * pdf));
    }
}

static unsigned elementwise_grid(size_t N) {
    const size_t g = (N + 255) / 256;
    return (unsigned)(g > 1048576 ? 1048576 : (g ? g : 1));
}

template <typename T> int gelu_forward(cudaStream_t s, T *out, const T *inp, size_t N) {
    if (!N) return BQ_OK;
    gelu_forward_kernel<T><<<elementwise_grid(N), 256, 0, s>>>(out, inp, N);
    LAUNCH_CHECK("gelu_forward_kernel");
    return BQ_OK;
}

template <typename T> int gelu_backward(cudaStream_t s, T *dinp, const T *inp, const T *dout, size_t N) {
    if (!N) return BQ_OK;
    gelu_backward_kernel<T><<<elementwise_grid(N), 256, 0, s>>>(dinp, inp, dout, N);
    LAUNCH_CHECK("gelu_backward_kernel");
    return BQ_OK;
}

template int gelu_forward<float>(cudaStream_t, float *, const float *, size_t);
template int gelu_forward<bf16>(cudaStream_t, bf16 *, const bf16 *, size_t);
template int gelu_backward<float>(cudaStream_t, float *, const float *, const float *, size_t);
template int gelu_backward<bf16>(cudaStream_t, bf16 *, const bf16 *, const bf16 *, size_t);
