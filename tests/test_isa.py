"""The CPU kernels' run-time instruction set (csrc/cpu.h): the switches (BERTQA_CPU at import, ops.set_isa at run
time, runtime_info), and the AVX-512 variants against the AVX2 ones on the same inputs: bit for bit where the
two compute the same operations (GELU, AdamW, exp of a row, dropout masks and uniforms), within a stated number
of float32 ulps where a row sum is added in another order (LayerNorm, softmax, softmax backward, sum of
squares), and a whole training step of the engine. Sizes are awkward on purpose: lengths 1-15 (tail only), 16,
17, 31, 63-65, offsets that are not multiples of 4, Philox block counters that carry into their second word.
tests/test_ops.py, test_dropout.py and test_engine.py run their float64 comparisons under each ISA too."""
import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest

import reference as ref
from bertqa import ops
from bertqa._core import _C

ISAS = ops.runtime_info()["isas"]
needs_avx512 = pytest.mark.skipif("avx512" not in ISAS, reason=f"this CPU cannot run the AVX-512 kernels ({ISAS})")
LENGTHS = [1, 3, 7, 15, 16, 17, 31, 33, 63, 64, 65, 100, 385, 768]


@contextlib.contextmanager
def using(isa):
    ops.set_isa(isa)
    try:
        yield
    finally:
        ops.set_isa(os.environ.get("BERTQA_CPU") or "auto")


def both(fn, *args):
    """fn(*args) under AVX2, then under AVX-512: the two results (each a tuple of arrays)."""
    out = []
    for isa in ("avx2", "avx512"):
        with using(isa):
            r = fn(*args)
        out.append(tuple(np.array(a, copy=True) for a in (r if isinstance(r, tuple) else (r,))))
    return out


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32 if a.dtype == np.float32 else np.uint64)


def assert_bit_identical(a, b, name):
    for i, (x, y) in enumerate(zip(a, b)):
        diff = np.flatnonzero(bits(x) != bits(y))
        assert diff.size == 0, f"{name}[{i}]: {diff.size} elements differ, first at {diff[0]}: {x.flat[diff[0]]!r} vs {y.flat[diff[0]]!r}"


def assert_ulps(a, b, max_ulps, name):
    """|a - b| <= max_ulps float32 ulps of max(|a|, |b|, tiny) element by element."""
    for i, (x, y) in enumerate(zip(a, b)):
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        ulp = np.spacing(np.maximum(np.maximum(np.abs(x), np.abs(y)), np.float32(1e-30)).astype(np.float32))
        worst = (np.abs(x64 - y64) / ulp).max()
        assert worst <= max_ulps, f"{name}[{i}]: {worst:.1f} ulps apart (bound {max_ulps})"


# ---- the switches ------------------------------------------------------------------------------------------------

def test_runtime_info_and_set_isa():
    info = ops.runtime_info()
    assert info["isa"] in info["isas"] and "avx2" in info["isas"]
    want = os.environ.get("BERTQA_CPU") or "auto"
    if want == "auto":   # import picks the best this CPU runs
        assert info["isa"] == ("avx512" if "avx512" in info["isas"] else "avx2")
    try:
        assert ops.set_isa("avx2") == "avx2" and ops.runtime_info()["isa"] == "avx2"
        assert ops.set_isa("auto") == info["isas"][-1]
        with pytest.raises(ValueError, match="'avx2' or 'avx512'"):
            ops.set_isa("sse2")
        assert ops.runtime_info()["isa"] == info["isas"][-1]   # a refused switch changes nothing
    finally:
        ops.set_isa(want)


@pytest.mark.skipif("avx512" in ISAS, reason="this CPU runs AVX-512: the refusal is for CPUs without it")
def test_set_isa_avx512_refused_without_it():
    with pytest.raises(RuntimeError, match="cannot run it"):
        ops.set_isa("avx512")
    assert ops.runtime_info()["isa"] == "avx2"


def run_with_cpu(value):
    code = "from bertqa import ops; print(ops.runtime_info()['isa'])"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "BERTQA_CPU": value},
                          capture_output=True, text=True, timeout=120)


