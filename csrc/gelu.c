/* GELU, the exact erf form BERT uses (hidden_act = "gelu"), not the tanh approximation. */
#include <math.h>
#include "bertqa.h"

#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

void gelu_forward(float *out, const float *inp, size_t N) {
#pragma omp parallel for schedule(static) if (N > 32768)
    for (long i = 0; i < (long)N; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + erff(x * INV_SQRT2));
    }
}

void gelu_backward(float *dinp, const float *inp, const float *dout, size_t N) {
    /* d/dx [x Phi(x)] = Phi(x) + x phi(x) */
#pragma omp parallel for schedule(static) if (N > 32768)
    for (long i = 0; i < (long)N; i++) {
        float x = inp[i];
        float cdf = 0.5f * (1.0f + erff(x * INV_SQRT2));
        float pdf = INV_SQRT_2PI * expf(-0.5f * x * x);
        dinp[i] += dout[i] * (cdf + x * pdf);
    }
}
