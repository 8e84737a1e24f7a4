"""Resource bounds of the loaders (issue 22, item 1): config.json, model.safetensors, pytorch_model.bin and the
tokenizer files. Each test is a malformed input that the loader used to accept, allocate gigabytes for, or fail
on with another exception than the documented one (ConfigError, CheckpointError, TokenizerFilesError), whose
one-line message names the file (and the field).
"""
import json
import pickle
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bertqa import checkpoint as ck
from bertqa import tokenization
from bertqa.config import BertConfig, ConfigError
from bertqa.tokenization import BertQATokenizer, TokenizerFilesError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "eiffel", "tower", "is", "in", "paris", "where",
         "?", ".", "##s"]


def tiny_config(**changes) -> BertConfig:
    d = dict(vocab_size=len(VOCAB), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=12, max_position_embeddings=16, type_vocab_size=2)
    d.update(changes)
    return BertConfig(**d)


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors + tokenizer files of a tiny random BERT-for-QA (a few KB)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    rng = np.random.default_rng(seed)
    config.save(folder)
    ck.save_state_dict({k: rng.standard_normal(s).astype(np.float32) for k, s in ck.expected_shapes(config).items()},
                       folder)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
    BertQATokenizer.from_vocab(folder / "vocab.txt", do_lower_case=True).save_pretrained(folder)
    return folder


def assert_one_line(e, path, *words):
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    assert len(msg) < 600, msg


def st_file(path, header: dict | bytes, data: bytes = b"") -> Path:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def torch_zip(path, pkl: bytes, records=None, prefix="archive/", compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr(prefix + "data.pkl", pkl)
        z.writestr(prefix + "byteorder", "little")
        for key, raw in (records or {}).items():
            z.writestr(f"{prefix}data/{key}", raw)
    return path


def _str(s):  # BINUNICODE
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(i):  # BININT
    return b"J" + struct.pack("<i", i)


def tensor_entries(tensors):
    """The body of a dict pickle: name -> _rebuild_tensor_v2(storage key, offset, size, stride) for each
    (name, key, numel, offset, size, stride), written opcode by opcode as torch pickles it."""
    tup = lambda xs: b"(" + b"".join(_int(x) for x in xs) + b"t"  # noqa: E731
    out = b""
    for name, key, numel, offset, size, stride in tensors:
        storage = (b"(" + _str("storage") + b"ctorch\nFloatStorage\n" + _str(key) + _str("cpu") + _int(numel)
                   + b"tQ")
        out += (_str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _int(offset) + tup(size)
                + tup(stride) + b"\x89}tR")
    return out


def tensors_pickle(tensors):
    return b"\x80\x02}(" + tensor_entries(tensors) + b"u."


# ====================================================================== config.json
BERT_LARGE = dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, max_position_embeddings=512, type_vocab_size=2)


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 10_000), ("hidden_size", 2 ** 20),
                                          ("num_attention_heads", 4096), ("intermediate_size", 10 ** 7),
                                          ("vocab_size", 10 ** 9), ("max_position_embeddings", 10 ** 7),
                                          ("type_vocab_size", 10 ** 6)])
def test_config_fields_have_upper_bounds(tmp_path, field, value):
    d = dict(BERT_LARGE, **{field: value})
    if field == "num_attention_heads":
        d["hidden_size"] = 8192  # divisible, within its own bound
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        BertConfig.from_json_file(path)
    assert_one_line(e, path, f"field '{field}'", "limit")


def test_config_bounds_admit_real_models_and_cap_the_total(tmp_path):
    BertConfig(**BERT_LARGE)
    BertConfig(**dict(BERT_LARGE, vocab_size=250002))  # XLM-R's vocabulary
    # Every field within its bound, together 128 x 8192 x 32768: 100 billion parameters.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(BERT_LARGE, num_hidden_layers=128, hidden_size=8192, num_attention_heads=64,
                                    intermediate_size=32768)))
    with pytest.raises(ConfigError) as e:
        BertConfig.from_json_file(path)
    assert_one_line(e, path, "field 'num_hidden_layers'", "parameters", "limit")


@pytest.mark.parametrize("raw, words", [
    (b'{"vocab_size": "\xff"}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"vocab_size": ' + b"7" * 5000 + b"}", "not valid JSON"),
])
def test_config_malformed_bytes_are_config_errors(tmp_path, raw, words):
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as e:
        BertConfig.from_json_file(path)
    assert_one_line(e, path, words)


