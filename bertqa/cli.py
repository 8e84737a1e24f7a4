"""Command line: `python -m bertqa <command>` (or the `bertqa` console script).

    finetune  --model_name_or_path M --train_file F [--validation_file F] --output_dir D [run_qa.py flags] [--bf16]
    evaluate  --model_name_or_path D --validation_file F --output_dir D2 [--precision {fp32,bf16,int8}]
    predict   --model_name_or_path D --question Q (--context C | --context_file F) [--json] [--precision ...]
    bench     ops [args]        runs bench/ops.py of a source checkout
    train     [--base-dir D]    a SageMaker training job in $SAGEMAKER_BASE_DIR (bertqa.training_job)
    export    onnx --model-dir D --output model.onnx   (bertqa.onnx; needs the extra bertqa[onnx])

Flags carry transformers' run_qa.py names; they are generated from bertqa.train.TrainingArguments, so the two
cannot drift apart. Precision: finetune --bf16 (or --precision bf16) trains and evaluates in bf16; evaluate,
predict and serve take --precision fp32, bf16 or int8, by default $BERTQA_PRECISION, else fp32 (bf16 on cuda).

A user error (a bad flag value, an unreadable or malformed data file, a model folder missing files, an output
folder that cannot be written, a precision this CPU cannot run) prints one line, `bertqa <command>: error: ...`,
and exits with status 2; a traceback means a bug.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import warnings
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

from .errors import EXIT_USER_ERROR, USER_ERRORS, user_message
from .precision import PRECISIONS
from .train import TrainingArguments, TrainingError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exits with status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag_type(kind: type, name: str):
    if kind is int:
        return int
    if kind is float:
        return float
    return str


def add_training_flags(parser: argparse.ArgumentParser, command: str, required: Sequence[str] = ()) -> None:
    """One --flag per TrainingArguments field that `command` takes, with the field's default and help."""
    hints = typing.get_type_hints(TrainingArguments)
    for f in dataclasses.fields(TrainingArguments):
        if command not in f.metadata["commands"]:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        help_text = f.metadata["help"]
        if f.name == "resume_from_checkpoint":
            parser.add_argument("--resume_from_checkpoint", nargs="?", const="latest", default=None,
                                metavar="CHECKPOINT", help=help_text + "; with no value: the newest")
            parser.add_argument("--resume", dest="resume_from_checkpoint", action="store_const", const="latest",
                                help="resume from the newest checkpoint in output_dir")
        elif kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", default=f.default, help=help_text)
        elif f.name == "precision":   # int8 is refused for finetune by TrainingArguments.validate, with the reason
            parser.add_argument("--precision", choices=PRECISIONS, default=None, help=help_text)
        else:
            shown = "" if f.default is None else f" (default: {f.default})"
            parser.add_argument(f"--{f.name}", type=_flag_type(kind, f.name), default=f.default,
                                required=f.name in required, metavar=f.name.split("_")[-1].upper(),
                                help=help_text + shown)


