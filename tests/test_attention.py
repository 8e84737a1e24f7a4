"""The fused attention over packed rows (csrc/attention_fused.c; bertqa.ops.attention_rows, what the engine trains
with) against an independent float64 NumPy reference written from the formula, forward (out, and the
log-sum-exp that the saved state gives) and backward (dq, dk, dv), on fresh random inputs of awkward shapes: odd lengths, a row of one token,
an empty row, rows across the kernel's 48-query / 64-key blocks, HS in {12, 32, 64} (not a multiple of the vector
width included), NH in {1, 3, 12}; masks with holes, trailing padding inside a row, a single real key and columns
past a row's end that must not be read; with and without dropout, window ids that are not 0..B-1 and a numbering
width P that is not the mask's. The dropout masks of the reference come from a NumPy Philox4x32-10 of its own
(checked against tests/reference.py's). Under both instruction sets (the `isa` fixture), and the portable kernels.

Tolerances, relative to max(1, max |reference|): out and lse 2e-5, gradients 5e-5 (float32 products of length
HS and T against float64; measured errors are ~1e-6)."""
from math import sqrt

import numpy as np
import pytest

import reference as ref
from bertqa import ops

OUT_TOL, GRAD_TOL = 2e-5, 5e-5

# (row lengths, NH, HS)
CASES = [
    ([37, 1, 20, 69], 3, 12),       # odd lengths, a row of one token, HS not a multiple of 8
    ([130, 13], 1, 32),             # several query and key blocks; one head (queries split over the threads)
    ([100, 7, 0, 1, 49], 12, 64),   # an empty row; BERT-base's head size
    ([65, 64, 63, 17], 12, 32),     # lengths around the key block
    ([1], 1, 12),                   # one token
]


# ---- the reference ------------------------------------------------------------------------------------------------

def uniforms(idx, seed, step, tensor_id):
    """The dropout uniforms of elements idx (uint64 array): lane idx % 4 of Philox4x32-10 with counter
    (idx // 4 as two words, tensor_id, step) and key seed, 24 bits; vectorised over idx."""
    M0, M1, W0, W1, L32 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), 0x9E3779B9, 0xBB67AE85, np.uint64(0xFFFFFFFF)
    idx = np.asarray(idx, np.uint64)
    blk = idx >> np.uint64(2)
    c0, c1 = blk & L32, blk >> np.uint64(32)
    c2, c3 = np.full_like(c0, tensor_id), np.full_like(c0, step)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2   # 32 x 32 -> 64 bits, exact in uint64
        c0, c1, c2, c3 = (((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0)) & L32, p1 & L32,
                          ((p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1)) & L32, p0 & L32)
        k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
    word = np.choose((idx & np.uint64(3)).astype(np.int64), [c0, c1, c2, c3])
    return (word >> np.uint64(8)).astype(np.float64) / 16777216.0


def test_numpy_philox_matches_reference(rng):
    idx = rng.integers(0, 2**42, 16, dtype=np.uint64)
    seed = int(rng.integers(2**63))
    assert list(uniforms(idx, seed, 7, 3)) == [ref.uniform(int(i), seed, 7, 3) for i in idx]


def keep_mask(b, w, NH, T, P, p, seed, step, tensor_id):
    """keep / (1 - p) of row b's [NH, T, T] probabilities: element (h, i, j) is number ((w NH + h) P + i) P + j."""
    h, i, j = (a.astype(np.uint64) for a in np.meshgrid(np.arange(NH), np.arange(T), np.arange(T), indexing="ij"))
    idx = ((np.uint64(w) * np.uint64(NH) + h) * np.uint64(P) + i) * np.uint64(P) + j
    return (uniforms(idx, seed, step, tensor_id) >= p) / (1.0 - p)