def test_config_file_size_is_checked_before_reading(tmp_path, monkeypatch):
    from bertqa import config as config_module
    monkeypatch.setattr(config_module, "MAX_CONFIG_BYTES", 1000, raising=False)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(BERT_LARGE, id2label={str(i): f"label {i}" for i in range(200)})))
    with pytest.raises(ConfigError) as e:
        BertConfig.from_json_file(path)
    assert_one_line(e, path, "limit of 1000")


# ====================================================================== model.safetensors
ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, words", [
    ({"a": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 8]}}, "shape"),
    ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, "shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]}}, "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, "data_offsets"),
    ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, "dtype"),
    ({"a": {"dtype": "F32", "shape": [2] * 1000, "data_offsets": [0, 8]}}, "shape"),
    ({"a": [1, 2, 3]}, "'a'"),
    ({"a": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40, 0, 2 ** 70], "data_offsets": [0, 8]}}, "'a'"),
    ({"a": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 2 ** 84]}}, "whole file"),
    (b"[" * 100_000 + b"]" * 100_000, "corrupt safetensors header"),
    (b'{"a": ' + b"9" * 5000 + b"}", "corrupt safetensors header"),
    ({"a": ENTRY, "b": ENTRY}, "overlap"),
])
def test_safetensors_header_is_checked_before_anything_is_read(tmp_path, header, words):
    path = st_file(tmp_path / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(ck.CheckpointError) as e:
        ck.read_safetensors(path)
    assert_one_line(e, path, words)


def test_safetensors_overlapping_bf16_views_are_refused(tmp_path):
    # 200 BF16 tensors over the same 100 KB: read one by one they were 200 x 200 KB of float32.
    n = 50_000
    header = {f"cls.t{i}": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]} for i in range(200)}
    path = st_file(tmp_path / "model.safetensors", header, b"\0" * (2 * n))
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_state_dict(path)
    assert_one_line(e, path, "overlap")


