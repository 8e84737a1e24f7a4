"""ONNX export of a BertQA model, built with the `onnx` package from bertqa's own parameters (no torch).

    bertqa export onnx --model-dir out/squad --output model.onnx [--opset 17] [--fused] [--quantize int8]

    from bertqa import onnx as bq_onnx
    bq_onnx.export(model, "model.onnx")

The file has the interface optimum's BERT question-answering export has: inputs ``input_ids``,
``attention_mask``, ``token_type_ids`` (int64, [batch_size, sequence_length]), outputs ``start_logits``,
``end_logits`` (float32, [batch_size, sequence_length]), both axes dynamic. Its semantics are the engine's:
BERT's additive mask (1 - mask) * -10000 on the attention scores, exact erf GELU, LayerNorm with the config's
epsilon. Unlike ``BertQA.forward`` it computes logits for padding positions too (they are finite, and
meaningless).

The graph is laid out as torch.onnx exports transformers' BertForQuestionAnswering, op for op, so that ONNX
Runtime's transformer optimizer (``onnxruntime.transformers.optimizer.optimize_model(path, model_type="bert")``)
fuses all of it: one EmbedLayerNormalization, one Attention, two SkipLayerNormalization and one BiasGelu per
layer. The patterns it matches (onnxruntime/transformers/fusion_*.py) and the ones built here:

    embeddings   Gather(word, input_ids) + Gather(type, token_type_ids), + Gather(position, Slice(position_ids,
                 0, Shape(input_ids)[1])), LayerNormalization
    mask         Mul(Sub(1, Cast(Unsqueeze(Unsqueeze(attention_mask, 1), 2))), -10000)        [B, 1, 1, T]
    attention    q, k, v = MatMul + Add(bias) -> Reshape [0, 0, NH, HS] -> Transpose (k straight to [B,NH,HS,T]);
                 Softmax(Add(Div(MatMul(q, k), sqrt(HS)), mask)) @ v -> Transpose -> Reshape [0, 0, C]
    sub-layers   MatMul + Add(bias) + Add(residual) -> LayerNormalization
    GELU         x * 0.5 * (1 + Erf(x / sqrt(2))) right after the intermediate MatMul + Add(bias)

``fused=True`` writes those ``com.microsoft`` ops directly (a file only ONNX Runtime runs); its Attention takes
the per-row token count as its mask, so padding must be on the right (as bertqa's tokenizer pads). The base graph
is standard ONNX (opset 13 or newer; below 17 LayerNorm is spelt out in ReduceMean/Sub/Pow/Sqrt/Div, which the
optimizer folds back). ``quantize="int8"`` applies ONNX Runtime's dynamic quantisation (int8 weights of the
matrix products, activations quantised per call).

onnx (and, for ``quantize``, onnxruntime) are the optional extra ``bertqa[onnx]``; they are imported when an
export runs, never by ``import bertqa``. Files are written atomically: a failed export leaves no partial file.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from ._atomic import atomic_write
from .config import BertConfig

PathLike = Union[str, os.PathLike]
DEFAULT_OPSET = 17
MIN_OPSET = 13           # Unsqueeze / Squeeze / Split take their axes as inputs from 13 on
NATIVE_LAYERNORM_OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("start_logits", "end_logits")
MASK_FILTER = -10000.0   # BERT's additive mask value, the engine's too
QUANTIZE_CHOICES = ("int8",)
INSTALL_HINT = 'pip install "bertqa[onnx]"'


class ExportError(ValueError):
    """A model or an option that cannot be exported; the message names the file or option and the problem."""


class MissingExtraError(ImportError):
    """onnx / onnxruntime are not installed: they come with the optional extra bertqa[onnx]."""


def _require(module: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise MissingExtraError(f"{what} needs the {module.split('.')[0]} package, which is not installed "
                                f"({e}); install the extra: {INSTALL_HINT}") from None


# ---- the graph ---------------------------------------------------------------------------------------------


class _Graph:
    """Nodes and initializers of one graph, with unique names; ``op(...)`` returns the output name(s)."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers, self._count, self._shared = [], [], {}, {}

    def _name(self, base: str) -> str:
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return f"{base}_{n}" if n else base

    def const(self, name: str, value, dtype=None) -> str:
        """An initializer; small constants asked for again under the same name and value are shared."""
        arr = np.array(value, dtype=dtype, order="C")   # (not ascontiguousarray: it makes scalars 1-d)
        key = (name, arr.dtype.str, arr.shape, arr.tobytes()) if arr.size <= 16 else None
        if key in self._shared:
            return self._shared[key]
        unique = self._name(name)
        self.initializers.append(self.numpy_helper.from_array(arr, unique))
        if key is not None:
            self._shared[key] = unique
        return unique

    def op(self, op_type: str, inputs, n_out: int = 1, name: Optional[str] = None, domain: str = "",
           outputs=None, **attrs):
        node_name = self._name(name or op_type)
        outs = list(outputs) if outputs is not None else [f"{node_name}_out{i}" if n_out > 1 else f"{node_name}_out"
                                                          for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain or None,
                                                **attrs))
        return outs[0] if n_out == 1 else outs


