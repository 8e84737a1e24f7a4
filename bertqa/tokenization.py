"""WordPiece tokenization for BERT question answering, on Hugging Face `tokenizers` (Rust, fast).

`BertQATokenizer.from_pretrained(folder)` reads a checkpoint folder the way transformers' `BertTokenizerFast`
does: `tokenizer.json` when present, else `vocab.txt`, with lower-casing / accent stripping taken from
`tokenizer_config.json`. `save_pretrained(folder)` writes vocab.txt, tokenizer.json, tokenizer_config.json and
special_tokens_map.json, so the folder loads in `transformers.AutoTokenizer`.

`encode_pairs(questions, contexts, ...)` builds `[CLS] question [SEP] context window [SEP]` rows with the
sliding-window semantics of transformers' run_qa.py (`truncation="only_second"`, `return_overflowing_tokens`,
`stride=doc_stride`): when the context does not fit, it is cut into windows of
`L = max_length - len(question) - 3` tokens whose starts are `L - stride` apart (consecutive windows share
`stride` tokens), and the last window is the first one that reaches the end of the context. Unlike run_qa.py
it can also cut the question to `max_query_length` tokens, as the original BERT run_squad.py does.

Questions and contexts are tokenized separately (BERT's normalizer and pre-tokenizer see each sequence on its
own, so this gives the same tokens and offsets as tokenizing the pair) and each distinct context only once: a
SQuAD paragraph carries about five questions.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .config import LIMITS, read_json_file

SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
# BERT checkpoints were pretrained with 512 positions; used when tokenizer_config.json does not say.
DEFAULT_MODEL_MAX_LENGTH = 512
VOCAB_FILES = ("tokenizer.json", "vocab.txt")
# Sizes checked before a file is read. bert-base-uncased's vocab.txt is 232 KB and its tokenizer.json 466 KB for
# 30,522 tokens (8 and 16 bytes a token); the limits leave 4x room at the largest vocabulary bertqa.config.LIMITS
# allows (1,048,576 tokens). tokenizer_config.json / special_tokens_map.json are a few KB.
MAX_VOCAB_TXT_BYTES = 64 * 1024 * 1024
MAX_TOKENIZER_JSON_BYTES = 64 * 1024 * 1024
MAX_TOKENIZER_CONFIG_BYTES = 16 * 1024 * 1024


class TokenizerFilesError(FileNotFoundError):
    """A checkpoint folder lacks the files a tokenizer is built from, or they are unreadable."""


@dataclass
class PairEncoding:
    """Question/context pairs encoded as fixed-width rows, one row per context window.

    N rows (windows), T columns (max_length, or the padded batch length). Each input pair gives one or more
    consecutive rows; `overflow_to_sample_mapping[i]` is the index of the pair that row i came from.
    """

    input_ids: np.ndarray  # [N, T] int32
    token_type_ids: np.ndarray  # [N, T] int32: 0 for [CLS] question [SEP], 1 for context [SEP], 0 padding
    attention_mask: np.ndarray  # [N, T] int32: 1 for tokens, 0 for padding
    offsets: np.ndarray  # [N, T, 2] int32: character span in its own sequence; (0, 0) for special and padding
    sequence_ids: np.ndarray  # [N, T] int8: 0 question, 1 context, -1 special tokens and padding
    overflow_to_sample_mapping: np.ndarray  # [N] int32: input pair index of each row
    window_start: np.ndarray  # [N] int32: index of the row's first context token among the context's tokens
    window_length: np.ndarray  # [N] int32: number of context tokens in the row
    context_offset: np.ndarray  # [N] int32: column of the row's first context token (= question length + 2)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    """vocab.txt (one token per line, the line number is the id) -> {token: id}, as transformers reads it."""
    vocab: dict[str, int] = {}
    _check_size(Path(path), MAX_VOCAB_TXT_BYTES, "vocabulary file")
    try:
        with open(path, encoding="utf-8") as f:
            for index, line in enumerate(f):
                if index >= LIMITS["vocab_size"]:
                    raise TokenizerFilesError(f"{path}: more than {LIMITS['vocab_size']} tokens (the vocab_size "
                                              f"limit of bertqa.config.LIMITS)")
                vocab[line.rstrip("\n")] = index
    except UnicodeDecodeError as e:
        raise TokenizerFilesError(f"{path}: vocabulary file is not UTF-8 text ({e.reason})") from None
    if not vocab:
        raise TokenizerFilesError(f"{path}: vocabulary file is empty")
    return vocab


def vocab_looks_cased(vocab: Iterable[str]) -> bool:
    """True when more than 1% of the word pieces carry upper-case letters (a cased vocabulary).

    An uncased vocabulary (bert-base-uncased) has none besides its [SPECIAL] tokens and a stray symbol or two;
    a cased one (bert-base-cased) has thousands. Lower-casing text for a cased vocabulary would silently lose
    most capitalised words, so the default follows the vocabulary when tokenizer_config.json is silent.
    """
    words = [t for t in vocab if not (t.startswith("[") and t.endswith("]"))]
    upper = sum(1 for t in words if any(c.isupper() for c in t))
    return upper > 0.01 * max(len(words), 1)


def build_wordpiece_tokenizer(
    vocab: dict[str, int],
    do_lower_case: bool = True,
    strip_accents: Optional[bool] = None,
    tokenize_chinese_chars: bool = True,
) -> Tokenizer:
    """The same `tokenizers` pipeline transformers' BertTokenizerFast converter builds from a vocab.txt.

    strip_accents=None follows do_lower_case (BERT's convention).
    """
    missing = [t for t in SPECIAL_TOKENS.values() if t not in vocab]
    if missing:
        raise TokenizerFilesError(f"vocabulary lacks the BERT special tokens {missing}")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=tokenize_chinese_chars,
        strip_accents=strip_accents,
        lowercase=do_lower_case,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    # Marked special so that a literal "[SEP]" in user text maps to the special id, as in transformers.
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return tok


def _check_size(path: Path, limit: int, what: str) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise TokenizerFilesError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if size > limit:
        raise TokenizerFilesError(f"{path}: {what} of {size} bytes, more than the limit of {limit}")


# tokenizer_config.json keys that reach the normalizer: true, false or null (strip_accents only)
_CONFIG_FLAGS = {"do_lower_case": False, "strip_accents": True, "tokenize_chinese_chars": False}


def _read_json(path: Path) -> dict:
    data = read_json_file(path, MAX_TOKENIZER_CONFIG_BYTES, TokenizerFilesError, "tokenizer file")
    if not isinstance(data, dict):
        raise TokenizerFilesError(f"{path}: expected a JSON object, got {type(data).__name__}")
    for key, nullable in _CONFIG_FLAGS.items():
        if key in data and not (isinstance(data[key], bool) or (nullable and data[key] is None)):
            raise TokenizerFilesError(f"{path}: field '{key}' must be true or false"
                                      f"{' or null' if nullable else ''}, got {type(data[key]).__name__}")
    return data


def _override_normalizer(tok: Tokenizer, config: dict) -> None:
    """Apply tokenizer_config.json's casing keys to a tokenizer.json's BertNormalizer (transformers does too)."""
    keys = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
            "tokenize_chinese_chars": "handle_chinese_chars"}
    if tok.normalizer is None or not any(k in config for k in keys):
        return
    state = json.loads(tok.normalizer.__getstate__())
    if state.get("type") != "BertNormalizer":
        return
    changed = False
    for config_key, state_key in keys.items():
        if config_key in config and state.get(state_key) != config[config_key]:
            state[state_key] = config[config_key]
            changed = True
    if changed:
        state.pop("type")
        tok.normalizer = normalizers.BertNormalizer(**state)


def _one_line(e: BaseException, n: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[: n - 3] + "..."


class BertQATokenizer:
    """A BERT WordPiece tokenizer (fast, with character offsets) plus the pair windowing QA needs."""

    def __init__(self, tokenizer: Tokenizer, do_lower_case: bool = True,
                 model_max_length: int = DEFAULT_MODEL_MAX_LENGTH):
        # Checkpoints' tokenizer.json often carries truncation/padding presets (all-MiniLM: 128 tokens);
        # the windowing below needs whole sequences.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.do_lower_case = do_lower_case
        self.model_max_length = model_max_length
        ids = {name: tokenizer.token_to_id(tok) for name, tok in SPECIAL_TOKENS.items()}
        missing = [SPECIAL_TOKENS[n] for n, i in ids.items() if i is None]
        if missing:
            raise TokenizerFilesError(f"tokenizer vocabulary lacks the BERT special tokens {missing}")
        self.cls_token_id = ids["cls_token"]
        self.sep_token_id = ids["sep_token"]
        self.pad_token_id = ids["pad_token"]
        self.unk_token_id = ids["unk_token"]

    # ---- loading and saving -------------------------------------------------------------------------------

    @classmethod
    def from_vocab(cls, vocab_file: str | os.PathLike, do_lower_case: Optional[bool] = None,
                   strip_accents: Optional[bool] = None) -> "BertQATokenizer":
        """From a vocab.txt; do_lower_case=None means: lower-case unless the vocabulary looks cased."""
        vocab = read_vocab(vocab_file)
        if do_lower_case is None:
            do_lower_case = not vocab_looks_cased(vocab)
        try:
            tok = build_wordpiece_tokenizer(vocab, do_lower_case=do_lower_case, strip_accents=strip_accents)
            return cls(tok, do_lower_case=do_lower_case)
        except TokenizerFilesError as e:
            raise TokenizerFilesError(f"{vocab_file}: {e}") from None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "BertQATokenizer":
        """From a checkpoint folder: tokenizer.json if present, else vocab.txt (+ tokenizer_config.json)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise TokenizerFilesError(f"{folder}: not a directory (expected a checkpoint folder with "
                                      f"tokenizer.json or vocab.txt)")
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        max_len = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        # transformers writes a huge sentinel (int(1e30)) when a checkpoint has no limit.
        if not isinstance(max_len, int) or max_len > 10**6:
            max_len = DEFAULT_MODEL_MAX_LENGTH
        tok_json, vocab_txt = folder / "tokenizer.json", folder / "vocab.txt"
        if tok_json.is_file():
            _check_size(tok_json, MAX_TOKENIZER_JSON_BYTES, "tokenizer file")
            try:
                tok = Tokenizer.from_file(str(tok_json))
            except Exception as e:  # tokenizers raises a bare Exception on parse errors
                raise TokenizerFilesError(f"{tok_json}: cannot load tokenizer: {_one_line(e)}") from None
            except BaseException as e:  # a Rust panic comes up as pyo3_runtime.PanicException (a BaseException)
                if type(e).__name__ != "PanicException":
                    raise
                raise TokenizerFilesError(f"{tok_json}: cannot load tokenizer: {_one_line(e)}") from None
            _override_normalizer(tok, config)
            state = json.loads(tok.normalizer.__getstate__()) if tok.normalizer is not None else {}
            do_lower_case = bool(state.get("lowercase", config.get("do_lower_case", True)))
            try:
                return cls(tok, do_lower_case=do_lower_case, model_max_length=max_len)
            except TokenizerFilesError as e:
                raise TokenizerFilesError(f"{tok_json}: {e}") from None
        if vocab_txt.is_file():
            self = cls.from_vocab(vocab_txt, do_lower_case=config.get("do_lower_case"),
                                  strip_accents=config.get("strip_accents"))
            self.model_max_length = max_len
            return self
        present = sorted(p.name for p in folder.iterdir())
        raise TokenizerFilesError(
            f"{folder}: no tokenizer files: expected one of {list(VOCAB_FILES)}; the folder holds {present}")

    def save_pretrained(self, folder: str | os.PathLike) -> list[Path]:
        """Write vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json into folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = self.tokenizer.get_vocab(with_added_tokens=False)
        tokens = sorted(vocab, key=vocab.__getitem__)
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError("vocabulary ids are not 0..n-1; cannot write a vocab.txt")
        state = json.loads(self.tokenizer.normalizer.__getstate__()) if self.tokenizer.normalizer else {}
        config = {
            "do_lower_case": self.do_lower_case,
            "strip_accents": state.get("strip_accents"),
            "tokenize_chinese_chars": state.get("handle_chinese_chars", True),
            "model_max_length": self.model_max_length,
            "tokenizer_class": "BertTokenizer",
            "clean_up_tokenization_spaces": True,
            **SPECIAL_TOKENS,
        }
        files = {
            "vocab.txt": "".join(t + "\n" for t in tokens),
            "tokenizer.json": self.tokenizer.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(SPECIAL_TOKENS, indent=2) + "\n",
        }
        written = []
        for name, text in files.items():
            path = folder / name
            tmp = path.with_name(f".{name}.tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            written.append(path)
        return written

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer (vocabulary, normalizer, ...): a cache key part."""
        return hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # ---- encoding --------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of one text, without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def encode_texts(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids [n] int32, offsets [n, 2] int32) per text, no special tokens; one batched (parallel) call."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for enc in encodings:
            ids = np.asarray(enc.ids, dtype=np.int32)
            offsets = np.asarray(enc.offsets, dtype=np.int32).reshape(len(ids), 2)
            out.append((ids, offsets))
        return out

    def encode_pairs(
        self,
        questions: Sequence[str],
        contexts: Sequence[str],
        max_length: int = 384,
        stride: int = 128,
        max_query_length: Optional[int] = None,
        padding: str = "max_length",
        pad_to_multiple_of: Optional[int] = None,
    ) -> PairEncoding:
        """Encode question/context pairs, cutting only the context, into overlapping windows.

        stride: tokens shared by consecutive windows (transformers' meaning, run_qa.py's --doc_stride).
        max_query_length: cut questions to this many tokens first (original BERT); None keeps them whole
            (run_qa.py), and a question too long to leave room for `stride + 1` context tokens is an error.
        padding: "max_length" pads every row to max_length; "longest" to the longest row of this batch,
            rounded up to pad_to_multiple_of when given.
        """
        if len(questions) != len(contexts):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        if stride < 0 or max_length < 4:
            raise ValueError(f"need stride >= 0 and max_length >= 4, got stride={stride}, max_length={max_length}")
        question_enc = self.encode_texts(questions)
        unique_contexts = list(dict.fromkeys(contexts))
        context_index = {c: i for i, c in enumerate(unique_contexts)}
        context_enc = self.encode_texts(unique_contexts)

        rows = []  # (pair index, question ids/offsets, context ids/offsets, window start, window length)
        for pair, (q_ids, q_off) in enumerate(question_enc):
            if max_query_length is not None:
                q_ids, q_off = q_ids[:max_query_length], q_off[:max_query_length]
            c_ids, c_off = context_enc[context_index[contexts[pair]]]
            room = max_length - len(q_ids) - 3
            for start, length in context_windows(len(c_ids), room, stride, pair):
                rows.append((pair, q_ids, q_off, c_ids, c_off, start, length))

        width = max_length
        if padding == "longest":
            width = max((len(r[1]) + r[6] + 3 for r in rows), default=0)
            if pad_to_multiple_of:
                width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        return self._fill_rows(rows, width)

    def _fill_rows(self, rows: list, width: int) -> PairEncoding:
        """Lay out `[CLS] q [SEP] c[start:start+length] [SEP]` rows into padded arrays."""
        n = len(rows)
        input_ids = np.full((n, width), self.pad_token_id, dtype=np.int32)
        token_type_ids = np.zeros((n, width), dtype=np.int32)
        attention_mask = np.zeros((n, width), dtype=np.int32)
        offsets = np.zeros((n, width, 2), dtype=np.int32)
        sequence_ids = np.full((n, width), -1, dtype=np.int8)
        mapping = np.empty(n, dtype=np.int32)
        window_start = np.empty(n, dtype=np.int32)
        window_length = np.empty(n, dtype=np.int32)
        context_offset = np.empty(n, dtype=np.int32)
        for i, (pair, q_ids, q_off, c_ids, c_off, start, length) in enumerate(rows):
            nq = len(q_ids)
            c0 = nq + 2  # column of the first context token
            end = c0 + length  # column of the final [SEP]
            input_ids[i, 0] = self.cls_token_id
            input_ids[i, 1:c0 - 1] = q_ids
            input_ids[i, c0 - 1] = self.sep_token_id
            input_ids[i, c0:end] = c_ids[start:start + length]
            input_ids[i, end] = self.sep_token_id
            token_type_ids[i, c0:end + 1] = 1
            attention_mask[i, :end + 1] = 1
            offsets[i, 1:c0 - 1] = q_off
            offsets[i, c0:end] = c_off[start:start + length]
            sequence_ids[i, 1:c0 - 1] = 0
            sequence_ids[i, c0:end] = 1
            mapping[i], window_start[i], window_length[i], context_offset[i] = pair, start, length, c0
        return PairEncoding(input_ids, token_type_ids, attention_mask, offsets, sequence_ids, mapping,
                            window_start, window_length, context_offset)


def context_windows(n_tokens: int, room: int, stride: int, pair: int = 0) -> list[tuple[int, int]]:
    """(start, length) of each window over n_tokens context tokens, `room` tokens per window.

    The same cut as `tokenizers`' Encoding.truncate with overflow: starts 0, room-stride, 2(room-stride), ...
    and the first window that reaches the end is the last.
    """
    if n_tokens <= room:
        return [(0, n_tokens)]
    if room <= stride:
        raise ValueError(
            f"pair {pair}: the question leaves {max(room, 0)} context tokens per window, not more than the "
            f"stride {stride}; cut the question (max_query_length) or raise max_length")
    step = room - stride
    windows = []
    start = 0
    while True:
        stop = min(start + room, n_tokens)
        windows.append((start, stop - start))
        if stop == n_tokens:
            return windows
        start += step
