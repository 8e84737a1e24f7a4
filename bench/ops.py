"""Kernel benchmark: GFLOP/s of bertqa's linear and attention (forward and backward) at BERT shapes, next to
the GFLOP/s of one large sgemm on the same cores in the same run, and next to NumPy (and PyTorch on CPU, when
it is importable) doing the same math.

    python bench/ops.py                 # B=8, T=384, hidden 384 (MiniLM) and 768 (BERT-base)
    python bench/ops.py --quick         # smaller repeat counts
    python bench/ops.py --json out.json

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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=384)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
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
