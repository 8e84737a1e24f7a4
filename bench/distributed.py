"""Data-parallel fine-tuning benchmark: one process with every core against N MPI ranks sharing the cores, the
same global batch of real SQuAD windows, through bertqa's Trainer (what `bertqa finetune` runs), and the
gradient all-reduce's share of a step.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/distributed.py                  # MiniLM-L6, batch 16
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/distributed.py --steps 6 --quick

Each configuration runs in fresh processes (mpirun for N > 1, with Open MPI's run-as-root and oversubscribe
switches); the first `--warmup` steps (arena allocation, first touches) are left out of the step times. It also
prints a worked estimate of the all-reduce's cost for BERT-base on 8, 32 and 64 GPUs (assumptions stated).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BERTQA_DATA_DIR", REPO.parent / "shared" / "data"))


def worker(a) -> None:
    """One rank (or the single process): train a.steps steps, print one JSON line from rank 0."""
    import numpy as np

    from bertqa import distributed, ops
    from bertqa.train import Trainer, TrainingArguments, load_model, load_split

    dist = distributed.init("cpu")
    args = TrainingArguments(output_dir=a.output_dir, per_device_train_batch_size=a.batch // (dist.world_size * a.accumulation),
                             gradient_accumulation_steps=a.accumulation, max_steps=a.steps, learning_rate=5e-5,
                             logging_steps=1, save_steps=0, disable_tqdm=True, seed=42, overwrite_output_dir=True,
                             max_seq_length=384, doc_stride=128).validate()
    model = load_model("all-MiniLM-L6-v2", args)
    _, features = load_split(DATA / "squad" / "valid.json", model.tokenizer, args, None)
    trainer = Trainer(model, args, features, dist=dist)
    step_times, reduce_times = [], []
    reduce_gradients = dist.reduce_gradients

    def timed_reduce(m):   # the all-reduce alone, per step (a barrier first, so waiting for the slower rank is
        dist.barrier()     # not counted as the all-reduce's cost)
        t = time.perf_counter()
        reduce_gradients(m)
        reduce_times.append(time.perf_counter() - t)

    dist.reduce_gradients = timed_reduce
    optimizer_step = model.optimizer_step
    last = [time.perf_counter()]

    def timed_step(*args_, **kw):
        out = optimizer_step(*args_, **kw)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        return out

    model.optimizer_step = timed_step
    last[0] = time.perf_counter()
    trainer.train()
    if dist.is_main:
        w = a.warmup
        steps = np.array(step_times[w:])
        red = np.array(reduce_times[w:]) if reduce_times else np.zeros(1)
        real = int(features.attention_mask.sum())
        print("RESULT " + json.dumps({
            "ranks": dist.world_size, "threads": ops.runtime_info()["omp_threads"],
            "blas_core": ops.runtime_info()["blas_core"], "step_s": float(np.median(steps)),
            "windows_per_s": a.batch / float(np.median(steps)), "reduce_s": float(np.median(red)),
            "reduce_share": float(np.median(red) / np.median(steps)) if reduce_times else 0.0,
            "bytes_reduced": int(model.grads.nbytes), "features": len(features), "real_tokens": real}), flush=True)


def launch(ranks: int, threads: int, a) -> dict:
    out = tempfile.mkdtemp(prefix="bertqa-dp-bench-")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO),
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cmd = [sys.executable, __file__, "--worker", "--output-dir", out, "--steps", str(a.steps), "--batch", str(a.batch),
           "--accumulation", str(a.accumulation), "--warmup", str(a.warmup)]
    if ranks > 1:
        mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
        if not mpirun:
            raise SystemExit('mpirun not found: pip install "bertqa[distributed]"')
        cmd = [mpirun, "-n", str(ranks), "--oversubscribe", "--bind-to", "none"] + cmd
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise SystemExit(f"no result from {' '.join(cmd)}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def estimate() -> str:
    """All-reduce cost for BERT-base data parallel on GPUs, from link bandwidths (a worked estimate, not a run)."""
    params = 109.5e6   # BERT-base + QA head
    rows = []
    # per-GPU bus bandwidth NCCL reaches for a ring all-reduce of this size (assumptions):
    #   one node of 8 H100 on NVLink 4 / NVSwitch: ~360 GB/s busbw (of 450 GB/s per direction)
    #   across nodes on EFA (p5.48xlarge: 3,200 Gbit/s = 400 GB/s per node = 50 GB/s per GPU): ~40 GB/s busbw
    step_ms = 6 * 86e6 * 32 * 384 * 1.25 / (0.5 * 989e12) * 1e3   # B=32, T=384 bf16 at 50% of H100 dense bf16
    for gpus, busbw, link in [(8, 360e9, "NVLink (1 node)"), (32, 40e9, "EFA (4 nodes)"), (64, 40e9, "EFA (8 nodes)")]:
        for dtype, nbytes in (("fp32", 4), ("bf16", 2)):
            size = params * nbytes
            t = size * 2 * (gpus - 1) / gpus / busbw
            rows.append(f"| {gpus} | {link} | {dtype} | {size / 1e6:.0f} MB | {busbw / 1e9:.0f} GB/s | {t * 1e3:.1f} ms "
                        f"| {t * 1e3 / (t * 1e3 + step_ms):.0%} |")
    head = (f"Compute of one step (BERT-base, B=32 per GPU, T=384, bf16, ~50% of H100's 989 TFLOP/s): ~{step_ms:.0f} ms\n\n"
            "| GPUs | links | gradients | bytes per step | NCCL bus bandwidth (assumed) | all-reduce time | share of a step (no overlap) |\n"
            "|---:|---|---|---:|---:|---:|---:|")
    return head + "\n" + "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output-dir", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per configuration (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (default 2)")
    p.add_argument("--batch", type=int, default=16, help="global batch in windows (default 16)")
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="6 steps, 1 of warmup")
    a = p.parse_args()
    if a.quick:
        a.steps, a.warmup = 6, 1
    if a.worker:
        worker(a)
        return 0
    cores = os.cpu_count() or 1
    print(f"MiniLM-L6 on valid.json windows (T<=384, trainer order), global batch {a.batch}, {a.steps} steps "
          f"({a.warmup} left out), {cores} cores; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}",
          flush=True)
    results = [launch(1, cores, a), launch(cores, 1, a)]
    base = results[0]
    print(f"\nOpenBLAS kernel: {base['blas_core']}\n")
    print("| processes x threads | step (median) | windows/s | vs 1 process | all-reduce (median) | its share of a step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['ranks']} x {r['threads']} | {r['step_s']:.2f} s | {r['windows_per_s']:.2f} | "
              f"{r['windows_per_s'] / base['windows_per_s']:.2f}x | {r['reduce_s'] * 1e3:.0f} ms "
              f"({r['bytes_reduced'] / 1e6:.0f} MB) | {r['reduce_share']:.1%} |")
    print("\n" + estimate())
    return 0


if __name__ == "__main__":
    sys.exit(main())
