/* Philox4x32-10 for the CPU, scalar: the counter-based generator behind every dropout mask (rng.c and its
 * variants), the CUDA backend's keying (cuda/common.cuh) and bertqa._C.uniform. Key = seed, counter = (block as
 * 64 bits, tensor_id, step); element e of a tensor's numbering is word e % 4 of block e / 4, as a uniform
 * (word >> 8) * 2^-24. Its vector forms are rng_avx2.c's philox8 and philox_avx512.h's philox16. */
#ifndef BERTQA_PHILOX_H
#define BERTQA_PHILOX_H
#include <stdint.h>
#include "bertqa.h"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* Four uniforms for elements 4*block .. 4*block+3. */
static inline void uniform4(float u[4], uint64_t seed, uint32_t step, uint32_t tensor_id, uint64_t block) {
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    const uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), tensor_id, step};
    uint32_t r[4];
    bq_philox4x32(r, ctr, key);
    for (int j = 0; j < 4; j++) u[j] = (float)(r[j] >> 8) * (1.0f / 16777216.0f);
}

#endif /* BERTQA_PHILOX_H */
