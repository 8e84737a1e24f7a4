/* The dispatch tables of cpu.h and the run-time choice between them (cpuid, BERTQA_CPU, bq_cpu_set_isa). It
 * depends on the variant files only (*_avx2.c, *_avx512.c); the kernels' entry points depend on it. */
#include "cpu.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "bertqa.h"

static const bq_kernels kernels_avx2 = {
#ifdef __AVX2__
    .name = "avx2",
#else
    .name = "scalar",   /* a build for another architecture: the same files, their scalar paths */
#endif
    .gelu_forward = gelu_forward_avx2,
    .gelu_backward = gelu_backward_avx2,
    .layernorm_forward_row = layernorm_forward_row_avx2,
    .layernorm_backward_row = layernorm_backward_row_avx2,
    .layernorm_param_grad = layernorm_param_grad_avx2,
    .adamw = adamw_avx2,
    .sum_squares = sum_squares_avx2,
    .dropout_slice = dropout_slice_avx2,
    .softmax_row = softmax_row_avx2,
    .max_row = max_row_avx2,
    .exp_row = exp_row_avx2,
    .softmax_backward_row = softmax_backward_row_avx2,
};

#ifdef BQ_HAVE_AVX512_BUILD
static const bq_kernels kernels_avx512 = {
    .name = "avx512",
    .gelu_forward = gelu_forward_avx512,
    .gelu_backward = gelu_backward_avx512,
    .layernorm_forward_row = layernorm_forward_row_avx512,
    .layernorm_backward_row = layernorm_backward_row_avx512,
    .layernorm_param_grad = layernorm_param_grad_avx512,
    .adamw = adamw_avx512,
    .sum_squares = sum_squares_avx512,
    .dropout_slice = dropout_slice_avx512,
    .softmax_row = softmax_row_avx512,
    .max_row = max_row_avx512,
    .exp_row = exp_row_avx512,
    .softmax_backward_row = softmax_backward_row_avx512,
};
#endif

static const bq_kernels *const tables[BQ_ISA_COUNT] = {
    &kernels_avx2,
#ifdef BQ_HAVE_AVX512_BUILD
    &kernels_avx512,
#else
    NULL,
#endif
};

/* The floor until bq_cpu_init runs, so a kernel called before (or without) it still works. */
_Atomic(const bq_kernels *) bq_cpu_active = &kernels_avx2;

int bq_cpu_supports(bq_isa isa) {
    if (isa == BQ_ISA_AVX2) return 1;   /* the build's floor: the module would not have loaded otherwise */
#ifdef BQ_HAVE_AVX512_BUILD
    if (isa == BQ_ISA_AVX512) {
        /* libgcc's cpuid also checks XCR0: the OS saves the zmm and mask registers */
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    }
#endif
    return 0;
}

static bq_isa best_isa(void) { return bq_cpu_supports(BQ_ISA_AVX512) ? BQ_ISA_AVX512 : BQ_ISA_AVX2; }

int bq_cpu_set_isa(bq_isa isa) {
    if (isa == BQ_ISA_AUTO) isa = best_isa();
    if (isa < 0 || isa >= BQ_ISA_COUNT || !tables[isa] || !bq_cpu_supports(isa)) return BQ_ERR_ARG;
    atomic_store_explicit(&bq_cpu_active, tables[isa], memory_order_relaxed);
    return BQ_OK;
}

const char *bq_cpu_isa_name(void) { return bq_cpu()->name; }

const char *bq_cpu_isa_label(bq_isa isa) { return isa >= 0 && isa < BQ_ISA_COUNT && tables[isa] ? tables[isa]->name : NULL; }

bq_isa bq_cpu_parse_isa(const char *name) {
    if (!strcmp(name, "auto")) return BQ_ISA_AUTO;
    if (!strcmp(name, "avx2")) return BQ_ISA_AVX2;
    if (!strcmp(name, "avx512")) return BQ_ISA_AVX512;
    return BQ_ISA_COUNT;
}

int bq_cpu_init(char *err, size_t errlen) {
    const char *env = getenv("BERTQA_CPU");
    bq_isa isa = env && *env ? bq_cpu_parse_isa(env) : BQ_ISA_AUTO;
    if (isa == BQ_ISA_COUNT) {
        snprintf(err, errlen, "BERTQA_CPU=%s: expected auto, avx2 or avx512", env);
        return BQ_ERR_ARG;
    }
    if (bq_cpu_set_isa(isa) != BQ_OK) {
        snprintf(err, errlen,
                 "BERTQA_CPU=%s, but this CPU (or this build) cannot run it: AVX-512 needs avx512f, avx512bw, "
                 "avx512dq and avx512vl; unset BERTQA_CPU or set it to auto or avx2",
                 env);
        return BQ_ERR_ARG;
    }
    return BQ_OK;
}

/* ---- low precision ---------------------------------------------------------------------------------------- */

#ifdef BQ_HAVE_AVX512_BUILD
static const bq_lowp_kernels lowp_avx512 = {
    .bf16_packed_elems = bf16_packed_elems_avx512,
    .bf16_pack_b = bf16_pack_b_avx512,
    .gemm_bf16 = gemm_bf16_avx512,
    .gemm_bf16_full = gemm_bf16_full_avx512,
    .i8_packed_bytes = i8_packed_bytes_avx512,
    .i8_pack_weights = i8_pack_weights_avx512,
    .gemm_i8 = gemm_i8_avx512,
};
#endif

int bq_cpu_has_avx512_bf16(void) {
#ifdef BQ_HAVE_AVX512_BUILD
    __builtin_cpu_init();
    return bq_cpu_supports(BQ_ISA_AVX512) && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

int bq_cpu_has_avx512_vnni(void) {
#ifdef BQ_HAVE_AVX512_BUILD
    __builtin_cpu_init();
    return bq_cpu_supports(BQ_ISA_AVX512) && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

const bq_lowp_kernels *bq_cpu_lowp(int precision, const char **missing) {
    const char *why = NULL;
#ifdef BQ_HAVE_AVX512_BUILD
    const int bf16 = precision == BQ_PREC_BF16;
    if (precision != BQ_PREC_BF16 && precision != BQ_PREC_INT8)
        why = "an unknown precision";
    else if (bf16 ? !bq_cpu_has_avx512_bf16() : !bq_cpu_has_avx512_vnni())
        why = bf16 ? "AVX-512 BF16 (avx512_bf16: AMD Zen 4 or Intel Cooper Lake / Sapphire Rapids and newer), "
                     "which this CPU lacks"
                   : "AVX-512 VNNI (avx512_vnni: AMD Zen 4 or Intel Cascade Lake and newer), which this CPU lacks";
    else if (bq_cpu() != tables[BQ_ISA_AVX512])
        why = "the AVX-512 kernels, which are switched off (BERTQA_CPU=avx2 or set_isa('avx2'))";
    if (!why) return &lowp_avx512;
#else
    why = "an x86-64 build with AVX-512 (this build has none)";
#endif
    if (missing) *missing = why;
    return NULL;
}
