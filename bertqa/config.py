"""BERT model configuration: the fields of a Hugging Face ``config.json`` that the engine needs.

``BertConfig.from_json_file("folder/config.json")`` reads and validates; ``config.save(folder)`` writes a
``config.json`` that ``transformers.BertForQuestionAnswering.from_pretrained`` accepts. Keys the engine does
not use (``_name_or_path``, ``transformers_version``, ``use_cache`` ...) are kept in ``extra`` so that a
round trip through config.json loses nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ._atomic import atomic_write
from typing import Any

# Defaults are those of transformers.BertConfig (bert-base-uncased), so a config.json that omits a key
# means what it means to transformers.
_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "max_position_embeddings", "type_vocab_size")
_PROB_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")

# Upper bounds on the sizes a config.json may ask for, so that a mistyped or hostile file fails with the field
# named before anything is allocated. BERT-large is L=24, H=1024, NH=16, I=4096, V=30522, P=512, TV=2 (335M
# parameters); each bound is several times the largest value a BERT-family checkpoint is known to use (layers,
# hidden and intermediate sizes: 4-8x BERT-large; vocab_size: 4x XLM-R's 250,002; positions: 16x BERT's 512;
# type_vocab_size: BERT uses 2), and MAX_PARAMETERS (6x BERT-large, 8 GB of float32) bounds them together.
# To load a larger model, raise them before loading: ``bertqa.config.LIMITS["vocab_size"] = 2_000_000``.
LIMITS = {
    "num_hidden_layers": 128,
    "hidden_size": 8192,
    "num_attention_heads": 128,
    "intermediate_size": 32768,
    "vocab_size": 1_048_576,
    "max_position_embeddings": 8192,
    "type_vocab_size": 256,
    "parameters": 2_000_000_000,
}
# config.json is a few KB; a label map (id2label) can make it a few MB.
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def count_parameters(V: int, P: int, TV: int, H: int, L: int, I: int) -> int:
    """float32 elements of a BertForQuestionAnswering (checkpoint.expected_shapes summed), from the sizes alone."""
    embeddings = (V + P + TV) * H + 2 * H
    layer = 4 * (H * H + H) + 2 * H + (I * H + I) + (H * I + H) + 2 * H
    return embeddings + L * layer + 2 * H + 2


def read_json_file(path: Path, max_bytes: int, error: type, what: str = "JSON file"):
    """Parsed JSON of ``path``, refusing a file over ``max_bytes`` before reading it; every failure (size, bytes
    that are not UTF-8, bad JSON, nesting too deep, numbers too long) is ``error`` with one line naming the file."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {what} of {size} bytes, more than the limit of {max_bytes}")
        with open(path, "rb") as f:
            data = f.read(size + 1)  # not max_bytes + 1: read() allocates what it is asked for up front
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if len(data) > size:  # grew since stat
        raise error(f"{path}: {what} changed while it was read")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # integers of more than sys.get_int_max_str_digits() digits
        raise error(f"{path}: not valid JSON ({e})") from None


class ConfigError(ValueError):
    """A config.json that the engine cannot run; the message names the file and the field."""


@dataclass
class BertConfig:
    """Shape and hyper-parameters of a BERT encoder (Hugging Face ``BertConfig`` names).

    H = hidden_size, NH = num_attention_heads, HS = H // NH, L = num_hidden_layers, I = intermediate_size.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    @property
    def head_size(self) -> int:
        """HS = H / NH, the width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "BertConfig":
        """Build from a config.json dictionary; unknown keys go to ``extra``. ``source`` names the origin in errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        config = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.name != "extra":
                setattr(config, f.name, known.get(f.name, f.default))
        config.extra = extra
        config.validate(source)
        return config

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "BertConfig":
        """Read ``path`` (a config.json, or a folder holding one) and validate it."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        d = read_json_file(path, MAX_CONFIG_BYTES, ConfigError, "config file")
        return cls.from_dict(d, source=str(path))

    # ---------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        """All fields plus ``extra``, as config.json holds them."""
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write config.json (``path`` is a folder, or the file itself) atomically; returns the file's path.

        architectures/model_type say BertForQuestionAnswering so transformers builds the QA model from it.
        """
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "config.json"
        d = self.to_dict()
        d["architectures"] = ["BertForQuestionAnswering"]
        d["model_type"] = "bert"
        text = json.dumps(dict(sorted(d.items())), indent=2) + "\n"
        with atomic_write(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        return path

    # ---------------------------------------------------------------- checking
    def validate(self, source: str = "<BertConfig>") -> None:
        """Raise ConfigError naming ``source`` and the field for anything the engine cannot run."""
        def bad(name, why):
            raise ConfigError(f"{source}: field '{name}' {why}")

        for name in _INT_FIELDS:
            v = getattr(self, name)
            # bool is an int subclass; "true" as a size is a broken file, not 1.
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, f"must be a positive integer, got {_short(v)}")
            if v > LIMITS[name]:
                bad(name, f"is {v}, more than the limit of {LIMITS[name]} (bertqa.config.LIMITS; raise it there "
                          f"for a larger model)")
        if not isinstance(self.pad_token_id, int) or isinstance(self.pad_token_id, bool) \
                or not 0 <= self.pad_token_id < self.vocab_size:
            bad("pad_token_id", f"must be an integer in [0, vocab_size={self.vocab_size}), "
                                f"got {_short(self.pad_token_id)}")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"({self.hidden_size}) must be divisible by num_attention_heads "
                               f"({self.num_attention_heads})")
        n = count_parameters(self.vocab_size, self.max_position_embeddings, self.type_vocab_size,
                             self.hidden_size, self.num_hidden_layers, self.intermediate_size)
        if n > LIMITS["parameters"]:
            fields = ", ".join(f"{k}={getattr(self, k)}" for k in _INT_FIELDS)
            bad("num_hidden_layers", f"and the other sizes ({fields}) make {n} parameters, more than the limit of "
                                     f"{LIMITS['parameters']} (bertqa.config.LIMITS['parameters'])")
        # The engine implements the exact erf GELU, which is what transformers calls "gelu"; the tanh
        # approximations ("gelu_new", "gelu_pytorch_tanh") and other activations would silently differ.
        if self.hidden_act != "gelu":
            bad("hidden_act", f"must be \"gelu\" (exact erf GELU, the only activation the engine implements), "
                              f"got {_short(self.hidden_act)}")
        for name in _PROB_FIELDS:
            v = getattr(self, name)
            if not _is_real(v) or not 0.0 <= v < 1.0:
                bad(name, f"must be a number in [0, 1), got {_short(v)}")
        if not _is_real(self.layer_norm_eps) or not self.layer_norm_eps > 0:
            bad("layer_norm_eps", f"must be a positive number, got {_short(self.layer_norm_eps)}")
        if not _is_real(self.initializer_range) or not self.initializer_range > 0:
            bad("initializer_range", f"must be a positive number, got {_short(self.initializer_range)}")
        # Relative position embeddings add tensors and change attention; the engine has absolute ones only.
        pet = self.extra.get("position_embedding_type", "absolute")
        if pet != "absolute":
            bad("position_embedding_type", f"must be \"absolute\" (the only kind the engine implements), "
                                           f"got {_short(pet)}")


def _short(v, n: int = 80) -> str:
    """repr of a value from a file, cut to n characters so that an error stays one short line."""
    try:
        r = repr(v)
    except ValueError:  # an int of more digits than repr allows
        r = f"<{type(v).__name__}>"
    r = r.replace("\n", "\\n")
    return r if len(r) <= n else r[: n - 3] + "..."


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
