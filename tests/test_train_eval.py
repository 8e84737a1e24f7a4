"""Evaluation during training (--eval_strategy epoch|steps), --load_best_model_at_end (also across a resume),
--layerwise_lr_decay through the trainer, and the training curve PNG, on a tiny random BERT and real questions."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bertqa.train import (BEST_MODEL_NAME, CURVE_NAME, EVAL_RESULTS_NAME, LOG_NAME, TRAINER_STATE_NAME,
                          TrainingArguments, TrainingError, finetune, read_log)
from qa_helpers import engine_available, make_tiny_model, write_squad_subset

needs_engine = pytest.mark.skipif(not engine_available(), reason="bertqa.model (the engine) is not built")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def files(shared_data_dir, tmp_path_factory):
    """A tiny random BERT, 24 training questions (about 7 windows of 96: 2 steps an epoch at batch 4) and 12
    validation questions."""
    root = tmp_path_factory.mktemp("tiny-eval")
    model = make_tiny_model(root / "model", shared_data_dir / "vocab" / "bert-base-uncased-vocab.txt")
    train = write_squad_subset(shared_data_dir / "squad" / "train.json", root / "train.json", 24)
    valid = write_squad_subset(shared_data_dir / "squad" / "valid.json", root / "valid.json", 12)
    return model, train, valid


def tiny_args(out: Path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), max_seq_length=96, doc_stride=24, max_query_length=32,
                per_device_train_batch_size=4, per_device_eval_batch_size=16, learning_rate=3e-3,
                num_train_epochs=3, warmup_ratio=0.0, save_steps=0, logging_steps=1, seed=5, disable_tqdm=True,
                layerwise_lr_decay=1.0)
    base.update(kw)
    return TrainingArguments(**base)


def test_eval_strategy_arguments_are_checked(tmp_path):
    with pytest.raises(TrainingError, match="--eval_strategy must be no, steps or epoch"):
        tiny_args(tmp_path, eval_strategy="sometimes").validate()
    with pytest.raises(TrainingError, match="--eval_strategy steps needs --eval_steps"):
        tiny_args(tmp_path, eval_strategy="steps").validate()
    with pytest.raises(TrainingError, match="--load_best_model_at_end needs evaluations"):
        tiny_args(tmp_path, load_best_model_at_end=True).validate()
    with pytest.raises(TrainingError, match="--metric_for_best_model"):
        tiny_args(tmp_path, metric_for_best_model="loss").validate()
    for bad in (0.0, 1.5, -1.0, float("nan")):
        with pytest.raises(TrainingError, match="--layerwise_lr_decay"):
            tiny_args(tmp_path, layerwise_lr_decay=bad).validate()
    assert tiny_args(tmp_path, eval_steps=3).validate().resolved_eval_strategy() == "steps"   # as before
    assert tiny_args(tmp_path).validate().resolved_eval_strategy() == "no"
    assert tiny_args(tmp_path, eval_strategy="no", eval_steps=3).validate().resolved_eval_strategy() == "no"


def eval_records(out: Path) -> list[dict]:
    return [r for r in read_log(out / LOG_NAME) if "eval_f1" in r]


@needs_engine
def test_epoch_evaluations_best_model_and_curve(files, tmp_path, monkeypatch):
    """One evaluation per epoch in the log, not counted as training time; the final model is the best
    evaluation's (the checkpoint of that step has the same bytes) and eval_results.json names its step."""
    monkeypatch.setenv("BERTQA_CACHE_DIR", str(tmp_path / "cache"))
    model, train, valid = files
    out = tmp_path / "out"
    args = tiny_args(out, eval_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="f1",
                     save_steps=1)
    t0 = time.perf_counter()
    results = finetune(model, train, valid, args)
    wall = time.perf_counter() - t0
    state = json.loads((out / "checkpoint-1" / TRAINER_STATE_NAME).read_text())
    per_epoch = results["train_steps"] // 3
    assert per_epoch >= 1 and state["n_features"] > 0
    evals = eval_records(out)
    assert [r["step"] for r in evals] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert [r["epoch"] for r in evals] == [1.0, 2.0, 3.0]
    assert all(0 <= r["eval_f1"] <= 100 and r["eval_examples"] == 12 for r in evals)
    f1s = [r["eval_f1"] for r in evals]
    best = evals[int(np.argmax(f1s))]   # the first of equal scores: a later one must be strictly better
    saved = json.loads((out / EVAL_RESULTS_NAME).read_text())
    assert saved["best_model_step"] == best["step"] and saved["metric_for_best_model"] == "f1"
    assert saved["f1"] == best["eval_f1"] and saved["exact_match"] == best["eval_exact_match"]
    weights = (out / "model.safetensors").read_bytes()
    assert weights == (out / f"checkpoint-{best['step']}" / "model.safetensors").read_bytes()
    assert weights == (out / BEST_MODEL_NAME / "model.safetensors").read_bytes()
    # evaluation time is not training time
    eval_seconds = sum(r["eval_seconds"] for r in evals)
    assert results["train_seconds"] + eval_seconds <= wall
    steps = [r for r in read_log(out / LOG_NAME) if "loss" in r]
    assert steps[-1]["elapsed"] == pytest.approx(results["train_seconds"], rel=1e-6)
    png = out / CURVE_NAME
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


