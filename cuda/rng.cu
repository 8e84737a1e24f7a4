/* Dropout on the GPU with the CPU's Philox4x32-10 keying (csrc/philox.c; dropout in csrc/rng.c), so masks agree
 * bit for bit, and the fp32 <-> bf16 copies. */
#include "common.cuh"

/* One thread per Philox quad: elements 4q .. 4q+3 of the numbering [first, first + N). */
template <typename T>
__global__ void dropout_kernel(T *out, const T *inp, size_t N, bq_drop d, uint64_t first) {
    const uint64_t q0 = first >> 2;
    const uint64_t q = q0 + (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (q > (first + N - 1) >> 2) return;
    float u[4];
    philox_uniform4(u, d, q);
    const float scale = drop_scale(d);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const long long i = (long long)(q * 4 + k) - (long long)first;
        if (i >= 0 && i < (long long)N) out[i] = from_f<T>(u[k] >= d.p ? to_f(inp[i]) * scale : 0.0f);
    }
}

template <typename T>
int launch_dropout(cudaStream_t s, T *out, const T *inp, size_t N, bq_drop d, uint64_t first) {
    if (!N) return BQ_OK;
    if (!(d.p > 0.0f)) {
        if (out != inp) CUDA_TRY(cudaMemcpyAsync(out, inp, N * sizeof(T), cudaMemcpyDeviceToDevice, s));
        return BQ_OK;
    }
    const size_t quads = ((first + N - 1) >> 2) - (first >> 2) + 1;
    dropout_kernel<T><<<ceil_div(quads, 256), 256, 0, s>>>(out, inp, N, d, first);
    LAUNCH_CHECK("dropout_kernel");
    return BQ_OK;
}
template int launch_dropout<float>(cudaStream_t, float *, const float *, size_t, bq_drop, uint64_t);
template int launch_dropout<bf16>(cudaStream_t, bf16 *, const bf16 *, size_t, bq_drop, uint64_t);

__global__ void uniform_kernel(float *u, size_t n, bq_drop d, uint64_t first) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float r[4];
    const uint64_t idx = first + i;
    philox_uniform4(r, d, idx >> 2);
    const unsigned lane = (unsigned)(idx & 3);
    u[i] = lane == 0 ? r[0] : lane == 1 ? r[1] : lane == 2 ? r[2] : r[3];
}

int launch_uniform(cudaStream_t s, float *u, size_t n, uint64_t seed, uint32_t step, uint32_t site, uint64_t first) {
    if (!n) return BQ_OK;
    bq_drop d = {0.5f, seed, step, site};
    uniform_kernel<<<ceil_div(n, 256), 256, 0, s>>>(u, n, d, first);
    LAUNCH_CHECK("uniform_kernel");
    return BQ_OK;
}

__global__ void f32_to_bf16_kernel(bf16 *out, const float *inp, size_t N) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16(inp[i]);
}
__global__ void bf16_to_f32_kernel(float *out, const bf16 *inp, size_t N) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < N; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(inp[i]);
}

static unsigned grid_for(size_t N) {
    size_t g = (N + 255) / 256;
    return (unsigned)(g > 65535u * 8u ? 65535u * 8u : (g ? g : 1));
}

int launch_f32_to_bf16(cudaStream_t s, bf16 *out, const float *inp, size_t N) {
    if (!N) return BQ_OK;
    f32_to_bf16_kernel<<<grid_for(N), 256, 0, s>>>(out, inp, N);
    LAUNCH_CHECK("f32_to_bf16_kernel");
    return BQ_OK;
}

int launch_bf16_to_f32(cudaStream_t s, float *out, const bf16 *inp, size_t N) {
    if (!N) return BQ_OK;
    bf16_to_f32_kernel<<<grid_for(N), 256, 0, s>>>(out, inp, N);
    LAUNCH_CHECK("bf16_to_f32_kernel");
    return BQ_OK;
}

/* ---- host builds (no GPU needed) ---------------------------------------------------------------------------- */

extern "C" void bq_cuda_host_uniform(float *u, size_t n, uint64_t seed, uint32_t step, uint32_t tensor_id,
                                     uint64_t first) {
    const bq_drop d = {0.5f, seed, step, tensor_id};
    for (size_t i = 0; i < n; i++) {
        float r[4];
        const uint64_t idx = first + i;
        philox_uniform4(r, d, idx >> 2);
        u[i] = r[idx & 3];
    }
}

/* The engine's fused kernels' walk (one row per warp, for_row_quads over 32 lanes) with the window-keyed row bases. */
extern "C" void bq_cuda_host_dropout_hidden(float *out, const float *x, int B, int T, int C, int P, const int64_t *win,
                                            float p, uint64_t seed, uint32_t step, uint32_t site) {
    const bq_drop d = {p, seed, step, site, win, T, P};
    const float scale = drop_scale(d);
    for (long long n = 0; n < (long long)B * T; n++) {
        const size_t off = (size_t)n * C;
        for (int lane = 0; lane < 32; lane++)
            for_row_quads(drop_hidden_base(d, n, C), C, lane, 32, d, [&](int c, bool keep) {
                out[off + c] = keep ? x[off + c] * scale : 0.0f;
            });
    }
}

extern "C" void bq_cuda_host_dropout_attention(float *out, const float *x, int B, int NH, int T, int P,
                                               const int64_t *win, float p, uint64_t seed, uint32_t step,
                                               uint32_t site) {
    const bq_drop d = {p, seed, step, site, win, T, P};
    const float scale = drop_scale(d);
    for (long long r = 0; r < (long long)B * NH * T; r++) {
        const size_t off = (size_t)r * T;
        for (int lane = 0; lane < 32; lane++)
            for_row_quads(drop_attn_base(d, r, NH), T, lane, 32, d, [&](int j, bool keep) {
                out[off + j] = keep ? x[off + j] * scale : 0.0f;
            });
    }
}

extern "C" void bq_cuda_host_dropout_rows(float *out, const float *x, int rows, int cols, float p, uint64_t seed,
                                          uint32_t step, uint32_t tensor_id, uint64_t first) {
    const bq_drop d = {p, seed, step, tensor_id};
    const float scale = drop_scale(d);
    for (int r = 0; r < rows; r++) {
        const size_t off = (size_t)r * cols;
        for (int lane = 0; lane < 32; lane++)   /* the 32 lanes of the warp that owns the row, one after another */
            for_row_quads(first + off, cols, lane, 32, d, [&](int j, bool keep) {
                out[off + j] = keep ? x[off + j] * scale : 0.0f;
            });
    }
}
