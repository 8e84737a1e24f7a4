/* Dropout over the counter-based RNG (Philox4x32-10, philox.h).
 *
 * A dropout mask is a pure function of (seed, step, tensor_id, element index), so backward regenerates it
 * instead of storing it, any thread can produce any element, and the CUDA backend reproduces it bit for bit.
 * This file holds the entry points and their threads; the slice kernels are rng_avx2.c and rng_avx512.c, chosen
 * at run time through bq_cpu() (cpu.h).
 */
#include "bertqa.h"
#include "cpu.h"

enum { APPLY = BQ_DROPOUT_APPLY, ACCUMULATE = BQ_DROPOUT_ACCUMULATE, MASK = BQ_DROPOUT_MASK, UNIFORM = BQ_DROPOUT_UNIFORM };

static inline void dropout_slice(float *y, const float *x, size_t n, float p, uint64_t seed, uint32_t step,
                                 uint32_t tensor_id, uint64_t first, int mode) {
    bq_cpu()->dropout_slice(y, x, n, p, seed, step, tensor_id, first, mode);
}

void bq_dropout_slice(float *out, const float *inp, size_t n, float p, uint64_t seed, uint32_t step,
                      uint32_t tensor_id, uint64_t first) {
    dropout_slice(out, inp, n, p, seed, step, tensor_id, first, APPLY);
}

void bq_dropout_mask(float *mask, size_t n, float p, uint64_t seed, uint32_t step, uint32_t tensor_id,
                     uint64_t first) {
    dropout_slice(mask, NULL, n, p, seed, step, tensor_id, first, MASK);
}

void bq_uniform_fill(float *u, size_t n, uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t first) {
    dropout_slice(u, NULL, n, 0.0f, seed, step, tensor_id, first, UNIFORM);
}

/* Whole tensors: threads take 4096-element slices. */
static void dropout_apply(float *y, const float *x, size_t N, float p, uint64_t seed, uint32_t step,
                          uint32_t tensor_id, int mode) {
    const size_t S = 4096;
    const long nslices = (long)((N + S - 1) / S);
#pragma omp parallel for schedule(static) if (N > 32768) num_threads(bq_num_threads())
    for (long sl = 0; sl < nslices; sl++) {
        size_t a = (size_t)sl * S, n = N - a < S ? N - a : S;
        dropout_slice(y + a, x + a, n, p, seed, step, tensor_id, a, mode);
    }
}

void dropout_forward(float *out, const float *inp, size_t N, float p, uint64_t seed, uint32_t step,
                     uint32_t tensor_id) {
    dropout_apply(out, inp, N, p, seed, step, tensor_id, APPLY);
}

void dropout_backward(float *dinp, const float *dout, size_t N, float p, uint64_t seed, uint32_t step,
                      uint32_t tensor_id) {
    dropout_apply(dinp, dout, N, p, seed, step, tensor_id, ACCUMULATE);
}

/* Rows with bq_rng numbering: row b's T_b * C elements are contiguous in the buffer (from off[b] * C) and in the
 * numbering (from w_b * P * C), so rows are cut into 4096-element slices that the threads share. */
static void dropout_rows_apply(float *y, const float *x, int B, const int *off, int C, float p, bq_rng r,
                               uint32_t tensor_id, int mode) {
    const size_t S = 4096;
    long nslices = 0;
    for (int b = 0; b < B; b++) nslices += (long)(((size_t)(off[b + 1] - off[b]) * C + S - 1) / S);
    const size_t total = (size_t)(off[B] - off[0]) * C;
    int b = 0;
    long first_slice = 0;   /* slices of the rows before b */
#pragma omp parallel for schedule(static) if (total > 32768) num_threads(bq_num_threads()) firstprivate(b, first_slice)
    for (long sl = 0; sl < nslices; sl++) {
        /* this thread's slices come in order: walk b forward (from where it last stopped) to the row of sl */
        while (sl - first_slice >= (long)(((size_t)(off[b + 1] - off[b]) * C + S - 1) / S)) {
            first_slice += (long)(((size_t)(off[b + 1] - off[b]) * C + S - 1) / S);
            b++;
        }
        const size_t row = (size_t)(off[b + 1] - off[b]) * C, a = (size_t)(sl - first_slice) * S;
        const size_t n = row - a < S ? row - a : S, o = (size_t)off[b] * C + a;
        dropout_slice(y + o, x + o, n, p, r.seed, r.step, tensor_id, bq_rng_window(r, b) * (uint64_t)r.P * C + a,
                      mode);
    }
}

void dropout_rows_forward(float *out, const float *inp, int B, const int *off, int C, float p, bq_rng r,
                          uint32_t tensor_id) {
    dropout_rows_apply(out, inp, B, off, C, p, r, tensor_id, APPLY);
}

void dropout_rows_backward(float *dinp, const float *dout, int B, const int *off, int C, float p, bq_rng r,
                           uint32_t tensor_id) {
    dropout_rows_apply(dinp, dout, B, off, C, p, r, tensor_id, ACCUMULATE);
}
