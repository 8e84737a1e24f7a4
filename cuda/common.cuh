/* Shared device helpers of the CUDA backend: error reporting, storage types, the Philox RNG, reductions.
 *
 * Storage type T is float (fp32 mode) or bf16 (bf16 mode); kernels load with to_f() and store with
 * from_f<T>(), and do all arithmetic in fp32 (sums of a row or a column: fp32, or fp64 where the CPU uses it).
 */
#ifndef BERTQA_CUDA_COMMON_CUH
#define BERTQA_CUDA_COMMON_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "bertqa_cuda.h"

typedef __nv_bfloat16 bf16;

/* ---- errors ------------------------------------------------------------------------------------- */
/* bq_cuda_fail (bertqa_cuda.h) formats the thread's message and returns status. */
int bq_cuda_fail_cuda(cudaError_t e, const char *call, const char *file, int line);
int bq_cuda_fail_cublas(cublasStatus_t s, const char *call, const char *file, int line);

#define CUDA_TRY(call)                                                                   \
    do {                                                                                 \
        cudaError_t e_ = (call);                                                         \
        if (e_ != cudaSuccess) return bq_cuda_fail_cuda(e_, #call, __FILE__, __LINE__);  \
    } while (0)
#define CUBLAS_TRY(call)                                                                   \
    do {                                                                                   \
        cublasStatus_t s_ = (call);                                                        \
        if (s_ != CUBLAS_STATUS_SUCCESS) return bq_cuda_fail_cublas(s_, #call, __FILE__, __LINE__); \
    } while (0)
/* BERTQA_CUDA_SYNC=1 in the environment: wait for every kernel right after its launch, so an error inside a kernel
 * is reported with that kernel's name (slow; for debugging). */
int bq_cuda_sync_each_launch(void);
/* After a <<<...>>> launch: a bad configuration shows up here, a fault inside the kernel at the next sync. */
#define LAUNCH_CHECK(kernel_name)                                                                   \
    do {                                                                                            \
        cudaError_t e_ = cudaGetLastError();                                                        \
        if (e_ != cudaSuccess) return bq_cuda_fail_cuda(e_, "launch of " kernel_name, __FILE__, __LINE__); \
        if (bq_cuda_sync_each_launch() && (e_ = cudaDeviceSynchronize()) != cudaSuccess)            \
            return bq_cuda_fail_cuda(e_, "kernel " kernel_name " (BERTQA_CUDA_SYNC=1)", __FILE__, __LINE__); \
    } while (0)
#define TRY(x)                     \
    do {                           \
        int s_ = (x);              \
        if (s_ != BQ_OK) return s_; \
    } while (0)

/* ---- storage types -------------------------------------------------------------------------------- */
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }   /* nearest even */

template <typename T> struct dtype_of;
template <> struct dtype_of<float> { static constexpr cudaDataType_t value = CUDA_R_32F; };
template <> struct dtype_of<bf16> { static constexpr cudaDataType_t value = CUDA_R_16BF; };

static inline unsigned ceil_div(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

/* ---- dropout: Philox4x32-10, keyed exactly as csrc/philox.c (the dropout entry points: csrc/rng.c) ------------------------------------------ */
/* Host-and-device functions: the host build is what bq_cuda_host_uniform / bq_cuda_host_dropout_rows run, so the
 * RNG and the quad walk of the kernels are tested against csrc/philox.c and csrc/rng.c on machines without a GPU. */
#ifdef __CUDA_ARCH__
#define BQ_UNROLL _Pragma("unroll")
#else
#define BQ_UNROLL
#endif

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
    return __umulhi(a, b);
#else
    return (uint32_t)(((uint64_t)a * b) >> 32);
#endif
}

/* One dropout site. Key = seed; counter = (idx / 4 as 64 bits, site, step); element idx takes lane idx % 4;
 * u = (r >> 8) / 2^24; keep when u >= p. p == 0 means no dropout (and no RNG work).
 *
 * The element numbering idx is keyed by window, never by a row's place in the batch or the batch's padded width T, so
 * a window gets the same mask in any micro-batch, on any rank (DESIGN.md, data parallel):
 *   hidden state [B,T,C]:           idx(b, t, c)    = (win[b] * P + t) * C + c
 *   attention probabilities [B,NH,T,T]: idx(b, h, i, j) = ((win[b] * NH + h) * P + i) * P + j
 * win [B]: each batch row's window id (device memory in a kernel), NULL for win[b] = b; P >= T: the position stride
 * (the engine's max_position_embeddings). With win NULL and P = T this is the flat numbering of the buffer
 * (bertqa.ops.dropout's), what the one-kernel entry points use. Arithmetic in 64 bits (callers keep it in range). */
struct bq_drop {
    float p;
    uint64_t seed;
    uint32_t step, site;
    const int64_t *win;
    int T, P;
};

/* A site with the flat numbering of a buffer of rows of T positions (win NULL, P = T). */
static inline bq_drop drop_flat(float p, uint64_t seed, uint32_t step, uint32_t site, int T) {
    return bq_drop{p, seed, step, site, nullptr, T, T};
}

__host__ __device__ __forceinline__ uint64_t drop_window(const bq_drop &d, uint64_t b) {
    return d.win ? (uint64_t)d.win[b] : b;
}

/* RNG index of the first element of row n = b*T + t of a hidden-state tensor [B*T, C] (0 when p == 0: no numbering
 * is needed, nothing is read). */
__host__ __device__ __forceinline__ uint64_t drop_hidden_base(const bq_drop &d, long long n, int C) {
    if (!(d.p > 0.0f)) return 0;
    const uint64_t b = (uint64_t)n / (uint64_t)d.T, t = (uint64_t)n % (uint64_t)d.T;
    return (drop_window(d, b) * (uint64_t)d.P + t) * (uint64_t)C;
}

/* RNG index of the first element of row r = (b*NH + h)*T + i of attention probabilities [B*NH*T, T]. */
__host__ __device__ __forceinline__ uint64_t drop_attn_base(const bq_drop &d, long long r, int NH) {
    if (!(d.p > 0.0f)) return 0;
    const uint64_t T = (uint64_t)d.T, i = (uint64_t)r % T, bh = (uint64_t)r / T;
    const uint64_t h = bh % (uint64_t)NH, b = bh / (uint64_t)NH;
    return ((drop_window(d, b) * (uint64_t)NH + h) * (uint64_t)d.P + i) * (uint64_t)d.P;
}

__host__ __device__ __forceinline__ void philox_uniform4(float u[4], const bq_drop &d, uint64_t quad) {
    uint32_t c0 = (uint32_t)quad, c1 = (uint32_t)(quad >> 32), c2 = d.site, c3 = d.step;
    uint32_t k0 = (uint32_t)d.seed, k1 = (uint32_t)(d.seed >> 32);
BQ_UNROLL
    for (int r = 0; r < 10; r++) {
        const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const uint32_t hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    const float s = 1.0f / 16777216.0f;
    u[0] = (float)(c0 >> 8) * s; u[1] = (float)(c1 >> 8) * s; u[2] = (float)(c2 >> 8) * s; u[3] = (float)(c3 >> 8) * s;
}

/* keep flag of one element (one Philox call; kernels that walk whole quads use philox_uniform4 directly) */
__host__ __device__ __forceinline__ bool drop_keep(const bq_drop &d, uint64_t idx) {
    if (!(d.p > 0.0f)) return true;
    float u[4];
    philox_uniform4(u, d, idx >> 2);
    const unsigned lane = (unsigned)(idx & 3);
    const float x = lane == 0 ? u[0] : lane == 1 ? u[1] : lane == 2 ? u[2] : u[3];
    return x >= d.p;
}

__host__ __device__ __forceinline__ float drop_scale(const bq_drop &d) { return d.p > 0.0f ? 1.0f / (1.0f - d.p) : 1.0f; }

/* Visits the n elements of a row whose first element has global (RNG) index `base`, walking whole Philox quads:
 * lane `lane` of `nlanes` takes quads lane, lane + nlanes, ...; f(j, keep) for each row element j. */
template <typename F>
__host__ __device__ __forceinline__ void for_row_quads(uint64_t base, int n, int lane, int nlanes, const bq_drop &d, F f) {
    const uint64_t q0 = base >> 2, q1 = (base + (uint64_t)n - 1) >> 2;
    for (uint64_t q = q0 + lane; q <= q1; q += nlanes) {
        float u[4] = {1.0f, 1.0f, 1.0f, 1.0f};
        if (d.p > 0.0f) philox_uniform4(u, d, q);
BQ_UNROLL
        for (int k = 0; k < 4; k++) {
            const long long j = (long long)(q * 4 + k) - (long long)base;
            if (j >= 0 && j < n) f((int)j, !(d.p > 0.0f) || u[k] >= d.p);
        }
    }
}

/* ---- reductions ------------------------------------------------------------------------------------ */
template <typename V> __device__ __forceinline__ V warp_sum(V x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

/* ---- kernels shared between files (launchers return a status) -------------------------------------- */
/* out = dropout(inp) over [N] with element numbering first + i (out may alias inp). */
template <typename T>
int launch_dropout(cudaStream_t s, T *out, const T *inp, size_t N, bq_drop d, uint64_t first);
/* bf16 <-> fp32 copies of [N] */
int launch_f32_to_bf16(cudaStream_t s, bf16 *out, const float *inp, size_t N);
int launch_bf16_to_f32(cudaStream_t s, float *out, const bf16 *inp, size_t N);

#endif
