"""bf16 and int8 matrix products on the CPU (csrc/gemm_lowp_avx512.c) against float64 NumPy, and the engine in
those precisions against its own fp32 logits and gradients on real tokens (issue 23).

The tolerances, derived (u32 = 2^-24, float32's unit roundoff):

bf16 product, C = sum_k bf16(a_k) bf16(b_k) summed in float32.
  * bf16 keeps 8 significant bits (7 stored): rounding to nearest makes |bf16(x) - x| <= 2^-8 |x| (u = 2^-p).
  * A product of two bf16 numbers has at most 16 significant bits: exact in float32. What remains is the float32
    sum of K products, each addition rounding once: |C - S| <= K u32 sum_k |a_k b_k| (the standard bound gamma_K
    for recursive summation, K u / (1 - K u), within 1% of K u for K < 40,000). S is the sum computed in float64
    from the bf16-rounded operands (an exact reference: every bf16 product is exact in float64 too).
  => test 1: |C - S| <= K u32 sum_k |bf16(a_k) bf16(b_k)| (with the rounding done here, independently, on the
     float32 bits), which catches any misplaced, dropped or doubled term (each term is far above the bound).
  => test 2 (that it is bf16 and no coarser): against the unrounded float64 product,
     |C - A B| <= ((1 + 2^-8)^2 - 1 + K u32 (1 + 2^-8)^2) sum_k |a_k b_k|.

int8 product, C = sa sw (sum_k qa qw - za sum_k qw) with qw = round(w * (127 / max|w_n|)) per output channel n
(symmetric) and, per row (or per tensor), qa = round(a * 255 / (hi - lo)) + za in [0, 255] with [lo, hi] the
range of the row and 0, za = round(-lo * 255 / (hi - lo)) (asymmetric, u8), each computed in float32 as the
kernel does.
  * The integer sums are exact (|sum| <= 255 * 127 * K < 2^31), so emulating the quantization in float32 here
    gives the kernel's integers exactly; the float32 epilogue (int -> float, two products) rounds 3 times:
    |C - C_emulated| <= 4 u32 |C_emulated| (plus the accumulate case's one addition).
  => test 3: the emulation, to 4 ulps.
  => test 4 (that the quantization is what it claims): against the exact product, a weight is off by at most half
     its step sw/2, an activation by at most its step sa (half a step from rounding; the top of the range may
     round one past 255 and be clamped): |C - A B| <= sum_k (|a_k| sw/2 + |w_k| sa + sa sw/2) (1 + 2^-20).

bf16 attention forward (inference): scores from q, K rounded to bf16 and summed in float32 (|error| <= HS u32
sum_d |q_d k_d| / sqrt(HS) =: e_s per score), the probabilities rounded to bf16 before P V (2^-8 relative each), V
rounded: against float64 attention of the rounded q, K, V, |out - ref| <= (2^-8 + 2 e_s) sum_j p_j |v_j| (a score
off by e_s moves exp by a factor within 1 +- 2 e_s for e_s < 1/2; the row sums take the same unrounded exps).
  => test 5 (and padding, a masked key, odd head sizes, rows of 1 token).

Engine level (test 6, 7): these bounds compose through 6 layers of LayerNorm, softmax and GELU, where a worst
case says little; there the bounds are the measured error times ~3 (on this CPU, 2026-12-05, RMS error over the
logits' standard deviation: bf16 0.54%, int8 with a scale per token 4.4%, per tensor 14.9%; bf16 gradients
measured below), with the argmax of the start and end logits equal to fp32's on the real tokens of the
transformers reference.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertqa._core import _C
from qa_helpers import needs_minilm

ROOT = Path(__file__).resolve().parent.parent
U32 = 2.0 ** -24
PRECISIONS = _C.runtime_info()["precisions"]


def needs(precision):
    why = PRECISIONS.get(precision)
    return pytest.mark.skipif(why is not None, reason=f"precision {precision!r} on this CPU {why}")


def bf16_round(x):
    """float32 -> nearest bf16 (ties to even) as float32, on the bits (independent of the C code)."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32).reshape(np.shape(x))


def op(x, t):
    return x.T if t else x


# awkward shapes: odd K (a zero-padded pair), M and N off the 12 x 32 tiles, K across the 768-wide blocks, tiny ones
BF16_SHAPES = [(1, 1, 1), (5, 3, 7), (13, 33, 2), (37, 45, 29), (130, 70, 33), (200, 100, 771), (97, 31, 1539),
               (384, 96, 384)]


