"""Independent float64 NumPy references for every kernel, forward and backward.

Written from the formulas, not from the C code; tests/test_reference.py checks each backward here against
central finite differences of its forward, so the references are themselves verified.
"""
from math import erf, sqrt

import numpy as np

_erf = np.vectorize(erf, otypes=[np.float64])


def f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


# ---- layernorm ----
def layernorm(x, w, b, eps):
    x, w, b = f64(x, w, b)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def layernorm_backward(dy, x, w, eps):
    dy, x, w = f64(dy, x, w)
    C = x.shape[-1]
    mu = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mu) * rstd
    g = dy * w
    dx = rstd / C * (C * g - g.sum(-1, keepdims=True) - xhat * (g * xhat).sum(-1, keepdims=True))
    lead = tuple(range(x.ndim - 1))
    return dx, (dy * xhat).sum(lead), dy.sum(lead)


# ---- GELU (exact) ----
def gelu(x):
    (x,) = f64(x)
    return 0.5 * x * (1.0 + _erf(x / sqrt(2.0)))


def gelu_backward(dy, x):
    dy, x = f64(dy, x)
    cdf = 0.5 * (1.0 + _erf(x / sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / sqrt(2.0 * np.pi)
    return dy * (cdf + x * pdf)


# ---- linear ----
def linear(x, w, b):
    x, w = f64(x, w)
    y = x @ w.T
    return y if b is None else y + np.asarray(b, np.float64)


def linear_backward(dy, x, w):
    dy, x, w = f64(dy, x, w)
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    return dy @ w, dy2.T @ x2, dy2.sum(0)


# ---- attention ----
def _probs(q, k, mask):
    HS = q.shape[-1]
    s = np.einsum("bhid,bhjd->bhij", q, k) / sqrt(HS)
    if mask is not None:
        s = s + (1.0 - np.asarray(mask, np.float64))[:, None, None, :] * -10000.0
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(-1, keepdims=True)


def attention(q, k, v, mask=None, keep=None, p_drop=0.0):
    """keep: optional [B, NH, T, T] 0/1 dropout mask on the probabilities."""
    q, k, v = f64(q, k, v)
    p = _probs(q, k, mask)
    if keep is not None:
        p = p * keep / (1.0 - p_drop)
    return p @ v


def attention_backward(dout, q, k, v, mask=None, keep=None, p_drop=0.0):
    dout, q, k, v = f64(dout, q, k, v)
    HS = q.shape[-1]
    p = _probs(q, k, mask)
    pd = p if keep is None else p * keep / (1.0 - p_drop)
    dv = np.swapaxes(pd, -1, -2) @ dout
    dpd = dout @ np.swapaxes(v, -1, -2)
    dp = dpd if keep is None else dpd * keep / (1.0 - p_drop)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / sqrt(HS)
    return ds @ k, np.swapaxes(ds, -1, -2) @ q, dv


# ---- embeddings ----
def embedding(ids, types, wte, wpe, wtt):
    wte, wpe, wtt = f64(wte, wpe, wtt)
    T = ids.shape[1]
    types = np.zeros_like(ids) if types is None else types
    return wte[ids] + wpe[:T][None] + wtt[types]


def embedding_backward(dout, ids, types, V, P, NT, padding_idx=None):
    (dout,) = f64(dout)
    B, T, C = dout.shape
    types = np.zeros_like(ids) if types is None else types
    dwte, dwpe, dwtt = np.zeros((V, C)), np.zeros((P, C)), np.zeros((NT, C))
    np.add.at(dwte, ids.reshape(-1), dout.reshape(-1, C))
    if padding_idx is not None:
        dwte[padding_idx] = 0.0
    dwpe[:T] = dout.sum(0)
    np.add.at(dwtt, types.reshape(-1), dout.reshape(-1, C))
    return dwte, dwpe, dwtt


# ---- span loss (Hugging Face BertForQuestionAnswering) ----
def _ce(logits, pos):
    (logits,) = f64(logits)
    B, T = logits.shape
    pos = np.clip(np.asarray(pos, np.int64), 0, T)
    valid = pos != T
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    n = valid.sum()
    if n == 0:
        return 0.0, np.zeros_like(logits)
    loss = -logp[valid, pos[valid]].sum() / n
    grad = np.exp(logp)
    grad[valid, pos[valid]] -= 1.0
    grad[~valid] = 0.0
    return loss, grad / n


def span_loss(s, e, sp, ep):
    ls, gs = _ce(s, sp)
    le, ge = _ce(e, ep)
    return (ls + le) / 2, gs / 2, ge / 2


# ---- AdamW (torch.optim.AdamW) ----
def adamw(p, g, m, v, step, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, grad_scale=1.0):
    p, g, m, v = f64(p, g, m, v)
    g = g * grad_scale
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat = m / (1 - b1**step)
    vhat = v / (1 - b2**step)
    return p - lr * mhat / (np.sqrt(vhat) + eps), m, v


# ---- Philox4x32-10 (Salmon et al.), in Python integers ----
def philox4x32(counter, key):
    M0, M1, W0, W1, MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK, p1 & MASK, ((p0 >> 32) ^ c3 ^ k1) & MASK, p0 & MASK
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return c0, c1, c2, c3


def uniform(idx, seed, step, tensor_id):
    """The dropout uniform of element idx: lane idx % 4 of philox(counter=(idx // 4, tensor_id, step), key=seed)."""
    blk = idx // 4
    r = philox4x32((blk & 0xFFFFFFFF, blk >> 32, tensor_id, step), (seed & 0xFFFFFFFF, seed >> 32))
    return (r[idx % 4] >> 8) / 16777216.0
