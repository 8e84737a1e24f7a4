"""Checkpoints that prove themselves, resumes that compare what matters, full disks: issue 22, items 3 and 4.

- Every checkpoint-N/ holds manifest.json (each file's size and sha256, written last, inside the atomic write).
- Resuming ("latest", --resume, the training job's automatic resume) verifies the checkpoint it picks; a damaged
  one (a truncated, empty or missing file, bad JSON, a checksum mismatch) is named in one warning line and the
  newest intact one is used; none intact is one error line naming the files. Checkpoints written before
  manifests existed still resume, checked for what can be checked (loadable files, sizes).
- Resuming with another model config (the same parameter count, other heads) or other preprocessing flags
  (max_seq_length, doc_stride, max_query_length, the tokenizer) is refused naming each field with both values.
- A full disk while writing a checkpoint, the final model, model/ or results is one line naming the path; the
  earlier checkpoints and model/ stay as they were. Full disks are real: small tmpfs mounts (skipped where
  mounting is not allowed), always unmounted.

Bookkeeping runs on FakeQAModel (tests/qa_helpers.py); the end-to-end tests run the real engine on a tiny BERT,
through `bertqa finetune` and `bertqa train`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertqa import training_job as tj
from bertqa.train import (LOG_NAME, MANIFEST_NAME, TRAINER_STATE_NAME, TRAINING_STATE_NAME, Trainer,
                          TrainingArguments, TrainingError, checkpoint_problems, list_checkpoints, read_log)
from qa_helpers import FakeQAModel, engine_available, make_tiny_model, synthetic_features, write_squad_subset

needs_engine = pytest.mark.skipif(not engine_available(), reason="bertqa.model (the engine) is not built")


def args_for(out: Path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=9,
                logging_steps=1, save_steps=3, seed=7, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base).validate()


class CrashAfter(FakeQAModel):
    """Dies in the forward pass of step `step` + 1, after the checkpoints before it were written."""

    def __init__(self, seed: int, step: int):
        super().__init__(seed)
        self.crash_step = step

    def forward_backward(self, batch, loss_scale=1.0, **kw):
        if self.step == self.crash_step:
            raise RuntimeError("simulated crash")
        return super().forward_backward(batch, loss_scale, **kw)


def crashed_run(out: Path, features) -> TrainingArguments:
    """A 9-step run (checkpoints every 3 steps) that died in step 8: checkpoint-3 and checkpoint-6 on disk."""
    args = args_for(out)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(CrashAfter(7, 7), args, features).train()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    return args


@pytest.fixture(scope="module")
def straight_fake(tmp_path_factory):
    """The uninterrupted 9-step run that every resumed fake run must equal."""
    model = FakeQAModel(7)
    Trainer(model, args_for(tmp_path_factory.mktemp("straight") / "out"), synthetic_features(37)).train()
    return model


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ---- the manifest -------------------------------------------------------------------------------------------


def test_each_checkpoint_records_its_files_sizes_and_checksums(tmp_path):
    args = args_for(tmp_path / "out", max_steps=3)
    Trainer(FakeQAModel(7), args, synthetic_features(37)).train()
    folder = tmp_path / "out" / "checkpoint-3"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    on_disk = {p.name for p in folder.iterdir()} - {MANIFEST_NAME}
    assert set(manifest["files"]) == on_disk >= {TRAINER_STATE_NAME, TRAINING_STATE_NAME, "config.json"}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state = json.loads((folder / TRAINER_STATE_NAME).read_text())
    assert state["manifest"] == MANIFEST_NAME   # a copy that lost its manifest is known to be incomplete
    assert checkpoint_problems(folder) == []


# ---- a damaged newest checkpoint: one warning naming the file, then the previous one ------------------------


DAMAGES = {
    "truncated optimizer state": (TRAINING_STATE_NAME, lambda p: truncate(p), "truncated"),
    "truncated weights": ("fake_weights.npy", lambda p: truncate(p, 0.8), "truncated"),
    "zero-byte file": ("config.json", lambda p: p.write_bytes(b""), "truncated"),
    "missing file": ("fake_weights.npy", lambda p: p.unlink(), "missing"),
    "bad JSON": (TRAINER_STATE_NAME, lambda p: p.write_text("{" + " " * (p.stat().st_size - 1)), "sha256"),
    "checksum mismatch": ("fake_weights.npy", flip_a_byte, "sha256"),
    "manifest missing": (MANIFEST_NAME, lambda p: p.unlink(), "missing"),
    "manifest truncated": (MANIFEST_NAME, lambda p: truncate(p), "unreadable"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, straight_fake, damage):
    name, spoil, why = DAMAGES[damage]
    features = synthetic_features(37)
    out = tmp_path / "out"
    args = crashed_run(out, features)
    spoil(out / "checkpoint-6" / name)

    caplog.set_level(logging.INFO, logger="bertqa.train")
    model = FakeQAModel(7)
    trainer = Trainer(model, args, features)
    trainer.train(resume_from_checkpoint="latest")
    lines = warnings_of(caplog)
    assert len(lines) == 1, lines
    assert "checkpoint-6" in lines[0] and name in lines[0] and why in lines[0], lines[0]
    assert "resuming from checkpoint-3" in lines[0]
    # It continued from step 3 and ends exactly where the uninterrupted run ended.
    assert [r["step"] for r in trainer.history if "loss" in r] == [4, 5, 6, 7, 8, 9]
    assert np.array_equal(model.w, straight_fake.w) and model.step == straight_fake.step == 9
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    assert checkpoint_problems(out / "checkpoint-6") == []   # written again, whole


def test_no_intact_checkpoint_is_one_error_naming_the_files(tmp_path):
    features = synthetic_features(37)
    out = tmp_path / "out"
    args = crashed_run(out, features)
    truncate(out / "checkpoint-6" / TRAINING_STATE_NAME)
    (out / "checkpoint-3" / "config.json").write_bytes(b"")
    with pytest.raises(TrainingError) as e:
        Trainer(FakeQAModel(7), args, features).train(resume_from_checkpoint="latest")
    message = str(e.value)
    assert "\n" not in message
    assert f"checkpoint-6: {TRAINING_STATE_NAME} has" in message and "checkpoint-3: config.json" in message
    assert "--overwrite_output_dir" in message


def test_a_named_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    """--resume_from_checkpoint DIR names one checkpoint: it is verified, and not swapped for another."""
    features = synthetic_features(37)
    out = tmp_path / "out"
    args = crashed_run(out, features)
    flip_a_byte(out / "checkpoint-6" / TRAINING_STATE_NAME)
    with pytest.raises(TrainingError, match=rf"checkpoint-6 is damaged: {TRAINING_STATE_NAME} does not match its "
                                            rf"sha256"):
        Trainer(FakeQAModel(7), args, features).train(resume_from_checkpoint=out / "checkpoint-6")


def test_a_checkpoint_folder_without_its_trainer_state_is_reported_not_skipped_silently(tmp_path, caplog):
    features = synthetic_features(37)
    out = tmp_path / "out"
    args = crashed_run(out, features)
    (out / "checkpoint-6" / TRAINER_STATE_NAME).unlink()
    caplog.set_level(logging.INFO, logger="bertqa.train")
    Trainer(FakeQAModel(7), args, features).train(resume_from_checkpoint="latest")
    assert any("checkpoint-6" in w and f"{TRAINER_STATE_NAME} is missing" in w for w in warnings_of(caplog))


# ---- checkpoints written before manifests ------------------------------------------------------------------


def make_legacy(folder: Path) -> None:
    """What the code before manifests wrote: no manifest.json, a trainer state without the new keys."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    state = json.loads((folder / TRAINER_STATE_NAME).read_text())
    for key in ("manifest", "preprocessing"):
        state.pop(key, None)
    (folder / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")


def test_a_checkpoint_without_manifest_still_resumes_exactly(tmp_path, straight_fake):
    features = synthetic_features(37)
    out = tmp_path / "out"
    args = crashed_run(out, features)
    for folder in list_checkpoints(out):
        make_legacy(folder)
    assert checkpoint_problems(out / "checkpoint-6") == []
    model = FakeQAModel(7)
    trainer = Trainer(model, args, features)
    trainer.train(resume_from_checkpoint="latest")
    assert [r["step"] for r in trainer.history if "loss" in r] == [7, 8, 9]
    assert np.array_equal(model.w, straight_fake.w)
    assert (out / "checkpoint-9" / MANIFEST_NAME).is_file()


@pytest.mark.parametrize("name, spoil", [
    (TRAINING_STATE_NAME, truncate),                  # the archive's central directory is gone
    (TRAINING_STATE_NAME, flip_a_byte),               # a member fails its CRC
    ("fake_weights.npy", lambda p: truncate(p, 0.9)),  # fewer bytes than its header says
    ("config.json", lambda p: p.write_bytes(b"")),
    (TRAINER_STATE_NAME, lambda p: p.write_text('{"global_step": 6,')),
])
def test_a_damaged_checkpoint_without_manifest_is_caught_by_what_can_be_checked(tmp_path, caplog, straight_fake,
                                                                                name, spoil):
    features = synthetic_features(37)
    out = tmp_path / "out"
    args = crashed_run(out, features)
    for folder in list_checkpoints(out):
        make_legacy(folder)
    spoil(out / "checkpoint-6" / name)
    caplog.set_level(logging.INFO, logger="bertqa.train")
    model = FakeQAModel(7)
    Trainer(model, args, features).train(resume_from_checkpoint="latest")
    lines = warnings_of(caplog)
    assert len(lines) == 1 and "checkpoint-6" in lines[0] and name in lines[0], lines
    assert np.array_equal(model.w, straight_fake.w)


def test_loading_errors_are_one_line_naming_the_file(tmp_path):
    """A checkpoint that is whole but not what it should be (no manifest to blame): the error names the file."""
    features = synthetic_features(37)
    out = tmp_path / "out"
    args = crashed_run(out, features)
    shutil.rmtree(out / "checkpoint-3")
    make_legacy(out / "checkpoint-6")
    state = out / "checkpoint-6" / TRAINER_STATE_NAME
    state.write_text("[]")
    with pytest.raises(TrainingError, match=rf"{state}: not a trainer state"):
        Trainer(FakeQAModel(7), args, features).train(resume_from_checkpoint="latest")


# ---- resume compares what matters ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab_file(shared_data_dir):
    return shared_data_dir / "vocab" / "bert-base-uncased-vocab.txt"


@pytest.fixture(scope="module")
def tiny_models(vocab_file, tmp_path_factory):
    """Two tiny BERTs with the same parameter count: 2 heads of 16 and 4 heads of 8."""
    root = tmp_path_factory.mktemp("models")
    return (make_tiny_model(root / "heads2", vocab_file, heads=2),
            make_tiny_model(root / "heads4", vocab_file, heads=4))


def engine_run(model, out: Path, **kw) -> Trainer:
    """A Trainer of the real engine on synthetic windows: 2 steps and a checkpoint unless told otherwise."""
    args = args_for(out, **{"max_steps": 2, "save_steps": 2, "learning_rate": 1e-3, **kw})
    return Trainer(model, args, synthetic_features(37))


@needs_engine
def test_resume_refuses_another_model_config_with_the_same_parameter_count(tiny_models, tmp_path):
    from bertqa.model import BertQA

    heads2, heads4 = (BertQA.from_pretrained(m, seed=3) for m in tiny_models)
    assert heads2.num_parameters() == heads4.num_parameters()
    engine_run(heads2, tmp_path / "out").train()
    resumed = engine_run(heads4, tmp_path / "out", max_steps=4)
    with pytest.raises(TrainingError) as e:
        resumed.train(resume_from_checkpoint="latest")
    assert "model config num_attention_heads 2 (this model: 4)" in str(e.value)
    assert "checkpoint-2" in str(e.value) and "\n" not in str(e.value)


@needs_engine
def test_resume_names_each_preprocessing_setting_that_differs(tiny_models, vocab_file, tmp_path):
    from bertqa.model import BertQA
    from bertqa.tokenization import BertQATokenizer

    engine_run(BertQA.from_pretrained(tiny_models[0], seed=3), tmp_path / "out").train()
    model = BertQA.from_pretrained(tiny_models[0], seed=3)
    with pytest.raises(TrainingError) as e:
        engine_run(model, tmp_path / "out", max_steps=4, doc_stride=100, max_query_length=32
                   ).train(resume_from_checkpoint="latest")
    assert "--doc_stride 128 (now 100), --max_query_length 64 (now 32)" in str(e.value)

    model.tokenizer = BertQATokenizer.from_vocab(vocab_file, do_lower_case=False)
    with pytest.raises(TrainingError, match=r"the tokenizer's do_lower_case True \(now False\)"):
        engine_run(model, tmp_path / "out", max_steps=4).train(resume_from_checkpoint="latest")
    other_vocab = tmp_path / "vocab.txt"
    tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    tokens[2000] = "zzzunseen"
    other_vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    model.tokenizer = BertQATokenizer.from_vocab(other_vocab, do_lower_case=True)
    with pytest.raises(TrainingError, match=r"the tokenizer's vocabulary \(sha256\) \w+\.\.\. \(now \w+\.\.\.\)"):
        engine_run(model, tmp_path / "out", max_steps=4).train(resume_from_checkpoint="latest")
    # The same settings resume.
    model = BertQA.from_pretrained(tiny_models[0], seed=3)
    engine_run(model, tmp_path / "out", max_steps=4).train(resume_from_checkpoint="latest")
    assert model.step == 4


# ---- full disks -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size: int):
    """A tmpfs of `size` bytes mounted at path (root only; skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(folder: Path) -> Path:
    """Write folder/filler until the file system is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_full_disk_while_writing_a_checkpoint_is_one_line_and_the_earlier_ones_stay(tmp_path, straight_fake):
    features = synthetic_features(37)

    class FillsTheDisk(FakeQAModel):
        def save_pretrained(self, folder):
            if self.step == 6:   # checkpoint-6: the disk is full from here on
                self.filler = fill(Path(folder).parent)
            super().save_pretrained(folder)

    with small_filesystem(tmp_path / "disk", 4 << 20) as disk:
        args = args_for(disk / "out")
        model = FillsTheDisk(7)
        with pytest.raises(TrainingError) as e:
            Trainer(model, args, features).train()
        assert str(e.value) == (f"cannot write {disk / 'out' / 'checkpoint-6'} (the earlier checkpoints are "
                                f"intact): No space left on device")
        out = disk / "out"
        assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]  # no temporaries
        assert checkpoint_problems(out / "checkpoint-3") == []
        model.filler.unlink()
        resumed = FakeQAModel(7)
        Trainer(resumed, args, features).train(resume_from_checkpoint="latest")
        assert np.array_equal(resumed.w, straight_fake.w)


