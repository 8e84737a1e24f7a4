"""The float64 references check themselves: each analytic backward against central finite differences of its
own forward, on tiny inputs (so the kernel tests compare against something proven right)."""
import numpy as np

import reference as ref


def numgrad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


def check(analytic, f, x):
    np.testing.assert_allclose(analytic, numgrad(f, x), rtol=1e-5, atol=1e-7)


def test_layernorm_reference(rng):
    x, w, b, dy = rng.standard_normal((2, 3, 5)), rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal((2, 3, 5))
    dx, dw, db = ref.layernorm_backward(dy, x, w, 1e-5)
    loss = lambda: (ref.layernorm(x, w, b, 1e-5) * dy).sum()
    check(dx, loss, x)
    check(dw, loss, w)
    check(db, loss, b)


def test_gelu_reference(rng):
    x, dy = rng.standard_normal(7) * 3, rng.standard_normal(7)
    check(ref.gelu_backward(dy, x), lambda: (ref.gelu(x) * dy).sum(), x)


def test_linear_reference(rng):
    x, w, b, dy = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5), rng.standard_normal((2, 3, 5))
    dx, dw, db = ref.linear_backward(dy, x, w)
    loss = lambda: (ref.linear(x, w, b) * dy).sum()
    check(dx, loss, x)
    check(dw, loss, w)
    check(db, loss, b)


def test_attention_reference(rng):
    shape = (2, 2, 5, 3)
    q, k, v, dout = (rng.standard_normal(shape) for _ in range(4))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    keep = (rng.random((2, 2, 5, 5)) > 0.3).astype(np.float64)
    for kp, p in [(None, 0.0), (keep, 0.3)]:
        dq, dk, dv = ref.attention_backward(dout, q, k, v, mask, kp, p)
        loss = lambda: (ref.attention(q, k, v, mask, kp, p) * dout).sum()
        check(dq, loss, q)
        check(dk, loss, k)
        check(dv, loss, v)


def test_span_loss_reference(rng):
    s, e = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    sp, ep = np.array([1, 6, 0]), np.array([5, 2, 9])
    _, ds, de = ref.span_loss(s, e, sp, ep)
    check(ds, lambda: ref.span_loss(s, e, sp, ep)[0], s)
    check(de, lambda: ref.span_loss(s, e, sp, ep)[0], e)


def test_embedding_reference(rng):
    ids, types = np.array([[1, 3, 1]]), np.array([[0, 1, 1]])
    wte, wpe, wtt, dout = rng.standard_normal((4, 2)), rng.standard_normal((5, 2)), rng.standard_normal((2, 2)), rng.standard_normal((1, 3, 2))
    dwte, dwpe, dwtt = ref.embedding_backward(dout, ids, types, 4, 5, 2)
    loss = lambda: (ref.embedding(ids, types, wte, wpe, wtt) * dout).sum()
    check(dwte, loss, wte)
    check(dwpe, loss, wpe)
    check(dwtt, loss, wtt)
