/* NCCL for the data-parallel gradient all-reduce, loaded at run time (bertqa_cuda.h, "NCCL").
 *
 * libnccl.so.2 is opened with dlopen() on first use and its functions are resolved with dlsym(): the package builds,
 * imports and trains on one GPU without NCCL installed, and takes whichever NCCL the machine has (the
 * nvidia-nccl-cu13 wheel, a system or toolkit copy). The toolkit's nccl.h gives the types and constants only.
 * One rank per process (llm.c's scheme): rank 0 makes the unique id, the caller sends it to the others (over MPI),
 * every rank makes its communicator, and each step sums the flat fp32 gradient buffer in place on the engine's
 * stream.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>
#ifdef BERTQA_HAVE_NCCL_H
#include <nccl.h>
#else
/* No nccl.h at build time (setup.py found none): the few types used here, as NCCL 2.x defines them (stable ABI). */
typedef struct ncclComm *ncclComm_t;
typedef struct { char internal[128]; } ncclUniqueId;
typedef enum { ncclSuccess = 0, ncclInProgress = 7 } ncclResult_t;
typedef enum { ncclFloat32 = 7 } ncclDataType_t;
typedef enum { ncclSum = 0 } ncclRedOp_t;
#endif

#include "bertqa_cuda.h"

_Static_assert(sizeof(ncclUniqueId) == BQ_NCCL_ID_BYTES, "NCCL unique id size");

/* The functions bertqa uses, resolved from the library. */
static struct {
    void *handle;
    char path[1024];
    ncclResult_t (*GetVersion)(int *);
    ncclResult_t (*GetUniqueId)(ncclUniqueId *);
    ncclResult_t (*CommInitRank)(ncclComm_t *, int, ncclUniqueId, int);
    ncclResult_t (*AllReduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
    ncclResult_t (*CommDestroy)(ncclComm_t);
    ncclResult_t (*CommAbort)(ncclComm_t);
    const char *(*GetErrorString)(ncclResult_t);
    ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t *);
    const char *(*GetLastError)(ncclComm_t);   /* NCCL 2.13+; NULL before */
} nccl;
static pthread_mutex_t nccl_lock = PTHREAD_MUTEX_INITIALIZER;

struct bq_nccl_comm {
    ncclComm_t comm;   /* NULL once closed */
    int nranks, rank, dev;
    int failed;        /* an NCCL call failed: only abort / free are left */
};

/* Opens `path` and resolves every function; on failure appends "path: why" to tried (n bytes). */
static int try_open(const char *path, char *tried, size_t n) {
    const size_t used = strlen(tried);
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *why = dlerror();
        snprintf(tried + used, n - used, "%s%s", used ? "; " : "", why ? why : path);
        return 0;
    }
    struct { void **dst; const char *name; int required; } syms[] = {
        {(void **)&nccl.GetVersion, "ncclGetVersion", 1},
        {(void **)&nccl.GetUniqueId, "ncclGetUniqueId", 1},
        {(void **)&nccl.CommInitRank, "ncclCommInitRank", 1},
        {(void **)&nccl.AllReduce, "ncclAllReduce", 1},
        {(void **)&nccl.CommDestroy, "ncclCommDestroy", 1},
        {(void **)&nccl.CommAbort, "ncclCommAbort", 1},
        {(void **)&nccl.GetErrorString, "ncclGetErrorString", 1},
        {(void **)&nccl.CommGetAsyncError, "ncclCommGetAsyncError", 1},
        {(void **)&nccl.GetLastError, "ncclGetLastError", 0},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        *syms[i].dst = dlsym(h, syms[i].name);
        if (!*syms[i].dst && syms[i].required) {
            snprintf(tried + used, n - used, "%s%s has no %s (NCCL 2.4 or newer is needed)", used ? "; " : "", path,
                     syms[i].name);
            dlclose(h);
            memset(&nccl, 0, sizeof nccl);
            return 0;
        }
    }
    Dl_info info;   /* the file the loader chose, for messages and nccl_library() */
    const char *file = dladdr((void *)nccl.GetVersion, &info) && info.dli_fname ? info.dli_fname : path;
    snprintf(nccl.path, sizeof nccl.path, "%s", file);
    nccl.handle = h;
    return 1;
}

