"""Question answering with a loaded model: question + context -> answer text, score and character offsets.

The same windowing and span decoding as training and evaluation (bertqa.squad): `[CLS] question [SEP] context
window [SEP]` rows with `doc_stride` tokens shared by consecutive windows, questions cut to `max_query_length`
tokens, candidates pooled over all the windows of a question with squad.window_candidates (n-best starts x
n-best ends, start <= end, inside the context, at most max_answer_length tokens, start token in its max-context
window), scored start_logit + end_logit.

    qa = QAPipeline(BertQA.from_pretrained("out/squad"))
    qa("Where is the Eiffel tower?", "The Eiffel tower is in Paris.")
    # {"answer": "Paris", "score": 0.93, "start": 23, "end": 28}     context[start:end] == answer

The work is split in three steps so that a server can batch the middle one across requests:

    prepared = qa.prepare(questions, contexts)       # tokenize + windows (no model)
    start, end = qa.logits(prepared)                  # the engine, over all windows (or a server's batcher)
    answers = qa.decode(prepared, start, end)         # spans -> text and offsets

Each distinct context is tokenized once however many questions are asked about it (tokenization.encode_pairs);
the encoder itself cannot share work between questions, since every layer mixes question and context tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .squad import Example, Features, build_features, softmax, window_candidates
from .tokenization import context_windows

# Defaults of training/evaluation (run_qa.py / utils_qa.py).
MAX_SEQ_LENGTH = 384
DOC_STRIDE = 128
MAX_QUERY_LENGTH = 64
MAX_ANSWER_LENGTH = 30
N_BEST_SIZE = 20


class TooMuchWork(ValueError):
    """A request whose windows exceed the configured limit (the message says how many and the limit)."""


@dataclass
class Prepared:
    """Windows of several (question, context) pairs, ready for the engine.

    N rows (windows) of width T; the rows of pair k are those where features.example_index == k, consecutive.
    """

    contexts: list[str]
    features: Features  # [N, T] model inputs + offsets (-1 outside the context) + max-context flags
    rows: list[np.ndarray]  # rows[k]: the row indices of pair k

    @property
    def num_windows(self) -> int:
        return len(self.features)

    def model_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, attention_mask, token_type_ids), int32 [N, T]."""
        f = self.features
        return (np.ascontiguousarray(f.input_ids, dtype=np.int32),
                np.ascontiguousarray(f.attention_mask, dtype=np.int32),
                np.ascontiguousarray(f.token_type_ids, dtype=np.int32))


def answer_dict(context: str, start: int, end: int, score: float) -> dict[str, Any]:
    """{"answer", "score", "start", "end"} with end exclusive: context[start:end] == answer."""
    return {"answer": context[start:end], "score": float(score), "start": int(start), "end": int(end)}


NO_ANSWER = {"answer": "", "score": 0.0, "start": 0, "end": 0}


