/* LayerNorm over the last dimension, as torch.nn.LayerNorm (biased variance, eps inside the sqrt).
 * This file holds the entry points and their threads; the row kernels are layernorm_avx2.c and
 * layernorm_avx512.c, chosen at run time through bq_cpu() (cpu.h). */
#include "bertqa.h"
#include "cpu.h"

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *weight,
                       const float *bias, int N, int C, float eps) {
    const bq_kernels *k = bq_cpu();
#pragma omp parallel for schedule(static) if ((long)N * C > 32768) num_threads(bq_num_threads())
    for (long n = 0; n < N; n++) {
        float m, r;
        k->layernorm_forward_row(out + n * C, &m, &r, inp + n * C, weight, bias, C, eps);
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = r;
    }
}

void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                        const float *weight, const float *mean, const float *rstd, int N, int C) {
    const bq_kernels *k = bq_cpu();
    if (dinp) {
#pragma omp parallel for schedule(static) if ((long)N * C > 32768) num_threads(bq_num_threads())
        for (long n = 0; n < N; n++)
            k->layernorm_backward_row(dinp + n * C, dout + n * C, inp + n * C, weight, mean[n], rstd[n], C);
    }
    if (dweight || dbias) {
        /* Threads own channel ranges: no atomics, a fixed summation order. */
#pragma omp parallel for schedule(static) if ((long)N * C > 32768) num_threads(bq_num_threads())
        for (int c0 = 0; c0 < C; c0 += 64) {
            const int c1 = c0 + 64 < C ? c0 + 64 : C;
            float aw[64] = {0}, ab[64] = {0};
            k->layernorm_param_grad(aw, ab, dout, inp, mean, rstd, N, C, c0, c1);
            for (int c = c0; c < c1; c++) {
                if (dweight) dweight[c] += aw[c - c0];
                if (dbias) dbias[c] += ab[c - c0];
            }
        }
    }
}