def _tensors_of(model) -> tuple[BertConfig, Mapping[str, np.ndarray]]:
    config = getattr(model, "config", None)
    if not isinstance(config, BertConfig) or not hasattr(model, "state_dict"):
        raise TypeError(f"export: expected a bertqa BertQA model, got {type(model).__name__}")
    return config, model.state_dict()


def _check_opset(opset) -> int:
    onnx = _require("onnx", "ONNX export")
    latest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not MIN_OPSET <= opset <= latest:
        raise ExportError(f"opset must be an integer from {MIN_OPSET} to {latest} (the installed onnx "
                          f"{onnx.__version__}'s newest), got {opset!r}")
    return int(opset)


def build_model(config: BertConfig, tensors: Mapping[str, np.ndarray], opset: int = DEFAULT_OPSET,
                fused: bool = False, producer: str = "bertqa"):
    """The onnx.ModelProto of a BERT QA model with ``tensors`` (Hugging Face names, as BertQA.state_dict())."""
    onnx = _require("onnx", "ONNX export")
    from onnx import TensorProto, helper, numpy_helper

    opset = _check_opset(opset)
    missing = [n for n in ("qa_outputs.weight", "qa_outputs.bias") if n not in tensors]
    if missing:
        raise ExportError(f"no QA head ({', '.join(missing)}): export a question-answering model")
    C, NH = config.hidden_size, config.num_attention_heads
    HS, eps = C // NH, float(config.layer_norm_eps)
    g = _Graph(helper, numpy_helper)

    def w(name):                       # a parameter as float32, by its Hugging Face name
        return np.asarray(tensors[name], np.float32)

    def linear(x, prefix, base):       # x @ W^T (W stored [out, in]: the initializer holds W^T, as torch exports)
        return g.op("MatMul", [x, g.const(prefix + ".weight_T", w(prefix + ".weight").T)], name=base + "/MatMul")

    def add_bias(x, prefix, base):
        return g.op("Add", [x, g.const(prefix + ".bias", w(prefix + ".bias"))], name=base + "/Add")

    def layernorm(x, prefix, base):
        gamma, beta = g.const(prefix + ".weight", w(prefix + ".weight")), g.const(prefix + ".bias", w(prefix + ".bias"))
        if opset >= NATIVE_LAYERNORM_OPSET:
            return g.op("LayerNormalization", [x, gamma, beta], name=base, axis=-1, epsilon=eps)
        # (x - mean) / sqrt(var + eps) * gamma + beta, the form FusionLayerNormalization folds back
        mean = g.op("ReduceMean", [x], name=base + "/ReduceMean", axes=[-1])
        d = g.op("Sub", [x, mean], name=base + "/Sub")
        var = g.op("ReduceMean", [g.op("Pow", [d, g.const("two", 2.0, np.float32)], name=base + "/Pow")],
                   name=base + "/ReduceMean", axes=[-1])
        std = g.op("Sqrt", [g.op("Add", [var, g.const("eps", eps, np.float32)], name=base + "/Add")],
                   name=base + "/Sqrt")
        y = g.op("Div", [d, std], name=base + "/Div")
        return g.op("Add", [g.op("Mul", [y, gamma], name=base + "/Mul"), beta], name=base + "/Add")

    ids, mask, types = INPUT_NAMES
    emb = "bert.embeddings"
    if fused:
        ids32 = g.op("Cast", [ids], name="input_ids/Cast", to=TensorProto.INT32)
        types32 = g.op("Cast", [types], name="token_type_ids/Cast", to=TensorProto.INT32)
        mask32 = g.op("Cast", [mask], name="attention_mask/Cast", to=TensorProto.INT32)
        # outputs: the normalised embeddings [B, T, C] and the mask index (real tokens per row) [B]
        h, mask_index = g.op("EmbedLayerNormalization",
                             [ids32, types32, g.const(emb + ".word_embeddings.weight", w(emb + ".word_embeddings.weight")),
                              g.const(emb + ".position_embeddings.weight", w(emb + ".position_embeddings.weight")),
                              g.const(emb + ".token_type_embeddings.weight",
                                      w(emb + ".token_type_embeddings.weight")),
                              g.const(emb + ".LayerNorm.weight", w(emb + ".LayerNorm.weight")),
                              g.const(emb + ".LayerNorm.bias", w(emb + ".LayerNorm.bias")), mask32],
                             n_out=2, name="embeddings", domain="com.microsoft", epsilon=eps)
    else:
        word = g.op("Gather", [g.const(emb + ".word_embeddings.weight", w(emb + ".word_embeddings.weight")), ids],
                    name="embeddings/word/Gather")
        typ = g.op("Gather", [g.const(emb + ".token_type_embeddings.weight", w(emb + ".token_type_embeddings.weight")),
                              types], name="embeddings/token_type/Gather")
        # position ids 0..T-1 as BertEmbeddings slices them from its buffer: position_ids[:, :T]  [1, T]
        T = g.op("Gather", [g.op("Shape", [ids], name="embeddings/Shape"), g.const("one_i64", 1, np.int64)],
                 name="embeddings/seq_len/Gather")
        positions = g.op("Slice", [g.const(emb + ".position_ids",
                                           np.arange(config.max_position_embeddings, dtype=np.int64)[None]),
                                   g.const("zero_1d", [0], np.int64),
                                   g.op("Unsqueeze", [T, g.const("zero_1d", [0], np.int64)],
                                        name="embeddings/seq_len/Unsqueeze"),
                                   g.const("one_1d", [1], np.int64), g.const("one_1d", [1], np.int64)],
                         name="embeddings/position_ids/Slice")
        pos = g.op("Gather", [g.const(emb + ".position_embeddings.weight", w(emb + ".position_embeddings.weight")),
                              positions], name="embeddings/position/Gather")
        h = layernorm(g.op("Add", [g.op("Add", [word, typ], name="embeddings/Add"), pos], name="embeddings/Add"),
                      emb + ".LayerNorm", "embeddings/LayerNorm")
        # BERT's extended mask: (1 - mask) * -10000, [B, 1, 1, T], shared by every layer
        m = g.op("Unsqueeze", [g.op("Unsqueeze", [mask, g.const("one_1d", [1], np.int64)], name="mask/Unsqueeze"),
                               g.const("two_1d", [2], np.int64)], name="mask/Unsqueeze")
        m = g.op("Cast", [m], name="mask/Cast", to=TensorProto.FLOAT)
        m = g.op("Sub", [g.const("one_f32", 1.0, np.float32), m], name="mask/Sub")
        ext_mask = g.op("Mul", [m, g.const("mask_filter", MASK_FILTER, np.float32)], name="mask/Mul")

    if not fused:
        heads_shape = g.const("heads_shape", [0, 0, NH, HS], np.int64)    # [B, T, C] -> [B, T, NH, HS]
        hidden_shape = g.const("hidden_shape", [0, 0, C], np.int64)
        scale = g.const("sqrt_head_size", math.sqrt(HS), np.float32)
    for layer in range(config.num_hidden_layers):
        p, base = f"bert.encoder.layer.{layer}", f"layer.{layer}"
        if fused:
            # Attention's packed weight [C, 3C]: for each input row, q | k | v output columns
            qkv_w = np.concatenate([w(f"{p}.attention.self.{n}.weight").T for n in ("query", "key", "value")], axis=1)
            qkv_b = np.concatenate([w(f"{p}.attention.self.{n}.bias") for n in ("query", "key", "value")])
            ctx = g.op("Attention", [h, g.const(f"{p}.attention.qkv.weight", qkv_w),
                                     g.const(f"{p}.attention.qkv.bias", qkv_b), mask_index],
                       name=base + "/attention", domain="com.microsoft", num_heads=NH)
            out = linear(ctx, f"{p}.attention.output.dense", base + "/attention/output")
            h1 = g.op("SkipLayerNormalization",
                      [out, h, g.const(f"{p}.attention.output.LayerNorm.weight", w(f"{p}.attention.output.LayerNorm.weight")),
                       g.const(f"{p}.attention.output.LayerNorm.bias", w(f"{p}.attention.output.LayerNorm.bias")),
                       g.const(f"{p}.attention.output.dense.bias", w(f"{p}.attention.output.dense.bias"))],
                      name=base + "/attention/output/SkipLayerNorm", domain="com.microsoft", epsilon=eps)
            inter = g.op("BiasGelu", [linear(h1, f"{p}.intermediate.dense", base + "/intermediate"),
                                      g.const(f"{p}.intermediate.dense.bias", w(f"{p}.intermediate.dense.bias"))],
                         name=base + "/intermediate/BiasGelu", domain="com.microsoft")
            out = linear(inter, f"{p}.output.dense", base + "/output")
            h = g.op("SkipLayerNormalization",
                     [out, h1, g.const(f"{p}.output.LayerNorm.weight", w(f"{p}.output.LayerNorm.weight")),
                      g.const(f"{p}.output.LayerNorm.bias", w(f"{p}.output.LayerNorm.bias")),
                      g.const(f"{p}.output.dense.bias", w(f"{p}.output.dense.bias"))],
                     name=base + "/output/SkipLayerNorm", domain="com.microsoft", epsilon=eps)
            continue

        def heads(proj, perm):
            pre = f"{p}.attention.self.{proj}"
            y = add_bias(linear(h, pre, f"{base}/attention/self/{proj}"), pre, f"{base}/attention/self/{proj}")
            y = g.op("Reshape", [y, heads_shape], name=f"{base}/attention/self/{proj}/Reshape")
            return g.op("Transpose", [y], name=f"{base}/attention/self/{proj}/Transpose", perm=perm)

        q = heads("query", [0, 2, 1, 3])                  # [B, NH, T, HS]
        k = heads("key", [0, 2, 3, 1])                    # [B, NH, HS, T]
        v = heads("value", [0, 2, 1, 3])                  # [B, NH, T, HS]
        scores = g.op("Div", [g.op("MatMul", [q, k], name=f"{base}/attention/self/MatMul"), scale],
                      name=f"{base}/attention/self/Div")  # [B, NH, T, T]
        probs = g.op("Softmax", [g.op("Add", [scores, ext_mask], name=f"{base}/attention/self/Add")],
                     name=f"{base}/attention/self/Softmax", axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v], name=f"{base}/attention/self/MatMul")],
                   name=f"{base}/attention/self/Transpose", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, hidden_shape], name=f"{base}/attention/self/Reshape")   # [B, T, C]
        pre = f"{p}.attention.output.dense"
        out = add_bias(linear(ctx, pre, f"{base}/attention/output/dense"), pre, f"{base}/attention/output/dense")
        h1 = layernorm(g.op("Add", [out, h], name=f"{base}/attention/output/Add"), f"{p}.attention.output.LayerNorm",
                       f"{base}/attention/output/LayerNorm")
        pre = f"{p}.intermediate.dense"
        x = add_bias(linear(h1, pre, f"{base}/intermediate/dense"), pre, f"{base}/intermediate/dense")
        gb = f"{base}/intermediate/gelu"
        erf = g.op("Erf", [g.op("Div", [x, g.const("sqrt_two", math.sqrt(2.0), np.float32)], name=gb + "/Div")],
                   name=gb + "/Erf")
        x = g.op("Mul", [g.op("Mul", [x, g.const("half", 0.5, np.float32)], name=gb + "/Mul"),
                         g.op("Add", [erf, g.const("one_f32", 1.0, np.float32)], name=gb + "/Add")], name=gb + "/Mul")
        pre = f"{p}.output.dense"
        out = add_bias(linear(x, pre, f"{base}/output/dense"), pre, f"{base}/output/dense")
        h = layernorm(g.op("Add", [out, h1], name=f"{base}/output/Add"), f"{p}.output.LayerNorm",
                      f"{base}/output/LayerNorm")

    logits = add_bias(linear(h, "qa_outputs", "qa_outputs"), "qa_outputs", "qa_outputs")    # [B, T, 2]
    parts = g.op("Split", [logits, g.const("split_sizes", [1, 1], np.int64)], n_out=2, name="qa_outputs/Split",
                 axis=-1)
    for part, out_name in zip(parts, OUTPUT_NAMES):
        g.op("Squeeze", [part, g.const("minus_one_1d", [-1], np.int64)], name=f"{out_name}/Squeeze",
             outputs=[out_name])

    dims = ["batch_size", "sequence_length"]
    graph = helper.make_graph(
        g.nodes, "bertqa_question_answering",
        [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in INPUT_NAMES],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in OUTPUT_NAMES],
        initializer=g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    if fused:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    from ._version import __version__

    model = helper.make_model(graph, opset_imports=opsets, producer_name=producer, producer_version=__version__)
    # The oldest IR version that has these opsets: readable by the widest range of runtimes (a newer onnx
    # package would otherwise stamp its own, newer IR version, which deployed runtimes may refuse).
    model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    model.doc_string = (f"BERT question answering exported by bertqa {__version__}: hidden {C}, "
                        f"{config.num_hidden_layers} layers, {NH} heads" + (", fused com.microsoft ops" if fused else ""))
    if not fused:  # the checker does not know com.microsoft's schemas
        onnx.checker.check_model(model, full_check=False)
    return model


