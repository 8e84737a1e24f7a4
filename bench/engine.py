"""Engine benchmark: a whole training step (forward + backward + AdamW) and eval-mode inference at BERT shapes,
bertqa's C engine next to PyTorch on the same CPU cores (transformers' BertForQuestionAnswering when it is
importable) and ONNX Runtime (inference cases, when onnx + onnxruntime are importable: bertqa's own ONNX export,
fused by ORT's transformer optimizer), with the model FLOP rate, its share of the machine's measured sgemm peak,
and peak RSS.

    python bench/engine.py                       # MiniLM-L6 and BERT-base shapes, T=384, random weights
    python bench/engine.py --quick               # fewer repeats
    PYTHONPATH=. /work/refenv/bin/python bench/engine.py   # where torch + transformers live elsewhere

Each case runs in a fresh process (so its peak RSS is its own, and one framework's allocator state does not
colour the other's); ratios are taken within the one run.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bertqa import checkpoint, ops
from bertqa.config import BertConfig
from bertqa.model import BertQA

try:
    import torch
    import transformers
except ImportError:  # the comparison column is left out
    torch = transformers = None
try:
    import onnx  # noqa: F401
    import onnxruntime
except ImportError:  # the ONNX Runtime column is left out
    onnxruntime = None

SHAPES = {
    "MiniLM-L6 (H384, L6)": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "BERT-base (H768, L12)": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072),
}


def config_for(shape):
    return BertConfig.from_dict(dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
                                     hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                     layer_norm_eps=1e-12, initializer_range=0.02, **shape))


def model_flops(config, B, T, train, lengths=None):
    """Matrix-product FLOPs of one forward (x3 for forward + backward): 2 * (weights used per token) per token,
    plus attention's two T x T products. With lengths (real tokens per row), the useful work only: what a model
    must compute for those tokens, whatever it spends on padding."""
    C, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_token = 2 * L * (4 * C * C + 2 * C * I) + 2 * 2 * C
    rows = np.full(B, T, np.int64) if lengths is None else np.asarray(lengths, np.int64)
    fwd = float(rows.sum() * per_token + L * 4 * (rows.astype(np.float64) ** 2).sum() * C)
    return 3 * fwd if train else fwd


def ragged_lengths(rng, B, T):
    """Real tokens per row of a padded batch like SQuAD's (mean ~175 tokens of question + paragraph, the longest
    at T): normal(175, 70) clipped to [48, T], one row of T."""
    lengths = np.clip(rng.normal(175, 70, B), 48, T).astype(np.int64)
    lengths[0] = T
    return lengths


def timed(fn, reps, warmup_s=1.0):
    """Median seconds of fn over reps calls, after warm-up calls for at least warmup_s (and at least one):
    arena allocation, page faults, thread start-up. One call was not enough for ONNX Runtime: a fresh session's
    first ~10 calls at B=1 took 61, 43, 36, ... ms before settling at 33 (2026-12-02), which made its
    separate-process figure look 1.5x slower than bertqa when the two were level in the same process."""
    t_end = time.perf_counter() + warmup_s
    fn()
    while time.perf_counter() < t_end:
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def batch_for(rng, config, B, T, lengths=None):
    ids = rng.integers(1000, config.vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    if lengths is not None:
        mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
        ids[mask == 0] = 0
    types = np.zeros((B, T), np.int64)
    types[:, 24:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                start_positions=rng.integers(24, T, B), end_positions=rng.integers(24, T, B))


def engine_step(model, batch, train):
    """One training step (forward + backward + AdamW) or one eval forward of `model` on `batch`, as a callable; a
    list of batches: one training step on each."""
    if isinstance(batch, list):
        return lambda: [model.train_step(b, lr=1e-5) for b in batch]
    if train:
        return lambda: model.train_step(batch, lr=1e-5)
    return lambda: model.forward(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def bench_bertqa(config, batch, train, reps, breakdown=None):
    """Median seconds per step; breakdown (a dict), when given, gets the engine's profile of one more step."""
    model = BertQA(config, seed=0)
    step = engine_step(model, batch, train)
    t = timed(step, reps)
    if breakdown is not None:
        model.profile(reset=True)
        t0 = time.perf_counter()
        step()
        breakdown.update(model.profile(), total=time.perf_counter() - t0)
    return t