def test_environment_switch():
    r = run_with_cpu("avx2")
    assert r.returncode == 0 and r.stdout.split() == ["avx2"], r.stderr
    r = run_with_cpu("auto")
    assert r.returncode == 0 and r.stdout.split() == [ISAS[-1]], r.stderr
    r = run_with_cpu("avx512")
    if "avx512" in ISAS:
        assert r.returncode == 0 and r.stdout.split() == ["avx512"], r.stderr
    else:   # an error at import that says why, not a silent fallback
        assert r.returncode != 0 and "RuntimeError: BERTQA_CPU=avx512" in r.stderr and "avx512f" in r.stderr
    r = run_with_cpu("avx-512")
    assert r.returncode != 0 and "RuntimeError: BERTQA_CPU=avx-512: expected auto, avx2 or avx512" in r.stderr


# ---- elementwise kernels: bit for bit ------------------------------------------------------------------------------

def special_values(rng, n):
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    specials = np.array([0.0, -0.0, 1e-30, -1e-30, 5.5, -5.5, 13.0, -13.0, 30.0, -30.0, 200.0, -200.0], np.float32)
    x[: min(n, specials.size)] = specials[: min(n, specials.size)]
    return x


@needs_avx512
@pytest.mark.parametrize("n", LENGTHS + [8192 + 31, 100_003])
def test_gelu_bit_identical(rng, n):
    x, dy = special_values(rng, n), rng.standard_normal(n).astype(np.float32)
    a, b = both(lambda: (ops.gelu(x), ops.gelu_backward(dy, x)))
    assert_bit_identical(a, b, "gelu, gelu_backward")
    np.testing.assert_allclose(a[0], ref.gelu(x), rtol=0, atol=1e-6 * max(1, np.abs(x).max()))


@needs_avx512
@pytest.mark.parametrize("n", [1, 17, 63, 16384 + 16 + 7, 100_003])
def test_adamw_bit_identical(rng, n):
    p0, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    m0, v0 = (rng.standard_normal(n) * 0.1).astype(np.float32), (rng.random(n) * 0.01).astype(np.float32)

    def steps():
        p, m, v = p0.copy(), m0.copy(), v0.copy()
        for step in (1, 7):
            ops.adamw(p, g, m, v, step, 3e-4, 0.9, 0.98, 1e-6, 0.01, grad_scale=0.5)
        return p, m, v

    a, b = both(steps)
    assert_bit_identical(a, b, "adamw p, m, v")