# ---- end to end: bertqa finetune, bertqa train -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(shared_data_dir, tmp_path_factory):
    """A tiny random BERT, 24 training questions, and a straight 6-step `bertqa finetune` (checkpoints 2, 4, 6)."""
    root = tmp_path_factory.mktemp("tiny_run")
    model = make_tiny_model(root / "model", shared_data_dir / "vocab" / "bert-base-uncased-vocab.txt")
    train = write_squad_subset(shared_data_dir / "squad" / "train.json", root / "train.json", 24)
    straight = root / "straight"
    proc = subprocess.run(finetune_cmd(model, train, straight), env=cli_env(root), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, train, straight


def cli_env(root: Path) -> dict:
    return dict(os.environ, BERTQA_CACHE_DIR=str(root / "cache"), OMP_NUM_THREADS="2")


def finetune_cmd(model, train, out, *extra, max_seq_length="96"):
    return [sys.executable, "-m", "bertqa", "finetune", "--model_name_or_path", str(model), "--train_file",
            str(train), "--output_dir", str(out), "--max_seq_length", max_seq_length, "--doc_stride", "24",
            "--max_query_length", "32", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1", "--seed", "3", "--disable_tqdm",
            *extra]


def losses_of(log: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_log(log) if "loss" in r]


@needs_engine
def test_finetune_resume_with_a_damaged_newest_checkpoint_completes_from_the_previous_one(tiny_run, tmp_path):
    """A run whose newest checkpoint lost the end of its optimizer state (a copy cut off): `--resume` warns,
    naming the file, continues from checkpoint-4 and ends bit for bit as the uninterrupted run."""
    model, train, straight = tiny_run
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    truncate(run / "checkpoint-6" / TRAINING_STATE_NAME)
    (run / "model.safetensors").unlink()   # the final model must be written again
    proc = subprocess.run(finetune_cmd(model, train, run, "--resume"), env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    damaged = [line for line in proc.stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and f"checkpoint-6 is damaged ({TRAINING_STATE_NAME} has" in damaged[0], proc.stderr
    assert "resuming from checkpoint-4" in damaged[0]
    assert f"resuming from {run / 'checkpoint-4'} at step 4" in proc.stderr
    assert losses_of(run / LOG_NAME) == losses_of(straight / LOG_NAME)
    for name in ("model.safetensors", "checkpoint-6/model.safetensors", f"checkpoint-6/{TRAINING_STATE_NAME}"):
        assert (run / name).read_bytes() == (straight / name).read_bytes(), name


@needs_engine
def test_finetune_resume_with_no_intact_checkpoint_is_one_error_line(tiny_run, tmp_path):
    model, train, straight = tiny_run
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for step in (2, 4, 6):
        truncate(run / f"checkpoint-{step}" / "model.safetensors")
    proc = subprocess.run(finetune_cmd(model, train, run, "--resume"), env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("bertqa finetune: error: --resume: no intact checkpoint in ")
    assert all(f"checkpoint-{s}: model.safetensors has" in line for s in (2, 4, 6)), line


@needs_engine
def test_finetune_resume_names_a_different_max_seq_length(tiny_run, tmp_path):
    model, train, straight = tiny_run
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    proc = subprocess.run(finetune_cmd(model, train, run, "--resume", max_seq_length="128"), env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"bertqa finetune: error: cannot resume from {run / 'checkpoint-6'}: ")
    assert "--max_seq_length 96 (now 128)" in line


@needs_engine
def test_finetune_on_a_full_disk_is_one_error_line_naming_the_checkpoint(tiny_run, tmp_path):
    """The output folder is a small file system: checkpoint-2 fits, checkpoint-4 does not."""
    model, train, straight = tiny_run
    checkpoint = sum(p.stat().st_size for p in (straight / "checkpoint-2").iterdir())
    with small_filesystem(tmp_path / "disk", int(1.5 * checkpoint)) as disk:
        out = disk / "out"
        proc = subprocess.run(finetune_cmd(model, train, out), env=cli_env(tmp_path), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            f"bertqa finetune: error: cannot write {out / 'checkpoint-4'} (the earlier checkpoints are intact): "
            f"No space left on device")
        assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
        assert checkpoint_problems(out / "checkpoint-2") == []


# ---- the training job ---------------------------------------------------------------------------------------


def job_paths(base: Path) -> tj.JobPaths:
    return tj.JobPaths.from_env(str(base))


def published_model(base: Path, source: Path) -> list[Path]:
    """checkpoints/ holding the final model files of `source`, as the trainer leaves them for _publish."""
    ckpt = base / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        shutil.copyfile(f, ckpt / f.name)
    (ckpt / "eval_results.json").write_text('{"exact_match": 1.0, "f1": 2.0}\n')
    return sorted(p.name for p in source.iterdir())


def tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def two_models(tmp_path: Path, vocab_file: Path) -> tuple[Path, Path]:
    """An earlier attempt's model and a new one, differing in config and weights."""
    old = make_tiny_model(tmp_path / "old", vocab_file, seed=1)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.2}, indent=2))
    return old, make_tiny_model(tmp_path / "new", vocab_file, seed=0)


def test_publish_writes_model_dir_whole_or_not_at_all(tmp_path, vocab_file):
    """A full disk while model/ is written: model/ keeps the earlier attempt's model, whole; no temporaries."""
    old, new = two_models(tmp_path, vocab_file)
    size = sum(p.stat().st_size for p in new.iterdir())
    with small_filesystem(tmp_path / "opt_ml", 2 * size + (1 << 20)) as base:   # less free than the weights
        shutil.copytree(old, base / "model")
        before = tree(base / "model")
        published_model(base, new)
        with pytest.raises(tj.JobError) as e:
            tj.Job(job_paths(base))._publish()
        assert str(e.value) == (f"cannot write the model into {base / 'model'} (No space left on device); "
                                f"{base / 'model'} is left as it was")
        assert tree(base / "model") == before
        assert sorted(p.name for p in base.iterdir()) == ["checkpoints", "model"]


def test_publish_into_a_mounted_model_dir(tmp_path, vocab_file):
    """SageMaker local mode bind-mounts /opt/ml/model: it cannot be renamed, so the copies are written aside
    inside it and renamed into place; a full one is left as it was."""
    old, new = two_models(tmp_path, vocab_file)
    base = tmp_path / "opt_ml"
    names = published_model(base, new)
    with small_filesystem(base / "model", 1 << 20):   # smaller than the weights
        (base / "model" / "config.json").write_bytes((old / "config.json").read_bytes())
        (base / "model" / "stale.txt").write_text("from an earlier attempt")
        before = tree(base / "model")
        with pytest.raises(tj.JobError, match=r"cannot write the model into \S+ \(No space left on device\)"):
            tj.Job(job_paths(base))._publish()
        assert tree(base / "model") == before
    with small_filesystem(base / "model", 64 << 20):
        (base / "model" / "stale.txt").write_text("from an earlier attempt")
        tj.Job(job_paths(base))._publish()
        assert tree(base / "model") == tree(new)   # exactly the model: the stale file and the temporary are gone
        assert sorted(p.name for p in (base / "model").iterdir()) == names


def test_publish_results_on_a_full_disk_is_one_line_naming_the_file(tmp_path, vocab_file):
    _, new = two_models(tmp_path, vocab_file)
    base = tmp_path / "opt_ml"
    published_model(base, new)
    (base / "checkpoints" / "predictions.json").write_text(json.dumps({f"q{i}": "x" * 40 for i in range(4000)}))
    with small_filesystem(base / "output" / "data", 64 << 10):
        with pytest.raises(tj.JobError) as e:
            tj.Job(job_paths(base))._publish()
        assert str(e.value) == f"cannot write {base / 'output' / 'data' / 'predictions.json'} (No space left on device)"
        assert sorted(p.name for p in (base / "output" / "data").iterdir()) == ["eval_results.json"]


@pytest.fixture(scope="module")
def job_inputs(shared_data_dir, tmp_path_factory):
    from qa_helpers import tiny_job_inputs

    return tiny_job_inputs(shared_data_dir, tmp_path_factory.mktemp("job_inputs"), 24, 12)


def run_train(tmp_path: Path, base: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SAGEMAKER_BASE_DIR=str(base), BERTQA_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "bertqa", "train"], env=env, capture_output=True, text=True,
                          timeout=300)