@needs("bf16")
@pytest.mark.parametrize("M,N,K", BF16_SHAPES)
@pytest.mark.parametrize("ta,tb", [(0, 1), (0, 0), (1, 0), (1, 1)])
def test_bf16_product_is_the_rounded_operands_summed_in_float32(rng, M, N, K, ta, tb):
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32) * rng.uniform(0.1, 10)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    c = rng.standard_normal((M, N)).astype(np.float32)
    for accumulate in (False, True):
        out = c.copy()
        _C._gemm_bf16(a, b, out, ta, tb, accumulate)
        A, B = op(bf16_round(a).astype(np.float64), ta), op(bf16_round(b).astype(np.float64), tb)
        S = A @ B + (c if accumulate else 0.0)
        bound = (K + accumulate) * U32 * (np.abs(A) @ np.abs(B) + (np.abs(c) if accumulate else 0.0))
        err = np.abs(out - S)
        assert (err <= bound * 1.01 + 1e-30).all(), f"worst {float((err / (bound + 1e-30)).max()):.3f} of the bound"
        # and it is bf16: against the unrounded product, within the rounding bound (and not much better)
        E = op(a.astype(np.float64), ta) @ op(b.astype(np.float64), tb) + (c if accumulate else 0.0)
        mag = np.abs(op(a, ta)).astype(np.float64) @ np.abs(op(b, tb)).astype(np.float64)
        rb = ((1 + 2.0 ** -8) ** 2 - 1 + (K + 1) * U32 * (1 + 2.0 ** -8) ** 2) * mag
        assert (np.abs(out - E) <= rb * 1.01 + (K + 1) * U32 * np.abs(c)).all()
    if K >= 29:   # the operands really are rounded: the error against the exact product is far above float32's
        assert np.abs(out - E).max() > 100 * K * U32 * np.abs(E).max() / np.sqrt(K)


@needs("bf16")
def test_bf16_product_of_the_engine_shapes(rng):
    """Training's three forms at MiniLM's shapes: forward x W^T, dX = dY W, dW = dY^T X (tokens inside)."""
    N_tok, C, I = 203, 384, 1536
    x = rng.standard_normal((N_tok, C)).astype(np.float32)
    w = (rng.standard_normal((I, C)) * 0.05).astype(np.float32)
    dy = rng.standard_normal((N_tok, I)).astype(np.float32)
    for a, b, ta, tb in ((x, w, 0, 1), (dy, w, 0, 0), (dy, x, 1, 0)):
        M, K, N = op(a, ta).shape[0], op(a, ta).shape[1], op(b, tb).shape[1]
        out = np.empty((M, N), np.float32)
        _C._gemm_bf16(a, b, out, ta, tb, False)
        A, B = op(bf16_round(a).astype(np.float64), ta), op(bf16_round(b).astype(np.float64), tb)
        assert (np.abs(out - A @ B) <= K * U32 * (np.abs(A) @ np.abs(B)) * 1.01).all()


def quantize_rows(x):
    """The kernel's symmetric weight quantization, emulated in float32: per row of x, q = round(x * (127 / max|x|))."""
    x = np.asarray(x, np.float32)
    mx = np.abs(x).max(axis=1).astype(np.float32)
    inv = np.where(mx > 0, np.float32(127) / np.where(mx > 0, mx, 1), 0).astype(np.float32)
    q = np.clip(np.rint(x * inv[:, None]), -127, 127)
    return q.astype(np.int64), (mx / np.float32(127)).astype(np.float32)


def quantize_activations(x):
    """The kernel's asymmetric u8 activation quantization, emulated in float32, per row of x: (q, scale, zero)."""
    x = np.asarray(x, np.float32)
    lo, hi = np.minimum(x.min(axis=1), 0).astype(np.float32), np.maximum(x.max(axis=1), 0).astype(np.float32)
    rng_ = (hi - lo).astype(np.float32)
    inv = np.where(rng_ > 0, np.float32(255) / np.where(rng_ > 0, rng_, 1), 0).astype(np.float32)
    z = np.rint(-lo * inv).astype(np.int64)
    q = np.clip(np.rint(x * inv[:, None]).astype(np.int64) + z[:, None], 0, 255)
    return q, (rng_ / np.float32(255)).astype(np.float32), z


INT8_SHAPES = [(1, 1, 1), (5, 3, 7), (13, 33, 6), (37, 45, 29), (130, 70, 33), (203, 100, 771), (97, 31, 1539)]


