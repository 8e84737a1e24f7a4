"""The whole-model engine (bertqa.model.BertQA): parity with transformers on the real all-MiniLM-L6-v2 weights,
a finite-difference check of its backward (dropout on) on a tiny model of awkward shapes, optimizer semantics,
determinism, saving and reloading, and bad input."""
import time
from pathlib import Path

import numpy as np
import pytest

from bertqa import checkpoint
from bertqa.config import BertConfig
from bertqa.model import BertQA, layerwise_lr_scale, no_weight_decay

import reference
from qa_helpers import needs_minilm

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "minilm_reference.npz"
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
pytestmark = pytest.mark.usefixtures("isa")   # every test under the AVX2 and the AVX-512 kernels (conftest.py)




@pytest.fixture(scope="module")
def ref():
    with np.load(REFERENCE) as z:
        return {k: z[k] for k in z.files}


def minilm(ref, dropout=True):
    """all-MiniLM-L6-v2 with the reference's QA head (made by tests/fixtures/make_reference.py)."""
    model = BertQA.from_pretrained("all-MiniLM-L6-v2")
    if not dropout:
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        model = BertQA(model.config, model.state_dict(), tokenizer=model.tokenizer)
    model.tensor("qa_outputs.weight")[...] = ref["qa_outputs.weight"]
    model.tensor("qa_outputs.bias")[...] = ref["qa_outputs.bias"]
    return model


@needs_minilm
def test_logits_match_transformers(ref):
    model = minilm(ref)
    start, end = model.forward(ref["input_ids"], ref["attention_mask"], ref["token_type_ids"])
    real = ref["attention_mask"] == 1
    assert not real.all(), "the fixture should hold a padded row"
    assert np.abs(start - ref["start_logits"])[real].max() < 1e-4
    assert np.abs(end - ref["end_logits"])[real].max() < 1e-4
    # padding after a row's last real token is not computed: -inf, so it never wins a span
    assert np.all(start[~real] == -np.inf) and np.all(end[~real] == -np.inf)
    # eval mode ignores dropout: the same call twice is bit-identical
    s2, _ = model.forward(ref["input_ids"], ref["attention_mask"], ref["token_type_ids"])
    np.testing.assert_array_equal(start, s2)


@needs_minilm
def test_loss_and_gradients_match_transformers(ref):
    model = minilm(ref, dropout=False)
    model.zero_grad()
    loss = model.forward_backward({k: ref[k] for k in BATCH_KEYS})
    assert abs(loss - float(ref["loss"])) < 1e-4
    checked = 0
    for key in ref:
        if not key.startswith("grad/"):
            continue
        name = key[len("grad/"):]
        got, want = model.gradient(name), ref[key]
        if name.endswith("word_embeddings.weight"):
            got = got[ref["word_grad_ids"]]   # the rows of the ids in the batch ([PAD] row: zero, as torch)
        elif name.endswith("position_embeddings.weight"):
            got = got[:want.shape[0]]
        if name == "qa_outputs.bias":
            # ~1e-8: a bias shared by all positions cancels in a softmax over positions; compare absolutely
            assert np.abs(got - want).max() < 1e-6, name
        else:
            rel = np.abs(got - want).max() / np.abs(want).max()
            assert rel < 1e-3, f"{name}: relative error {rel:.2e}"
        checked += 1
    assert checked >= 8


