"""The /invocations contract: content types, request parsing and validation, errors, the rendering of answers.

Pure functions and plain data: no server is needed to test them.

Bodies (application/json):
    {"question": Q, "context": C}                   -> {"answer", "score", "start", "end"}
    {"questions": [Q1, Q2, ...], "context": C}      -> [answer, answer, ...]   (the context is tokenized once)
    [record, record, ...] or {"instances": [...]}   -> [result, result, ...]
    optional per record: "top_k" (1..n_best_size: a list of the top_k answers instead of one answer) and
    "max_answer_length" (tokens, default 30); other keys are ignored (SQuAD-style records with "id" work).
application/jsonlines (also application/x-jsonlines, application/jsonl, application/x-ndjson): one record per
line, one result per line back; this is what SageMaker batch transform sends with SplitType=Line.
The response has the request's type unless Accept asks for the other one.

Errors are JSON, {"error": "<what is wrong>", "status": <code>}: 400 malformed JSON, bad UTF-8, a missing,
empty or wrongly typed field; 404/405 unknown route or method; 406 an Accept we cannot produce; 413 body,
questions or windows over the limits (bertqa.serve.settings); 415 another content type or a compressed body;
503 model not loaded yet or queue full; 504 over the timeout.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from .settings import ServeConfig

JSON_TYPES = ("application/json",)
JSONL_TYPES = ("application/jsonlines", "application/x-jsonlines", "application/jsonl", "application/x-ndjson",
               "application/ndjson")


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


# A cheap lower bound on the token count of a text under BERT's normalizer, pre-tokenizer and WordPiece, to refuse
# a request whose windows are over the limit before tokenizing it (6 MB of text takes seconds and ~600 MB to
# tokenize; the bound takes ~0.1 s). Each ASCII punctuation character is one token, and so is at least each chunk
# of letters and digits that BERT's whitespace (ASCII space, tab, newline, Unicode Zs) or ASCII punctuation delimit
# on both sides. Chunks with any other character in them (accents that may be stripped, control characters that
# are removed, other scripts) are not counted: under-counting only lets the exact count decide.
_BERT_SPACE = " \t\n\r\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
_ASCII_PUNCT = "!-/:-@\\[-`{-~"
_DELIMITED_WORD = re.compile(f"(?<![^{_BERT_SPACE}{_ASCII_PUNCT}])[^\\W_]+(?![^{_BERT_SPACE}{_ASCII_PUNCT}])")
_PUNCT = re.compile(f"[{_ASCII_PUNCT}]")


_SPACE = re.compile(f"[{_BERT_SPACE}]")
CHUNK_CHARS = 1 << 16  # min_tokens counts this much text per regex call: ~4 ms with the GIL held


def min_tokens_chunks(text: str):
    """Running totals of min_tokens over pieces of ~CHUNK_CHARS characters cut after a whitespace character (so
    the delimiters each piece's pattern sees are the text's own)."""
    total, pos, n = 0, 0, len(text)
    while pos < n:
        cut = _SPACE.search(text, min(pos + CHUNK_CHARS, n))
        stop = n if cut is None else cut.end()
        piece = text[pos:stop]
        total += len(_DELIMITED_WORD.findall(piece)) + len(_PUNCT.findall(piece))
        pos = stop
        yield total


def min_tokens(text: str) -> int:
    """At most the number of tokens a BERT WordPiece tokenizer makes of text (see the comment above)."""
    total = 0
    for total in min_tokens_chunks(text):
        pass
    return total


def min_windows(n_tokens: int, max_seq_length: int, doc_stride: int) -> int:
    """At most the windows of a context of n_tokens tokens (a question of 0 tokens leaves the most room)."""
    room = max_seq_length - 3
    if n_tokens <= room:
        return 1
    step = max(1, room - doc_stride)
    return 1 + -(-(n_tokens - room) // step)


def check_windows_bound(parsed: "ParsedRequest", max_seq_length: int, doc_stride: int, max_windows: int) -> None:
    """RequestError 413 as soon as the request surely needs more than max_windows windows (min_tokens per
    distinct context, times its questions): a request far over the limit is refused after reading about as much
    of it as a request at the limit holds."""
    questions: dict[str, int] = {}
    for r in parsed.records:
        questions[r.context] = questions.get(r.context, 0) + len(r.questions)
    done = 0
    for context, n_questions in questions.items():
        windows = 1
        for tokens in min_tokens_chunks(context):
            windows = min_windows(tokens, max_seq_length, doc_stride)
            if done + windows * n_questions > max_windows:
                raise RequestError(413, f"the request needs more than {max_windows} windows of {max_seq_length} "
                                        f"tokens (doc_stride {doc_stride}; counted without tokenizing); the limit "
                                        f"is {max_windows} per request (BERTQA_MAX_WINDOWS); send shorter contexts "
                                        f"or fewer questions")
        done += windows * n_questions


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
