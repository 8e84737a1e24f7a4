"""Kernel benchmark: GFLOP/s of bertqa's linear and attention (forward and backward) at BERT shapes, next to
the GFLOP/s of one large sgemm on the same cores in the same run, and next to NumPy (and PyTorch on CPU, when
it is importable) doing the same math.

    python bench/ops.py                 # B=8, T=384, hidden 384 (MiniLM) and 768 (BERT-base)
    python bench/ops.py --quick         # smaller repeat counts
    python bench/ops.py --json out.json
    python bench/ops.py --fused         # fused attention over packed rows vs the [B,NH,T,T] kernels and SDPA
    python bench/ops.py --isa           # bertqa's own kernels, AVX2 against AVX-512: GB/s, share of a STREAM triad
    python bench/ops.py --isa-engine    # bench/engine.py's training steps under BERTQA_CPU=avx2 and =avx512

The machine is shared and noisy: every figure is the median of several runs, and the ratios that matter
(share of the sgemm peak, speed-up over NumPy / PyTorch) are taken within this one run.
"""
import argparse
import json
import os
import platform
import subprocess
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


def bench_isa_engine(cases, reps, rounds, T=384):
    """bench/engine.py's bertqa cases (each in a fresh process, as there: step seconds, paired share, the engine's
    profile of one more step) under BERTQA_CPU=avx2 and =avx512, the two alternating for `rounds` rounds."""
    engine_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine.py")
    out = {}
    for index in cases:
        runs = {"avx2": [], "avx512": []}
        for _ in range(rounds):
            for isa in runs:
                for attempt in (1, 2):   # once more if the child fails (another build replacing _C meanwhile)
                    r = subprocess.run([sys.executable, engine_py, "--case", "bertqa", str(index), "--seq", str(T),
                                        "--reps", str(reps)], env={**os.environ, "BERTQA_CPU": isa},
                                       capture_output=True, text=True)
                    if r.returncode == 0:
                        break
                    print(f"# case {index} under {isa} failed (attempt {attempt}):\n{r.stderr[-2000:]}", file=sys.stderr)
                r.check_returncode()
                runs[isa].append(json.loads(r.stdout.strip().splitlines()[-1]))
        out[index] = runs
    return out


def print_isa_engine(results, T=384):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import engine as bench_engine   # bench/engine.py: its CASES

    kinds = [("forward.attention", "backward.attention"), ("forward.gelu", "backward.gelu"),
             ("forward.layernorm", "backward.layernorm"), ("forward.dropout_residual", "backward.dropout_residual"),
             ("adamw",), ("forward.linear", "backward.linear")]
    for index, runs in results.items():
        name, what, B = bench_engine.CASES[index]
        med = {isa: float(np.median([r["seconds"] for r in rs])) for isa, rs in runs.items()}
        shares = {isa: float(np.median([r["share"] for r in rs])) for isa, rs in runs.items()}
        print(f"\n{name}, {what}, B={B} x T={T}: median step over {len(runs['avx2'])} processes each, alternating: "
              f"AVX2 {1e3 * med['avx2']:.0f} ms ({B / med['avx2']:.2f} seq/s, paired share {100 * shares['avx2']:.0f}%), "
              f"AVX-512 {1e3 * med['avx512']:.0f} ms ({B / med['avx512']:.2f} seq/s, paired share "
              f"{100 * shares['avx512']:.0f}%): {med['avx2'] / med['avx512']:.3f}x; per process "
              + ", ".join(f"{isa} " + "/".join(f"{1e3 * r['seconds']:.0f}" for r in rs) for isa, rs in runs.items()))
        print("| work (engine profile, median over the processes' profiled step) | AVX2 ms | AVX-512 ms | speed-up |")
        print("|---|---:|---:|---:|")
        for group in kinds:
            ms = {isa: 1e3 * float(np.median([sum(r["breakdown"].get(k, 0.0) for k in group) for r in rs]))
                  for isa, rs in runs.items()}
            print(f"| {' + '.join(group)} | {ms['avx2']:.1f} | {ms['avx512']:.1f} | {ms['avx2'] / max(ms['avx512'], 1e-9):.2f}x |")
        tot = {isa: 1e3 * float(np.median([r["breakdown"]["total"] for r in rs])) for isa, rs in runs.items()}
        print(f"| whole profiled step | {tot['avx2']:.0f} | {tot['avx512']:.0f} | {tot['avx2'] / tot['avx512']:.2f}x |")


