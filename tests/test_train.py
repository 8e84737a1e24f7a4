"""Trainer: schedule, data order, accumulation, determinism, JSONL log, checkpoints (atomicity, rotation) and
exact resume.

Bookkeeping tests run on FakeQAModel (a test double, tests/qa_helpers.py); the resume and determinism tests at
the end run the real engine on a tiny random BERT, including a run killed with SIGKILL and resumed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bertqa.squad import load_squad
from bertqa.train import (LOG_NAME, TRAINER_STATE_NAME, TRAINING_STATE_NAME, Trainer, TrainingArguments,
                          TrainingError, TrainPlan, data_rng_state, epoch_order, evaluate_model, examples_dataset,
                          latest_checkpoint, linear_schedule, list_checkpoints, predict_features, read_log)
from qa_helpers import FakeQAModel, batch_rows, engine_available, make_tiny_model, synthetic_features, \
    write_squad_subset

REPO = Path(__file__).resolve().parents[1]
needs_engine = pytest.mark.skipif(not engine_available(), reason="bertqa.model (the engine) is not built")


def args_for(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-2,
                num_train_epochs=2, logging_steps=1, save_steps=0, seed=7, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base).validate()


def train_losses(tmp_path, features=None, model=None, **kw) -> tuple[list[float], FakeQAModel]:
    model = model or FakeQAModel(seed=kw.get("seed", 7))
    trainer = Trainer(model, args_for(tmp_path, **kw), features or synthetic_features())
    trainer.train()
    return [r["loss"] for r in trainer.history if "loss" in r], model


# ---- schedule and plan -----------------------------------------------------------------------------------


def test_linear_schedule_warmup_then_decay():
    lr = 1e-3
    # 100 steps, 10 of warmup: 0, lr/10, ... up to lr at step 10, then down to 0 at step 100.
    assert linear_schedule(0, 100, 10, lr) == 0.0  # transformers: the first step runs at lambda(0)
    assert linear_schedule(1, 100, 10, lr) == pytest.approx(1e-4)
    assert linear_schedule(5, 100, 10, lr) == pytest.approx(5e-4)
    assert linear_schedule(10, 100, 10, lr) == pytest.approx(lr)
    assert linear_schedule(55, 100, 10, lr) == pytest.approx(5e-4)
    assert linear_schedule(99, 100, 10, lr) == pytest.approx(lr / 90)
    assert linear_schedule(100, 100, 10, lr) == 0.0
    assert linear_schedule(150, 100, 10, lr) == 0.0  # never negative
    # No warmup: full rate at once, linear decay.
    assert [linear_schedule(s, 4, 0, 1.0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_plan_follows_transformers_arithmetic(tmp_path):
    # 37 features, batch 4 -> 10 micro-batches; accumulation 3 -> 4 steps per epoch (the last takes one).
    plan = TrainPlan.from_args(37, args_for(tmp_path, gradient_accumulation_steps=3, num_train_epochs=2.5))
    assert (plan.micro_batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (10, 4, 10)
    assert plan.warmup_steps == math.ceil(0.1 * 10)
    plan = TrainPlan.from_args(37, args_for(tmp_path, max_steps=7, warmup_steps=3))
    assert (plan.total_steps, plan.warmup_steps) == (7, 3)


def test_arguments_are_checked(tmp_path):
    bad = [dict(per_device_train_batch_size=0), dict(learning_rate=-1.0), dict(learning_rate=float("nan")),
           dict(num_train_epochs=0), dict(warmup_ratio=1.5), dict(gradient_accumulation_steps=0),
           dict(doc_stride=400), dict(max_seq_length=60, max_query_length=64), dict(save_total_limit=0),
           dict(eval_steps=-1), dict(seed=-3), dict(device="tpu"), dict(max_train_samples=0),
           dict(logging_steps=0), dict(adam_beta2=1.0)]
    for kw in bad:
        name = next(iter(kw))
        with pytest.raises(TrainingError, match=f"--{name}"):
            args_for(tmp_path, **kw)
    with pytest.raises(TrainingError, match="--output_dir"):
        TrainingArguments().validate()


# ---- data order, batches, accumulation ------------------------------------------------------------------


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_order(data_rng_state(42, 0), 100), epoch_order(data_rng_state(42, 0), 100)
    assert np.array_equal(a, b) and sorted(a) == list(range(100))
    assert not np.array_equal(a, epoch_order(data_rng_state(42, 1), 100))
    assert not np.array_equal(a, epoch_order(data_rng_state(43, 0), 100))
    json.dumps(data_rng_state(42, 0))  # stored in trainer_state.json


def test_each_epoch_visits_every_feature_once_in_trimmed_batches(tmp_path):
    features = synthetic_features(37)
    _, model = train_losses(tmp_path, features)
    assert len(model.batches) == 20  # 2 epochs x ceil(37 / 4)
    rows = [batch_rows(b) for b in model.batches]
    for epoch in range(2):
        seen = [r for b in rows[10 * epoch:10 * (epoch + 1)] for r in b]
        assert sorted(seen) == list(range(37))
        assert seen == list(epoch_order(data_rng_state(7, epoch), 37))
    assert rows[:10] != rows[10:]  # reshuffled
    lengths = features.attention_mask.sum(axis=1)
    for b, r in zip(model.batches, rows):
        width = b["input_ids"].shape[1]
        assert width % 8 == 0 and width - 8 < lengths[r].max() <= width
        assert all(v.dtype == np.int32 for v in b.values())
        assert np.array_equal(b["start_positions"], features.start_positions[r])


def test_gradient_accumulation(tmp_path):
    _, model = train_losses(tmp_path, synthetic_features(37), gradient_accumulation_steps=3, num_train_epochs=1)
    # 10 micro-batches -> steps of 3, 3, 3 and a last step of 1 micro-batch, each scaled by 1/its size.
    assert model.step == 4
    assert model.loss_scales == [1 / 3] * 9 + [1.0]
    assert model.optimizer_kwargs[0] == dict(weight_decay=0.01, max_grad_norm=1.0, beta1=0.9, beta2=0.999,
                                             eps=1e-8)


def test_learning_rates_follow_the_schedule(tmp_path):
    _, model = train_losses(tmp_path, max_steps=10, warmup_ratio=0.2, learning_rate=1e-3)
    assert model.lrs == [linear_schedule(s, 10, 2, 1e-3) for s in range(10)]


# ---- determinism and the log -----------------------------------------------------------------------------


def test_same_seed_same_losses(tmp_path):
    a, _ = train_losses(tmp_path / "a")
    b, _ = train_losses(tmp_path / "b")
    c, _ = train_losses(tmp_path / "c", seed=8)
    assert a == b
    assert a != c


def test_jsonl_log(tmp_path):
    args = args_for(tmp_path, logging_steps=3, max_steps=8, warmup_steps=2)
    model = FakeQAModel(7)
    trainer = Trainer(model, args, synthetic_features(37))
    trainer.train()
    records = read_log(tmp_path / "out" / LOG_NAME)
    assert [r["step"] for r in records] == [3, 6, 8]  # every 3 steps, and the last one
    for r in records:
        assert set(r) == {"step", "epoch", "loss", "lr", "grad_norm", "seq_per_s", "elapsed"}
        assert r["lr"] == linear_schedule(r["step"] - 1, 8, 2, args.learning_rate)
        assert r["seq_per_s"] > 0 and r["elapsed"] > 0 and r["grad_norm"] > 0
    # epochs as the share of the epoch's windows done (4 windows a step of 37)
    assert [r["epoch"] for r in records] == [pytest.approx(12 / 37), pytest.approx(24 / 37), pytest.approx(32 / 37)]
    assert records == trainer.history
    # loss = mean over the window: rebuild it from a run that logs every step.
    per_step, _ = train_losses(tmp_path / "every", max_steps=8, warmup_steps=2)
    assert records[0]["loss"] == pytest.approx(np.mean(per_step[:3]), rel=1e-12)
    assert records[2]["loss"] == pytest.approx(np.mean(per_step[6:8]), rel=1e-12)


# ---- checkpoints and resume ------------------------------------------------------------------------------


class CrashAt(FakeQAModel):
    """FakeQAModel that raises in forward_backward when it reaches rng_step `at` (a run dying mid-step)."""

    def __init__(self, seed, at):
        super().__init__(seed)
        self.at = at

    def forward_backward(self, batch, loss_scale=1.0, **kw):
        if self.rng_step == self.at:
            raise RuntimeError("simulated crash")
        return super().forward_backward(batch, loss_scale, **kw)


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("crash_at, checkpoints, position", [
    (15, ["checkpoint-3", "checkpoint-6"], (6, 1, 8)),  # dies in step 8: resumes in epoch 1 at window 8
    (9, ["checkpoint-3"], (3, 0, 24)),  # dies in step 5: resumes from step 3, whose logging window was cut
])
def test_resume_continues_exactly(tmp_path, crash_at, checkpoints, position):
    kw = dict(max_steps=9, save_steps=3, gradient_accumulation_steps=2, logging_steps=2)
    features = synthetic_features(37)  # 10 micro-batches per epoch: 5 steps per epoch, so 9 steps cross one
    straight = Trainer(FakeQAModel(7), args_for(tmp_path / "a", **kw), features)
    straight.train()

    args = args_for(tmp_path / "b", **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(CrashAt(7, at=crash_at), args, features).train()  # 2 micro-batches (rng steps) per step
    out = Path(args.output_dir)
    assert [p.name for p in list_checkpoints(out)] == checkpoints
    state = json.loads((out / checkpoints[-1] / TRAINER_STATE_NAME).read_text())
    assert (state["global_step"], state["epoch"], state["position"]) == position
    assert state["data_rng_state"] == data_rng_state(7, position[1])

    with pytest.raises(TrainingError, match="--resume"):
        Trainer(FakeQAModel(7), args, features).train()  # checkpoints there, no --resume: refuse
    resumed_model = FakeQAModel(7)
    resumed = Trainer(resumed_model, args, features)
    resumed.train(resume_from_checkpoint="latest")
    # The log of the resumed run (kept up to step 6, continued from there) equals the uninterrupted one.
    straight_log = read_log(tmp_path / "a" / "out" / LOG_NAME)
    resumed_log = read_log(out / LOG_NAME)
    strip = lambda rs: [{k: r[k] for k in ("step", "epoch", "loss", "lr", "grad_norm")} for r in rs]  # noqa: E731
    assert strip(resumed_log) == strip(straight_log)
    assert [r["step"] for r in resumed.history] == [s for s in (2, 4, 6, 8, 9) if s > position[0]]
    assert np.array_equal(resumed_model.w, straight.model.w)
    assert (resumed_model.step, resumed_model.rng_step) == (straight.model.step, straight.model.rng_step)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resumes_exactly(tmp_path):
    """SIGTERM (a stopped SageMaker job, a reclaimed spot instance) mid-step: the step completes, a checkpoint of
    it is written (save_steps is 0 here), KeyboardInterrupt is raised; resuming gives the uninterrupted run."""
    class TermAt(FakeQAModel):
        def forward_backward(self, batch, loss_scale=1.0, **kw):
            if self.rng_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)   # arrives inside step 5's forward/backward
            return super().forward_backward(batch, loss_scale, **kw)

    kw = dict(max_steps=8, save_steps=0, logging_steps=1)
    features = synthetic_features(37)
    straight = Trainer(FakeQAModel(7), args_for(tmp_path / "a", **kw), features)
    straight.train()
    args = args_for(tmp_path / "b", **kw)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM after step 5"):
        Trainer(TermAt(7), args, features).train()
    assert signal.getsignal(signal.SIGTERM) is before   # the trainer's handler is gone again
    assert [p.name for p in list_checkpoints(args.output_dir)] == ["checkpoint-5"]
    resumed_model = FakeQAModel(7)
    Trainer(resumed_model, args, features).train(resume_from_checkpoint="latest")
    assert np.array_equal(resumed_model.w, straight.model.w)
    strip = lambda rs: [{k: r[k] for k in ("step", "loss", "lr", "grad_norm")} for r in rs]  # noqa: E731
    assert strip(read_log(Path(args.output_dir) / LOG_NAME)) == strip(read_log(tmp_path / "a" / "out" / LOG_NAME))


def test_resume_from_a_named_checkpoint_and_mismatches(tmp_path):
    features = synthetic_features(37)
    args = args_for(tmp_path, max_steps=6, save_steps=3)
    Trainer(FakeQAModel(7), args, features).train()
    ck3 = Path(args.output_dir) / "checkpoint-3"
    model = FakeQAModel(7)
    Trainer(model, args, features).train(resume_from_checkpoint=ck3)
    assert model.step == 6
    with pytest.raises(TrainingError, match="per_device_train_batch_size"):
        Trainer(FakeQAModel(7), args_for(tmp_path, max_steps=6, per_device_train_batch_size=5), features
                ).train(resume_from_checkpoint=ck3)
    with pytest.raises(TrainingError, match="training features"):
        Trainer(FakeQAModel(7), args, synthetic_features(36)).train(resume_from_checkpoint=ck3)
    with pytest.raises(TrainingError, match="not a checkpoint folder"):
        Trainer(FakeQAModel(7), args, features).train(resume_from_checkpoint=tmp_path)
    # --overwrite_output_dir starts afresh and drops the old checkpoints.
    Trainer(FakeQAModel(7), args_for(tmp_path, max_steps=2, save_steps=0, overwrite_output_dir=True),
            features).train()
    assert list_checkpoints(args.output_dir) == []


def test_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    class FailingSave(FakeQAModel):
        def save_training_state(self, path):
            if self.step == 6:
                Path(path).write_bytes(b"half a fi")
                raise OSError(28, "No space left on device")
            super().save_training_state(path)

    args = args_for(tmp_path, max_steps=9, save_steps=3, save_total_limit=1)
    out = Path(args.output_dir)
    trainer = Trainer(FailingSave(7), args, synthetic_features(37))
    # A full disk is one line naming the checkpoint (TrainingError, which the CLI prints), not the bare OSError.
    with pytest.raises(TrainingError, match=r"cannot write \S+checkpoint-6 \(the earlier checkpoints are intact\): "
                                            r"No space left on device"):
        trainer.train()
    assert [p.name for p in out.iterdir() if "checkpoint" in p.name] == ["checkpoint-3"]  # no temporaries left
    before = tree_digest(out / "checkpoint-3")
    assert set(before) >= {"config.json", TRAINING_STATE_NAME, TRAINER_STATE_NAME}
    # A hard kill mid-save leaves a hidden temporary folder: never taken for a checkpoint, removed at the next start.
    stale = out / ".checkpoint-6.abc123.tmp"
    stale.mkdir()
    (stale / TRAINER_STATE_NAME).write_text("{}")
    assert latest_checkpoint(out).name == "checkpoint-3"
    model = FakeQAModel(7)
    Trainer(model, args, synthetic_features(37)).train(resume_from_checkpoint="latest")
    assert model.step == 9 and not stale.exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-9"]  # save_total_limit=1


def test_save_total_limit_keeps_the_newest(tmp_path):
    args = args_for(tmp_path, max_steps=10, save_steps=2, save_total_limit=2)
    Trainer(FakeQAModel(7), args, synthetic_features(37)).train()
    assert [p.name for p in list_checkpoints(args.output_dir)] == ["checkpoint-8", "checkpoint-10"]
    args = args_for(tmp_path / "all", max_steps=6, save_steps=2)
    Trainer(FakeQAModel(7), args, synthetic_features(37)).train()
    assert len(list_checkpoints(args.output_dir)) == 3


def test_output_dir_must_be_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="not writable|not a folder"):
        Trainer(FakeQAModel(), args_for(tmp_path, output_dir=str(blocker / "out")), synthetic_features()).train()


# ---- prediction ------------------------------------------------------------------------------------------


def test_predict_features_puts_logits_back_in_row_order(tmp_path):
    features = synthetic_features(37, width=48)

    class Recorder(FakeQAModel):
        widths = []

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            self.widths.append(input_ids.shape[1])
            return input_ids.astype(np.float32), -input_ids.astype(np.float32)

    start, end = predict_features(Recorder(), features, batch_size=5)
    mask = features.attention_mask.astype(bool)
    assert start.shape == end.shape == features.input_ids.shape and start.dtype == np.float32
    assert np.array_equal(start[mask], features.input_ids[mask].astype(np.float32))
    assert np.array_equal(end[mask], -features.input_ids[mask].astype(np.float32))
    assert np.all(np.isneginf(start[~mask])) and np.all(np.isneginf(end[~mask]))
    assert Recorder.widths == sorted(Recorder.widths, reverse=True) and Recorder.widths[-1] < 48


def test_evaluate_model_with_oracle_logits_on_real_questions(data_dir, tmp_path):
    """An oracle that puts its logits on each window's labels scores ~100: predictions go to the right rows."""
    from bertqa.squad import build_features
    from bertqa.tokenization import BertQATokenizer

    tokenizer = BertQATokenizer.from_vocab(data_dir / "vocab" / "bert-base-uncased-vocab.txt")
    examples = load_squad(write_squad_subset(data_dir / "squad" / "valid.json", tmp_path / "v.json", 40))
    features = build_features(examples, tokenizer, max_seq_length=128, doc_stride=32, progress=False)
    labels = {features.input_ids[i].tobytes(): (features.start_positions[i], features.end_positions[i])
              for i in range(len(features))}

    class Oracle(FakeQAModel):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            start, end = np.zeros(input_ids.shape, np.float32), np.zeros(input_ids.shape, np.float32)
            for r, row in enumerate(input_ids):
                full = np.zeros(features.seq_len, np.int32)
                full[:len(row)] = row
                s, e = labels[full.tobytes()]
                start[r, s], end[r, e] = 10.0, 10.0
            return start, end

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=7, disable_tqdm=True)
    metrics, predictions = evaluate_model(Oracle(), examples, features, args)
    assert list(predictions) == [ex.id for ex in examples]
    assert metrics["exact_match"] > 95 and metrics["f1"] > 97
    assert metrics["eval_examples"] == 40 and metrics["eval_features"] == len(features)
    assert examples_dataset(examples)["data"][0]["paragraphs"][0]["qas"][0]["id"] == examples[0].id


