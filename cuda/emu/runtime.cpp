/* The CPU emulator's CUDA runtime, cuBLAS and cuBLASLt: the calls the backend (the .cu files of cuda/) makes, implemented on
 * host memory from NVIDIA's documented semantics, against the real headers, so the backend's own code runs
 * unchanged on a machine without a GPU (cuda/emu/build.py; tests/test_cuda_emu.py).
 *
 * What it checks that a GPU would only show as a fault or as wrong numbers:
 *   - every copy, memset and matrix operand lies inside one cudaMalloc'd block, the direction of each copy matches
 *     where its pointers live, and no product's output overlaps its inputs;
 *   - new device memory reads as NaN (0xff bytes) until written, so a read of memory nothing wrote shows;
 *   - launch configurations the hardware refuses; warp-level misuse and deadlocks (bq_emu.h).
 * A violation is printed on stderr and returned as a CUDA or cuBLAS error by the call (a kernel's: by the next
 * cudaGetLastError or synchronising call), with the emulator's sentence in cudaGetErrorString. Unlike a GPU, the
 * error is not sticky: the calls after it run.
 *
 * Streams are synchronous (each call completes before it returns); products accumulate in double and round once.
 * Data races are not detected as such, but BQ_EMU_ORDER=reverse runs threads and blocks in the opposite order, and a
 * result that changes with it depends on one.
 */
#include "bq_emu.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

extern "C" {
void bq_emu_set_thread(unsigned x, unsigned y, unsigned z);
void bq_emu_set_block(unsigned x, unsigned y, unsigned z);
void bq_emu_set_dims(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz);
}

