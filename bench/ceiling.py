"""What the BLAS itself allows: the engine's matrix products timed alone at their exact shapes (issue 14).

For one case of bench/engine.py (MiniLM-L6 training at B=8, inference at B=1, BERT-base ...) this times, through
NumPy's BLAS (OpenBLAS, the same kernels bertqa links), every matrix product one step of the engine computes, at the
shape and transposition the engine calls it with, into preallocated outputs, each timed between two 2048^3 sgemm
products like bench/engine.py's paired shares. Then one engine step with its profile, in the same process.

It answers: if every linear layer ran at the rate OpenBLAS reaches on that shape alone, and attention's products at
the rate of the same-shape batched products (no softmax, no masking, no dropout), what share of the sgemm peak could
a step reach? That bound, against the step's measured share, says how much is left in the engine and how much is the
shapes' (MiniLM's 384-wide matrices, attention's 32-wide heads).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/ceiling.py --case minilm-train
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/ceiling.py --case minilm-infer1

A benchmark, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bertqa.model import BertQA  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import config_for, model_flops, batch_for, engine_step, gemm_rate, paired_share  # noqa: E402

SHAPES = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
          "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)}
CASES = {"minilm-train": ("minilm", 8, True), "minilm-infer1": ("minilm", 1, False),
         "minilm-infer8": ("minilm", 8, False), "bert-base-train": ("bert-base", 2, True),
         "bert-base-infer1": ("bert-base", 1, False)}
N_PEAK = 2048


def _peak_pair():
    return gemm_rate("numpy", N_PEAK, seed=1)


def paired(fn, flops, peak_rate, reps, unit_s=0.05):
    """Median share of the faster neighbouring sgemm's rate that fn reaches: calls repeated in units
    of about unit_s (a 2048^3 product's time, so a small product cannot slip into a gap of a loaded machine that
    the sgemm on either side of it did not see), each unit between two sgemm products."""
    fn()
    peak_rate()
    t0 = time.perf_counter()
    fn()
    n = max(1, int(unit_s / max(time.perf_counter() - t0, 1e-6)))
    shares = []
    for _ in range(reps):
        before = peak_rate()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = (time.perf_counter() - t0) / n
        shares.append(flops / t / 1e9 / max(before, peak_rate()))
    return float(np.median(shares))


def products(config, B, T, train):
    """(name, count per step, flops of one, callable) of every matrix product one engine step computes."""
    C, I, L, NH = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads
    HS, N = C // NH, B * T
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    out = []

    def lin(name, n_in, n_out, count):
        x, w, dy = f32(N, n_in), f32(n_out, n_in), f32(N, n_out)
        y, dx, dw = np.empty((N, n_out), np.float32), np.empty((N, n_in), np.float32), np.empty((n_out, n_in), np.float32)
        fl = 2.0 * N * n_in * n_out
        out.append((f"{name} forward  y = x W^T  [{N}x{n_in}] x [{n_in}x{n_out}]", count, fl,
                    lambda: np.matmul(x, w.T, out=y)))
        if train:
            out.append((f"{name} backward dX = dY W  [{N}x{n_out}] x [{n_out}x{n_in}]", count, fl,
                        lambda: np.matmul(dy, w, out=dx)))
            out.append((f"{name} backward dW = dY^T X  [{n_out}x{N}] x [{N}x{n_in}]", count, fl,
                        lambda: np.matmul(dy.T, x, out=dw)))

    lin("q/k/v", C, C, 3 * L)
    lin("attention out", C, C, L)
    lin("FFN up", C, I, L)
    lin("FFN down", I, C, L)
    # attention: per (window, head) the two T x T products (forward), and the backward's four plus the recompute of
    # the scores (FlashAttention-2's backward): batched over B * NH as one stack, through NumPy's matmul loop
    q, k, v = f32(B * NH, T, HS), f32(B * NH, T, HS), f32(B * NH, T, HS)
    s, o = np.empty((B * NH, T, T), np.float32), np.empty((B * NH, T, HS), np.float32)
    fl = 2.0 * B * NH * T * T * HS
    out.append((f"attention S = Q K^T  {B * NH} x [{T}x{HS}] x [{HS}x{T}]", L * (2 if train else 1), fl,
                lambda: np.matmul(q, k.transpose(0, 2, 1), out=s)))
    out.append((f"attention O = P V  {B * NH} x [{T}x{T}] x [{T}x{HS}]", L * (4 if train else 1), fl,
                lambda: np.matmul(s, v, out=o)))
    if train:
        out.append((f"attention dP = dO V^T  {B * NH} x [{T}x{HS}] x [{HS}x{T}]", L, fl,
                    lambda: np.matmul(o, v.transpose(0, 2, 1), out=s)))
    return out


def engine_child(case, T, reps):
    """Prints [median step seconds, paired share of bertqa's sgemm, profile of one step, that step's seconds]."""
    shape, B, train = CASES[case]
    config = config_for(SHAPES[shape])
    batch = batch_for(np.random.default_rng(0), config, B, T)
    flops = model_flops(config, B, T, train)
    peak, share = paired_share(config, batch, train, reps, flops)
    model = BertQA(config, seed=0)
    step = engine_step(model, batch, train)
    step()
    model.profile(reset=True)
    t0 = time.perf_counter()
    step()
    t_prof = time.perf_counter() - t0
    print(json.dumps([flops / (share * peak * 1e9), share, model.profile(), t_prof]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), default="minilm-train")
    ap.add_argument("--seq", type=int, default=384)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--engine-step", metavar="CASE", help=argparse.SUPPRESS)   # the child: one case's engine step
    args = ap.parse_args()
    if args.engine_step:
        return engine_child(args.engine_step, args.seq, args.reps)
    shape, B, train = CASES[args.case]
    T = args.seq
    config = config_for(SHAPES[shape])
    try:
        from threadpoolctl import threadpool_info
        print("# threadpoolctl: " + "; ".join(f"{d.get('prefix')} {d.get('version')} {d.get('architecture', '')} "
                                              f"({d.get('num_threads')} threads)" for d in threadpool_info()
                                              if d.get("user_api") == "blas"))
    except ImportError:
        pass
    peak_rate = _peak_pair()
    rows = []
    for name, count, fl, fn in products(config, B, T, train):
        rows.append((name, count, fl, paired(fn, fl, peak_rate, args.reps)))
    peaks = [peak_rate() for _ in range(3)]
    # the engine's step in its own process, paired with bertqa's own sgemm as bench/engine.py does: NumPy's
    # OpenBLAS threads busy-wait after each product above and would take a core from the engine in this process
    out = subprocess.run([sys.executable, __file__, "--engine-step", args.case, "--seq", str(T), "--reps",
                          str(max(3, args.reps // 2))], capture_output=True, text=True, check=True)
    t_step, share_step, prof, t_prof = json.loads(out.stdout.strip().splitlines()[-1])
    flops = model_flops(config, B, T, train)
    peak = flops / t_step / 1e9 / share_step   # the sgemm rate around the engine's step
    print(f"# {args.case}: B={B} T={T} {'training step' if train else 'inference'}; sgemm {N_PEAK}^3 "
          f"{max(peaks):.0f} GFLOP/s at the end; shares: each product between two sgemm products, median of "
          f"{args.reps}; attention's products as the engine computes them (its backward recomputes the scores)")
    print("| product (NumPy's OpenBLAS, the engine's shape and transposes) | per step | GFLOP | ms alone (at the "
          "step's sgemm rate) | share of sgemm |")
    print("|---|---:|---:|---:|---:|")
    lin_t = lin_f = att_t = att_f = 0.0
    for name, count, fl, share in rows:
        t = fl / (share * peak * 1e9)   # at the step's peak: comparable with the engine's profiled step
        print(f"| {name} | {count} | {fl / 1e9:.2f} | {t * 1e3:.2f} | {share:.0%} |")
        if name.startswith("attention "):
            att_t, att_f = att_t + count * t, att_f + count * fl
        else:
            lin_t, lin_f = lin_t + count * t, lin_f + count * fl
    # the profiled step's split, scaled to the paired median step time
    scale = t_step / t_prof
    other = scale * sum(v for k, v in prof.items() if "linear" not in k and "attention" not in k)
    eng_lin = scale * sum(v for k, v in prof.items() if "linear" in k)
    eng_att = scale * sum(v for k, v in prof.items() if "attention" in k)
    print()
    print("| work | engine (profiled step) ms | products alone at their shapes ms | engine / alone |")
    print("|---|---:|---:|---:|")
    print(f"| linear layers ({lin_f / flops:.0%} of the FLOPs) | {eng_lin * 1e3:.1f} | {lin_t * 1e3:.1f} | "
          f"{eng_lin / lin_t:.2f}x |")
    print(f"| attention ({att_f / flops:.0%}; alone = its products only) | {eng_att * 1e3:.1f} | {att_t * 1e3:.1f} | "
          f"{eng_att / att_t:.2f}x |")
    print(f"| everything else (LayerNorm, GELU, dropout, AdamW, ...) | {other * 1e3:.1f} | - | - |")
    print(f"| whole step (paired median; split as profiled) | {t_step * 1e3:.1f} | | |")
    # in units of the sgemm peak (load-proof): a product's time is its flops over (its share x peak)
    norm_products = sum(count * fl / share for name, count, fl, share in rows)
    norm_other = other / t_step * flops / share_step
    bound_all = flops / norm_products
    bound_other = flops / (norm_products + norm_other)
    print()
    print(f"step: {t_step * 1e3:.1f} ms, paired share **{share_step:.0%}** of sgemm; bounds if every product ran at "
          f"its shape's rate alone: {bound_other:.0%} with the rest of the step as profiled, {bound_all:.0%} with "
          f"nothing else at all")


if __name__ == "__main__":
    main()