@needs_minilm
def test_five_adamw_steps_match_transformers(ref):
    model = minilm(ref, dropout=False)
    batch = {k: ref[k] for k in BATCH_KEYS}
    losses, norms = [], []
    for _ in range(5):
        model.zero_grad()
        losses.append(model.forward_backward(batch))
        norms.append(model.optimizer_step(1e-4, weight_decay=0.01, max_grad_norm=1.0))
    np.testing.assert_allclose(losses, ref["adamw_losses"], atol=1e-4)
    np.testing.assert_allclose(norms, ref["adamw_grad_norms"], rtol=1e-3)
    start, end = model.forward(ref["input_ids"], ref["attention_mask"], ref["token_type_ids"])
    for key in ref:
        if key == "adamw_after/qa_outputs.bias":
            # its gradient is round-off (~1e-8, see above), which Adam's g / sqrt(v) turns into +-lr steps of
            # arbitrary sign in any implementation: only the size of the drift is comparable
            assert np.abs(model.tensor("qa_outputs.bias")).max() <= 5 * 1e-4 + 1e-6
        elif key.startswith("adamw_after/"):
            # Adam moves each element by at most ~lr per step; elements with near-zero gradients move by amounts
            # set by round-off, so bound the worst element by a tenth of the total possible move, and the typical
            # element much tighter
            err = np.abs(model.tensor(key[len("adamw_after/"):]) - ref[key])
            assert err.max() < 0.1 * 5 * 1e-4 and np.median(err) < 2e-6, key
    assert model.step == 5


def tiny_config(**overrides):
    """Awkward sizes: hidden 36 (not a multiple of 16), 3 heads of 12, intermediate 50."""
    cfg = dict(vocab_size=53, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=50,
               max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
               attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, initializer_range=0.5)
    cfg.update(overrides)
    return BertConfig.from_dict(cfg)