namespace {

std::recursive_mutex g_mu;   /* one call at a time: the scheduler's state and the allocation map are global */

/* ---- errors ------------------------------------------------------------------------------------------------ */
cudaError_t g_pending = cudaSuccess;   /* returned (and cleared) by the next cudaGetLastError / synchronising call */
std::string g_message;                 /* the emulator's sentence for the last violation */

void vreport(const char *fmt, va_list ap) {
    char buf[1024];
    vsnprintf(buf, sizeof buf, fmt, ap);
    g_message = std::string("bertqa CUDA emulator: ") + buf;
    fprintf(stderr, "%s\n", g_message.c_str());
    fflush(stderr);
}

cudaError_t g_message_code = cudaSuccess;   /* the error g_message explains */

cudaError_t violation(cudaError_t e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vreport(fmt, ap);
    va_end(ap);
    g_message_code = e;
    return e;
}

void vreport_str(const std::string &msg) {
    g_message = "bertqa CUDA emulator: " + msg;
    fprintf(stderr, "%s\n", g_message.c_str());
    fflush(stderr);
}

cudaError_t take_pending() {
    cudaError_t e = g_pending;
    g_pending = cudaSuccess;
    return e;
}

/* BQ_EMU_SHAPES_ONLY=1: launches and products are checked (configurations, shapes, leading dimensions, bounds)
 * but not computed, so the host code runs at full benchmark sizes in seconds; results are whatever memory held */
bool shapes_only() {
    static const bool on = [] {
        const char *s = getenv("BQ_EMU_SHAPES_ONLY");
        return s && *s && strcmp(s, "0") != 0;
    }();
    return on;
}

/* BQ_EMU_ORDER=reverse: the threads of a block run from the last to the first between barriers (and the blocks of
 * a grid from the last). A result that changes with the order depends on a data race: threads that write what
 * others read, or write the same place, with no barrier between them (tests/test_cuda_emu.py runs the GPU tests
 * both ways). */
bool reverse_order() {
    static const bool on = [] {
        const char *s = getenv("BQ_EMU_ORDER");
        return s && strcmp(s, "reverse") == 0;
    }();
    return on;
}

/* ---- device memory --------------------------------------------------------------------------------------- */
/* what the emulated GPU reports and lets be allocated: BQ_EMU_DEVICE_GB, default 8 (host memory, all of it touched) */
const size_t kDeviceBytes = [] {
    const char *s = getenv("BQ_EMU_DEVICE_GB");
    const double gb = s && *s ? atof(s) : 8.0;
    return (size_t)((gb > 0 ? gb : 8.0) * (double)(1ull << 30));
}();
std::map<uintptr_t, size_t> g_allocs;          /* start -> bytes */
size_t g_allocated = 0;

/* the allocation holding [p, p + n), or nullptr */
const std::pair<const uintptr_t, size_t> *find_alloc(const void *p, size_t n) {
    const uintptr_t a = (uintptr_t)p;
    auto it = g_allocs.upper_bound(a);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    if (a < it->first || a - it->first > it->second || n > it->second - (a - it->first)) return nullptr;
    return &*it;
}

/* "" when [p, p + n) lies inside one cudaMalloc block, else the sentence saying how it does not */
std::string range_problem(const void *p, size_t n, const char *what) {
    if (n == 0 || find_alloc(p, n)) return "";
    char buf[256];
    if (const auto *start = find_alloc(p, 0))
        snprintf(buf, sizeof buf, "%s [%p, +%zu bytes) runs %zu bytes past the end of its cudaMalloc block of %zu bytes",
                 what, p, n, (size_t)((uintptr_t)p + n - start->first - start->second), start->second);
    else
        snprintf(buf, sizeof buf, "%s %p (+%zu bytes) is not device memory", what, p, n);
    return buf;
}

bool device_range(const void *p, size_t n, const char *what, const char *call) {
    const std::string problem = range_problem(p, n, what);
    if (problem.empty()) return true;
    violation(cudaErrorIllegalAddress, "%s: %s", call, problem.c_str());
    return false;
}

/* ---- fibers: the threads of one block ----------------------------------------------------------------------- */
extern "C" void bq_emu_switch(void **save_sp, void *new_sp);
extern "C" void bq_emu_trampoline(void);
/* bq_emu_switch saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
 * stack pointer in *save_sp and resumes the context whose stack pointer is new_sp. A new fiber's first resume
 * "returns" into bq_emu_trampoline, which calls fiber_main on the fiber's own stack. */
asm(R"(
    .text
    .globl bq_emu_switch
    .type bq_emu_switch, @function
bq_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size bq_emu_switch, .-bq_emu_switch

    .globl bq_emu_trampoline
    .type bq_emu_trampoline, @function
bq_emu_trampoline:
    call *%r12
    ud2
    .size bq_emu_trampoline, .-bq_emu_trampoline
)");

enum FiberState { READY, WAIT_BLOCK, WAIT_WARP, DONE };

struct Fiber {
    char *stack = nullptr;   /* kStack bytes above a guard page */
    void *sp = nullptr;
    unsigned tx = 0, ty = 0, tz = 0;
    int warp = 0, lane = 0;
    FiberState state = READY;
    unsigned wait_gen = 0;
};

struct Warp {
    int size = 0;          /* lanes that exist (a partial last warp has fewer than 32) */
    int live = 0;          /* lanes not exited */
    int arrived = 0;       /* lanes waiting at the warp barrier */
    unsigned gen = 0;
    uint64_t slot[32] = {};
};

const size_t kStack = 128 << 10, kPage = 4096;
std::vector<Fiber> g_fibers;
std::vector<Warp> g_warps;
void *g_sched_sp = nullptr;
int g_cur = -1;
const std::function<void()> *g_fn = nullptr;
const char *g_kernel = "";
int g_live = 0, g_block_arrived = 0;
unsigned g_block_gen = 0;
bool g_abort = false;

void yield_to_scheduler() { bq_emu_switch(&g_fibers[g_cur].sp, g_sched_sp); }

/* a kernel-side violation: report, stop the launch, never return */
[[noreturn]] void kernel_violation(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char buf[768];
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    const Fiber &f = g_fibers[g_cur];
    violation(cudaErrorLaunchFailure, "kernel %s, thread (%u,%u,%u): %s", g_kernel, f.tx, f.ty, f.tz, buf);
    g_pending = cudaErrorLaunchFailure;
    g_abort = true;
    for (;;) yield_to_scheduler();
}

void release_block_if_complete() {
    if (g_block_arrived > 0 && g_block_arrived == g_live) {
        g_block_gen++;
        g_block_arrived = 0;
    }
}

void fiber_main() {
    (*g_fn)();
    Fiber &f = g_fibers[g_cur];
    f.state = DONE;
    g_live--;
    Warp &w = g_warps[f.warp];
    w.live--;
    if (w.arrived > 0 && w.arrived == w.live) {   /* exited lanes are excused from warp barriers, as on a GPU */
        w.gen++;
        w.arrived = 0;
    }
    release_block_if_complete();
    for (;;) yield_to_scheduler();
}

/* stacks for the first n fibers (kept for the process's life); false when memory runs out */
bool ensure_stacks(unsigned n) {
    if (g_fibers.size() < n) g_fibers.resize(n);
    for (unsigned i = 0; i < n; i++) {
        Fiber &f = g_fibers[i];
        if (f.stack) continue;
        void *m = mmap(nullptr, kStack + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) return false;
        mprotect(m, kPage, PROT_NONE);   /* a stack overflow faults instead of corrupting the neighbour */
        f.stack = (char *)m + kPage;
    }
    return true;
}

void init_fiber(Fiber &f) {
    /* the frame bq_emu_switch pops: [mxcsr, fpcw][r15][r14][r13][r12][rbx][rbp][return address] */
    uint64_t *top = (uint64_t *)(f.stack + kStack);
    top -= 2;   /* keeps rsp 16-byte aligned at the trampoline, so fiber_main is entered as if called */
    uint64_t *sp = top - 8;
    uint32_t csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    std::memcpy(&sp[0], csr, 8);
    sp[1] = 0;                              /* r15 */
    sp[2] = 0;                              /* r14 */
    sp[3] = 0;                              /* r13 */
    sp[4] = (uint64_t)(uintptr_t)&fiber_main;   /* r12: what the trampoline calls */
    sp[5] = 0;                              /* rbx */
    sp[6] = 0;                              /* rbp */
    sp[7] = (uint64_t)(uintptr_t)&bq_emu_trampoline;
    f.sp = sp;
    f.state = READY;
}

void run_block(unsigned n) {
    g_live = (int)n;
    g_block_arrived = 0;
    g_block_gen = 0;
    for (unsigned i = 0; i < n; i++) init_fiber(g_fibers[i]);
    const unsigned nw = (n + 31) / 32;
    for (unsigned w = 0; w < nw; w++) {
        Warp &wp = g_warps[w];
        wp.size = wp.live = (int)std::min(32u, n - w * 32);
        wp.arrived = 0;
        wp.gen = 0;
    }
    while (g_live > 0 && !g_abort) {
        bool progressed = false;
        for (unsigned k = 0; k < n && !g_abort; k++) {
            const unsigned i = reverse_order() ? n - 1 - k : k;
            Fiber &f = g_fibers[i];
            if (f.state == DONE) continue;
            if (f.state == WAIT_BLOCK && f.wait_gen == g_block_gen) continue;
            if (f.state == WAIT_WARP && f.wait_gen == g_warps[f.warp].gen) continue;
            g_cur = (int)i;
            bq_emu_set_thread(f.tx, f.ty, f.tz);
            bq_emu_switch(&g_sched_sp, f.sp);
            progressed = true;
        }
        if (!progressed && g_live > 0 && !g_abort) {
            int at_block = 0, at_warp = 0;
            for (unsigned i = 0; i < n; i++) {
                at_block += g_fibers[i].state == WAIT_BLOCK;
                at_warp += g_fibers[i].state == WAIT_WARP;
            }
            violation(cudaErrorLaunchFailure, "kernel %s: deadlock: %d thread(s) wait at __syncthreads and %d at a warp "
                      "barrier that the others never reach (a barrier in divergent code)", g_kernel, at_block, at_warp);
            g_pending = cudaErrorLaunchFailure;
            g_abort = true;
        }
    }
    g_cur = -1;
}

}  // namespace