@needs_avx512
@pytest.mark.parametrize("n", [1, 13, 16, 17, 16384 + 9, 1_000_003])
def test_sum_squares_within_double_rounding(rng, n):
    g = [rng.standard_normal(n).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    a, b = both(lambda: np.float64(ops.global_norm(g)))
    want = np.sqrt(sum((t.astype(np.float64) ** 2).sum() for t in g))
    assert abs(a[0] - b[0]) <= 1e-14 * want and abs(b[0] - want) <= 1e-12 * want


# ---- dropout: the same masks bit for bit (the RNG is shared with the CUDA backend) -----------------------------------

@needs_avx512
@pytest.mark.parametrize("first", [0, 1, 2, 3, 4 * 37 + 2, 2**33 + 5, 4 * (2**32 - 9) - 1])
@pytest.mark.parametrize("n", [1, 3, 5, 31, 63, 64, 65, 127, 200, 4096 + 37])
def test_dropout_slice_every_mode_bit_identical(rng, first, n):
    """Every mode of the slice kernel at offsets off a multiple of 4 and counters whose 16-block group carries into
    the second word of the Philox counter, against the scalar reference's uniform >= p too."""
    seed, step, tid = int(rng.integers(2**64, dtype=np.uint64)), int(rng.integers(2**32)), int(rng.integers(2**32))
    x = special_values(rng, n)
    y0 = rng.standard_normal(n).astype(np.float32)
    for p in (0.0, 0.1, 0.5, 2**-24, 1 - 2**-20):
        def modes():
            out = []
            for mode in range(4):
                y = y0.copy()
                _C._dropout_slice(y, x if mode < 2 else None, p, seed, step, tid, first, mode)
                out.append(y)
            return tuple(out)

        a, b = both(modes)
        assert_bit_identical(a, b, f"dropout modes apply/accumulate/mask/uniform, p={p}")
        u = a[3]
        want = [ref.uniform(first + i, seed, step, tid) for i in range(min(n, 70))]
        np.testing.assert_array_equal(u[: len(want)], np.array(want, np.float32))
        keep = u >= np.float32(p)
        scale = np.float32(1) / (np.float32(1) - np.float32(p))
        np.testing.assert_array_equal(a[2], np.where(keep, scale, np.float32(0)))
        np.testing.assert_array_equal(a[0], x * np.where(keep, scale, np.float32(0)))


@needs_avx512
def test_dropout_tensor_and_attention_masks_bit_identical(rng):
    x = rng.standard_normal((3, 37, 45)).astype(np.float32)
    a, b = both(lambda: (ops.dropout(x, 0.1, 99, 3, 4), ops.dropout_backward(x, 0.1, 99, 3, 4)))
    assert_bit_identical(a, b, "dropout, dropout_backward")
    # attention's probabilities: rows of T = 37 numbered with P = T, so most rows start off a multiple of 4
    q, k, v = (rng.standard_normal((2, 3, 37, 8)).astype(np.float32) for _ in range(3))
    u = _C.uniform(2 * 3 * 37 * 37, 5, 2, 7)
    keep = (u >= np.float32(0.3)).reshape(2, 3, 37, 37)
    for isa in ("avx2", "avx512"):
        with using(isa):
            out = ops.attention(q, k, v, None, 0.3, 5, 2, 7)
        np.testing.assert_allclose(out, ref.attention(q, k, v, None, keep, 0.3), rtol=0, atol=2e-5 * np.abs(out).max())


# ---- attention's row kernels ---------------------------------------------------------------------------------------

def softmax64(x, mask=None):
    x = x.astype(np.float64) + (0.0 if mask is None else (1.0 - mask.astype(np.float64)) * -10000.0)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("T", LENGTHS)
def test_row_kernels_against_float64(rng, T):
    x = (rng.standard_normal((5, T)) * 4).astype(np.float32)
    mask = (rng.random((5, T)) < 0.8).astype(np.float32)
    mask[:, 0] = 1
    for mk in (None, mask):
        got = _C._softmax_rows(x, mk)
        np.testing.assert_allclose(got, softmax64(x, mk), rtol=2e-6, atol=1e-7)
    y, sums, maxs = _C._exp_rows(x, 1.5)
    want = np.exp((x - np.float32(1.5)).astype(np.float64))   # exp of the float32 difference: relative 2e-7
    np.testing.assert_allclose(y, want, rtol=3e-7)
    np.testing.assert_allclose(sums, want.sum(1), rtol=3e-6)
    np.testing.assert_array_equal(maxs, x.max(1))
    a = softmax64(x).astype(np.float32)
    g = rng.standard_normal((5, T)).astype(np.float32)
    keep = np.where(rng.random((5, T)) < 0.9, np.float32(1 / 0.9), np.float32(0))
    for mk in (None, keep):
        gm = g.astype(np.float64) * (1.0 if mk is None else mk)
        want = 0.125 * a * (gm - (gm * a).sum(1, keepdims=True))
        got = _C._softmax_backward_rows(g, a, mk, 0.125)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * max(1.0, np.abs(want).max()))