def tiny_batch(rng, B=2, T=37, V=53):
    ids = rng.integers(1, V, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[0, T - 9:] = 0
    ids[mask == 0] = 0
    types = np.zeros((B, T), np.int64)
    types[:, T // 3:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                start_positions=np.array([5, T - 2])[:B], end_positions=np.array([7, T])[:B])   # one ignored


def tiny_model(rng, **overrides):
    """A random tiny model (every tensor random, LayerNorm included, so every gradient path matters)."""
    config = tiny_config(**overrides)
    tensors = {name: (rng.standard_normal(shape) * 0.5).astype(np.float32)
               for name, shape in checkpoint.expected_shapes(config).items()}
    return BertQA(config, tensors, seed=int(rng.integers(2**31)))


def test_backward_matches_finite_differences_with_dropout(rng):
    model = tiny_model(rng)
    batch = tiny_batch(rng)
    model.zero_grad()
    model.rng_step = 3
    model.forward_backward(batch)   # dropout masks keyed by (seed, rng_step = 3)
    grads = model.grads.copy()

    def loss_at():
        model.grads[...] = 0
        model.rng_step = 3           # the same masks every evaluation
        return model.forward_backward(batch)

    # central differences in float32 on random coordinates of every tensor kind
    h = 1e-2
    for name in ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                 "bert.embeddings.LayerNorm.weight", "bert.encoder.layer.0.attention.self.query.weight",
                 "bert.encoder.layer.0.attention.self.key.bias", "bert.encoder.layer.1.attention.self.value.weight",
                 "bert.encoder.layer.1.attention.output.dense.weight", "bert.encoder.layer.0.intermediate.dense.weight",
                 "bert.encoder.layer.1.output.dense.bias", "bert.encoder.layer.1.output.LayerNorm.bias",
                 "qa_outputs.weight"]:
        offset, shape = model.layout[name]
        t = model.tensor(name)
        if name.endswith("word_embeddings.weight"):   # a row that occurs in the batch (not [PAD])
            flat = int(batch["input_ids"][1, 3]) * shape[1] + int(rng.integers(shape[1]))
        elif name.endswith("position_embeddings.weight"):
            flat = int(rng.integers(37 * shape[1]))
        else:
            flat = int(rng.integers(t.size))
        idx = np.unravel_index(flat, shape)
        old = t[idx]
        t[idx] = old + h
        lp = loss_at()
        t[idx] = old - h
        lm = loss_at()
        t[idx] = old
        numeric = (lp - lm) / (2 * h)
        analytic = grads[offset + flat]
        assert abs(numeric - analytic) <= 2e-2 * max(1.0, abs(analytic)) + 5e-3, (name, idx, numeric, analytic)


def test_dropout_masks_are_keyed_and_reproducible(rng):
    model = tiny_model(rng)
    batch = tiny_batch(rng)
    model.zero_grad()
    a = model.forward_backward(batch)
    b = model.forward_backward(batch)   # rng_step advanced: new masks
    model.rng_step = 0
    a2 = model.forward_backward(batch)
    assert a == a2 and a != b
    # and with dropout off the loss does not depend on the step
    off = tiny_model(np.random.default_rng(1), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    off.zero_grad()
    assert off.forward_backward(batch) == off.forward_backward(batch)


def test_dropout_masks_follow_the_window_not_its_place_in_the_batch(rng):
    """Rows in another order, with their window ids along, give the same loss and gradients; other window ids
    (or another step word) give other masks."""
    model = tiny_model(rng)
    B, T = 5, 29
    batch = tiny_batch(rng, B=2, T=T)
    ids = rng.integers(1, 53, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, 20:] = 0
    mask[3, 11:] = 0
    ids[mask == 0] = 0
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=(np.arange(T) >= 9).astype(np.int64)[None].repeat(B, 0),
                 start_positions=rng.integers(0, 10, B), end_positions=rng.integers(10, 19, B))
    windows = rng.choice(10_000, B, replace=False)

    def run(rows, window_ids, step=7):
        model.zero_grad()
        loss = model.forward_backward({k: v[rows] for k, v in batch.items()}, window_ids=window_ids[rows],
                                      rng_step=step)
        return loss, model.grads.copy()

    loss, grads = run(np.arange(B), windows)
    perm = rng.permutation(B)
    loss_p, grads_p = run(perm, windows)
    assert loss_p == pytest.approx(loss, rel=1e-6)
    assert np.abs(grads_p - grads).max() <= 1e-5 * np.abs(grads).max()
    # the same batch, windows named otherwise, or another step: other masks, other loss
    assert run(np.arange(B), windows + 1)[0] != pytest.approx(loss, rel=1e-6)
    assert run(np.arange(B), windows, step=8)[0] != pytest.approx(loss, rel=1e-6)
    # the default is window b for row b, at model.rng_step
    model.rng_step = 7
    model.zero_grad()
    assert model.forward_backward(batch) == run(np.arange(B), np.arange(B))[0]
    for bad, message in [(windows[:3], "window_ids"), (np.array([0, 1, -2, 3, 4]), "window_ids holds -2")]:
        with pytest.raises(ValueError, match=message):
            model.forward_backward(batch, window_ids=bad)


def test_training_computes_no_padding(rng):
    """Rows padded to another width train identically (the engine packs rows, and the span loss's softmax runs
    over each row's real tokens); a target on a padded position is ignored, like one at T."""
    model = tiny_model(rng)
    batch = tiny_batch(rng, B=2, T=31)   # row 0: 22 real tokens, 9 of padding

    def run(b, **kw):
        model.zero_grad()
        loss = model.forward_backward(b, rng_step=3, **kw)
        return loss, model.grads.copy()

    loss, grads = run(batch)
    wide = {k: (np.pad(v, ((0, 0), (0, 9))) if v.ndim == 2 else v) for k, v in batch.items()}   # T 31 -> 40
    loss_w, grads_w = run(wide)
    assert loss_w == pytest.approx(loss, rel=1e-6)
    assert np.abs(grads_w - grads).max() <= 1e-6 * np.abs(grads).max()
    # start position 25 of row 0 lies in its padding (22 real tokens): ignored, as position T would be
    a = dict(batch, start_positions=np.array([25, batch["start_positions"][1]]))
    b = dict(batch, start_positions=np.array([31, batch["start_positions"][1]]))
    assert run(a)[0] == run(b)[0]


def test_same_seed_same_loss_curve(rng):
    state = rng.integers(2**31)
    curves = []
    for _ in range(2):
        r = np.random.default_rng(state)
        model = tiny_model(r)
        batch = tiny_batch(r)
        curves.append([model.train_step(batch, lr=1e-3) for _ in range(4)])
    assert curves[0] == curves[1]
    assert len(set(curves[0])) == 4   # dropout masks and parameters change every step


def test_profile_accounts_each_kind_of_work(rng):
    model = tiny_model(rng)
    batch = tiny_batch(rng)
    model.forward(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    p = model.profile(reset=True)
    assert p["forward.linear"] > 0 and p["forward.attention"] > 0
    assert all(p[k] == 0 for k in p if not k.startswith("forward.")), p
    assert model.profile() == dict.fromkeys(p, 0.0)   # reset zeroed it
    t0 = time.perf_counter()
    model.train_step(batch, lr=1e-3)
    wall = time.perf_counter() - t0
    p = model.profile()
    expected = {f"forward.{k}" for k in ("embedding", "linear", "attention", "layernorm", "gelu",
                                         "dropout_residual", "head")}
    expected |= {f"backward.{k}" for k in ("loss_head", "linear", "attention", "layernorm", "gelu",
                                           "dropout_residual", "embedding", "zero")} | {"adamw"}
    assert set(p) == expected
    assert all(v > 0 for v in p.values()), p
    assert sum(p.values()) <= wall   # parts of one step, timed inside it


def test_repeated_steps_fit_one_batch(rng):
    # initialised as transformers initialises BERT (normal(0, 0.02) weights, LayerNorm 1 and 0, zero biases)
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02)
    model = BertQA(config, seed=int(rng.integers(2**31)))
    batch = tiny_batch(rng)
    losses = [model.train_step(batch, lr=3e-3, max_grad_norm=1.0) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_gradient_accumulation_equals_one_big_batch(rng):
    model = tiny_model(rng, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batch = tiny_batch(rng, B=2)
    # the span loss averages over the rows whose positions are inside the sequence: with every row valid, two
    # half-batches at loss_scale 0.5 give the gradient of the whole batch
    batch["end_positions"] = np.array([7, 20])
    model.zero_grad()
    model.forward_backward(batch)
    full = model.grads.copy()
    model.zero_grad()
    for i in range(2):
        model.forward_backward({k: v[i:i + 1] for k, v in batch.items()}, loss_scale=0.5)
    # float32 sums over one batch of 2 or two of 1 differ in order, and small elements are sums of cancelling terms:
    # those are held to 1e-3 of the largest gradient (a wrong loss_scale or a dropped row is off by 50% everywhere)
    np.testing.assert_allclose(model.grads, full, rtol=1e-4, atol=1e-3 * np.abs(full).max())


def test_weight_decay_rule():
    names = list(checkpoint.expected_shapes(tiny_config()))
    decayed = [n for n in names if not no_weight_decay(n)]
    assert "bert.embeddings.LayerNorm.weight" not in decayed
    assert "bert.encoder.layer.0.attention.self.query.bias" not in decayed
    assert "bert.encoder.layer.1.output.LayerNorm.weight" not in decayed
    assert "bert.encoder.layer.0.intermediate.dense.weight" in decayed
    assert "bert.embeddings.word_embeddings.weight" in decayed and "qa_outputs.weight" in decayed


def test_optimizer_applies_decay_only_where_it_should(rng):
    model = tiny_model(rng)
    model.zero_grad()   # zero gradients: the only change AdamW makes is the decay
    before = model.params.copy()
    model.optimizer_step(lr=0.1, weight_decay=0.5, max_grad_norm=0.0)
    for name in model.layout:
        factor = 1 - 0.1 * 0.5 if not no_weight_decay(name) else 1.0
        np.testing.assert_allclose(model.tensor(name), model.tensor(name, before) * np.float32(factor), rtol=1e-6,
                                   err_msg=name)


def test_layerwise_lr_scale_follows_the_electra_rule():
    config = tiny_config(num_hidden_layers=3)
    names = list(checkpoint.expected_shapes(config))
    scale = dict(zip(names, layerwise_lr_scale(names, 3, 0.5)))
    assert scale["qa_outputs.weight"] == scale["qa_outputs.bias"] == 1.0
    assert scale["bert.encoder.layer.2.output.dense.weight"] == 1.0          # top layer: the peak lr
    assert scale["bert.encoder.layer.1.attention.self.key.bias"] == 0.5
    assert scale["bert.encoder.layer.0.output.LayerNorm.weight"] == 0.25
    assert scale["bert.embeddings.word_embeddings.weight"] == scale["bert.embeddings.LayerNorm.bias"] == 0.125
    assert set(layerwise_lr_scale(names, 3, 1.0)) == {1.0}
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="layer-wise lr decay"):
            layerwise_lr_scale(names, 3, bad)


def test_lr_scale_steps_match_a_float64_adamw(rng):
    """Three AdamW steps with per-tensor lr multipliers (random, some 0), weight decay and clipping, on fresh random
    gradients, against reference.adamw per tensor at lr * scale. Tolerance 2e-6 relative to max(|p|, lr):
    float32 rounding of three updates."""
    model = tiny_model(rng)
    names = list(model.layout)
    scale = rng.uniform(0.1, 2.0, len(names)).astype(np.float32)
    scale[rng.integers(len(names))] = 0.0
    lr, wd, max_norm = 3e-2, 0.1, 5.0
    p = {n: model.tensor(n).astype(np.float64) for n in names}
    m = {n: np.zeros_like(p[n]) for n in names}
    v = {n: np.zeros_like(p[n]) for n in names}
    for step in (1, 2, 3):
        model.zero_grad()
        model.grads[...] = rng.standard_normal(model.grads.shape).astype(np.float32) * 0.3
        norm = float(np.sqrt(np.sum(model.grads.astype(np.float64) ** 2)))
        clip = min(1.0, max_norm / (norm + 1e-6))
        grads = {n: model.gradient(n).astype(np.float64) for n in names}
        got = model.optimizer_step(lr, weight_decay=wd, max_grad_norm=max_norm, lr_scale=scale)
        assert got == pytest.approx(norm, rel=1e-6)
        for i, n in enumerate(names):
            p[n], m[n], v[n] = reference.adamw(p[n], grads[n], m[n], v[n], step, lr * float(scale[i]),
                                               wd=0.0 if no_weight_decay(n) else wd, grad_scale=clip)
    for i, n in enumerate(names):
        err = np.abs(model.tensor(n) - p[n]).max() / max(np.abs(p[n]).max(), lr)
        assert err < 2e-6, (n, scale[i], err)
    frozen = names[int(np.flatnonzero(scale == 0)[0])]   # scale 0: the tensor does not move (nor decay)
    assert np.array_equal(model.tensor(frozen), p[frozen].astype(np.float32))


def test_lr_scale_of_ones_is_the_plain_step(rng):
    a = tiny_model(rng)
    b = BertQA(a.config, a.state_dict(), seed=a.seed)
    grads = rng.standard_normal(a.params.shape).astype(np.float32)
    for model, scale in ((a, None), (b, np.ones(len(b.layout), np.float32))):
        model.zero_grad()
        model.grads[...] = grads
        model.optimizer_step(1e-2, lr_scale=scale)
    np.testing.assert_array_equal(a.params, b.params)


def test_bad_lr_scale_is_refused(rng):
    model = tiny_model(rng)
    model.zero_grad()
    n = len(model.layout)
    for bad, err, words in ((np.ones(n - 1, np.float32), ValueError, "lr_scale"),
                            (np.ones((n, 1), np.float32), ValueError, "lr_scale"),
                            (np.full(n, -1.0, np.float32), ValueError, "lr_scale"),
                            (np.full(n, np.nan, np.float32), ValueError, "lr_scale")):
        before = model.params.copy()
        with pytest.raises((TypeError, ValueError), match=words):
            model._engine.adamw_step(model._decay, 1, 1e-3, lr_scale=bad)
        np.testing.assert_array_equal(model.params, before)
    with pytest.raises(TypeError, match="lr_scale must have dtype float32"):
        model._engine.adamw_step(model._decay, 1, 1e-3, lr_scale=np.ones(n))


def test_non_finite_gradient_skips_the_step(rng):
    model = tiny_model(rng)
    model.zero_grad()
    model.grads[5] = np.nan
    before = model.params.copy()
    norm = model.optimizer_step(1e-3)
    assert not np.isfinite(norm)
    np.testing.assert_array_equal(model.params, before)
    assert model.step == 0


def test_save_reload_bit_identical(tmp_path, rng):
    model = tiny_model(rng)
    model.train_step(tiny_batch(rng), lr=1e-3)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(48)]) + "\n")
    from bertqa.tokenization import BertQATokenizer
    model.tokenizer = BertQATokenizer.from_vocab(vocab)
    model.save_pretrained(tmp_path / "saved")
    for f in ("config.json", "model.safetensors", "vocab.txt"):
        assert (tmp_path / "saved" / f).is_file()
    again = BertQA.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(again.params, model.params)
    batch = tiny_batch(rng)
    for a, b in zip(again.forward(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]),
                    model.forward(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])):
        np.testing.assert_array_equal(a, b)