int bq_nccl_load(const char *wheel_lib) {
    pthread_mutex_lock(&nccl_lock);
    int st = BQ_OK;
    if (!nccl.handle) {
        char tried[900] = "";
        const char *env = getenv("BERTQA_NCCL_LIBRARY");
        if (env && *env) {
            if (!try_open(env, tried, sizeof tried))
                st = bq_cuda_fail(BQ_ERR_NCCL, "NCCL could not be loaded from BERTQA_NCCL_LIBRARY=%s: %s", env, tried);
        }
#ifdef BQ_CUDA_EMU   /* cuda/emu: the wheel's or the system's libnccl would need a driver and a GPU */
        else {
            st = bq_cuda_fail(BQ_ERR_NCCL, "NCCL does not run under the CPU emulator of the CUDA backend");
        }
#else
        else if (!(wheel_lib && *wheel_lib && try_open(wheel_lib, tried, sizeof tried)) &&
                   !try_open("libnccl.so.2", tried, sizeof tried)) {
            st = bq_cuda_fail(BQ_ERR_NCCL, "NCCL not found (tried: %s): install the nvidia-nccl-cu13 wheel or point "
                              "BERTQA_NCCL_LIBRARY at a libnccl.so.2", tried);
        }
#endif
    }
    pthread_mutex_unlock(&nccl_lock);
    return st;
}

const char *bq_nccl_library(void) { return nccl.path; }

/* The message of a failed NCCL call: NCCL's error string, and its last error text when it has one. */
static int nccl_fail(ncclResult_t r, const char *call, ncclComm_t comm) {
    const char *last = nccl.GetLastError ? nccl.GetLastError(comm) : NULL;
    return bq_cuda_fail(BQ_ERR_NCCL, "%s failed: %s (ncclResult_t %d)%s%s", call, nccl.GetErrorString(r), (int)r,
                        last && *last ? ": " : "", last && *last ? last : "");
}

int bq_nccl_version(int *version) {
    int st = bq_nccl_load(NULL);
    if (st) return st;
    ncclResult_t r = nccl.GetVersion(version);
    return r == ncclSuccess ? BQ_OK : nccl_fail(r, "ncclGetVersion", NULL);
}

int bq_nccl_unique_id(unsigned char id[BQ_NCCL_ID_BYTES]) {
    int st = bq_nccl_load(NULL);
    if (st) return st;
    ncclUniqueId u;
    ncclResult_t r = nccl.GetUniqueId(&u);
    if (r != ncclSuccess) return nccl_fail(r, "ncclGetUniqueId", NULL);
    memcpy(id, u.internal, BQ_NCCL_ID_BYTES);
    return BQ_OK;
}

static int cuda_fail(cudaError_t e, const char *call, int line) {
    cudaGetLastError();
    return bq_cuda_fail(e == cudaErrorMemoryAllocation ? BQ_ERR_NOMEM : BQ_ERR_CUDA, "%s failed: %s (%s) at %s:%d",
                        call, cudaGetErrorString(e), cudaGetErrorName(e), __FILE__, line);
}
#define CUDA_FAIL(e, call) cuda_fail((e), (call), __LINE__)

