"""bertqa.squad: reader errors, features on the real valid.json, post-processing, the official metric."""
import json
import re
import time
import warnings

import numpy as np
import pytest

from bertqa import squad
from bertqa.squad import (Example, Features, SquadFormatError, best_span, build_features, evaluate,
                          exact_match_score, f1_score, load_features, load_squad, max_context_owner,
                          normalize_answer, postprocess_predictions)
from bertqa.tokenization import BertQATokenizer

# =============================================================================================================
# Metric (official evaluate-v1.1.py / evaluate-v2.0.py definitions), hand-worked
# =============================================================================================================


@pytest.mark.parametrize("text,normal", [
    ("The Denver Broncos!", "denver broncos"),
    ("  an apple,  a day ", "apple day"),
    ("Theater and THE anthem", "theater and anthem"),  # articles only as whole words
    ("U.S.-based (c. 1990)", "usbased c 1990"),  # punctuation dropped, not turned into spaces
    ("ünïcode  ‘quotes’", "ünïcode ‘quotes’"),  # only ASCII punctuation, as string.punctuation
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_and_f1_by_hand():
    assert exact_match_score("the Denver Broncos", "Denver Broncos!")
    assert not exact_match_score("Denver", "Denver Broncos")
    # pred {denver, broncos, team}, gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert f1_score("Denver Broncos team", "the Denver Broncos") == pytest.approx(0.8)
    # Bag of tokens: repeats count up to the smaller multiplicity. pred x x y / gold x y: P 2/3, R 1.
    assert f1_score("x x y", "x y") == pytest.approx(0.8)
    assert f1_score("", "Denver") == 0.0
    assert f1_score("Broncos Denver", "Denver Broncos") == 1.0  # order does not matter


def tiny_dataset(version="1.1"):
    context = "The Denver Broncos defeated the Carolina Panthers 24-10 in Super Bowl 50."
    return {"version": version, "data": [{"title": "SB50", "paragraphs": [{"context": context, "qas": [
        {"id": "q1", "question": "Who won?",
         "answers": [{"text": "Denver Broncos", "answer_start": 4},
                     {"text": "The Denver Broncos", "answer_start": 0}]},
        {"id": "q2", "question": "Who lost?", "answers": [{"text": "Carolina Panthers", "answer_start": 32}]},
        {"id": "q3", "question": "What was the score?", "answers": [{"text": "24-10", "answer_start": 50}]},
    ]}]}]}


def test_evaluate_v1_max_over_references_and_unanswered_scores_zero(tmp_path):
    data = tiny_dataset()
    # q1: exact against the 2nd reference; q2: F1 2/3 (pred {the carolina panthers team} -> 2 of 3 tokens,
    # recall 1 -> F1 0.8) ; q3 unanswered -> 0, and still counted.
    preds = {"q1": "the Denver Broncos.", "q2": "the Carolina Panthers team"}
    result = evaluate(data, preds)
    assert result == pytest.approx({"exact_match": 100 / 3, "f1": (100 + 80) / 3})
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    assert evaluate(path, preds) == result  # a path works too
    assert evaluate(data["data"], preds) == result  # and the bare 'data' list
    assert evaluate(data, {"q1": "Broncos", "q2": "Carolina Panthers", "q3": "24-10"}) == pytest.approx(
        {"exact_match": 200 / 3, "f1": (100 * 2 / 3 + 200) / 3})  # q1 F1 vs "Denver Broncos": P 1, R 1/2


def test_evaluate_v2_breakdown():
    data = tiny_dataset("v2.0")
    qas = data["data"][0]["paragraphs"][0]["qas"]
    qas.append({"id": "q4", "question": "Who sang?", "answers": [], "is_impossible": True,
                "plausible_answers": [{"text": "Carolina", "answer_start": 32}]})
    qas.append({"id": "q5", "question": "Where?", "answers": [], "is_impossible": True})
    preds = {"q1": "Denver Broncos", "q2": "", "q3": "24-10", "q4": "", "q5": "Super Bowl"}
    r = evaluate(data, preds)
    assert r["HasAns_total"] == 3 and r["NoAns_total"] == 2 and r["total"] == 5
    assert r["HasAns_exact"] == pytest.approx(200 / 3)  # q2 answered "" on an answerable question: 0
    assert r["NoAns_exact"] == pytest.approx(50.0)  # q4 right (empty), q5 wrong
    assert r["exact"] == r["exact_match"] == pytest.approx(300 / 5)
    assert r["f1"] == pytest.approx(300 / 5)


# =============================================================================================================
# Reader
# =============================================================================================================


def write(tmp_path, data, name="bad.json"):
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_reads_v1_and_strips_questions(tmp_path):
    data = tiny_dataset()
    data["data"][0]["paragraphs"][0]["qas"][0]["question"] = "   Who won?  "
    examples = load_squad(write(tmp_path, data, "ok.json"))
    assert [e.id for e in examples] == ["q1", "q2", "q3"]
    first = examples[0]
    assert first.question == "Who won?" and first.title == "SB50" and not first.is_impossible
    assert first.answers == ("Denver Broncos", "The Denver Broncos") and first.answer_starts == (4, 0)
    assert load_squad(data) == examples  # an already parsed dict gives the same
    bom = write(tmp_path, b"\xef\xbb\xbf" + json.dumps(data).encode(), "bom.json")
    assert load_squad(bom) == examples


def test_reads_v2(tmp_path):
    data = tiny_dataset("v2.0")
    data["data"][0]["paragraphs"][0]["qas"].append(
        {"id": "q4", "question": "Who sang?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "Carolina", "answer_start": 32}]})
    ex = load_squad(write(tmp_path, data, "v2.json"))[-1]
    assert ex.is_impossible and ex.answers == () and ex.answer_starts == ()


def qa_of(data):
    return data["data"][0]["paragraphs"][0]["qas"]


def mutate(fn):
    data = tiny_dataset()
    fn(data)
    return data


BAD_INPUTS = {
    "malformed": ('{"version": "1.1",\n "data": [}', r"bad\.json: malformed JSON at line 2, column 11: Expecting value"),
    "truncated": (json.dumps(tiny_dataset(), indent=1)[:-40], r"malformed JSON at line \d+.*truncated"),
    "non_utf8": (json.dumps(tiny_dataset()).replace("Denver", "D\udcffnver", 1).encode("utf-8", "surrogateescape"),
                 r"bad\.json: not UTF-8: byte 0xff at line 1, column \d+"),
    "top_level_list": ([], r"top level should be a JSON object"),
    "no_data": ({"version": "1.1"}, r"top level: missing field 'data'"),
    "no_paragraphs": ({"data": [{"title": "T"}]}, r"data\[0\] \(title 'T'\): missing field 'paragraphs'"),
    "missing_question": (mutate(lambda d: qa_of(d)[1].pop("question")),
                         r"data\[0\] \(title 'SB50'\) paragraphs\[0\] qas\[1\] \(id 'q2'\): missing field "
                         r"'question'"),
    "missing_answers": (mutate(lambda d: qa_of(d)[0].pop("answers")), r"qas\[0\] \(id 'q1'\): missing field"),
    "missing_id": (mutate(lambda d: qa_of(d)[2].pop("id")), r"qas\[2\]: missing field 'id'"),
    "context_type": (mutate(lambda d: d["data"][0]["paragraphs"][0].update(context=42)),
                     r"paragraphs\[0\]: field 'context' should be str, got int"),
    "start_as_string": (mutate(lambda d: qa_of(d)[1]["answers"][0].update(answer_start="32")),
                        r"qas\[1\] \(id 'q2'\) answers\[0\]: field 'answer_start' should be int, got str"),
    "start_as_bool": (mutate(lambda d: qa_of(d)[1]["answers"][0].update(answer_start=True)),
                      r"'answer_start' should be int, got bool"),
    "answers_not_list": (mutate(lambda d: qa_of(d)[0].update(answers={"text": "x"})),
                         r"field 'answers' should be list, got dict"),
    "id_not_string": (mutate(lambda d: qa_of(d)[0].update(id=7)), r"field 'id' should be str, got int"),
    "start_mismatch": (mutate(lambda d: qa_of(d)[1]["answers"][0].update(answer_start=31)),
                       r"\(id 'q2'\) answers\[0\]: answer text 'Carolina Panthers' does not match the context at "
                       r"answer_start 31, which reads ' Carolina Panther'"),
    "start_outside": (mutate(lambda d: qa_of(d)[2]["answers"][0].update(answer_start=70)),
                      r"\(id 'q3'\) answers\[0\]: answer_start 70 .* outside the context \(length 73\)"),
    "negative_start": (mutate(lambda d: qa_of(d)[2]["answers"][0].update(answer_start=-1)), r"outside the context"),
    "empty_context": (mutate(lambda d: d["data"][0]["paragraphs"][0].update(context=" \n ")),
                      r"paragraphs\[0\]: empty context"),
    "empty_question": (mutate(lambda d: qa_of(d)[2].update(question="   ")), r"\(id 'q3'\): empty question"),
    "empty_answer_text": (mutate(lambda d: qa_of(d)[2]["answers"][0].update(text="")), r"empty answer text"),
    "duplicate_id": (mutate(lambda d: qa_of(d)[2].update(id="q1")),
                     r"qas\[2\] \(id 'q1'\): duplicate id, first seen at data\[0\] \(title 'SB50'\) "
                     r"paragraphs\[0\] qas\[0\]"),
    "impossible_with_answers": (mutate(lambda d: qa_of(d)[0].update(is_impossible=True)),
                                r"is_impossible is true but it has 2 answers"),
    "impossible_not_bool": (mutate(lambda d: qa_of(d)[0].update(is_impossible="no")),
                            r"'is_impossible' should be bool, got str"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_reader_errors_name_file_place_and_problem(tmp_path, case):
    content, pattern = BAD_INPUTS[case]
    path = write(tmp_path, content)
    with pytest.raises(SquadFormatError, match=pattern) as info:
        load_squad(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


BAD_ANSWER_CASES = [case for case in BAD_INPUTS if "start" in case or case == "empty_answer_text"]


@pytest.mark.parametrize("case", BAD_ANSWER_CASES)
def test_bad_training_answers_warn_and_skip(tmp_path, case):
    """on_bad_answer="warn" (how finetune reads training data): the bad answer is dropped, a question left
    with none is skipped, one warning gives the counts and the place; everything else is read as usual."""
    from bertqa.squad import SquadAnswerWarning

    content, pattern = BAD_INPUTS[case]
    path = write(tmp_path, content)
    good = {ex.id: ex for ex in load_squad(write(tmp_path, tiny_dataset(), "good.json"))}
    with pytest.warns(SquadAnswerWarning) as record:
        examples = load_squad(path, on_bad_answer="warn")
    assert len(record) == 1
    message = str(record[0].message)
    assert str(path) in message and re.search(pattern, message), message
    bad_id = re.search(r"\(id '(q\d)'\)", message).group(1)
    # q1 has two answers: dropping one keeps the question with the other; q2 and q3 have one each.
    skipped = 0 if bad_id == "q1" else 1
    assert f"1 answer(s) that do not fit their context dropped; {skipped} question(s)" in message
    assert f"{len(good) - skipped} kept" in message
    assert [ex.id for ex in examples] == [q for q in good if skipped == 0 or q != bad_id]
    for ex in examples:
        if ex.id != bad_id:
            assert ex == good[ex.id]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_squad(path, on_bad_answer="ignore") == examples
    with pytest.raises(SquadFormatError, match=pattern):
        load_squad(path)  # the default, as for evaluation data


def test_bad_answer_policy_is_checked(tmp_path):
    with pytest.raises(ValueError, match="on_bad_answer should be one of"):
        load_squad(tiny_dataset(), on_bad_answer="skip")


def test_many_bad_training_answers_are_counted(tmp_path):
    data = tiny_dataset()
    for qa in qa_of(data):
        for answer in qa["answers"]:
            answer["answer_start"] += 1
    with pytest.warns(UserWarning, match=r"4 answer\(s\) .* dropped; 3 question\(s\) left with no answer "
                                         r"skipped, 0 kept\. First: .*\(id 'q1'\) answers\[0\].*; .*answers\[1\]"):
        assert load_squad(data, on_bad_answer="warn") == []


def test_reader_error_for_missing_file(tmp_path):
    with pytest.raises(SquadFormatError, match="cannot read"):
        load_squad(tmp_path / "absent.json")


# =============================================================================================================
# Features on the real valid.json
# =============================================================================================================


@pytest.fixture(scope="module")
def tokenizer(shared_data_dir):
    return BertQATokenizer.from_vocab(shared_data_dir / "vocab" / "bert-base-uncased-vocab.txt")


@pytest.fixture(scope="module")
def valid(shared_data_dir, tokenizer):
    """(examples, features) of valid.json at the run_qa.py defaults, built once and timed."""
    examples = load_squad(shared_data_dir / "squad" / "valid.json")
    t0 = time.perf_counter()
    features = build_features(examples, tokenizer, progress=False)
    elapsed = time.perf_counter() - t0
    print(f"\nbuild_features(valid.json): {len(examples)} questions -> {len(features)} features "
          f"in {elapsed:.2f} s")
    assert elapsed < 30, "feature building should take seconds (batched tokenizer calls)"
    return examples, features


def answer_boundary_inside_token(offsets, start_char, end_char):
    """True when the answer starts or ends strictly inside a word piece (annotation cut mid-word)."""
    ctx = offsets[offsets[:, 0] >= 0]
    starts_inside = ((ctx[:, 0] < start_char) & (start_char < ctx[:, 1])).any()
    ends_inside = ((ctx[:, 0] < end_char) & (end_char < ctx[:, 1])).any()
    return bool(starts_inside or ends_inside)


def test_feature_shapes_and_layout(valid, tokenizer):
    examples, f = valid
    n = len(f)
    assert f.input_ids.shape == (n, 384) and f.offsets.shape == (n, 384, 2) and n >= len(examples)
    assert (f.input_ids[:, 0] == tokenizer.cls_token_id).all()
    assert np.array_equal(np.unique(f.example_index), np.arange(len(examples)))  # every example, in order
    assert (np.diff(f.example_index) >= 0).all()
    assert [examples[k].id for k in f.example_index] == f.example_ids.tolist()
    ctx = f.context_mask()
    # Context tokens are exactly those with token type 1, except the final [SEP].
    lengths = f.attention_mask.sum(axis=1)
    assert (f.input_ids[np.arange(n), lengths - 1] == tokenizer.sep_token_id).all()
    type1 = f.token_type_ids.astype(bool)
    type1[np.arange(n), lengths - 1] = False
    assert np.array_equal(ctx, type1)


def test_answer_labels_decode_to_the_answer(valid):
    examples, f = valid
    labelled = mid_word = 0
    for i in np.flatnonzero(f.start_positions > 0):
        ex = examples[f.example_index[i]]
        s, e = f.start_positions[i], f.end_positions[i]
        assert 0 < s <= e and f.offsets[i, s, 0] >= 0 and f.offsets[i, e, 0] >= 0
        decoded = ex.context[f.offsets[i, s, 0]:f.offsets[i, e, 1]]
        answer, start = ex.answers[0], ex.answer_starts[0]
        labelled += 1
        if decoded == answer or " ".join(decoded.split()) == " ".join(answer.split()):
            continue
        # The few annotations that cut a word in two decode to the whole word pieces around them.
        assert answer_boundary_inside_token(f.offsets[i], start, start + len(answer)), (decoded, answer)
        assert answer in decoded
        mid_word += 1
    print(f"\n{labelled} labelled windows; {mid_word} answers start/end inside a word piece")
    assert labelled >= len(examples) - 10 and mid_word <= 5


def test_windows_without_the_answer_point_at_cls(valid):
    examples, f = valid
    for i in np.flatnonzero(f.start_positions == 0):
        ex = examples[f.example_index[i]]
        assert f.end_positions[i] == 0
        start, end = ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0])
        ctx = f.offsets[i][f.context_mask()[i]]
        assert not (ctx[0, 0] <= start and ctx[-1, 1] >= end)


def test_windows_overlap_by_doc_stride_and_max_context_partitions(valid):
    examples, f = valid
    ctx = f.context_mask()
    multi = 0
    for k in np.unique(f.example_index):
        rows = np.flatnonzero(f.example_index == k)
        # Character offsets identify context tokens across windows.
        windows = [[tuple(o) for o in f.offsets[i][ctx[i]]] for i in rows]
        all_tokens = sorted(set().union(*windows))
        for a, b in zip(windows, windows[1:]):
            shared = set(a) & set(b)
            assert len(shared) == 128 and a[-128:] == b[:128]  # consecutive windows share doc_stride tokens
        # Each context token is flagged max-context in exactly one window.
        owners = {}
        for i, w in zip(rows, windows):
            for tok, flag in zip(w, f.token_is_max_context[i][ctx[i]]):
                if flag:
                    assert tok not in owners
                    owners[tok] = i
        assert sorted(owners) == all_tokens
        assert not f.token_is_max_context[rows][~ctx[rows]].any()
        multi += len(rows) > 1
    assert multi > 0, "valid.json should have contexts longer than one window"


def test_max_context_owner_matches_bert_definition():
    # Windows [0, 10) and [5, 15): token 7 has context min(7, 2)+0.1 = 2.1 in the first, min(2, 7)+0.1 = 2.1
    # in the second: a tie goes to the first. Token 8: min(8,1)=1 vs min(3,6)=3 -> second.
    owner = max_context_owner([0, 5], [10, 10], 15)
    assert owner.tolist() == [0] * 8 + [1] * 7
    # A longer window wins a tie on min context by its 0.01 * length bonus.
    assert max_context_owner([0, 2], [6, 8], 10)[4].item() == 1


def test_padding_longest_and_batches(valid, tokenizer):
    examples, f = valid
    some = examples[:40]
    longest = build_features(some, tokenizer, padding="longest", pad_to_multiple_of=8, progress=False)
    full = build_features(some, tokenizer, progress=False)
    width = longest.seq_len
    assert width % 8 == 0 and width - 8 < longest.attention_mask.sum(axis=1).max() <= width
    assert np.array_equal(longest.input_ids, full.input_ids[:, :width])
    batch = full.batch([0, 3, 5])
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].dtype == np.int32
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}


def test_feature_cache_round_trip(shared_data_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("BERTQA_CACHE_DIR", str(tmp_path / "cache"))
    path = shared_data_dir / "squad" / "valid.json"
    examples, first = load_features(path, tokenizer, max_seq_length=128, doc_stride=32, progress=False)
    cached = list((tmp_path / "cache").glob("squad-features-*.npz"))
    assert len(cached) == 1 and not list((tmp_path / "cache").glob(".*tmp"))

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("features were rebuilt despite a cache entry")

    monkeypatch.setattr(squad, "build_features", must_not_rebuild)
    _, again = load_features(path, tokenizer, max_seq_length=128, doc_stride=32, progress=False)
    for name in ("input_ids", "offsets", "token_is_max_context", "start_positions", "example_ids"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    with pytest.raises(AssertionError, match="rebuilt"):  # other parameters: another key
        load_features(path, tokenizer, max_seq_length=128, doc_stride=16, progress=False)


# =============================================================================================================
# Post-processing
# =============================================================================================================


@pytest.fixture(scope="module")
def long_example(tokenizer):
    """One synthetic example whose context needs several 48-token windows."""
    words = [f"w{i}" for i in range(120)]
    context = " ".join(words)
    ex = Example("x1", "t", "which word?", context, ("w60 w61",), (context.index("w60 w61"),))
    f = build_features([ex], tokenizer, max_seq_length=48, doc_stride=16, max_query_length=64, progress=False)
    return ex, f


def token_of(f, row, char):
    """Column of the context token starting at char in the row, or None."""
    hits = np.flatnonzero(f.offsets[row, :, 0] == char)
    return int(hits[0]) if len(hits) else None


def test_postprocess_picks_planted_span(long_example, rng):
    ex, f = long_example
    assert len(f) > 3
    start_char = ex.context.index("w60")
    end_char = ex.context.index("w62") - 1
    row = next(i for i in range(len(f)) if token_of(f, i, start_char) is not None
               and f.token_is_max_context[i, token_of(f, i, start_char)])
    s = token_of(f, row, start_char)
    e = int(np.flatnonzero(f.offsets[row, :, 1] == end_char)[0])
    start_logits = rng.normal(size=f.input_ids.shape).astype(np.float32)
    end_logits = rng.normal(size=f.input_ids.shape).astype(np.float32)
    start_logits[row, s] += 10
    end_logits[row, e] += 10
    answers, nbest = postprocess_predictions([ex], f, start_logits, end_logits, return_nbest=True)
    assert answers == {"x1": "w60 w61"}
    probs = [c["probability"] for c in nbest["x1"]]
    assert len(probs) <= 20 and probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)


def test_postprocess_respects_bounds_and_max_answer_length(long_example, rng):
    ex, f = long_example
    row = 0
    ctx = np.flatnonzero(f.context_mask()[row] & f.token_is_max_context[row])
    # A low baseline, so that a planted start (end) only pairs with a planted end (start).
    start_logits = rng.normal(scale=0.1, size=f.input_ids.shape).astype(np.float32) - 100
    end_logits = rng.normal(scale=0.1, size=f.input_ids.shape).astype(np.float32) - 100
    # [CLS] in every window: the null answer, not a span (v2.0 takes the null score's minimum over windows).
    start_logits[:, 0] = end_logits[:, 0] = 50
    start_logits[row, 2] = end_logits[row, 3] = 45  # question tokens
    start_logits[row, ctx[10]] = end_logits[row, ctx[5]] = 40  # end before start
    start_logits[row, ctx[1]] = end_logits[row, ctx[3]] = 30  # 3 tokens: longer than max_answer_length 2
    start_logits[row, ctx[6]] = end_logits[row, ctx[7]] = 20  # the best valid answer
    answers = postprocess_predictions([ex], f, start_logits, end_logits, max_answer_length=2)
    expected = ex.context[f.offsets[row, ctx[6], 0]:f.offsets[row, ctx[7], 1]]
    assert answers["x1"] == expected
    longer = postprocess_predictions([ex], f, start_logits, end_logits, max_answer_length=3)
    assert longer["x1"] == ex.context[f.offsets[row, ctx[1], 0]:f.offsets[row, ctx[3], 1]]
    # v2.0: the [CLS] score beats every span by more than the threshold: no answer, unless the threshold
    # is raised above the gap.
    kwargs = dict(max_answer_length=2, version_2_with_negative=True)
    assert postprocess_predictions([ex], f, start_logits, end_logits, **kwargs)["x1"] == ""
    assert postprocess_predictions([ex], f, start_logits, end_logits, null_score_diff_threshold=1000.0,
                                   **kwargs)["x1"] == expected


def test_best_span_single_window(rng):
    T = 40
    base = lambda: rng.normal(scale=0.1, size=T) - 100  # noqa: E731
    mask = np.zeros(T, bool)
    mask[10:35] = True
    start, end = base(), base()
    start[25], end[27] = 20, 20  # the best valid span
    start[5], end[6] = 50, 50  # outside the context
    span = best_span(start, end, max_answer_length=10, context_mask=mask)
    assert (span.start, span.end) == (25, 27) and span.score == pytest.approx(start[25] + end[27])
    start[5], end[6] = base()[:2]
    start[30], end[11] = 40, 40  # end before start
    assert (best_span(start, end, 10, context_mask=mask).start, best_span(start, end, 10, mask).end) == (25, 27)
    start[30], end[11] = base()[:2]
    start[12], end[32] = 30, 30  # 21 tokens: too long for max_answer_length 10, fine for 30
    assert best_span(start, end, max_answer_length=10, context_mask=mask).start == 25
    assert (best_span(start, end, max_answer_length=30, context_mask=mask).start,
            best_span(start, end, max_answer_length=30, context_mask=mask).end) == (12, 32)
    assert best_span(start, end, max_answer_length=10, context_mask=np.zeros(T, bool)) is None


def test_oracle_logits_score_near_100(valid, shared_data_dir):
    """Logits that point at each window's label recover the answers: features and decoding agree."""
    examples, f = valid
    start_logits = np.zeros(f.input_ids.shape, np.float32)
    end_logits = np.zeros(f.input_ids.shape, np.float32)
    rows = np.flatnonzero(f.start_positions > 0)
    start_logits[rows, f.start_positions[rows]] = 10
    end_logits[rows, f.end_positions[rows]] = 10
    answers = postprocess_predictions(examples, f, start_logits, end_logits)
    scores = evaluate(shared_data_dir / "squad" / "valid.json", answers)
    print(f"\noracle logits on valid.json: {scores}")
    assert scores["exact_match"] > 99 and scores["f1"] > 99


def test_postprocess_rejects_mismatched_logits(long_example):
    ex, f = long_example
    with pytest.raises(ValueError, match="features but logits"):
        postprocess_predictions([ex], f, np.zeros((1, 48)), np.zeros((1, 48)))


def test_features_save_load(long_example, tmp_path):
    _, f = long_example
    f.save(tmp_path / "f.npz")
    g = Features.load(tmp_path / "f.npz")
    assert all(np.array_equal(getattr(f, k), getattr(g, k)) for k in f.__dataclass_fields__)
