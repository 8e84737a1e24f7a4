"""A SageMaker-compatible question-answering endpoint with dynamic batching (uvicorn + Starlette).

    bertqa serve --model-dir /opt/ml/model          # a model folder or a model.tar.gz; python -m bertqa.serve too
    curl -s localhost:8080/invocations -H 'Content-Type: application/json' \\
         -d '{"question": "Where is the tower?", "context": "The tower is in Paris."}'
    # {"answer": "Paris", "score": 0.97, "start": 16, "end": 21}       context[start:end] == answer

Routes (the SageMaker inference contract, plus a description and a page):
    GET  /ping                   200 with an empty body once the model is loaded; 503 (JSON) before (with
                                 several workers, a worker accepts connections only once its model is loaded)
    POST /invocations            answers; application/json or application/jsonlines (see below)
    GET  /execution-parameters   MaxConcurrentTransforms, BatchStrategy, MaxPayloadInMB for batch transform
    GET  /openapi.json           OpenAPI 3.1 description of these routes
    GET  /stats                  batching statistics (engine calls, windows, batch sizes)
    GET  /                       a small page to ask a question in a browser

/invocations bodies (application/json):
    {"question": Q, "context": C}                   -> {"answer", "score", "start", "end"}
    {"questions": [Q1, Q2, ...], "context": C}      -> [answer, answer, ...]   (the context is tokenized once)
    [record, record, ...] or {"instances": [...]}   -> [result, result, ...]
    optional per record: "top_k" (1..n_best_size: a list of the top_k answers instead of one answer) and
    "max_answer_length" (tokens, default 30); other keys are ignored (SQuAD-style records with "id" work).
application/jsonlines (also application/x-jsonlines, application/jsonl, application/x-ndjson): one record per
line, one result per line back; this is what SageMaker batch transform sends with SplitType=Line.
The response has the request's type unless Accept asks for the other one.

Contexts longer than one window are cut into the same doc-stride windows as training, and questions are cut to
max_query_length tokens as in training; the answer is the best span over all windows (bertqa.inference).
"score" is the answer's probability among the n-best spans.

Dynamic batching: every request's windows go through one queue; when the engine is free a batcher task takes
the oldest and gathers more, up to max_batch_size windows: those already queued, and, while other requests are
still being received or tokenized and the batch holds fewer than FILL_TOKENS real tokens (past which the
engine's rate per token no longer grows), those that arrive within max_wait_ms (counted from when the engine
became free for this batch, or from when the oldest was queued if that is later). A lone request never waits;
under load windows pile up while the engine works and the next batch takes them. It runs them in a single
engine thread (the engine releases the GIL; one call at a time because its OpenMP pool already uses every core).
The CPU engine computes no padding (it packs the rows), so a batch is one engine call whatever its windows'
lengths; for an engine that does compute padding (the GPU's), windows are sorted by length and cut into the
calls that cost least (a fixed cost per call plus rows x padded width; DynamicBatcher.group_rows). A window's
logits do not depend on what it was batched with (padding is masked out, and positions past its last token read
-inf). Tokenizing, span decoding and JSON run in a small thread pool, so the event loop never waits on them.

Configuration (command-line flags override the environment):
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
    BERTQA_MODEL_DIR               model folder or archive when --model-dir is not given (/opt/ml/model)
    BERTQA_DEVICE                  cpu or cuda (cpu)
    BERTQA_NUM_THREADS             engine threads per worker (cores / workers)

Errors are JSON, {"error": "<what is wrong>", "status": <code>}: 400 malformed JSON, bad UTF-8, a missing,
empty or wrongly typed field; 404/405 unknown route or method; 406 an Accept we cannot produce; 413 body,
questions or windows over the limits above; 415 another content type or a compressed body; 503 model not
loaded yet or queue full; 504 over the timeout. A client that disconnects has its queued windows dropped.
SIGTERM/SIGINT: the server stops accepting connections, finishes the requests in flight, then exits.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..inference import QAPipeline, TooMuchWork

log = logging.getLogger("bertqa.serve")

JSON_TYPES = ("application/json",)
JSONL_TYPES = ("application/jsonlines", "application/x-jsonlines", "application/jsonl", "application/x-ndjson",
               "application/ndjson")
CONFIG_ENV = "BERTQA_SERVE_CONFIG"  # the whole ServeConfig as JSON, for worker processes


# =============================================================================================================
# Configuration
# =============================================================================================================


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
    num_threads: Optional[int] = None  # engine threads per worker (None: cores / workers)
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
        "n_best_size": "BERTQA_N_BEST_SIZE", "device": "BERTQA_DEVICE", "num_threads": "BERTQA_NUM_THREADS",
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
                    "max_queue", "max_seq_length", "max_answer_length", "n_best_size")
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
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"{self._name('num_threads')} must be positive, got {self.num_threads}")
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


# =============================================================================================================
# Errors and request parsing (pure functions: no server needed to test them)
# =============================================================================================================


class RequestError(Exception):
    """A request the server refuses; becomes {"error": message, "status": status}."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def media_type(header: Optional[str]) -> tuple[str, dict[str, str]]:
    """'application/json; charset=utf-8' -> ('application/json', {'charset': 'utf-8'})."""
    if not header:
        return "", {}
    kind, *params = header.split(";")
    out = {}
    for p in params:
        if "=" in p:
            k, v = p.split("=", 1)
            out[k.strip().lower()] = v.strip().strip('"').lower()
    return kind.strip().lower(), out


