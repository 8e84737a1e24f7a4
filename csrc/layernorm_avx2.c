/* LayerNorm's AVX2 row kernels (the compiler vectorises their `omp simd` loops for the build's floor), the
 * reference the AVX-512 ones (layernorm_avx512.c) are tested against. The entry points and their threads are
 * layernorm.c's; callers reach the row kernels through bq_cpu() (cpu.h). */
#include <math.h>
#include "bertqa.h"
#include "cpu.h"

void layernorm_forward_row_avx2(float *o, float *mean, float *rstd, const float *x, const float *weight,
                                const float *bias, int C, float eps) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int c = 0; c < C; c++) s += x[c];
    const float m = s / C;
    float v = 0.0f;   /* two passes: no cancellation from E[x^2] - m^2 */
#pragma omp simd reduction(+ : v)
    for (int c = 0; c < C; c++) { float d = x[c] - m; v += d * d; }
    const float r = 1.0f / sqrtf(v / C + eps);
    for (int c = 0; c < C; c++) o[c] = (x[c] - m) * r * weight[c] + bias[c];
    *mean = m;
    *rstd = r;
}

/* dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dout * weight,  xhat = (x - mean) * rstd */
void layernorm_backward_row_avx2(float *dx, const float *dy, const float *x, const float *weight, float m, float r,
                                 int C) {
    float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
    for (int c = 0; c < C; c++) {
        float g = dy[c] * weight[c];
        sg += g;
        sgx += g * (x[c] - m) * r;
    }
    sg /= C;
    sgx /= C;
    for (int c = 0; c < C; c++) {
        float xhat = (x[c] - m) * r;
        dx[c] += r * (dy[c] * weight[c] - sg - xhat * sgx);
    }
}

/* Channels [c0, c1) (at most 64) of dweight and dbias, summed over the N rows in row order. */
void layernorm_param_grad_avx2(float *aw, float *ab, const float *dout, const float *inp, const float *mean,
                               const float *rstd, long N, int C, int c0, int c1) {
    float w[64], b[64];   /* local: the compiler vectorises over c (no aliasing with dout / inp to fear) */
    for (int c = c0; c < c1; c++) w[c - c0] = aw[c - c0], b[c - c0] = ab[c - c0];
    for (long n = 0; n < N; n++) {
        const float *x = inp + n * C, *dy = dout + n * C;
        const float m = mean[n], r = rstd[n];
        for (int c = c0; c < c1; c++) {
            w[c - c0] += dy[c] * (x[c] - m) * r;
            b[c - c0] += dy[c];
        }
    }
    for (int c = c0; c < c1; c++) aw[c - c0] = w[c - c0], ab[c - c0] = b[c - c0];
}
