"""bf16 and int8 matrix products at the engine's shapes: bertqa's own AVX-512 kernels (csrc/gemm_lowp_avx512.c)
against oneDNN's matmul, with OpenBLAS sgemm as the fp32 yardstick (issue 23). One process; at every shape the
contenders take turns, round after round, so a noisy machine slows all of them alike; each figure is a median.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/lowp_gemm.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/lowp_gemm.py --quick --json out.json

oneDNN is the PyPI wheel onednn-cpu-gomp 2023.2.0 (oneDNN 3.2, GNU OpenMP), unpacked outside the venv:

    pip download --no-deps onednn-cpu-gomp==2023.2.0 -d /tmp/onednn
    unzip -j /tmp/onednn/onednn_cpu_gomp-*.whl '*/lib/libdnnl.so.3' -d /tmp/onednn/lib

The wheel ships libdnnl.so only (no headers), so its C API is called through ctypes. The enum values below were
printed by a C program compiled against include/oneapi/dnnl/dnnl_types.h and dnnl_common_types.h of tag v3.2.

What each column times, per call, from fp32 activations to an fp32 result (what the engine holds):
  sgemm      _C.sgemm, c = a @ b.T in fp32 (OpenBLAS, rows split over bertqa's OpenMP threads). For dX and dW the
             transposed operands are copied once beforehand: the NT product of the same M, N, K.
  own bf16   _C._gemm_bf16: rounds both operands to bf16 and packs b inside every call (the engine's forward
             packs its weights once, so the forward here pays a little more than the engine does).
  dnnl bf16  reorder f32 -> bf16 of the activations (for dW: of both operands) + matmul bf16 x bf16 -> f32. The
             weights (forward, dX) are converted into the layout the primitive asks for once, outside the timing.
  own i8     _C._gemm_i8: activations quantized per row (the engine's default; "pt": per tensor) inside the call,
             weights quantized and packed once: (t(repeat=R) - t(repeat=1)) / (R - 1).
  dnnl i8    per-tensor absmax in NumPy (x.max(), x.min(), one thread) + reorder f32 -> u8 (scale, zero point 128)
             + matmul u8 x s8 -> f32 (src scale and zero point, one weight scale per output); weights prepacked.
  dnnl i8 mm that matmul alone, on activations already quantized.
"""
import argparse
import ctypes as C
import json
import os
import time

import numpy as np

# oneDNN v3.2 C API constants (dnnl_common_types.h, dnnl_types.h)
F32, BF16, S32, S8, U8 = 3, 2, 4, 5, 6  # dnnl_data_type_t
TAG_ANY, TAG_AB, TAG_BA, TAG_A = 1, 3, 14, 2  # dnnl_format_tag_t
ENGINE_CPU, STREAM_DEFAULT = 1, 1
ARG_SRC, ARG_DST, ARG_WEIGHTS = 1, 17, 33  # DNNL_ARG_FROM = SRC, DNNL_ARG_TO = DST
ARG_SCALES, ARG_ZERO_POINTS = 4096, 8192  # DNNL_ARG_ATTR_SCALES | arg, DNNL_ARG_ATTR_ZERO_POINTS | arg
QUERY_IMPL_INFO_STR, QUERY_WEIGHTS_MD = 8, 131
MEMORY_ALLOCATE = C.c_void_p(C.c_size_t(-1).value)  # DNNL_MEMORY_ALLOCATE: the library owns the buffer
ISA_NAMES = {0x27: "avx512_core", 0x67: "avx512_core_vnni", 0xE7: "avx512_core_bf16", 0x1EF: "avx512_core_fp16",
             0xFEF: "avx512_core_amx", 0x7: "avx2", 0xF: "avx2_vnni"}


class ExecArg(C.Structure):
    _fields_ = [("arg", C.c_int), ("memory", C.c_void_p)]


