"""Property-based pass over the loaders (issue 22, item 7): valid files mutated (truncated, bytes flipped or
spliced, sizes made huge, JSON replaced by arbitrary or deeply nested values) must either load or fail with the
loader's documented exception, one line naming the file, never another exception, and without allocating far
beyond the file's size (tracemalloc's peak, which sees NumPy's buffers too). Bounded for CI: a few seconds.
"""
import json
import os
import shutil
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bertqa import checkpoint as ck
from bertqa.config import BertConfig, ConfigError
from bertqa.tokenization import BertQATokenizer, TokenizerFilesError
from test_limits_loaders import tiny_config, write_tiny_model

# CI: 120 fixed examples per loader (derandomized: the same run every time). BERTQA_FUZZ_EXAMPLES=N runs N fresh
# random ones instead, for a longer search by hand.
_EXAMPLES = int(os.environ.get("BERTQA_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_EXAMPLES or 120, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=not _EXAMPLES, database=None)
TINY_BIN = Path(__file__).resolve().parent / "fixtures" / "tiny_bert" / "pytorch_model.bin"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("fuzz") / "model")


def mutate(data: bytes, draw) -> bytes:
    """One of: truncate, flip bytes, splice random bytes, overwrite 8 bytes with a huge little-endian number."""
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "huge"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    b = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            b[draw(st.integers(0, len(b) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "splice":
        at = draw(st.integers(0, len(b)))
        b[at:at + draw(st.integers(0, 16))] = draw(st.binary(max_size=32))
    else:
        at = draw(st.integers(0, max(len(b) - 8, 0)))
        b[at:at + 8] = struct.pack("<Q", draw(st.sampled_from([2 ** 31, 2 ** 32 + 1, 2 ** 62, 2 ** 64 - 1])))
    return bytes(b)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def check(load, path: Path, error: type, budget: int):
    """load() succeeds or raises `error` naming `path` in one line; tracemalloc's peak stays under budget."""
    tracemalloc.start()
    try:
        load()
    except error as e:
        msg = str(e)
        assert str(path) in msg and "\n" not in msg, msg
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < budget, f"{path}: peak allocation {peak} bytes for a file of {path.stat().st_size}"


# ---------------------------------------------------------------------- model.safetensors
@FUZZ
@given(data=st.data())
def test_fuzz_safetensors(model, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("st")
    path = folder / "model.safetensors"
    raw = (model / "model.safetensors").read_bytes()
    if data.draw(st.booleans()):
        raw = mutate(raw, data.draw)
    else:  # a new header, arbitrary or shaped like a safetensors entry with odd values
        entry = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "X"]) | json_values,
                                       "shape": st.lists(st.integers(-1, 2 ** 66), max_size=4) | json_values,
                                       "data_offsets": st.lists(st.integers(-1, 2 ** 66), max_size=3)})
        header = data.draw(st.dictionaries(st.sampled_from(list(ck.expected_shapes(tiny_config()))) | st.text(max_size=8),
                                           entry | json_values, max_size=6) | json_values)
        h = json.dumps(header).encode()
        if data.draw(st.booleans()):
            h = b"[" * data.draw(st.integers(500, 50_000)) + h
        raw = struct.pack("<Q", len(h)) + h + raw[8 + struct.unpack("<Q", raw[:8])[0]:]
    path.write_bytes(raw)
    config = data.draw(st.sampled_from([None, tiny_config()]))
    check(lambda: ck.load_state_dict(path, config), path, ck.CheckpointError, 10 * len(raw) + 2 ** 20)


# ---------------------------------------------------------------------- pytorch_model.bin
@FUZZ
@given(data=st.data())
def test_fuzz_torch_bin(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bin") / "pytorch_model.bin"
    raw = TINY_BIN.read_bytes()
    if data.draw(st.booleans()):
        path.write_bytes(mutate(raw, data.draw))  # the zip itself (most data changes fail its CRC)
    else:  # the pickle or a storage, re-zipped with valid CRCs so the unpickler sees the mutation
        with zipfile.ZipFile(TINY_BIN) as src, zipfile.ZipFile(path, "w") as dst:
            names = src.namelist()
            target = data.draw(st.sampled_from([n for n in names if n.endswith("data.pkl")] * 3 + names))
            for n in names:
                blob = src.read(n)
                dst.writestr(n, mutate(blob, data.draw) if n == target and blob else blob)
    check(lambda: ck.read_torch_bin(path), path, ck.CheckpointError, 10 * path.stat().st_size + 2 ** 20)


# ---------------------------------------------------------------------- config.json
@FUZZ
@given(data=st.data())
def test_fuzz_config(model, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    valid = json.loads((model / "config.json").read_text())
    how = data.draw(st.sampled_from(["bytes", "field", "any"]))
    if how == "bytes":
        raw = mutate((model / "config.json").read_bytes(), data.draw)
    elif how == "field":
        valid[data.draw(st.sampled_from(sorted(valid)))] = data.draw(json_values | st.integers(0, 2 ** 64))
        raw = json.dumps(valid).encode()
    else:
        raw = json.dumps(data.draw(json_values)).encode()
    path.write_bytes(raw)
    check(lambda: BertConfig.from_json_file(path), path, ConfigError, 2 ** 20 + 10 * len(raw))


# ---------------------------------------------------------------------- tokenizer files
@FUZZ
@given(data=st.data())
def test_fuzz_tokenizer_files(model, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("tok")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, folder / name)
    name = data.draw(st.sampled_from(["vocab.txt", "tokenizer.json", "tokenizer_config.json"]))
    if name == "vocab.txt":
        (folder / "tokenizer.json").unlink()
    path = folder / name
    if name == "tokenizer_config.json" and data.draw(st.booleans()):
        cfg = json.loads(path.read_text())
        cfg[data.draw(st.sampled_from(sorted(cfg) + ["model_max_length"]))] = data.draw(json_values)
        path.write_text(json.dumps(cfg))
    else:
        path.write_bytes(mutate(path.read_bytes(), data.draw))
    check(lambda: BertQATokenizer.from_pretrained(folder), path, TokenizerFilesError,
          2 ** 22 + 20 * path.stat().st_size)
