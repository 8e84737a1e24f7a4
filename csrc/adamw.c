/* AdamW (torch.optim.AdamW semantics: decoupled weight decay first, then the bias-corrected Adam step)
 * and the pieces of global gradient-norm clipping. This file holds the entry points and their threads; the
 * variants are adamw_avx2.c and adamw_avx512.c, chosen at run time through bq_cpu() (cpu.h). */
#include <math.h>
#include "bertqa.h"
#include "cpu.h"

#define CHUNK 16384L   /* elements per task: a multiple of 16 */

void adamw_update(float *param, const float *grad, float *m, float *v, size_t N, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int step, float grad_scale) {
    /* Scalars in double, as torch computes them on the host. */
    const double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);
    const bq_adamw_scalars s = {
        .beta1 = beta1, .beta2 = beta2, .one_minus_beta1 = 1.0f - beta1, .one_minus_beta2 = 1.0f - beta2,
        .decay = 1.0f - lr * weight_decay, .step_size = (float)(lr / bc1), .bc2_sqrt = (float)sqrt(bc2),
        .eps = eps, .grad_scale = grad_scale,
    };
    const bq_kernels *k = bq_cpu();
    const long n = (long)N, tasks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) if (N > 65536) num_threads(bq_num_threads())
    for (long t = 0; t < tasks; t++) {
        const long a = t * CHUNK, len = n - a < CHUNK ? n - a : CHUNK;
        k->adamw(param + a, grad + a, m + a, v + a, len, &s);
    }
}

double sum_squares(const float *g, size_t N) {
    const bq_kernels *k = bq_cpu();
    const long n = (long)N, tasks = (n + CHUNK - 1) / CHUNK;
    double s = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : s) if (N > 65536) num_threads(bq_num_threads())
    for (long t = 0; t < tasks; t++) s += k->sum_squares(g + t * CHUNK, n - t * CHUNK < CHUNK ? n - t * CHUNK : CHUNK);
    return s;
}

void scale_inplace(float *g, size_t N, float scale) {
#pragma omp parallel for simd schedule(static) if (N > 65536) num_threads(bq_num_threads())
    for (long i = 0; i < (long)N; i++) g[i] *= scale;
}
