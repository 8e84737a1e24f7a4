"""bertqa's CUDA engine against PyTorch on the same GPU, in one run (the issue's benchmark table).

Rows: training step (forward + backward + global-norm clipping + AdamW) at the bert-base shape (B=32, T=384) and
the all-MiniLM-L6-v2 shape, and inference at B=1 and B=64, T=384 (bert-base). Columns for each system: sequences/s,
milliseconds per call, model TFLOP/s (matrix-product FLOPs of the model, training = 3 x forward) and MFU against a
large bf16 matrix product measured at the start of the same run.

bertqa: BertQA(device="cuda", precision="bf16"), random weights, the inputs as numpy arrays (host -> device per
call, the loss / logits back to the host); its attention is cuDNN's fused kernel (the default), and the system
"bertqa-own" is the same engine with its own attention kernels (attention="own"), for the cuDNN / own ratio. PyTorch: transformers' BertForQuestionAnswering with random weights,
SDPA attention, bf16 autocast, torch.optim.AdamW(fused=True), clip_grad_norm_; the same inputs, the logits copied
back to the host for inference.

    python bench/gpu_bench.py                  # on a GPU machine
    python bench/gpu_bench.py --tiny --cpu     # code-path check without a GPU: tiny shapes, bertqa's CPU engine

Each measurement prints as soon as it is made, so a run cut short still reports what it got; --json writes all
results to a file.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # name: (hidden, layers, heads, intermediate)
    "bert-base": (768, 12, 12, 3072),
    "minilm-l6": (384, 6, 12, 1536),
    "tiny": (64, 2, 4, 128),
}


def model_config(shape, vocab=30522, positions=512):
    C, L, NH, I = SHAPES[shape]
    return dict(vocab_size=vocab, hidden_size=C, num_hidden_layers=L, num_attention_heads=NH, intermediate_size=I,
                max_position_embeddings=positions, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, initializer_range=0.02, pad_token_id=0)


def forward_flops(shape, B, T):
    """Matrix-product FLOPs of one forward pass (2 per multiply-add): projections, attention, feed-forward, head."""
    C, L, NH, I = SHAPES[shape]
    per_layer = 2 * T * C * 3 * C + 2 * T * T * C * 2 + 2 * T * C * C + 2 * 2 * T * C * I
    return B * (L * per_layer + 2 * T * C * 2)


def make_batch(B, T, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, (B, T))
    ids[:, 0] = 101
    mask = np.ones((B, T), np.int64)
    types = np.zeros((B, T), np.int64)
    types[:, T // 4:] = 1
    sp = rng.integers(T // 4, T - 30, B)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, start_positions=sp,
                end_positions=sp + rng.integers(0, 30, B))


def timed(fn, warmup, iters, sync):
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


# ---- the systems ---------------------------------------------------------------------------------------------

def bertqa_runner(shape, B, T, train, device="cuda", attention="cudnn"):
    from bertqa.config import BertConfig
    from bertqa.model import BertQA

    config = BertConfig.from_dict(model_config(shape))
    # transformers-style random init; bf16 on the GPU (the CPU engine, for --cpu code-path checks, is fp32)
    model = BertQA(config, seed=1, device=device, precision="bf16" if device == "cuda" else None)
    if device == "cuda":
        model._engine.attention = attention
    batch = make_batch(B, T, config.vocab_size)
    if train:
        def step():
            model.zero_grad()
            model.forward_backward(batch)
            model.optimizer_step(3e-5, weight_decay=0.01, max_grad_norm=1.0)
    else:
        def step():
            model.forward(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return model, step, getattr(model._engine, "synchronize", lambda: None)


def torch_runner(shape, B, T, train, device):
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    cfg = BertConfig(**model_config(shape))
    try:
        model = BertForQuestionAnswering._from_config(cfg, attn_implementation="sdpa")
    except (TypeError, ValueError, AttributeError):   # older transformers: set it on the config
        cfg._attn_implementation = "sdpa"
        model = BertForQuestionAnswering(cfg)
    model.to(device)
    print(f"    torch attention implementation: {getattr(model.config, '_attn_implementation', '?')}", flush=True)
    batch = {k: torch.from_numpy(v).to(device) for k, v in make_batch(B, T, cfg.vocab_size).items()}
    dtype = torch.bfloat16
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01, fused=device == "cuda")

        def step():
            with torch.autocast(device_type=device, dtype=dtype):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()   # the loss reaches the host, as bertqa's does
    else:
        model.eval()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

        def step():
            with torch.inference_mode(), torch.autocast(device_type=device, dtype=dtype):
                out = model(**inputs)
            return out.start_logits.float().cpu(), out.end_logits.float().cpu()
    return model, step, sync


def bf16_peak(device, n):
    """TFLOP/s of an n x n x n bf16 matrix product through torch (the MFU denominator)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    t = timed(lambda: a @ b, 3, 10, sync)
    return 2 * n ** 3 / t / 1e12


def release():
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---- the table ---------------------------------------------------------------------------------------------

ROWS = [
    ("train bert-base B=32 T=384", "bert-base", 32, 384, True),
    ("train minilm-l6 B=32 T=384", "minilm-l6", 32, 384, True),
    ("infer bert-base B=1 T=384", "bert-base", 1, 384, False),
    ("infer bert-base B=64 T=384", "bert-base", 64, 384, False),
]
TINY_ROWS = [
    ("train tiny B=4 T=64", "tiny", 4, 64, True),
    ("infer tiny B=1 T=64", "tiny", 1, 64, False),
]