@needs("int8")
@pytest.mark.parametrize("M,N,K", INT8_SHAPES)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_int8_product_is_the_quantized_operands(rng, M, N, K, per_tensor):
    a = (rng.standard_normal((M, K)) * rng.uniform(0.1, 10, (M, 1))).astype(np.float32)
    a[M // 2] = 0.0   # a row of zeros (scale 0)
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 1, (N, 1))).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    qw, sw = quantize_rows(w)
    if per_tensor:
        qa, sa1, za1 = quantize_activations(a.reshape(1, -1))
        qa, sa, za = qa.reshape(M, K), np.full(M, sa1[0], np.float32), np.full(M, za1[0])
    else:
        qa, sa, za = quantize_activations(a)
    acc = qa @ qw.T - za[:, None] * qw.sum(axis=1)[None, :]   # exact integers
    emul = (acc.astype(np.float32) * sw[None, :]) * sa[:, None]
    for accumulate in (False, True):
        out = c0.copy()
        _C._gemm_i8(a, w, out, per_tensor, accumulate)
        want = emul + c0 if accumulate else emul
        tol = 4 * U32 * (np.abs(emul) + (np.abs(want) + np.abs(c0) if accumulate else 0))
        assert (np.abs(out - want) <= tol + 1e-37).all(), np.abs(out - want).max()
    # and the quantization is per channel / per row as claimed: within half a step of each operand
    out = np.empty((M, N), np.float32)
    _C._gemm_i8(a, w, out, per_tensor, False)
    E = a.astype(np.float64) @ w.T.astype(np.float64)
    s_a, s_w = sa.astype(np.float64)[:, None], sw.astype(np.float64)[None, :]
    bound = (np.abs(a) @ np.ones((K, 1)) * s_w / 2 + s_a * (np.ones((1, K)) @ np.abs(w).T) + K * s_a * s_w / 2)
    assert (np.abs(out - E) <= bound * (1 + 2.0 ** -20) + 1e-30).all()


def gelu_f32(x):
    """GELU as the engine's own pass computes it (_gelu_into: gelu_forward, float32)."""
    out = np.empty_like(x)
    _C._gelu_into(out, x)
    return out


@needs("bf16")
@pytest.mark.parametrize("M,N,K", BF16_SHAPES)
@pytest.mark.parametrize("ta", [0, 1])
def test_bf16_product_epilogue_adds_the_bias_then_gelu(rng, M, N, K, ta):
    """The inference products' epilogue: the bias is one more float32 summand (test 1's bound with K + 1 terms),
    and GELU is applied as the last k block stores, bit for bit the separate GELU pass on the same sums."""
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) * 0.2).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    with_bias, fused = np.empty((M, N), np.float32), np.empty((M, N), np.float32)
    _C._gemm_bf16(a, w, with_bias, ta, 1, False, bias=bias)
    A, B = op(bf16_round(a).astype(np.float64), ta), bf16_round(w).astype(np.float64).T
    bound = (K + 1) * U32 * (np.abs(A) @ np.abs(B) + np.abs(bias))
    assert (np.abs(with_bias - (A @ B + bias)) <= bound * 1.01 + 1e-30).all()
    _C._gemm_bf16(a, w, fused, ta, 1, False, bias=bias, gelu=True)
    np.testing.assert_array_equal(fused, gelu_f32(with_bias))
    c = rng.standard_normal((M, N)).astype(np.float32)   # accumulating: GELU of c + the product
    summed, fused = c.copy(), c.copy()
    _C._gemm_bf16(a, w, summed, ta, 1, True)
    _C._gemm_bf16(a, w, fused, ta, 1, True, gelu=True)
    np.testing.assert_array_equal(fused, gelu_f32(summed))


