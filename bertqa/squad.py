"""SQuAD: read the official JSON, build model features, turn logits back into answers, score them.

Pure Python + NumPy (+ the `tokenizers` package through bertqa.tokenization); no compute engine needed.

    examples = load_squad("dev-v1.1.json")                       # list[Example], validated
    features = build_features(examples, tokenizer)                # run_qa.py's prepare_*_features, as arrays
    answers = postprocess_predictions(examples, features, start_logits, end_logits)   # utils_qa.py
    evaluate("dev-v1.1.json", answers)                            # official evaluate-v1.1.py (v2.0 too)

Feature building follows transformers' examples/pytorch/question-answering/run_qa.py (`[CLS] question [SEP]
context window [SEP]`, windows sharing `doc_stride` tokens, answers outside a window labelled at [CLS]) plus two
things from the original BERT run_squad.py: questions cut to `max_query_length` tokens, and the per-token
"max context" flag that post-processing uses to pick, for a token seen by several windows, the window where it
has the most context on both sides.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import string
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from ._atomic import atomic_write
from .tokenization import BertQATokenizer

PathLike = Union[str, os.PathLike]
# Bumped whenever the layout or meaning of cached feature arrays changes, so stale caches are not reused.
FEATURES_FORMAT = 1


# =============================================================================================================
# Reading the official JSON
# =============================================================================================================


class SquadFormatError(ValueError):
    """The input is not valid SQuAD JSON; the message names the file, the place and what is wrong."""


class SquadAnswerWarning(UserWarning):
    """Training questions were skipped because their answers do not match their contexts (load_squad with
    on_bad_answer="warn"); the message gives the count and the first places."""


BAD_ANSWER_POLICIES = ("raise", "warn", "ignore")


@dataclass(frozen=True)
class Example:
    """One question about one paragraph. `answers[k]` starts at character `answer_starts[k]` of `context`.

    v2.0 unanswerable questions have `is_impossible=True` and no answers (their `plausible_answers` are
    not kept: neither training nor the metric uses them).
    """

    id: str
    title: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]
    is_impossible: bool = False


def load_squad(path_or_dict: Union[PathLike, Mapping[str, Any]], on_bad_answer: str = "raise") -> list[Example]:
    """Examples of a SQuAD v1.1 / v2.0 file (or its already parsed dict), checked field by field.

    on_bad_answer: what to do with an answer that does not fit its context (answer_start not matching the
    text, outside the context, empty text, a missing or mistyped answer field). "raise" (the default, right
    for evaluation data): SquadFormatError naming the file and place. "warn" (training data, as
    `bertqa finetune` reads it): drop the bad answers, skip questions left with none, and warn once with a
    SquadAnswerWarning giving the count and the first places. "ignore": the same, silently.
    """
    if isinstance(path_or_dict, Mapping):
        return parse_squad(path_or_dict, source="<dict>", on_bad_answer=on_bad_answer)
    return parse_squad(read_squad_json(path_or_dict), source=str(path_or_dict), on_bad_answer=on_bad_answer)


def read_squad_json(path: PathLike) -> dict:
    """Parse a SQuAD file: strict UTF-8 (a BOM is allowed), errors with line and column."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise SquadFormatError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # Position from the start of raw (the BOM, when present, is 3 bytes and counted in e.start too).
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise SquadFormatError(
            f"{path}: not UTF-8: byte 0x{raw[e.start]:02x} at line {line}, column {column} "
            f"(byte offset {e.start}): {e.reason}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (the file ends early: truncated?)" if not text[e.pos:].strip() else ""
        raise SquadFormatError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}{hint}") from e
    return data


def _describe_type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(obj: Mapping, key: str, kind: type | tuple, where: str, source: str, required: bool = True) -> Any:
    """obj[key] checked against kind (bool is not an int here); None when optional and absent."""
    if key not in obj:
        if required:
            raise SquadFormatError(f"{source}: {where}: missing field {key!r}")
        return None
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise SquadFormatError(f"{source}: {where}: field {key!r} should be {names}, got {_describe_type(value)}")
    return value


