"""bertqa.inference: the serving pipeline decodes exactly as evaluation does (squad.predict_example), windows as
training does (squad.build_features), and batches without changing the logits."""
from __future__ import annotations

import numpy as np
import pytest

from bertqa.inference import NO_ANSWER, QAPipeline, TooMuchWork
from bertqa.squad import Example, build_features, predict_example

from test_serve import SMALL, WORDS, ScriptedEngine, write_tiny_model


def random_text(rng, n_words: int) -> str:
    words = rng.choice(WORDS + ["Paris,", "1889", "Zürich", "naïve", "€"], size=n_words)
    return " ".join(words) + "."


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ScriptedEngine(tmp_path_factory.mktemp("tok"))


def test_decode_matches_squad_predict_example(engine, rng):
    qa = QAPipeline(engine, **SMALL)
    questions = [random_text(rng, int(rng.integers(1, 25))) for _ in range(6)]
    contexts = [random_text(rng, int(rng.integers(1, 200))) for _ in range(3)] * 2
    prepared = qa.prepare(questions, contexts)
    n, width = prepared.features.input_ids.shape
    assert n > 6  # some contexts need several windows
    start = rng.standard_normal((n, width)).astype(np.float32)
    end = rng.standard_normal((n, width)).astype(np.float32)
    for k, (q, c) in enumerate(zip(questions, contexts)):
        example = Example(str(k), "", q, c, (), ())
        want = predict_example(example, prepared.features, prepared.rows[k], start, end, n_best_size=20,
                               max_answer_length=7)
        got = qa.decode_one(prepared, k, start, end, top_k=20, max_answer_length=7)
        assert got[0]["answer"] == want.text
        if not want.nbest:
            # utils_qa's "empty" case: none of the n_best top starts/ends lies in the context (a context of a few
            # tokens in a 64-token window does this with random logits); serving answers NO_ANSWER instead
            assert got == [NO_ANSWER]
            continue
        assert [g["answer"] for g in got] == [w["text"] for w in want.nbest]
        np.testing.assert_allclose([g["score"] for g in got], [w["probability"] for w in want.nbest], rtol=1e-12)
        for g in got:
            assert c[g["start"]:g["end"]] == g["answer"] and g["answer"]


def test_windows_are_the_training_features(engine, rng):
    qa = QAPipeline(engine, **SMALL)
    questions = [random_text(rng, int(rng.integers(1, 40))) for _ in range(5)]
    contexts = [random_text(rng, int(rng.integers(1, 300))) for _ in range(5)]
    prepared = qa.prepare(questions, contexts)
    examples = [Example(str(k), "", q, c, (), ()) for k, (q, c) in enumerate(zip(questions, contexts))]
    train = build_features(examples, engine.tokenizer, padding="longest", progress=False, **{
        "max_seq_length": SMALL["max_seq_length"], "doc_stride": SMALL["doc_stride"],
        "max_query_length": SMALL["max_query_length"]})
    np.testing.assert_array_equal(prepared.features.input_ids, train.input_ids)
    np.testing.assert_array_equal(prepared.features.offsets, train.offsets)
    np.testing.assert_array_equal(prepared.features.token_is_max_context, train.token_is_max_context)
    assert qa.count_windows(questions, contexts) == prepared.num_windows
    with pytest.raises(TooMuchWork, match=f"needs {prepared.num_windows} windows"):
        qa.prepare(questions, contexts, max_windows=prepared.num_windows - 1)


def test_no_valid_span_and_capped_sequence_length(engine):
    qa = QAPipeline(engine, max_seq_length=4096, doc_stride=16)
    assert qa.max_seq_length == engine.config.max_position_embeddings  # capped at the model's positions
    assert qa("what?", "\x00\x01") == {"answer": "", "score": 0.0, "start": 0, "end": 0}  # no context tokens
    with pytest.raises(ValueError, match="doc_stride"):
        QAPipeline(engine, max_seq_length=64, doc_stride=50, max_query_length=16)


def test_real_engine_logits_do_not_depend_on_batching(tmp_path, rng):
    from bertqa.model import BertQA

    model = BertQA.from_pretrained(str(write_tiny_model(tmp_path)))
    questions = [random_text(rng, int(rng.integers(1, 10))) for _ in range(7)]
    contexts = [random_text(rng, int(rng.integers(1, 120))) for _ in range(7)]
    one = QAPipeline(model, batch_size=1, **SMALL)
    many = QAPipeline(model, batch_size=16, **SMALL)
    prepared = one.prepare(questions, contexts)
    s1, e1 = one.logits(prepared)
    s2, e2 = many.logits(prepared)
    real = prepared.features.attention_mask.astype(bool)
    np.testing.assert_allclose(s1[real], s2[real], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(e1[real], e2[real], rtol=1e-4, atol=1e-4)
    assert [a[0]["answer"] for a in one.decode(prepared, s1, e1)] == \
        [a[0]["answer"] for a in many.decode(prepared, s2, e2)]