int bq_nccl_comm_init(bq_nccl_comm **out, const unsigned char id[BQ_NCCL_ID_BYTES], int nranks, int rank, int dev) {
    *out = NULL;
    if (nranks < 1) return bq_cuda_fail(BQ_ERR_ARG, "nranks must be >= 1, got %d", nranks);
    if (rank < 0 || rank >= nranks) return bq_cuda_fail(BQ_ERR_ARG, "rank %d is outside [0, %d)", rank, nranks);
    if (dev < 0) return bq_cuda_fail(BQ_ERR_ARG, "device must be >= 0, got %d", dev);
    int st = bq_nccl_load(NULL);
    if (st) return st;
    char reason[256];
    const int ndev = bq_cuda_device_count(reason, sizeof reason);
    if (ndev == 0) return bq_cuda_fail(BQ_ERR_DEVICE, "%s", reason);
    if (dev >= ndev) return bq_cuda_fail(BQ_ERR_DEVICE, "CUDA device %d requested, %d usable", dev, ndev);
    cudaError_t e = cudaSetDevice(dev);
    if (e != cudaSuccess) return CUDA_FAIL(e, "cudaSetDevice");
    bq_nccl_comm *c = (bq_nccl_comm *)calloc(1, sizeof *c);
    if (!c) return bq_cuda_fail(BQ_ERR_NOMEM, "out of host memory");
    ncclUniqueId u;
    memcpy(u.internal, id, BQ_NCCL_ID_BYTES);
    ncclResult_t r = nccl.CommInitRank(&c->comm, nranks, u, rank);
    if (r != ncclSuccess) {
        free(c);
        return nccl_fail(r, "ncclCommInitRank", NULL);
    }
    c->nranks = nranks;
    c->rank = rank;
    c->dev = dev;
    *out = c;
    return BQ_OK;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int bq_nccl_allreduce_sum(bq_nccl_comm *c, float *buf, size_t n, void *stream, int dev, double timeout_s) {
    if (!c->comm) return bq_cuda_fail(BQ_ERR_ARG, "the NCCL communicator is closed");
    if (c->failed) return bq_cuda_fail(BQ_ERR_ARG, "the NCCL communicator failed before: abort() it and make another");
    if (dev != c->dev)
        return bq_cuda_fail(BQ_ERR_ARG, "the engine is on CUDA device %d, the communicator on device %d", dev, c->dev);
    cudaError_t e = cudaSetDevice(c->dev);
    if (e != cudaSuccess) return CUDA_FAIL(e, "cudaSetDevice");
    cudaStream_t s = (cudaStream_t)stream;
    ncclResult_t r = nccl.AllReduce(buf, buf, n, ncclFloat32, ncclSum, c->comm, s);
    if (r != ncclSuccess) {
        c->failed = 1;
        return nccl_fail(r, "ncclAllReduce", c->comm);
    }
    /* wait for the stream, watching for an error NCCL reports from another rank or its proxy thread */
    const double t0 = now_s();
    const struct timespec pause = {0, 50 * 1000};
    for (;;) {
        e = cudaStreamQuery(s);
        ncclResult_t ar = ncclSuccess;
        r = nccl.CommGetAsyncError(c->comm, &ar);
        if (r != ncclSuccess || (ar != ncclSuccess && ar != ncclInProgress)) {
            c->failed = 1;
            return nccl_fail(r != ncclSuccess ? r : ar, "ncclAllReduce (asynchronous error)", c->comm);
        }
        if (e == cudaSuccess) return BQ_OK;
        if (e != cudaErrorNotReady) {
            c->failed = 1;
            return CUDA_FAIL(e, "cudaStreamQuery after ncclAllReduce");
        }
        if (timeout_s > 0 && now_s() - t0 > timeout_s) {
            nccl.CommAbort(c->comm);
            c->comm = NULL;
            return bq_cuda_fail(BQ_ERR_NCCL, "ncclAllReduce of %zu floats did not finish within %g s (a rank missing "
                                "or stuck?): the communicator was aborted", n, timeout_s);
        }
        nanosleep(&pause, NULL);
    }
}

int bq_nccl_comm_close(bq_nccl_comm *c, int abort) {
    if (!c->comm) return BQ_OK;
    cudaSetDevice(c->dev);
    ncclComm_t comm = c->comm;
    c->comm = NULL;
    ncclResult_t r = abort || c->failed ? nccl.CommAbort(comm) : nccl.CommDestroy(comm);
    return r == ncclSuccess ? BQ_OK : nccl_fail(r, abort || c->failed ? "ncclCommAbort" : "ncclCommDestroy", NULL);
}

int bq_nccl_comm_closed(const bq_nccl_comm *c) { return c->comm == NULL; }

void bq_nccl_comm_free(bq_nccl_comm *c) {
    if (!c) return;
    bq_nccl_comm_close(c, 1);
    free(c);
}