def parse_squad(data: Any, source: str = "<dict>", on_bad_answer: str = "raise") -> list[Example]:
    """Validate a parsed SQuAD dict and flatten it into Examples (article order, then paragraph, question).

    on_bad_answer: see load_squad.
    """
    if on_bad_answer not in BAD_ANSWER_POLICIES:
        raise ValueError(f"on_bad_answer should be one of {BAD_ANSWER_POLICIES}, got {on_bad_answer!r}")
    bad: Optional[list[str]] = None if on_bad_answer == "raise" else []
    if not isinstance(data, Mapping):
        raise SquadFormatError(f"{source}: top level should be a JSON object with a 'data' list, "
                               f"got {_describe_type(data)}")
    articles = _get(data, "data", list, "top level", source)
    examples: list[Example] = []
    seen: dict[str, str] = {}  # id -> where it was first seen
    for a, article in enumerate(articles):
        where = f"data[{a}]"
        if not isinstance(article, Mapping):
            raise SquadFormatError(f"{source}: {where}: article should be an object, got {_describe_type(article)}")
        title = _get(article, "title", str, where, source, required=False) or ""
        if title:
            where += f" (title {title!r})"
        paragraphs = _get(article, "paragraphs", list, where, source)
        for p, paragraph in enumerate(paragraphs):
            examples.extend(_parse_paragraph(paragraph, title, f"{where} paragraphs[{p}]", source, seen, bad))
    if bad and on_bad_answer == "warn":
        skipped = sum(1 for b in bad if b.startswith("skipped"))
        shown = "; ".join(b.split(": ", 1)[1] for b in bad[:3])
        warnings.warn(SquadAnswerWarning(
            f"{source}: {len(bad)} answer(s) that do not fit their context dropped; {skipped} question(s) "
            f"left with no answer skipped, {len(examples)} kept. First: {shown}"), stacklevel=3)
    return examples


def _parse_paragraph(paragraph: Any, title: str, where: str, source: str, seen: dict[str, str],
                     bad: Optional[list[str]] = None) -> list[Example]:
    if not isinstance(paragraph, Mapping):
        raise SquadFormatError(f"{source}: {where}: paragraph should be an object, got {_describe_type(paragraph)}")
    context = _get(paragraph, "context", str, where, source)
    if not context.strip():
        raise SquadFormatError(f"{source}: {where}: empty context")
    qas = _get(paragraph, "qas", list, where, source)
    examples = (_parse_question(qa, title, context, f"{where} qas[{q}]", source, seen, bad)
                for q, qa in enumerate(qas))
    return [ex for ex in examples if ex is not None]


def _parse_question(qa: Any, title: str, context: str, where: str, source: str, seen: dict[str, str],
                    bad: Optional[list[str]] = None) -> Optional[Example]:
    """The question's Example; None when `bad` collects bad answers and none of its answers is usable."""
    if not isinstance(qa, Mapping):
        raise SquadFormatError(f"{source}: {where}: question should be an object, got {_describe_type(qa)}")
    qid = _get(qa, "id", str, where, source)
    where += f" (id {qid!r})"
    if qid in seen:
        raise SquadFormatError(f"{source}: {where}: duplicate id, first seen at {seen[qid]}")
    seen[qid] = where
    question = _get(qa, "question", str, where, source)
    # run_qa.py strips the left: long leading whitespace would eat the window; the right is dropped by
    # the tokenizer anyway.
    question = question.strip()
    if not question:
        raise SquadFormatError(f"{source}: {where}: empty question")
    impossible = bool(_get(qa, "is_impossible", bool, where, source, required=False))
    answers = _get(qa, "answers", list, where, source)
    if impossible and answers:
        raise SquadFormatError(f"{source}: {where}: is_impossible is true but it has {len(answers)} answers")
    texts, starts = [], []
    for k, answer in enumerate(answers):
        try:
            text, start = _parse_answer(answer, context, f"{where} answers[{k}]", source)
        except SquadFormatError as e:
            if bad is None:
                raise
            bad.append("dropped: " + str(e).split(": ", 1)[1])  # the place and the problem, not the file
            continue
        texts.append(text)
        starts.append(start)
    if answers and not texts:  # every answer was bad: nothing to train on (an empty list would mean v2.0 "no answer")
        bad[-1] = "skipped" + bad[-1][len("dropped"):]
        return None
    return Example(qid, title, question, context, tuple(texts), tuple(starts), impossible)