def reference_rows(q, k, v, dout, offsets, mask=None, p=0.0, seed=0, step=0, window_ids=None, tensor_id=0, P=None):
    """out, lse [NH, N], dq, dk, dv in float64, row by row from the formula (einsum: NumPy's threaded BLAS takes
    0.4 s for these small batched products on a busy machine)."""
    q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
    N, NH, HS = q.shape
    out, dq, dk, dv = (np.zeros_like(q) for _ in range(4))
    lse = np.zeros((NH, N))
    for b in range(len(offsets) - 1):
        rows, T = slice(offsets[b], offsets[b + 1]), offsets[b + 1] - offsets[b]
        if T == 0:
            continue
        qb, kb, vb, gb = (a[rows] for a in (q, k, v, dout))   # [T, NH, HS]
        s = np.einsum("ihd,jhd->hij", qb, kb) / sqrt(HS)
        if mask is not None:
            s = s + (1.0 - np.asarray(mask[b, :T], np.float64)) * -10000.0
        mx = s.max(-1, keepdims=True)
        e = np.exp(s - mx)
        a = e / e.sum(-1, keepdims=True)
        lse[:, rows] = (mx + np.log(e.sum(-1, keepdims=True)))[..., 0]
        w = b if window_ids is None else int(window_ids[b])
        keep = keep_mask(b, w, NH, T, P, p, seed, step, tensor_id) if p > 0 else 1.0
        ad = a * keep                                                # what multiplies v
        out[rows] = np.einsum("hij,jhd->ihd", ad, vb)
        dv[rows] = np.einsum("hij,ihd->jhd", ad, gb)
        da = np.einsum("ihd,jhd->hij", gb, vb) * keep                # d loss / d a
        ds = a * (da - (da * a).sum(-1, keepdims=True)) / sqrt(HS)   # d loss / d s
        dq[rows] = np.einsum("hij,jhd->ihd", ds, kb)
        dk[rows] = np.einsum("hij,ihd->jhd", ds, qb)
    return out, lse, dq, dk, dv


# ---- inputs -------------------------------------------------------------------------------------------------------