/* ---- the kernel side ---------------------------------------------------------------------------------------- */
extern "C" void bq_emu_syncthreads(void) {
    Fiber &f = g_fibers[g_cur];
    const unsigned gen = g_block_gen;
    if (++g_block_arrived == g_live) {   /* the last to arrive releases the others (exited threads count as arrived) */
        g_block_gen++;
        g_block_arrived = 0;
        return;
    }
    f.state = WAIT_BLOCK;
    f.wait_gen = gen;
    while (g_block_gen == gen) yield_to_scheduler();
    f.state = READY;
}

static void warp_barrier(unsigned mask, const char *what) {
    Fiber &f = g_fibers[g_cur];
    Warp &w = g_warps[f.warp];
    if (mask != 0xffffffffu) kernel_violation("%s with mask %#x: the emulator models full-mask warp operations only", what, mask);
    /* every lane named in the mask that has not exited must arrive (lanes past a partial warp's end never exist) */
    const unsigned gen = w.gen;
    if (++w.arrived == w.live) {
        w.gen++;
        w.arrived = 0;
        return;
    }
    f.state = WAIT_WARP;
    f.wait_gen = gen;
    while (w.gen == gen) yield_to_scheduler();
    f.state = READY;
}

extern "C" void bq_emu_syncwarp(unsigned mask) { warp_barrier(mask, "__syncwarp"); }

extern "C" uint64_t bq_emu_shfl_xor(uint64_t bits, int lane_mask, unsigned mask, int width) {
    if (width != 32) kernel_violation("__shfl_xor_sync with width %d: the emulator models width 32 only", width);
    Fiber &f = g_fibers[g_cur];
    Warp &w = g_warps[f.warp];
    w.slot[f.lane] = bits;
    warp_barrier(mask, "__shfl_xor_sync");   /* every lane has written its value */
    const int src = f.lane ^ (lane_mask & 31);
    if (src >= w.size || g_fibers[f.warp * 32 + src].state == DONE)
        kernel_violation("__shfl_xor_sync reads lane %d, which %s (the value read is undefined on a GPU)", src,
                         src >= w.size ? "is past the end of a partial warp" : "has exited");
    const uint64_t got = w.slot[src];
    warp_barrier(mask, "__shfl_xor_sync");   /* every lane has read before any writes the next value */
    return got;
}

void bq_emu_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char *kernel,
                   const std::function<void()> &fn) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    (void)stream;
    const unsigned long long nt = (unsigned long long)block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nt == 0 || nt > 1024 || block.x > 1024 || block.y > 1024 ||
        block.z > 64 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
        violation(cudaErrorInvalidConfiguration, "launch of %s: grid (%u,%u,%u) x block (%u,%u,%u) is not a valid "
                  "configuration", kernel, grid.x, grid.y, grid.z, block.x, block.y, block.z);
        if (g_pending == cudaSuccess) g_pending = cudaErrorInvalidConfiguration;
        return;
    }
    if (smem > 48 * 1024) {
        violation(cudaErrorInvalidValue, "launch of %s: %zu bytes of dynamic shared memory (48 KiB without opt-in)",
                  kernel, smem);
        if (g_pending == cudaSuccess) g_pending = cudaErrorInvalidValue;
        return;
    }
    if (shapes_only()) return;
    if (!ensure_stacks((unsigned)nt)) {
        violation(cudaErrorMemoryAllocation, "launch of %s: no host memory for the stacks of %llu threads", kernel, nt);
        if (g_pending == cudaSuccess) g_pending = cudaErrorMemoryAllocation;
        return;
    }
    g_warps.resize((nt + 31) / 32);
    for (unsigned z = 0, i = 0; z < block.z; z++)
        for (unsigned y = 0; y < block.y; y++)
            for (unsigned x = 0; x < block.x; x++, i++) {
                Fiber &f = g_fibers[i];
                f.tx = x; f.ty = y; f.tz = z;
                f.warp = (int)(i / 32);
                f.lane = (int)(i % 32);
            }
    g_fn = &fn;
    g_kernel = kernel;
    g_abort = false;
    bq_emu_set_dims(grid.x, grid.y, grid.z, block.x, block.y, block.z);
    const bool rev = reverse_order();
    for (unsigned z = 0; z < grid.z && !g_abort; z++)
        for (unsigned y = 0; y < grid.y && !g_abort; y++)
            for (unsigned x = 0; x < grid.x && !g_abort; x++) {
                bq_emu_set_block(rev ? grid.x - 1 - x : x, rev ? grid.y - 1 - y : y, rev ? grid.z - 1 - z : z);
                run_block((unsigned)nt);
            }
    g_fn = nullptr;
}