def _parse_answer(answer: Any, context: str, where: str, source: str) -> tuple[str, int]:
    if not isinstance(answer, Mapping):
        raise SquadFormatError(f"{source}: {where}: answer should be an object, got {_describe_type(answer)}")
    text = _get(answer, "text", str, where, source)
    start = _get(answer, "answer_start", int, where, source)
    if not text:
        raise SquadFormatError(f"{source}: {where}: empty answer text")
    end = start + len(text)
    if start < 0 or end > len(context):
        raise SquadFormatError(f"{source}: {where}: answer_start {start} + len({text!r}) = {end} is outside "
                               f"the context (length {len(context)})")
    if context[start:end] != text:
        raise SquadFormatError(f"{source}: {where}: answer text {text!r} does not match the context at "
                               f"answer_start {start}, which reads {context[start:end]!r}")
    return text, start


# =============================================================================================================
# Features
# =============================================================================================================


@dataclass
class Features:
    """Model inputs for N windows of T tokens, with what is needed to map predictions back to text.

    Rows of one example are consecutive. Training uses input_ids, token_type_ids, attention_mask and the
    start/end labels; evaluation uses offsets, token_is_max_context and example_index/example_ids.
    """

    input_ids: np.ndarray  # [N, T] int32
    token_type_ids: np.ndarray  # [N, T] int8
    attention_mask: np.ndarray  # [N, T] int8
    offsets: np.ndarray  # [N, T, 2] int32: character span in the example's context; -1 outside the context
    token_is_max_context: np.ndarray  # [N, T] bool: this window is the token's max-context window
    start_positions: np.ndarray  # [N] int32: answer start token, 0 ([CLS]) when the window lacks the answer
    end_positions: np.ndarray  # [N] int32: answer end token (inclusive), 0 likewise
    example_index: np.ndarray  # [N] int32: index into the examples list
    example_ids: np.ndarray  # [N] str: the example's id

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def context_mask(self) -> np.ndarray:
        """[N, T] bool: the token belongs to the context."""
        return self.offsets[..., 0] >= 0

    def select(self, indices: Union[Sequence[int], np.ndarray, slice]) -> "Features":
        """The rows at indices, as a new Features."""
        return Features(**{f.name: getattr(self, f.name)[indices] for f in fields(self)})

    def batch(self, indices: Union[Sequence[int], np.ndarray], pad_to_multiple_of: Optional[int] = 8
              ) -> dict[str, np.ndarray]:
        """Model inputs and labels (int32) for the rows at indices, trimmed to the batch's longest row.

        The trimmed width is rounded up to pad_to_multiple_of (None: no rounding, T: no trimming).
        """
        indices = np.asarray(indices)
        mask = self.attention_mask[indices]
        width = int(mask.sum(axis=1).max()) if len(indices) else 0
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        width = min(max(width, 1), self.seq_len)
        return {
            "input_ids": self.input_ids[indices, :width].astype(np.int32),
            "token_type_ids": self.token_type_ids[indices, :width].astype(np.int32),
            "attention_mask": mask[:, :width].astype(np.int32),
            "start_positions": self.start_positions[indices].astype(np.int32),
            "end_positions": self.end_positions[indices].astype(np.int32),
        }

    def save(self, path: PathLike) -> None:
        """Write an .npz (compressed: padding is most of it), atomically: a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, features_format=np.int32(FEATURES_FORMAT),
                                **{fl.name: getattr(self, fl.name) for fl in fields(self)})

    @classmethod
    def load(cls, path: PathLike) -> "Features":
        with np.load(path, allow_pickle=False) as z:
            if "features_format" not in z or int(z["features_format"]) != FEATURES_FORMAT:
                raise ValueError(f"{path}: features saved in another format (expected {FEATURES_FORMAT})")
            return cls(**{f.name: z[f.name] for f in fields(cls)})


def label_window(context_offsets: np.ndarray, start_char: int, end_char: int) -> Optional[tuple[int, int]]:
    """(first, last) context token of the answer [start_char, end_char) within one window, or None.

    context_offsets: [n, 2], the window's context tokens only. As run_qa.py: None unless the window covers
    the whole answer; else the last token starting at or before start_char and the first token ending at or
    after end_char. (run_qa.py scans on past the context into [SEP] and padding, whose (0, 0) offsets make it
    land on the last padding column when the answer starts in the window's last token; here it stays in the
    context.)
    """
    if len(context_offsets) == 0:
        return None
    if not (context_offsets[0, 0] <= start_char and context_offsets[-1, 1] >= end_char):
        return None
    first = int(np.searchsorted(context_offsets[:, 0], start_char, side="right")) - 1
    last = int(np.searchsorted(context_offsets[:, 1], end_char, side="left"))
    return first, last


def max_context_owner(window_starts: Sequence[int], window_lengths: Sequence[int], n_tokens: int) -> np.ndarray:
    """[n_tokens] int: for each context token, the window where it has the most context (original BERT).

    score(window, token) = min(tokens left of it, tokens right of it in the window) + 0.01 * window length;
    the highest score wins and ties go to the earlier window (BERT's `_check_is_max_context`).
    """
    pos = np.arange(n_tokens)
    best = np.full(n_tokens, -1, dtype=np.int64)
    best_score = np.full(n_tokens, -np.inf)
    for w, (start, length) in enumerate(zip(window_starts, window_lengths)):
        end = start + length - 1
        inside = (pos >= start) & (pos <= end)
        score = np.minimum(pos - start, end - pos) + 0.01 * length
        better = inside & (score > best_score)
        best[better] = w
        best_score[better] = score[better]
    return best


def _label_rows(enc, examples: Sequence[Example], pair_to_example: np.ndarray,
                cls_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Start/end labels per row (run_qa.py's prepare_train_features); the first answer is the label."""
    n = len(enc)
    starts = np.full(n, cls_index, dtype=np.int32)
    ends = np.full(n, cls_index, dtype=np.int32)
    for i in range(n):
        ex = examples[pair_to_example[enc.overflow_to_sample_mapping[i]]]
        if not ex.answers:
            continue
        c0, length = enc.context_offset[i], enc.window_length[i]
        start_char = ex.answer_starts[0]
        span = label_window(enc.offsets[i, c0:c0 + length], start_char, start_char + len(ex.answers[0]))
        if span is not None:
            starts[i], ends[i] = c0 + span[0], c0 + span[1]
    return starts, ends


def _max_context_rows(enc) -> np.ndarray:
    """[N, T] bool: token_is_max_context for every context token of every row."""
    flags = np.zeros(enc.input_ids.shape, dtype=bool)
    mapping = enc.overflow_to_sample_mapping
    # Rows of one pair are consecutive; the pair's windows together cover all its context tokens.
    bounds = np.flatnonzero(np.diff(mapping)) + 1
    for rows in np.split(np.arange(len(enc)), bounds):
        starts, lengths = enc.window_start[rows], enc.window_length[rows]
        n_tokens = int((starts + lengths).max())
        owner = max_context_owner(starts, lengths, n_tokens)
        for w, i in enumerate(rows):
            c0, s, length = enc.context_offset[i], starts[w], lengths[w]
            flags[i, c0:c0 + length] = owner[s:s + length] == w
    return flags


def _progress_bar(total: int, desc: str, progress: Optional[bool]):
    """A tqdm bar counting questions (progress=None: only when stderr is a terminal), or None."""
    if progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="question", disable=None if progress is None else False)