def request_format(content_type: Optional[str]) -> str:
    """'json' or 'jsonl' for a Content-Type; RequestError 415 otherwise. No header means JSON."""
    kind, params = media_type(content_type)
    charset = params.get("charset")
    if charset is not None and charset.replace("-", "").replace("_", "") != "utf8":
        raise RequestError(415, f"unsupported charset {charset!r}: send UTF-8")
    if kind in ("",) + JSON_TYPES:
        return "json"
    if kind in JSONL_TYPES:
        return "jsonl"
    raise RequestError(415, f"unsupported Content-Type {content_type!r}: send application/json or "
                            f"application/jsonlines")


def response_format(accept: Optional[str], default: str) -> str:
    """'json' or 'jsonl' for an Accept header (default: the request's format); RequestError 406 otherwise."""
    if not accept:
        return default
    kinds = [media_type(part)[0] for part in accept.split(",")]
    for kind in kinds:
        if kind in ("*/*", "application/*"):
            return default
        if kind in JSON_TYPES:
            return "json"
        if kind in JSONL_TYPES:
            return "jsonl"
    raise RequestError(406, f"cannot answer with Accept {accept!r}: the server produces application/json or "
                            f"application/jsonlines")


def decode_utf8(body: bytes) -> str:
    """Strict UTF-8 (a BOM is allowed); RequestError 400 naming the first bad byte."""
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"request body is not UTF-8: byte 0x{body[e.start]:02x} at offset {e.start} "
                                f"({e.reason})") from None


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"{where}malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise RequestError(400, f"{where}JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal with more than sys.get_int_max_str_digits() digits
        raise RequestError(400, f"{where}malformed JSON: {e}") from None


@dataclass
class Record:
    """One record of a request: questions about one context, with its decoding options."""

    questions: list[str]
    context: str
    multi: bool  # given as "questions": the result is a list, one entry per question
    top_k: Optional[int] = None  # given: each answer is a list of up to top_k answers
    max_answer_length: Optional[int] = None


@dataclass
class ParsedRequest:
    records: list[Record]
    shape: str  # "single" (one object -> one result), "list" (array or instances -> array), "lines"

    @property
    def num_questions(self) -> int:
        return sum(len(r.questions) for r in self.records)


