"""bertqa.tokenization: WordPiece with offsets, pair windows vs `tokenizers`' own overflow, save/load."""
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from bertqa.tokenization import (BertQATokenizer, TokenizerFilesError, context_windows, read_vocab,
                                 vocab_looks_cased)


@pytest.fixture(scope="module")
def vocab_file(shared_data_dir):
    return shared_data_dir / "vocab" / "bert-base-uncased-vocab.txt"


@pytest.fixture(scope="module")
def tok(vocab_file):
    return BertQATokenizer.from_vocab(vocab_file)


@pytest.fixture(scope="module")
def squad_pairs(shared_data_dir):
    data = json.loads((shared_data_dir / "squad" / "valid.json").read_text(encoding="utf-8"))
    pairs = [(qa["question"].lstrip(), p["context"]) for a in data["data"] for p in a["paragraphs"]
             for qa in p["qas"]]
    return [q for q, _ in pairs], [c for _, c in pairs]


def reference_pairs(tok, questions, contexts, max_length, stride):
    """The same rows from `tokenizers` itself: only_second truncation with overflow (what run_qa.py asks for)."""
    ref = Tokenizer.from_str(tok.tokenizer.to_str())
    ref.enable_truncation(max_length, stride=stride, strategy="only_second")
    ref.enable_padding(length=max_length, pad_id=tok.pad_token_id, pad_token="[PAD]")
    rows, mapping = [], []
    for pair, enc in enumerate(ref.encode_batch(list(zip(questions, contexts)))):
        for e in [enc] + enc.overflowing:
            rows.append(e)
            mapping.append(pair)
    return rows, mapping


def test_special_ids_and_lowercasing(tok):
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 100, 101, 102)
    assert tok.do_lower_case
    # Uncased BERT lower-cases and strips accents.
    assert tok.tokenize("Héllo WORLD, Zürich!") == ["hello", "world", ",", "zurich", "!"]
    assert tok.tokenize("Troughton") == ["trough", "##ton"]  # greedy longest-match-first word pieces


def test_offsets_point_into_the_original_text(tok):
    text = "  Ça  marche: São Paulo's 1990s\tboom "
    [(ids, offsets)] = tok.encode_texts([text])
    pieces = tok.tokenize(text)
    assert len(ids) == len(pieces) == len(offsets)
    for piece, (a, b) in zip(pieces, offsets):
        # Lower-cased, accent-stripped text of the span is the piece without its ## prefix.
        assert tok.tokenize(text[a:b])[0].removeprefix("##") == piece.removeprefix("##") or piece == "[UNK]"
    assert text[offsets[0, 0]:offsets[0, 1]] == "Ça"


def test_context_windows_overlap_by_stride_and_cover_everything():
    assert context_windows(10, 20, 5) == [(0, 10)]
    windows = context_windows(100, 30, 8)
    assert windows[0] == (0, 30)
    for (s0, n0), (s1, _) in zip(windows, windows[1:]):
        assert s1 == s0 + 30 - 8 and s0 + n0 - s1 == 8  # consecutive windows share `stride` tokens
    assert sum(1 for s, n in windows if s + n == 100) == 1 and windows[-1][0] + windows[-1][1] == 100
    with pytest.raises(ValueError, match="stride"):
        context_windows(100, 8, 8)


@pytest.mark.parametrize("max_length,stride", [(384, 128), (64, 16)])
def test_encode_pairs_matches_tokenizers_overflow(tok, squad_pairs, max_length, stride):
    questions, contexts = (x[:400] for x in squad_pairs)
    enc = tok.encode_pairs(questions, contexts, max_length=max_length, stride=stride)
    ref, mapping = reference_pairs(tok, questions, contexts, max_length, stride)
    assert len(enc) == len(ref)
    assert enc.overflow_to_sample_mapping.tolist() == mapping
    if max_length == 64:
        assert len(enc) > 3 * len(questions)  # many windows per context: the overlap logic is exercised
    for i, r in enumerate(ref):
        assert enc.input_ids[i].tolist() == r.ids
        assert enc.token_type_ids[i].tolist() == r.type_ids
        assert enc.attention_mask[i].tolist() == r.attention_mask
        assert [tuple(o) for o in enc.offsets[i].tolist()] == r.offsets
        assert enc.sequence_ids[i].tolist() == [-1 if s is None else s for s in r.sequence_ids]