class Dnnl:
    """The few oneDNN calls this benchmark needs; every object it makes is destroyed by release()."""

    def __init__(self, path):
        self.lib = L = C.CDLL(path)
        p, vp, i = C.POINTER(C.c_void_p), C.c_void_p, C.c_int
        for name, args in {
            "dnnl_engine_create": [p, i, C.c_size_t], "dnnl_stream_create": [p, vp, C.c_uint],
            "dnnl_stream_wait": [vp], "dnnl_memory_desc_create_with_tag": [p, i, C.c_int64 * 12, i, i],
            "dnnl_memory_create": [p, vp, vp, vp], "dnnl_primitive_attr_create": [p],
            "dnnl_primitive_attr_set_scales_mask": [vp, i, i], "dnnl_primitive_attr_set_zero_points_mask": [vp, i, i],
            "dnnl_matmul_primitive_desc_create": [p, vp, vp, vp, vp, vp, vp],
            "dnnl_reorder_primitive_desc_create": [p, vp, vp, vp, vp, vp], "dnnl_primitive_create": [p, vp],
            "dnnl_primitive_execute": [vp, vp, i, C.POINTER(ExecArg)],
            "dnnl_primitive_desc_query": [vp, i, i, vp],
            "dnnl_memory_desc_destroy": [vp], "dnnl_memory_destroy": [vp], "dnnl_primitive_attr_destroy": [vp],
            "dnnl_primitive_desc_destroy": [vp], "dnnl_primitive_destroy": [vp],
        }.items():
            getattr(L, name).argtypes, getattr(L, name).restype = args, C.c_int
        L.dnnl_primitive_desc_query_md.argtypes, L.dnnl_primitive_desc_query_md.restype = [vp, i, i], vp
        L.dnnl_get_effective_cpu_isa.restype = C.c_int
        L.dnnl_version.restype = C.POINTER(C.c_int * 3)
        self.owned = []  # (destroy function name, handle), released in reverse
        self.engine = self._new("dnnl_engine_create", ENGINE_CPU, 0)
        self.stream = self._new("dnnl_stream_create", self.engine, STREAM_DEFAULT)
        self.owned = [("dnnl_engine_destroy", self.engine), ("dnnl_stream_destroy", self.stream)]
        L.dnnl_stream_destroy.argtypes = L.dnnl_engine_destroy.argtypes = [vp]

    def version(self):
        return ".".join(map(str, self.lib.dnnl_version().contents))

    def isa(self):
        v = self.lib.dnnl_get_effective_cpu_isa()
        return ISA_NAMES.get(v, hex(v))

    def _check(self, name, *args):
        st = getattr(self.lib, name)(*args)
        if st != 0:
            raise RuntimeError(f"{name} returned dnnl_status_t {st}")

    def _new(self, name, *args, destroy=None):
        h = C.c_void_p()
        self._check(name, C.byref(h), *args)
        if destroy:
            self.owned.append((destroy, h))
        return h

    def md(self, dims, dt, tag):
        d = (C.c_int64 * 12)(*dims)
        return self._new("dnnl_memory_desc_create_with_tag", len(dims), d, dt, tag, destroy="dnnl_memory_desc_destroy")

    def memory(self, md, array=None):
        """A memory object over `array`'s buffer (kept alive by the caller), or one the library allocates."""
        handle = C.c_void_p(array.ctypes.data) if array is not None else MEMORY_ALLOCATE
        return self._new("dnnl_memory_create", md, self.engine, handle, destroy="dnnl_memory_destroy")

    def attr(self, scales=(), zero_points=()):
        """Primitive attributes: scales / zero points as (argument, mask) pairs, given at execution time."""
        a = self._new("dnnl_primitive_attr_create", destroy="dnnl_primitive_attr_destroy")
        for arg, mask in scales:
            self._check("dnnl_primitive_attr_set_scales_mask", a, arg, mask)
        for arg, mask in zero_points:
            self._check("dnnl_primitive_attr_set_zero_points_mask", a, arg, mask)
        return a

    def _primitive(self, pd):
        s = C.c_char_p()
        self._check("dnnl_primitive_desc_query", pd, QUERY_IMPL_INFO_STR, 0, C.byref(s))
        return self._new("dnnl_primitive_create", pd, destroy="dnnl_primitive_destroy"), s.value.decode()

    def matmul(self, src_md, w_md, dst_md, attr=None):
        """-> (primitive, its implementation's name, its weights' memory descriptor)"""
        pd = self._new("dnnl_matmul_primitive_desc_create", self.engine, src_md, w_md, None, dst_md, attr,
                       destroy="dnnl_primitive_desc_destroy")
        prim, impl = self._primitive(pd)
        return prim, impl, C.c_void_p(self.lib.dnnl_primitive_desc_query_md(pd, QUERY_WEIGHTS_MD, 0))

    def reorder(self, src_md, dst_md, attr=None):
        pd = self._new("dnnl_reorder_primitive_desc_create", src_md, self.engine, dst_md, self.engine, attr,
                       destroy="dnnl_primitive_desc_destroy")
        return self._primitive(pd)[0]

    def call(self, prim, args):
        """A function running `prim` on args {argument: memory} and waiting for it."""
        arr = (ExecArg * len(args))(*[ExecArg(k, v.value) for k, v in args.items()])
        ex, wait, stream, n = self.lib.dnnl_primitive_execute, self.lib.dnnl_stream_wait, self.stream, len(args)

        def run():
            if ex(prim, stream, n, arr) or wait(stream):
                raise RuntimeError("dnnl_primitive_execute failed")
        return run

    def release(self, keep=2):
        while len(self.owned) > keep:
            name, h = self.owned.pop()
            getattr(self.lib, name)(h)