# ---- writing -----------------------------------------------------------------------------------------------


def _output_path(output: PathLike) -> Path:
    """The file to write: output itself, or output/model.onnx when output is a folder; its folder must exist or be
    creatable (checked before any work is done)."""
    out = Path(output).expanduser()
    if out.is_dir():
        out = out / "model.onnx"
    parent = out.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise ExportError(f"{out}: cannot write there: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ExportError(f"{out}: cannot write there: no write permission on {p}")
            break
    return out


def save_model(model_proto, output: PathLike, quantize: Optional[str] = None) -> Path:
    """Write an onnx.ModelProto atomically (optionally dynamically quantised: quantize="int8"); returns the path."""
    onnx = _require("onnx", "ONNX export")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} or None, got {quantize!r}")
    if quantize:
        quantization = _require("onnxruntime.quantization", "int8 quantisation")
    out = _output_path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if model_proto.ByteSize() >= 2**31 - 2**20:
        raise ExportError(f"{out}: the model is {model_proto.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB "
                          f"limit for one file (external-data files are not supported by this exporter)")
    with atomic_write(out) as tmp:
        if not quantize:
            onnx.save_model(model_proto, tmp)
        else:
            import tempfile

            with tempfile.TemporaryDirectory(prefix=".bertqa-onnx-", dir=out.parent) as work:
                fp32 = os.path.join(work, "fp32.onnx")
                onnx.save_model(model_proto, fp32)
                quantize_int8(fp32, tmp, quantization)
    return out