def test_safetensors_tensor_count_is_bounded(tmp_path):
    header = {f"cls.x{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(ck.MAX_TENSORS + 1)}
    path = st_file(tmp_path / "model.safetensors", header)
    t0 = time.perf_counter()
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_state_dict(path)
    assert_one_line(e, path, "tensors", "limit")
    assert time.perf_counter() - t0 < 2.0


def test_safetensors_names_and_shapes_checked_against_config_before_reading(tmp_path, monkeypatch):
    import safetensors
    config = tiny_config()
    folder = write_tiny_model(tmp_path / "m")
    # Another config: the header's shapes disagree with it. Nothing may be read to find that out.
    wrong = tiny_config(hidden_size=16)

    def no_read(*a, **k):
        raise AssertionError("tensors were read before the header was checked against the config")
    monkeypatch.setattr(safetensors, "safe_open", no_read)
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_state_dict(folder, wrong)
    assert_one_line(e, folder / "model.safetensors", "shape mismatch")
    monkeypatch.undo()
    assert list(ck.load_state_dict(folder, config)) == list(ck.expected_shapes(config))


# ====================================================================== pytorch_model.bin
def test_pickle_memo_index_cannot_allocate(tmp_path):
    # LONG_BINPUT 0x3fffffff: CPython's unpickler grows its memo to twice the index (8 GB) before anything else.
    path = torch_zip(tmp_path / "pytorch_model.bin", b"\x80\x02}r\xff\xff\xff\x3f.")
    with pytest.raises(ck.CheckpointError) as e:
        ck.read_torch_bin(path)
    assert_one_line(e, path, "memo index")


def test_pickle_stride_zero_view_cannot_expand_a_storage(tmp_path):
    # 4 bytes of storage viewed as 20000 x 30000 with strides (0, 0): 2.4 GB once copied.
    path = torch_zip(tmp_path / "pytorch_model.bin",
                     tensors_pickle([("t", "0", 1, 0, (20000, 30000), (0, 0))]), {"0": b"\0" * 4})
    with pytest.raises(ck.CheckpointError) as e:
        ck.read_torch_bin(path)
    assert_one_line(e, path, "more elements than its storage")


def test_pickle_views_repeating_one_storage_are_refused(tmp_path):
    # 300 tensors, each the whole 256 KB storage: 300 copies of it.
    n = 65536
    pkl = tensors_pickle([(f"cls.t{i}", "0", n, 0, (n,), (1,)) for i in range(300)])
    path = torch_zip(tmp_path / "pytorch_model.bin", pkl, {"0": b"\0" * (4 * n)})
    with pytest.raises(ck.CheckpointError) as e:
        ck.read_torch_bin(path)
    assert_one_line(e, path, "more than twice")


def test_pickle_opcode_count_is_bounded(tmp_path):
    # A dict of 300,000 entries (1.7 MB of pickle): refused after MAX_PICKLE_OPS opcodes, in well under a second.
    body = b"".join(_str(f"k{i}") + b"N" for i in range(300_000))
    path = torch_zip(tmp_path / "pytorch_model.bin", b"\x80\x02}(" + body + b"u.")
    t0 = time.perf_counter()
    with pytest.raises(ck.CheckpointError) as e:
        ck.read_torch_bin(path)
    assert_one_line(e, path, "opcodes")
    assert time.perf_counter() - t0 < 2.0


def test_compressed_zip_member_is_refused_before_it_is_inflated(tmp_path):
    # 64 MB of zeros deflate to ~64 KB: the member declares more bytes than the whole file.
    n = 16 * 1024 * 1024
    path = torch_zip(tmp_path / "pytorch_model.bin", tensors_pickle([("t", "0", n, 0, (n,), (1,))]),
                     {"0": b"\0" * (4 * n)}, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ck.CheckpointError) as e:
        ck.read_torch_bin(path)
    assert_one_line(e, path, "more than the whole file")


def test_torch_bin_geometry_errors_name_the_file(tmp_path):
    path = torch_zip(tmp_path / "pytorch_model.bin", tensors_pickle([("t", "0", 4, 0, (2,), (-1,))]),
                     {"0": b"\0" * 16})
    with pytest.raises(ck.CheckpointError) as e:
        ck.read_torch_bin(path)
    assert_one_line(e, path, "geometry")


# ====================================================================== tokenizer files
def test_vocab_txt_that_is_not_utf8(tmp_path):
    folder = write_tiny_model(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.txt").write_bytes((folder / "vocab.txt").read_bytes() + b"caf\xe9\n")
    with pytest.raises(TokenizerFilesError) as e:
        BertQATokenizer.from_pretrained(folder)
    assert_one_line(e, folder / "vocab.txt", "UTF-8")


@pytest.mark.parametrize("name, limit", [("vocab.txt", "MAX_VOCAB_TXT_BYTES"),
                                         ("tokenizer.json", "MAX_TOKENIZER_JSON_BYTES"),
                                         ("tokenizer_config.json", "MAX_TOKENIZER_CONFIG_BYTES")])
def test_tokenizer_file_sizes_are_checked_before_reading(tmp_path, monkeypatch, name, limit):
    folder = write_tiny_model(tmp_path / "m")
    if name == "vocab.txt":
        (folder / "tokenizer.json").unlink()
    monkeypatch.setattr(tokenization, limit, 60, raising=False)
    with pytest.raises(TokenizerFilesError) as e:
        BertQATokenizer.from_pretrained(folder)
    assert_one_line(e, folder / name, "limit of 60")


@pytest.mark.parametrize("raw, words", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model_max_length": ' + b"5" * 5000 + b"}", "not valid JSON"),
    (b'{"do_lower_case": "yes"}', "field 'do_lower_case'"),
    (b'{"strip_accents": [1]}', "field 'strip_accents'"),
    (b'{"tokenize_chinese_chars": 2}', "field 'tokenize_chinese_chars'"),
])
@pytest.mark.parametrize("with_json", [True, False])
def test_tokenizer_config_malformed(tmp_path, raw, words, with_json):
    folder = write_tiny_model(tmp_path / "m")
    if not with_json:
        (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").write_bytes(raw)
    with pytest.raises(TokenizerFilesError) as e:
        BertQATokenizer.from_pretrained(folder)
    assert_one_line(e, folder / "tokenizer_config.json", words)


def test_vocab_without_special_tokens_names_the_file(tmp_path):
    folder = write_tiny_model(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerFilesError) as e:
        BertQATokenizer.from_pretrained(folder)
    assert_one_line(e, folder / "vocab.txt", "special tokens")


def test_tokenizer_json_without_special_tokens_names_the_file(tmp_path):
    folder = write_tiny_model(tmp_path / "m")
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["added_tokens"] = []
    tj["model"]["vocab"] = {"a": 0, "[UNK]": 1}
    tj["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TokenizerFilesError) as e:
        BertQATokenizer.from_pretrained(folder)
    assert_one_line(e, folder / "tokenizer.json", "special tokens")