# ---- the fused attention over packed rows (csrc/attention_fused.c) -------------------------------------------------

def squad_lengths(B, T):
    """Real tokens per row of a batch of SQuAD-like windows, as bench/engine.py draws them: normal(175, 70)
    clipped to [48, T], one row of T."""
    lengths = np.clip(np.random.default_rng(1).normal(175, 70, B), 48, T).astype(np.int64)
    lengths[0] = T
    return lengths


def interleaved_times(fns, reps):
    """Median seconds of each fn, the fns run in turn (ABC ABC ...) so that the machine's drift falls on all."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_attention_fused(NH, HS, lengths, reps, p=0.1):
    """Attention as training runs it, on packed rows of the given lengths: the fused kernel (ops.attention_rows:
    forward keeping each query's max and sum, forward + backward, and with dropout p), the [B,NH,T,T] kernels row by row
    (ops.attention / attention_backward on each row: probabilities stored, what the engine ran before), and
    PyTorch's scaled_dot_product_attention on the padded [B,NH,T,HS] batch with BERT's additive mask. GFLOP/s
    count the useful matrix products of the real tokens: 4 NH HS sum_b T_b^2 forward, 3x that forward + backward
    (the fused backward's recomputed q k^T is not counted)."""
    rng = np.random.default_rng(3)
    lengths = np.asarray(lengths, np.int64)
    B, T, N = len(lengths), int(lengths.max()), int(lengths.sum())
    off = np.concatenate([[0], np.cumsum(lengths)])
    q, k, v, dout = (rng.standard_normal((N, NH, HS)).astype(np.float32) for _ in range(4))
    flops = {"fwd": 4.0 * NH * HS * float((lengths.astype(np.float64) ** 2).sum())}
    flops["fb"] = flops["drop"] = 3 * flops["fwd"]

    def fused(train, drop):
        def run():
            out, state = ops.attention_rows(q, k, v, off, dropout_p=drop, seed=1, return_state=True)
            if train:
                ops.attention_rows_backward(dout, q, k, v, out, state, off, dropout_p=drop, seed=1)
        return run

    heads = [[np.ascontiguousarray(a[off[b]:off[b + 1]].transpose(1, 0, 2))[None] for a in (q, k, v, dout)]
             for b in range(B)]   # [1, NH, T_b, HS] per row

    def per_row(train, drop):
        if train:   # ops.attention_backward runs the forward (probabilities kept) and the backward from them
            return lambda: [ops.attention_backward(d, a, b, c, None, drop, 1) for a, b, c, d in heads]
        return lambda: [ops.attention(a, b, c, None, drop, 1) for a, b, c, _ in heads]

    fns = {("fused", "fwd"): fused(False, 0.0), ("fused", "fb"): fused(True, 0.0), ("fused", "drop"): fused(True, p),
           ("rows", "fwd"): per_row(False, 0.0), ("rows", "fb"): per_row(True, 0.0), ("rows", "drop"): per_row(True, p)}
    if torch is not None:
        def padded(a):
            x = np.zeros((B, T, NH, HS), np.float32)
            for b in range(B):
                x[b, :lengths[b]] = a[off[b]:off[b + 1]]
            return torch.from_numpy(x.transpose(0, 2, 1, 3).copy())
        tq, tk, tv, tdo = (padded(a) for a in (q, k, v, dout))
        for t in (tq, tk, tv):
            t.requires_grad_()
        bias = torch.from_numpy(((np.arange(T)[None] >= lengths[:, None]) * -10000.0).astype(np.float32))[:, None, None]
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def torch_fwd():
            with torch.no_grad():
                sdpa(tq, tk, tv, attn_mask=bias)

        def torch_fb():
            torch.autograd.grad(sdpa(tq, tk, tv, attn_mask=bias), (tq, tk, tv), tdo)

        fns[("torch", "fwd")], fns[("torch", "fb")] = torch_fwd, torch_fb
    secs = interleaved_times(fns, reps)
    row = {"case": f"NH={NH} HS={HS}", "lengths": f"B={B} T={T}" if (lengths == T).all() else
           f"B={B} mix {lengths.min()}-{T}, mean {lengths.mean():.0f}"}
    for (system, mode), t in secs.items():
        row[f"{system}_{mode}"] = flops[mode] / t / 1e9
    return row


def print_attention_fused(rows, peak, p):
    cols = [("fused_fwd", "fused fwd"), ("fused_fb", "fused f+b"), ("fused_drop", f"fused f+b p={p}"),
            ("rows_fwd", "[T,T] fwd"), ("rows_fb", "[T,T] f+b"), ("rows_drop", f"[T,T] f+b p={p}"),
            ("torch_fwd", "SDPA fwd"), ("torch_fb", "SDPA f+b")]
    print("GFLOP/s of the real tokens' attention products (higher is better)\n"
          "| case | lengths | " + " | ".join(c[1] for c in cols) + " | fused/[T,T] f+b p | fused/SDPA f+b | "
          "fused f+b % peak |")
    print("|" + "---|" * (len(cols) + 5))
    for r in rows:
        vals = " | ".join(f"{r[c]:.1f}" if c in r else "-" for c, _ in cols)
        vs_torch = f"{r['fused_fb'] / r['torch_fb']:.2f}x" if "torch_fb" in r else "-"
        print(f"| {r['case']} | {r['lengths']} | {vals} | {r['fused_drop'] / r['rows_drop']:.2f}x | {vs_torch} | "
              f"{100 * r['fused_fb'] / peak:.0f}% |")


def run_fused(args, reps):
    info = ops.runtime_info()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {info['omp_threads']} OpenMP "
          f"threads, BLAS: {info['blas_config']} (core {info['blas_core']}), bertqa kernels {info.get('isa', '?')}, "
          f"numpy {np.__version__}"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else ", torch not installed"))
    n = 2048 if args.quick else 3072
    ours, numpy_peak = sgemm_peak(n, reps)
    peak = max(ours, numpy_peak)
    print(f"# sgemm {n}x{n}x{n} on the same cores: {ours:.1f} GFLOP/s through bertqa's BLAS path, "
          f"{numpy_peak:.1f} through NumPy; peak = {peak:.1f} GFLOP/s\n")
    B, T = args.batch, args.seq
    rows = [bench_attention_fused(NH, HS, lengths, reps)
            for NH, HS in ((12, 32), (12, 64)) for lengths in (np.full(B, T), squad_lengths(B, T))]
    print_attention_fused(rows, peak, 0.1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_gflops": peak, "runtime": info, "rows": rows}, f, indent=1)
    return 0

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
                    help="bench/engine.py's training steps (MiniLM B=8, BERT-base B=2) under BERTQA_CPU=avx2 / avx512")
    ap.add_argument("--rounds", type=int, default=3, help="--isa-engine: processes per ISA, alternating")
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
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import engine as bench_engine   # bench/engine.py: its cases, by name

            cases = [bench_engine.CASES.index(c) for c in (("MiniLM-L6 (H384, L6)", "train step", 8),
                                                           ("BERT-base (H768, L12)", "train step", 2))]
            engine = bench_isa_engine(cases, 2 if args.quick else 5, args.rounds)
            print_isa_engine(engine)
            result["engine"] = engine
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
