"""Reference solutions to the lab's exercises (notebooks/bert_qa_lab.ipynb), kept out of the notebook.

Each is the plain NumPy / Python a learner is asked to write, checked by the matching ``bertqa.lab.check_*``.
``bertqa.lab.show_solution(name)`` prints one; ``BERTQA_LAB_SOLUTIONS=1`` makes the notebook use them for
exercises left unattempted (that is how CI runs the notebook).
"""
from __future__ import annotations

import collections
import math
import re
import string

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x):
    """GELU, the exact erf form BERT uses: 0.5 * x * (1 + erf(x / sqrt(2)))."""
    x64 = np.asarray(x, dtype=np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))).astype(np.float32)


def layernorm(x, weight, bias, eps=1e-12):
    """LayerNorm over the last axis: biased variance (divide by C, not C - 1), eps inside the square root."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # two passes: no cancellation when |mean| >> std
    y = (x - mean) / np.sqrt(var + eps) * weight + bias
    return y.astype(np.float32)


def attention(q, k, v, mask=None):
    """BERT's self-attention, every batch row and head at once. q, k, v: [B, NH, T, HS]; mask: [B, T] of 0/1
    (1 = real token) or None. A masked key gets -10000 added to its score, so it takes no probability."""
    HS = q.shape[-1]
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(HS)  # [B, NH, T, T]; a Python float keeps float32 (np.sqrt: float64)
    if mask is not None:
        scores = scores + (1.0 - np.asarray(mask, q.dtype))[:, None, None, :] * -10000.0  # on the keys
    scores = scores - scores.max(axis=-1, keepdims=True)  # exp cannot overflow; softmax does not change
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)            # a softmax over the keys of each query
    return (probs @ v).astype(np.float32)                                        # [B, NH, T, HS]


def adamw(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """One step of torch.optim.AdamW, step counting from 1; returns new (param, m, v), the inputs unchanged."""
    param = param - lr * weight_decay * param             # decoupled weight decay: not through the gradient
    m = beta1 * m + (1 - beta1) * grad                    # moving averages of the gradient and its square
    v = beta2 * v + (1 - beta2) * grad * grad
    m_hat = m / (1 - beta1**step)                         # bias correction: m and v started at 0
    v_hat = v / (1 - beta2**step)
    param = param - lr * m_hat / (np.sqrt(v_hat) + eps)
    return param, m, v


def span_loss(start_logits, end_logits, start_positions, end_positions):
    """(CE(start_logits, start_positions) + CE(end_logits, end_positions)) / 2, each CE the mean over the batch.

    start_logits, end_logits: [B, T]; positions: [B] token indices in [0, T).
    """
    def cross_entropy(logits, positions):
        logits = np.asarray(logits, dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)  # log-sum-exp: subtract the row max so exp cannot overflow
        log_probs = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        return -log_probs[np.arange(len(logits)), np.asarray(positions)].mean()

    return float((cross_entropy(start_logits, start_positions) + cross_entropy(end_logits, end_positions)) / 2)


def best_span(start_logits, end_logits, max_answer_length=30):
    """(start, end), end inclusive, maximising start_logits[start] + end_logits[end] over
    start <= end <= start + max_answer_length - 1 (at most max_answer_length tokens)."""
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    T = len(start_logits)
    scores = start_logits[:, None] + end_logits[None, :]  # [T, T]: scores[s, e]
    s, e = np.indices((T, T))
    scores[(e < s) | (e - s + 1 > max_answer_length)] = -np.inf
    start, end = np.unravel_index(np.argmax(scores), scores.shape)
    return int(start), int(end)


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text):
    """The official SQuAD normalisation: lower case, no punctuation, no a/an/the, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def f1(prediction, ground_truth):
    """SQuAD v1.1 F1 in [0, 1]: harmonic mean of token precision and recall after normalisation, tokens
    counted with multiplicity; 0 when nothing is shared (so also when either side normalises to nothing)."""
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(ground_truth).split()
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)