def test_training_state_round_trip(tmp_path, rng):
    model = tiny_model(rng)
    batch = tiny_batch(rng)
    for _ in range(2):
        model.train_step(batch, lr=1e-3)
    model.save_training_state(tmp_path / "state.npz")
    expected = [model.train_step(batch, lr=1e-3) for _ in range(2)]
    other = tiny_model(np.random.default_rng(0))
    other.load_training_state(tmp_path / "state.npz")
    assert [other.train_step(batch, lr=1e-3) for _ in range(2)] == expected
    with pytest.raises(ValueError, match="different model"):
        tiny_model(rng, num_hidden_layers=1).load_training_state(tmp_path / "state.npz")


def test_missing_head_is_initialised_from_seed(rng):
    config = tiny_config()
    tensors = {n: np.ones(s, np.float32) for n, s in checkpoint.expected_shapes(config).items()
               if not n.startswith("qa_outputs")}
    a, b = BertQA(config, tensors, seed=7), BertQA(config, tensors, seed=7)
    np.testing.assert_array_equal(a.tensor("qa_outputs.weight"), b.tensor("qa_outputs.weight"))
    assert not a.tensor("qa_outputs.bias").any()
    assert 0.2 < a.tensor("qa_outputs.weight").std() < 1.0   # normal(0, initializer_range = 0.5)
    c = BertQA(config, tensors, seed=8)
    assert not np.array_equal(a.tensor("qa_outputs.weight"), c.tensor("qa_outputs.weight"))


