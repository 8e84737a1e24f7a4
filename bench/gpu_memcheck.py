"""A small training step on the CUDA engine, for `compute-sanitizer --tool memcheck` (bench/gpu_check.sh).

Covers every kernel and both matrix-product paths: fp32 and bf16, dropout on, padding, an ignored answer position,
an odd hidden size (cuBLAS fallback, unaligned bias) and an aligned one (cuBLASLt with its bias epilogue), an eval
forward after training, a larger batch that regrows the activation arena, and cuDNN's fused attention (bf16 at
hidden 64: head size 16) beside the own attention kernels (hidden 36: head size 12, which cuDNN does not take). Prints the losses; exits non-zero
on any Python error (the sanitizer's own exit code reports memory errors).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bertqa.config import BertConfig  # noqa: E402
from bertqa.model import BertQA  # noqa: E402


def config(hidden, heads, ff):
    return BertConfig.from_dict(dict(vocab_size=97, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                     intermediate_size=ff, max_position_embeddings=64, type_vocab_size=2,
                                     hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                     layer_norm_eps=1e-12, initializer_range=0.02, pad_token_id=0))


def batch(rng, B, T):
    ids = rng.integers(1, 97, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[0, T - 5:] = 0
    ids[mask == 0] = 0
    types = np.zeros((B, T), np.int64)
    types[:, T // 2:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                start_positions=rng.integers(0, T, B), end_positions=np.r_[T, rng.integers(0, T, B - 1)])


def main():
    rng = np.random.default_rng(0)
    for hidden, heads, ff in [(36, 3, 50), (64, 4, 128)]:
        for precision in ("fp32", "bf16"):
            model = BertQA(config(hidden, heads, ff), seed=3, device="cuda", precision=precision)
            b = batch(rng, 2, 37)
            losses = [model.train_step(b, lr=1e-3) for _ in range(2)]
            model.forward(b["input_ids"], b["attention_mask"], b["token_type_ids"])
            big = batch(rng, 3, 61)
            losses.append(model.train_step(big, lr=1e-3))
            model.forward(big["input_ids"])   # no mask, no types
            model._engine.synchronize()
            print(f"hidden {hidden} {precision}: losses {losses} gemm {model._engine.gemm_stats} attention "
                  f"{model._engine.attention_used}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