def dnnl_bf16(dn, m, n, k, a, a_tag, b, b_tag, b_is_weight, c):
    """c[m,n] = a[m,k] @ b[k,n] in bf16 (fp32 sums), a and b fp32 in the given layouts (TAG_AB row-major, TAG_BA
    the transpose's buffer). A weight b is converted once, here; otherwise inside every call.
    -> (call, info {impl, create_ms, prepack_ms})"""
    t0 = time.perf_counter()
    a_md, a16_md = dn.md([m, k], F32, a_tag), dn.md([m, k], BF16, a_tag)
    b_md = dn.md([k, n], F32, b_tag)
    b16_md = dn.md([k, n], BF16, TAG_ANY if b_is_weight else b_tag)
    mm, impl, b_packed_md = dn.matmul(a16_md, b16_md, dn.md([m, n], F32, TAG_AB))
    to_bf16_a = dn.reorder(a_md, a16_md)
    to_bf16_b = dn.reorder(b_md, b_packed_md)
    create_ms = 1e3 * (time.perf_counter() - t0)
    a_mem, a16_mem = dn.memory(a_md, a), dn.memory(a16_md)
    b_mem, b16_mem = dn.memory(b_md, b), dn.memory(b_packed_md)
    steps = [dn.call(to_bf16_a, {ARG_SRC: a_mem, ARG_DST: a16_mem})]
    convert_b = dn.call(to_bf16_b, {ARG_SRC: b_mem, ARG_DST: b16_mem})
    t0 = time.perf_counter()
    if b_is_weight:
        convert_b()
    else:
        steps.append(convert_b)
    prepack_ms = 1e3 * (time.perf_counter() - t0) if b_is_weight else 0.0
    c_mem = dn.memory(dn.md([m, n], F32, TAG_AB), c)
    steps.append(dn.call(mm, {ARG_SRC: a16_mem, ARG_WEIGHTS: b16_mem, ARG_DST: c_mem}))

    def run():
        for s in steps:
            s()
    return run, {"impl": impl, "create_ms": create_ms, "prepack_ms": prepack_ms}


