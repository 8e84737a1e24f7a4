"""Low precision on the CPU from Python (issue 23): BertQA(precision=...), the training guard for int8, the
parameters written from Python reaching a bf16 engine's packed weights, resume in the precision a run began in,
the --bf16 / --precision flags and $BERTQA_PRECISION, the server's and the training job's settings.

The kernels' accuracy is tests/test_lowp.py's; here tiny models check the Python side. Tests that run bf16 or
int8 skip, naming the missing instructions, on a CPU without AVX-512 BF16 / VNNI (runtime_info()["precisions"]).
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bertqa import training_job as tj
from bertqa.cli import build_parser, main, training_args
from bertqa.config import BertConfig
from bertqa.model import BertQA, check_precision
from bertqa.serve import ServeConfig, create_app
from bertqa.train import (TRAINER_STATE_NAME, Trainer, TrainingArguments, TrainingError, list_checkpoints,
                          write_manifest)
from qa_helpers import make_tiny_model, synthetic_features, write_squad_subset

from bertqa._core import _C

PRECISIONS_HERE = _C.runtime_info()["precisions"]   # {"fp32": None, "bf16": None or "needs ...", "int8": ...}
needs_bf16 = pytest.mark.skipif(PRECISIONS_HERE["bf16"] is not None,
                                reason=f"bf16 does not run here: it {PRECISIONS_HERE['bf16']}")
needs_int8 = pytest.mark.skipif(PRECISIONS_HERE["int8"] is not None,
                                reason=f"int8 does not run here: it {PRECISIONS_HERE['int8']}")
LOW_PRECISIONS = [pytest.param("bf16", marks=needs_bf16), pytest.param("int8", marks=needs_int8)]

ENCODER_WEIGHTS = ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.output.dense.weight")


def tiny_config(vocab_size: int = 100) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)


def random_tensors(config: BertConfig, seed: int = 0, scale: float = 0.3) -> dict[str, np.ndarray]:
    """Weights large enough that a change in one linear layer shows in the logits."""
    rng = np.random.default_rng(seed)
    model = BertQA(config, seed=seed)
    out = {}
    for name, t in model.state_dict().items():
        out[name] = np.ones_like(t) if "LayerNorm.weight" in name else \
            (scale * rng.standard_normal(t.shape)).astype(np.float32)
    return out


def inputs(B: int = 3, T: int = 17, vocab: int = 100, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, 11:] = 0
    types = np.zeros((B, T), np.int32)
    types[:, 6:] = 1
    return ids, mask, types


def batch(B: int = 4, T: int = 17):
    ids, mask, types = inputs(B, T)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                start_positions=np.array([3, 7, 2, 9][:B], np.int32),
                end_positions=np.array([5, 8, 4, 12][:B], np.int32))


def rel_l2(a, b) -> float:
    real = np.isfinite(b)
    return float(np.linalg.norm(a[real] - b[real]) / np.linalg.norm(b[real]))


# ---- the API: names, availability, training ------------------------------------------------------------------


def test_cpu_precisions_by_name():
    config = tiny_config()
    assert BertQA(config).precision == "fp32" and BertQA(config, precision="fp32").precision == "fp32"
    assert "precision='fp32'" in repr(BertQA(config))
    for bad in ("fp16", "FP32", "bfloat16", ""):
        with pytest.raises(ValueError, match=f"precision must be 'fp32', 'bf16' or 'int8', got {bad!r}"):
            BertQA(config, precision=bad)
    with pytest.raises(ValueError, match="precision must be"):
        BertQA.from_pretrained("/nonexistent/model", precision="fp16")   # refused before the files are read
    assert check_precision("cpu", None) == "fp32"


def test_int8_on_cuda_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="'int8' runs on the CPU engine only"):
        check_precision("cuda", "int8")
    assert check_precision("cuda", None) == "bf16"   # the GPU engine's default is unchanged
    with pytest.raises(ValueError, match="'fp32' or 'bf16' on cuda"):
        check_precision("cuda", "fp16")


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_precision_this_cpu_lacks_names_the_instructions(precision):
    """In-process: where runtime_info says a precision needs something, BertQA says the same."""
    why = PRECISIONS_HERE[precision]
    if why is None:
        assert BertQA(tiny_config(), precision=precision).precision == precision
        return
    with pytest.raises(RuntimeError, match="AVX-512") as e:
        BertQA(tiny_config(), precision=precision)
    assert why in str(e.value) and "fp32 (the default) runs on any CPU" in str(e.value)


def test_avx2_only_process_refuses_bf16_and_int8_naming_avx512():
    """BERTQA_CPU=avx2 switches the AVX-512 kernels off: bf16 and int8 fail with a RuntimeError naming AVX-512
    (no silent fallback to fp32); fp32 runs."""
    code = textwrap.dedent("""
        import json
        from bertqa.config import BertConfig
        from bertqa.model import BertQA
        from bertqa._core import _C
        c = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=32)
        out = {"info": _C.runtime_info()["precisions"], "fp32": BertQA(c).precision}
        for p in ("bf16", "int8"):
            try:
                BertQA(c, precision=p)
                out[p] = "accepted"
            except RuntimeError as e:
                out[p] = str(e)
        print(json.dumps(out))
    """)
    env = dict(os.environ, BERTQA_CPU="avx2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["fp32"] == "fp32"
    for p in ("bf16", "int8"):
        assert out["info"][p] is not None and "AVX-512" in out["info"][p]
        assert out[p].startswith(f"precision '{p}' on the CPU needs ") and "AVX-512" in out[p], out[p]
        assert out[p].endswith("fp32 (the default) runs on any CPU")


@needs_int8
def test_int8_is_for_inference_only():
    model = BertQA(tiny_config(), precision="int8")
    start, end = model.forward(*inputs())
    assert start.shape == (3, 17) and np.isfinite(start[0]).all()
    for attempt in (lambda: model.train_step(batch(), lr=1e-3), lambda: model.forward_backward(batch()),
                    model.zero_grad, lambda: model.optimizer_step(1e-3),
                    lambda: model.save_training_state("/nonexistent/x.bin")):
        with pytest.raises(ValueError, match="'int8' is for inference only: fine-tune in precision 'bf16' or 'fp32'"
                                             ".*load it with precision='int8'"):
            attempt()
    assert model.grads is None


@needs_int8
def test_int8_activations_from_the_environment(monkeypatch):
    config = tiny_config()
    assert BertQA(config, precision="int8").int8_activations == "token"
    assert BertQA(config).int8_activations is None
    monkeypatch.setenv("BERTQA_INT8_ACTIVATIONS", "tensor")
    assert BertQA(config, precision="int8").int8_activations == "tensor"
    assert BertQA(config, precision="fp32").precision == "fp32"   # read only where int8 uses it
    monkeypatch.setenv("BERTQA_INT8_ACTIVATIONS", "channel")
    with pytest.raises(ValueError, match="BERTQA_INT8_ACTIVATIONS='channel': must be 'token'"):
        BertQA(config, precision="int8")


@pytest.mark.parametrize("precision", LOW_PRECISIONS)
def test_low_precision_logits_follow_fp32(precision):
    config = tiny_config()
    tensors = random_tensors(config, scale=0.1)
    ref = BertQA(config, tensors).forward(*inputs())
    got = BertQA(config, tensors, precision=precision).forward(*inputs())
    for g, r in zip(got, ref):
        assert np.array_equal(np.isfinite(g), np.isfinite(r))
        assert rel_l2(g, r) < 0.05, rel_l2(g, r)


@needs_bf16
def test_bf16_training_step_changes_the_parameters():
    config = tiny_config()
    tensors = random_tensors(config, scale=0.1)
    model = BertQA(config, tensors, precision="bf16")
    fp32 = BertQA(config, tensors)
    before = model.params.copy()
    loss = model.train_step(batch(), lr=1e-2)
    loss32 = fp32.train_step(batch(), lr=1e-2)
    assert np.isfinite(loss) and abs(loss - loss32) < 0.02 * abs(loss32)
    assert model.step == 1 and not np.array_equal(model.params, before)
    assert rel_l2(model.params - before, fp32.params - before) < 0.1
    # the step's new weights are what the next forward uses (AdamW marks the packed copies stale itself)
    again = BertQA(config, model.state_dict(), precision="bf16")
    for a, b in zip(model.forward(*inputs()), again.forward(*inputs())):
        np.testing.assert_array_equal(a, b)


# ---- parameters written from Python reach the packed weights -------------------------------------------------


@pytest.mark.parametrize("precision", LOW_PRECISIONS)
def test_weights_written_through_tensor_views_reach_the_engine(precision):
    config = tiny_config()
    tensors = random_tensors(config)
    model = BertQA(config, tensors, precision=precision)
    before = model.forward(*inputs())   # the engine has packed its low-precision weights
    rng = np.random.default_rng(5)
    for name in ENCODER_WEIGHTS:
        model.tensor(name)[...] = 0.3 * rng.standard_normal(model.tensor(name).shape)
    after = model.forward(*inputs())
    fresh = BertQA(config, model.state_dict(), precision=precision).forward(*inputs())
    for a, f, b in zip(after, fresh, before):
        np.testing.assert_array_equal(a, f)
        assert rel_l2(a, b) > 0.01   # the write changed the logits (the comparison above is not vacuous)


@needs_bf16
def test_load_training_state_reaches_a_bf16_engine(tmp_path):
    config = tiny_config()
    trained = BertQA(config, random_tensors(config, scale=0.1), precision="bf16")
    for _ in range(2):
        trained.train_step(batch(), lr=1e-2)
    trained.save_training_state(tmp_path / "state.bin")
    with np.load(tmp_path / "state.bin") as z:
        assert json.loads(str(z["meta"]))["precision"] == "bf16"
    other = BertQA(config, random_tensors(config, seed=9, scale=0.1), precision="bf16")
    other.train_step(batch(), lr=1e-2)
    other.forward(*inputs())   # a training engine whose packed weights are its own and fresh
    other.load_training_state(tmp_path / "state.bin")
    for a, b in zip(other.forward(*inputs()), trained.forward(*inputs())):
        np.testing.assert_array_equal(a, b)


# ---- the trainer: a run resumes in its precision ---------------------------------------------------------------


def trainer_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=4,
                save_steps=2, logging_steps=1, seed=7, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base).validate()


def losses(trainer) -> list[float]:
    return [r["loss"] for r in trainer.history if "loss" in r]


@needs_bf16
def test_resume_in_another_precision_is_refused_and_bf16_resumes_as_bf16(tmp_path):
    config = tiny_config(vocab_size=30522)   # synthetic_features' token ids
    tensors = random_tensors(config, scale=0.05)
    features = synthetic_features(n=24, width=32)
    straight = Trainer(BertQA(config, tensors, precision="bf16"), trainer_args(tmp_path / "a", bf16=True), features)
    straight.train()

    first = Trainer(BertQA(config, tensors, precision="bf16"), trainer_args(tmp_path / "b", max_steps=2, bf16=True),
                    features)
    first.train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    assert json.loads((checkpoint / TRAINER_STATE_NAME).read_text())["precision"] == "bf16"

    fp32 = Trainer(BertQA(config, tensors), trainer_args(tmp_path / "b", resume_from_checkpoint="latest"), features)
    with pytest.raises(TrainingError, match=r"trained with precision bf16 \(now fp32\)"):
        fp32.train()

    resumed = Trainer(BertQA(config, tensors, precision="bf16"),
                      trainer_args(tmp_path / "b", resume_from_checkpoint="latest", bf16=True), features)
    resumed.train()
    assert resumed.model.precision == "bf16" and resumed.state.precision == "bf16"
    # bit for bit: the resumed engine computes with the loaded parameters, not the ones it was made with
    assert losses(first) + losses(resumed) == losses(straight)
    assert json.loads((tmp_path / "b" / "out" / "checkpoint-4" / TRAINER_STATE_NAME).read_text())["precision"] == "bf16"


@needs_bf16
def test_resume_of_an_fp32_run_in_bf16_is_refused(tmp_path):
    """The other way round; and a checkpoint from before precisions were recorded resumes in either."""
    config = tiny_config(vocab_size=30522)
    features = synthetic_features(n=16, width=24)
    Trainer(BertQA(config, seed=1), trainer_args(tmp_path, max_steps=2), features).train()
    folder = tmp_path / "out" / "checkpoint-2"
    state = json.loads((folder / TRAINER_STATE_NAME).read_text())
    assert state["precision"] == "fp32"
    with pytest.raises(TrainingError, match=r"trained with precision fp32 \(now bf16\)"):
        Trainer(BertQA(config, seed=1, precision="bf16"),
                trainer_args(tmp_path, resume_from_checkpoint="latest", bf16=True), features).train()

    del state["precision"]   # as an older bertqa wrote it
    (folder / TRAINER_STATE_NAME).write_text(json.dumps(state))
    write_manifest(folder)
    trainer = Trainer(BertQA(config, seed=1, precision="bf16"),
                      trainer_args(tmp_path, resume_from_checkpoint="latest", bf16=True), features)
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.state.precision == "bf16"


# ---- the command line ------------------------------------------------------------------------------------------


def parse(*argv):
    return build_parser().parse_args([str(a) for a in argv])


FINETUNE = ("finetune", "--model_name_or_path", "m", "--train_file", "t", "--output_dir", "o")
EVALUATE = ("evaluate", "--model_name_or_path", "m", "--validation_file", "v", "--output_dir", "o")
PREDICT = ("predict", "--model_name_or_path", "m", "--question", "q", "--context", "c")


def test_cli_flags_and_the_environment(monkeypatch):
    monkeypatch.delenv("BERTQA_PRECISION", raising=False)
    ns = parse(*FINETUNE, "--bf16")
    assert ns.bf16 is True and training_args(ns, "finetune").resolved_precision("finetune") == "bf16"
    assert training_args(parse(*FINETUNE), "finetune").resolved_precision("finetune") is None   # fp32 on the CPU
    assert training_args(parse(*FINETUNE, "--precision", "bf16"), "finetune").resolved_precision() == "bf16"
    for argv, command in ((EVALUATE, "evaluate"), (PREDICT, "predict")):
        assert not hasattr(parse(*argv), "bf16")   # --bf16 is finetune's
        assert training_args(parse(*argv), command).resolved_precision(command) is None
        for p in ("fp32", "bf16", "int8"):
            assert training_args(parse(*argv, "--precision", p), command).resolved_precision(command) == p
        monkeypatch.setenv("BERTQA_PRECISION", "int8")
        assert training_args(parse(*argv), command).resolved_precision(command) == "int8"
        assert training_args(parse(*argv, "--precision", "bf16"), command).resolved_precision(command) == "bf16"
        monkeypatch.delenv("BERTQA_PRECISION")
    # finetune does not read $BERTQA_PRECISION (a serving setting must not change how a model is trained)
    monkeypatch.setenv("BERTQA_PRECISION", "int8")
    assert training_args(parse(*FINETUNE), "finetune").resolved_precision("finetune") is None


def one_line_error(capsys, argv, command, *needles):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bertqa {command}: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_bad_precisions_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BERTQA_PRECISION", raising=False)
    one_line_error(capsys, [*EVALUATE, "--precision", "fp16"], "evaluate", "--precision", "invalid choice: 'fp16'")
    one_line_error(capsys, [*FINETUNE, "--precision", "int8"], "finetune", "int8 is for inference",
                   "fine-tune in bf16 or fp32")
    one_line_error(capsys, [*FINETUNE, "--bf16", "--precision", "fp32"], "finetune", "--bf16 and --precision fp32")
    monkeypatch.setenv("BERTQA_PRECISION", "fp16")
    for argv, command in ((EVALUATE, "evaluate"), (PREDICT, "predict")):
        one_line_error(capsys, argv, command, "BERTQA_PRECISION='fp16'", "must be fp32, bf16 or int8")


def test_cli_on_a_cpu_without_the_instructions(tmp_path):
    """finetune --bf16 and evaluate --precision int8 under BERTQA_CPU=avx2: one line naming AVX-512, exit 2,
    before any data file is read (the files named do not exist)."""
    env = dict(os.environ, BERTQA_CPU="avx2")
    env.pop("BERTQA_PRECISION", None)
    cases = [(["finetune", "--model_name_or_path", "m", "--train_file", tmp_path / "none.json", "--output_dir",
               tmp_path / "o", "--bf16"], "bertqa finetune: error: --bf16: precision 'bf16' on the CPU needs "),
             (["evaluate", "--model_name_or_path", "m", "--validation_file", tmp_path / "none.json", "--output_dir",
               tmp_path / "e", "--precision", "int8"],
              "bertqa evaluate: error: --precision int8: precision 'int8' on the CPU needs "),
             (["serve", "--model-dir", tmp_path / "none", "--precision", "bf16"], "bertqa serve: error: ")]
    for argv, start in cases:
        proc = subprocess.run([sys.executable, "-m", "bertqa", *map(str, argv)], env=env, capture_output=True,
                              text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith(start) and "AVX-512" in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_files(shared_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model", shared_data_dir / "vocab" / "bert-base-uncased-vocab.txt")
    train = write_squad_subset(shared_data_dir / "squad" / "train.json", root / "train.json", 16)
    valid = write_squad_subset(shared_data_dir / "squad" / "valid.json", root / "valid.json", 8)
    return model, train, valid


@needs_bf16
@needs_int8
def test_cli_finetune_bf16_resume_and_int8_evaluation(tiny_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BERTQA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BERTQA_PRECISION", raising=False)
    model, train, valid = tiny_files
    out = tmp_path / "out"
    common = ["--model_name_or_path", model, "--train_file", train, "--validation_file", valid, "--output_dir", out,
              "--max_seq_length", "96", "--doc_stride", "24", "--max_query_length", "32",
              "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--save_steps", "2", "--disable_tqdm"]
    assert main(["finetune", *map(str, common), "--max_steps", "2", "--bf16"]) == 0, capsys.readouterr().err
    assert json.loads((out / "training_args.json").read_text())["bf16"] is True
    assert json.loads((out / "checkpoint-2" / TRAINER_STATE_NAME).read_text())["precision"] == "bf16"
    capsys.readouterr()

    one_line_error(capsys, ["finetune", *common, "--max_steps", "4", "--resume"], "finetune",
                   "checkpoint-2", "precision bf16 (now fp32)", "--overwrite_output_dir")
    assert main(["finetune", *map(str, common), "--max_steps", "4", "--resume", "--bf16"]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((out / "checkpoint-4" / TRAINER_STATE_NAME).read_text())["precision"] == "bf16"
    capsys.readouterr()

    code = main(["evaluate", "--model_name_or_path", str(out), "--validation_file", str(valid), "--output_dir",
                 str(tmp_path / "eval"), "--max_seq_length", "96", "--doc_stride", "24", "--max_query_length", "32",
                 "--precision", "int8", "--disable_tqdm"])
    assert code == 0, capsys.readouterr().err
    assert "exact_match" in capsys.readouterr().out
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["eval_examples"] == 8 and 0 <= results["f1"] <= 100
    monkeypatch.setenv("BERTQA_PRECISION", "int8")
    context = "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889."
    code = main(["predict", "--model_name_or_path", str(out), "--question", "Where is the tower?", "--context",
                 context, "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert code == 0 and context[answer["start"]:answer["end"]] == answer["answer"]


# ---- serving and the training job --------------------------------------------------------------------------------


def test_serve_settings_and_flag():
    assert ServeConfig.from_env({}).precision is None
    assert ServeConfig.from_env({"BERTQA_PRECISION": "int8"}).precision == "int8"
    assert ServeConfig.from_env({"BERTQA_PRECISION": "int8"}, precision="bf16").precision == "bf16"   # flag wins
    with pytest.raises(ValueError, match=r"precision \(BERTQA_PRECISION\) must be fp32, bf16 or int8, got 'fp16'"):
        ServeConfig.from_env({"BERTQA_PRECISION": "fp16"})
    with pytest.raises(ValueError, match="int8 runs on the CPU engine only"):
        ServeConfig.from_env({"BERTQA_PRECISION": "int8", "BERTQA_DEVICE": "cuda"})
    config = ServeConfig.from_env({"BERTQA_PRECISION": "bf16"})
    assert ServeConfig.from_json(config.to_json()) == config   # worker processes get it too
    assert parse("serve", "--precision", "int8").precision == "int8"
    with pytest.raises(SystemExit):
        parse("serve", "--precision", "fp16")


@needs_bf16
def test_server_loads_the_model_in_its_precision_and_reports_it(tmp_path):
    folder = _tiny_model_folder(tmp_path / "model")
    config = ServeConfig(model_dir=str(folder), precision="bf16", max_batch_size=2, max_seq_length=32,
                         doc_stride=8, max_query_length=8)

    async def stats_after_load():
        app = create_app(config)
        service = app.state.service
        stats = next(r.endpoint for r in app.routes if getattr(r, "path", None) == "/stats")
        before = json.loads((await stats(None)).body)
        await service.startup()
        await service._load_task
        try:
            return before, json.loads((await stats(None)).body), service
        finally:
            await service.shutdown()

    before, after, service = asyncio.run(stats_after_load())
    assert service.load_error is None and service.pipeline.model.precision == "bf16"
    assert before["device"] == "cpu" and "precision" not in before
    assert after["precision"] == "bf16" and after["loaded"] is True


def _tiny_model_folder(folder: Path) -> Path:
    """A tiny BERT-for-QA folder with a small vocabulary of its own (no shared data needed)."""
    from bertqa.tokenization import BertQATokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "the", "is", "in", "?"]
    config = tiny_config(vocab_size=len(vocab))
    model = BertQA(config, random_tensors(config, scale=0.1))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    model.tokenizer = BertQATokenizer.from_vocab(folder / "vocab.txt", do_lower_case=True)
    model.save_pretrained(folder)
    return folder


def test_training_job_hyperparameters():
    settings = tj.parse_hyperparameters({"bf16": "true", "max_steps": "3"})
    args = tj.training_arguments(settings, Path("/opt/ml/checkpoints"), "cpu")
    assert args.bf16 is True and "--bf16" in tj.finetune_argv(args, "m", Path("/t.json"), None)
    settings = tj.parse_hyperparameters({"bf16": "False", "precision": "bf16"})
    argv = tj.finetune_argv(tj.training_arguments(settings, Path("/c"), "cpu"), "m", Path("/t.json"), None)
    assert "--bf16" not in argv and argv[argv.index("--precision") + 1] == "bf16"
    assert "--precision" not in tj.finetune_argv(tj.training_arguments(tj.parse_hyperparameters({}), Path("/c"),
                                                                        "cpu"), "m", Path("/t.json"), None)
    with pytest.raises(tj.JobError, match="bad hyperparameter bf16='yes': expected true or false"):
        tj.parse_hyperparameters({"bf16": "yes"})
    with pytest.raises(tj.JobError, match="bad hyperparameter: precision int8 is for inference"):
        tj.training_arguments(tj.parse_hyperparameters({"precision": "int8"}), Path("/c"), "cpu")
    with pytest.raises(tj.JobError, match="bad hyperparameter: precision must be fp32, bf16 or int8, got 'fp16'"):
        tj.training_arguments(tj.parse_hyperparameters({"precision": "fp16"}), Path("/c"), "cpu")