def test_padding_longest_and_multiple_of_8(tok):
    enc = tok.encode_pairs(["who?", "what is it?"], ["a b c", "a b c d e f g h i j k"], max_length=384,
                           padding="longest", pad_to_multiple_of=8)
    longest = int(enc.attention_mask.sum(axis=1).max())
    assert enc.input_ids.shape[1] == 24 and longest <= 24 < longest + 8
    assert (enc.input_ids[enc.attention_mask == 0] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="padding"):
        tok.encode_pairs(["q"], ["c"], padding="do_not_pad")


def test_max_query_length_cuts_the_question_only(tok):
    question = " ".join(["word"] * 100)
    context = " ".join(["text"] * 50)
    enc = tok.encode_pairs([question], [context], max_length=384, stride=128, max_query_length=64)
    assert len(enc) == 1 and enc.context_offset[0] == 66  # [CLS] + 64 question tokens + [SEP]
    assert (enc.sequence_ids[0] == 0).sum() == 64 and (enc.sequence_ids[0] == 1).sum() == 50
    with pytest.raises(ValueError, match="max_query_length"):
        tok.encode_pairs([" ".join(["word"] * 300)], [" ".join(["text"] * 300)], max_length=384, stride=128)


def test_save_pretrained_round_trip(tok, tmp_path):
    written = tok.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in written) == ["special_tokens_map.json", "tokenizer.json",
                                               "tokenizer_config.json", "vocab.txt"]
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is True and config["tokenizer_class"] == "BertTokenizer"
    again = BertQATokenizer.from_pretrained(tmp_path / "model")
    assert again.fingerprint == tok.fingerprint
    # vocab.txt alone (no tokenizer.json) rebuilds the same tokenizer.
    (tmp_path / "model" / "tokenizer.json").unlink()
    assert BertQATokenizer.from_pretrained(tmp_path / "model").fingerprint == tok.fingerprint
    assert read_vocab(tmp_path / "model" / "vocab.txt") == tok.tokenizer.get_vocab(with_added_tokens=False)


def test_tokenizer_json_presets_are_dropped_and_config_casing_applies(tok, tmp_path):
    """Checkpoints ship tokenizer.json with truncation/padding presets; tokenizer_config.json sets casing."""
    state = json.loads(tok.tokenizer.to_str())
    state["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    state["padding"] = {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": None,
                        "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(state))
    loaded = BertQATokenizer.from_pretrained(tmp_path)
    assert len(loaded.tokenize("one two three four five six seven eight nine ten")) == 10
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = BertQATokenizer.from_pretrained(tmp_path)
    assert not cased.do_lower_case and cased.tokenize("Paris") != ["paris"]


def test_vocab_txt_with_config_and_cased_detection(vocab_file, tmp_path):
    (tmp_path / "vocab.txt").write_bytes(vocab_file.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False,
                                                                "model_max_length": 256}))
    cased = BertQATokenizer.from_pretrained(tmp_path)
    assert not cased.do_lower_case and cased.model_max_length == 256
    assert cased.tokenize("Paris")[0] != "paris"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab_looks_cased(specials + ["The", "Paris", "a", "##s"])
    assert not vocab_looks_cased(read_vocab(vocab_file))


def test_clear_errors_for_missing_or_broken_files(tmp_path):
    with pytest.raises(TokenizerFilesError, match="not a directory"):
        BertQATokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerFilesError, match=r"tokenizer\.json.*vocab\.txt.*config\.json"):
        BertQATokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("hello\nworld\n")
    with pytest.raises(TokenizerFilesError, match=r"special tokens.*\[UNK\]"):
        BertQATokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("")
    with pytest.raises(TokenizerFilesError, match="empty"):
        BertQATokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerFilesError, match="tokenizer.json: cannot load"):
        BertQATokenizer.from_pretrained(tmp_path)


def test_encode_pairs_is_fast(tok, squad_pairs):
    import time
    t0 = time.perf_counter()
    enc = tok.encode_pairs(*squad_pairs)
    elapsed = time.perf_counter() - t0
    print(f"encode_pairs: {len(squad_pairs[0])} pairs -> {len(enc)} rows in {elapsed:.2f} s")
    assert np.all(enc.attention_mask.sum(axis=1) <= 384)