/* ---- CUDA runtime ------------------------------------------------------------------------------------------ */
extern "C" {

cudaError_t cudaGetDeviceCount(int *count) {
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
    return device == 0 ? cudaSuccess : violation(cudaErrorInvalidDevice, "cudaSetDevice(%d): the emulator has device 0 only", device);
}

cudaError_t cudaGetDevice(int *device) {
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int *v) {
    *v = CUDART_VERSION;
    return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int *v) {
    *v = CUDART_VERSION;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int device) {
    if (device != 0) return cudaErrorInvalidDevice;
    std::memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "bertqa CPU emulator (sm_90 semantics)");
    p->major = 9;
    p->minor = 0;
    p->totalGlobalMem = kDeviceBytes;
    p->multiProcessorCount = 132;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->sharedMemPerBlock = 48 * 1024;
    p->maxThreadsDim[0] = p->maxThreadsDim[1] = 1024;
    p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647;
    p->maxGridSize[1] = p->maxGridSize[2] = 65535;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device) {
    if (device != 0) return cudaErrorInvalidDevice;
    switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default:
        return violation(cudaErrorInvalidValue, "cudaDeviceGetAttribute(%d): not modelled by the emulator", (int)attr);
    }
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    *total = kDeviceBytes;
    *free_bytes = kDeviceBytes - g_allocated;
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **ptr, size_t size) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    *ptr = nullptr;
    if (size == 0) return cudaSuccess;
    if (size > kDeviceBytes - g_allocated) return cudaErrorMemoryAllocation;
    /* 256-byte aligned as cudaMalloc's blocks, and exactly `size` long: under AddressSanitizer (build.py --asan) a
     * kernel's access past the end faults even where a GPU's allocation granularity would hide it */
    void *p = nullptr;
    if (posix_memalign(&p, 256, size)) return cudaErrorMemoryAllocation;
    std::memset(p, 0xff, size);   /* NaN in fp32 and bf16: reading memory nothing wrote shows */
    g_allocs[(uintptr_t)p] = size;
    g_allocated += size;
    *ptr = p;
    return cudaSuccess;
}

cudaError_t cudaFree(void *ptr) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    if (!ptr) return cudaSuccess;
    auto it = g_allocs.find((uintptr_t)ptr);
    if (it == g_allocs.end())
        return violation(cudaErrorInvalidValue, "cudaFree(%p): not the start of a cudaMalloc block (or freed twice)", ptr);
    g_allocated -= it->second;
    g_allocs.erase(it);
    free(ptr);
    return cudaSuccess;
}

static cudaError_t copy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind, const char *call) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    if (cudaError_t e = take_pending()) return e;
    if (n == 0) return cudaSuccess;
    const bool dd = find_alloc(dst, 0) != nullptr, sd = find_alloc(src, 0) != nullptr;
    if (kind == cudaMemcpyDefault) kind = dd ? (sd ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                                             : (sd ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
    const bool want_dd = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    const bool want_sd = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    static const char *names[] = {"HostToHost", "HostToDevice", "DeviceToHost", "DeviceToDevice", "Default"};
    if (want_dd && !device_range(dst, n, "destination", call)) return cudaErrorIllegalAddress;
    if (want_sd && !device_range(src, n, "source", call)) return cudaErrorIllegalAddress;
    if (!want_dd && dd)
        return violation(cudaErrorInvalidValue, "%s(%s): the destination %p is device memory", call, names[kind], dst);
    if (!want_sd && sd)
        return violation(cudaErrorInvalidValue, "%s(%s): the source %p is device memory", call, names[kind], src);
    std::memmove(dst, src, n);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind) {
    return copy(dst, src, n, kind, "cudaMemcpy");
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind kind, cudaStream_t) {
    return copy(dst, src, n, kind, "cudaMemcpyAsync");
}

cudaError_t cudaMemsetAsync(void *dst, int value, size_t n, cudaStream_t) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    if (!device_range(dst, n, "destination", "cudaMemsetAsync")) return cudaErrorIllegalAddress;
    std::memset(dst, value, n);
    return cudaSuccess;
}

cudaError_t cudaMemset(void *dst, int value, size_t n) { return cudaMemsetAsync(dst, value, n, 0); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned int) {
    *s = (cudaStream_t) new char[1];
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *s) { return cudaStreamCreateWithFlags(s, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t s) {
    delete[] (char *)s;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    return take_pending();
}

cudaError_t cudaStreamQuery(cudaStream_t) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    return take_pending();
}