def dnnl_int8(dn, x, w, c):
    """c = x @ w.T with x [M,K] quantized per tensor to u8 (zero point 128) in every call and w [N,K] quantized per
    output channel to s8 once. -> (call with quantization, call of the matmul alone, info)"""
    M, K = x.shape
    N = w.shape[0]
    sw = (np.abs(w).max(axis=1) / 127.0).astype(np.float32)
    wq = np.rint(w / sw[:, None]).astype(np.int8)
    sx, zp = np.ones(1, np.float32), np.full(1, 128, np.int32)
    t0 = time.perf_counter()
    x_md, xq_md, dst_md = dn.md([M, K], F32, TAG_AB), dn.md([M, K], U8, TAG_AB), dn.md([M, N], F32, TAG_AB)
    mm_attr = dn.attr(scales=[(ARG_SRC, 0), (ARG_WEIGHTS, 2)], zero_points=[(ARG_SRC, 0)])  # mask 2: dim 1 = N
    mm, impl, w_packed_md = dn.matmul(xq_md, dn.md([K, N], S8, TAG_ANY), dst_md, mm_attr)
    quantize = dn.reorder(x_md, xq_md, dn.attr(scales=[(ARG_DST, 0)], zero_points=[(ARG_DST, 0)]))
    wq_md = dn.md([K, N], S8, TAG_BA)
    pack_w = dn.reorder(wq_md, w_packed_md)
    create_ms = 1e3 * (time.perf_counter() - t0)
    one_md = dn.md([1], F32, TAG_A)
    sx_mem, zp_mem, sw_mem = dn.memory(one_md, sx), dn.memory(dn.md([1], S32, TAG_A), zp), \
        dn.memory(dn.md([N], F32, TAG_A), sw)
    xq_mem, w_mem = dn.memory(xq_md), dn.memory(w_packed_md)
    t0 = time.perf_counter()
    dn.call(pack_w, {ARG_SRC: dn.memory(wq_md, wq), ARG_DST: w_mem})()
    prepack_ms = 1e3 * (time.perf_counter() - t0)
    q = dn.call(quantize, {ARG_SRC: dn.memory(x_md, x), ARG_DST: xq_mem, ARG_SCALES | ARG_DST: sx_mem,
                           ARG_ZERO_POINTS | ARG_DST: zp_mem})
    product = dn.call(mm, {ARG_SRC: xq_mem, ARG_WEIGHTS: w_mem, ARG_DST: dn.memory(dst_md, c),
                           ARG_SCALES | ARG_SRC: sx_mem, ARG_SCALES | ARG_WEIGHTS: sw_mem,
                           ARG_ZERO_POINTS | ARG_SRC: zp_mem})

    def run():
        sx[0] = max(float(x.max()), -float(x.min()), 1e-30) / 127.0
        q()
        product()
    run._keep = (sx, zp, sw, wq)  # buffers the memory objects point into
    product._keep = run._keep
    return run, product, {"impl": impl, "create_ms": create_ms, "prepack_ms": prepack_ms}


def seconds_per_call(fn, min_s):
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        t = time.perf_counter() - t0
        if t >= min_s and n >= 2:
            return t / n


def own_i8_per_call(_C, x, w, c, per_tensor, min_s):
    """The product alone, the weights' quantization and packing subtracted: (t(repeat=R) - t(repeat=1)) / (R - 1),
    R >= 8; t(repeat=R) / R (an upper bound) should noise make the difference come out negative."""
    t1 = seconds_per_call(lambda: _C._gemm_i8(x, w, c, per_tensor, False, 1), min_s / 2)
    R = max(8, int(round(min_s / 2 / t1)))
    tR = seconds_per_call(lambda: _C._gemm_i8(x, w, c, per_tensor, False, R), min_s)
    return (tR - t1) / (R - 1) if tR > t1 else tR / R


# (name, kind, M, N, K): forward out[M,N] = x[M,K] W[N,K]^T; dX[M,K] = dout[M,N] W[N,K]; dW[N,K] = dout^T x
def shapes(quick):
    out = []
    for M in ([384] if quick else [384, 3072]):
        for N, K in [(384, 384), (1536, 384), (384, 1536)]:
            out.append((f"MiniLM B={M // 384}", "fwd", M, N, K))
    if not quick:
        for N, K in [(768, 768), (3072, 768), (768, 3072)]:
            out.append(("BERT-base B=2", "fwd", 768, N, K))
        for kind in ("dX", "dW"):
            for N, K in [(384, 384), (1536, 384), (384, 1536)]:
                out.append(("MiniLM B=8", kind, 3072, N, K))
    return out


