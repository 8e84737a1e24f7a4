/* The CPU emulator of the CUDA backend: force-included (g++ -include) into each .cu file of cuda/, which is then compiled
 * by the host compiler as C++ against the real CUDA headers (types, enums and signatures are NVIDIA's) and linked
 * with cuda/emu/runtime.cpp, which implements the CUDA runtime, cuBLAS and cuBLASLt calls the backend makes on
 * host memory. cuda/emu/build.py rewrites each `kernel<<<grid, block, smem, stream>>>(args)` into a call of
 * bq_emu_launch below; nothing else in cuda/ changes.
 *
 * Each thread block runs on one OS thread, its threads as fibers that switch only at __syncthreads, __syncwarp and
 * the warp shuffles, so the kernels run with CUDA's block and warp semantics (not lock-step: data races between
 * threads are not found). What a GPU leaves undefined and the emulator reports instead of guessing: a shuffle that
 * reads a lane that has exited or lies past the end of a partial warp, threads of a block waiting at different
 * barriers (a deadlock on the GPU), launch configurations the hardware refuses. Exited threads are excused from
 * __syncthreads, __syncwarp and shuffles, as on a GPU.
 */
#ifndef BQ_EMU_H
#define BQ_EMU_H

/* Before the CUDA headers: host_defines.h keeps a __shared__ that is already defined. One block runs at a time,
 * so a block's shared arrays are a kernel's static ones. */
#define __shared__ static

#include <cuda_runtime.h>
#include <device_launch_parameters.h>   /* threadIdx, blockIdx, blockDim, gridDim (cuda/emu/builtins.c) */
#include <cuda_bf16.h>
#include <cublasLt.h>
#include <cublas_v2.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#define BQ_CUDA_EMU 1

extern "C" {
void bq_emu_syncthreads(void);
void bq_emu_syncwarp(unsigned mask);
uint64_t bq_emu_shfl_xor(uint64_t bits, int lane_mask, unsigned mask, int width);
}
/* runs fn for every thread of grid x block (an error in the configuration or inside the kernel is returned by the
 * next cudaGetLastError / synchronising call, as on a GPU) */
void bq_emu_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char *kernel,
                   const std::function<void()> &fn);

static inline void __syncthreads(void) { bq_emu_syncthreads(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { bq_emu_syncwarp(mask); }

/* the device overloads of min and max (int, unsigned, float, ...): the usual arithmetic conversions, as CUDA's */
template <typename A, typename B> static inline typename std::common_type<A, B>::type min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B> static inline typename std::common_type<A, B>::type max(A a, B b) { return a < b ? b : a; }

template <typename T> static inline T __shfl_xor_sync(unsigned mask, T x, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= 8, "__shfl_xor_sync of a type over 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &x, sizeof x);
    b = bq_emu_shfl_xor(b, lane_mask, mask, width);
    T y;
    std::memcpy(&y, &b, sizeof y);
    return y;
}

#endif
