"""Every kernel, forward and backward, against the float64 references in tests/reference.py, on fresh random
inputs of awkward shapes (batch 1, odd T, hidden sizes that are not multiples of 16, head counts that do not
divide 64). Tolerances are relative to the size of the reference values and stated per test. Kernels with AVX2
and AVX-512 variants run under each (the `isa` fixture, conftest.py); tests/test_isa.py compares the two."""
import os

import numpy as np
import pytest

import reference as ref
from bertqa import ops

# (B, T, C) cases for the row-wise kernels; (B, NH, T, HS) for attention.
ROW_SHAPES = [(1, 37, 45), (2, 5, 768), (3, 1, 1), (4, 17, 129)]
ATTN_SHAPES = [(1, 3, 37, 20), (2, 5, 13, 7), (3, 12, 65, 64), (1, 1, 1, 1)]


def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def assert_close(actual, expected, rtol, name=""):
    """max |actual - expected| <= rtol * max(1, max |expected|): a relative bound that does not blow up near 0."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected).max()
    bound = rtol * max(1.0, np.abs(expected).max())
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_layernorm(rng, shape, eps):
    C = shape[-1]
    x = f32(rng, *shape, scale=3.0) + np.float32(rng.standard_normal())   # non-zero mean
    w, b, dy = f32(rng, C), f32(rng, C), f32(rng, *shape)
    if C == 1:   # a single channel normalises to exactly 0: y = bias, dx = 0
        x[...] = rng.standard_normal()
    assert_close(ops.layernorm(x, w, b, eps), ref.layernorm(x, w, b, eps), 2e-5, "y")
    for got, want, name in zip(ops.layernorm_backward(dy, x, w, eps), ref.layernorm_backward(dy, x, w, eps),
                               ["dx", "dweight", "dbias"]):
        assert_close(got, want, 5e-5, name)


@pytest.mark.usefixtures("isa")
def test_layernorm_any_leading_shape(rng):
    x = f32(rng, 2, 3, 5, 7)
    w, b = f32(rng, 7), f32(rng, 7)
    assert_close(ops.layernorm(x, w, b), ref.layernorm(x, w, b, 1e-12), 2e-5, "y")


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("shape", [(1,), (37,), (3, 37, 45), (2, 1000, 3), (8192 + 31,)])
def test_gelu(rng, shape):
    x = f32(rng, *shape, scale=3.0)
    x.flat[0] = 0.0
    dy = f32(rng, *shape)
    assert_close(ops.gelu(x), ref.gelu(x), 1e-6, "y")
    assert_close(ops.gelu_backward(dy, x), ref.gelu_backward(dy, x), 1e-6, "dx")


@pytest.mark.usefixtures("isa")
def test_gelu_is_erf_form_not_tanh():
    # at x = -3 the tanh approximation differs from the exact erf form by 4.1e-4 (10%); ours is within 1e-6
    x = np.array([-3.0], np.float32)
    assert abs(ops.gelu(x)[0] - ref.gelu(x)[0]) < 1e-6


@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("out_features", [1, 45, 130])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(rng, shape, out_features, with_bias):
    IN = shape[-1]
    x, w, dy = f32(rng, *shape), f32(rng, out_features, IN, scale=0.1), f32(rng, *shape[:-1], out_features)
    b = f32(rng, out_features) if with_bias else None
    assert_close(ops.linear(x, w, b), ref.linear(x, w, b), 2e-5, "y")
    for got, want, name in zip(ops.linear_backward(dy, x, w), ref.linear_backward(dy, x, w), ["dx", "dw", "db"]):
        assert_close(got, want, 2e-5, name)


def random_mask(rng, B, T):
    mask = np.ones((B, T), np.int64)
    for b in range(B):
        mask[b, rng.integers(1, T + 1):] = 0   # every row keeps at least one real token
    return mask


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_attention(rng, shape, masked):
    B, NH, T, HS = shape
    q, k, v, dout = (f32(rng, *shape) for _ in range(4))
    mask = random_mask(rng, B, T) if masked else None
    assert_close(ops.attention(q, k, v, mask), ref.attention(q, k, v, mask), 2e-5, "out")
    for got, want, name in zip(ops.attention_backward(dout, q, k, v, mask), ref.attention_backward(dout, q, k, v, mask),
                               ["dq", "dk", "dv"]):
        assert_close(got, want, 5e-5, name)


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("mask_dtype", [np.float32, np.int32, bool])
def test_attention_mask_dtypes(rng, mask_dtype):
    q, k, v = (f32(rng, 2, 3, 9, 5) for _ in range(3))
    mask = random_mask(rng, 2, 9)
    assert_close(ops.attention(q, k, v, mask.astype(mask_dtype)), ref.attention(q, k, v, mask), 2e-5, "out")


@pytest.mark.usefixtures("isa")
def test_attention_padding_is_ignored(rng):
    # changing padded keys/values must not change the outputs of any query
    q, k, v = (f32(rng, 2, 4, 11, 8) for _ in range(3))
    mask = np.ones((2, 11), np.float32)
    mask[:, 7:] = 0
    out = ops.attention(q, k, v, mask)
    k2, v2 = k.copy(), v.copy()
    k2[..., 7:, :] += 5.0
    v2[..., 7:, :] -= 9.0
    assert np.abs(ops.attention(q, k2, v2, mask) - out).max() < 1e-5


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_attention_masks_with_holes_and_all_padding_rows(rng, p):
    """Trailing padding is skipped in the products (keys after the last real one, down to a single real key);
    holes before it take the general path: all against float64. (A row that is all padding is left out: its
    softmax adds -10000 to every score, which float32 resolves only to ~1e-3, in any implementation.)"""
    B, NH, T, HS = 4, 3, 29, 7
    q, k, v, dout = (f32(rng, B, NH, T, HS) for _ in range(4))
    mask = np.ones((B, T), np.int64)
    mask[0, 20:] = 0                     # trailing padding
    mask[1, [2, 5, 11]] = 0              # holes, no trailing padding
    mask[2, [0, 3]] = 0
    mask[2, 17:] = 0                     # holes and trailing padding
    mask[3, 1:] = 0                      # one real key
    seed, step, tid = int(rng.integers(2**63)), 3, 5
    keep = (ops._C.uniform(B * NH * T * T, seed, step, tid) >= p).reshape(B, NH, T, T) if p else None
    assert_close(ops.attention(q, k, v, mask, p, seed, step, tid), ref.attention(q, k, v, mask, keep, p), 2e-5, "out")
    grads = ops.attention_backward(dout, q, k, v, mask, p, seed, step, tid)
    for got, want, name in zip(grads, ref.attention_backward(dout, q, k, v, mask, keep, p), ["dq", "dk", "dv"]):
        assert_close(got, want, 5e-5, name)


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("shape", [(1, 2, 37, 16), (2, 3, 13, 5)])
def test_attention_dropout(rng, shape):
    B, NH, T, HS = shape
    p, seed, step, tid = 0.25, int(rng.integers(2**63)), 7, 3
    q, k, v, dout = (f32(rng, *shape) for _ in range(4))
    mask = random_mask(rng, B, T)
    keep = (ops._C.uniform(B * NH * T * T, seed, step, tid) >= p).reshape(B, NH, T, T)
    assert 0 < keep.mean() < 1
    out = ops.attention(q, k, v, mask, p, seed, step, tid)
    assert_close(out, ref.attention(q, k, v, mask, keep, p), 2e-5, "out")
    grads = ops.attention_backward(dout, q, k, v, mask, p, seed, step, tid)
    for got, want, name in zip(grads, ref.attention_backward(dout, q, k, v, mask, keep, p), ["dq", "dk", "dv"]):
        assert_close(got, want, 5e-5, name)
    # another step draws another mask
    assert np.abs(ops.attention(q, k, v, mask, p, seed, step + 1, tid) - out).max() > 1e-3


@pytest.mark.parametrize("B,T,C,V,P,NT", [(1, 37, 45, 101, 40, 2), (3, 5, 16, 7, 5, 3), (2, 1, 1, 1, 1, 1)])
@pytest.mark.parametrize("id_dtype", [np.int64, np.int32])
@pytest.mark.parametrize("with_types", [True, False])
def test_embedding(rng, B, T, C, V, P, NT, id_dtype, with_types):
    ids = rng.integers(0, V, (B, T)).astype(id_dtype)
    ids.flat[0] = ids.flat[-1]   # a repeated id: its gradients must sum
    types = rng.integers(0, NT, (B, T)).astype(id_dtype) if with_types else None
    wte, wpe, wtt = f32(rng, V, C), f32(rng, P, C), f32(rng, NT, C)
    dout = f32(rng, B, T, C)
    assert_close(ops.embedding(ids, types, wte, wpe, wtt), ref.embedding(ids, types, wte, wpe, wtt), 1e-6, "out")
    for got, want, name in zip(ops.embedding_backward(dout, ids, types, V, P, NT),
                               ref.embedding_backward(dout, ids, types, V, P, NT), ["dword", "dpos", "dtype"]):
        assert_close(got, want, 1e-5, name)
    pad = int(ids.flat[0])   # a padding id present in the batch: its row gets no gradient, the others do
    for got, want, name in zip(ops.embedding_backward(dout, ids, types, V, P, NT, padding_idx=pad),
                               ref.embedding_backward(dout, ids, types, V, P, NT, padding_idx=pad),
                               ["dword", "dpos", "dtype"]):
        assert_close(got, want, 1e-5, name)


@pytest.mark.parametrize("B,T", [(1, 37), (5, 384), (3, 2)])
@pytest.mark.parametrize("pos_dtype", [np.int64, np.int32])
def test_span_loss(rng, B, T, pos_dtype):
    s, e = f32(rng, B, T, scale=4.0), f32(rng, B, T, scale=4.0)
    sp = rng.integers(0, T, B).astype(pos_dtype)
    ep = rng.integers(0, T, B).astype(pos_dtype)
    if B > 1:
        sp[0] = T          # outside the sequence: ignored
        ep[-1] = T + 50    # clamped to T: ignored
        sp[-1] = -3        # clamped to 0 (as Hugging Face does), not ignored
    loss, ds, de = ops.span_loss(s, e, sp, ep)
    rl, rds, rde = ref.span_loss(s, e, sp, ep)
    assert abs(loss - rl) <= 1e-6 * max(1, abs(rl))
    assert_close(ds, rds, 1e-6, "dstart")
    assert_close(de, rde, 1e-6, "dend")


def test_span_loss_all_ignored_is_zero(rng):
    s, e = f32(rng, 2, 5), f32(rng, 2, 5)
    loss, ds, de = ops.span_loss(s, e, np.array([5, 9]), np.array([5, 5]))
    assert loss == 0.0 and not ds.any() and not de.any()


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("n", [1, 37, 100003])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adamw_steps(rng, n, wd):
    p, m, v = f32(rng, n), np.zeros(n, np.float32), np.zeros(n, np.float32)
    rp, rm, rv = p.astype(np.float64), np.zeros(n), np.zeros(n)
    for step in range(1, 6):
        g = f32(rng, n)
        scale = 0.5 if step == 3 else 1.0
        ops.adamw(p, g, m, v, step, 1e-3, weight_decay=wd, grad_scale=scale)
        rp, rm, rv = ref.adamw(rp, g, rm, rv, step, 1e-3, wd=wd, grad_scale=scale)
        assert_close(p, rp, 1e-6, f"param step {step}")
        assert_close(m, rm, 1e-6, f"m step {step}")
        assert_close(v, rv, 1e-6, f"v step {step}")


@pytest.mark.usefixtures("isa")
def test_adamw_hyperparameters(rng):
    p, g = f32(rng, 2, 3, 5), f32(rng, 2, 3, 5)
    m, v = f32(rng, 2, 3, 5, scale=0.1), np.abs(f32(rng, 2, 3, 5, scale=0.1))
    want = ref.adamw(p, g, m, v, 10, 3e-4, 0.8, 0.95, 1e-6, 0.1)
    ops.adamw(p, g, m, v, 10, 3e-4, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    for got, w, name in zip((p, m, v), want, "pmv"):
        assert_close(got, w, 1e-6, name)


@pytest.mark.usefixtures("isa")
def test_global_norm_and_clip(rng):
    grads = [f32(rng, 37), f32(rng, 3, 45), f32(rng, 1)]
    want = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    assert abs(ops.global_norm(grads) - want) <= 1e-9 * want
    before = [g.copy() for g in grads]
    assert abs(ops.clip_grad_norm(grads, 1e6) - want) <= 1e-9 * want   # no clipping above the norm
    assert all(np.array_equal(a, b) for a, b in zip(grads, before))
    norm = ops.clip_grad_norm(grads, 1.0)
    assert abs(norm - want) <= 1e-9 * want
    coef = 1.0 / (want + 1e-6)
    for g, b in zip(grads, before):
        assert_close(g, b * coef, 1e-6, "clipped")
    assert abs(ops.global_norm(grads) - 1.0) < 1e-5


def test_set_num_threads_reaches_other_threads():
    """set_num_threads from one thread limits the kernels run from any other (a server's engine thread, a
    notebook's worker): OpenMP's own setting is per calling thread. Observed by the threads the process spawns:
    a region of one thread starts no OpenMP workers, one of two does."""
    import subprocess
    import sys

    script = r"""
import os, threading, numpy as np
from bertqa import ops
def threads():
    return set(os.listdir("/proc/self/task"))
n = int(os.environ["N"])
setter = threading.Thread(target=ops.set_num_threads, args=(n,))
setter.start(); setter.join()
x = np.ones((512, 1024), np.float32)
seen = []
def work():
    before = threads()
    seen.append(ops.runtime_info()["omp_threads"])
    ops.gelu(x)
    seen.append(len(threads() - before))   # threads started (not net: the BLAS may be ending its own)
worker = threading.Thread(target=work)
worker.start(); worker.join()
print(seen[0], seen[1])
"""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs /proc/self/task (Linux) to count threads")
    for n, spawned in ((1, 0), (2, 1)):
        out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "N": str(n), "OMP_NUM_THREADS": "4"},
                             capture_output=True, text=True, timeout=120, check=True).stdout.split()
        assert [int(v) for v in out] == [n, spawned], f"set_num_threads({n}) in another thread: {out}"