class QAPipeline:
    """Extractive QA over a model with `forward(input_ids, attention_mask, token_type_ids) -> (start, end)`.

    max_seq_length is capped at the model's position embeddings and the tokenizer's model_max_length.
    batch_size: windows per engine call in `logits` (a server batches across requests instead).
    """

    def __init__(self, model: Any, max_seq_length: int = MAX_SEQ_LENGTH, doc_stride: int = DOC_STRIDE,
                 max_query_length: Optional[int] = MAX_QUERY_LENGTH, max_answer_length: int = MAX_ANSWER_LENGTH,
                 n_best_size: int = N_BEST_SIZE, batch_size: int = 16, pad_to_multiple_of: int = 8):
        self.model = model
        self.tokenizer = model.tokenizer
        limit = min(int(model.config.max_position_embeddings), int(self.tokenizer.model_max_length))
        self.max_seq_length = min(int(max_seq_length), limit)
        if max_query_length is not None and self.max_seq_length - max_query_length - 3 <= doc_stride:
            raise ValueError(f"max_seq_length {self.max_seq_length} leaves no more than doc_stride {doc_stride} "
                             f"context tokens per window after a {max_query_length}-token question")
        self.doc_stride = int(doc_stride)
        self.max_query_length = max_query_length
        self.max_answer_length = int(max_answer_length)
        self.n_best_size = int(n_best_size)
        self.batch_size = int(batch_size)
        self.pad_to_multiple_of = int(pad_to_multiple_of)

    # ---- step 1: windows -----------------------------------------------------------------------------------

    def count_windows(self, questions: Sequence[str], contexts: Sequence[str]) -> int:
        """How many rows prepare() would make, from the token counts alone (nothing [N, T] is allocated)."""
        unique = list(dict.fromkeys(contexts))
        n_context = {c: len(ids) for c, (ids, _) in zip(unique, self.tokenizer.encode_texts(unique))}
        total = 0
        for k, ((q_ids, _), context) in enumerate(zip(self.tokenizer.encode_texts(questions), contexts)):
            n_q = len(q_ids) if self.max_query_length is None else min(len(q_ids), self.max_query_length)
            room = self.max_seq_length - n_q - 3
            total += len(context_windows(n_context[context], room, self.doc_stride, k))
        return total

    def prepare(self, questions: Sequence[str], contexts: Sequence[str],
                max_windows: Optional[int] = None) -> Prepared:
        """Windows of each (question, context) pair; TooMuchWork past max_windows rows (checked before building)."""
        if len(questions) != len(contexts):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
        if max_windows is not None:
            n = self.count_windows(questions, contexts)
            if n > max_windows:
                raise TooMuchWork(f"the request needs {n} windows of {self.max_seq_length} tokens "
                                  f"(doc_stride {self.doc_stride}); the limit is {max_windows} per request")
        examples = [Example(id=str(k), title="", question=q, context=c, answers=(), answer_starts=())
                    for k, (q, c) in enumerate(zip(questions, contexts))]
        features = build_features(examples, self.tokenizer, max_seq_length=self.max_seq_length,
                                  doc_stride=self.doc_stride, max_query_length=self.max_query_length,
                                  padding="longest", pad_to_multiple_of=self.pad_to_multiple_of,
                                  batch_size=max(len(examples), 1), progress=False)
        bounds = np.searchsorted(features.example_index, np.arange(len(examples) + 1))
        rows = [np.arange(bounds[k], bounds[k + 1]) for k in range(len(examples))]
        return Prepared(list(contexts), features, rows)

    # ---- step 2: the engine --------------------------------------------------------------------------------

    def logits(self, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) float32 [N, T] from the model, batch_size windows per call, each batch trimmed.

        Positions past a row's last token read -inf, so that padding never takes one of the n-best start/end
        slots and the answer does not depend on how the rows were batched (utils_qa.py lets padding compete).
        """
        n, width = prepared.features.input_ids.shape
        start = np.full((n, width), -np.inf, dtype=np.float32)
        end = np.full((n, width), -np.inf, dtype=np.float32)
        for lo in range(0, n, self.batch_size):
            idx = np.arange(lo, min(lo + self.batch_size, n))
            batch = prepared.features.batch(idx, pad_to_multiple_of=self.pad_to_multiple_of)
            s, e = self.model.forward(batch["input_ids"], attention_mask=batch["attention_mask"],
                                      token_type_ids=batch["token_type_ids"])
            w = min(np.shape(s)[1], width)
            start[idx, :w], end[idx, :w] = np.asarray(s)[:, :w], np.asarray(e)[:, :w]
        padding = prepared.features.attention_mask == 0
        start[padding] = -np.inf
        end[padding] = -np.inf
        return start, end

    # ---- step 3: spans -------------------------------------------------------------------------------------

    def decode_one(self, prepared: Prepared, k: int, start_logits: np.ndarray, end_logits: np.ndarray,
                   top_k: int = 1, max_answer_length: Optional[int] = None) -> list[dict[str, Any]]:
        """The top_k answers of pair k, best first; score = softmax over the n-best spans (utils_qa.py's
        "probability"). [NO_ANSWER] when no span is valid: a context with no tokens, or (utils_qa's "empty" case)
        none of the n_best_size highest start and end logits lies in the context."""
        f = prepared.features
        max_len = self.max_answer_length if max_answer_length is None else int(max_answer_length)
        candidates = []
        for i in prepared.rows[k]:
            candidates += window_candidates(start_logits[i], end_logits[i], f.offsets[i, :, 0] >= 0,
                                            f.token_is_max_context[i], self.n_best_size, max_len, feature=int(i))
        if not candidates:
            return [dict(NO_ANSWER)]
        candidates.sort(key=lambda c: c.score, reverse=True)  # stable: window order breaks ties (utils_qa)
        candidates = candidates[:self.n_best_size]
        probs = softmax([c.score for c in candidates])
        context = prepared.contexts[k]
        return [answer_dict(context, int(f.offsets[c.feature, c.start, 0]), int(f.offsets[c.feature, c.end, 1]), p)
                for c, p in zip(candidates[:max(1, top_k)], probs)]

    def decode(self, prepared: Prepared, start_logits: np.ndarray, end_logits: np.ndarray, top_k: int = 1,
               max_answer_length: Optional[int] = None) -> list[list[dict[str, Any]]]:
        """decode_one for every pair, in order."""
        return [self.decode_one(prepared, k, start_logits, end_logits, top_k, max_answer_length)
                for k in range(len(prepared.rows))]

    # ---- all in one ----------------------------------------------------------------------------------------

    def answer(self, questions: Sequence[str], contexts: Sequence[str], top_k: int = 1,
               max_answer_length: Optional[int] = None) -> list[list[dict[str, Any]]]:
        """For each pair, its top_k answers (best first)."""
        prepared = self.prepare(questions, contexts)
        start, end = self.logits(prepared)
        return self.decode(prepared, start, end, top_k, max_answer_length)

    def __call__(self, question: str, context: str, top_k: Optional[int] = None,
                 max_answer_length: Optional[int] = None):
        """One answer dict, or a list of top_k of them when top_k is given."""
        found = self.answer([question], [context], top_k or 1, max_answer_length)[0]
        return found if top_k is not None else found[0]