cudaError_t cudaDeviceSynchronize(void) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    return take_pending();
}

cudaError_t cudaGetLastError(void) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    return take_pending();
}

cudaError_t cudaPeekAtLastError(void) { return g_pending; }

const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    default: return "cudaErrorUnknown";
    }
}

const char *cudaGetErrorString(cudaError_t e) {
    static thread_local std::string s;
    const char *base = e == cudaSuccess ? "no error" : e == cudaErrorMemoryAllocation ? "out of memory"
                                                                                         : cudaGetErrorName(e);
    s = base;
    if (e == g_message_code && e != cudaSuccess && !g_message.empty()) s += " (" + g_message + ")";
    return s.c_str();
}

}  // extern "C"

/* ---- products: the reference both libraries share ---------------------------------------------------------- */
namespace {

size_t dtype_size(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }
bool dtype_ok(cudaDataType_t t) { return t == CUDA_R_32F || t == CUDA_R_16BF; }

float load(const void *p, cudaDataType_t t, size_t i) {
    if (t == CUDA_R_32F) return ((const float *)p)[i];
    uint32_t b = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

void store(void *p, cudaDataType_t t, size_t i, double v) {
    if (t == CUDA_R_32F) {
        ((float *)p)[i] = (float)v;
        return;
    }
    ((__nv_bfloat16 *)p)[i] = __float2bfloat16((float)v);   /* round to nearest even, as the GPU's epilogue */
}

/* bytes spanned by a column-major rows x cols matrix with leading dimension ld, batch matrices stride apart */
size_t span_bytes(long long rows, long long cols, long long ld, int batch, long long stride, cudaDataType_t t) {
    if (rows <= 0 || cols <= 0) return 0;
    const long long last = (batch - 1) * stride + (cols - 1) * ld + rows - 1;
    return (size_t)(last + 1) * dtype_size(t);
}

bool overlaps(const void *a, size_t an, const void *b, size_t bn) {
    return an && bn && (uintptr_t)a < (uintptr_t)b + bn && (uintptr_t)b < (uintptr_t)a + an;
}

struct Operand {
    const void *p;
    cudaDataType_t t;
    long long rows, cols, ld, stride;   /* as stored, column-major */
};

/* D = alpha op(A) op(B) + beta C (+ bias[i] on every column), column-major, m x n, all `batch` matrices.
 * Returns an empty string, or the sentence naming what is wrong. */
std::string gemm(const char *call, bool ta, bool tb, int m, int n, int k, float alpha, Operand A, Operand B, float beta,
                 Operand C, void *D, cudaDataType_t dt, long long ldd, long long sD, int batch, const void *bias,
                 cudaDataType_t biast) {
    char buf[512];
    if (m < 0 || n < 0 || k < 0 || batch < 1) {
        snprintf(buf, sizeof buf, "%s: m=%d n=%d k=%d batch=%d", call, m, n, k, batch);
        return buf;
    }
    const Operand *ops[3] = {&A, &B, &C};
    const char *names[3] = {"A", "B", "C"};
    for (int i = 0; i < 3; i++)
        if (ops[i]->ld < std::max(1LL, ops[i]->rows)) {
            snprintf(buf, sizeof buf, "%s: ld%c=%lld is less than its %lld rows", call, "abc"[i], ops[i]->ld,
                     ops[i]->rows);
            return buf;
        }
    if (ldd < std::max(1, m)) {
        snprintf(buf, sizeof buf, "%s: ldd=%lld is less than m=%d", call, ldd, m);
        return buf;
    }
    if (!dtype_ok(A.t) || !dtype_ok(B.t) || !dtype_ok(C.t) || !dtype_ok(dt)) {
        snprintf(buf, sizeof buf, "%s: data types %d %d %d %d (the emulator has fp32 and bf16)", call, A.t, B.t, C.t, dt);
        return buf;
    }
    if (m == 0 || n == 0) return "";
    const size_t an = span_bytes(A.rows, A.cols, A.ld, batch, A.stride, A.t);
    const size_t bn = span_bytes(B.rows, B.cols, B.ld, batch, B.stride, B.t);
    const size_t cn = beta != 0.0f ? span_bytes(C.rows, C.cols, C.ld, batch, C.stride, C.t) : 0;
    const size_t dn = span_bytes(m, n, ldd, batch, sD, dt);
    const void *ptrs[4] = {A.p, B.p, C.p, D};
    const size_t spans[4] = {k ? an : 0, k ? bn : 0, cn, dn};
    const char *what[4] = {"matrix A", "matrix B", "matrix C", "matrix D"};   /* spans: as shape, ld and stride say */
    for (int i = 0; i < 4; i++) {
        const std::string problem = range_problem(ptrs[i], spans[i], what[i]);
        if (!problem.empty()) return std::string(call) + ": " + problem;
    }
    if (overlaps(D, dn, A.p, k ? an : 0) || overlaps(D, dn, B.p, k ? bn : 0)) {
        snprintf(buf, sizeof buf, "%s: the output D overlaps an input (A or B)", call);
        return buf;
    }
    if (cn && C.p != D && overlaps(D, dn, C.p, cn)) {
        snprintf(buf, sizeof buf, "%s: the output D partly overlaps C", call);
        return buf;
    }
    if (bias && !find_alloc(bias, (size_t)m * dtype_size(biast))) {
        snprintf(buf, sizeof buf, "%s: the bias %p (%d elements) is not inside one device block", call, bias, m);
        return buf;
    }
    if (shapes_only()) return "";
    std::vector<double> a((size_t)m * k), b((size_t)n * k);
    for (int bi = 0; bi < batch; bi++) {
        const size_t oa = (size_t)bi * A.stride, ob = (size_t)bi * B.stride;
        for (int i = 0; i < m; i++)   /* op(A)[i, p] */
            for (int p = 0; p < k; p++)
                a[(size_t)i * k + p] = load(A.p, A.t, oa + (ta ? (size_t)p + (size_t)i * A.ld : (size_t)i + (size_t)p * A.ld));
        for (int j = 0; j < n; j++)   /* op(B)[p, j] */
            for (int p = 0; p < k; p++)
                b[(size_t)j * k + p] = load(B.p, B.t, ob + (tb ? (size_t)j + (size_t)p * B.ld : (size_t)p + (size_t)j * B.ld));
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                const double *x = &a[(size_t)i * k], *y = &b[(size_t)j * k];
                double s4[4] = {0.0, 0.0, 0.0, 0.0};   /* four chains: the compiler can keep them in vector lanes */
                int p = 0;
                for (; p + 4 <= k; p += 4)
                    for (int q = 0; q < 4; q++) s4[q] += x[p + q] * y[p + q];
                double s = (s4[0] + s4[1]) + (s4[2] + s4[3]);
                for (; p < k; p++) s += x[p] * y[p];
                double v = (double)alpha * s;
                if (beta != 0.0f) v += (double)beta * load(C.p, C.t, (size_t)bi * C.stride + (size_t)i + (size_t)j * C.ld);
                if (bias) v += load(bias, biast, i);
                store(D, dt, (size_t)bi * sD + (size_t)i + (size_t)j * ldd, v);
            }
    }
    return "";
}

}  // namespace