def training_args(ns: argparse.Namespace, command: str) -> TrainingArguments:
    """TrainingArguments from the parsed flags of `command` (fields it does not take keep their defaults)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainingArguments) if hasattr(ns, f.name)}
    return TrainingArguments(**values).validate(command)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bertqa", description="Fine-tune, evaluate and run BERT for extractive question "
                                                "answering (SQuAD) on bertqa's C/CUDA engine.")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"bertqa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("finetune", help="fine-tune on a SQuAD file, save the model, evaluate",
                       description="Fine-tune a BERT checkpoint for SQuAD; writes the model, checkpoints, "
                                   "train_log.jsonl, eval_results.json and predictions.json into --output_dir.")
    p.add_argument("--model_name_or_path", required=True, help="model folder or 'all-MiniLM-L6-v2'")
    p.add_argument("--train_file", required=True, help="SQuAD JSON to train on")
    p.add_argument("--validation_file", help="SQuAD JSON to evaluate on at the end (and every --eval_steps)")
    add_training_flags(p, "finetune", required=("output_dir",))
    p.set_defaults(func=_finetune)

    p = sub.add_parser("evaluate", help="EM/F1 of a model on a SQuAD file",
                       description="Evaluate a model; writes eval_results.json and predictions.json into "
                                   "--output_dir.")
    p.add_argument("--model_name_or_path", required=True, help="model folder or 'all-MiniLM-L6-v2'")
    p.add_argument("--validation_file", required=True, help="SQuAD JSON with reference answers")
    add_training_flags(p, "evaluate", required=("output_dir",))
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="answer one question about one context",
                       description="Print the answer to --question found in --context (or --context_file).")
    p.add_argument("--model_name_or_path", required=True, help="model folder or 'all-MiniLM-L6-v2'")
    p.add_argument("--question", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--context", help="the text to find the answer in")
    group.add_argument("--context_file", help="a UTF-8 text file holding the context")
    p.add_argument("--json", action="store_true",
                   help="print {answer, score, start, end, nbest} as JSON (context[start:end] == answer)")
    p.add_argument("--top_k", type=int, default=5, help="n-best answers listed with --json (default: 5)")
    add_training_flags(p, "predict")
    p.set_defaults(func=_predict)

    p = sub.add_parser("bench", help="run a benchmark of the source checkout's bench/ folder",
                       description="Run bench/<suite>.py (source checkouts only); remaining arguments go to it.")
    p.add_argument("suite", help="benchmark name, e.g. 'ops' for bench/ops.py")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=_bench)

    from .packaging import add_package_parser
    from .serve import add_serve_parser
    from .training_job import add_train_parser

    add_serve_parser(sub)  # bertqa serve [--model-dir DIR|model.tar.gz]: the SageMaker endpoint
    add_package_parser(sub)  # bertqa package --model-dir DIR --output model.tar.gz
    add_train_parser(sub)  # bertqa train [--base-dir /opt/ml]: the SageMaker training job
    from .onnx import add_export_parser

    add_export_parser(sub)  # bertqa export onnx --model-dir DIR --output model.onnx (needs bertqa[onnx])
    parser.commands = dict(sub.choices)  # name -> sub-parser, to report unknown flags as that command's
    return parser


# ---- commands --------------------------------------------------------------------------------------------


def _finetune(ns: argparse.Namespace) -> int:
    from .train import finetune

    from . import distributed

    args = training_args(ns, "finetune")
    results = finetune(ns.model_name_or_path, ns.train_file, ns.validation_file, args)
    if not distributed.current().is_main:   # a data-parallel job: rank 0 reports
        return 0
    out = Path(args.output_dir)
    if "f1" in results:
        print(f"exact_match {results['exact_match']:.2f}  f1 {results['f1']:.2f}  "
              f"({results['eval_examples']} questions)")
    print(f"trained {results['train_steps']} steps in {results['train_seconds']:.1f} s "
          f"({results['train_sequences_per_second']:.1f} sequences/s); model and results in {out}")
    return 0


def _evaluate(ns: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

    from . import distributed

    args = training_args(ns, "evaluate")
    results = evaluate_checkpoint(ns.model_name_or_path, ns.validation_file, args)
    if not distributed.current().is_main:
        return 0
    print(f"exact_match {results['exact_match']:.2f}  f1 {results['f1']:.2f}  ({results['eval_examples']} "
          f"questions, {results['eval_seconds']:.1f} s); results in {args.output_dir}")
    return 0


def _predict(ns: argparse.Namespace) -> int:
    from .inference import QAPipeline
    from .train import load_model

    args = training_args(ns, "predict")
    if ns.top_k < 1:
        raise TrainingError(f"--top_k must be a positive integer, got {ns.top_k}")
    context = ns.context if ns.context is not None else _read_text(ns.context_file)
    # Check the inputs before paying for the model.
    if not ns.question.strip():
        raise TrainingError("--question is empty")
    if not context.strip():
        raise TrainingError("the context is empty" if ns.context is None else "--context is empty")
    model = load_model(ns.model_name_or_path, args, command="predict")
    # The serving pipeline: the same windows as training, spans pooled over them, offsets into the context.
    try:
        pipeline = QAPipeline(model, max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
                              max_query_length=args.max_query_length, max_answer_length=args.max_answer_length,
                              n_best_size=args.n_best_size)
    except ValueError as e:  # the window arithmetic, once max_seq_length is capped at the model's positions
        raise TrainingError(str(e)) from None
    nbest = pipeline(ns.question.strip(), context, top_k=ns.top_k)
    if ns.json:
        print(json.dumps({**nbest[0], "nbest": nbest}, ensure_ascii=False))
    else:
        print(nbest[0]["answer"])
    return 0


def _read_text(path: str) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise TrainingError(f"--context_file {path}: cannot read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TrainingError(f"--context_file {path}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"
                            ) from None


def bench_script(suite: str) -> Path:
    """bench/<suite>.py of the source checkout this package runs from."""
    if not suite.replace("_", "").isalnum():
        raise TrainingError(f"bench: no benchmark named {suite!r}")
    path = Path(__file__).resolve().parents[1] / "bench" / f"{suite}.py"
    if not path.is_file():
        raise TrainingError(f"bench: {path} not found (benchmarks ship with the source checkout, not the wheel)")
    return path


def _bench(ns: argparse.Namespace) -> int:
    import runpy

    path = bench_script(ns.suite)
    namespace = runpy.run_path(str(path), run_name="bertqa_bench")
    if "main" not in namespace:
        raise TrainingError(f"bench: {path} has no main()")
    saved = sys.argv
    sys.argv = [str(path), *ns.bench_args]
    try:
        status = namespace["main"]()
    finally:
        sys.argv = saved
    return int(status or 0)


# ---- entry point -----------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        ns, unknown = parser.parse_known_args(argv)
        if unknown:
            parser.commands[ns.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # --help, --version, or a usage error already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    def show_warning(message, category, filename, lineno, file=None, line=None):
        # One plain line per warning (e.g. skipped training questions), like the errors, not Python's
        # "file:line: Category: ..." with a source line.
        print(f"bertqa {ns.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return ns.func(ns)
    except USER_ERRORS as e:
        print(f"bertqa {ns.command}: error: {_rank()}{user_message(e)}", file=sys.stderr)
        return _end_job(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        hint = " (checkpoints are kept: rerun with --resume to continue)" if ns.command == "finetune" else ""
        print(f"bertqa {ns.command}: {_rank()}interrupted{hint}", file=sys.stderr)
        return _end_job(130)


def _rank() -> str:
    """'rank R of N: ' in a data-parallel job (see bertqa.distributed), else ''."""
    from . import distributed

    dist = distributed.current()
    return f"rank {dist.rank} of {dist.world_size}: " if dist is not None and dist.enabled else ""


def _end_job(status: int) -> int:
    """In a data-parallel job a rank that fails ends every rank (MPI_Abort with the status), so none waits for
    it in a collective; alone, it returns the status."""
    from . import distributed

    dist = distributed.current()
    if dist is not None and dist.enabled:
        dist.abort(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