def bench_torch(config, batch, train, reps):
    hf_config = transformers.BertConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    model = transformers.BertForQuestionAnswering(hf_config)
    if isinstance(batch, list):   # the SQuAD case: one step per batch, each as the trainer trimmed it
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
        tbs = [{k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items()} for b in batch]

        def steps():
            for tb_ in tbs:
                opt.zero_grad()
                model(**tb_).loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()

        return timed(steps, reps)
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)

        def step():
            opt.zero_grad()
            model(**tb).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        return timed(step, reps)
    model.eval()
    inputs = {k: tb[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    def infer():
        with torch.inference_mode():
            model(**inputs)

    return timed(infer, reps)


def export_for_ort(config, path):
    """bertqa's ONNX export of the model bench_bertqa times (BertQA(config, seed=0)), fused by ORT's transformer
    optimizer (one EmbedLayerNormalization, Attention + 2 SkipLayerNormalization + BiasGelu per layer); made in
    a process of its own, so the ORT case's peak RSS is the session's, not the exporter's (and the parent's, which
    every child's ru_maxrss starts from, stays small)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from bertqa import onnx as bq_onnx

    bq_onnx.export(BertQA(config, seed=0), path)
    fused = optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size, opt_level=0)
    if not fused.is_fully_optimized():
        raise RuntimeError(f"ORT's optimizer did not fuse the export: {fused.get_fused_operator_statistics()}")
    fused.save_model_to_file(str(path))
    return path


def bench_ort(path, batch, reps):
    """(median seconds, peak RSS MB) of ONNX Runtime on the file export_for_ort wrote, with as many intra-op threads
    as cores and no spinning (idle ORT threads would otherwise take the cores from the next case)."""
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = os.cpu_count()
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    t = timed(lambda: session.run(None, feed), reps)
    return t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, lambda: session.run(None, feed)


def paired_ratio(config, batch, ort_step, reps):
    """Median over reps of ORT's time / bertqa's for one call each, back to back in this process: the case's
    figures come from separate processes minutes apart, and this shared machine's speed drifts by tens of
    percent meanwhile, so the ratio that matters is taken pairwise too (both runtimes' threads sleep when idle)."""
    step = engine_step(BertQA(config, seed=0), batch, False)
    step()
    ort_step()
    ratios = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        ort_step()
        ratios.append((time.perf_counter() - t1) / (t1 - t0))
    return float(np.median(ratios))


def sgemm_peak(sizes=(2048, 3072), reps=4):
    """The machine's measured sgemm rate: the fastest single C = A B^T product of n x n x n, over the sizes, through
    bertqa's BLAS and through NumPy's. A peak (not a median), so the engine's shares of it are conservative. A and
    B are distinct matrices: NumPy computes a @ a.T by syrk (half the products), which would inflate a rate
    counted as 2 n^3 (this benchmark did that before 2026-11-26, understating every share)."""
    rng = np.random.default_rng(0)
    best = 0.0
    for n in sizes:
        a = rng.standard_normal((n, n)).astype(np.float32)
        b = rng.standard_normal((n, n)).astype(np.float32)
        c = np.empty((n, n), np.float32)
        for fn in (lambda: ops._C.sgemm(a, b, c), lambda: np.matmul(a, b.T, out=c)):
            fn()  # warm-up
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                best = max(best, 2.0 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def paired_share(config, batch, train, reps, flops, n=2048):
    """(median sgemm rate, median share of it): the machine's speed drifts by tens of percent within minutes
    (other tenants), so each engine step is timed between two n^3 sgemm products and its rate taken as a share
    of the faster of that pair; the median over reps pairs is the figure reported."""
    model = BertQA(config, seed=0)
    step = engine_step(model, batch, train)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    c = np.empty((n, n), np.float32)

    def sgemm_rate():
        t0 = time.perf_counter()
        ops._C.sgemm(a, b, c)
        return 2.0 * n**3 / (time.perf_counter() - t0) / 1e9

    step()
    sgemm_rate()
    peaks, shares = [], []
    for _ in range(reps):
        before = sgemm_rate()
        t0 = time.perf_counter()
        step()
        rate = flops / (time.perf_counter() - t0) / 1e9
        peak = max(before, sgemm_rate())
        peaks.append(peak)
        shares.append(rate / peak)
    return float(np.median(peaks)), float(np.median(shares))


# (shape, work, batch) as the issue asks: training at B=8; inference at B=1 and B=8; BERT-base training at a
# smaller batch so the PyTorch side finishes in minutes on two cores.
# "inference, padded": a batch of windows of SQuAD-like lengths padded to T, as evaluation and a serving batch
# send it (rates count the real tokens' work only; bertqa computes no padding, PyTorch computes all of it).
# "train, SQuAD batches": fine-tuning as `bertqa finetune` runs it: the first SQUAD_STEPS batches of 16 windows of
# valid.json in the trainer's order (seed 42), each trimmed to its longest window (a multiple of 8) as the trainer
# sends it; one "step" of the table is all of them, rates count the real tokens' work (PyTorch computes the padding).
CASES = [("MiniLM-L6 (H384, L6)", "train step", 8), ("MiniLM-L6 (H384, L6)", "inference", 1),
         ("MiniLM-L6 (H384, L6)", "inference", 8), ("BERT-base (H768, L12)", "train step", 2),
         ("BERT-base (H768, L12)", "inference", 1), ("BERT-base (H768, L12)", "inference", 8),
         ("MiniLM-L6 (H384, L6)", "inference, padded", 16), ("MiniLM-L6 (H384, L6)", "train, SQuAD batches", 16)]
SQUAD_STEPS = 4
TRAINING = ("train step", "train, SQuAD batches")


def squad_batches(B, steps):
    """The trainer's first `steps` micro-batches of valid.json windows (T=384, stride 128, seed 42)."""
    from bertqa.squad import load_features
    from bertqa.tokenization import BertQATokenizer
    from bertqa.train import data_rng_state, epoch_order

    data = Path(os.environ.get("BERTQA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    tokenizer = BertQATokenizer.from_pretrained(checkpoint.resolve_model("all-MiniLM-L6-v2"))
    _, features = load_features(data / "squad" / "valid.json", tokenizer, max_seq_length=384, doc_stride=128,
                                max_query_length=64, progress=False)
    order = epoch_order(data_rng_state(42, 0), len(features))
    return [features.batch(order[i * B:(i + 1) * B]) for i in range(steps)]


def case_batch(index, T):
    """(config, batch, real tokens per row or None) of case index; for the SQuAD case a list of batches, and the
    real tokens of all of them."""
    name, what, B = CASES[index]
    config = config_for(SHAPES[name])
    rng = np.random.default_rng(0)
    if what == "train, SQuAD batches":
        batches = squad_batches(B, SQUAD_STEPS)
        return config, batches, np.concatenate([b["attention_mask"].sum(axis=1) for b in batches])
    lengths = ragged_lengths(np.random.default_rng(1), B, T) if what.endswith("padded") else None
    return config, batch_for(rng, config, B, T, lengths), lengths


def run_case(framework, index, T, reps, onnx_path=None):
    """One case in this process: prints {"seconds": median step time, "max_rss_mb": peak RSS}."""
    name, what, B = CASES[index]
    config, batch, lengths = case_batch(index, T)
    fn = bench_bertqa if framework == "bertqa" else bench_torch
    breakdown = {}
    train = what in TRAINING
    rss = None
    if framework == "ort":   # share: here the paired ORT / bertqa time ratio
        t, rss, ort_step = bench_ort(onnx_path, batch, reps)
        local_peak, share = None, paired_ratio(config, batch, ort_step, reps)
    elif framework == "torch":
        torch.manual_seed(0)
        t = fn(config, batch, train, reps)
        local_peak = share = None
    else:
        t = fn(config, batch, train, reps, breakdown)
        local_peak, share = paired_share(config, batch, train, reps, case_flops(index, T))
    print(json.dumps({"seconds": t, "max_rss_mb": rss or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "breakdown": breakdown, "local_peak": local_peak, "share": share}))


def case_flops(index, T):
    """Model FLOPs of one table step of case index (the SQuAD case: its real tokens' work, all its batches)."""
    name, what, B = CASES[index]
    config, _, lengths = case_batch(index, T)
    if what == "train, SQuAD batches":
        return model_flops(config, len(lengths), T, True, lengths)
    return model_flops(config, B, T, what in TRAINING, lengths)


def case_windows(index):
    """Windows in one table step of case index."""
    _, what, B = CASES[index]
    return B * SQUAD_STEPS if what == "train, SQuAD batches" else B


def export_in_child(index, path):
    subprocess.run([sys.executable, __file__, "--export-onnx", str(index), str(path)], capture_output=True, text=True,
                   check=True)
    return path


def in_child(framework, index, T, reps, onnx_path=None):
    out = subprocess.run([sys.executable, __file__, "--case", framework, str(index), "--seq", str(T), "--reps",
                          str(reps)] + (["--onnx", str(onnx_path)] if onnx_path else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seq", type=int, default=384)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", action="append", default=None, metavar="TEXT",
                    help="run only the cases whose 'model work' contains TEXT (repeatable), e.g. --only SQuAD")
    ap.add_argument("--case", nargs=2, metavar=("FRAMEWORK", "INDEX"), help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)   # the ORT case's model file (export_for_ort)
    ap.add_argument("--export-onnx", nargs=2, metavar=("INDEX", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    T = args.seq
    if args.export_onnx:
        return export_for_ort(case_batch(int(args.export_onnx[0]), T)[0], args.export_onnx[1]) and None
    if args.case:
        return run_case(args.case[0], int(args.case[1]), T, reps, args.onnx)
    info = ops.runtime_info()
    print(f"# {os.cpu_count()} CPUs, {info['omp_threads']} threads, {info['blas_config']}; "
          + (f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}"
             if torch else "torch not installed: no comparison column")
          + (f"; onnxruntime {onnxruntime.__version__} ({os.cpu_count()} intra-op threads, no spinning)"
             if onnxruntime else "; onnxruntime not installed: no ORT column"))
    try:  # which BLAS kernels each library picked (OPENBLAS_CORETYPE changes OpenBLAS's)
        from threadpoolctl import threadpool_info

        print("# threadpoolctl: " + "; ".join(f"{d.get('prefix')} {d.get('version')} {d.get('architecture', '')} "
                                              f"({d.get('num_threads')} threads)" for d in threadpool_info()
                                              if d.get("user_api") == "blas"))
    except ImportError:
        pass
    # The peak is measured before and after the cases (the larger counts): on a shared machine the rate drifts.
    peak_before = sgemm_peak()
    rows = []
    onnx_dir = tempfile.TemporaryDirectory(prefix="bertqa-bench-ort-")
    onnx_files = {}   # shape name -> its ORT file
    for i, (name, what, B) in enumerate(CASES):
        if args.only and not any(text in f"{name} {what}" for text in args.only):
            continue
        config, _, lengths = case_batch(i, T)
        if onnxruntime is not None and what not in TRAINING and name not in onnx_files:
            onnx_files[name] = export_in_child(i, os.path.join(onnx_dir.name, f"{len(onnx_files)}.onnx"))
        ours = in_child("bertqa", i, T, reps)
        theirs = in_child("torch", i, T, reps) if torch is not None else None
        ort = in_child("ort", i, T, reps, onnx_files[name]) if name in onnx_files and what not in TRAINING else None
        t, tt = ours["seconds"], theirs["seconds"] if theirs else None
        to = ort["seconds"] if ort else None
        gf = case_flops(i, T) / t / 1e9
        B = case_windows(i)
        rows.append((name, what, B, B / t, gf, (ours["local_peak"], ours["share"]), ours["max_rss_mb"], (B / tt) if tt else None,
                     (tt / t) if tt else None, theirs["max_rss_mb"] if theirs else None,
                     (B / to, to / t, ort["max_rss_mb"], ort["share"]) if to else None, ours.get("breakdown")))
        print(f"  {name} {what} B={B}: {B / t:.2f} seq/s" + (f" (torch {B / tt:.2f})" if tt else "")
              + (f" (ORT {B / to:.2f})" if to else ""), file=sys.stderr)
    onnx_dir.cleanup()
    peak_after = sgemm_peak()
    peak = max(peak_before, peak_after)
    print(f"# sgemm peak on these cores: {peak:.1f} GFLOP/s (before the cases {peak_before:.1f}, after "
          f"{peak_after:.1f}). 'paired share': each step timed between two 2048^3 sgemm products, its rate as a "
          f"share of the faster of the pair, median over {reps} pairs ('sgemm' column: the pairs' median rate); "
          f"'bertqa / ORT, paired': one bertqa and one ORT call back to back in one process, median over {reps} "
          f"pairs of ORT's time / bertqa's\n")
    print("| model | work | B x T | bertqa seq/s | GFLOP/s | % of run's peak | sgemm (paired) | paired share | "
          "peak RSS | PyTorch seq/s | PyTorch peak RSS | bertqa speed-up | ORT seq/s | ORT peak RSS | "
          "bertqa / ORT | bertqa / ORT, paired |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, what, B, sps, gf, (local, share), rss, tsps, ratio, trss, ort, _ in rows:
        print(f"| {name} | {what} | {B} x {T} | {sps:.2f} | {gf:.1f} | {100 * gf / peak:.0f}% | {local:.1f} | "
              f"**{100 * share:.0f}%** | {rss:.0f} MB | "
              + (f"{tsps:.2f} | {trss:.0f} MB | {ratio:.2f}x |" if tsps else "- | - | - |")
              + (f" {ort[0]:.2f} | {ort[2]:.0f} MB | {ort[1]:.2f}x | **{ort[3]:.2f}x** |" if ort
                 else " - | - | - | - |"))
    # Where one training step's time goes (the engine's own profile, BertQA.profile), per case trained.
    for name, what, B, *_, breakdown in rows:
        if what not in TRAINING or not breakdown:
            continue
        total = breakdown.pop("total")
        print(f"\n{name}, {what}, B={B}, T={T}: one step {1e3 * total:.0f} ms")
        print("| work | ms | share |\n|---|---:|---:|")
        for key, sec in sorted(breakdown.items(), key=lambda kv: -kv[1]):
            if sec > 0:
                print(f"| {key} | {1e3 * sec:.1f} | {100 * sec / total:.1f}% |")
        rest = total - sum(breakdown.values())
        print(f"| outside the engine (Python, gradient zeroing) | {1e3 * rest:.1f} | {100 * rest / total:.1f}% |")


if __name__ == "__main__":
    sys.exit(main())