def build_features(
    examples: Sequence[Example],
    tokenizer: BertQATokenizer,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: Optional[int] = 64,
    padding: str = "max_length",
    pad_to_multiple_of: Optional[int] = 8,
    batch_size: int = 2000,
    progress: Optional[bool] = None,
) -> Features:
    """Tokenize examples into windowed, labelled features (run_qa.py prepare_train/validation_features).

    doc_stride: tokens shared by consecutive windows (run_qa.py's meaning). max_query_length: question
    tokens kept (None: all, as run_qa.py). padding="max_length" pads rows to max_seq_length; "longest" to the
    longest row of all features, rounded up to pad_to_multiple_of (Features.batch trims per mini-batch).
    progress: a tqdm bar (None: only when stderr is a terminal).
    """
    if padding not in ("max_length", "longest"):
        raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
    if max_seq_length > tokenizer.model_max_length:
        warnings.warn(f"max_seq_length {max_seq_length} is more than the model's {tokenizer.model_max_length} "
                      f"positions; using {tokenizer.model_max_length}")
        max_seq_length = tokenizer.model_max_length
    parts = []
    bar = _progress_bar(len(examples), "SQuAD features", progress)
    for lo in range(0, len(examples), batch_size):
        chunk = examples[lo:lo + batch_size]
        enc = tokenizer.encode_pairs(
            [ex.question for ex in chunk], [ex.context for ex in chunk],
            max_length=max_seq_length, stride=doc_stride, max_query_length=max_query_length)
        pair_to_example = np.arange(lo, lo + len(chunk))
        starts, ends = _label_rows(enc, examples, pair_to_example)
        example_index = pair_to_example[enc.overflow_to_sample_mapping].astype(np.int32)
        offsets = np.where((enc.sequence_ids == 1)[..., None], enc.offsets, -1).astype(np.int32)
        parts.append(Features(
            input_ids=enc.input_ids,
            token_type_ids=enc.token_type_ids.astype(np.int8),
            attention_mask=enc.attention_mask.astype(np.int8),
            offsets=offsets,
            token_is_max_context=_max_context_rows(enc),
            start_positions=starts,
            end_positions=ends,
            example_index=example_index,
            example_ids=np.array([examples[k].id for k in example_index], dtype=str),
        ))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    features = _concat_features(parts, max_seq_length)
    if padding == "longest":
        width = int(features.attention_mask.sum(axis=1).max()) if len(features) else 0
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        features = _trim(features, min(max(width, 1), max_seq_length))
    return features


