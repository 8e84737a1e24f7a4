/* LayerNorm over the last dimension, as torch.nn.LayerNorm (biased variance, eps inside the sqrt). */
#include <math.h>
#include "bertqa.h"

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *weight,
                       const float *bias, int N, int C, float eps) {
#pragma omp parallel for schedule(static) if ((long)N * C > 32768) num_threads(bq_num_threads())
    for (long n = 0; n < N; n++) {
        const float *x = inp + n * C;   /* [C] */
        float *o = out + n * C;         /* [C] */
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < C; c++) s += x[c];
        const float m = s / C;
        float v = 0.0f;   /* two passes: no cancellation from E[x^2] - m^2 */
#pragma omp simd reduction(+ : v)
        for (int c = 0; c < C; c++) { float d = x[c] - m; v += d * d; }
        const float r = 1.0f / sqrtf(v / C + eps);
        for (int c = 0; c < C; c++) o[c] = (x[c] - m) * r * weight[c] + bias[c];
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = r;
    }
}

void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                        const float *weight, const float *mean, const float *rstd, int N, int C) {
    /* dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dout * weight,  xhat = (x - mean) * rstd */
    if (dinp) {
#pragma omp parallel for schedule(static) if ((long)N * C > 32768) num_threads(bq_num_threads())
        for (long n = 0; n < N; n++) {
            const float *x = inp + n * C, *dy = dout + n * C;
            float *dx = dinp + n * C;
            const float m = mean[n], r = rstd[n];
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
    }
    if (dweight || dbias) {
        /* Threads own channel ranges: no atomics, a fixed summation order. */
#pragma omp parallel for schedule(static) if ((long)N * C > 32768) num_threads(bq_num_threads())
        for (int c0 = 0; c0 < C; c0 += 64) {
            const int c1 = c0 + 64 < C ? c0 + 64 : C;
            float aw[64] = {0}, ab[64] = {0};
            for (long n = 0; n < N; n++) {
                const float *x = inp + n * C, *dy = dout + n * C;
                const float m = mean[n], r = rstd[n];
                for (int c = c0; c < c1; c++) {
                    aw[c - c0] += dy[c] * (x[c] - m) * r;
                    ab[c - c0] += dy[c];
                }
            }
            for (int c = c0; c < c1; c++) {
                if (dweight) dweight[c] += aw[c - c0];
                if (dbias) dbias[c] += ab[c - c0];
            }
        }
    }
}
