"""What `bertqa serve` can be told: ServeConfig, from defaults, then the environment, then command-line flags.

    SAGEMAKER_BIND_TO_PORT         port (8080)
    SAGEMAKER_MODEL_SERVER_WORKERS worker processes (1); each loads the model and gets cores/workers threads
    SAGEMAKER_MODEL_SERVER_TIMEOUT seconds one request may take, queueing included (60) -> 504 past it
    SAGEMAKER_MAX_PAYLOAD_IN_MB    largest request body (6) -> 413 past it
    BERTQA_MAX_BATCH_SIZE          windows per engine call (16); the engine is warmed up at this many windows of
                                   max_seq_length tokens before /ping answers 200, so its memory is allocated once
    BERTQA_MAX_WAIT_MS             how long a batch may wait for requests on their way (5); BERTQA_BATCHING=0 off
    BERTQA_MAX_QUESTIONS           questions per request (1024) -> 413 past it
    BERTQA_MAX_WINDOWS             windows per request (512) -> 413 past it (a 384-token window per ~1 KB of text)
    BERTQA_MAX_QUEUE               windows waiting in the queue, all requests (2048) -> 503 + Retry-After past it
    BERTQA_MAX_SEQ_LENGTH, BERTQA_DOC_STRIDE, BERTQA_MAX_QUERY_LENGTH, BERTQA_MAX_ANSWER_LENGTH,
    BERTQA_N_BEST_SIZE             windowing and decoding (384, 128, 64, 30, 20: the training defaults)
    BERTQA_HEADER_TIMEOUT          seconds from a request's first byte to the end of its headers (10) -> 408, closed
    BERTQA_BODY_TIMEOUT            seconds from the end of the headers to the end of the body (30) -> 408, closed
    BERTQA_KEEP_ALIVE_TIMEOUT      seconds an idle connection stays open, fresh or between requests (75)
    BERTQA_MAX_CONNECTIONS         open connections per worker (default from RLIMIT_NOFILE: the soft limit less a
                                   reserve, at most 1024); a new one past it closes the oldest idle connection, else
                                   the oldest still sending headers, else the oldest still sending a body
    BERTQA_BACKLOG                 listen queue, and connections accepted per pass of the event loop (default
                                   soft RLIMIT_NOFILE / 16, 16 to 2048); bertqa.serve.connections says why
    BERTQA_MODEL_DIR               model folder or archive when --model-dir is not given (/opt/ml/model)
    BERTQA_DEVICE                  cpu or cuda (cpu)
    BERTQA_PRECISION               fp32, bf16 or int8: the engine's matrix products (fp32 on the CPU, bf16 on cuda);
                                   bf16 needs AVX-512 BF16 on the CPU, int8 (CPU only) AVX-512 VNNI, else the server
                                   does not start and says which; BERTQA_INT8_ACTIVATIONS=tensor: one int8 scale per
                                   tensor instead of per token
    BERTQA_NUM_THREADS             engine threads per worker (cores / workers)

Worker processes get the whole config as JSON in $BERTQA_SERVE_CONFIG (CONFIG_ENV).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from ..precision import PRECISION_ENV, PRECISIONS

CONFIG_ENV = "BERTQA_SERVE_CONFIG"  # the whole ServeConfig as JSON, for worker processes


@dataclass
class ServeConfig:
    """Everything `bertqa serve` can be told; see the module docstring for the environment variables."""

    model_dir: str = "/opt/ml/model"
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    timeout_s: float = 60.0
    max_payload_mb: float = 6.0
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    batching: bool = True
    max_questions: int = 1024
    max_windows: int = 512
    max_queue: int = 2048
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    max_answer_length: int = 30
    n_best_size: int = 20
    device: str = "cpu"
    precision: Optional[str] = None  # fp32, bf16, int8 (None: the device's default, fp32 on the CPU, bf16 on cuda)
    num_threads: Optional[int] = None  # engine threads per worker (None: cores / workers)
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 75.0
    max_connections: Optional[int] = None  # None: from RLIMIT_NOFILE (bertqa.serve.connections.connection_limits)
    backlog: Optional[int] = None  # None: from RLIMIT_NOFILE
    access_log: bool = True
    log_level: str = "info"

    ENV = {  # field -> environment variable
        "port": "SAGEMAKER_BIND_TO_PORT", "workers": "SAGEMAKER_MODEL_SERVER_WORKERS",
        "timeout_s": "SAGEMAKER_MODEL_SERVER_TIMEOUT", "max_payload_mb": "SAGEMAKER_MAX_PAYLOAD_IN_MB",
        "model_dir": "BERTQA_MODEL_DIR", "max_batch_size": "BERTQA_MAX_BATCH_SIZE",
        "max_wait_ms": "BERTQA_MAX_WAIT_MS", "batching": "BERTQA_BATCHING", "max_questions": "BERTQA_MAX_QUESTIONS",
        "max_windows": "BERTQA_MAX_WINDOWS", "max_queue": "BERTQA_MAX_QUEUE",
        "max_seq_length": "BERTQA_MAX_SEQ_LENGTH", "doc_stride": "BERTQA_DOC_STRIDE",
        "max_query_length": "BERTQA_MAX_QUERY_LENGTH", "max_answer_length": "BERTQA_MAX_ANSWER_LENGTH",
        "n_best_size": "BERTQA_N_BEST_SIZE", "device": "BERTQA_DEVICE", "precision": PRECISION_ENV,
        "num_threads": "BERTQA_NUM_THREADS",
        "header_timeout_s": "BERTQA_HEADER_TIMEOUT", "body_timeout_s": "BERTQA_BODY_TIMEOUT",
        "keep_alive_s": "BERTQA_KEEP_ALIVE_TIMEOUT", "max_connections": "BERTQA_MAX_CONNECTIONS",
        "backlog": "BERTQA_BACKLOG",
    }

    @property
    def max_payload_bytes(self) -> int:
        return int(self.max_payload_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, environ: Optional[dict] = None, **overrides: Any) -> "ServeConfig":
        """Defaults, then the environment, then overrides whose value is not None; validated."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in cls.ENV.items():
            raw = environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            values[name] = _parse_value(raw.strip(), types[name], var)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()

    def validate(self) -> "ServeConfig":
        positive = ("workers", "timeout_s", "max_payload_mb", "max_batch_size", "max_questions", "max_windows",
                    "max_queue", "max_seq_length", "max_answer_length", "n_best_size", "header_timeout_s",
                    "body_timeout_s", "keep_alive_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{self._name(name)} must be positive, got {getattr(self, name)!r}")
        for name in ("max_wait_ms", "doc_stride", "max_query_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"{self._name(name)} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.port < 65536 and self.port != 0:
            raise ValueError(f"{self._name('port')} must be a TCP port number, got {self.port}")
        if self.max_queue < self.max_windows:  # else a request within the limits could never be queued
            raise ValueError(f"{self._name('max_queue')} ({self.max_queue}) must be at least "
                             f"{self._name('max_windows')} ({self.max_windows})")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"{self._name('precision')} must be fp32, bf16 or int8, got {self.precision!r}")
        if self.precision == "int8" and self.device != "cpu":
            raise ValueError(f"{self._name('precision')} int8 runs on the CPU engine only; on {self.device} use bf16 "
                             f"or fp32")
        for name in ("num_threads", "max_connections", "backlog"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{self._name(name)} must be positive, got {getattr(self, name)}")
        return self

    def _name(self, field_name: str) -> str:
        var = self.ENV.get(field_name)
        return f"{field_name} ({var})" if var else field_name

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ServeConfig":
        return cls(**json.loads(text)).validate()


def _parse_value(raw: str, kind: Any, var: str) -> Any:
    kind = str(kind)
    try:
        if "bool" in kind:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "int" in kind:
            return int(raw)
        if "float" in kind:
            return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {var}={raw!r}: expected {kind.replace('Optional[', '').rstrip(']')}"
                         ) from None
    return raw
