"""The same SQuAD fine-tuning recipe in bertqa and in PyTorch + transformers, in one run: EM/F1 and time.

    python bench/finetune_reference.py --max_train_samples 1500 --max_eval_samples 1000   # torch + transformers needed

Both sides start from the very same weights and see the same batches in the same order:
  - bertqa: `python -m bertqa finetune ...` (the real command line, run as a subprocess; printed);
  - reference: transformers.BertForQuestionAnswering loaded from the initial weights bertqa uses (the
    checkpoint, plus the QA head bertqa initialises from --seed, saved with save_pretrained), trained by a
    plain PyTorch loop: torch.optim.AdamW (weight decay on weights only: not on biases and LayerNorm),
    transformers' get_linear_schedule_with_warmup, torch.nn.utils.clip_grad_norm_, the model's own loss and
    dropout (torch's RNG, seeded with --seed: the masks differ from bertqa's), in float32 on the CPU.
  - data: bertqa.squad's features (checked token for token against run_qa.py's by
    tests/fixtures/check_features_vs_hf.py) and bertqa.train's epoch order and batch trimming; evaluation by
    bertqa.train.evaluate_model (n-best, max-context, official SQuAD metric) on each side's logits.

Writes OUTPUT_DIR/bertqa (the bertqa run) and OUTPUT_DIR/reference.json (both sides' figures and loss curves)
and prints a table. torch and transformers are needed here only; they are not bertqa dependencies.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bertqa.train import (LOG_NAME, TrainingArguments, TrainPlan, data_rng_state, epoch_order,  # noqa: E402
                          evaluate_model, load_split, read_log)

DATA = Path(os.environ.get("BERTQA_DATA_DIR", ROOT.parent / "shared" / "data"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", default="all-MiniLM-L6-v2")
    p.add_argument("--train_file", default=str(DATA / "squad" / "train.json"))
    p.add_argument("--validation_file", default=str(DATA / "squad" / "valid.json"))
    p.add_argument("--output_dir", default="runs/finetune-reference")
    p.add_argument("--max_seq_length", type=int, default=384)
    p.add_argument("--doc_stride", type=int, default=128)
    p.add_argument("--per_device_train_batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--num_train_epochs", type=float, default=1.0)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--layerwise_lr_decay", type=float, default=1.0,
                   help="per-tensor lr = lr * bertqa.model.layerwise_lr_scale (torch: one parameter group per tensor)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_train_samples", type=int, default=1500)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--skip_bertqa", action="store_true", help="reuse OUTPUT_DIR/bertqa from an earlier run")
    p.add_argument("--reference_loss", choices=("transformers", "real_tokens"), default="transformers",
                   help="the reference's span loss: BertForQuestionAnswering's own (its softmax includes the batch's "
                        "padding; default), or bertqa's (each row's softmax over its real tokens)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (bertqa: OpenMP)")
    return p.parse_args(argv)


def bertqa_command(a) -> list[str]:
    cmd = [sys.executable, "-m", "bertqa", "finetune", "--model_name_or_path", a.model_name_or_path,
           "--train_file", a.train_file, "--validation_file", a.validation_file,
           "--output_dir", str(Path(a.output_dir) / "bertqa"), "--overwrite_output_dir",
           "--max_seq_length", str(a.max_seq_length), "--doc_stride", str(a.doc_stride),
           "--per_device_train_batch_size", str(a.per_device_train_batch_size),
           "--learning_rate", str(a.learning_rate), "--num_train_epochs", str(a.num_train_epochs),
           "--warmup_ratio", str(a.warmup_ratio), "--layerwise_lr_decay", str(a.layerwise_lr_decay),
           "--seed", str(a.seed), "--max_train_samples", str(a.max_train_samples),
           "--logging_steps", str(a.logging_steps), "--save_steps", "0"]
    if a.max_eval_samples is not None:
        cmd += ["--max_eval_samples", str(a.max_eval_samples)]
    return cmd


class TorchQA:
    """model.forward(input_ids, attention_mask, token_type_ids) -> (start, end) float32 NumPy, as bertqa's."""

    def __init__(self, model, torch):
        self.model, self.torch = model, torch

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        t = self.torch
        self.model.eval()
        with t.inference_mode():
            out = self.model(input_ids=t.from_numpy(np.asarray(input_ids, np.int64)),
                             attention_mask=t.from_numpy(np.asarray(attention_mask, np.int64)),
                             token_type_ids=t.from_numpy(np.asarray(token_type_ids, np.int64)))
        return out.start_logits.float().numpy(), out.end_logits.float().numpy()