@needs_engine
def test_best_model_survives_a_resume(files, tmp_path, monkeypatch):
    """A run that dies in its last epoch and resumes ends with the same best model as one that never stopped
    (the best parameters come back from output_dir/best-model)."""
    from bertqa.model import BertQA

    monkeypatch.setenv("BERTQA_CACHE_DIR", str(tmp_path / "cache"))
    model, train, valid = files
    kw = dict(eval_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="exact_match", save_steps=1,
              learning_rate=1e-2)
    straight = tmp_path / "straight"
    expected = finetune(model, train, valid, tiny_args(straight, **kw))
    total = expected["train_steps"]

    killed = tmp_path / "killed"
    dying = BertQA.from_pretrained(model, seed=5)
    original = dying.optimizer_step

    def optimizer_step(*a, **k):
        if dying.step == total - 1:
            raise RuntimeError("simulated crash")
        return original(*a, **k)

    dying.optimizer_step = optimizer_step
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(model, train, valid, tiny_args(killed, **kw), model=dying)
    got = finetune(model, train, valid, tiny_args(killed, resume_from_checkpoint="latest", **kw))
    assert got["best_model_step"] == expected["best_model_step"]
    assert (got["exact_match"], got["f1"]) == (expected["exact_match"], expected["f1"])
    assert (killed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


@needs_engine
def test_layerwise_lr_decay_reaches_the_optimizer(files, tmp_path, monkeypatch):
    """--layerwise_lr_decay 0.5 passes model.layerwise_lr_scale to every optimizer step; 1.0 passes nothing."""
    from bertqa.model import BertQA, layerwise_lr_scale

    monkeypatch.setenv("BERTQA_CACHE_DIR", str(tmp_path / "cache"))
    model, train, _ = files
    for decay in (0.5, 1.0):
        m = BertQA.from_pretrained(model, seed=5)
        seen = []
        original = m.optimizer_step

        def optimizer_step(lr, *, _orig=original, _seen=seen, **k):
            _seen.append(k.get("lr_scale"))
            return _orig(lr, **k)

        m.optimizer_step = optimizer_step
        finetune(model, train, None, tiny_args(tmp_path / str(decay), layerwise_lr_decay=decay, max_steps=2), model=m)
        assert len(seen) == 2
        if decay == 1.0:
            assert seen == [None, None]
        else:
            want = layerwise_lr_scale(list(m.layout), m.config.num_hidden_layers, 0.5)
            assert all(np.array_equal(s, want) for s in seen)
            assert sorted(set(want.tolist())) == [0.25, 0.5, 1.0]   # 2 layers: embeddings 0.25


def test_curve_is_skipped_without_matplotlib(tmp_path, monkeypatch, caplog):
    from bertqa.plot import plot_run

    (tmp_path / LOG_NAME).write_text(json.dumps({"step": 1, "epoch": 0.1, "loss": 5.0, "lr": 1e-4}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with caplog.at_level("INFO", logger="bertqa.plot"):
        assert plot_run(tmp_path) is None
    assert "matplotlib is not installed" in caplog.text and "bertqa[plot]" in caplog.text
    assert not (tmp_path / CURVE_NAME).exists()


def test_curve_from_a_log(tmp_path):
    pytest.importorskip("matplotlib")
    from bertqa.plot import plot_run

    records = [{"step": s, "epoch": s / 10, "loss": 5.0 / s, "lr": 1e-4 * (1 - s / 20)} for s in range(1, 21)]
    records += [{"step": 10, "epoch": 1.0, "eval_exact_match": 20.0, "eval_f1": 30.0},
                {"step": 20, "epoch": 2.0, "eval_exact_match": 30.0, "eval_f1": 40.0}]
    (tmp_path / LOG_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / EVAL_RESULTS_NAME).write_text(json.dumps({"exact_match": 30.0, "f1": 40.0, "train_steps": 20,
                                                          "train_seconds": 90.0, "eval_examples": 12}))
    path = plot_run(tmp_path)
    assert path == tmp_path / CURVE_NAME and path.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*.tmp"))   # written atomically: no temporary left behind


SINGLE_POINT_RUNS = {
    # the final evaluation alone (no evaluation during training): two stars at the last step
    "final evaluation only": ([{"step": s, "loss": 5.0 / s, "lr": 1e-4} for s in range(1, 21)], [],
                              {"exact_match": 30.0, "f1": 40.0, "train_steps": 20}),
    # one evaluation during training, no eval_results.json (a run stopped before its end)
    "one evaluation": ([{"step": s, "loss": 5.0 / s, "lr": 1e-4} for s in range(1, 21)],
                       [{"step": 20, "eval_exact_match": 30.0, "eval_f1": 40.0}], None),
    # a run of one logged step: loss and learning rate are single points too
    "one step": ([{"step": 1, "loss": 5.0, "lr": 1e-4}], [{"step": 1, "eval_exact_match": 3.0, "eval_f1": 9.0}],
                 {"exact_match": 3.0, "f1": 9.0, "train_steps": 1}),
}


@pytest.mark.parametrize("case", SINGLE_POINT_RUNS)
def test_curve_shows_single_points(tmp_path, case):
    """A series of one point (one evaluation, one logged step) is drawn with a marker, inside the axes' limits:
    a line of one point without a marker draws nothing."""
    pytest.importorskip("matplotlib")
    from bertqa.plot import draw_run

    steps, evals, final = SINGLE_POINT_RUNS[case]
    (tmp_path / LOG_NAME).write_text("".join(json.dumps({"epoch": 0.5, **r}) + "\n" for r in steps + evals))
    if final is not None:
        (tmp_path / EVAL_RESULTS_NAME).write_text(json.dumps({**final, "eval_examples": 12}))
    fig = draw_run(tmp_path)
    top, bottom, lr_axis = fig.axes
    drawn = {}
    for ax in (top, lr_axis, bottom):
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for line in ax.get_lines():
            xs, ys = list(line.get_xdata()), list(line.get_ydata())
            drawn.setdefault(ax, []).append((line.get_label(), xs, ys))
            if len(xs) == 1:
                assert line.get_marker() not in (None, "", " ", "None") and line.get_markersize() > 0, \
                    (case, line.get_label())
            assert line.get_visible() and all(x0 < x < x1 for x in xs) and all(y0 < y < y1 for y in ys), \
                (case, line.get_label(), (x0, x1), (y0, y1), xs, ys)
    scores = sorted(y for _, _, ys in drawn[bottom] for y in ys)
    want = ([r[k] for r in evals for k in ("eval_exact_match", "eval_f1")] +
            ([final["exact_match"], final["f1"]] if final else []))
    assert scores == sorted(want)   # every evaluation is in the lower panel
    assert len(drawn[top]) == len(drawn[lr_axis]) == 1