def _eval_set(data_dir, tmp_path, n=24):
    from bertqa.squad import build_features
    from bertqa.tokenization import BertQATokenizer

    tokenizer = BertQATokenizer.from_vocab(data_dir / "vocab" / "bert-base-uncased-vocab.txt")
    examples = load_squad(write_squad_subset(data_dir / "squad" / "valid.json", tmp_path / "v.json", n))
    return examples, build_features(examples, tokenizer, max_seq_length=128, doc_stride=32, progress=False)


class ZeroLogits(FakeQAModel):
    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return np.zeros(input_ids.shape, np.float32), np.zeros(input_ids.shape, np.float32)


def test_evaluation_says_its_size_and_shows_a_bar(data_dir, tmp_path, caplog, capsys):
    examples, features = _eval_set(data_dir, tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=7, disable_tqdm=False)
    with caplog.at_level("INFO", logger="bertqa.train"):
        evaluate_model(ZeroLogits(), examples, features, args)
    assert f"evaluate: 24 questions, {len(features)} windows of up to 128 tokens, batches of 7" in caplog.text
    err = capsys.readouterr().err
    assert "evaluate: 100%" in err and f"{len(features)}/{len(features)}" in err   # the bar, to its end


def test_evaluation_without_a_bar_logs_its_progress(data_dir, tmp_path, caplog, capsys, monkeypatch):
    """Not on a terminal (or --disable_tqdm): no bar, but log lines while it runs, as training logs its steps."""
    import bertqa.train

    monkeypatch.setattr(bertqa.train, "EVAL_LOG_INTERVAL_S", 0.0)
    examples, features = _eval_set(data_dir, tmp_path)
    for disable in (None, True):   # None: pytest's captured stderr is no terminal
        caplog.clear()
        args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=7, disable_tqdm=disable)
        with caplog.at_level("INFO", logger="bertqa.train"):
            evaluate_model(ZeroLogits(), examples, features, args)
        lines = caplog.messages
        assert lines[0].startswith(f"evaluate: 24 questions, {len(features)} windows")
        assert f"evaluate: 7/{len(features)} windows" in lines[1]
        assert "%|" not in capsys.readouterr().err


