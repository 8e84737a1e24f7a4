/* Branch-free float math that the compiler can vectorize (libm's expf is a scalar call per element).
 * bq_expf: Cephes-style range reduction exp(x) = 2^n * exp(r), |r| <= ln2/2, degree-6 polynomial;
 * relative error below 2e-7 over the whole float range; inputs below -87.3 give 0 (as the softmax needs). */
#ifndef BERTQA_VMATH_H
#define BERTQA_VMATH_H
#include <stdint.h>
#include <string.h>

static inline float bq_expf(float x) {
    const float hi = 88.3762626647949f, lo = -87.3365478515625f;
    int underflow = x < lo;
    x = x > hi ? hi : x;
    x = x < lo ? lo : x;
    float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;      /* ln2 split in two so n*ln2 is exact */
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return underflow ? 0.0f : p * scale;
}
#endif