/* ---- cuBLAS ------------------------------------------------------------------------------------------------- */
namespace {
struct BlasHandle { cudaStream_t stream = 0; void *ws = nullptr; size_t ws_bytes = 0; };
std::string g_blas_message;

cublasStatus_t g_blas_message_code = CUBLAS_STATUS_SUCCESS;

cublasStatus_t blas_fail(cublasStatus_t st, const std::string &msg) {
    vreport_str(msg);
    g_blas_message = g_message;
    g_blas_message_code = st;
    return st;
}
}  // namespace

extern "C" {

cublasStatus_t cublasCreate(cublasHandle_t *h) {
    *h = (cublasHandle_t) new BlasHandle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t h) {
    delete (BlasHandle *)h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
    ((BlasHandle *)h)->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void *ws, size_t bytes) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    if (bytes && !find_alloc(ws, bytes)) return blas_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasSetWorkspace: not device memory");
    ((BlasHandle *)h)->ws = ws;
    ((BlasHandle *)h)->ws_bytes = bytes;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }

const char *cublasGetStatusName(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

const char *cublasGetStatusString(cublasStatus_t s) {
    static thread_local std::string out;
    out = cublasGetStatusName(s);
    if (s == g_blas_message_code && s != CUBLAS_STATUS_SUCCESS && !g_blas_message.empty()) out += " (" + g_blas_message + ")";
    return out.c_str();
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                                          int k, const void *alpha, const void *A, cudaDataType Atype, int lda,
                                          long long int strideA, const void *B, cudaDataType Btype, int ldb,
                                          long long int strideB, const void *beta, void *C, cudaDataType Ctype, int ldc,
                                          long long int strideC, int batchCount, cublasComputeType_t computeType,
                                          cublasGemmAlgo_t) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    if (computeType != CUBLAS_COMPUTE_32F)
        return blas_fail(CUBLAS_STATUS_NOT_SUPPORTED, "cublasGemmStridedBatchedEx: compute type other than CUBLAS_COMPUTE_32F");
    if (Atype != Btype) return blas_fail(CUBLAS_STATUS_NOT_SUPPORTED, "cublasGemmStridedBatchedEx: Atype != Btype");
    const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
    Operand a{A, Atype, ta ? k : m, ta ? m : k, lda, strideA};
    Operand b{B, Btype, tb ? n : k, tb ? k : n, ldb, strideB};
    Operand c{C, Ctype, m, n, ldc, strideC};
    const std::string err = gemm("cublasGemmStridedBatchedEx", ta, tb, m, n, k, *(const float *)alpha, a, b,
                                 *(const float *)beta, c, C, Ctype, ldc, strideC, batchCount, nullptr, Ctype);
    return err.empty() ? CUBLAS_STATUS_SUCCESS : blas_fail(CUBLAS_STATUS_INVALID_VALUE, err);
}

}  // extern "C"

