/* threadIdx, blockIdx, blockDim, gridDim and warpSize for the CPU emulator (cuda/emu/bq_emu.h). The CUDA headers
 * declare them `extern const` with C linkage; they are defined here, in a file that does not include those
 * headers, and runtime.cpp sets them through the functions below before it resumes each thread's fiber. */
struct bq_emu_u3 { unsigned x, y, z; };

struct bq_emu_u3 threadIdx, blockIdx, blockDim, gridDim;
int warpSize = 32;

void bq_emu_set_thread(unsigned x, unsigned y, unsigned z) {
    threadIdx.x = x;
    threadIdx.y = y;
    threadIdx.z = z;
}

void bq_emu_set_block(unsigned x, unsigned y, unsigned z) {
    blockIdx.x = x;
    blockIdx.y = y;
    blockIdx.z = z;
}

void bq_emu_set_dims(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz) {
    gridDim.x = gx;
    gridDim.y = gy;
    gridDim.z = gz;
    blockDim.x = bx;
    blockDim.y = by;
    blockDim.z = bz;
}