def measure(system, row, device, peak, iters):
    label, shape, B, T, train = row
    model = None
    try:
        if system in ("bertqa", "bertqa-own"):
            model, step, sync = bertqa_runner(shape, B, T, train, device,
                                              attention="own" if system == "bertqa-own" else "cudnn")
        else:
            model, step, sync = torch_runner(shape, B, T, train, device)
        n = iters if B > 1 else iters * 5
        t = timed(step, 3, n, sync)
        flops = forward_flops(shape, B, T) * (3 if train else 1)
        tflops = flops / t / 1e12
        r = dict(system=system, row=label, ms=t * 1e3, seq_per_s=B / t, tflops=tflops,
                 mfu=tflops / peak if peak else float("nan"))
        if system.startswith("bertqa") and hasattr(model._engine, "gemm_stats"):
            r["gemm_calls"] = model._engine.gemm_stats   # how many products found a cuBLASLt algorithm
            r["attention_used"] = model._engine.attention_used
        return r
    except Exception as e:   # noqa: BLE001 - report and go on with the next row
        traceback.print_exc()
        return dict(system=system, row=label, error=f"{type(e).__name__}: {e}"[:300])


def fmt(r):
    if r is None:
        return f"{'-':>10} {'-':>9} {'-':>8} {'-':>6}"
    if "error" in r:
        return f"{'error':>10} {'':>9} {'':>8} {'':>6}"
    return f"{r['seq_per_s']:10.1f} {r['ms']:9.3f} {r['tflops']:8.1f} {100 * r['mfu']:5.1f}%"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the torch half on the CPU (code-path check)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (code-path check)")
    p.add_argument("--systems", default="bertqa,torch,bertqa-own")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    systems = args.systems.split(",")
    rows = TINY_ROWS if args.tiny else ROWS
    results = {"device": device}

    if device == "cuda":
        import bertqa
        from bertqa import cuda
        if not bertqa.cuda_available():
            print(f"bertqa CUDA backend unavailable: {cuda.unavailable_reason()}", flush=True)
            systems = [s for s in systems if not s.startswith("bertqa")]
        else:
            print(f"cuDNN linked: {cuda.cudnn_version()} (0: built without it)", flush=True)
        if bertqa.cuda_available():
            results["gpu"] = cuda.device_info()
            print(f"GPU: {results['gpu']}", flush=True)
    else:
        systems = [s for s in systems if s != "bertqa-own"]   # one attention on the CPU
        if "bertqa" in systems:
            print("--cpu: bertqa runs its CPU engine (fp32), torch runs on the CPU: a code-path check, not a "
                  "benchmark", flush=True)

    peak = None
    try:
        peak = bf16_peak(device, 256 if args.tiny else 8192)
        print(f"bf16 matrix product peak (torch, {'256' if args.tiny else '8192'}^3): {peak:.1f} TFLOP/s", flush=True)
    except Exception as e:   # noqa: BLE001
        print(f"bf16 peak not measured: {e}", flush=True)
    results["bf16_peak_tflops"] = peak

    measured = []
    for row in rows:
        for system in systems:
            r = measure(system, row, device, peak, max(2, args.iters if not args.tiny else 3))
            release()   # the model is gone with measure's frame: hand its memory back before the next one
            measured.append(r)
            if "error" in r:
                print(f"  {system:7s} {row[0]}: {r['error']}", flush=True)
            else:
                print(f"  {system:7s} {row[0]}: {r['seq_per_s']:.1f} seq/s, {r['ms']:.3f} ms, {r['tflops']:.1f} "
                      f"TFLOP/s, MFU {100 * r['mfu']:.1f}%{'  ' + str(r['gemm_calls']) if 'gemm_calls' in r else ''}"
                      f"{'  attention: ' + r['attention_used'] if 'attention_used' in r else ''}", flush=True)
    results["rows"] = measured

    print()
    head = f"{'':32s} | {'bertqa seq/s':>10} {'ms':>9} {'TFLOP/s':>8} {'MFU':>6} | {'torch seq/s':>10} {'ms':>9} " \
           f"{'TFLOP/s':>8} {'MFU':>6} | {'ratio':>6} | {'own-attn seq/s':>14} {'cuDNN/own':>9}"
    print(head)
    print("-" * len(head))
    for label, *_ in rows:
        got = {r["system"]: r for r in measured if r["row"] == label}
        b, t, o = got.get("bertqa"), got.get("torch"), got.get("bertqa-own")
        ok = lambda r: r is not None and "error" not in r   # noqa: E731
        ratio = b["seq_per_s"] / t["seq_per_s"] if ok(b) and ok(t) else math.nan
        own = o["seq_per_s"] if ok(o) else math.nan
        vs_own = b["seq_per_s"] / own if ok(b) and ok(o) else math.nan
        print(f"{label:32s} | {fmt(b)} | {fmt(t)} | {ratio:6.2f} | {own:14.1f} {vs_own:9.2f}")
    print(f"\nMFU against the bf16 product above ({peak if peak else float('nan'):.1f} TFLOP/s); model TFLOP/s "
          "counts matrix-product FLOPs only (training = 3 x forward).")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
