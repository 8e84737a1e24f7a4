"""Data-parallel fine-tuning under mpirun (bertqa.distributed, Trainer): N ranks train the same model as one
process with the same global batch, any split of it over ranks, micro-batches and accumulation gives the same
run, a failing or killed rank ends the job within seconds, and a run resumes with another split.

The jobs run a tiny random BERT (dropout on) on real SQuAD questions through Open MPI's mpirun on loopback, with
its run-as-root and oversubscribe switches (this machine has 2 cores; some jobs have 3 ranks). They skip when
mpi4py or mpirun is missing: `pip install "bertqa[distributed]"`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bertqa._core import _C
from bertqa.train import TrainingArguments, TrainPlan
from qa_helpers import engine_available, make_tiny_model, write_squad_subset

REPO = Path(__file__).resolve().parents[1]
FAULT = REPO / "tests" / "fixtures" / "dp_fault.py"


def mpirun() -> str | None:
    found = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return found


needs_mpi = pytest.mark.skipif(not (engine_available() and mpirun()),
                               reason='needs mpi4py and mpirun: pip install "bertqa[distributed]"')


@pytest.fixture(scope="module")
def job(tmp_path_factory, shared_data_dir):
    """A tiny model and small SQuAD files: 45 training questions (90 windows at 128 tokens), 20 to evaluate."""
    d = tmp_path_factory.mktemp("dp")
    (d / "tiny").mkdir()
    make_tiny_model(d / "tiny", shared_data_dir / "vocab" / "bert-base-uncased-vocab.txt", hidden=36, heads=3,
                    layers=TINY_LAYERS)
    write_squad_subset(shared_data_dir / "squad" / "train.json", d / "train.json", 45)
    write_squad_subset(shared_data_dir / "squad" / "valid.json", d / "valid.json", 20)
    return d


def finetune(job: Path, out: Path, ranks: int, batch: int, accumulation: int = 1, steps: int = 5,
             extra=(), fault: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    args = ["finetune", "--model_name_or_path", str(job / "tiny"), "--train_file", str(job / "train.json"),
            "--validation_file", str(job / "valid.json"), "--output_dir", str(out), "--max_seq_length", "128",
            "--doc_stride", "32", "--max_query_length", "32", "--per_device_train_batch_size", str(batch),
            "--gradient_accumulation_steps", str(accumulation), "--learning_rate", str(LR), "--max_steps", str(steps),
            "--logging_steps", "1", "--save_steps", "0", "--seed", "3", "--disable_tqdm",
            "--cache_dir", str(job / "cache"), *extra]
    program = [sys.executable, str(FAULT)] if fault else [sys.executable, "-m", "bertqa"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PYTHONPATH": str(REPO)}
    if fault:
        env["BERTQA_FAULT"] = fault
    cmd = program + args if ranks == 1 else [mpirun(), "-n", str(ranks), "--oversubscribe"] + program + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


def steps(out: Path) -> list[dict]:
    return [r for r in log(out) if "loss" in r]


def weights(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(out / "model.safetensors"))


def assert_same_run(a: Path, b: Path, tol: float = 1e-4) -> None:
    """Per-step losses and gradient norms, and the saved weights, within tol relative."""
    la, lb = steps(a), steps(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb] and la
    for ra, rb in zip(la, lb):
        for key in ("loss", "grad_norm", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=tol, abs=1e-12), (key, ra["step"], ra[key], rb[key])
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        diff = float(np.abs(wa[name] - wb[name]).max())
        if softmax_invariant(name):
            # Exact gradient 0: a softmax cancels a shift along these (the key bias shifts every score of a
            # query alike; the QA bias and the last LayerNorm bias shift every start or end logit alike). They
            # hold rounding noise, which AdamW's m / sqrt(v) scales up to step size and which differs with the
            # order of float sums (it differs as much between 1 x 8 and 1 x 4 x 2 accumulation in one process).
            assert diff < LR, (name, diff)
        else:
            assert diff / max(float(np.abs(wa[name]).max()), 1e-6) < tol, (name, diff)


LR = 1e-3


def softmax_invariant(name: str) -> bool:
    last = f"bert.encoder.layer.{TINY_LAYERS - 1}.output.LayerNorm.bias"
    return name.endswith("attention.self.key.bias") or name == "qa_outputs.bias" or name == last


TINY_LAYERS = 2


# ---- the plan: how a step's windows are shared out ----------------------------------------------------


@pytest.mark.parametrize("world, batch, accumulation, n", [(1, 4, 1, 37), (2, 4, 3, 37), (3, 2, 2, 10),
                                                           (4, 3, 1, 5), (2, 5, 2, 101)])
def test_step_shares_partition_every_step(tmp_path, world, batch, accumulation, n):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, num_train_epochs=1).validate()
    plan = TrainPlan.from_args(n, args, world)
    assert plan.global_batch == world * batch * accumulation
    assert plan.steps_per_epoch == -(-n // plan.global_batch)
    seen = []
    for step in range(plan.steps_per_epoch):
        lo = step * plan.global_batch
        shares = [plan.step_shares(lo, r) for r in range(world)]
        assert all(len(s) == len(shares[0]) <= accumulation for s in shares)   # every rank: same micro-batches
        for m in range(len(shares[0])):
            sizes = [shares[r][m].stop - shares[r][m].start for r in range(world)]
            assert max(sizes) - min(sizes) <= 1 and max(sizes) <= batch   # balanced, at most a batch each
            for r in range(world):
                seen.extend(range(shares[r][m].start, shares[r][m].stop))
    assert sorted(seen) == list(range(n))   # every window of the epoch exactly once


def test_one_process_needs_no_mpi():
    code = ("import sys; from bertqa import distributed as d; w = d.init(); "
            "print(w.world_size, w.rank, 'mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX_"))}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert p.stdout.split() == ["1", "0", "False"], p.stderr


# ---- jobs under mpirun ---------------------------------------------------------------------------------


@needs_mpi
def test_two_ranks_train_the_same_model_as_one_process(job, tmp_path):
    """The issue's check: mpirun -n 2 against one process with the same global batch, dropout on, 5 steps."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    ok(finetune(job, one, ranks=1, batch=8))
    p = ok(finetune(job, two, ranks=2, batch=4))
    assert json.loads((job / "tiny" / "config.json").read_text()).get("hidden_dropout_prob", 0.1) > 0
    assert_same_run(one, two)
    # rank 0 alone wrote and reported; evaluation was split over the ranks and gathered
    assert p.stdout.count("exact_match") == 1 and "2 processes x 4 x 1" in p.stderr
    r1, r2 = (json.loads((d / "eval_results.json").read_text()) for d in (one, two))
    assert r2["world_size"] == 2 and r2["eval_examples"] == r1["eval_examples"] == 20
    assert r2["f1"] == pytest.approx(r1["f1"], abs=1e-6)
    assert json.loads((two / "predictions.json").read_text()) == json.loads((one / "predictions.json").read_text())


