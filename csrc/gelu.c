/* GELU, the exact erf form BERT uses (hidden_act = "gelu"), not the tanh approximation:
 *   gelu(x) = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)),   gelu'(x) = Phi(x) + x phi(x)
 * This file holds the entry points and their threads; the variants are gelu_avx2.c (eight lanes) and
 * gelu_avx512.c (sixteen lanes, the same formula: bit-identical results), chosen at run time through bq_cpu()
 * (cpu.h). */
#include "bertqa.h"
#include "cpu.h"

#define CHUNK 8192L   /* elements per task: a multiple of 16, so only the last one has a tail */

void gelu_forward(float *out, const float *inp, size_t N) {
    const bq_kernels *k = bq_cpu();
    const long n = (long)N, tasks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) if (N > 32768) num_threads(bq_num_threads())
    for (long t = 0; t < tasks; t++) k->gelu_forward(out + t * CHUNK, inp + t * CHUNK, n - t * CHUNK < CHUNK ? n - t * CHUNK : CHUNK);
}

void gelu_backward(float *dinp, const float *inp, const float *dout, size_t N) {
    const bq_kernels *k = bq_cpu();
    const long n = (long)N, tasks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) if (N > 32768) num_threads(bq_num_threads())
    for (long t = 0; t < tasks; t++)
        k->gelu_backward(dinp + t * CHUNK, inp + t * CHUNK, dout + t * CHUNK, n - t * CHUNK < CHUNK ? n - t * CHUNK : CHUNK);
}