@needs_engine
def test_restarted_job_with_a_damaged_newest_checkpoint_completes_from_the_previous_one(job_inputs, tmp_path):
    """A spot job restarted after its checkpoint sync was cut off: checkpoints/ holds checkpoint-12 with a
    truncated optimizer state. The job names it in a warning, resumes from checkpoint-8 and ends with the model
    of the uninterrupted job; with no intact checkpoint it fails in one line naming the files."""
    from test_training_job import TINY_HYPERPARAMETERS, make_job

    model, train, valid = job_inputs
    hp = {**TINY_HYPERPARAMETERS, "model_name_or_path": str(model), "eval_steps": "0"}
    straight = make_job(tmp_path / "straight", hp, train, valid)
    proc = run_train(tmp_path, straight)
    assert proc.returncode == 0, proc.stderr[-3000:]

    restarted = make_job(tmp_path / "restarted", hp, train, valid)
    shutil.copytree(straight / "checkpoints", restarted / "checkpoints")   # what SageMaker restores
    truncate(restarted / "checkpoints" / "checkpoint-12" / TRAINING_STATE_NAME)
    proc = run_train(tmp_path, restarted)
    assert proc.returncode == 0, proc.stderr[-3000:]
    damaged = [line for line in proc.stderr.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and f"checkpoint-12 is damaged ({TRAINING_STATE_NAME} has" in damaged[0], proc.stderr
    assert f"job: resuming from {restarted / 'checkpoints' / 'checkpoint-8'}" in proc.stderr
    assert losses_of(restarted / "output" / "data" / LOG_NAME) == losses_of(straight / "output" / "data" / LOG_NAME)
    assert tree(restarted / "model") == tree(straight / "model")

    hopeless = make_job(tmp_path / "hopeless", hp, train, valid)
    shutil.copytree(straight / "checkpoints", hopeless / "checkpoints")
    for folder in list_checkpoints(hopeless / "checkpoints"):
        (folder / "config.json").write_bytes(b"")
    proc = run_train(tmp_path, hopeless)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    failure = (hopeless / "output" / "failure").read_text()
    assert failure.count("\n") == 1 and "no intact checkpoint" in failure
    assert all(f"checkpoint-{s}: config.json has 0 of its" in failure for s in (4, 8, 12)), failure