/* ---- cuBLASLt ---------------------------------------------------------------------------------------------- */
namespace {
struct LtDesc {
    cublasComputeType_t compute;
    cudaDataType_t scale;
    cublasOperation_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    const void *bias = nullptr;
    int bias_type = -1;   /* -1: D's type */
    int32_t pointer_mode = 0;
};
struct LtLayout {
    cudaDataType_t t;
    uint64_t rows, cols;
    int64_t ld;
    int32_t batch = 1;
    int64_t stride = 0;
    int32_t order = CUBLASLT_ORDER_COL;
};
struct LtPref { uint64_t ws = 0; uint32_t align[4] = {256, 256, 256, 256}; };

template <typename V> cublasStatus_t set_value(V *dst, const void *buf, size_t n, const char *what) {
    if (n != sizeof *dst) return blas_fail(CUBLAS_STATUS_INVALID_VALUE, std::string(what) + ": attribute of the wrong size");
    std::memcpy(dst, buf, sizeof *dst);
    return CUBLAS_STATUS_SUCCESS;
}

/* the alignment in bytes every matrix of a batch starts at */
uint32_t alignment_of(const void *p, const LtLayout &l) {
    uintptr_t a = (uintptr_t)p | (uintptr_t)(l.ld * (int64_t)dtype_size(l.t));
    if (l.batch > 1) a |= (uintptr_t)(l.stride * (int64_t)dtype_size(l.t));
    uint32_t al = 256;
    while (al > 1 && a % al) al >>= 1;
    return al;
}

/* The emulated heuristic: algorithms need 16-byte alignment of every operand (BQ_EMU_LT_MIN_ALIGN to change it), so
 * awkward test shapes take the backend's cuBLAS fallback as they may on a GPU. */
uint32_t lt_min_align() {
    const char *s = getenv("BQ_EMU_LT_MIN_ALIGN");
    return s && *s ? (uint32_t)atoi(s) : 16u;
}
}  // namespace

