/* Matrix products through cuBLASLt (with the bias added in its epilogue), falling back to cublasGemmStridedBatchedEx
 * where cuBLASLt offers no algorithm (odd leading dimensions, misaligned pointers of tiny test shapes); and the
 * deterministic column sums that give bias gradients.
 *
 * Row-major to cuBLAS's column-major: a row-major X[r,c] with leading dimension ld is the column-major X^T[c,r],
 * so C = op(A) op(B) is computed as C^T = op(B)^T op(A)^T: the operands swap and M, N swap.
 *
 * GELU is not fused into the epilogue: cuBLASLt's GELU is the tanh approximation, BERT's is the erf form.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.cuh"

#define BQ_GEMM_PLANS 128
#define BQ_GEMM_WORKSPACE (32u << 20)   /* 32 MiB, what cuBLAS recommends for Hopper */

struct bq_gemm_key {
    int transA, transB, M, N, K, lda, ldb, ldc, batch, bias;
    int ta, tb, tc, alignA, alignB, alignC;
    long long sA, sB, sC;
};

struct bq_gemm_plan {
    bq_gemm_key key;
    int valid;     /* 1: cuBLASLt algorithm found; 0: use the cuBLAS fallback */
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
};

int bq_gemm_init(bq_gemm *g, cudaStream_t stream) {
    memset(g, 0, sizeof *g);
    g->stream = stream;
    CUBLAS_TRY(cublasLtCreate(&g->lt));
    CUBLAS_TRY(cublasCreate(&g->blas));
    CUBLAS_TRY(cublasSetStream(g->blas, stream));
    /* fp32 stays fp32: the compute type CUBLAS_COMPUTE_32F with the default math mode never uses TF32 (the fp32
     * mode is for parity with the CPU) */
    CUBLAS_TRY(cublasSetMathMode(g->blas, CUBLAS_DEFAULT_MATH));
    g->workspace_bytes = BQ_GEMM_WORKSPACE;
    CUDA_TRY(cudaMalloc(&g->workspace, g->workspace_bytes));
    /* one stream, one workspace shared by both libraries (they run one after another on the stream) */
    CUBLAS_TRY(cublasSetWorkspace(g->blas, g->workspace, g->workspace_bytes));
    g->plans = (bq_gemm_plan *)calloc(BQ_GEMM_PLANS, sizeof(bq_gemm_plan));
    if (!g->plans) return bq_cuda_fail(BQ_ERR_NOMEM, "out of host memory for the matmul plan cache");
    return BQ_OK;
}

static void plan_release(bq_gemm_plan *p) {
    if (p->desc) cublasLtMatmulDescDestroy(p->desc);
    if (p->la) cublasLtMatrixLayoutDestroy(p->la);
    if (p->lb) cublasLtMatrixLayoutDestroy(p->lb);
    if (p->lc) cublasLtMatrixLayoutDestroy(p->lc);
    memset(p, 0, sizeof *p);
}

void bq_gemm_destroy(bq_gemm *g) {
    if (g->plans) {
        for (int i = 0; i < g->nplans; i++) plan_release(&g->plans[i]);
        free(g->plans);
    }
    if (g->workspace) cudaFree(g->workspace);
    if (g->blas) cublasDestroy(g->blas);
    if (g->lt) cublasLtDestroy(g->lt);
    memset(g, 0, sizeof *g);
}

