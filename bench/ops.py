"""Kernel benchmark: GFLOP/s of bertqa's linear and attention (forward and backward) at BERT shapes, next to
the GFLOP/s of one large sgemm on the same cores in the same run, and next to NumPy (and PyTorch on CPU, when
it is importable) doing the same math.

    python bench/ops.py                 # B=8, T=384, hidden 384 (MiniLM) and 768 (BERT-base)
    python bench/ops.py --quick         # smaller repeat counts
    python bench/ops.py --json out.json
    python bench/ops.py --fused         # fused attention over packed rows vs the [B,NH,T,T] kernels and SDPA
    python bench/ops.py --isa           # bertqa's own kernels, AVX2 against AVX-512: GB/s, share of a STREAM triad
    python bench/ops.py --isa-engine    # bench/engine.py's training steps, AVX2 and AVX-512 steps in turns

The machine is shared and noisy: every figure is the median of several runs, and the ratios that matter
(share of the sgemm peak, speed-up over NumPy / PyTorch) are taken within this one run.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from bertqa import ops

try:
    import torch
except ImportError:  # optional: the comparison column is left out
    torch = None


def median_time(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def sgemm_peak(n, reps):
    """GFLOP/s of one large square sgemm, through our BLAS path and through NumPy's own OpenBLAS (its threads):
    the larger is the machine's measured peak."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.copy()
    c = np.empty((n, n), np.float32)
    ours = 2.0 * n**3 / median_time(lambda: ops._C.sgemm(a, b, c), reps) / 1e9
    numpy = 2.0 * n**3 / median_time(lambda: np.matmul(a, b.T, out=c), reps) / 1e9
    return ours, numpy


def bench_linear(N, IN, OUT, reps):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, IN)).astype(np.float32)
    w = (rng.standard_normal((OUT, IN)) * 0.02).astype(np.float32)
    b = np.zeros(OUT, np.float32)
    dy = rng.standard_normal((N, OUT)).astype(np.float32)
    flops_f, flops_b = 2.0 * N * IN * OUT, 4.0 * N * IN * OUT
    row = {"op": f"linear {IN}->{OUT}", "shape": f"N={N}"}
    row["fwd"] = flops_f / median_time(lambda: ops.linear(x, w, b), reps) / 1e9
    row["bwd"] = flops_b / median_time(lambda: ops.linear_backward(dy, x, w), reps) / 1e9
    row["numpy_fwd"] = flops_f / median_time(lambda: x @ w.T + b, reps) / 1e9
    row["numpy_bwd"] = flops_b / median_time(lambda: (dy @ w, dy.T @ x, dy.sum(0)), reps) / 1e9
    if torch is not None:
        tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
        tdy = torch.from_numpy(dy)
        row["torch_fwd"] = flops_f / median_time(lambda: torch.nn.functional.linear(tx, tw, tb), reps) / 1e9

        def tbwd():
            y = torch.nn.functional.linear(tx, tw, tb)
            torch.autograd.grad(y, (tx, tw, tb), tdy)

        # torch's backward timing includes its forward: subtract it
        t_fb = median_time(tbwd, reps)
        t_f = flops_f / row["torch_fwd"] / 1e9
        row["torch_bwd"] = flops_b / max(t_fb - t_f, 1e-9) / 1e9
    return row


def numpy_attention(q, k, v, mask):
    s = np.matmul(q, k.transpose(0, 1, 3, 2)) / np.sqrt(q.shape[-1]) + ((1 - mask) * -10000.0)[:, None, None, :]
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.matmul(s, v)


