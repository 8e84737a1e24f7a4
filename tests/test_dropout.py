"""The counter-based RNG and dropout: known-answer vectors, determinism, statistics."""
import numpy as np
import pytest

import reference as ref
from bertqa import ops
from bertqa._core import _C

pytestmark = pytest.mark.usefixtures("isa")   # every test under the AVX2 and the AVX-512 kernels (conftest.py)

# Known-answer vectors of Philox4x32-10 published with Random123 (kat_vectors): (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert _C.philox4x32(counter, key) == expected
    assert ref.philox4x32(counter, key) == expected


@pytest.mark.parametrize("offset,n", [
    (0, 11),                       # a short run: the one-block-at-a-time path
    (5, 200),                      # unaligned start, then the 8-blocks-at-once path, then a tail
    (2**33 + 5, 300),              # element indices past 2^32: the counter's second word
    (4 * (2**32 - 3) - 1, 200),    # blocks crossing 2^32 inside one 8-block group: the carry between words
])
def test_uniform_matches_reference_keying(rng, offset, n):
    seed = int(rng.integers(2**64, dtype=np.uint64))
    step, tid = int(rng.integers(2**32)), int(rng.integers(2**32))
    u = _C.uniform(n, seed, step, tid, offset)
    want = [ref.uniform(offset + i, seed, step, tid) for i in range(n)]
    np.testing.assert_array_equal(u, np.array(want, np.float32))


def test_dropout_values_and_backward(rng):
    x = rng.standard_normal((3, 37, 45)).astype(np.float32)
    p, seed = 0.1, 1234
    y = ops.dropout(x, p, seed, step=5, tensor_id=2)
    keep = _C.uniform(x.size, seed, 5, 2).reshape(x.shape) >= p
    np.testing.assert_allclose(y, np.where(keep, x / np.float32(1 - p), 0), rtol=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(ops.dropout_backward(dy, p, seed, 5, 2), np.where(keep, dy / np.float32(1 - p), 0),
                               rtol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.37, 1 - 2**-20, 2**-24])
def test_dropout_keeps_exactly_where_uniform_reaches_p(rng, p):
    """Bit for bit: the vectorised mask (integer threshold on the Philox words) against uniform >= p in float32,
    over sizes that end in the one-block path too."""
    for n in (32, 4096 + 37, 3 * 4096 + 1):
        x = rng.standard_normal(n).astype(np.float32)
        seed, step, tid = int(rng.integers(2**63)), int(rng.integers(2**32)), int(rng.integers(2**32))
        keep = _C.uniform(n, seed, step, tid) >= np.float32(p)
        scale = np.float32(1) / (np.float32(1) - np.float32(p))
        np.testing.assert_array_equal(ops.dropout(x, p, seed, step, tid), np.where(keep, x * scale, 0))
        np.testing.assert_array_equal(ops.dropout_backward(x, p, seed, step, tid), np.where(keep, x * scale, 0))


def test_dropout_deterministic_and_keyed(rng):
    x = np.ones(100_003, np.float32)   # odd size: the last Philox block is partial
    a = ops.dropout(x, 0.3, 42, 1, 0)
    np.testing.assert_array_equal(a, ops.dropout(x, 0.3, 42, 1, 0))
    for other in [(43, 1, 0), (42, 2, 0), (42, 1, 1)]:
        b = ops.dropout(x, 0.3, *other)
        agree = np.mean((a == 0) == (b == 0))
        assert 0.5 < agree < 0.65, f"key {other} gives a mask correlated with (42, 1, 0): agreement {agree}"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics(p):
    n = 1_000_000
    y = ops.dropout(np.ones(n, np.float32), p, seed=7, step=3, tensor_id=11)
    kept = np.count_nonzero(y)
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 5 * sigma
    assert abs(y.mean() - 1.0) < 5 * sigma / n / (1 - p)   # inverted dropout keeps the expectation


def test_uniform_distribution():
    u = _C.uniform(2_000_000, 99)
    assert u.min() >= 0.0 and u.max() < 1.0
    counts, _ = np.histogram(u, bins=64, range=(0, 1))
    expected = len(u) / 64
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 130   # 63 degrees of freedom: P(chi2 > 130) < 1e-6
    # neighbouring elements (same Philox block and across blocks) are uncorrelated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / np.sqrt(len(u))


def test_dropout_p_zero_is_identity(rng):
    x = rng.standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(ops.dropout(x, 0.0, 1), x)