@needs("int8")
@pytest.mark.parametrize("M,N,K", INT8_SHAPES)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_int8_product_epilogue_adds_the_bias_then_gelu(rng, M, N, K, per_tensor):
    """As for bf16: the bias is one more float32 addition after test 3's epilogue (one more rounding), GELU bit for
    bit the separate pass."""
    a = (rng.standard_normal((M, K)) * rng.uniform(0.1, 10, (M, 1))).astype(np.float32)
    w = (rng.standard_normal((N, K)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    plain, with_bias, fused = (np.empty((M, N), np.float32) for _ in range(3))
    _C._gemm_i8(a, w, plain, per_tensor, False)
    _C._gemm_i8(a, w, with_bias, per_tensor, False, bias=bias)
    want = plain.astype(np.float64) + bias
    assert (np.abs(with_bias - want) <= U32 * np.abs(want) + 1e-37).all()
    _C._gemm_i8(a, w, fused, per_tensor, False, bias=bias, gelu=True)
    np.testing.assert_array_equal(fused, gelu_f32(with_bias))


@needs("bf16")
@pytest.mark.parametrize("lens,NH,HS", [([37, 5, 200], 3, 15), ([384], 12, 32), ([1, 64, 65, 130], 2, 64),
                                        ([100], 1, 7)])
def test_bf16_attention_forward_is_the_rounded_operands(rng, lens, NH, HS):
    off = np.concatenate([[0], np.cumsum(lens)])
    N, Tpad = int(off[-1]), max(lens)
    q, k, v = [(rng.standard_normal((N, NH, HS)) * s).astype(np.float32) for s in (1.5, 1.5, 1.0)]
    mask = np.zeros((len(lens), Tpad), np.float32)
    for b, L in enumerate(lens):
        mask[b, :L] = 1
        if L > 1:
            mask[b, rng.integers(0, L)] = 0   # a hole
    out = _C.attention_rows(q, k, v, off, mask, isa="bf16")
    for b, L in enumerate(lens):
        sl = slice(off[b], off[b + 1])
        Q, K, V = [bf16_round(x[sl]).astype(np.float64) for x in (q, k, v)]
        s = np.einsum("ihd,jhd->hij", Q, K) / np.sqrt(HS) + (1 - mask[b, :L])[None, None, :] * -10000
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref = np.einsum("hij,jhd->ihd", p, V)
        e_s = HS * U32 * np.einsum("ihd,jhd->hij", np.abs(Q), np.abs(K)).max() / np.sqrt(HS)
        bound = (2.0 ** -8 + 2 * e_s) * np.einsum("hij,jhd->ihd", p, np.abs(V))
        assert (np.abs(out[sl] - ref) <= bound * 1.01 + 1e-30).all()
    with pytest.raises(ValueError, match="no dropout_p"):
        _C.attention_rows(q, k, v, off, mask, dropout_p=0.1, isa="bf16")


def test_bad_arguments_are_clear_errors(rng):
    a, b = np.ones((4, 5), np.float32), np.ones((3, 6), np.float32)
    if PRECISIONS["bf16"] is None:
        with pytest.raises(ValueError, match="b.shape"):
            _C._gemm_bf16(a, b, np.empty((4, 3), np.float32), False, True, False)
        with pytest.raises(TypeError):
            _C._gemm_bf16(a.astype(np.float64), a, np.empty((4, 4), np.float32), False, True, False)
        with pytest.raises(ValueError, match="bias"):
            _C._gemm_bf16(a, a, np.empty((4, 4), np.float32), False, True, False, bias=np.ones(5, np.float32))
    if PRECISIONS["int8"] is None:
        with pytest.raises(ValueError, match="w.shape"):
            _C._gemm_i8(a, b, np.empty((4, 3), np.float32), False, False)
        with pytest.raises(ValueError, match="repeat"):
            _C._gemm_i8(a, a, np.empty((4, 4), np.float32), False, False, 0)
        with pytest.raises(ValueError, match="bias"):
            _C._gemm_i8(a, a, np.empty((4, 4), np.float32), False, False, bias=np.ones((2, 2), np.float32))


# ---- the engine ----------------------------------------------------------------------------------------------

REFERENCE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"




@pytest.fixture(scope="module")
def minilm_engine_inputs():
    from bertqa.model import BertQA
    with np.load(REFERENCE) as z:
        ref = {k: z[k] for k in z.files}
    model = BertQA.from_pretrained("all-MiniLM-L6-v2")
    model.tensor("qa_outputs.weight")[...] = ref["qa_outputs.weight"]
    model.tensor("qa_outputs.bias")[...] = ref["qa_outputs.bias"]
    return model, ref


def logits(model, ref, precision, **kw):
    e = _C.Engine(model._engine_config(), model.params, precision=precision, **kw)
    s, t = e.forward(ref["input_ids"], ref["token_type_ids"], ref["attention_mask"])
    return np.stack([s, t])


@needs_minilm
@pytest.mark.parametrize("precision,rel,kw", [("bf16", 0.015, {}), ("int8", 0.15, {}),
                                              ("int8", 0.4, {"int8_activations": "tensor"})])
def test_engine_logits_in_low_precision_follow_fp32_on_real_tokens(minilm_engine_inputs, precision, rel, kw):
    if PRECISIONS[precision] is not None:
        pytest.skip(f"precision {precision!r} on this CPU {PRECISIONS[precision]}")
    model, ref = minilm_engine_inputs
    f32 = logits(model, ref, "fp32")
    low = logits(model, ref, precision, **kw)
    real = np.isfinite(f32)
    assert (np.isfinite(low) == real).all()   # the same padding cut
    spread = f32[real].std()
    err = np.abs(low[real] - f32[real])
    assert err.max() < rel * 4 * spread and np.sqrt((err ** 2).mean()) < rel * spread, (err.max(), spread)
    assert err.max() > 0   # it did compute in low precision
    # the answer the logits point at: the same tokens
    np.testing.assert_array_equal(np.where(real, low, -np.inf).argmax(-1), np.where(real, f32, -np.inf).argmax(-1))


@needs_minilm
@needs("bf16")
def test_engine_bf16_gradients_follow_fp32(minilm_engine_inputs):
    model, ref = minilm_engine_inputs
    n = model.params.size
    grads = {}
    for precision in ("fp32", "bf16"):
        p, g = model.params.copy(), np.zeros(n, np.float32)
        e = _C.Engine(model._engine_config(), p, g, np.zeros(n, np.float32), np.zeros(n, np.float32),
                      precision=precision)
        loss = e.forward_backward(ref["input_ids"], ref["token_type_ids"], ref["attention_mask"],
                                  ref["start_positions"], ref["end_positions"], seed=3, step=1)
        grads[precision] = (loss, g)
    (l32, g32), (l16, g16) = grads["fp32"], grads["bf16"]
    assert abs(l16 - l32) < 0.01 * abs(l32)
    rel = np.linalg.norm(g16 - g32) / np.linalg.norm(g32)
    assert 0 < rel < 0.06, rel
    cos = float(g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32)))
    assert cos > 0.998, cos


