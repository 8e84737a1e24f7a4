/* The QA head's bias and de-interleaving, and the span loss (csrc/span_loss.c): one block per (row, start|end),
 * max / log-sum-exp / gradient in double as the CPU computes them. With row lengths (the engine's), each row's
 * softmax runs over its real tokens only, as the CPU engine's span_loss_rows (the padded positions, which the GPU
 * engine does compute, get no gradient); without, BertForQuestionAnswering's over all T. The host clamps the
 * positions, marks ignored ones (T, or at or after the row's end), counts the others and sums the per-row losses
 * in order (it needs the loss anyway). */
#include "kernels.cuh"

__global__ void qa_split_kernel(float *start, float *end, const float *logits, const float *qab, int N) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    start[n] = logits[2 * n] + qab[0];
    end[n] = logits[2 * n + 1] + qab[1];
}

int qa_split(cudaStream_t s, float *start, float *end, const float *logits, const float *qab, int N) {
    qa_split_kernel<<<ceil_div(N, 256), 256, 0, s>>>(start, end, logits, qab, N);
    LAUNCH_CHECK("qa_split_kernel");
    return BQ_OK;
}

#define SPAN_THREADS 256

__device__ double block_reduce(double v, double *sh, bool is_max) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int o = SPAN_THREADS / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sh[threadIdx.x] = is_max ? fmax(sh[threadIdx.x], sh[threadIdx.x + o])
                                                           : sh[threadIdx.x] + sh[threadIdx.x + o];
        __syncthreads();
    }
    const double r = sh[0];
    __syncthreads();
    return r;
}

template <typename T>
__global__ void span_loss_kernel(T *dlogits, double *rowloss, const float *start, const float *end, const int *pos,
                                 const int *len, int B, int T_, double gs0, double gs1) {
    __shared__ double sh[SPAN_THREADS];
    const int b = blockIdx.x, w = blockIdx.y;
    const float *x = (w ? end : start) + (size_t)b * T_;
    const int p = pos[w * B + b];
    const double gs = w ? gs1 : gs0;
    const int L = len ? len[b] : T_;   /* the softmax runs over x[0 .. L-1]; positions L.. get no gradient */
    for (int t = L + (int)threadIdx.x; t < T_; t += SPAN_THREADS) dlogits[((size_t)b * T_ + t) * 2 + w] = from_f<T>(0.0f);
    if (p == T_) {   /* ignored row: no loss, no gradient */
        for (int t = threadIdx.x; t < L; t += SPAN_THREADS) dlogits[((size_t)b * T_ + t) * 2 + w] = from_f<T>(0.0f);
        if (threadIdx.x == 0) rowloss[w * B + b] = 0.0;
        return;
    }
    double mx = -INFINITY;
    for (int t = threadIdx.x; t < L; t += SPAN_THREADS) mx = fmax(mx, (double)x[t]);
    mx = block_reduce(mx, sh, true);
    double sum = 0.0;
    for (int t = threadIdx.x; t < L; t += SPAN_THREADS) sum += exp((double)x[t] - mx);
    const double lse = mx + log(block_reduce(sum, sh, false));
    for (int t = threadIdx.x; t < L; t += SPAN_THREADS)
        dlogits[((size_t)b * T_ + t) * 2 + w] = from_f<T>((float)(gs * (exp((double)x[t] - lse) - (t == p))));
    if (threadIdx.x == 0) rowloss[w * B + b] = lse - (double)x[p];
}

template <typename T>
int span_loss_rows(cudaStream_t s, T *dlogits, double *rowloss, const float *start, const float *end, const int *pos,
                   const int *len, int B, int T_, double gscale_start, double gscale_end) {
    dim3 grid(B, 2);
    span_loss_kernel<T><<<grid, SPAN_THREADS, 0, s>>>(dlogits, rowloss, start, end, pos, len, B, T_, gscale_start,
                                                      gscale_end);
    LAUNCH_CHECK("span_loss_kernel");
    return BQ_OK;
}
template int span_loss_rows<float>(cudaStream_t, float *, double *, const float *, const float *, const int *,
                                   const int *, int, int, double, double);
template int span_loss_rows<bf16>(cudaStream_t, bf16 *, double *, const float *, const float *, const int *,
                                  const int *, int, int, double, double);
