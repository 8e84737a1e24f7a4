/* AdamW's and the sum of squares' AVX2 variants (the compiler vectorises their `omp simd` loops), the reference
 * the AVX-512 ones (adamw_avx512.c) are tested against. The entry points and their threads are adamw.c's;
 * callers reach the variants through bq_cpu() (cpu.h). */
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