static size_t type_size(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

/* Largest power of two (<= 256) dividing the address, the leading dimension in bytes and, when batched, the
 * batch stride in bytes: what the kernels cuBLASLt picks may assume about every matrix of the batch. */
static int alignment(const void *p, int ld, long long stride, int batch, size_t es) {
    uintptr_t a = (uintptr_t)p | (uintptr_t)((size_t)ld * es);
    if (batch > 1) a |= (uintptr_t)((size_t)stride * es);
    int al = 256;
    while (al > 1 && (a % (uintptr_t)al)) al >>= 1;
    return al;
}

static int plan_create(bq_gemm *g, bq_gemm_plan *p, const bq_gemm_key *k, const void *bias) {
    /* column-major problem: D^T[N,M] = op(B)^T op(A)^T; "a" below is the row-major B, "b" the row-major A */
    const cublasOperation_t opa = k->transB ? CUBLAS_OP_T : CUBLAS_OP_N, opb = k->transA ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int32_t batch = k->batch;
    p->key = *k;
    p->valid = 0;
    CUBLAS_TRY(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
    CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
    if (k->bias) {
        cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
        CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
        /* the heuristic reads the pointer's alignment (every call's bias is 16-byte aligned, see bq_matmul) */
        CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    /* stored shapes (column-major rows x cols) */
    CUBLAS_TRY(cublasLtMatrixLayoutCreate(&p->la, (cudaDataType_t)k->tb, k->transB ? k->K : k->N,
                                          k->transB ? k->N : k->K, k->ldb));
    CUBLAS_TRY(cublasLtMatrixLayoutCreate(&p->lb, (cudaDataType_t)k->ta, k->transA ? k->M : k->K,
                                          k->transA ? k->K : k->M, k->lda));
    CUBLAS_TRY(cublasLtMatrixLayoutCreate(&p->lc, (cudaDataType_t)k->tc, k->N, k->M, k->ldc));
    if (batch > 1) {
        const long long sa = k->sB, sb = k->sA, sc = k->sC;
        CUBLAS_TRY(cublasLtMatrixLayoutSetAttribute(p->la, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
        CUBLAS_TRY(cublasLtMatrixLayoutSetAttribute(p->lb, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
        CUBLAS_TRY(cublasLtMatrixLayoutSetAttribute(p->lc, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof batch));
        CUBLAS_TRY(cublasLtMatrixLayoutSetAttribute(p->la, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sa, sizeof sa));
        CUBLAS_TRY(cublasLtMatrixLayoutSetAttribute(p->lb, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sb, sizeof sb));
        CUBLAS_TRY(cublasLtMatrixLayoutSetAttribute(p->lc, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &sc, sizeof sc));
    }
    cublasLtMatmulPreference_t pref;
    CUBLAS_TRY(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = g->workspace_bytes;
    const uint32_t aa = (uint32_t)k->alignB, ab = (uint32_t)k->alignA, ac = (uint32_t)k->alignC;
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof aa);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof ab);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ac, sizeof ac);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ac, sizeof ac);
    if (st != CUBLAS_STATUS_SUCCESS) {
        cublasLtMatmulPreferenceDestroy(pref);
        return bq_cuda_fail_cublas(st, "cublasLtMatmulPreferenceSetAttribute", __FILE__, __LINE__);
    }
    cublasLtMatmulHeuristicResult_t result;
    int found = 0;
    st = cublasLtMatmulAlgoGetHeuristic(g->lt, p->desc, p->la, p->lb, p->lc, p->lc, pref, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    /* NOT_SUPPORTED or no result: this shape goes to the cuBLAS fallback (not an error) */
    if (st == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS) {
        p->algo = result.algo;
        p->valid = 1;
    }
    return BQ_OK;
}

static int find_plan(bq_gemm *g, const bq_gemm_key *k, const void *bias, bq_gemm_plan **out) {
    for (int i = 0; i < g->nplans; i++)
        if (!memcmp(&g->plans[i].key, k, sizeof *k)) {
            *out = &g->plans[i];
            return BQ_OK;
        }
    bq_gemm_plan *p;
    if (g->nplans < BQ_GEMM_PLANS) {
        p = &g->plans[g->nplans++];
    } else {   /* full: replace plans round-robin */
        p = &g->plans[g->next_evict];
        g->next_evict = (g->next_evict + 1) % BQ_GEMM_PLANS;
        plan_release(p);
    }
    int st = plan_create(g, p, k, bias);
    if (st) {
        plan_release(p);   /* leaves an all-zero key, which no real call matches */
        return st;
    }
    *out = p;
    return BQ_OK;
}

/* C[i,j] += bias[j] over [M,N] with leading dimension ldc */
template <typename T> __global__ void add_bias_kernel(T *C, const T *bias, int M, int N, int ldc) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)M * N) return;
    const int r = (int)(i / N), c = (int)(i % N);
    T *x = C + (size_t)r * ldc + c;
    *x = from_f<T>(to_f(*x) + to_f(bias[c]));
}

int bq_matmul(bq_gemm *g, bool transA, bool transB, int M, int N, int K, float alpha, const void *A,
              cudaDataType_t ta, int lda, long long sA, const void *B, cudaDataType_t tb, int ldb, long long sB,
              float beta, void *C, cudaDataType_t tc, int ldc, long long sC, int batch, const void *bias) {
    if (M <= 0 || N <= 0 || K <= 0 || batch <= 0 || ta != tb)
        return bq_cuda_fail(BQ_ERR_ARG, "bq_matmul: bad shape or types (M=%d N=%d K=%d batch=%d)", M, N, K, batch);
    if (bias && batch > 1) return bq_cuda_fail(BQ_ERR_ARG, "bq_matmul: bias with a batched product");
    /* the epilogue reads the bias with vector loads: only for 16-byte aligned bias vectors */
    const int epilogue_bias = bias && ((uintptr_t)bias % 16 == 0);
    bq_gemm_key k;
    memset(&k, 0, sizeof k);   /* padding bytes too: keys are compared with memcmp */
    k.transA = transA; k.transB = transB; k.M = M; k.N = N; k.K = K; k.lda = lda; k.ldb = ldb; k.ldc = ldc;
    k.batch = batch; k.bias = epilogue_bias; k.ta = ta; k.tb = tb; k.tc = tc;
    k.sA = batch > 1 ? sA : 0; k.sB = batch > 1 ? sB : 0; k.sC = batch > 1 ? sC : 0;
    k.alignA = alignment(A, lda, sA, batch, type_size(ta));
    k.alignB = alignment(B, ldb, sB, batch, type_size(tb));
    k.alignC = alignment(C, ldc, sC, batch, type_size(tc));
    bq_gemm_plan *p;
    TRY(find_plan(g, &k, bias, &p));
    if (p->valid) {
        if (epilogue_bias)
            CUBLAS_TRY(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
        const cublasStatus_t st = cublasLtMatmul(g->lt, p->desc, &alpha, B, p->la, A, p->lb, &beta, C, p->lc, C, p->lc,
                                                 &p->algo, g->workspace, g->workspace_bytes, g->stream);
        if (st == CUBLAS_STATUS_NOT_SUPPORTED) {
            p->valid = 0;   /* the heuristic's pick refused at launch: this shape goes to cuBLAS from now on */
        } else if (st != CUBLAS_STATUS_SUCCESS) {
            return bq_cuda_fail_cublas(st, "cublasLtMatmul", __FILE__, __LINE__);
        } else {
            g->lt_calls++;
        }
    }
    if (!p->valid) {
        const cublasOperation_t opa = transB ? CUBLAS_OP_T : CUBLAS_OP_N, opb = transA ? CUBLAS_OP_T : CUBLAS_OP_N;
        CUBLAS_TRY(cublasGemmStridedBatchedEx(g->blas, opa, opb, N, M, K, &alpha, B, tb, ldb, sB, A, ta, lda, sA, &beta,
                                              C, tc, ldc, sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        g->fallback_calls++;
    }
    if (bias && !(p->valid && epilogue_bias)) {
        const size_t n = (size_t)M * N;
        if (tc == CUDA_R_32F)
            add_bias_kernel<float><<<ceil_div(n, 256), 256, 0, g->stream>>>((float *)C, (const float *)bias, M, N, ldc);
        else
            add_bias_kernel<bf16><<<ceil_div(n, 256), 256, 0, g->stream>>>((bf16 *)C, (const bf16 *)bias, M, N, ldc);
        LAUNCH_CHECK("add_bias_kernel");
    }
    return BQ_OK;
}

/* ---- linear layers ------------------------------------------------------------------------------------------- */

template <typename T>
int linear_forward(bq_gemm *g, T *out, const T *inp, const T *w, const T *b, int N, int IN, int OUT) {
    const cudaDataType_t t = dtype_of<T>::value;
    /* out[N,OUT] = inp[N,IN] @ w[OUT,IN]^T */
    return bq_matmul(g, false, true, N, OUT, IN, 1.0f, inp, t, IN, 0, w, t, IN, 0, 0.0f, out, t, OUT, 0, 1, b);
}

template <typename T>
int linear_backward_input(bq_gemm *g, T *dinp, float beta, const T *dout, const T *w, int N, int IN, int OUT) {
    const cudaDataType_t t = dtype_of<T>::value;
    /* dinp[N,IN] = dout[N,OUT] @ w[OUT,IN] */
    return bq_matmul(g, false, false, N, IN, OUT, 1.0f, dout, t, OUT, 0, w, t, IN, 0, beta, dinp, t, IN, 0, 1, NULL);
}

template <typename T>
int linear_backward_weight(bq_gemm *g, float *dw, const T *dout, const T *inp, int N, int IN, int OUT) {
    const cudaDataType_t t = dtype_of<T>::value;
    /* dw[OUT,IN] += dout[N,OUT]^T @ inp[N,IN], accumulated in the fp32 gradient */
    return bq_matmul(g, true, false, OUT, IN, N, 1.0f, dout, t, OUT, 0, inp, t, IN, 0, 1.0f, dw, CUDA_R_32F, IN, 0, 1,
                     NULL);
}

#define INSTANTIATE_LINEAR(T)                                                                          \
    template int linear_forward<T>(bq_gemm *, T *, const T *, const T *, const T *, int, int, int);    \
    template int linear_backward_input<T>(bq_gemm *, T *, float, const T *, const T *, int, int, int); \
    template int linear_backward_weight<T>(bq_gemm *, float *, const T *, const T *, int, int, int);
INSTANTIATE_LINEAR(float)
INSTANTIATE_LINEAR(bf16)

/* ---- column sums ------------------------------------------------------------------------------------------- */
/* Stage 1: block (32, 8) takes a tile of 32 columns and a chunk of COLSUM_ROWS rows; thread (x, y) sums rows
 * y, y + 8, ... of the chunk for column x; the 8 partial sums are added in a fixed order. Stage 2 adds the chunks
 * in order. Same inputs, same bits. */
#define COLSUM_ROWS 256

static int colsum_chunks(int N) { return (N + COLSUM_ROWS - 1) / COLSUM_ROWS; }
size_t colsum_scratch_floats(int N, int C) { return (size_t)colsum_chunks(N) * C; }

template <typename T>
__global__ void colsum_partial_kernel(float *partial, const T *x, int N, int C, const int *rowkey, int key) {
    __shared__ float acc[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y;
    const int r0 = chunk * COLSUM_ROWS, r1 = min(N, r0 + COLSUM_ROWS);
    float s = 0.0f;
    if (c < C)
        for (int r = r0 + threadIdx.y; r < r1; r += 8)
            if (!rowkey || rowkey[r] == key) s += to_f(x[(size_t)r * C + c]);
    acc[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = acc[0][threadIdx.x];
        for (int y = 1; y < 8; y++) t += acc[y][threadIdx.x];
        partial[(size_t)chunk * C + c] = t;
    }
}

__global__ void colsum_finish_kernel(float *dst, const float *partial, int chunks, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s += partial[(size_t)k * C + c];
    dst[c] += s;
}

int colsum_finish(cudaStream_t s, float *dst, const float *partial, int N, int C) {
    colsum_finish_kernel<<<ceil_div(C, 256), 256, 0, s>>>(dst, partial, colsum_chunks(N), C);
    LAUNCH_CHECK("colsum_finish_kernel");
    return BQ_OK;
}

template <typename T>
int colsum_add(cudaStream_t s, float *dst, const T *x, int N, int C, const int *rowkey, int key, float *scratch) {
    dim3 grid(ceil_div(C, 32), colsum_chunks(N)), block(32, 8);
    colsum_partial_kernel<T><<<grid, block, 0, s>>>(scratch, x, N, C, rowkey, key);
    LAUNCH_CHECK("colsum_partial_kernel");
    return colsum_finish(s, dst, scratch, N, C);
}
template int colsum_add<float>(cudaStream_t, float *, const float *, int, int, const int *, int, float *);
template int colsum_add<bf16>(cudaStream_t, float *, const bf16 *, int, int, const int *, int, float *);