@needs_mpi
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_rank_0s_weights_reach_every_rank_and_its_low_precision_copies(job, tmp_path, precision):
    """Rank 1 loads other weights and packs them for its engine (dp_fault.py "perturb"): the job is still the one
    process job, so rank 0's broadcast replaced rank 1's parameters and, in bf16, the bf16 copies its products use."""
    why = _C.runtime_info()["precisions"][precision]
    if why:
        pytest.skip(f"{precision} does not run here: it {why}")
    extra = ("--precision", precision)
    one, two = tmp_path / "one", tmp_path / "two"
    ok(finetune(job, one, ranks=1, batch=8, extra=extra))
    ok(finetune(job, two, ranks=2, batch=4, extra=extra, fault="1:0:perturb"))
    assert_same_run(one, two)


@needs_mpi
def test_any_split_of_the_global_batch_is_the_same_run(job, tmp_path):
    """Global batch 12 as 1 x 12 x 1, 2 x 3 x 2 and 3 x 2 x 2, for 9 steps over 90 windows: the epoch ends with
    a short step of 6 windows (shared out unevenly) and the run goes on into the next epoch."""
    runs = {split: tmp_path / "x".join(map(str, split)) for split in [(1, 12, 1), (2, 3, 2), (3, 2, 2)]}
    for (ranks, batch, accumulation), out in runs.items():
        ok(finetune(job, out, ranks, batch, accumulation, steps=9))
    first = runs[(1, 12, 1)]
    assert [round(r["epoch"], 4) for r in steps(first)][7:] == [1.0, round(1 + 12 / 90, 4)]
    for out in runs.values():
        assert_same_run(first, out)