def quantize_int8(source: PathLike, target: PathLike, quantization=None) -> None:
    """ONNX Runtime's dynamic quantisation: int8 weights for the matrix products (MatMul, and the fused Attention's
    QKV projection), activations quantised per call; the embedding tables stay float32 (lookups, no arithmetic
    to gain). Note: the output runs in ONNX Runtime only (its integer kernels are com.microsoft ops)."""
    quantization = quantization or _require("onnxruntime.quantization", "int8 quantisation")
    from onnx import TensorProto

    # The quantizer logs a line per tensor (and advice for static quantisation) on the root logger: kept quiet.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        # DefaultTensorType: onnx's shape inference has no types for com.microsoft ops' outputs (the fused file)
        quantization.quantize_dynamic(str(source), str(target), weight_type=quantization.QuantType.QInt8,
                                      op_types_to_quantize=["MatMul", "Attention"],
                                      extra_options={"DefaultTensorType": TensorProto.FLOAT})
    finally:
        root.setLevel(level)


def export(model, path: PathLike, opset: int = DEFAULT_OPSET, fused: bool = False,
           quantize: Optional[str] = None) -> Path:
    """Export a BertQA model to an ONNX file (atomically); returns the path written.

    Args:
        model: a BertQA (any device; its parameters are read through state_dict()).
        path: the .onnx file to write (a folder: <folder>/model.onnx).
        opset: ONNX opset of the standard ops (13 or newer; 17, the default, has LayerNormalization).
        fused: write ONNX Runtime's fused com.microsoft ops (EmbedLayerNormalization, Attention,
            SkipLayerNormalization, BiasGelu) instead of standard ops; an ORT-only file.
        quantize: "int8" for ONNX Runtime's dynamic int8 quantisation (ORT-only), or None.
    """
    config, tensors = _tensors_of(model)
    _output_path(path)                 # a bad destination fails before the graph is built
    return save_model(build_model(config, tensors, opset=opset, fused=fused), path, quantize=quantize)