@needs_avx512
@pytest.mark.parametrize("T", LENGTHS)
def test_row_kernels_avx512_against_avx2(rng, T):
    """exp and max bit for bit; a normalised row within 16 ulps (its sum adds in another order: measured up to 10
    ulps over 2,000 rows of 768), the softmax-backward row within 16 ulps of the size of its terms (they cancel;
    measured up to 8 over 2,000 rows of 768 or 1,024)."""
    x = (rng.standard_normal((7, T)) * 4).astype(np.float32)
    x[0, : min(T, 3)] = [-200.0, 90.0, -0.0][: min(T, 3)]   # exp's clamps
    mask = (rng.random((7, T)) < 0.7).astype(np.float32)
    a, b = both(lambda: _C._exp_rows(x, 2.0)[0::2])
    assert_bit_identical(a, b, "exp_rows, max_rows")
    for mk in (None, mask):
        a, b = both(_C._softmax_rows, x, mk)
        assert_ulps(a, b, 16, "softmax_rows")
    p = _C._softmax_rows(x)
    g = rng.standard_normal((7, T)).astype(np.float32)
    keep = np.where(rng.random((7, T)) < 0.9, np.float32(1 / 0.9), np.float32(0))
    for mk in (None, keep):
        (ga,), (gb,) = both(_C._softmax_backward_rows, g, p, mk, 0.125)
        # g_j = scale a_j (gm_j - dot): the dot's rounding (a few ulps of sum |gm a|) reaches g_j times scale a_j
        gm = np.abs(g * (1 if mk is None else mk)).astype(np.float64)
        size = 0.125 * p * (gm + (gm * p).sum(1, keepdims=True))
        assert (np.abs(ga.astype(np.float64) - gb) <= 16 * np.spacing(size.astype(np.float32)) + 1e-44).all(), \
            "softmax_backward_rows"


# ---- LayerNorm ---------------------------------------------------------------------------------------------------

@needs_avx512
@pytest.mark.parametrize("C", [1, 7, 16, 36, 45, 129, 384, 768, 1000])
def test_layernorm_avx512_against_avx2(rng, C):
    """Mean and variance add in another order: y, dx and the parameter gradients within a few ulps of the
    largest value (relative to max |.|: entries near 0 cancel)."""
    x = (rng.standard_normal((37, C)) * 3 + 1).astype(np.float32)
    w, bias = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    dy = rng.standard_normal((37, C)).astype(np.float32)
    a, b = both(lambda: (ops.layernorm(x, w, bias, 1e-5),) + tuple(ops.layernorm_backward(dy, x, w, 1e-5)))
    for name, u, v in zip(["y", "dx", "dweight", "dbias"], a, b):
        assert np.abs(u - v).max() <= 16 * np.spacing(np.float32(max(np.abs(u).max(), 1e-30))), name
    assert_bit_identical(a[3:], b[3:], "dbias (sums of dy only: the same order)")


# ---- the engine: one training step under each ---------------------------------------------------------------------

@needs_avx512
@pytest.mark.parametrize("hidden,heads,T", [(36, 3, 37), (128, 4, 100)])
def test_engine_training_step_avx512_against_avx2(rng, hidden, heads, T):
    """Forward + backward of a random model (dropout on): the same loss and gradients within float32 round-off
    (LayerNorm and softmax sums reordered); with the same dropout masks, as a bit-identical RNG gives."""
    from bertqa import checkpoint
    from bertqa.config import BertConfig
    from bertqa.model import BertQA

    config = BertConfig.from_dict(dict(
        vocab_size=61, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=4 * hidden + 5, max_position_embeddings=T + 3, type_vocab_size=2, hidden_act="gelu",
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, initializer_range=0.1))
    tensors = {name: (rng.standard_normal(shape) * 0.1).astype(np.float32)
               for name, shape in checkpoint.expected_shapes(config).items()}
    B = 3
    ids = rng.integers(1, 61, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[0, T - 9:] = 0
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros((B, T), np.int64),
                 start_positions=np.array([1, 5, T - 2]), end_positions=np.array([3, 9, T - 1]))
    results = []
    for isa in ("avx2", "avx512"):
        with using(isa):
            model = BertQA(config, tensors, seed=11)
            model.zero_grad()
            model.rng_step = 2
            loss = model.forward_backward(batch)
            results.append((loss, model.grads.copy()))
    (la, ga), (lb, gb) = results
    assert abs(la - lb) <= 1e-6 * abs(la), (la, lb)
    floor = 1e-6 * np.abs(ga).max()   # for gradients that are round-off themselves (the last LayerNorm's bias: ~1e-9)
    for name, (offset, shape) in BertQA(config, tensors).layout.items():
        n = int(np.prod(shape))
        u, v = ga[offset:offset + n], gb[offset:offset + n]
        assert np.abs(u - v).max() <= 1e-4 * np.abs(u).max() + floor, name