@needs("bf16")
def test_bf16_engine_remakes_its_weights_after_a_step_and_on_request(rng):
    """The packed bf16 copies follow the fp32 master weights: after an AdamW step, and after weights_changed()."""
    from bertqa.config import BertConfig
    from bertqa.model import BertQA
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertQA(cfg, seed=1)
    ids = rng.integers(1, 50, (2, 11))
    e = _C.Engine(model._engine_config(), model.params, precision="bf16")
    before = e.forward(ids)[0].copy()
    w = model.tensor("bert.encoder.layer.0.intermediate.dense.weight")
    w *= 3.0
    assert np.array_equal(e.forward(ids)[0], before)   # not told: the packed copy is the old one (documented)
    e.weights_changed()
    after = e.forward(ids)[0]
    fresh = _C.Engine(model._engine_config(), model.params.copy(), precision="bf16").forward(ids)[0]
    assert not np.array_equal(after, before) and np.array_equal(after, fresh)


@pytest.mark.skipif(PRECISIONS["bf16"] is not None, reason="the CPU lacks AVX-512 BF16 already")
def test_forcing_avx2_refuses_low_precision_naming_why():
    code = ("from bertqa._core import _C; import numpy as np; from bertqa.config import BertConfig; "
            "from bertqa.model import BertQA; m = BertQA(BertConfig(vocab_size=20, hidden_size=16, "
            "num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, max_position_embeddings=8));\n"
            "print(_C.runtime_info()['precisions'])\n"
            "for p in ('bf16', 'int8'):\n"
            "    try:\n        _C.Engine(m._engine_config(), m.params, precision=p)\n"
            "    except RuntimeError as e:\n        print('refused', e)\n")
    env = dict(os.environ, BERTQA_CPU="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("refused precision") == 2, out.stdout
    assert "needs the AVX-512 kernels, which are switched off (BERTQA_CPU=avx2" in out.stdout


def test_unknown_precision_and_int8_training_are_refused():
    from bertqa.config import BertConfig
    from bertqa.model import BertQA
    m = BertQA(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=24, max_position_embeddings=8))
    with pytest.raises(ValueError, match="precision must be 'fp32', 'bf16' or 'int8', got 'fp16'"):
        _C.Engine(m._engine_config(), m.params, precision="fp16")
    with pytest.raises(ValueError, match="int8_activations"):
        _C.Engine(m._engine_config(), m.params, precision="fp32", int8_activations="channel")
    if PRECISIONS["int8"] is None:
        n = m.params.size
        with pytest.raises(ValueError, match="int8' is for inference"):
            _C.Engine(m._engine_config(), m.params, np.zeros(n, np.float32), np.zeros(n, np.float32),
                      np.zeros(n, np.float32), precision="int8")