def bench_attention(B, NH, T, HS, reps):
    rng = np.random.default_rng(2)
    q, k, v, dout = (rng.standard_normal((B, NH, T, HS)).astype(np.float32) for _ in range(4))
    mask = np.ones((B, T), np.float32)
    mask[:, T - T // 5:] = 0   # some padding, as real batches have
    flops_f, flops_b = 4.0 * B * NH * T * T * HS, 8.0 * B * NH * T * T * HS   # matrix products only
    row = {"op": f"attention NH={NH} HS={HS}", "shape": f"B={B} T={T}"}
    row["fwd"] = flops_f / median_time(lambda: ops.attention(q, k, v, mask), reps) / 1e9
    # ops.attention_backward recomputes the forward (the engine keeps the probabilities instead): count both
    row["bwd"] = (flops_f + flops_b) / median_time(lambda: ops.attention_backward(dout, q, k, v, mask), reps) / 1e9
    row["numpy_fwd"] = flops_f / median_time(lambda: numpy_attention(q, k, v, mask), reps) / 1e9
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
        tm = torch.from_numpy((1 - mask) * -10000.0)[:, None, None, :]
        tdo = torch.from_numpy(dout)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        row["torch_fwd"] = flops_f / median_time(lambda: sdpa(tq, tk, tv, attn_mask=tm), reps) / 1e9

        def tfb():
            o = sdpa(tq, tk, tv, attn_mask=tm)
            torch.autograd.grad(o, (tq, tk, tv), tdo)

        row["torch_bwd"] = (flops_f + flops_b) / median_time(tfb, reps) / 1e9
    return row


# ---- bertqa's own kernels under each instruction set (csrc/cpu.h) ---------------------------------------------------

def paired_times(fn, reps):
    """Seconds of fn() under AVX2 and under AVX-512, the two interleaved (ABAB...) so that the machine's drift
    falls on both alike: ({isa: median}, {isa: fastest}). fn gets the ISA's name."""
    times = {"avx2": [], "avx512": []}
    for isa in times:   # warm-up, and the first touch of every array
        ops.set_isa(isa)
        fn(isa)
    for _ in range(reps):
        for isa in times:
            ops.set_isa(isa)
            t0 = time.perf_counter()
            fn(isa)
            times[isa].append(time.perf_counter() - t0)
    ops.set_isa("auto")
    return {isa: float(np.median(t)) for isa, t in times.items()}, {isa: float(min(t)) for isa, t in times.items()}


def stream_bandwidth(reps, n=1 << 24):
    """GB/s of a STREAM copy (a = b: 8 bytes per element) and triad (a = b + s c: 12) over 64 MB arrays (past the
    L3), on the same OpenMP threads as the kernels; the best of reps."""
    a, b, c = (np.full(n, 1.0, np.float32) for _ in range(3))
    out = {}
    for kind, name, nbytes in ((0, "copy", 8), (1, "triad", 12)):
        out[name] = nbytes * n / min(median_time(lambda: ops._C._stream(kind, a, b, c, 3.0), 1) for _ in range(reps)) / 1e9
    return out


def bench_isa(reps, N=3072, C=768):
    """Each vectorised kernel at BERT-base shapes (N = 3072 tokens: B=8 x T=384; hidden 768, intermediate 3072;
    AdamW over MiniLM's flat buffers; attention's rows on one head's [384, 384] block, 16 times), in place on
    preallocated arrays, threads as in the engine. GB/s count the bytes a kernel must move at least (float32 reads
    + writes of each array once; LayerNorm backward reads dy and x twice: dx, then the parameter gradients)."""
    _C = ops._C
    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)   # noqa: E731
    x_ffn, dy_ffn, out_ffn = f(N, 4 * C), f(N, 4 * C), np.zeros((N, 4 * C), np.float32)
    x, dy, out, dx = f(N, C), f(N, C), np.zeros((N, C), np.float32), np.zeros((N, C), np.float32)
    w, b, dw, db = f(C), f(C), np.zeros(C, np.float32), np.zeros(C, np.float32)
    mean, rstd = np.zeros(N, np.float32), np.zeros(N, np.float32)
    _C._layernorm_into(out, mean, rstd, x, w, b, 1e-12)
    NP = 22_700_000   # parameters of MiniLM-L6 + QA head: AdamW over the flat buffers (4 x 91 MB)
    prm, grd, m1, m2 = f(NP), f(NP), np.zeros(NP, np.float32), np.zeros(NP, np.float32)
    # attention's rows: one head's [T, T] block at a time, as the attention kernel runs them (in the cores' L2:
    # the GB/s are cache bandwidth, not memory's), 16 blocks per timed call
    T, R = 384, 16
    scores, probs, mk = f(T, T), np.zeros((T, T), np.float32), np.ones((T, T), np.float32)
    mk[:, T - T // 5:] = 0
    g_rows, keep = f(T, T), np.where(rng.random((T, T)) < 0.9, np.float32(1 / 0.9), np.float32(0))
    probs[...] = scores
    _C._rows_into(0, probs, None, None, 0.0)
    work = scores.copy()

    def run_rows(kind, a, m, refresh):
        for _ in range(R):
            if refresh is not None:
                np.copyto(work, refresh)
            _C._rows_into(kind, work, a, m, 0.125)
    cases = [   # (kernel, shape, bytes per element, elements, fn)
        ("gelu forward", f"{N}x{4 * C}", 8, x_ffn.size, lambda isa: _C._gelu_into(out_ffn, x_ffn)),
        ("gelu backward", f"{N}x{4 * C}", 16, x_ffn.size, lambda isa: _C._gelu_into(out_ffn, x_ffn, dy_ffn)),
        ("layernorm forward", f"{N}x{C}", 8, x.size, lambda isa: _C._layernorm_into(out, mean, rstd, x, w, b, 1e-12)),
        ("layernorm backward (dx, dw, db)", f"{N}x{C}", 24, x.size,
         lambda isa: _C._layernorm_backward_into(dx, dw, db, dy, x, w, mean, rstd)),
        ("dropout forward p=0.1", f"{N}x{C}", 8, x.size, lambda isa: _C._dropout_into(out, x, 0.1, 7, 1, 3, False)),
        ("dropout backward p=0.1 (+=)", f"{N}x{C}", 12, x.size, lambda isa: _C._dropout_into(dx, dy, 0.1, 7, 1, 3, True)),
        ("dropout forward p=0.1", f"{N}x{4 * C}", 8, x_ffn.size,
         lambda isa: _C._dropout_into(out_ffn, x_ffn, 0.1, 7, 1, 3, False)),
        ("adamw (flat buffer)", f"{NP / 1e6:.1f}M", 28, NP, lambda isa: ops.adamw(prm, grd, m1, m2, 3, 1e-5, weight_decay=0.01)),
        ("sum of squares (flat gradient)", f"{NP / 1e6:.1f}M", 4, NP, lambda isa: ops.global_norm([grd])),
        ("softmax rows, masked (in L2)", f"{R}x[{T}x{T}]", 12, R * scores.size, lambda isa: run_rows(0, None, mk, None)),
        ("exp rows (in L2)", f"{R}x[{T}x{T}]", 8, R * scores.size, lambda isa: run_rows(1, None, None, None)),
        ("softmax backward rows, dropout mask (in L2)", f"{R}x[{T}x{T}]", 16, R * scores.size,
         lambda isa: run_rows(2, probs, keep, g_rows)),
    ]
    bw_before = stream_bandwidth(reps)
    rows = []
    for name, shape, per, n, fn in cases:
        t, best = paired_times(fn, reps)
        copy_t = 0.0
        if "backward rows" in name:   # the np.copyto that refreshes its input: timed alone, taken off
            copy_t = min(median_time(lambda: [np.copyto(work, g_rows) for _ in range(R)], 1) for _ in range(reps))
        rows.append((name, shape, per, n, {k: max(v - copy_t, 1e-9) for k, v in t.items()},
                     {k: max(v - copy_t, 1e-9) for k, v in best.items()}))
    bw_after = stream_bandwidth(reps)
    return rows, {k: max(bw_before[k], bw_after[k]) for k in bw_before}


def print_isa(rows, bw):
    info = ops.runtime_info()
    print(f"# bertqa kernels' ISAs this CPU runs: {info['isas']}; STREAM on {info['omp_threads']} threads (64 MB "
          f"arrays, best of the runs before and after): copy {bw['copy']:.1f} GB/s, triad {bw['triad']:.1f} GB/s\n")
    print("(medians of interleaved runs; 'best' = the fastest run of each)\n")
    print("| kernel | shape | bytes/elem | AVX2 ms | AVX-512 ms | AVX2 GB/s | AVX-512 GB/s | AVX2 % of triad | "
          "AVX-512 % of triad | AVX-512 speed-up | speed-up, best runs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, shape, per, n, t, best in rows:
        g2, g5 = per * n / t["avx2"] / 1e9, per * n / t["avx512"] / 1e9
        print(f"| {name} | {shape} | {per} | {1e3 * t['avx2']:.2f} | {1e3 * t['avx512']:.2f} | {g2:.1f} | {g5:.1f} | "
              f"{100 * g2 / bw['triad']:.0f}% | {100 * g5 / bw['triad']:.0f}% | {t['avx2'] / t['avx512']:.2f}x | "
              f"{best['avx2'] / best['avx512']:.2f}x |")


def bench_isa_engine(cases, reps, T=384):
    """bench/engine.py's training-step cases in this process, one model each, its steps alternating between AVX2
    and AVX-512 (ops.set_isa before each step: ABAB...), so that each pair of steps sees the same moment of the
    machine; the engine's profile (BertQA.profile) of every step. Per case: {isa: [(seconds, profile), ...]}."""
    import gc

    from bertqa.model import BertQA

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import engine as bench_engine   # bench/engine.py: its cases, batches and step

    out = {}
    for case in cases:
        config, batch, _ = bench_engine.case_batch(bench_engine.CASES.index(case), T)
        model = BertQA(config, seed=0)
        step = bench_engine.engine_step(model, batch, True)
        runs = {"avx2": [], "avx512": []}
        for isa in runs:   # warm-up: the arena, first touch, the BLAS's buffers
            ops.set_isa(isa)
            step()
        for _ in range(reps):
            for isa in runs:
                ops.set_isa(isa)
                model.profile(reset=True)
                t0 = time.perf_counter()
                step()
                runs[isa].append((time.perf_counter() - t0, model.profile()))
        ops.set_isa("auto")
        out[case] = runs
        del model, step
        gc.collect()
    return out


def print_isa_engine(results, T=384):
    kinds = [("forward.attention", "backward.attention"), ("forward.gelu", "backward.gelu"),
             ("forward.layernorm", "backward.layernorm"), ("forward.dropout_residual", "backward.dropout_residual"),
             ("adamw",), ("forward.linear", "backward.linear")]
    for (name, what, B), runs in results.items():
        t = {isa: np.array([r[0] for r in rs]) for isa, rs in runs.items()}
        med = {isa: float(np.median(v)) for isa, v in t.items()}
        pair = float(np.median(t["avx2"] / t["avx512"]))   # each AVX2 step over the AVX-512 step right after it
        print(f"\n{name}, {what}, B={B} x T={T}, {len(t['avx2'])} steps of each in turns: AVX2 median "
              f"{1e3 * med['avx2']:.0f} ms ({B / med['avx2']:.2f} seq/s), AVX-512 {1e3 * med['avx512']:.0f} ms "
              f"({B / med['avx512']:.2f} seq/s): {med['avx2'] / med['avx512']:.3f}x; median of the pairs' ratios "
              f"{pair:.3f}x (range {np.min(t['avx2'] / t['avx512']):.2f}-{np.max(t['avx2'] / t['avx512']):.2f})")
        print("| work (engine profile, median over the steps) | AVX2 ms | AVX-512 ms | speed-up | AVX2 share of step |")
        print("|---|---:|---:|---:|---:|")
        for group in kinds:
            ms = {isa: 1e3 * float(np.median([sum(r[1].get(k, 0.0) for k in group) for r in rs]))
                  for isa, rs in runs.items()}
            print(f"| {' + '.join(group)} | {ms['avx2']:.1f} | {ms['avx512']:.1f} | "
                  f"{ms['avx2'] / max(ms['avx512'], 1e-9):.2f}x | {100 * ms['avx2'] / (1e3 * med['avx2']):.1f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=384)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--fused", action="store_true",
                    help="the fused attention over packed rows against the [B,NH,T,T] kernels and SDPA")
    ap.add_argument("--isa", action="store_true", help="bertqa's own kernels under AVX2 and AVX-512 (csrc/cpu.h)")
    ap.add_argument("--isa-engine", action="store_true",
                    help="bench/engine.py's training steps (MiniLM B=8, BERT-base B=2), AVX2 and AVX-512 in turns")
    ap.add_argument("--steps", type=int, default=8, help="--isa-engine: training steps per ISA, in turns")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    if args.fused:
        return run_fused(args, reps)
    if args.isa or args.isa_engine:
        reps = 5 if args.quick else 15
        info = ops.runtime_info()
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {info['omp_threads']} OpenMP "
              f"threads, BLAS: {info['blas_config']} (core {info['blas_core']}), numpy {np.__version__}")
        if "avx512" not in info["isas"]:
            print("# this CPU cannot run the AVX-512 kernels: nothing to compare")
            return 1
        result = {}
        if args.isa:
            rows, bw = bench_isa(reps)
            print_isa(rows, bw)
            result["kernels"] = {"stream": bw, "rows": [dict(kernel=r[0], shape=r[1], bytes_per_elem=r[2], n=r[3],
                                                             seconds=r[4], best=r[5]) for r in rows]}
        if args.isa_engine:
            cases = [("MiniLM-L6 (H384, L6)", "train step", 8), ("BERT-base (H768, L12)", "train step", 2)]
            engine = bench_isa_engine(cases, args.steps)
            print_isa_engine(engine)
            result["engine"] = [dict(case=list(c), runs={isa: [dict(seconds=t, profile=p) for t, p in rs]
                                                         for isa, rs in runs.items()}) for c, runs in engine.items()]
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runtime": info, **result}, f, indent=1)
        return 0
    B, T = args.batch, args.seq
    info = ops.runtime_info()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {info['omp_threads']} OpenMP "
          f"threads, BLAS: {info['blas_config']} (core {info['blas_core']}), numpy {np.__version__}"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else ", torch not installed"))
    n = 2048 if args.quick else 3072
    ours, numpy_peak = sgemm_peak(n, reps)
    peak = max(ours, numpy_peak)
    print(f"# sgemm {n}x{n}x{n} on the same cores: {ours:.1f} GFLOP/s through bertqa's BLAS path, "
          f"{numpy_peak:.1f} through NumPy; peak = {peak:.1f} GFLOP/s\n")
    rows = []
    for C in (384, 768):
        rows.append(bench_linear(B * T, C, C, reps))
        rows.append(bench_linear(B * T, C, 4 * C, reps))
        rows.append(bench_linear(B * T, 4 * C, C, reps))
        rows.append(bench_attention(B, 12, T, C // 12, reps))
    cols = ["fwd", "bwd", "numpy_fwd", "numpy_bwd", "torch_fwd", "torch_bwd"]
    head = f"| {'op':<24} | {'shape':<11} | " + " | ".join(f"{c:>9}" for c in cols) + " | fwd % peak | bwd % peak |"
    print("GFLOP/s (higher is better)\n" + head)
    print("|" + "---|" * (len(cols) + 4))
    for r in rows:
        vals = " | ".join(f"{r[c]:9.1f}" if c in r else f"{'-':>9}" for c in cols)
        print(f"| {r['op']:<24} | {r['shape']:<11} | {vals} | {100 * r['fwd'] / peak:9.0f}% | {100 * r['bwd'] / peak:9.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_gflops": peak, "runtime": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