def test_bad_input(rng):
    model = tiny_model(rng)
    ids = np.ones((2, 5), np.int64)
    with pytest.raises(ValueError, match="input_ids holds 53"):
        model.forward(ids * 53)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.forward(np.ones((1, 41), np.int64))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model.forward(ids, attention_mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match="token_type_ids holds 2"):
        model.forward(ids, token_type_ids=ids * 2)
    with pytest.raises(TypeError, match="input_ids must hold integers"):
        model.forward(ids.astype(np.float32))
    with pytest.raises(ValueError, match="input_ids is empty"):
        model.forward(np.ones((0, 5), np.int64))
    with pytest.raises(KeyError, match="start_positions"):
        model.forward_backward({"input_ids": ids})
    with pytest.raises(ValueError, match="start_positions.shape"):
        model.forward_backward(dict(input_ids=ids, start_positions=np.zeros(3, int), end_positions=np.zeros(2, int)))
    import bertqa
    if not bertqa.cuda_available():
        with pytest.raises(RuntimeError, match="no CUDA backend"):
            BertQA(tiny_config(), device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        BertQA(tiny_config(), device="tpu")
    with pytest.raises(KeyError, match="no tensor"):
        model.tensor("bert.pooler.dense.weight")


def test_an_engine_refuses_calls_it_cannot_serve(rng):
    """The methods csrc/engine_methods.c shares, and the CPU engine's own, check the engine before its lock."""
    from bertqa._core import _C
    bare = _C.Engine.__new__(_C.Engine)   # __init__ never ran: no model, no lock
    calls = {"forward": (np.ones((1, 3), np.int64),), "forward_backward": (), "adamw_step": (),
             "tensor_sizes": (), "profile": (), "release_arena": (), "arena_bytes": ()}
    for name, args in calls.items():
        with pytest.raises(RuntimeError, match="Engine is not initialised"):
            getattr(bare, name)(*args)
    model = tiny_model(rng)
    inference = _C.Engine(model._engine_config(), model.params)
    assert inference.tensor_sizes() == [int(np.prod(shape)) for _, shape in model.layout.values()]
    batch = tiny_batch(rng)
    with pytest.raises(RuntimeError, match=r"built for inference \(no grads, m, v buffers\)"):
        inference.forward_backward(batch["input_ids"], None, batch["attention_mask"], batch["start_positions"],
                                   batch["end_positions"])
    with pytest.raises(RuntimeError, match="built for inference"):
        inference.adamw_step(np.zeros(len(model.layout), np.uint8), 1, 1e-3)
    start, end = inference.forward(batch["input_ids"], None, batch["attention_mask"])
    want = model.forward(batch["input_ids"], batch["attention_mask"])
    np.testing.assert_array_equal(start, want[0])
    np.testing.assert_array_equal(end, want[1])


def test_an_engine_init_that_failed_can_run_again_without_leaking(rng):
    """A failed Engine.__init__ (grads of the wrong size, after params was taken) leaves nothing behind: a second
    __init__ on the same object works, and once the engine is gone the arrays it was given are referenced as
    before (the first call's reference to params, and its lock, are released, not leaked)."""
    import sys
    from bertqa._core import _C
    model = tiny_model(rng)
    params = model.params.copy()
    before = sys.getrefcount(params)
    engine = _C.Engine.__new__(_C.Engine)
    with pytest.raises(ValueError, match="grads"):
        engine.__init__(model._engine_config(), params, np.zeros(3, np.float32), None, None)
    engine.__init__(model._engine_config(), params)
    batch = tiny_batch(rng)
    start, end = engine.forward(batch["input_ids"], None, batch["attention_mask"])
    want = model.forward(batch["input_ids"], batch["attention_mask"])
    np.testing.assert_array_equal(start, want[0])
    np.testing.assert_array_equal(end, want[1])
    with pytest.raises(RuntimeError, match="already initialised"):
        engine.__init__(model._engine_config(), params)
    del engine
    assert sys.getrefcount(params) == before


def test_concurrent_forward_calls_are_serialised(rng):
    import threading
    model = tiny_model(rng)
    batch = tiny_batch(rng)
    want = model.forward(batch["input_ids"], batch["attention_mask"])
    results, errors = [], []

    def run():
        try:
            for _ in range(20):
                results.append(model.forward(batch["input_ids"], batch["attention_mask"]))
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 80
    for s, e in results:
        np.testing.assert_array_equal(s, want[0])
        np.testing.assert_array_equal(e, want[1])


def test_torch_bin_checkpoint_runs_like_a_float64_numpy_bert(rng):
    """tests/fixtures/tiny_bert: a pytorch_model.bin written by torch (float16 / bfloat16 / strided tensors),
    loaded without torch; the engine's logits match an independent float64 NumPy BERT on the same weights."""
    from test_checkpoint import _numpy_bert_qa

    model = BertQA.from_pretrained(FIXTURES / "tiny_bert")
    assert model.tokenizer is None   # weights only: the model still runs on token ids
    B, T = 3, 13
    ids = rng.integers(1, model.config.vocab_size, (B, T))
    types = (np.arange(T) >= 5).astype(np.int64)[None].repeat(B, 0)
    mask = np.ones((B, T), np.int64)
    mask[1, 9:] = 0
    start, end = model.forward(ids, mask, types)
    ref_start, ref_end, _ = _numpy_bert_qa(model.state_dict(), model.config, ids, types, mask)
    real = mask == 1
    # float32 against float64 through every layer: over 400 seeds the worst error was 3.7e-5 at logits up to 4.3
    # (median 3e-6), so a flat 1e-5 failed a few seeds in a hundred; 1e-4 of the logits' scale, as the tests below
    # use, is several times that worst and far below what a wrong mask costs (0.56 on row 1 when it is ignored).
    scale = max(1.0, np.abs(ref_start[real]).max(), np.abs(ref_end[real]).max())
    np.testing.assert_allclose(start[real], ref_start[real], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(end[real], ref_end[real], rtol=0, atol=1e-4 * scale)


def test_inference_skips_padding_and_matches_float64(rng):
    """Eval packs the rows without their trailing padding (each row its own length in attention; every other
    kernel on real tokens only). Rows of very different lengths in one batch, a hole inside a row, a one-token row
    and an all-padding row: real positions match a float64 NumPy BERT and the same rows run one at a time;
    positions after a row's last real token read -inf."""
    from test_checkpoint import _numpy_bert_qa

    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64)
    model = BertQA(config, seed=int(rng.integers(2**31)))
    B, T = 6, 31
    lengths = [31, 17, 1, 23, 0, 9]
    ids = rng.integers(1, config.vocab_size, (B, T))
    types = (rng.random((B, T)) < 0.5).astype(np.int64)
    mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int64)
    mask[3, 5:8] = 0   # a hole inside row 3: masked as a key, still computed as a query
    start, end = model.forward(ids, mask, types)
    for b, L in enumerate(lengths):
        if L == 0:
            continue
        ref_s, ref_e, _ = _numpy_bert_qa(model.state_dict(), config, ids[b:b + 1, :L], types[b:b + 1, :L],
                                         mask[b:b + 1, :L])
        scale = max(1.0, np.abs(ref_s).max(), np.abs(ref_e).max())
        assert np.abs(start[b, :L] - ref_s[0]).max() < 1e-4 * scale, f"row {b} start"
        assert np.abs(end[b, :L] - ref_e[0]).max() < 1e-4 * scale, f"row {b} end"
        alone_s, alone_e = model.forward(ids[b:b + 1, :L], mask[b:b + 1, :L], types[b:b + 1, :L])
        np.testing.assert_allclose(start[b, :L], alone_s[0], atol=1e-4 * scale)
        np.testing.assert_allclose(end[b, :L], alone_e[0], atol=1e-4 * scale)
        assert np.all(start[b, L:] == -np.inf) and np.all(end[b, L:] == -np.inf), f"row {b} padding"
    # an all-padding row is computed in full, as if every token were real (every key gets the same -10000, which
    # leaves the scores only ~1e-3 accurate in float32, as in transformers)
    full_s, full_e = model.forward(ids[4:5], np.ones((1, T), np.int64), types[4:5])
    assert np.isfinite(start[4]).all()
    np.testing.assert_allclose(start[4], full_s[0], atol=2e-3 * max(1.0, np.abs(full_s).max()))
    np.testing.assert_allclose(end[4], full_e[0], atol=2e-3 * max(1.0, np.abs(full_e).max()))
    # the same batch with no padding at all takes the [B,T] path: row 0 (full length) agrees with it
    dense_s, _ = model.forward(ids, np.ones((B, T), np.int64), types)
    np.testing.assert_allclose(start[0], dense_s[0], atol=1e-4 * max(1.0, np.abs(dense_s[0]).max()))
