/* AdamW (torch.optim.AdamW semantics: decoupled weight decay first, then the bias-corrected Adam step)
 * and the pieces of global gradient-norm clipping. This file holds the threads and the AVX2 variants (the
 * compiler vectorises their `omp simd` loops); adamw_avx512.c the AVX-512 ones, chosen through bq_cpu(). */
#include <math.h>
#include "bertqa.h"
#include "cpu.h"

void adamw_avx2(float *param, const float *grad, float *m, float *v, long n, const bq_adamw_scalars *s) {
    const float beta1 = s->beta1, beta2 = s->beta2, omb1 = s->one_minus_beta1, omb2 = s->one_minus_beta2;
    const float decay = s->decay, step_size = s->step_size, bc2_sqrt = s->bc2_sqrt, eps = s->eps;
    const float grad_scale = s->grad_scale;
#pragma omp simd
    for (long i = 0; i < n; i++) {
        float g = grad[i] * grad_scale;
        float p = param[i] * decay;
        float mi = beta1 * m[i] + omb1 * g;
        float vi = beta2 * v[i] + omb2 * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] = p - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

double sum_squares_avx2(const float *g, long n) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += (double)g[i] * g[i];
    return s;
}

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