def run_reference(a, args: TrainingArguments, out: Path) -> dict:
    import torch
    from transformers import BertForQuestionAnswering, get_linear_schedule_with_warmup

    from bertqa.model import BertQA, layerwise_lr_scale, no_weight_decay

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    init = out / "initial-weights"
    start = BertQA.from_pretrained(a.model_name_or_path, seed=a.seed)  # the QA head bertqa starts from
    start.save_pretrained(init)
    tokenizer = start.tokenizer
    model = BertForQuestionAnswering.from_pretrained(init, attn_implementation="eager")
    model.train()

    _, features = load_split(a.train_file, tokenizer, args, a.max_train_samples, on_bad_answer="warn")
    plan = TrainPlan.from_args(len(features), args)
    # one group per tensor: weight decay on weights only, and each tensor's layer-wise lr (LambdaLR, which the
    # schedule is, scales every group's own initial lr)
    names = [name for name, _ in model.named_parameters()]
    scale = dict(zip(names, layerwise_lr_scale(names, model.config.num_hidden_layers, args.layerwise_lr_decay)))
    groups = [{"params": [p], "weight_decay": 0.0 if no_weight_decay(name) else args.weight_decay,
               "lr": args.learning_rate * float(scale[name])} for name, p in model.named_parameters()]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, foreach=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)

    def span_loss(model, batch, kind):
        if kind == "transformers":
            return model(**batch).loss
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
        T = batch["input_ids"].shape[1]
        last = T - torch.argmax(batch["attention_mask"].flip(1), dim=1)   # 1 + each row's last real token
        pad = torch.arange(T)[None] >= last[:, None]
        ce = torch.nn.CrossEntropyLoss(ignore_index=T)
        def half(logits, pos):
            pos = pos.clamp(0, T).masked_fill(pos.clamp(0, T) >= last, T)   # a target in the padding: ignored
            return ce(logits.masked_fill(pad, float("-inf")), pos)
        return (half(out.start_logits, batch["start_positions"]) + half(out.end_logits, batch["end_positions"])) / 2

    def tensors(batch):
        return {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}

    log, window, sequences = [], [], 0
    t0 = time.perf_counter()
    step, epoch, position, order = 0, 0, 0, None
    while step < plan.total_steps:
        if position == 0:
            order = epoch_order(data_rng_state(args.seed, epoch), plan.n_features)
        micro = range(position, min(position + plan.accumulation, plan.micro_batches_per_epoch))
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m in micro:
            rows = order[m * plan.batch_size:(m + 1) * plan.batch_size]
            loss = span_loss(model, tensors(features.batch(rows)), a.reference_loss) / len(micro)
            loss.backward()
            loss_sum += float(loss.detach()) * len(micro)
            sequences += len(rows)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        position = micro.stop
        if position >= plan.micro_batches_per_epoch:
            epoch, position = epoch + 1, 0
        window.append(loss_sum / len(micro))
        if step % args.logging_steps == 0 or step == plan.total_steps:
            log.append({"step": step, "loss": float(np.mean(window))})
            window = []
            print(f"reference step {step}/{plan.total_steps} loss {log[-1]['loss']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - t0

    examples, eval_features = load_split(a.validation_file, tokenizer, args, a.max_eval_samples)
    metrics, _ = evaluate_model(TorchQA(model, torch), examples, eval_features, args)
    return {"exact_match": metrics["exact_match"], "f1": metrics["f1"], "train_seconds": train_seconds,
            "train_steps": step, "train_sequences": sequences, "train_sequences_per_second": sequences / train_seconds,
            "eval_seconds": metrics["eval_seconds"], "eval_sequences_per_second": metrics["eval_sequences_per_second"],
            "log": log, "torch": torch.__version__, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = TrainingArguments(output_dir=str(out), max_seq_length=a.max_seq_length, doc_stride=a.doc_stride,
                             per_device_train_batch_size=a.per_device_train_batch_size,
                             learning_rate=a.learning_rate, num_train_epochs=a.num_train_epochs, seed=a.seed,
                             warmup_ratio=a.warmup_ratio, layerwise_lr_decay=a.layerwise_lr_decay,
                             logging_steps=a.logging_steps, disable_tqdm=True).validate()

    cmd = bertqa_command(a)
    print("bertqa:", " ".join(cmd[1:] if cmd[0] == sys.executable else cmd), flush=True)
    if not a.skip_bertqa:
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ours = json.loads((out / "bertqa" / "eval_results.json").read_text())
    ours["log"] = [{"step": r["step"], "loss": r["loss"]} for r in read_log(out / "bertqa" / LOG_NAME) if "loss" in r]

    ref = run_reference(a, args, out)
    report = {"recipe": {k: v for k, v in vars(a).items() if k != "skip_bertqa"}, "bertqa_command": cmd[1:],
              "bertqa": ours, "reference": ref}
    (out / "reference.json").write_text(json.dumps(report, indent=2))

    ours_loss = {r["step"]: r["loss"] for r in ours["log"]}
    pairs = [(ours_loss[r["step"]], r["loss"]) for r in ref["log"] if r["step"] in ours_loss]
    print()
    print(f"| | bertqa | PyTorch {ref['torch']} + transformers | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| EM | {ours['exact_match']:.2f} | {ref['exact_match']:.2f} | {ours['exact_match'] - ref['exact_match']:+.2f} |")
    print(f"| F1 | {ours['f1']:.2f} | {ref['f1']:.2f} | {ours['f1'] - ref['f1']:+.2f} |")
    print(f"| training s | {ours['train_seconds']:.0f} | {ref['train_seconds']:.0f} | "
          f"{ref['train_seconds'] / ours['train_seconds']:.2f}x faster |")
    print(f"| evaluation s | {ours['eval_seconds']:.0f} | {ref['eval_seconds']:.0f} | "
          f"{ref['eval_seconds'] / ours['eval_seconds']:.2f}x faster |")
    if pairs:
        o, r = np.array(pairs).T
        print(f"| mean logged loss | {o.mean():.4f} | {r.mean():.4f} | max |diff| {np.abs(o - r).max():.4f} "
              f"over {len(pairs)} windows of {a.logging_steps} steps |")
    print(f"\nF1 within 1.0 of the reference: {abs(ours['f1'] - ref['f1']) <= 1.0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
