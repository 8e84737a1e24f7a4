/* AdamW (torch.optim.AdamW semantics: decoupled weight decay first, then the bias-corrected Adam step)
 * and the pieces of global gradient-norm clipping. */
#include <math.h>
#include "bertqa.h"

void adamw_update(float *param, const float *grad, float *m, float *v, size_t N, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int step, float grad_scale) {
    /* Scalars in double, as torch computes them on the host. */
    const double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);
    const float step_size = (float)(lr / bc1);
    const float bc2_sqrt = (float)sqrt(bc2);
    const float decay = 1.0f - lr * weight_decay;
#pragma omp parallel for simd schedule(static) if (N > 65536) num_threads(bq_num_threads())
    for (long i = 0; i < (long)N; i++) {
        float g = grad[i] * grad_scale;
        float p = param[i] * decay;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] = p - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

double sum_squares(const float *g, size_t N) {
    double s = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : s) if (N > 65536) num_threads(bq_num_threads())
    for (long i = 0; i < (long)N; i++) s += (double)g[i] * g[i];
    return s;
}

void scale_inplace(float *g, size_t N, float scale) {
#pragma omp parallel for simd schedule(static) if (N > 65536) num_threads(bq_num_threads())
    for (long i = 0; i < (long)N; i++) g[i] *= scale;
}
