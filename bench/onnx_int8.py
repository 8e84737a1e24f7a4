"""EM/F1 and speed of a fine-tuned model on a SQuAD file through bertqa's engine and through ONNX Runtime, fp32 and
int8 (dynamic quantisation of bertqa's own export), with the same windows, batches and post-processing.

    python bench/onnx_int8.py --model-dir runs/minilm-squad --validation_file ../shared/data/squad/valid.json
    python bench/onnx_int8.py --model-dir D --validation_file F --max_eval_samples 300     # a quicker slice

Systems: "bertqa" (the C engine), "ORT fp32" (bertqa's export fused by ORT's transformer optimizer), "ORT int8"
(``bertqa export onnx --fused --quantize int8``) and "ORT int8, unfused" (``--quantize int8`` of the standard
graph). ONNX Runtime runs with intra_op_num_threads = the cores and allow_spinning = 0. Windows are batched
longest first and trimmed to each batch's longest row (bertqa.train.predict_features), the same for every system.
Latency: one 384-token window (B=1), median of --reps calls. Needs bertqa[onnx].
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from bertqa import onnx as bq_onnx
from bertqa import ops
from bertqa.model import BertQA
from bertqa.squad import evaluate as squad_evaluate
from bertqa.squad import load_features, postprocess_predictions
from bertqa.train import examples_dataset, predict_features


class OrtQA:
    """BertQA.forward's interface over an ONNX Runtime session (logits after a row's last real token: -inf)."""

    def __init__(self, path, threads):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def forward(self, input_ids, attention_mask, token_type_ids):
        feed = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64),
                "token_type_ids": np.asarray(token_type_ids, np.int64)}
        return self.session.run(["start_logits", "end_logits"], feed)


def build_files(model, folder):
    """name -> ONNX file of each ORT system."""
    from onnxruntime.transformers.optimizer import optimize_model

    plain = bq_onnx.export(model, os.path.join(folder, "plain.onnx"))
    c = model.config
    opt = optimize_model(str(plain), model_type="bert", num_heads=c.num_attention_heads, hidden_size=c.hidden_size,
                         opt_level=0)
    stats = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    fp32 = os.path.join(folder, "fp32.onnx")
    opt.save_model_to_file(fp32)
    int8 = bq_onnx.export(model, os.path.join(folder, "int8.onnx"), fused=True, quantize="int8")
    int8_plain = bq_onnx.export(model, os.path.join(folder, "int8-plain.onnx"), quantize="int8")
    return {"ORT fp32": fp32, "ORT int8": str(int8), "ORT int8, unfused": str(int8_plain)}, stats


def latency(system, T, reps, vocab):
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, vocab, (1, T))
    mask = np.ones((1, T), np.int64)
    types = np.zeros((1, T), np.int64)
    types[:, 24:] = 1
    system.forward(ids, mask, types)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        system.forward(ids, mask, types)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", "--model_dir", required=True, help="a fine-tuned model folder")
    ap.add_argument("--validation_file", required=True)
    ap.add_argument("--max_eval_samples", type=int, default=None, help="the first N questions only")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    threads = os.cpu_count()
    import onnxruntime as ort

    info = ops.runtime_info()
    print(f"# {threads} CPUs, bertqa {info['omp_threads']} threads ({info['blas_config']}); onnxruntime "
          f"{ort.__version__}, {threads} intra-op threads, no spinning")
    model = BertQA.from_pretrained(args.model_dir)
    examples, features = load_features(args.validation_file, model.tokenizer, max_seq_length=384, doc_stride=128)
    if args.max_eval_samples:
        examples = examples[:args.max_eval_samples]
        features = features.select(np.flatnonzero(features.example_index < len(examples)))
    dataset = examples_dataset(examples)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bertqa-onnx-bench-") as folder:
        files, stats = build_files(model, folder)
        print(f"# ORT optimizer on bertqa's export: {stats}")
        systems = [("bertqa", model, None)] + [(name, OrtQA(path, threads), os.path.getsize(path))
                                               for name, path in files.items()]
        for name, system, size in systems:
            t0 = time.perf_counter()
            start, end = predict_features(system, features, args.batch_size)
            seconds = time.perf_counter() - t0
            preds = postprocess_predictions(examples, features, start, end, n_best_size=20, max_answer_length=30)
            m = squad_evaluate(dataset, preds)
            lat = latency(system, 384, args.reps, model.config.vocab_size)
            rows.append(dict(system=name, exact_match=m["exact_match"], f1=m["f1"], predict_seconds=seconds,
                             windows_per_second=len(features) / seconds, latency_ms_b1_t384=1e3 * lat,
                             file_mb=None if size is None else size / 1e6))
            print(f"  {name}: EM {m['exact_match']:.2f} F1 {m['f1']:.2f}, {seconds:.1f} s, B=1 T=384 "
                  f"{1e3 * lat:.1f} ms", file=sys.stderr)
    print(f"\n{len(examples)} questions, {len(features)} windows of {args.validation_file}; latency: one 384-token "
          f"window, median of {args.reps}\n")
    print("| system | EM | F1 | predict all (s) | windows/s | latency B=1, T=384 | file |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        size = "-" if r["file_mb"] is None else f"{r['file_mb']:.0f} MB"
        print(f"| {r['system']} | {r['exact_match']:.2f} | {r['f1']:.2f} | {r['predict_seconds']:.1f} | "
              f"{r['windows_per_second']:.1f} | {r['latency_ms_b1_t384']:.1f} ms | {size} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