def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def awkward_mask(rng, lengths, extra=5):
    """[B, max + extra] 0/1: every kind of row the engine can pass. Holes (zeros before the row's last token),
    trailing padding inside the row (a padded batch's layout), a row whose only real key is in its middle; columns
    past a row's end hold random 0/1 (the kernel must not read them)."""
    B, Tpad = len(lengths), max(lengths) + extra
    mask = rng.integers(0, 2, (B, Tpad)).astype(np.int64)
    for b, T in enumerate(lengths):
        mask[b, :T] = 1
        if T >= 4:
            mask[b, rng.choice(T - 1, size=max(1, T // 6), replace=False)] = 0   # holes
        if b % 3 == 1 and T >= 8:
            mask[b, T - T // 4:T] = 0                                          # trailing padding
        if b % 3 == 2 and T >= 3:
            mask[b, :T] = 0
            mask[b, T // 2] = 1                                                # a single real key
    return mask


def case_inputs(rng, lengths, NH, HS):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    N = int(offsets[-1])
    return offsets, [f32(rng, N, NH, HS) for _ in range(4)]


def assert_close(actual, expected, rtol, name):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected).max() if actual.size else 0.0
    bound = rtol * max(1.0, np.abs(expected).max() if expected.size else 0.0)
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def state_lse(state):
    """each query's log-sum-exp from the kernel's saved state: (max in base 2, 1 / sum of exp(s - max))"""
    return (state[0].astype(np.float64) - np.log2(state[1].astype(np.float64))) * np.log(2.0)


def check_against_reference(got, want):
    (out, state), grads = got
    lse = state_lse(state)
    r_out, r_lse, *r_grads = want
    assert_close(out, r_out, OUT_TOL, "out")
    assert_close(lse, r_lse, OUT_TOL, "lse")
    for g, w, name in zip(grads, r_grads, ["dq", "dk", "dv"]):
        assert_close(g, w, GRAD_TOL, name)


def run_rows(q, k, v, dout, offsets, **kw):
    out, state = ops.attention_rows(q, k, v, offsets, return_state=True, **kw)
    return (out, state), ops.attention_rows_backward(dout, q, k, v, out, state, offsets, **kw)


# ---- tests --------------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("lengths,NH,HS", CASES)
@pytest.mark.parametrize("dropout", ["off", "P%4=0", "P%4=1"])
@pytest.mark.parametrize("masked", [True, False])
def test_attention_rows_matches_float64(rng, lengths, NH, HS, dropout, masked):
    """dropout: off, or p = 0.15 with the numbering's row width P (not the mask's) a multiple of 4 (the engine's
    case: the vector kernels draw the masks themselves) or not (they take them from rng.c)."""
    offsets, (q, k, v, dout) = case_inputs(rng, lengths, NH, HS)
    mask = awkward_mask(rng, lengths) if masked else None
    B = len(lengths)
    window_ids = rng.choice(1 << 30, B, replace=False) + 1000   # not 0..B-1: masks follow the window
    P = 4 * ((max(lengths) + 3) // 4) + 4 * int(rng.integers(0, 10)) + (dropout == "P%4=1")
    p = 0.0 if dropout == "off" else 0.15
    seed, step, tid = int(rng.integers(2**63)), int(rng.integers(2**31)), 7
    kw = dict(mask=mask, dropout_p=p, seed=seed, step=step, window_ids=window_ids, tensor_id=tid, positions=P)
    check_against_reference(run_rows(q, k, v, dout, offsets, **kw),
                            reference_rows(q, k, v, dout, offsets, mask, p, seed, step, window_ids, tid, P))


@pytest.mark.parametrize("isa_name", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("P", [75, 80])
def test_every_kernel_table_matches_float64(rng, isa_name, P):
    """The portable kernels (what another architecture runs) and each vector table, forced by name."""
    if isa_name == "avx512" and "avx512" not in ops.runtime_info()["isas"]:
        pytest.skip("this CPU cannot run the AVX-512 kernels")
    lengths, NH, HS = [70, 1, 33], 3, 20
    offsets, (q, k, v, dout) = case_inputs(rng, lengths, NH, HS)
    mask = awkward_mask(rng, lengths)
    seed, p = int(rng.integers(2**63)), 0.2
    out, state = ops._C.attention_rows(q, k, v, offsets, mask, p, seed, 3, None, 1, P, True, isa_name)
    grads = ops._C.attention_rows_backward(dout, q, k, v, out, state, offsets, mask, p, seed, 3, None, 1, P, isa_name)
    check_against_reference(((out, state), grads), reference_rows(q, k, v, dout, offsets, mask, p, seed, 3, None, 1, P))


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_padded_rows_match_the_probability_kernels(rng, p):
    """Rows of a padded [B, T] batch (offsets b * T, trailing padding in the mask) with window ids None and P = T
    number the dropout elements as ops.attention does: the fused kernel and the [B,NH,T,T] one agree."""
    B, NH, T, HS = 3, 2, 41, 16
    q, k, v, dout = (f32(rng, B, T, NH, HS) for _ in range(4))
    mask = np.ones((B, T), np.int64)
    mask[0, 30:] = 0
    mask[1, [3, 9]] = 0
    mask[2, 1:] = 0   # a single real key
    seed = int(rng.integers(2**63))
    heads = [np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v, dout)]   # [B, NH, T, HS]
    want = ops.attention(*heads[:3], mask, p, seed, 5, 2)
    want_grads = ops.attention_backward(heads[3], *heads[:3], mask, p, seed, 5, 2)
    rows = [a.reshape(B * T, NH, HS) for a in (q, k, v, dout)]
    (out, _), grads = run_rows(*rows, np.arange(B + 1) * T, mask=mask, dropout_p=p, seed=seed, step=5, tensor_id=2)
    assert_close(out.reshape(B, T, NH, HS).transpose(0, 2, 1, 3), want, OUT_TOL, "out")
    for g, w, name in zip(grads, want_grads, ["dq", "dk", "dv"]):
        assert_close(g.reshape(B, T, NH, HS).transpose(0, 2, 1, 3), w, GRAD_TOL, name)


def test_masks_follow_the_window_not_the_place_in_the_batch(rng):
    """Rows permuted together with their window ids give the same rows of results, bit for bit."""
    lengths, NH, HS = [50, 17, 33, 1], 3, 8
    offsets, (q, k, v, dout) = case_inputs(rng, lengths, NH, HS)
    mask, win = awkward_mask(rng, lengths, extra=0), np.array([40, 7, 12, 99])
    kw = dict(dropout_p=0.25, seed=11, step=2, positions=64, tensor_id=4)
    (out, state), grads = run_rows(q, k, v, dout, offsets, mask=mask, window_ids=win, **kw)
    perm = [2, 0, 3, 1]
    tok = np.concatenate([np.arange(offsets[b], offsets[b + 1]) for b in perm])
    poff = np.concatenate([[0], np.cumsum([lengths[b] for b in perm])])
    (pout, pstate), pgrads = run_rows(q[tok], k[tok], v[tok], dout[tok], poff, mask=mask[perm], window_ids=win[perm],
                                    **kw)
    assert np.array_equal(pout, out[tok]) and np.array_equal(pstate, state[:, :, tok])
    for g, pg in zip(grads, pgrads):
        assert np.array_equal(pg, g[tok])


def test_dropout_is_keyed_and_thread_count_free(rng):
    lengths, NH, HS = [90, 31], 2, 32
    offsets, (q, k, v, dout) = case_inputs(rng, lengths, NH, HS)
    kw = dict(dropout_p=0.1, seed=5, step=1)
    (out, state), grads = run_rows(q, k, v, dout, offsets, **kw)
    threads = ops.runtime_info()["omp_threads"]
    try:
        ops.set_num_threads(1)   # other task splits (queries over threads in the forward): the same numbers
        (out1, state1), grads1 = run_rows(q, k, v, dout, offsets, **kw)
    finally:
        ops.set_num_threads(threads)
    assert np.array_equal(out1, out) and np.array_equal(state1, state)
    assert all(np.array_equal(a, b) for a, b in zip(grads1, grads))
    assert np.abs(ops.attention_rows(q, k, v, offsets, dropout_p=0.1, seed=5, step=2) - out).max() > 1e-3
    assert np.abs(ops.attention_rows(q, k, v, offsets, dropout_p=0.1, seed=6, step=1) - out).max() > 1e-3


def test_no_dropout_needs_no_positions(rng):
    """Without dropout the numbering is not used: any positions (and window ids) give the same result."""
    offsets, (q, k, v, _) = case_inputs(rng, [12, 5], 2, 4)
    out = ops.attention_rows(q, k, v, offsets)
    assert np.array_equal(ops.attention_rows(q, k, v, offsets, positions=1000, window_ids=[5, 3]), out)


_Q = np.zeros((5, 2, 4), np.float32)
BAD = [   # (what, arguments replacing q, k, v = _Q and offsets = [0, 2, 5], exception, words its message holds)
    ("offsets not from 0", dict(offsets=np.array([1, 5])), ValueError, "start at 0"),
    ("offsets past N", dict(offsets=np.array([0, 6])), ValueError, "end at N"),
    ("offsets decreasing", dict(offsets=np.array([0, 3, 2, 5])), ValueError, "must not decrease"),
    ("offsets of floats", dict(offsets=np.array([0.0, 5.0])), TypeError, "integer"),
    ("one offset", dict(offsets=np.array([5])), ValueError, "B . 1"),
    ("mask narrower than a row", dict(mask=np.ones((2, 2))), ValueError, "longest row"),
    ("mask of other rows", dict(mask=np.ones((3, 4))), ValueError, "mask"),
    ("positions below a row", dict(positions=2), ValueError, "positions"),
    ("window ids of other rows", dict(window_ids=np.array([1])), ValueError, "window_ids"),
    ("negative window id", dict(window_ids=np.array([-1, 0])), ValueError, "window_ids"),
    ("dropout 1", dict(dropout_p=1.0), ValueError, "dropout_p"),
    ("float64 q", dict(q=_Q.astype(np.float64)), TypeError, "float32"),
    ("k of another shape", dict(k=_Q[:4]), ValueError, "same shape"),
    ("q of 2 dimensions", dict(q=_Q[0], k=_Q[0], v=_Q[0], offsets=np.array([0, 2])), ValueError, "3 dimensions"),
]


@pytest.mark.parametrize("what,bad,exc,words", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise_naming_them(what, bad, exc, words):
    args = dict(q=_Q, k=_Q, v=_Q, offsets=np.array([0, 2, 5]))
    args.update(bad)
    with pytest.raises(exc, match=words):
        ops.attention_rows(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("offsets"), **args)


def test_backward_checks_out_and_state():
    q, off = np.zeros((5, 2, 4), np.float32), np.array([0, 2, 5])
    out, state = ops.attention_rows(q, q, q, off, return_state=True)
    with pytest.raises(ValueError, match="state"):
        ops.attention_rows_backward(q, q, q, q, out, state[:, :1], off)
    with pytest.raises(ValueError, match="state"):
        ops.attention_rows_backward(q, q, q, q, out, state[0], off)
    with pytest.raises(ValueError, match="out"):
        ops.attention_rows_backward(q, q, q, q, out[:4], state, off)
    with pytest.raises(ValueError, match="isa"):
        ops._C.attention_rows(q, q, q, off, isa="sse")
