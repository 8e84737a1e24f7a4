"""Engine benchmark: a whole training step (forward + backward + AdamW) and eval-mode inference at BERT shapes,
bertqa's C engine next to PyTorch on the same CPU cores (transformers' BertForQuestionAnswering when it is
importable) and ONNX Runtime (inference cases, when onnx + onnxruntime are importable: bertqa's own ONNX export,
fused by ORT's transformer optimizer), with the model FLOP rate, its share of the machine's measured sgemm peak,
and peak RSS.

    python bench/engine.py                       # MiniLM-L6 and BERT-base shapes, T=384, random weights
    python bench/engine.py --quick               # fewer repeats
    PYTHONPATH=. /work/refenv/bin/python bench/engine.py   # where torch + transformers live elsewhere
    python bench/engine.py --precision fp32,bf16,int8      # the engine's precisions (issue 23)

Each case runs in a fresh process (so its peak RSS is its own, and one framework's allocator state does not
colour the other's); ratios are taken within the one run.

With --precision, every case runs in each precision named (int8: inference cases only), and three more
measurements are made, each in one process of its own, the contenders called in turns (ABC ABC ...) so that
this shared machine's drift slows all of them alike, each ratio the median of the rounds' ratios:
  - bf16 / fp32 and int8 / fp32: the same model (BertQA(config, seed=0)) in each precision;
  - bertqa int8 against ONNX Runtime's own dynamic int8 of the same model (`bertqa export onnx --quantize int8`,
    and the --fused one), inference cases, with the largest logit error of each against bertqa fp32;
  - bertqa bf16 against transformers' BertForQuestionAnswering under torch.autocast("cpu", dtype=torch.bfloat16)
    (and the same PyTorch model in fp32), training cases: forward + backward + clipping + AdamW.
A ratio "X / Y" is X's speed over Y's (Y's time over X's).
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
from bertqa.precision import PRECISIONS

torch = transformers = onnxruntime = None   # import_comparisons() sets them where they are importable


def import_comparisons(want_torch=True, want_ort=True):
    """Import PyTorch + transformers and onnx + ONNX Runtime, those wanted and installed (a missing one leaves its
    column out). A bertqa case's child imports neither: together they take ~540 MB of resident memory (measured
    2026-12-05), which its peak RSS would otherwise count as bertqa's."""
    global torch, transformers, onnxruntime
    if want_torch:
        try:
            import torch
            import transformers
        except ImportError:
            torch = transformers = None
    if want_ort:
        try:
            import onnx  # noqa: F401
            import onnxruntime
        except ImportError:
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


def bench_bertqa(config, batch, train, reps, breakdown=None, precision="fp32"):
    """Median seconds per step; breakdown (a dict), when given, gets the engine's profile of one more step."""
    model = BertQA(config, seed=0, precision=precision)
    step = engine_step(model, batch, train)
    t = timed(step, reps)
    if breakdown is not None:
        model.profile(reset=True)
        t0 = time.perf_counter()
        step()
        breakdown.update(model.profile(), total=time.perf_counter() - t0)
    return t


def torch_model(config):
    hf_config = transformers.BertConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    return transformers.BertForQuestionAnswering(hf_config)