def _concat_features(parts: list[Features], width: int) -> Features:
    if not parts:
        empty2 = np.zeros((0, width), dtype=np.int32)
        return Features(empty2, empty2.astype(np.int8), empty2.astype(np.int8),
                        np.zeros((0, width, 2), dtype=np.int32), empty2.astype(bool),
                        np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32), np.array([], dtype=str))
    return Features(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Features)})


def _trim(features: Features, width: int) -> Features:
    per_token = ("input_ids", "token_type_ids", "attention_mask", "offsets", "token_is_max_context")
    return Features(**{f.name: getattr(features, f.name)[:, :width] if f.name in per_token
                       else getattr(features, f.name) for f in fields(Features)})


# ---- cache --------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$BERTQA_CACHE_DIR, else ~/.cache/bertqa."""
    env = os.environ.get("BERTQA_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "bertqa"


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def features_cache_key(data_sha256: str, tokenizer: BertQATokenizer, **params: Any) -> str:
    """Hash of (data file, tokenizer, feature parameters, cache format)."""
    blob = json.dumps({"data": data_sha256, "tokenizer": tokenizer.fingerprint, "params": params,
                       "format": FEATURES_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_features(
    path: PathLike,
    tokenizer: BertQATokenizer,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: Optional[int] = 64,
    padding: str = "max_length",
    pad_to_multiple_of: Optional[int] = 8,
    cache_dir: Optional[PathLike] = None,
    use_cache: bool = True,
    progress: Optional[bool] = None,
    on_bad_answer: str = "raise",
) -> tuple[list[Example], Features]:
    """Examples and features of a SQuAD file, features cached as .npz under cache_dir (see default_cache_dir).

    The cache entry is keyed by the file's sha256, the tokenizer's fingerprint and the parameters, so an
    edited file or another vocabulary never reuses stale features.
    """
    examples = load_squad(path, on_bad_answer=on_bad_answer)
    params = dict(max_seq_length=max_seq_length, doc_stride=doc_stride, max_query_length=max_query_length,
                  padding=padding, pad_to_multiple_of=pad_to_multiple_of if padding == "longest" else None)
    build = lambda: build_features(examples, tokenizer, progress=progress, **params)  # noqa: E731
    if not use_cache:
        return examples, build()
    key = features_cache_key(file_sha256(path), tokenizer, **params)
    cache_path = Path(cache_dir or default_cache_dir()) / f"squad-features-{key[:40]}.npz"
    if cache_path.is_file():
        try:
            features = Features.load(cache_path)
            expected = [examples[k].id for k in features.example_index if k < len(examples)]
            if len(features) and np.array_equal(features.example_ids, np.array(expected, dtype=str)):
                return examples, features
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign cache entry: rebuild and overwrite it
    features = build()
    features.save(cache_path)
    return examples, features


# =============================================================================================================
# Post-processing: logits -> answer text
# =============================================================================================================


@dataclass
class SpanCandidate:
    """One answer span of one window: tokens start..end (inclusive), scored start_logit + end_logit."""

    feature: int
    start: int
    end: int
    score: float
    start_logit: float
    end_logit: float


def top_indices(logits: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest logits, largest first (the same ordering expression as utils_qa.py)."""
    return np.argsort(logits)[-1:-n - 1:-1]


def window_candidates(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    context_mask: np.ndarray,
    token_is_max_context: Optional[np.ndarray] = None,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    feature: int = 0,
) -> list[SpanCandidate]:
    """Valid spans among the n_best_size best starts x n_best_size best ends of one window, best first.

    Valid: start and end in the context, start <= end, at most max_answer_length tokens, and (when
    token_is_max_context is given) the start token has its max context in this window. Ties keep the
    start-major order of utils_qa.py.
    """
    starts = top_indices(start_logits, n_best_size)
    ends = top_indices(end_logits, n_best_size)
    s, e = np.meshgrid(starts, ends, indexing="ij")  # [n, n], start-major like utils_qa's nested loops
    s, e = s.ravel(), e.ravel()
    valid = context_mask[s] & context_mask[e] & (e >= s) & (e - s + 1 <= max_answer_length)
    if token_is_max_context is not None:
        valid &= token_is_max_context[s]
    s, e = s[valid], e[valid]
    scores = start_logits[s] + end_logits[e]
    order = np.argsort(-scores, kind="stable")
    return [SpanCandidate(feature, int(s[k]), int(e[k]), float(scores[k]), float(start_logits[s[k]]),
                          float(end_logits[e[k]])) for k in order]


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    max_answer_length: int = 30,
    context_mask: Optional[np.ndarray] = None,
    token_is_max_context: Optional[np.ndarray] = None,
    n_best_size: int = 20,
) -> Optional[SpanCandidate]:
    """The best valid span of one window (see window_candidates), or None when no candidate is valid.

    context_mask: [T] bool, True on context tokens (default: every token).
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if context_mask is None:
        context_mask = np.ones(start_logits.shape[0], dtype=bool)
    found = window_candidates(start_logits, end_logits, np.asarray(context_mask, dtype=bool),
                              token_is_max_context, n_best_size, max_answer_length)
    return found[0] if found else None


def softmax(scores: Sequence[float]) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    exp = np.exp(scores - scores.max())
    return exp / exp.sum()


@dataclass
class ExamplePrediction:
    """The answer to one example, its n-best list and (v2.0) null score minus best non-null score."""

    id: str
    text: str
    nbest: list[dict]  # {"text", "probability", "start_logit", "end_logit"}, best first
    null_score_diff: Optional[float] = None


def predict_example(
    example: Example,
    features: Features,
    rows: Sequence[int],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> ExamplePrediction:
    """utils_qa.py's per-example step: pool the windows' candidates, keep n-best, cut text by offsets.

    v2.0: the null score is the smallest [CLS] score over the windows (all must agree there is no answer);
    the answer is "" when null score - best non-null score > null_score_diff_threshold. When no span is
    valid at all (utils_qa answers "empty") the answer is "".
    """
    candidates: list[SpanCandidate] = []
    null: Optional[SpanCandidate] = None
    for i in rows:
        s_log, e_log = start_logits[i], end_logits[i]
        cls_score = float(s_log[0] + e_log[0])
        if null is None or cls_score < null.score:
            null = SpanCandidate(i, 0, 0, cls_score, float(s_log[0]), float(e_log[0]))
        context_mask = features.offsets[i, :, 0] >= 0
        candidates += window_candidates(s_log, e_log, context_mask, features.token_is_max_context[i],
                                        n_best_size, max_answer_length, feature=i)
    if version_2_with_negative and null is not None:
        candidates.append(null)
    candidates.sort(key=lambda c: c.score, reverse=True)  # stable: window order breaks ties, as utils_qa
    candidates = candidates[:n_best_size]
    if version_2_with_negative and null is not None and not any(c is null for c in candidates):
        candidates.append(null)

    texts = [("" if c is null else _span_text(example.context, features.offsets[c.feature], c))
             for c in candidates]
    probs = softmax([c.score for c in candidates])
    nbest = [{"text": t, "probability": float(p), "start_logit": c.start_logit, "end_logit": c.end_logit}
             for t, p, c in zip(texts, probs, candidates)]

    best_k = next((k for k, c in enumerate(candidates) if c is not null), None)
    best, text = (candidates[best_k], texts[best_k]) if best_k is not None else (None, "")
    if not version_2_with_negative:
        return ExamplePrediction(example.id, text, nbest)
    best_non_null = (best.start_logit + best.end_logit) if best is not None else -np.inf
    diff = float(null.score - best_non_null) if null is not None else -np.inf
    return ExamplePrediction(example.id, "" if diff > null_score_diff_threshold else text, nbest, diff)


def _span_text(context: str, offsets: np.ndarray, c: SpanCandidate) -> str:
    """Answer text straight from the original context: the start token's first to the end token's last char."""
    return context[offsets[c.start, 0]:offsets[c.end, 1]]


def example_predictions(
    examples: Sequence[Example],
    features: Features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    **kwargs: Any,
) -> Iterator[ExamplePrediction]:
    """predict_example for every example, in order; start/end_logits: [N, T] (T may be wider than needed)."""
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if start_logits.shape[0] != len(features) or end_logits.shape[0] != len(features):
        raise ValueError(f"{len(features)} features but logits of shapes {start_logits.shape} and "
                         f"{end_logits.shape}")
    width = features.seq_len
    start_logits, end_logits = start_logits[:, :width], end_logits[:, :width]
    rows_of = collections.defaultdict(list)
    for i, k in enumerate(features.example_index):
        rows_of[int(k)].append(i)
    for k, example in enumerate(examples):
        yield predict_example(example, features, rows_of.get(k, []), start_logits, end_logits, **kwargs)


def postprocess_predictions(
    examples: Sequence[Example],
    features: Features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
    return_nbest: bool = False,
) -> Union[dict[str, str], tuple[dict[str, str], dict[str, list[dict]]]]:
    """{example id: answer text} (and {id: n-best list} when return_nbest), as utils_qa.py."""
    answers: dict[str, str] = {}
    nbest: dict[str, list[dict]] = {}
    for pred in example_predictions(examples, features, start_logits, end_logits, n_best_size=n_best_size,
                                    max_answer_length=max_answer_length,
                                    version_2_with_negative=version_2_with_negative,
                                    null_score_diff_threshold=null_score_diff_threshold):
        answers[pred.id] = pred.text
        nbest[pred.id] = pred.nbest
    return (answers, nbest) if return_nbest else answers


# =============================================================================================================
# Metric: the official evaluate-v1.1.py and evaluate-v2.0.py
# =============================================================================================================

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace (official script)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Bag-of-tokens F1 of the normalised strings (v1.1: 0 when either is empty after normalising)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score_v2(prediction: str, ground_truth: str) -> float:
    """evaluate-v2.0.py's compute_f1: when either side is empty (no answer), 1 if both are, else 0."""
    pred_tokens = normalize_answer(prediction).split() if prediction else []
    gold_tokens = normalize_answer(ground_truth).split() if ground_truth else []
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    return f1_score(prediction, ground_truth)


def _dataset_articles(dataset: Union[PathLike, Mapping, list]) -> tuple[list, bool]:
    """(articles, is_v2) from a path, the parsed official dict, or its 'data' list."""
    version = ""
    if isinstance(dataset, (str, os.PathLike)):
        source = str(dataset)
        dataset = read_squad_json(dataset)
    else:
        source = "<dict>"
    if isinstance(dataset, Mapping):
        version = str(dataset.get("version", ""))
        dataset = dataset.get("data")
    if not isinstance(dataset, list):
        raise SquadFormatError(f"{source}: expected the official SQuAD dict with a 'data' list")
    is_v2 = version.lstrip("v").startswith("2") or any(
        "is_impossible" in qa for article in dataset for p in article.get("paragraphs", [])
        for qa in p.get("qas", []))
    return dataset, is_v2


def evaluate(
    dataset: Union[PathLike, Mapping, list],
    predictions: Mapping[str, str],
    version_2_with_negative: Optional[bool] = None,
) -> dict[str, float]:
    """Official SQuAD scores, ×100: {"exact_match", "f1"} (v1.1).

    v2.0 (detected from the file, or forced) uses evaluate-v2.0.py's definitions, and also returns its keys
    "exact", "total" and the "HasAns_*"/"NoAns_*" breakdown; "exact_match" is kept as an alias of "exact".
    An unanswered question scores 0 and counts in the totals, in both versions (evaluate-v2.0.py would skip it).
    """
    articles, is_v2 = _dataset_articles(dataset)
    if version_2_with_negative is None:
        version_2_with_negative = is_v2
    exact, f1, has_answer = {}, {}, {}
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qid = qa["id"]
                golds = [a["text"] for a in qa.get("answers", [])]
                has_answer[qid] = bool(golds)
                if version_2_with_negative:
                    golds = [g for g in golds if normalize_answer(g)]
                if qid not in predictions:
                    exact[qid], f1[qid] = 0.0, 0.0
                    continue
                pred = predictions[qid]
                if version_2_with_negative or not golds:
                    golds = golds or [""]  # for unanswerable questions only the empty string is right
                    exact[qid] = max(float(exact_match_score(pred, g)) for g in golds)
                    f1[qid] = max(f1_score_v2(pred, g) for g in golds)
                else:
                    exact[qid] = max(float(exact_match_score(pred, g)) for g in golds)
                    f1[qid] = max(f1_score(pred, g) for g in golds)
    result = _mean_scores(exact, f1, list(exact))
    out = {"exact_match": result["exact"], "f1": result["f1"]}
    if not version_2_with_negative:
        return out
    out.update(exact=result["exact"], total=result["total"])
    for name, keep in (("HasAns", True), ("NoAns", False)):
        ids = [q for q, h in has_answer.items() if h == keep]
        if ids:
            part = _mean_scores(exact, f1, ids)
            out.update({f"{name}_exact": part["exact"], f"{name}_f1": part["f1"], f"{name}_total": part["total"]})
    return out


def _mean_scores(exact: Mapping[str, float], f1: Mapping[str, float], ids: list[str]) -> dict[str, float]:
    total = len(ids)
    if total == 0:
        return {"exact": 0.0, "f1": 0.0, "total": 0}
    return {"exact": 100.0 * sum(exact[q] for q in ids) / total,
            "f1": 100.0 * sum(f1[q] for q in ids) / total, "total": total}