# ---- the real engine -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run_files(shared_data_dir, tmp_path_factory):
    """A tiny random BERT and 24 real training questions."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model", shared_data_dir / "vocab" / "bert-base-uncased-vocab.txt")
    train = write_squad_subset(shared_data_dir / "squad" / "train.json", root / "train.json", 24)
    return model, train


def finetune_cmd(model, train, out, *extra):
    return [sys.executable, "-m", "bertqa", "finetune", "--model_name_or_path", str(model), "--train_file",
            str(train), "--output_dir", str(out), "--max_seq_length", "96", "--doc_stride", "24",
            "--max_query_length", "32", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", "--seed", "3", "--disable_tqdm",
            *extra]


def losses_of(out: Path) -> list[tuple[int, float, float, float]]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_log(out / LOG_NAME) if "loss" in r]


@needs_engine
def test_real_engine_killed_run_resumes_bit_for_bit(tiny_run_files, tmp_path):
    """6 steps straight vs 3 steps, SIGKILL during step 5, --resume: the same losses, lrs and grad norms."""
    model, train = tiny_run_files
    env = dict(os.environ, BERTQA_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    straight = tmp_path / "straight"
    subprocess.run(finetune_cmd(model, train, straight), check=True, env=env, capture_output=True, timeout=300)
    expected = losses_of(straight)
    assert [s for s, *_ in expected] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(v) for _, *vs in expected for v in vs)

    # The child kills itself (SIGKILL: no cleanup at all) as the optimizer step of step 5 begins.
    killed = tmp_path / "killed"
    child = textwrap.dedent("""
        import os, signal, sys
        from bertqa.model import BertQA
        original = BertQA.optimizer_step
        def optimizer_step(self, *a, **k):
            if self.step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *a, **k)
        BertQA.optimizer_step = optimizer_step
        from bertqa.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    cmd = finetune_cmd(model, train, killed)
    proc = subprocess.run([sys.executable, "-c", child, *cmd[3:]], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [p.name for p in list_checkpoints(killed)] == ["checkpoint-3"]
    assert [s for s, *_ in losses_of(killed)] == [1, 2, 3, 4]

    proc = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert losses_of(killed) == expected  # bit for bit: JSON keeps every float exactly
    assert [p.name for p in list_checkpoints(killed)] == ["checkpoint-3", "checkpoint-6"]
    a, b = (json.loads((d / "checkpoint-6" / TRAINER_STATE_NAME).read_text()) for d in (straight, killed))
    assert {k: v for k, v in a.items() if k != "train_seconds"} == {k: v for k, v in b.items() if k != "train_seconds"}
    for name in ("model.safetensors", TRAINING_STATE_NAME):
        assert (straight / "checkpoint-6" / name).read_bytes() == (killed / "checkpoint-6" / name).read_bytes()


@needs_engine
def test_real_engine_same_seed_same_losses(tiny_run_files, tmp_path, monkeypatch):
    from bertqa.train import finetune

    monkeypatch.setenv("BERTQA_CACHE_DIR", str(tmp_path / "cache"))
    model, train = tiny_run_files
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_seq_length=96, doc_stride=24,
                                 max_query_length=32, per_device_train_batch_size=4, learning_rate=1e-3,
                                 max_steps=4, save_steps=0, logging_steps=1, seed=seed, disable_tqdm=True)
        finetune(model, train, None, args)
        runs[name] = losses_of(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