def bench_shape(_C, dn, name, kind, M, N, K, rounds, min_s, rng):
    """-> one result row: GFLOP/s per contender, relative errors against the sgemm, oneDNN's implementations."""
    f32 = np.float32
    W = (rng.standard_normal((N, K)) * 0.05).astype(f32)
    if kind == "fwd":  # out[M,N] = x W^T
        x = rng.standard_normal((M, K)).astype(f32)
        m, n, k, ref_a, ref_b = M, N, K, x, W
    elif kind == "dX":  # dX[M,K] = dout[M,N] W
        x = rng.standard_normal((M, N)).astype(f32)
        m, n, k, ref_a, ref_b = M, K, N, x, np.ascontiguousarray(W.T)
    else:  # dW[N,K] = dout^T[N,M] xin[M,K], tokens inner
        x, xin = rng.standard_normal((M, N)).astype(f32), rng.standard_normal((M, K)).astype(f32)
        m, n, k, ref_a, ref_b = N, K, M, np.ascontiguousarray(x.T), np.ascontiguousarray(xin.T)
    outs = {}

    def out(key):
        return outs.setdefault(key, np.zeros((m, n), f32))

    runs = {"sgemm": lambda: _C.sgemm(ref_a, ref_b, out("sgemm"))}
    if kind == "fwd":
        runs["own bf16"] = lambda: _C._gemm_bf16(x, W, out("own bf16"), False, True, False)
        bf, info = dnnl_bf16(dn, m, n, k, x, TAG_AB, W, TAG_BA, True, out("dnnl bf16"))
    elif kind == "dX":
        runs["own bf16"] = lambda: _C._gemm_bf16(x, W, out("own bf16"), False, False, False)
        bf, info = dnnl_bf16(dn, m, n, k, x, TAG_AB, W, TAG_AB, True, out("dnnl bf16"))
    else:
        runs["own bf16"] = lambda: _C._gemm_bf16(x, xin, out("own bf16"), True, False, False)
        bf, info = dnnl_bf16(dn, m, n, k, x, TAG_BA, xin, TAG_AB, False, out("dnnl bf16"))
    runs["dnnl bf16"] = bf
    row = {"shape": name, "kind": kind, "M": M, "N": N, "K": K, "gflop": 2.0 * M * N * K / 1e9,
           "dnnl_bf16": info}
    if kind == "fwd":
        runs["own i8"] = lambda: _C._gemm_i8(x, W, out("own i8"), False, False, 1)
        runs["own i8 pt"] = lambda: _C._gemm_i8(x, W, out("own i8 pt"), True, False, 1)
        runs["dnnl i8"], runs["dnnl i8 mm"], row["dnnl_int8"] = dnnl_int8(dn, x, W, out("dnnl i8"))
    row["first_ms"] = {}
    for key, fn in runs.items():  # the first call (JIT, page faults), a warm-up, and the results to check
        t0 = time.perf_counter()
        fn()
        row["first_ms"][key] = 1e3 * (time.perf_counter() - t0)
    ref = outs["sgemm"].astype(np.float64)
    row["rel_err"] = {k: float(np.linalg.norm(v - ref) / np.linalg.norm(ref)) for k, v in outs.items() if k != "sgemm"}
    timers = {}
    for key, fn in runs.items():
        if key.startswith("own i8"):
            pt = key.endswith("pt")
            timers[key] = (lambda pt=pt: own_i8_per_call(_C, x, W, out("own i8"), pt, min_s))
        else:
            timers[key] = (lambda fn=fn: seconds_per_call(fn, min_s))
    keys = list(timers)
    times = {key: [] for key in keys}
    for r in range(rounds):  # turns, the starting contender rotating
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[key].append(timers[key]())
    row["seconds"] = {key: float(np.median(v)) for key, v in times.items()}
    row["gflops"] = {key: row["gflop"] / s for key, s in row["seconds"].items()}
    return row


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return {f: f in have for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")}
    return {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dnnl", default=os.environ.get("BQ_DNNL_LIB", "/tmp/onednn/lib/libdnnl.so.3"),
                    help="path of libdnnl.so.3 (onednn-cpu-gomp 2023.2.0)")
    ap.add_argument("--threads", type=int, default=2, help="OpenMP threads for every contender")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min_time", type=float, default=0.06, help="seconds of calls per timing")
    ap.add_argument("--quick", action="store_true", help="the B=1 MiniLM shapes only")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # before either library starts the (shared) libgomp

    from bertqa._core import _C
    _C.set_num_threads(a.threads)
    t0 = time.perf_counter()
    dn = Dnnl(a.dnnl)  # bertqa and libdnnl share the system's libgomp.so.1: one OpenMP runtime, one thread count
    load_ms = 1e3 * (time.perf_counter() - t0)
    info = _C.runtime_info()
    print(f"threads {a.threads} (bertqa omp_threads={info['omp_threads']}); OpenBLAS core {info['blas_core']} "
          f"({info['blas_config']}); bertqa precisions {info['precisions']}")
    print(f"CPU flags: {cpu_flags()}")
    print(f"oneDNN {dn.version()} from {a.dnnl}: effective ISA {dn.isa()}; dlopen + engine {load_ms:.0f} ms")

    n = 2048
    big = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    cbig = np.empty_like(big)
    _C.sgemm(big, big, cbig)
    peak = 2.0 * n**3 / min(seconds_per_call(lambda: _C.sgemm(big, big, cbig), 0.2) for _ in range(2)) / 1e9
    print(f"sgemm {n}^3: {peak:.0f} GFLOP/s (the machine's measured fp32 peak)\n")

    rng = np.random.default_rng(23)
    cols = ["sgemm", "own bf16", "dnnl bf16", "own i8", "own i8 pt", "dnnl i8", "dnnl i8 mm"]
    print("GFLOP/s (x sgemm), median of %d rounds; own/dnnl: bf16, and int8 per row / per tensor against dnnl i8\n"
          % a.rounds)
    print("| model, batch | product | M | N | K | " + " | ".join(cols) + " | bf16 own/dnnl | i8 own/dnnl |")
    print("|---" * (len(cols) + 7) + "|")
    rows = []
    t_start = time.perf_counter()
    for name, kind, M, N, K in shapes(a.quick):
        row = bench_shape(_C, dn, name, kind, M, N, K, a.rounds, a.min_time, rng)
        dn.release()
        rows.append(row)
        g, s = row["gflops"], row["gflops"]["sgemm"]
        cells = [f"{g[c]:.0f} ({g[c] / s:.2f}x)" if c in g else "-" for c in cols]
        cells.append(f"{g['own bf16'] / g['dnnl bf16']:.2f}")
        i8 = "own i8" in g
        cells.append(f"{g['own i8'] / g['dnnl i8']:.2f} / {g['own i8 pt'] / g['dnnl i8']:.2f}" if i8 else "-")
        print(f"| {name} | {kind} | {M} | {N} | {K} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n({time.perf_counter() - t_start:.0f} s for the table)")
    print("relative errors against the sgemm (Frobenius); oneDNN's implementation, primitive creation / weight prepack "
          "/ first call ms (own: first call ms):")
    for row in rows:
        errs = " ".join(f"{k} {v:.1e}" for k, v in row["rel_err"].items())
        first = row["first_ms"]
        b = row["dnnl_bf16"]
        line = f"  {row['kind']} {row['M']}x{row['N']}x{row['K']}: {errs}; dnnl bf16 {b['impl']} " \
               f"{b['create_ms']:.1f}/{b['prepack_ms']:.1f}/{first['dnnl bf16']:.1f}; own bf16 {first['own bf16']:.1f}"
        if "dnnl_int8" in row:
            q = row["dnnl_int8"]
            line += f"; dnnl i8 {q['impl']} {q['create_ms']:.1f}/{q['prepack_ms']:.1f}/{first['dnnl i8']:.1f}" \
                    f"; own i8 (with weight packing) {first['own i8']:.1f}"
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "blas_core": info["blas_core"], "cpu_flags": cpu_flags(),
                       "onednn": dn.version(), "onednn_isa": dn.isa(), "sgemm_peak_gflops": peak, "rows": rows}, f,
                      indent=1)
    dn.release(keep=0)


if __name__ == "__main__":
    main()