def _text_field(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise RequestError(400, f"{where}field {name!r} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise RequestError(400, f"{where}field {name!r} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(400, f"{where}field {name!r} holds a lone surrogate \\u{ord(value[e.start]):04x} at "
                                f"character {e.start} (not valid Unicode)") from None
    return value


def _int_field(record: dict, name: str, lo: int, hi: int, where: str) -> Optional[int]:
    if name not in record or record[name] is None:
        return None
    value = record[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{where}field {name!r} must be an integer, got {_json_type(value)}")
    if not lo <= value <= hi:
        raise RequestError(400, f"{where}field {name!r} must be between {lo} and {hi}, got {value}")
    return value


def parse_record(record: Any, where: str, limits: ServeConfig) -> Record:
    """Validate one record ({"question"|"questions", "context", "top_k"?, "max_answer_length"?})."""
    if not isinstance(record, dict):
        raise RequestError(400, f"{where}expected an object with 'question' and 'context', got {_json_type(record)}")
    if "context" not in record:
        raise RequestError(400, f"{where}missing field 'context'")
    context = _text_field(record["context"], "context", where)
    if "question" in record and "questions" in record:
        raise RequestError(400, f"{where}give either 'question' or 'questions', not both")
    if "questions" in record:
        questions = record["questions"]
        if not isinstance(questions, list):
            raise RequestError(400, f"{where}field 'questions' must be an array of strings, got "
                                    f"{_json_type(questions)}")
        if not questions:
            raise RequestError(400, f"{where}field 'questions' is empty")
        if len(questions) > limits.max_questions:
            raise RequestError(413, f"{where}{len(questions)} questions; the limit is {limits.max_questions} per "
                                    f"request (BERTQA_MAX_QUESTIONS)")
        questions = [_text_field(q, f"questions[{i}]", where).strip() for i, q in enumerate(questions)]
        multi = True
    elif "question" in record:
        questions = [_text_field(record["question"], "question", where).strip()]
        multi = False
    else:
        raise RequestError(400, f"{where}missing field 'question' (or 'questions': an array)")
    top_k = _int_field(record, "top_k", 1, limits.n_best_size, where)
    max_len = _int_field(record, "max_answer_length", 1, limits.max_seq_length, where)
    return Record(questions, context, multi, top_k, max_len)


def parse_request(body: bytes, fmt: str, limits: ServeConfig) -> ParsedRequest:
    """Body bytes -> validated records; RequestError (400/413) naming the problem and where it is."""
    text = decode_utf8(body)
    if fmt == "jsonl":
        records = []
        lines = text.split("\n")
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            raise RequestError(400, "empty request body: expected one JSON record per line")
        for n, line in enumerate(lines, 1):
            where = f"line {n}: "
            if not line.strip():
                raise RequestError(400, f"{where}empty line (application/jsonlines: one JSON record per line)")
            records.append(parse_record(_loads(line, where), where, limits))
            _check_count(records, limits)
        return ParsedRequest(records, "lines")
    if not text.strip():
        raise RequestError(400, "empty request body: expected a JSON object with 'question' and 'context'")
    data = _loads(text, "")
    shape = "list"
    if isinstance(data, dict) and "instances" in data:
        items, prefix = data["instances"], "instances"
        if not isinstance(items, list):
            raise RequestError(400, f"field 'instances' must be an array of records, got {_json_type(items)}")
    elif isinstance(data, list):
        items, prefix = data, ""
    elif isinstance(data, dict):
        items, prefix, shape = [data], None, "single"
    else:
        raise RequestError(400, f"expected a JSON object (or an array of them), got {_json_type(data)}")
    if not items:
        raise RequestError(400, f"{'field ' + repr(prefix) if prefix else 'the array'} is empty: nothing to answer")
    records = []
    for i, item in enumerate(items):
        where = "" if prefix is None else f"{prefix}[{i}]: "
        records.append(parse_record(item, where, limits))
        _check_count(records, limits)
    return ParsedRequest(records, shape)


def _check_count(records: list[Record], limits: ServeConfig) -> None:
    n = sum(len(r.questions) for r in records)
    if n > limits.max_questions:
        raise RequestError(413, f"more than {limits.max_questions} questions in one request (BERTQA_MAX_QUESTIONS); "
                                f"split it")


def render_results(parsed: ParsedRequest, answers: list[list[dict]], fmt: str) -> tuple[bytes, str]:
    """(body, content type); answers[q] is the list of answers of the q-th question, over all records."""
    results, q = [], 0
    for r in parsed.records:
        per_question = []
        for _ in r.questions:
            per_question.append(answers[q][:r.top_k] if r.top_k is not None else answers[q][0])
            q += 1
        results.append(per_question if r.multi else per_question[0])
    dump = lambda v: json.dumps(v, ensure_ascii=False, allow_nan=False)  # noqa: E731
    if fmt == "jsonl":
        return "".join(dump(v) + "\n" for v in results).encode("utf-8"), "application/jsonlines"
    return dump(results[0] if parsed.shape == "single" else results).encode("utf-8"), "application/json"


# =============================================================================================================
# Dynamic batching
# =============================================================================================================


class QueueFull(Exception):
    pass


# The fixed cost of one engine call (Python -> C, one OpenMP barrier per kernel, small-matrix inefficiency) in
# units of the compute of one token, for DynamicBatcher.group_rows. Measured for all-MiniLM-L6-v2 on 2 cores:
# 1 x 32 tokens costs about as much as 4 x 32 in one call under load; 64 is a middle value (the split between
# calls is not sensitive to it within a factor of 2).
CALL_OVERHEAD_TOKENS = 64

# A batch stops waiting for more requests once it holds this many real tokens: the engine's rate per token
# saturates there (all-MiniLM-L6-v2 on 2 cores: one 48-token window runs at ~60% of the tokens/s of eight, one
# 176-token window at ~70-80%; past ~400-500 tokens per call the rate is flat), so waiting longer would only
# idle the engine. Windows already queued still join, up to max_batch_size.
FILL_TOKENS = 512


class _Chunk:
    """Up to max_batch_size windows of one request, waiting for the engine."""

    __slots__ = ("input_ids", "attention_mask", "token_type_ids", "future", "enqueued", "tokens")

    def __init__(self, input_ids, attention_mask, token_type_ids, future, enqueued):
        self.input_ids, self.attention_mask, self.token_type_ids = input_ids, attention_mask, token_type_ids
        self.future, self.enqueued = future, enqueued
        self.tokens = int(np.count_nonzero(attention_mask))

    @property
    def n(self) -> int:
        return int(self.input_ids.shape[0])


_STOP = object()


class DynamicBatcher:
    """Gathers the windows of concurrent requests into engine calls of at most max_batch_size windows.

    When the engine is free, the oldest waiting chunk opens a batch; chunks already queued join while they fit,
    and while `others_coming()` says more requests are on their way (being received or tokenized) and the batch
    holds fewer than fill_tokens real tokens, the batch waits for them until max_wait_ms after the later of: the
    oldest chunk was queued, the engine became free. A lone request therefore never waits, and a batch never
    idles the engine for requests it does not need to run efficiently. With enabled=False every chunk is its
    own engine call. `forward(input_ids, attention_mask, token_type_ids)` runs in one dedicated thread.
    skips_padding: the engine computes no padding (the CPU engine packs the rows), so a batch is one call
    whatever its rows' lengths; otherwise group_rows cuts it by length.
    """

    def __init__(self, forward: Callable, max_batch_size: int = 16, max_wait_ms: float = 5.0, enabled: bool = True,
                 max_queue: int = 2048, pad_token_id: int = 0, pad_to_multiple_of: int = 8,
                 call_overhead_tokens: int = CALL_OVERHEAD_TOKENS, skips_padding: bool = False,
                 fill_tokens: int = FILL_TOKENS, others_coming: Callable[[], bool] = lambda: True):
        self.forward = forward
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.enabled = enabled
        self.max_queue = int(max_queue)
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.call_overhead_tokens = int(call_overhead_tokens)
        self.skips_padding = bool(skips_padding)
        self.fill_tokens = int(fill_tokens)
        self.others_coming = others_coming
        self.queued = 0  # windows waiting (not yet in an engine call)
        self.calls = 0
        self.windows = 0
        self.batch_sizes: dict[int, int] = {}
        self.engine_seconds = 0.0
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="bertqa-engine")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="bertqa-batcher")

    async def stop(self) -> None:
        """Run what is queued, then stop (the server has finished its requests by now)."""
        if self._task is not None:
            self._queue.put_nowait(_STOP)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    def stats(self) -> dict[str, Any]:
        return {"engine_calls": self.calls, "windows": self.windows,
                "mean_batch_size": self.windows / self.calls if self.calls else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "engine_seconds": round(self.engine_seconds, 3), "queued_windows": self.queued,
                "max_batch_size": self.max_batch_size, "max_wait_ms": self.max_wait * 1000,
                "batching": self.enabled}

    async def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) logits [N, T] of N windows; cancelling the caller drops its windows not yet started."""
        n, width = input_ids.shape
        if self.queued + n > self.max_queue:
            raise QueueFull(f"{self.queued} windows are already waiting for the engine (limit {self.max_queue}, "
                            f"BERTQA_MAX_QUEUE)")
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for lo in range(0, n, self.max_batch_size):
            sl = slice(lo, lo + self.max_batch_size)
            fut = loop.create_future()
            self._queue.put_nowait(_Chunk(input_ids[sl], attention_mask[sl], token_type_ids[sl], fut, now))
            self.queued += min(self.max_batch_size, n - lo)
            futures.append(fut)
        try:
            parts = await asyncio.gather(*futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        start = np.full((n, width), -np.inf, dtype=np.float32)
        end = np.full((n, width), -np.inf, dtype=np.float32)
        lo = 0
        for s, e in parts:
            w = min(s.shape[1], width)
            start[lo:lo + len(s), :w], end[lo:lo + len(s), :w] = s[:, :w], e[:, :w]
            lo += len(s)
        return start, end

    async def _next(self, timeout: Optional[float]):
        if timeout is None:
            return await self._queue.get()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry = None
        stopping = False
        while True:
            if carry is not None:
                first, carry = carry, None
            elif stopping:
                break
            else:
                first = await self._next(None)
            if first is _STOP:
                stopping = True
                continue
            if self._drop_if_cancelled(first):
                continue
            batch, rows, tokens = [first], first.n, first.tokens
            if self.enabled:
                deadline = max(first.enqueued, loop.time()) + self.max_wait
                while rows < self.max_batch_size:
                    wait = tokens < self.fill_tokens and self.others_coming()
                    item = await self._next(deadline - loop.time() if wait else 0.0)
                    if item is None:
                        break
                    if item is _STOP:
                        stopping = True
                        break
                    if self._drop_if_cancelled(item):
                        continue
                    if rows + item.n > self.max_batch_size:
                        carry = item
                        break
                    batch.append(item)
                    rows += item.n
                    tokens += item.tokens
            await self._execute(batch, rows)

    def _drop_if_cancelled(self, chunk: _Chunk) -> bool:
        if chunk.future.cancelled():
            self.queued -= chunk.n
            return True
        return False

    async def _execute(self, batch: list[_Chunk], rows: int) -> None:
        self.queued -= rows
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            await loop.run_in_executor(self._executor, self._run_batch, batch, loop)
        except Exception as e:  # the engine failed: the requests of the batch not yet answered get the error
            log.exception("engine call on %d windows failed", rows)
            for c in batch:
                if not c.future.done():
                    c.future.set_exception(e)
        finally:
            self.engine_seconds += time.perf_counter() - t0

    def group_rows(self, lengths: Sequence[int]) -> list[list[int]]:
        """Rows (indices into lengths) per engine call, the call of shortest rows first; all in one call when the
        engine skips padding.

        A call costs about call_overhead_tokens + rows x width tokens of compute (width: its longest row rounded
        up to pad_to_multiple_of; padding is paid in full on a CPU). The rows sorted by length are cut into the
        consecutive runs that minimise the total cost (dynamic programming, n <= max_batch_size): windows of
        similar length share one call, and a batch of very different lengths runs as a few calls rather than one
        padded to the longest. The shortest call runs first so that its requests are answered soonest.
        """
        if self.skips_padding:
            return [list(range(len(lengths)))]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        n = len(order)
        widths = [-(-max(lengths[i], 1) // self.pad_to_multiple_of) * self.pad_to_multiple_of for i in order]
        best = [0.0] + [math.inf] * n  # best[j]: cost of rows order[:j]
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j):  # last call = order[i:j], padded to widths[i] (its longest row)
                cost = best[i] + self.call_overhead_tokens + (j - i) * widths[i]
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        groups, j = [], n
        while j > 0:
            groups.append([order[k] for k in range(cut[j], j)])
            j = cut[j]
        return groups  # built from the shortest rows backwards: shortest call first

    def _run_batch(self, batch: list[_Chunk], loop: asyncio.AbstractEventLoop) -> None:
        """In the engine thread: the engine calls of one batch; each chunk's future gets (start, end) [n, T_chunk]
        (-inf past each row's last token) as soon as its last row is done."""
        rows = [(c, r) for c in range(len(batch)) for r in range(batch[c].n)]
        lengths = [int(batch[c].attention_mask[r].sum()) for c, r in rows]
        outputs = [(np.full(ch.input_ids.shape, -np.inf, dtype=np.float32),
                    np.full(ch.input_ids.shape, -np.inf, dtype=np.float32)) for ch in batch]
        left = [ch.n for ch in batch]
        for group in self.group_rows(lengths):
            if all(batch[rows[i][0]].future.cancelled() for i in group):
                continue
            width = -(-max(max(lengths[i] for i in group), 1) // self.pad_to_multiple_of) * self.pad_to_multiple_of
            ids = np.full((len(group), width), self.pad_token_id, dtype=np.int32)
            mask = np.zeros((len(group), width), dtype=np.int32)
            types = np.zeros((len(group), width), dtype=np.int32)
            for j, i in enumerate(group):
                (c, r), n = rows[i], lengths[i]
                ids[j, :n] = batch[c].input_ids[r, :n]
                mask[j, :n] = 1
                types[j, :n] = batch[c].token_type_ids[r, :n]
            start, end = self.forward(ids, attention_mask=mask, token_type_ids=types)
            start, end = np.asarray(start, dtype=np.float32), np.asarray(end, dtype=np.float32)
            finished = []
            for j, i in enumerate(group):
                (c, r), n = rows[i], lengths[i]
                outputs[c][0][r, :n] = start[j, :n]
                outputs[c][1][r, :n] = end[j, :n]
                left[c] -= 1
                if left[c] == 0:
                    finished.append(c)
            loop.call_soon_threadsafe(self._deliver, [(batch[c].future, outputs[c]) for c in finished], len(group))

    def _deliver(self, results, size: int) -> None:
        self.calls += 1
        self.windows += size
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1
        for future, out in results:
            if not future.done():
                future.set_result(out)


# =============================================================================================================
# The application
# =============================================================================================================


def load_model(model_dir: str, device: str = "cpu"):
    """The engine: bertqa.model.BertQA from a folder, an archive or a packaged model name."""
    from ..model import BertQA
    from ..packaging import ModelDir

    holder = ModelDir(model_dir)
    try:
        return BertQA.from_pretrained(str(holder.folder), device=device)
    finally:
        holder.close()  # the engine holds its weights in memory; the unpacked files are not needed


class QAService:
    """State of one server process: config, model (once loaded), pipeline, batcher, thread pool."""

    def __init__(self, config: ServeConfig, model_loader: Optional[Callable[[], Any]] = None):
        self.config = config
        self.model_loader = model_loader or (lambda: load_model(config.model_dir, config.device))
        self.pipeline: Optional[QAPipeline] = None
        self.batcher: Optional[DynamicBatcher] = None
        self.load_error: Optional[str] = None
        self.on_load_error: Optional[Callable[[], None]] = None
        self.cpu = ThreadPoolExecutor(2, thread_name_prefix="bertqa-cpu")
        self.inflight = 0  # requests between their headers and their answer
        self.on_the_way = 0  # requests being received or tokenized: their windows are not queued yet

    @property
    def loaded(self) -> bool:
        return self.batcher is not None

    async def startup(self) -> None:
        self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            model, pipeline = await asyncio.get_running_loop().run_in_executor(self.cpu, self._load_sync)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("could not load the model from %s: %s", self.config.model_dir, self.load_error)
            if self.on_load_error is not None:
                self.on_load_error()
            return
        c = self.config
        batcher = DynamicBatcher(model.forward, c.max_batch_size, c.max_wait_ms, c.batching, c.max_queue,
                                 pad_token_id=model.tokenizer.pad_token_id,
                                 skips_padding=bool(getattr(model, "skips_padding", False)),
                                 others_coming=lambda: self.on_the_way > 0)
        batcher.start()
        self.pipeline, self.batcher = pipeline, batcher
        log.info("model loaded from %s in %.1f s; max_seq_length %d, batching %s (max %d windows, %.1f ms)",
                 c.model_dir, time.perf_counter() - t0, pipeline.max_seq_length,
                 "on" if c.batching else "off", c.max_batch_size, c.max_wait_ms)

    def _load_sync(self):
        c = self.config
        if c.num_threads is not None or c.workers > 1:
            with contextlib.suppress(Exception):
                from .. import ops
                ops.set_num_threads(c.num_threads or max(1, (os.cpu_count() or 1) // c.workers))
        model = self.model_loader()
        pipeline = QAPipeline(model, c.max_seq_length, c.doc_stride, c.max_query_length, c.max_answer_length,
                              c.n_best_size)
        # Warm-up before /ping says yes: one engine call at the largest shape the batcher can send, so the
        # engine's activation arena (which only grows) is allocated now, memory stays flat under load, and a
        # machine too small for it fails here rather than mid-traffic; then one request through the pipeline.
        B, T = c.max_batch_size, pipeline.max_seq_length
        model.forward(np.full((B, T), model.tokenizer.unk_token_id, dtype=np.int32),
                      attention_mask=np.ones((B, T), dtype=np.int32), token_type_ids=np.zeros((B, T), dtype=np.int32))
        pipeline.answer(["warm up?"], ["Warm-up context."])
        return model, pipeline

    async def shutdown(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        task = getattr(self, "_load_task", None)
        if task is not None and not task.done():
            task.cancel()
        self.cpu.shutdown(wait=False, cancel_futures=True)

    # ---- one request ---------------------------------------------------------------------------------------

    async def answer(self, body: bytes, fmt: str, out_fmt: str, arrival: "_Arrival") -> tuple[bytes, str]:
        loop = asyncio.get_running_loop()
        try:
            parsed, prepared = await loop.run_in_executor(self.cpu, self._prepare, body, fmt)
        finally:
            arrival.done()  # from here on its windows are queued (below, with no await in between) or it failed
        input_ids, attention_mask, token_type_ids = prepared.model_inputs()
        try:
            start, end = await self.batcher.run(input_ids, attention_mask, token_type_ids)
        except QueueFull as e:
            raise RequestError(503, f"server busy: {e}; retry later", {"Retry-After": "1"}) from None
        return await loop.run_in_executor(self.cpu, self._finish, parsed, prepared, start, end, out_fmt)

    def _prepare(self, body: bytes, fmt: str):
        parsed = parse_request(body, fmt, self.config)
        questions = [q for r in parsed.records for q in r.questions]
        contexts = [r.context for r in parsed.records for _ in r.questions]
        try:
            prepared = self.pipeline.prepare(questions, contexts, max_windows=self.config.max_windows)
        except TooMuchWork as e:
            raise RequestError(413, f"{e} (BERTQA_MAX_WINDOWS); send shorter contexts or fewer questions") from None
        return parsed, prepared

    def _finish(self, parsed: ParsedRequest, prepared, start, end, out_fmt: str) -> tuple[bytes, str]:
        answers, k = [], 0
        for r in parsed.records:
            for _ in r.questions:
                answers.append(self.pipeline.decode_one(prepared, k, start, end, r.top_k or 1, r.max_answer_length))
                k += 1
        return render_results(parsed, answers, out_fmt)


class _Arrival:
    """Counts a request in service.on_the_way from its headers until its windows are queued (or it fails)."""

    def __init__(self, service: QAService):
        self.service = service
        self.active = True
        service.on_the_way += 1

    def done(self) -> None:
        if self.active:
            self.active = False
            self.service.on_the_way -= 1


def _error(status: int, message: str, headers: Optional[dict] = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


async def _read_body(request, limit: int) -> bytes:
    """The body, at most limit bytes: RequestError 413 from Content-Length or while streaming."""
    declared = request.headers.get("content-length")
    too_big = (f"request body over the {limit / 1048576:g} MB limit (SAGEMAKER_MAX_PAYLOAD_IN_MB); split it "
               f"into several requests")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length {declared!r}") from None
        if declared_n > limit:
            await _drain(request, declared_n)
            raise RequestError(413, too_big + f" ({declared_n} bytes)", {"Connection": "close"})
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            await _drain(request, None)
            raise RequestError(413, too_big, {"Connection": "close"})
    return bytes(body)


async def _drain(request, declared: Optional[int], cap: int = 64 << 20) -> None:
    """Read and drop the rest of an over-limit body (up to cap bytes), so the client sees the 413 instead of a
    connection reset while it is still sending."""
    if declared is not None and declared > cap:
        return
    seen = 0
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                return


async def _wait_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(config: Optional[ServeConfig] = None, model_loader: Optional[Callable[[], Any]] = None):
    """The Starlette application; model_loader() -> an object with BertQA's interface (default: load_model)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    config = config or ServeConfig.from_env()
    service = QAService(config, model_loader)

    async def ping(request: Request) -> Response:
        if service.loaded:
            return Response(status_code=200)
        if service.load_error:
            return _error(503, f"model failed to load: {service.load_error}")
        return _error(503, "model is loading")

    async def invocations(request: Request) -> Response:
        if not service.loaded:
            return _error(503, f"model failed to load: {service.load_error}" if service.load_error
                          else "model is loading; retry when GET /ping answers 200", {"Retry-After": "5"})
        arrival = _Arrival(service)
        try:
            return await _invocation(request, arrival)
        finally:
            arrival.done()

    async def _invocation(request: Request, arrival: _Arrival) -> Response:
        try:
            encoding = request.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise RequestError(415, f"unsupported Content-Encoding {encoding!r}: send the body uncompressed")
            fmt = request_format(request.headers.get("content-type"))
            out_fmt = response_format(request.headers.get("accept"), fmt)
            body = await _read_body(request, config.max_payload_bytes)
        except RequestError as e:
            return _error(e.status, e.message, e.headers)
        except ClientDisconnect:
            log.info("client disconnected while sending the request")
            return Response(status_code=400)
        service.inflight += 1
        work = asyncio.ensure_future(service.answer(body, fmt, out_fmt, arrival))
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, watch}, timeout=config.timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                content, media = work.result()
                return Response(content, media_type=media)
            work.cancel()
            if watch in done:
                log.info("client disconnected before its answer; its queued windows are dropped")
                return Response(status_code=400)
            return _error(504, f"no answer within {config.timeout_s:g} s (SAGEMAKER_MODEL_SERVER_TIMEOUT); "
                               f"the server is overloaded or the request too large")
        except RequestError as e:
            return _error(e.status, e.message, e.headers)
        except Exception as e:
            log.exception("request failed")
            return _error(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            service.inflight -= 1
            watch.cancel()
            if not work.done():
                work.cancel()

    async def execution_parameters(request: Request) -> Response:
        # Batch transform sends MULTI_RECORD requests (many lines each, enough to fill engine batches); two at a
        # time per worker keep its engine busy while the other one is being parsed or answered.
        return JSONResponse({
            "MaxConcurrentTransforms": 2 * config.workers,
            "BatchStrategy": "MULTI_RECORD",
            "MaxPayloadInMB": max(1, int(config.max_payload_mb)),
        })

    async def stats(request: Request) -> Response:
        body = {"loaded": service.loaded, "inflight_requests": service.inflight}
        if service.batcher is not None:
            body.update(service.batcher.stats())
            if config.device == "cpu":
                from .. import ops
                body["engine_threads"] = ops.runtime_info()["omp_threads"]
        return JSONResponse(body)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_spec(config))

    async def index(request: Request) -> Response:
        return HTMLResponse(INDEX_HTML)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}"
                      + (" (routes: GET /ping, POST /invocations, GET /execution-parameters, GET /openapi.json)"
                         if exc.status_code == 404 else ""), getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.startup()
        if config.workers > 1:
            # Worker processes share one listening socket, and uvicorn accepts on it only once the lifespan
            # has started: a worker that waits here for its model takes no connection while loading, so a
            # client that saw /ping say 200 (from a loaded worker) never meets a loading one. (One worker
            # serves while it loads instead, so that /ping can answer 503 meanwhile, as SageMaker expects.)
            await asyncio.shield(service._load_task)
        try:
            yield
        finally:
            await service.shutdown()

    app = Starlette(
        routes=[
            Route("/ping", ping, methods=["GET"]),
            Route("/invocations", invocations, methods=["POST"]),
            Route("/execution-parameters", execution_parameters, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/", index, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def app_from_env():
    """Factory for worker processes (uvicorn --factory): the config travels in $BERTQA_SERVE_CONFIG."""
    raw = os.environ.get(CONFIG_ENV)
    return create_app(ServeConfig.from_json(raw) if raw else ServeConfig.from_env())


# =============================================================================================================
# OpenAPI description and the browser page
# =============================================================================================================


def openapi_spec(config: ServeConfig) -> dict[str, Any]:
    record_common = {
        "context": {"type": "string", "minLength": 1, "pattern": r"\S",
                    "description": "text to find the answer in; windows of max_seq_length tokens, "
                                   "doc_stride apart, cover it whole"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": config.n_best_size,
                  "description": "return a list of the top_k answers instead of one answer"},
        "max_answer_length": {"type": "integer", "minimum": 1, "maximum": config.max_seq_length,
                              "description": f"longest answer in tokens (default {config.max_answer_length})"},
    }
    question = {"type": "string", "minLength": 1, "pattern": r"\S"}
    single = {"type": "object", "required": ["question", "context"],
              "properties": {"question": question, **record_common}}
    multi = {"type": "object", "required": ["questions", "context"],
             "properties": {"questions": {"type": "array", "items": question, "minItems": 1,
                                          "maxItems": config.max_questions}, **record_common}}
    answer = {"type": "object", "required": ["answer", "score", "start", "end"], "properties": {
        "answer": {"type": "string", "description": "context[start:end]"},
        "score": {"type": "number", "description": "probability among the n-best spans"},
        "start": {"type": "integer", "description": "first character of the answer in the context"},
        "end": {"type": "integer", "description": "one past the last character"}}}
    error = {"type": "object", "required": ["error", "status"],
             "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    err = lambda text: {"description": text, "content": {"application/json": {"schema": ref("Error")}}}  # noqa: E731
    limits = (f"Limits: body {config.max_payload_mb:g} MB (413), {config.max_questions} questions and "
              f"{config.max_windows} windows of {config.max_seq_length} tokens per request (413), "
              f"{config.timeout_s:g} s per request (504).")
    return {
        "openapi": "3.1.0",
        "info": {"title": "bertqa question answering endpoint", "version": _version(),
                 "description": "Extractive question answering with a BERT model, behind the SageMaker "
                                "inference contract. " + limits},
        "paths": {
            "/ping": {"get": {"summary": "health check", "responses": {
                "200": {"description": "the model is loaded (empty body)"},
                "503": err("the model is still loading, or failed to load")}}},
            "/invocations": {"post": {
                "summary": "answer questions about contexts",
                "description": "A record, an array of records, or {\"instances\": [records]}; with "
                               "application/jsonlines, one record per line. " + limits,
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"oneOf": [
                        ref("Record"), ref("MultiQuestionRecord"),
                        {"type": "array", "minItems": 1, "items": ref("AnyRecord")},
                        {"type": "object", "required": ["instances"], "properties": {
                            "instances": {"type": "array", "minItems": 1, "items": ref("AnyRecord")}}}]}},
                    "application/jsonlines": {"schema": ref("AnyRecord")}}},
                "responses": {
                    "200": {"description": "one answer per question (a list of top_k answers when top_k is "
                                           "given); arrays mirror the request",
                            "content": {"application/json": {"schema": {"oneOf": [
                                ref("Answer"), {"type": "array"}]}},
                                "application/jsonlines": {"schema": {}}}},
                    "400": err("malformed JSON or UTF-8; a missing, empty or wrongly typed field"),
                    "406": err("Accept names a type the server does not produce"),
                    "413": err("body, questions or windows over the limits"),
                    "415": err("Content-Type other than application/json or application/jsonlines"),
                    "503": err("model not loaded yet, or too many windows queued"),
                    "504": err("no answer within the timeout")}}},
            "/execution-parameters": {"get": {"summary": "batch transform parameters", "responses": {
                "200": {"description": "MaxConcurrentTransforms, BatchStrategy, MaxPayloadInMB",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/stats": {"get": {"summary": "dynamic batching statistics", "responses": {
                "200": {"description": "engine calls, windows, batch size histogram, engine threads (CPU)",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/openapi.json": {"get": {"summary": "this description", "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {}}}}}}},
            "/": {"get": {"summary": "a page to ask a question in a browser", "responses": {
                "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": {
            "Record": single, "MultiQuestionRecord": multi,
            "AnyRecord": {"oneOf": [ref("Record"), ref("MultiQuestionRecord")]},
            "Answer": answer, "Error": error}},
    }


def _version() -> str:
    from .. import __version__

    return __version__


INDEX_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bertqa</title>
<style>body{font:16px sans-serif;max-width:46em;margin:2em auto;padding:0 1em}textarea,input{width:100%;
box-sizing:border-box;font:inherit;margin:.3em 0}textarea{height:12em}mark{background:#fd6}#out{margin-top:1em;
white-space:pre-wrap}</style></head><body>
<h1>Ask a question</h1>
<label>Context<textarea id="context">The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in
Paris, France. It is named after the engineer Gustave Eiffel, whose company designed and built the tower from
1887 to 1889.</textarea></label>
<label>Question<input id="question" value="Who is the tower named after?"></label>
<button id="ask">Answer</button>
<div id="out"></div>
<script>
const esc = s => s.replace(/[&<>]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;"}[c]));
document.getElementById("ask").onclick = async () => {
  const context = document.getElementById("context").value, question = document.getElementById("question").value;
  const out = document.getElementById("out");
  out.textContent = "...";
  const r = await fetch("invocations", {method: "POST", headers: {"Content-Type": "application/json"},
                        body: JSON.stringify({question, context})});
  const a = await r.json();
  if (!r.ok) { out.textContent = "Error " + r.status + ": " + a.error; return; }
  out.innerHTML = "<b>" + esc(a.answer) + "</b> (score " + a.score.toFixed(3) + ")<p>" +
    esc(context.slice(0, a.start)) + "<mark>" + esc(context.slice(a.start, a.end)) + "</mark>" +
    esc(context.slice(a.end)) + "</p>";
};
</script></body></html>
"""


# =============================================================================================================
# Running it
# =============================================================================================================


def run_server(config: ServeConfig, model_loader: Optional[Callable[[], Any]] = None, sockets=None) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean shutdown, 1 when the model could not be loaded.

    One worker runs in this process. Several (SAGEMAKER_MODEL_SERVER_WORKERS) are uvicorn worker processes, each
    loading its own model (an archive is unpacked by each, and removed once loaded). After SIGTERM/SIGINT uvicorn
    finishes the requests in flight, then re-raises the signal, so the process ends with the signal's status
    (143 for SIGTERM), as a container's main process conventionally does.
    """
    import uvicorn

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    common = dict(host=config.host, port=config.port, log_level=config.log_level, access_log=config.access_log,
                  lifespan="on", timeout_graceful_shutdown=int(math.ceil(config.timeout_s)) + 5,
                  # Idle keep-alive connections are kept 75 s (nginx's default), so pooling clients reuse them.
                  timeout_keep_alive=75)
    if config.workers > 1:
        if model_loader is not None:
            raise ValueError("a custom model_loader needs workers=1 (worker processes load the model themselves)")
        os.environ[CONFIG_ENV] = config.to_json()
        uvicorn.run("bertqa.serve:app_from_env", factory=True, workers=config.workers, **common)
        return 0
    app = create_app(config, model_loader)
    server = uvicorn.Server(uvicorn.Config(app, **common))
    service = app.state.service

    def stop_on_load_error():
        server.should_exit = True

    service.on_load_error = stop_on_load_error
    server.run(sockets=sockets)
    return 1 if service.load_error else 0


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
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=None,
                   help="windows per engine call (16)")
    p.add_argument("--max-wait-ms", dest="max_wait_ms", type=float, default=None,
                   help="how long a batch may wait for requests being received or tokenized (5)")
    p.add_argument("--no-batching", dest="batching", action="store_const", const=False, default=None,
                   help="one engine call per request")
    for flag, help_text in (("max_seq_length", "384"), ("doc_stride", "128"), ("max_query_length", "64"),
                            ("max_answer_length", "30"), ("n_best_size", "20"), ("max_questions", "1024"),
                            ("max_windows", "512"), ("max_queue", "2048"), ("num_threads", "cores / workers")):
        p.add_argument(f"--{flag.replace('_', '-')}", f"--{flag}", dest=flag, type=int, default=None,
                       help=f"default {help_text}")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="engine device (cpu)")
    p.add_argument("--no-access-log", dest="access_log", action="store_const", const=False, default=None)
    p.add_argument("--log-level", dest="log_level", default=None, choices=["debug", "info", "warning", "error"])


def serve_command(args: argparse.Namespace) -> int:
    from ..packaging import PackageError

    names = {f.name for f in fields(ServeConfig)}
    try:
        config = ServeConfig.from_env(**{k: v for k, v in vars(args).items() if k in names})
        return run_server(config)
    except (ValueError, FileNotFoundError, PackageError) as e:
        print(f"bertqa serve: error: {e}", file=sys.stderr)
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bertqa.serve", description=__doc__.split("\n")[0])
    add_serve_flags(parser)
    return serve_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