def torch_trainer(model, batch):
    """step(autocast=False): one training step of `model` (forward + backward + clipping + AdamW) on `batch`, or on
    each batch of a list (the SQuAD case, each as the trainer trimmed it); autocast=True runs the forward under
    torch.autocast("cpu", dtype=torch.bfloat16), as transformers' Trainer does for --bf16 on the CPU (the backward
    follows the forward's dtypes; parameters, gradients and AdamW stay fp32)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    tbs = [{k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items()}
           for b in (batch if isinstance(batch, list) else [batch])]

    def step(autocast=False):
        for tb in tbs:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**tb).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    return step


def bench_torch(config, batch, train, reps):
    model = torch_model(config)
    if train or isinstance(batch, list):
        return timed(torch_trainer(model, batch), reps)
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    model.eval()
    inputs = {k: tb[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    def infer():
        with torch.inference_mode():
            model(**inputs)

    return timed(infer, reps)


ORT_INT8 = {"int8": dict(quantize="int8"), "int8-fused": dict(quantize="int8", fused=True)}


def export_for_ort(config, path, kind="fp32"):
    """bertqa's ONNX export of the model bench_bertqa times (BertQA(config, seed=0)), fused by ORT's transformer
    optimizer (one EmbedLayerNormalization, Attention + 2 SkipLayerNormalization + BiasGelu per layer); made in
    a process of its own, so the ORT case's peak RSS is the session's, not the exporter's (and the parent's, which
    every child's ru_maxrss starts from, stays small). kind "int8" / "int8-fused": ONNX Runtime's dynamic int8
    quantisation of the standard / the fused export, as `bertqa export onnx [--fused] --quantize int8` writes them
    (QInt8 weights of MatMul and Attention; activations quantized per tensor at run time)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from bertqa import onnx as bq_onnx

    if kind in ORT_INT8:
        return bq_onnx.export(BertQA(config, seed=0), path, **ORT_INT8[kind])
    bq_onnx.export(BertQA(config, seed=0), path)
    fused = optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size, opt_level=0)
    if not fused.is_fully_optimized():
        raise RuntimeError(f"ORT's optimizer did not fuse the export: {fused.get_fused_operator_statistics()}")
    fused.save_model_to_file(str(path))
    return path


def ort_session(path):
    """An ONNX Runtime session on `path` with as many intra-op threads as cores and no spinning (idle ORT threads
    would otherwise take the cores from the next case, or from the runtime it alternates with)."""
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = os.cpu_count()
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def peak_rss_mb():
    """This process's peak resident set (MB): VmHWM of /proc/self/status, which starts afresh at exec. ru_maxrss does
    not: Python starts a child by vfork + exec, and Linux carries the vforking parent's peak into the child's
    ru_maxrss, so every case read at least the parent's (~770-850 MB with torch and onnxruntime imported)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_ort(path, batch, reps):
    """(median seconds, peak RSS MB, one call) of ONNX Runtime on the file export_for_ort wrote (ort_session)."""
    session = ort_session(path)
    feed = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    t = timed(lambda: session.run(None, feed), reps)
    return t, peak_rss_mb(), lambda: session.run(None, feed)


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


# The yardstick of each precision's share: one n x n x n product C = A B^T through the engine's own kernel of that
# precision, from fp32 operands to an fp32 result as the engine's linear layers take them. bf16: _C._gemm_bf16
# rounds and packs both operands inside the call. int8: _C._gemm_i8 quantizes the activations (per row) inside
# every product and the weights once per call, so it runs INT8_REPEAT products per call (the weights' packing,
# done once per model by the engine, is shared by them).
GEMM_NAMES = {"fp32": "sgemm (OpenBLAS)", "bf16": "bf16 GEMM (_C._gemm_bf16)", "int8": "int8 GEMM (_C._gemm_i8)"}
INT8_REPEAT = 4


def gemm_rate(precision, n, seed=0):
    """A callable giving the GFLOP/s of one n^3 product of `precision` (see GEMM_NAMES; "numpy": NumPy's
    a @ b.T through its OpenBLAS), on its own operands."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    c = np.empty((n, n), np.float32)
    products = 1
    if precision == "fp32":
        def fn(): ops._C.sgemm(a, b, c)
    elif precision == "numpy":
        def fn(): np.matmul(a, b.T, out=c)
    elif precision == "bf16":
        def fn(): ops._C._gemm_bf16(a, b, c, False, True, False)
    else:
        products = INT8_REPEAT

        def fn(): ops._C._gemm_i8(a, b, c, False, False, INT8_REPEAT)

    def rate():
        t0 = time.perf_counter()
        fn()
        return products * 2.0 * n**3 / (time.perf_counter() - t0) / 1e9

    return rate


def sgemm_peak(sizes=(2048, 3072), reps=4, precision="fp32"):
    """The machine's measured rate of the precision's product: the fastest single C = A B^T product of n x n x n,
    over the sizes, through bertqa's kernels (and, for fp32, NumPy's OpenBLAS too). A peak (not a median), so the
    engine's shares of it are conservative. A and B are distinct matrices: NumPy computes a @ a.T by syrk (half
    the products), which would inflate a rate counted as 2 n^3 (this benchmark did that before 2026-11-26,
    understating every share)."""
    best = 0.0
    for n in sizes:
        rates = [gemm_rate(p, n) for p in ((precision, "numpy") if precision == "fp32" else (precision,))]
        for rate in rates:
            rate()  # warm-up
            best = max([best] + [rate() for _ in range(reps)])
    return best