def export_pretrained(model_dir: PathLike, path: PathLike, opset: int = DEFAULT_OPSET, fused: bool = False,
                      quantize: Optional[str] = None) -> Path:
    """Export a saved QA model folder (config.json + weights) without starting the engine; returns the path.

    A checkpoint without a QA head (a base BertModel such as all-MiniLM-L6-v2) is refused: its head would be
    random. Fine-tune it first (bertqa finetune), or export a BertQA object with export()."""
    from .checkpoint import CONFIG_NAME, load_pretrained

    _require("onnx", "ONNX export")
    if quantize:
        _require("onnxruntime.quantization", "int8 quantisation")
    _check_opset(opset)
    _output_path(path)
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder (expected a folder with {CONFIG_NAME} and "
                                f"model.safetensors, as bertqa finetune or save_pretrained writes)")
    folder, config, tensors = load_pretrained(folder)
    if tensors.missing:
        raise ExportError(f"{folder}: not a question-answering checkpoint (no {', '.join(tensors.missing)}); "
                          f"fine-tune it first (bertqa finetune) and export that model folder")
    return save_model(build_model(config, tensors, opset=opset, fused=fused), path, quantize=quantize)


# ---- command line ------------------------------------------------------------------------------------------


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """`bertqa export onnx --model-dir DIR --output model.onnx`; the parser's func(args) returns an exit code."""
    p = subparsers.add_parser("export", help="export a model to another format (onnx)",
                              description="Export a fine-tuned model folder to another format.")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    o = formats.add_parser(
        "onnx", help="an ONNX file for ONNX Runtime, TensorRT, Triton (needs bertqa[onnx])",
        description="Write the model as an ONNX graph (inputs input_ids, attention_mask, token_type_ids; outputs "
                    "start_logits, end_logits; dynamic batch and sequence axes), built without torch. ONNX "
                    "Runtime's transformer optimizer fuses it completely. Needs the extra: " + INSTALL_HINT)
    o.add_argument("--model-dir", "--model_dir", required=True, help="model folder (bertqa finetune's output)")
    o.add_argument("--output", "-o", default="model.onnx", help="file to write (default: model.onnx)")
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} or newer (default: {DEFAULT_OPSET})")
    o.add_argument("--fused", action="store_true",
                   help="write ONNX Runtime's fused com.microsoft ops directly (the file runs in ONNX Runtime only)")
    o.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="dynamic int8 quantisation of the matrix products (ONNX Runtime only; with --fused, the "
                        "fastest file)")
    o.set_defaults(func=export_command)
    return p


def export_command(args: argparse.Namespace) -> int:
    try:
        out = export_pretrained(args.model_dir, args.output, opset=args.opset, fused=args.fused,
                                quantize=args.quantize)
    except (ExportError, MissingExtraError) as e:
        print(f"bertqa export: error: {e}", file=sys.stderr)
        return 2
    kind = ", ".join(k for k in ("fused" if args.fused else "", f"{args.quantize}" if args.quantize else "") if k)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB, opset {args.opset}" + (f", {kind}" if kind else ""))
    return 0
