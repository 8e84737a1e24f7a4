/* Counter-based RNG (Philox4x32-10) and dropout.
 *
 * A dropout mask is a pure function of (seed, step, tensor_id, element index), so backward regenerates it
 * instead of storing it, any thread can produce any element, and the CUDA backend reproduces it bit for bit.
 */
#include "bertqa.h"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

static inline uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t *hi) {
    uint64_t p = (uint64_t)a * b;
    *hi = (uint32_t)(p >> 32);
    return (uint32_t)p;
}

void bq_philox4x32(uint32_t out[4], const uint32_t counter[4], const uint32_t key[2]) {
    uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        uint32_t hi0, hi1;
        uint32_t lo0 = mulhilo(PHILOX_M0, c0, &hi0);
        uint32_t lo1 = mulhilo(PHILOX_M1, c2, &hi1);
        uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* Four uniforms for elements 4*block .. 4*block+3. */
static inline void uniform4(float u[4], uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t block) {
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    const uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), tensor_id, step};
    uint32_t r[4];
    bq_philox4x32(r, ctr, key);
    for (int j = 0; j < 4; j++) u[j] = (float)(r[j] >> 8) * (1.0f / 16777216.0f);
}

float bq_uniform(uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t idx) {
    float u[4];
    uniform4(u, seed, step, tensor_id, idx / 4);
    return u[idx % 4];
}

/* y[i] (+)= x[i] * keep(first + i) / (1 - p) for i in [0, n): a slice of a tensor's element numbering, one
 * Philox call per 4 elements (the slice need not start on a multiple of 4). y may alias x. */
static void dropout_slice(float *y, const float *x, size_t n, float p, uint64_t seed, uint32_t step,
                          uint32_t tensor_id, uint64_t first, int accumulate) {
    const float scale = 1.0f / (1.0f - p);
    size_t i = 0;
    while (i < n) {
        const uint64_t idx = first + i;
        float u[4];
        uniform4(u, seed, step, tensor_id, idx / 4);
        for (unsigned lane = (unsigned)(idx % 4); lane < 4 && i < n; lane++, i++) {
            float val = u[lane] >= p ? x[i] * scale : 0.0f;
            if (accumulate) y[i] += val; else y[i] = val;
        }
    }
}

void bq_dropout_slice(float *out, const float *inp, size_t n, float p, uint64_t seed, uint32_t step,
                      uint32_t tensor_id, uint64_t first) {
    dropout_slice(out, inp, n, p, seed, step, tensor_id, first, 0);
}

/* Whole tensors: threads take 4096-element slices. */
static void dropout_apply(float *y, const float *x, size_t N, float p, uint64_t seed, uint32_t step,
                          uint32_t tensor_id, int accumulate) {
    const size_t S = 4096;
    const long nslices = (long)((N + S - 1) / S);
#pragma omp parallel for schedule(static) if (N > 32768)
    for (long sl = 0; sl < nslices; sl++) {
        size_t a = (size_t)sl * S, n = N - a < S ? N - a : S;
        dropout_slice(y + a, x + a, n, p, seed, step, tensor_id, a, accumulate);
    }
}

void dropout_forward(float *out, const float *inp, size_t N, float p, uint64_t seed, uint32_t step,
                     uint32_t tensor_id) {
    dropout_apply(out, inp, N, p, seed, step, tensor_id, 0);
}

void dropout_backward(float *dinp, const float *dout, size_t N, float p, uint64_t seed, uint32_t step,
                      uint32_t tensor_id) {
    dropout_apply(dinp, dout, N, p, seed, step, tensor_id, 1);
}
