/* Error messages and device queries of the CUDA backend. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

static thread_local char g_error[1024];

extern "C" const char *bq_cuda_last_error(void) { return g_error; }

extern "C" const char *bq_cuda_status_string(int status) {
    switch (status) {
    case BQ_OK: return "ok";
    case BQ_ERR_NOMEM: return "out of memory";
    case BQ_ERR_INDEX: return "index out of range";
    case BQ_ERR_ARG: return "invalid argument";
    case BQ_ERR_CUDA: return "CUDA error";
    case BQ_ERR_CUBLAS: return "cuBLAS error";
    case BQ_ERR_DEVICE: return "no usable CUDA device";
    case BQ_ERR_NCCL: return "NCCL error";
    default: return "unknown status";
    }
}

extern "C" int bq_cuda_fail(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return status;
}

int bq_cuda_fail_cuda(cudaError_t e, const char *call, const char *file, int line) {
    cudaGetLastError();   /* clear a non-sticky error so the next call starts clean */
    return bq_cuda_fail(e == cudaErrorMemoryAllocation ? BQ_ERR_NOMEM : BQ_ERR_CUDA, "%s failed: %s (%s) at %s:%d",
                        call, cudaGetErrorString(e), cudaGetErrorName(e), file, line);
}

int bq_cuda_fail_cublas(cublasStatus_t s, const char *call, const char *file, int line) {
    return bq_cuda_fail(s == CUBLAS_STATUS_ALLOC_FAILED ? BQ_ERR_NOMEM : BQ_ERR_CUBLAS, "%s failed: %s (%s) at %s:%d",
                        call, cublasGetStatusString(s), cublasGetStatusName(s), file, line);
}

int bq_cuda_sync_each_launch(void) {
    static int flag = -1;   /* read once; a benign race: every thread computes the same value */
    if (flag < 0) {
        const char *v = getenv("BERTQA_CUDA_SYNC");
        flag = v && *v && strcmp(v, "0") != 0;
    }
    return flag;
}

extern "C" void bq_cuda_versions(int *runtime, int *driver) {
    *runtime = 0;
    *driver = 0;
    cudaRuntimeGetVersion(runtime);
    cudaDriverGetVersion(driver);   /* 0 when no driver is installed */
}

extern "C" int bq_cuda_device_count(char *reason, size_t n) {
    int count = 0, usable = 0;
    if (reason && n) reason[0] = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        cudaGetLastError();
        int driver = 0;
        cudaDriverGetVersion(&driver);
        if (reason && !driver)
            snprintf(reason, n, "no NVIDIA driver found (libcuda.so.1 is not installed or not on the loader path)");
        else if (reason)
            snprintf(reason, n, "cudaGetDeviceCount failed: %s (%s), driver supports CUDA %d.%d", cudaGetErrorString(e),
                     cudaGetErrorName(e), driver / 1000, driver % 1000 / 10);
        return 0;
    }
    for (int d = 0; d < count; d++) {
        int major = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d) == cudaSuccess && major >= 8) usable++;
    }
    if (!usable && reason) {
        if (!count) snprintf(reason, n, "no CUDA device found");
        else snprintf(reason, n, "%d CUDA device(s), none of compute capability 8.0 or newer (bf16 needs Ampere+)", count);
    }
    return usable;
}

extern "C" int bq_cuda_device_info(int dev, char *name, size_t n, int *major, int *minor, size_t *total_mem, int *sms) {
    cudaDeviceProp prop;
    CUDA_TRY(cudaGetDeviceProperties(&prop, dev));
    snprintf(name, n, "%s", prop.name);
    *major = prop.major;
    *minor = prop.minor;
    *total_mem = prop.totalGlobalMem;
    *sms = prop.multiProcessorCount;
    return BQ_OK;
}
