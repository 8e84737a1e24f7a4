"""The command line: `bertqa serve [flags]` (a subcommand of bertqa.cli) and `python -m bertqa.serve [flags]`.

Flags override the environment (bertqa.serve.settings).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Optional, Sequence

from ..precision import PRECISIONS
from .runner import run_server
from .settings import ServeConfig

DESCRIPTION = "A SageMaker-compatible question-answering endpoint with dynamic batching (uvicorn + Starlette)."


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """`bertqa serve [--model-dir DIR] [...]`; the parser's func(args) returns an exit code."""
    p = subparsers.add_parser(
        "serve", help="serve a model behind the SageMaker inference contract (GET /ping, POST /invocations)",
        description="HTTP question-answering endpoint with dynamic batching. Flags override the environment "
                    "variables (SAGEMAKER_BIND_TO_PORT, SAGEMAKER_MODEL_SERVER_WORKERS, "
                    "SAGEMAKER_MODEL_SERVER_TIMEOUT, SAGEMAKER_MAX_PAYLOAD_IN_MB, BERTQA_*); see bertqa.serve.")
    add_serve_flags(p)
    p.set_defaults(func=serve_command)
    return p


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", "--model_dir", dest="model_dir", default=None,
                   help="model folder, model.tar.gz, or a packaged model name (default: $BERTQA_MODEL_DIR or "
                        "/opt/ml/model)")
    p.add_argument("--host", default=None, help="address to bind (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help="port (default $SAGEMAKER_BIND_TO_PORT or 8080)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default 1)")
    p.add_argument("--timeout", dest="timeout_s", type=float, default=None, help="seconds per request (60)")
    p.add_argument("--max-payload-mb", dest="max_payload_mb", type=float, default=None, help="body limit (6)")
    p.add_argument("--header-timeout", dest="header_timeout_s", type=float, default=None,
                   help="seconds from a request's first byte to the end of its headers (10)")
    p.add_argument("--body-timeout", dest="body_timeout_s", type=float, default=None,
                   help="seconds from the end of the headers to the end of the body (30)")
    p.add_argument("--keep-alive-timeout", dest="keep_alive_s", type=float, default=None,
                   help="seconds an idle connection stays open (75)")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=None,
                   help="windows per engine call (16)")
    p.add_argument("--max-wait-ms", dest="max_wait_ms", type=float, default=None,
                   help="how long a batch may wait for requests being received or tokenized (5)")
    p.add_argument("--no-batching", dest="batching", action="store_const", const=False, default=None,
                   help="one engine call per request")
    for flag, help_text in (("max_seq_length", "384"), ("doc_stride", "128"), ("max_query_length", "64"),
                            ("max_answer_length", "30"), ("n_best_size", "20"), ("max_questions", "1024"),
                            ("max_windows", "512"), ("max_queue", "2048"), ("num_threads", "cores / workers"),
                            ("max_connections", "from the open-files limit, at most 1024"),
                            ("backlog", "from the open-files limit, 16 to 2048")):
        p.add_argument(f"--{flag.replace('_', '-')}", f"--{flag}", dest=flag, type=int, default=None,
                       help=f"default {help_text}")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="engine device (cpu)")
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="the engine's matrix products: fp32, bf16 (the CPU needs AVX-512 BF16) or int8 (CPU only: "
                        "AVX-512 VNNI) (default $BERTQA_PRECISION, else fp32 on the CPU, bf16 on cuda)")
    p.add_argument("--no-access-log", dest="access_log", action="store_const", const=False, default=None)
    p.add_argument("--log-level", dest="log_level", default=None, choices=["debug", "info", "warning", "error"])


def serve_command(args: argparse.Namespace) -> int:
    from ..packaging import PackageError

    names = {f.name for f in fields(ServeConfig)}
    try:
        config = ServeConfig.from_env(**{k: v for k, v in vars(args).items() if k in names})
        check_serve_precision(config)
        return run_server(config)
    except (ValueError, FileNotFoundError, PackageError) as e:
        print(f"bertqa serve: error: {e}", file=sys.stderr)
        return 2


def check_serve_precision(config: ServeConfig) -> None:
    """ValueError, before the server starts, where this CPU cannot run the precision asked for (naming the
    instructions it lacks), so the server does not start only to fail /ping."""
    if config.device != "cpu" or config.precision in (None, "fp32"):
        return
    from ..model import check_precision

    try:
        check_precision(config.device, config.precision)
    except RuntimeError as e:
        raise ValueError(f"{config._name('precision')} {config.precision}: {e}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bertqa.serve", description=DESCRIPTION)
    add_serve_flags(parser)
    return serve_command(parser.parse_args(argv))