def paired_share(config, batch, train, reps, flops, n=2048, precision="fp32"):
    """(median GEMM rate, median share of it): the machine's speed drifts by tens of percent within minutes
    (other tenants), so each engine step is timed between two n^3 products of its precision's GEMM (GEMM_NAMES)
    and its rate taken as a share of the faster of that pair; the median over reps pairs is the figure reported."""
    model = BertQA(config, seed=0, precision=precision)
    step = engine_step(model, batch, train)
    yardstick = gemm_rate(precision, n, seed=1)
    step()
    yardstick()
    peaks, shares = [], []
    for _ in range(reps):
        before = yardstick()
        t0 = time.perf_counter()
        step()
        rate = flops / (time.perf_counter() - t0) / 1e9
        peak = max(before, yardstick())
        peaks.append(peak)
        shares.append(rate / peak)
    return float(np.median(peaks)), float(np.median(shares))


def alternate(fns, reps, warmup_s=1.0):
    """[reps, len(fns)] seconds: every callable warmed up for at least warmup_s (timed's reasons), then reps rounds
    of one call of each in turn (A B C, A B C, ...), so that the machine's drift reaches all of them alike."""
    for fn in fns:
        t_end = time.perf_counter() + warmup_s
        fn()
        while time.perf_counter() < t_end:
            fn()
    times = np.empty((reps, len(fns)))
    for r in range(reps):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[r, j] = time.perf_counter() - t0
    return times


def paired_result(names, times):
    """What a paired child prints: the contenders' names and every round's seconds ([round][contender])."""
    return {"names": list(names), "times": np.asarray(times).tolist()}


def paired_seconds(result, name):
    """Median seconds of one contender of a paired_result."""
    return float(np.median(np.asarray(result["times"])[:, result["names"].index(name)]))


def paired_speed(result, a, b):
    """a's speed over b's in a paired_result: the median over rounds of b's time / a's."""
    t = np.asarray(result["times"])
    return float(np.median(t[:, result["names"].index(b)] / t[:, result["names"].index(a)]))


def pair_precisions(config, batch, train, reps, precisions):
    """One model per precision (the same weights: BertQA(config, seed=0)), one step of each in turn per round."""
    steps = [engine_step(BertQA(config, seed=0, precision=p), batch, train) for p in precisions]
    return paired_result(precisions, alternate(steps, reps))


def logits_error(out, ref, mask):
    """Largest |difference| of start and end logits on real tokens, relative to the largest |reference| logit."""
    real = np.asarray(mask) != 0
    diff = max(float(np.abs(o[real] - r[real]).max()) for o, r in zip(out, ref))
    return diff / max(float(np.abs(r[real]).max()) for r in ref)


def pair_ort_int8(config, batch, reps, paths):
    """bertqa int8 against ONNX Runtime's dynamic int8 files `paths` ({kind: file}), one call of each in turn per
    round; and each one's logit error against bertqa fp32 on this batch (logits_error)."""
    feed = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    ref = BertQA(config, seed=0).forward(**feed)
    model = BertQA(config, seed=0, precision="int8")
    sessions = {kind: ort_session(path) for kind, path in paths.items()}
    calls = [lambda: model.forward(**feed)] + [lambda s=s: s.run(["start_logits", "end_logits"], feed)
                                                for s in sessions.values()]
    names = ["bertqa int8"] + [f"ORT {kind}" for kind in sessions]
    out = paired_result(names, alternate(calls, reps))
    out["logit_error"] = {n: logits_error(call(), ref, feed["attention_mask"]) for n, call in zip(names, calls)}
    return out


def pair_torch_bf16(config, batch, reps):
    """bertqa bf16 training steps against one PyTorch model's steps under autocast bf16 and in fp32, in turns."""
    torch.manual_seed(0)
    step = torch_trainer(torch_model(config), batch)
    calls = [engine_step(BertQA(config, seed=0, precision="bf16"), batch, True), lambda: step(autocast=True),
             lambda: step(autocast=False)]
    return paired_result(["bertqa bf16", "PyTorch autocast bf16", "PyTorch fp32"], alternate(calls, reps))


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