extern "C" {

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    *h = (cublasLtHandle_t) new char[1];
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    delete[] (char *)h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute, cudaDataType_t scale) {
    if (compute != CUBLAS_COMPUTE_32F || scale != CUDA_R_32F)
        return blas_fail(CUBLAS_STATUS_NOT_SUPPORTED, "cublasLtMatmulDescCreate: the emulator has CUBLAS_COMPUTE_32F with fp32 scales");
    LtDesc *x = new LtDesc;
    x->compute = compute;
    x->scale = scale;
    *d = (cublasLtMatmulDesc_t)x;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    delete (LtDesc *)d;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const void *buf,
                                              size_t n) {
    LtDesc *x = (LtDesc *)d;
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA: return set_value(&x->ta, buf, n, "CUBLASLT_MATMUL_DESC_TRANSA");
    case CUBLASLT_MATMUL_DESC_TRANSB: return set_value(&x->tb, buf, n, "CUBLASLT_MATMUL_DESC_TRANSB");
    case CUBLASLT_MATMUL_DESC_EPILOGUE: {
        cublasStatus_t st = set_value(&x->epilogue, buf, n, "CUBLASLT_MATMUL_DESC_EPILOGUE");
        if (st == CUBLAS_STATUS_SUCCESS && x->epilogue != CUBLASLT_EPILOGUE_DEFAULT && x->epilogue != CUBLASLT_EPILOGUE_BIAS)
            return blas_fail(CUBLAS_STATUS_NOT_SUPPORTED, "CUBLASLT_MATMUL_DESC_EPILOGUE: the emulator has DEFAULT and BIAS");
        return st;
    }
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return set_value(&x->bias, buf, n, "CUBLASLT_MATMUL_DESC_BIAS_POINTER");
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: return set_value(&x->bias_type, buf, n, "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE");
    case CUBLASLT_MATMUL_DESC_POINTER_MODE: return set_value(&x->pointer_mode, buf, n, "CUBLASLT_MATMUL_DESC_POINTER_MODE");
    default:
        return blas_fail(CUBLAS_STATUS_INVALID_VALUE,
                         "cublasLtMatmulDescSetAttribute: attribute " + std::to_string((int)attr) + " not modelled by the emulator");
    }
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType type, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
    LtLayout *x = new LtLayout;
    x->t = type;
    x->rows = rows;
    x->cols = cols;
    x->ld = ld;
    *l = (cublasLtMatrixLayout_t)x;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    delete (LtLayout *)l;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t attr,
                                                const void *buf, size_t n) {
    LtLayout *x = (LtLayout *)l;
    switch (attr) {
    case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: return set_value(&x->batch, buf, n, "CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT");
    case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET:
        return set_value(&x->stride, buf, n, "CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET");
    case CUBLASLT_MATRIX_LAYOUT_ORDER: return set_value(&x->order, buf, n, "CUBLASLT_MATRIX_LAYOUT_ORDER");
    default:
        return blas_fail(CUBLAS_STATUS_INVALID_VALUE,
                         "cublasLtMatrixLayoutSetAttribute: attribute " + std::to_string((int)attr) + " not modelled");
    }
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = (cublasLtMatmulPreference_t) new LtPref;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    delete (LtPref *)p;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void *buf, size_t n) {
    LtPref *x = (LtPref *)p;
    switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return set_value(&x->ws, buf, n, "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return set_value(&x->align[0], buf, n, "MIN_ALIGNMENT_A_BYTES");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return set_value(&x->align[1], buf, n, "MIN_ALIGNMENT_B_BYTES");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return set_value(&x->align[2], buf, n, "MIN_ALIGNMENT_C_BYTES");
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return set_value(&x->align[3], buf, n, "MIN_ALIGNMENT_D_BYTES");
    default:
        return blas_fail(CUBLAS_STATUS_INVALID_VALUE,
                         "cublasLtMatmulPreferenceSetAttribute: attribute " + std::to_string((int)attr) + " not modelled");
    }
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t,
                                              cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t *results, int *found) {
    const LtPref *p = (const LtPref *)pref;
    uint32_t al = *std::min_element(p->align, p->align + 4);
    *found = 0;
    if (requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
    if (al < lt_min_align()) return CUBLAS_STATUS_NOT_SUPPORTED;
    std::memset(&results[0], 0, sizeof results[0]);
    results[0].algo.data[0] = al;   /* the alignment this "algorithm" assumes of every operand */
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *found = 1;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t desc, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t Adesc, const void *B, cublasLtMatrixLayout_t Bdesc, const void *beta,
                              const void *C, cublasLtMatrixLayout_t Cdesc, void *D, cublasLtMatrixLayout_t Ddesc,
                              const cublasLtMatmulAlgo_t *algo, void *, size_t, cudaStream_t) {
    std::lock_guard<std::recursive_mutex> lock(g_mu);
    const LtDesc &d = *(const LtDesc *)desc;
    const LtLayout &la = *(const LtLayout *)Adesc, &lb = *(const LtLayout *)Bdesc, &lc = *(const LtLayout *)Cdesc,
                   &ld = *(const LtLayout *)Ddesc;
    const bool ta = d.ta != CUBLAS_OP_N, tb = d.tb != CUBLAS_OP_N;
    const long long m = (long long)ld.rows, n = (long long)ld.cols, k = (long long)(ta ? la.rows : la.cols);
    char buf[512];
    /* shapes: op(A) m x k, op(B) k x n, C and D m x n, one batch count (cuBLASLt's contract) */
    if ((long long)(ta ? la.cols : la.rows) != m || (long long)(tb ? lb.cols : lb.rows) != k ||
        (long long)(tb ? lb.rows : lb.cols) != n || (long long)lc.rows != m || (long long)lc.cols != n) {
        snprintf(buf, sizeof buf, "cublasLtMatmul: shapes disagree: op(A) %llux%llu, op(B) %llux%llu, C %llux%llu, D %llux%llu",
                 (unsigned long long)(ta ? la.cols : la.rows), (unsigned long long)(ta ? la.rows : la.cols),
                 (unsigned long long)(tb ? lb.cols : lb.rows), (unsigned long long)(tb ? lb.rows : lb.cols),
                 (unsigned long long)lc.rows, (unsigned long long)lc.cols, (unsigned long long)ld.rows,
                 (unsigned long long)ld.cols);
        return blas_fail(CUBLAS_STATUS_INVALID_VALUE, buf);
    }
    if (la.batch != ld.batch || lb.batch != ld.batch || lc.batch != ld.batch)
        return blas_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmul: the layouts' batch counts differ");
    if (la.order != CUBLASLT_ORDER_COL || lb.order != CUBLASLT_ORDER_COL || lc.order != CUBLASLT_ORDER_COL ||
        ld.order != CUBLASLT_ORDER_COL)
        return blas_fail(CUBLAS_STATUS_NOT_SUPPORTED, "cublasLtMatmul: the emulator has column-major layouts only");
    if (la.t != lb.t) return blas_fail(CUBLAS_STATUS_NOT_SUPPORTED, "cublasLtMatmul: A and B of different types");
    if (C != D && (lc.ld != ld.ld || lc.t != ld.t))
        return blas_fail(CUBLAS_STATUS_NOT_SUPPORTED, "cublasLtMatmul: C and D differ in type or ld");
    if (d.epilogue == CUBLASLT_EPILOGUE_BIAS && !d.bias)
        return blas_fail(CUBLAS_STATUS_INVALID_VALUE, "cublasLtMatmul: CUBLASLT_EPILOGUE_BIAS without a bias pointer");
    if (d.epilogue == CUBLASLT_EPILOGUE_BIAS && ld.batch > 1)
        return blas_fail(CUBLAS_STATUS_NOT_SUPPORTED, "cublasLtMatmul: a bias with a batch (no bias batch stride set)");
    /* the algorithm the heuristic picked assumed an alignment: a pointer below it is refused at launch */
    const uint32_t need = algo ? (uint32_t)algo->data[0] : 1;
    if (alignment_of(A, la) < need || alignment_of(B, lb) < need || alignment_of(C, lc) < need ||
        alignment_of(D, ld) < need)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    const float al = *(const float *)alpha, be = *(const float *)beta;
    Operand a{A, la.t, (long long)la.rows, (long long)la.cols, la.ld, la.stride};
    Operand b{B, lb.t, (long long)lb.rows, (long long)lb.cols, lb.ld, lb.stride};
    Operand c{C, lc.t, (long long)lc.rows, (long long)lc.cols, lc.ld, lc.stride};
    const cudaDataType_t bt = d.bias_type >= 0 ? (cudaDataType_t)d.bias_type : ld.t;
    const std::string err = gemm("cublasLtMatmul", ta, tb, (int)m, (int)n, (int)k, al, a, b, be, c, D, ld.t, ld.ld, ld.stride,
                                 ld.batch, d.epilogue == CUBLASLT_EPILOGUE_BIAS ? d.bias : nullptr, bt);
    return err.empty() ? CUBLAS_STATUS_SUCCESS : blas_fail(CUBLAS_STATUS_INVALID_VALUE, err);
}

}  // extern "C"
