/* Self-test of the CPU emulator (cuda/emu): that it runs CUDA's block and warp semantics, and that it reports what
 * a GPU would leave undefined or fault on. Built by `python cuda/emu/build.py --selftest` (with the emulator, like
 * the backend's .cu files) and run one case at a time by tests/test_cuda_emu.py:
 *
 *     selftest CASE      prints one line "CASE: <result>" and exits 0; the test reads the result
 */
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

/* one warp-shuffle sum per warp, then the warps' sums through shared memory: the block's total in out[blockIdx.x] */
__global__ void block_sum_kernel(float *out, const float *x, int n) {
    __shared__ float warp_sums[32];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (unsigned w = 0; w < blockDim.x / 32; w++) s += warp_sums[w];
        out[blockIdx.x] = s;
    }
}

/* lane 5 leaves before the warp's shuffle, and lane 4 reads it: undefined on a GPU */
__global__ void shfl_reads_exited_lane_kernel(float *out) {
    if (threadIdx.x == 5) return;
    float v = 1.0f;
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

/* lanes 16-31 leave, lanes 0-15 shuffle among themselves: defined (exited lanes are excused), out = 16 */
__global__ void shfl_half_warp_kernel(float *out) {
    if (threadIdx.x >= 16) return;
    float v = 1.0f;
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[threadIdx.x] = v;
}

/* half of warp 0 waits at __syncthreads, the other half in a shuffle that needs the whole warp */
__global__ void deadlock_kernel(float *out) {
    float v = 1.0f;
    if (threadIdx.x < 16) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

/* writes one element past the end of out: AddressSanitizer's to find (build.py --asan) */
__global__ void write_past_end_kernel(float *out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;
}

/* thread 1 reads what thread 0 writes, with no barrier between: a data race (out[1] is 7 or 0 by the order) */
__global__ void race_kernel(float *out) {
    __shared__ float v;
    if (threadIdx.x == 0) v = 7.0f;
    if (threadIdx.x == 1) out[1] = v;
    __syncthreads();
    if (threadIdx.x == 0) v = 0.0f;
}

__global__ void noop_kernel(float *) {}

static int fail(const char *what) {
    printf("%s: setup failed\n", what);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: selftest CASE\n");
        return 2;
    }
    const char *c = argv[1];
    if (!strcmp(c, "block_sum")) {   /* 1000 values over blocks of 256: the partial last block and warp sums */
        const int n = 1000, blocks = 4;
        std::vector<float> x(n);
        double want[blocks] = {0, 0, 0, 0};
        for (int i = 0; i < n; i++) {
            x[i] = (float)((i * 37) % 101) - 50.0f;
            want[i / 256] += x[i];
        }
        float *dx, *dout;
        if (cudaMalloc(&dx, n * sizeof(float)) || cudaMalloc(&dout, blocks * sizeof(float))) return fail(c);
        cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice);
        block_sum_kernel<<<blocks, 256>>>(dout, dx, n);
        cudaError_t e = cudaDeviceSynchronize();
        float got[blocks];
        cudaMemcpy(got, dout, sizeof got, cudaMemcpyDeviceToHost);
        int ok = e == cudaSuccess;
        for (int b = 0; b < blocks; b++) ok &= got[b] == (float)want[b];
        printf("%s: %s\n", c, ok ? "ok" : "wrong");
    } else if (!strcmp(c, "shfl_reads_exited_lane") || !strcmp(c, "deadlock")) {
        float *d;
        if (cudaMalloc(&d, 64 * sizeof(float))) return fail(c);
        if (!strcmp(c, "deadlock")) deadlock_kernel<<<1, 64>>>(d);
        else shfl_reads_exited_lane_kernel<<<1, 32>>>(d);
        const cudaError_t e = cudaDeviceSynchronize();
        printf("%s: %s | %s\n", c, cudaGetErrorName(e), cudaGetErrorString(e));
    } else if (!strcmp(c, "shfl_half_warp")) {
        float *d, h[16];
        if (cudaMalloc(&d, 16 * sizeof(float))) return fail(c);
        shfl_half_warp_kernel<<<1, 32>>>(d);
        const cudaError_t e = cudaDeviceSynchronize();
        cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
        int ok = e == cudaSuccess;
        for (int i = 0; i < 16; i++) ok &= h[i] == 16.0f;
        printf("%s: %s\n", c, ok ? "ok" : "wrong");
    } else if (!strcmp(c, "bad_config")) {
        float *d;
        if (cudaMalloc(&d, 4)) return fail(c);
        noop_kernel<<<1, 2048>>>(d);
        const cudaError_t first = cudaGetLastError(), second = cudaGetLastError();
        printf("%s: %s then %s\n", c, cudaGetErrorName(first), cudaGetErrorName(second));
    } else if (!strcmp(c, "copy_past_end") || !strcmp(c, "copy_wrong_kind") || !strcmp(c, "copy_host_pointer")) {
        char host[64] = {0};
        char *d;
        if (cudaMalloc(&d, 60)) return fail(c);
        cudaError_t e;
        if (!strcmp(c, "copy_past_end")) e = cudaMemcpy(d + 8, host, 56, cudaMemcpyHostToDevice);
        else if (!strcmp(c, "copy_wrong_kind")) e = cudaMemcpy(host, d, 16, cudaMemcpyHostToDevice);
        else e = cudaMemcpy(host, host + 32, 16, cudaMemcpyDeviceToHost);
        printf("%s: %s | %s\n", c, cudaGetErrorName(e), cudaGetErrorString(e));
    } else if (!strcmp(c, "unwritten_reads_nan")) {
        float *d, h[3];
        if (cudaMalloc(&d, sizeof h)) return fail(c);
        cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
        printf("%s: %s\n", c, h[0] != h[0] && h[2] != h[2] ? "nan" : "not nan");
    } else if (!strcmp(c, "gemm_lda_too_small") || !strcmp(c, "gemm_past_end") || !strcmp(c, "gemm_ok")) {
        /* C[3x2] = A[3x4] B[4x2], column-major */
        const int m = 3, n = 2, k = 4;
        float a[m * k], b[k * n], cref[m * n] = {0}, c_[m * n];
        for (int i = 0; i < m * k; i++) a[i] = (float)(i % 5) - 2.0f;
        for (int i = 0; i < k * n; i++) b[i] = (float)(i % 3) + 0.5f;
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++)
                for (int p = 0; p < k; p++) cref[i + j * m] += a[i + p * m] * b[p + j * k];
        float *da, *db, *dc;
        const int a_elems = !strcmp(c, "gemm_past_end") ? m * k - 1 : m * k;
        if (cudaMalloc(&da, a_elems * sizeof(float)) || cudaMalloc(&db, sizeof b) || cudaMalloc(&dc, sizeof c_))
            return fail(c);
        cudaMemcpy(da, a, a_elems * sizeof(float), cudaMemcpyHostToDevice);
        cudaMemcpy(db, b, sizeof b, cudaMemcpyHostToDevice);
        cublasHandle_t h;
        cublasCreate(&h);
        const float one = 1.0f, zero = 0.0f;
        const int lda = !strcmp(c, "gemm_lda_too_small") ? m - 1 : m;
        const cublasStatus_t st = cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, da, CUDA_R_32F,
                                                             lda, 0, db, CUDA_R_32F, k, 0, &zero, dc, CUDA_R_32F, m, 0,
                                                             1, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        cudaMemcpy(c_, dc, sizeof c_, cudaMemcpyDeviceToHost);
        int same = 1;
        for (int i = 0; i < m * n; i++) same &= c_[i] == cref[i];
        printf("%s: %s %s | %s\n", c, cublasGetStatusName(st), same ? "equal" : "different", cublasGetStatusString(st));
    } else if (!strcmp(c, "race")) {
        float *d, h[2] = {-1.0f, -1.0f};
        if (cudaMalloc(&d, sizeof h)) return fail(c);
        race_kernel<<<1, 32>>>(d);   /* run twice: the second launch starts from what the first left in v */
        race_kernel<<<1, 32>>>(d);
        cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
        printf("%s: out[1] = %g\n", c, h[1]);
    } else if (!strcmp(c, "write_past_end")) {
        float *d;
        if (cudaMalloc(&d, 100 * sizeof(float))) return fail(c);
        write_past_end_kernel<<<1, 128>>>(d, 100);
        const cudaError_t e = cudaDeviceSynchronize();
        printf("%s: finished (%s)\n", c, cudaGetErrorName(e));
    } else {
        fprintf(stderr, "selftest: no case %s\n", c);
        return 2;
    }
    return 0;
}