def run_case(framework, index, T, reps, onnx_path=None, precision="fp32"):
    """One case in this process: prints {"seconds": median step time, "max_rss_mb": peak RSS, ...}; the paired
    frameworks ("precisions": `precision` a comma list; "ort-int8": onnx_path "kind=file,..."; "torch-bf16") print
    paired_result's dict."""
    name, what, B = CASES[index]
    config, batch, lengths = case_batch(index, T)
    fn = bench_bertqa if framework == "bertqa" else bench_torch
    breakdown = {}
    train = what in TRAINING
    rss = None
    if framework in ("precisions", "ort-int8", "torch-bf16"):
        if framework == "precisions":
            out = pair_precisions(config, batch, train, reps, precision.split(","))
        elif framework == "ort-int8":
            out = pair_ort_int8(config, batch, reps, dict(kv.split("=", 1) for kv in onnx_path.split(",")))
        else:
            out = pair_torch_bf16(config, batch, reps)
        print(json.dumps(out))
        return
    if framework == "ort":   # share: here the paired ORT / bertqa time ratio
        t, rss, ort_step = bench_ort(onnx_path, batch, reps)
        local_peak, share = None, paired_ratio(config, batch, ort_step, reps)
    elif framework == "torch":
        torch.manual_seed(0)
        t = fn(config, batch, train, reps)
        local_peak = share = None
    else:
        t = fn(config, batch, train, reps, breakdown, precision)
        local_peak, share = paired_share(config, batch, train, reps, case_flops(index, T), precision=precision)
    print(json.dumps({"seconds": t, "max_rss_mb": rss or peak_rss_mb(),
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


def export_in_child(index, path, kind="fp32"):
    subprocess.run([sys.executable, __file__, "--export-onnx", str(index), str(path), "--onnx-kind", kind],
                   capture_output=True, text=True, check=True)
    return path


def in_child(framework, index, T, reps, onnx_path=None, precision="fp32"):
    cmd = [sys.executable, __file__, "--case", framework, str(index), "--seq", str(T), "--reps", str(reps),
           "--precision", precision] + (["--onnx", str(onnx_path)] if onnx_path else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def try_child(*args, **kwargs):
    """in_child, or None (and the failure on stderr) where the child fails: one failed comparison does not cost
    the rest of a long run."""
    try:
        return in_child(*args, **kwargs)
    except RuntimeError as e:
        print(f"  FAILED, left out: {e}", file=sys.stderr)
        return None


def cpu_flags(names=("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")):
    """{flag: present} from /proc/cpuinfo (Linux), or {} where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return {}
    return {n: n in flags for n in names}


def build_stamp():
    """Which engine the children load: the git commit of the checkout (with '+dirty' when csrc/ or bertqa/ has
    uncommitted changes) and the modification time of the compiled _C (an in-place rebuild mid-run changes it)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "csrc", "bertqa"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        head, dirty = "?", ""
    so = Path(ops._C.__file__)
    return f"{head}{'+dirty' if dirty else ''}, {so.name} of {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(so.stat().st_mtime))} UTC"


def load_average():
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seq", type=int, default=384)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", action="append", default=None, metavar="TEXT",
                    help="run only the cases whose 'model work' contains TEXT (repeatable), e.g. --only SQuAD")
    ap.add_argument("--exclude", action="append", default=None, metavar="TEXT",
                    help="leave out the cases whose 'model work' contains TEXT (repeatable), e.g. --exclude SQuAD")
    ap.add_argument("--precision", default="fp32", metavar="LIST",
                    help="comma list of the engine's precisions to run each case in (fp32, bf16, int8; int8 runs "
                         "the inference cases only); with more than fp32, the paired comparisons of the docstring")
    ap.add_argument("--case", nargs=2, metavar=("FRAMEWORK", "INDEX"), help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)   # the ORT case's model file(s) (export_for_ort)
    ap.add_argument("--export-onnx", nargs=2, metavar=("INDEX", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--onnx-kind", default="fp32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    T = args.seq
    framework = args.case[0] if args.case else None
    import_comparisons(want_torch=framework in ("torch", "torch-bf16") or not (framework or args.export_onnx),
                       want_ort=framework in (None, "ort", "ort-int8") or bool(args.export_onnx))
    if args.export_onnx:
        return export_for_ort(case_batch(int(args.export_onnx[0]), T)[0], args.export_onnx[1], args.onnx_kind) and None
    if args.case:
        return run_case(args.case[0], int(args.case[1]), T, reps, args.onnx, args.precision)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    info = ops.runtime_info()
    for p in precisions:
        if p not in PRECISIONS:
            ap.error(f"--precision: {p!r} is not one of {', '.join(PRECISIONS)}")
        if info["precisions"].get(p):
            ap.error(f"--precision {p}: this CPU {info['precisions'][p]}")
    lowp = [p for p in precisions if p != "fp32"]
    flags = cpu_flags()
    print(f"# {os.cpu_count()} CPUs, {info['omp_threads']} threads, {info['blas_config']}; OpenBLAS core "
          f"{info.get('blas_core')}, bertqa kernels {info.get('isa')}; precisions {', '.join(precisions)}; CPU flags "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()) + "; "
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
    stamp = build_stamp()
    print(f"# OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; engine {stamp}; load average "
          f"(1/5/15 min) at the start {load_average()}, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
    # The peak is measured before and after the cases (the larger counts): on a shared machine the rate drifts.
    peak_before = {p: sgemm_peak(precision=p) for p in precisions}
    rows, profiles, pairs, ort8, torch16 = [], {}, {}, {}, {}
    onnx_dir = tempfile.TemporaryDirectory(prefix="bertqa-bench-ort-")
    onnx_files = {}   # (shape name, kind) -> its ORT file
    for i, (name, what, B) in enumerate(CASES):
        if (args.only and not any(text in f"{name} {what}" for text in args.only)
                or args.exclude and any(text in f"{name} {what}" for text in args.exclude)):
            continue
        config, _, lengths = case_batch(i, T)
        train = what in TRAINING
        mine = [p for p in precisions if not (train and p == "int8")]
        if onnxruntime is not None and not train:
            for kind in (["fp32"] if "fp32" in mine else []) + (list(ORT_INT8) if "int8" in mine else []):
                if (name, kind) not in onnx_files:
                    onnx_files[name, kind] = export_in_child(
                        i, os.path.join(onnx_dir.name, f"{len(onnx_files)}-{kind}.onnx"), kind)
        windows = case_windows(i)
        for p in mine:
            ours = in_child("bertqa", i, T, reps, precision=p)
            theirs = try_child("torch", i, T, reps) if torch is not None and p == "fp32" else None
            ort = (try_child("ort", i, T, reps, onnx_files[name, "fp32"])
                   if not train and (name, "fp32") in onnx_files and p == "fp32" else None)
            t = ours["seconds"]
            rows.append(dict(index=i, precision=p, sps=windows / t, gflops=case_flops(i, T) / t / 1e9,
                             local=ours["local_peak"], share=ours["share"], rss=ours["max_rss_mb"],
                             torch=theirs and (windows / theirs["seconds"], theirs["max_rss_mb"], theirs["seconds"] / t),
                             ort=ort and (windows / ort["seconds"], ort["max_rss_mb"], ort["seconds"] / t, ort["share"])))
            profiles[i, p] = ours.get("breakdown")
            print(f"  {name} {what} B={windows} {p}: {windows / t:.2f} seq/s, {case_flops(i, T) / t / 1e9:.1f} GFLOP/s, "
                  f"paired share {100 * ours['share']:.0f}% of {ours['local_peak']:.1f}"
                  + (f" (torch {windows / theirs['seconds']:.2f})" if theirs else "")
                  + (f" (ORT {windows / ort['seconds']:.2f})" if ort else ""), file=sys.stderr)
        others = [p for p in mine if p != "fp32"]
        if others:
            pairs[i] = try_child("precisions", i, T, reps, precision=",".join(["fp32"] + others))
        if pairs.get(i):
            print(f"  {name} {what} paired: " + ", ".join(f"{p}/fp32 {paired_speed(pairs[i], p, 'fp32'):.2f}x"
                                                          for p in others), file=sys.stderr)
        if "int8" in mine and (name, "int8") in onnx_files:
            paths = ",".join(f"{kind}={onnx_files[name, kind]}" for kind in ORT_INT8)
            ort8[i] = try_child("ort-int8", i, T, reps, paths)
        if ort8.get(i):
            print(f"  {name} {what} bertqa int8 / ORT int8: "
                  + ", ".join(f"{paired_speed(ort8[i], 'bertqa int8', 'ORT ' + k):.2f}x ({k})" for k in ORT_INT8),
                  file=sys.stderr)
        if "bf16" in mine and train and torch is not None:
            torch16[i] = try_child("torch-bf16", i, T, reps)
        if torch16.get(i):
            print(f"  {name} {what} bertqa bf16 / PyTorch autocast bf16: "
                  f"{paired_speed(torch16[i], 'bertqa bf16', 'PyTorch autocast bf16'):.2f}x", file=sys.stderr)
    onnx_dir.cleanup()
    pairs, ort8, torch16 = ({i: res for i, res in d.items() if res} for d in (pairs, ort8, torch16))
    peak_after = {p: sgemm_peak(precision=p) for p in precisions}
    peak = {p: max(peak_before[p], peak_after[p]) for p in precisions}
    for p in precisions:
        print(f"# {GEMM_NAMES[p]} peak on these cores: {peak[p]:.1f} GFLOP/s (before the cases {peak_before[p]:.1f}, "
              f"after {peak_after[p]:.1f})")
    if build_stamp().split(", ", 1)[1] != stamp.split(", ", 1)[1]:   # the compiled _C, not the commit, matters
        print(f"# WARNING: the engine changed during the run (now {build_stamp()}): its figures mix two builds")
    print(f"# load average (1/5/15 min) at the end {load_average()}, {time.strftime('%H:%M', time.gmtime())} UTC. "
          f"'paired share': each step timed between two "
          f"2048^3 products of its precision's GEMM, its rate as a share of the faster of the pair, median over "
          f"{reps} pairs ('GEMM' column: the pairs' median rate); 'vs fp32, paired': the same model in fp32 and in "
          f"this precision, steps in turns in one process, median over {reps} rounds of fp32's time / this one's; "
          f"'bertqa / ORT, paired': one bertqa and one ORT call back to back in one process, median over {reps} "
          f"pairs of ORT's time / bertqa's\n")
    print("| model | work | B x T | precision | bertqa seq/s | GFLOP/s | % of run's peak | GEMM (paired) | paired share | "
          "peak RSS | vs fp32, paired | PyTorch seq/s | PyTorch peak RSS | bertqa speed-up | ORT seq/s | ORT peak RSS | "
          "bertqa / ORT | bertqa / ORT, paired |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name, what, _ = CASES[r["index"]]
        p = r["precision"]
        vs = (f"**{paired_speed(pairs[r['index']], p, 'fp32'):.2f}x**" if p != "fp32" and pairs.get(r["index"])
              else "-")
        tr, ort = r["torch"], r["ort"]
        print(f"| {name} | {what} | {case_windows(r['index'])} x {T} | {p} | {r['sps']:.2f} | {r['gflops']:.1f} | "
              f"{100 * r['gflops'] / peak[p]:.0f}% | {r['local']:.1f} | **{100 * r['share']:.0f}%** | {r['rss']:.0f} MB | "
              f"{vs} |" + (f" {tr[0]:.2f} | {tr[1]:.0f} MB | {tr[2]:.2f}x |" if tr else " - | - | - |")
              + (f" {ort[0]:.2f} | {ort[1]:.0f} MB | {ort[2]:.2f}x | **{ort[3]:.2f}x** |" if ort
                 else " - | - | - | - |"))
    if pairs:
        print(f"\nThe precisions paired (one process per case, one step of each precision in turn, median of {reps} "
              f"rounds; seq/s from the rounds' median times)\n")
        print("| model | work | B x T | " + " | ".join(f"{p} seq/s" for p in precisions) + " | "
              + " | ".join(f"{p} / fp32" for p in lowp) + " |")
        print("|---|---|---|" + "---|" * (len(precisions) + len(lowp)))
        for i, res in pairs.items():
            name, what, _ = CASES[i]
            w = case_windows(i)
            print(f"| {name} | {what} | {w} x {T} | "
                  + " | ".join(f"{w / paired_seconds(res, p):.2f}" if p in res["names"] else "-" for p in precisions)
                  + " | " + " | ".join(f"**{paired_speed(res, p, 'fp32'):.2f}x**" if p in res["names"] else "-"
                                       for p in lowp) + " |")
    if ort8:
        kinds = list(ORT_INT8)
        print(f"\nbertqa int8 against ONNX Runtime's dynamic int8 (`bertqa export onnx --quantize int8`, and with "
              f"--fused), one call of each in turn, median of {reps} rounds; logit error: the largest |difference| "
              f"from bertqa fp32's logits on real tokens, over the largest |fp32 logit|\n")
        print("| model | work | B x T | bertqa int8 seq/s | " + " | ".join(f"ORT {k} seq/s" for k in kinds) + " | "
              + " | ".join(f"bertqa int8 / ORT {k}, paired" for k in kinds) + " | logit error: bertqa int8 | "
              + " | ".join(f"ORT {k}" for k in kinds) + " |")
        print("|---|---|---|---|" + "---|" * (3 * len(kinds) + 1))
        for i, res in ort8.items():
            name, what, _ = CASES[i]
            w = case_windows(i)
            err = res["logit_error"]
            print(f"| {name} | {what} | {w} x {T} | {w / paired_seconds(res, 'bertqa int8'):.2f} | "
                  + " | ".join(f"{w / paired_seconds(res, 'ORT ' + k):.2f}" for k in kinds) + " | "
                  + " | ".join(f"**{paired_speed(res, 'bertqa int8', 'ORT ' + k):.2f}x**" for k in kinds)
                  + f" | {err['bertqa int8']:.2e} | " + " | ".join(f"{err['ORT ' + k]:.2e}" for k in kinds) + " |")
    if torch16:
        print(f"\nbertqa bf16 training against transformers' BertForQuestionAnswering under torch.autocast('cpu', "
              f"bfloat16) and in fp32 (the same PyTorch model; forward + backward + clipping + AdamW), one step of "
              f"each in turn, median of {reps} rounds\n")
        print("| model | work | B x T | bertqa bf16 seq/s | PyTorch autocast bf16 seq/s | PyTorch fp32 seq/s | "
              "bertqa bf16 / PyTorch bf16, paired | PyTorch bf16 / PyTorch fp32, paired |")
        print("|---|---|---|---|---|---|---|---|")
        for i, res in torch16.items():
            name, what, _ = CASES[i]
            w = case_windows(i)
            print(f"| {name} | {what} | {w} x {T} | "
                  + " | ".join(f"{w / paired_seconds(res, n):.2f}"
                               for n in ("bertqa bf16", "PyTorch autocast bf16", "PyTorch fp32"))
                  + f" | **{paired_speed(res, 'bertqa bf16', 'PyTorch autocast bf16'):.2f}x** | "
                  + f"{paired_speed(res, 'PyTorch autocast bf16', 'PyTorch fp32'):.2f}x |")
    # Where one step's time goes (the engine's own profile, BertQA.profile), per case trained, and per case run in
    # more than one precision: one column per precision.
    for i in dict.fromkeys(r["index"] for r in rows):
        name, what, _ = CASES[i]
        ran = [p for p in precisions if profiles.get((i, p))]
        if not ran or (what not in TRAINING and len(ran) < 2):
            continue
        prof = {p: dict(profiles[i, p]) for p in ran}
        total = {p: prof[p].pop("total") for p in ran}
        keys = sorted({k for p in ran for k, v in prof[p].items() if v > 0}, key=lambda k: -prof[ran[0]].get(k, 0))
        print(f"\n{name}, {what}, B={case_windows(i)}, T={T}: one step "
              + ", ".join(f"{p} {1e3 * total[p]:.0f} ms" for p in ran))
        print("| work | " + " | ".join(f"{p} ms | {p} share" for p in ran) + " |")
        print("|---|" + "---:|---:|" * len(ran))
        for key in keys:
            print(f"| {key} | " + " | ".join(f"{1e3 * prof[p].get(key, 0):.1f} | "
                                            f"{100 * prof[p].get(key, 0) / total[p]:.1f}%" for p in ran) + " |")
        print("| outside the engine (Python, gradient zeroing) | "
              + " | ".join(f"{1e3 * (total[p] - sum(prof[p].values())):.1f} | "
                           f"{100 * (total[p] - sum(prof[p].values())) / total[p]:.1f}%" for p in ran) + " |")


if __name__ == "__main__":
    sys.exit(main())