@needs_mpi
@pytest.mark.parametrize("kind, message", [("raise", "bertqa finetune: error: rank 1 of 2: injected bad data"),
                                           ("crash", "RuntimeError: injected crash on rank 1"),
                                           ("kill", "")])
def test_a_failing_rank_ends_the_job(job, tmp_path, kind, message):
    t0 = time.perf_counter()
    p = finetune(job, tmp_path / "out", ranks=2, batch=4, steps=50, fault=f"1:3:{kind}", timeout=120)
    seconds = time.perf_counter() - t0
    assert p.returncode != 0
    assert message in p.stderr, p.stderr[-3000:]
    if kind == "kill":   # the launcher noticed the dead rank and ended the other
        assert "signal 9" in (p.stdout + p.stderr) or "Killed" in (p.stdout + p.stderr), p.stderr[-3000:]
    assert seconds < 60, f"the job took {seconds:.0f} s to end"
    assert not (tmp_path / "out" / "model.safetensors").exists()   # no final model from a failed job


@needs_mpi
def test_resume_with_another_split_of_the_same_global_batch(job, tmp_path):
    straight = tmp_path / "straight"
    ok(finetune(job, straight, ranks=2, batch=4, steps=6, extra=["--save_steps", "3"]))
    out = tmp_path / "killed"
    p = finetune(job, out, ranks=2, batch=4, steps=6, extra=["--save_steps", "3"], fault="0:5:kill")
    assert p.returncode != 0
    assert (out / "checkpoint-3").is_dir() and not (out / "model.safetensors").exists()
    # the same global batch of 8 as one process of 8: the same run from checkpoint-3 on
    ok(finetune(job, out, ranks=1, batch=8, steps=6, extra=["--save_steps", "3", "--resume"]))
    assert_same_run(straight, out)
    # another global batch is refused, naming both
    p = finetune(job, out, ranks=2, batch=2, steps=6, extra=["--save_steps", "3", "--resume"])
    assert p.returncode == 2
    assert "global batch of 8" in p.stderr and "this run's is 4 (2 x 2 x 1)" in p.stderr, p.stderr[-2000:]


@needs_mpi
def test_evaluations_best_model_and_layerwise_decay_under_two_ranks(job, tmp_path):
    """--eval_strategy steps, --load_best_model_at_end and --layerwise_lr_decay: every rank evaluates, keeps and
    restores alike, so 2 ranks end with the same best model (and step) as one process."""
    extra = ["--eval_strategy", "steps", "--eval_steps", "2", "--load_best_model_at_end", "--layerwise_lr_decay",
             "0.8"]
    one, two = tmp_path / "one", tmp_path / "two"
    ok(finetune(job, one, ranks=1, batch=8, steps=6, extra=extra))
    ok(finetune(job, two, ranks=2, batch=4, steps=6, extra=extra))
    assert_same_run(one, two)
    evals = [[(r["step"], r["eval_f1"]) for r in log(d) if "eval_f1" in r] for d in (one, two)]
    assert [s for s, _ in evals[0]] == [s for s, _ in evals[1]] == [2, 4, 6]
    assert [f for _, f in evals[1]] == pytest.approx([f for _, f in evals[0]], abs=1e-6)
    r1, r2 = (json.loads((d / "eval_results.json").read_text()) for d in (one, two))
    assert r1["best_model_step"] == r2["best_model_step"]
    assert r2["f1"] == pytest.approx(r1["f1"], abs=1e-6)
    assert (two / "training_curve.png").is_file() and not list(two.glob(".*.tmp"))
