"""The lab's exercise checkers (bertqa.lab): each accepts the reference solution and correct variants of it, and
rejects deliberately wrong solutions, on several fresh seeds. A checker that accepts a wrong solution is a bug.

The wrong solutions here are written the way a learner would write them (float32 NumPy, plain Python), apart
from the lists of known mistakes inside bertqa.lab, so the tests do not just replay the checker's own code.
"""
import collections
import math
import re
import string

import numpy as np
import pytest

from bertqa import lab, lab_solutions, ops

N_SEEDS = 3


@pytest.fixture
def seeds(rng):
    return [int(s) for s in rng.integers(0, 2**31, N_SEEDS)]


@pytest.fixture(autouse=True)
def no_solutions_env(monkeypatch):
    monkeypatch.delenv(lab.SOLUTIONS_ENV, raising=False)


def accepts(check, fn, seeds):
    for seed in seeds:
        result = check(fn, seed=seed, verbose=False)
        assert result.passed, result.message
        assert result.attempted and not result.used_solution


def rejects(check, fn, seeds, hint=None):
    for seed in seeds:
        result = check(fn, seed=seed, verbose=False)
        assert not result.passed, f"{check.__name__} accepted a wrong solution ({fn.__name__}), seed {seed}"
        assert result.attempted
        assert f"seed={seed}" in result.message  # the learner can replay the failing inputs
        if hint is not None:
            assert hint in result.message, result.message


# =============================================================================================================
# GELU
# =============================================================================================================

_erf = np.vectorize(math.erf)


def gelu_float64_out(x):
    return 0.5 * x.astype(np.float64) * (1 + _erf(x.astype(np.float64) / math.sqrt(2)))


def gelu_float32_math(x):
    return (0.5 * x * (1 + _erf(x / np.float32(math.sqrt(2))))).astype(np.float32)


def gelu_kernel(x):
    return ops.gelu(np.ascontiguousarray(x, dtype=np.float32))


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def gelu_sigmoid(x):
    return x / (1 + np.exp(-1.702 * x))


def gelu_no_sqrt2(x):
    return 0.5 * x * (1 + _erf(x))


def gelu_no_half(x):
    return x * (1 + _erf(x / math.sqrt(2)))


def gelu_relu(x):
    return np.maximum(x, 0)


def gelu_in_place(x):
    x *= 0.5 * (1 + _erf(x / math.sqrt(2)))
    return x


def gelu_no_return(x):
    0.5 * x * (1 + _erf(x / math.sqrt(2)))


def gelu_flat(x):
    return lab_solutions.gelu(x).ravel()


def gelu_float16(x):
    return lab_solutions.gelu(x).astype(np.float16)


@pytest.mark.parametrize("fn", [lab_solutions.gelu, gelu_float64_out, gelu_float32_math, gelu_kernel])
def test_gelu_accepts(fn, seeds):
    accepts(lab.check_gelu, fn, seeds)


@pytest.mark.parametrize("fn, hint", [
    (gelu_tanh, "tanh approximation"), (gelu_sigmoid, "sigmoid approximation"), (gelu_no_sqrt2, "sqrt(2)"),
    (gelu_no_half, "0.5"), (gelu_relu, "ReLU"), (gelu_in_place, "in place"), (gelu_no_return, "return"),
    (gelu_flat, "shape"), (gelu_float16, None),
])
def test_gelu_rejects(fn, hint, seeds):
    rejects(lab.check_gelu, fn, seeds, hint)


# =============================================================================================================
# LayerNorm
# =============================================================================================================


def ln_float32(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + np.float32(eps)) * w + b


def ln_np_var(x, w, b, eps=1e-12):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def ln_kernel(x, w, b, eps=1e-12):
    return ops.layernorm(x, w, b, eps=eps)


def ln_unbiased(x, w, b, eps=1e-12):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + eps) * w + b


def ln_eps_outside(x, w, b, eps=1e-12):
    return (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + eps) * w + b


def ln_no_eps(x, w, b, eps=1e-12):
    return (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True) * w + b


def ln_fixed_eps(x, w, b, eps=1e-12):
    return ln_float32(x, w, b, 1e-5)


def ln_axis0(x, w, b, eps=1e-12):
    mu = x.mean(0, keepdims=True)
    return (x - mu) / np.sqrt(x.var(0, keepdims=True) + eps) * w + b


def ln_no_affine(x, w, b, eps=1e-12):
    return ln_float32(x, np.ones_like(w), np.zeros_like(b), eps)


def ln_swapped_affine(x, w, b, eps=1e-12):
    return ln_float32(x, b, w, eps)


def ln_single_pass(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = (x * x).mean(-1, keepdims=True) - mu * mu
    return (x - mu) / np.sqrt(var + np.float32(eps)) * w + b


@pytest.mark.parametrize("fn", [lab_solutions.layernorm, ln_float32, ln_np_var, ln_kernel])
def test_layernorm_accepts(fn, seeds):
    accepts(lab.check_layernorm, fn, seeds)


@pytest.mark.parametrize("fn, hint", [
    (ln_unbiased, "biased variance"), (ln_eps_outside, "inside the square root"), (ln_no_eps, "variance 0"),
    (ln_fixed_eps, None), (ln_axis0, "last axis"), (ln_no_affine, "weight"), (ln_swapped_affine, None),
    (ln_single_pass, "|mean| >> std"),
])
def test_layernorm_rejects(fn, hint, seeds):
    rejects(lab.check_layernorm, fn, seeds, hint)


def test_layernorm_accepts_float32_two_pass_near_500(rng):
    """The large-offset case allows what float32 can do; a careful float32 LayerNorm passes on many seeds."""
    for seed in rng.integers(0, 2**31, 40):
        assert lab.check_layernorm(ln_float32, seed=int(seed), verbose=False).passed


# =============================================================================================================
# Attention
# =============================================================================================================


def _softmax32(s, axis=-1):
    p = np.exp(s - s.max(axis, keepdims=True))
    return p / p.sum(axis, keepdims=True)


def _keys_mask(mask):
    return 0.0 if mask is None else (1.0 - mask.astype(np.float32))[:, None, None, :] * -10000.0


def att_float32(q, k, v, mask=None):
    return _softmax32(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + _keys_mask(mask)) @ v


def att_minus_inf(q, k, v, mask=None):
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask[:, None, None, :] == 0, -np.inf, scores)
    return _softmax32(scores) @ v


def att_loops(q, k, v, mask=None):
    B, NH, T, HS = q.shape
    out = np.zeros_like(q)
    for b in range(B):
        keys = np.ones(T, bool) if mask is None else mask[b] != 0
        for h in range(NH):
            for i in range(T):
                s = k[b, h, keys] @ q[b, h, i] / math.sqrt(HS)
                w = np.exp(s - s.max())
                out[b, h, i] = (w / w.sum()) @ v[b, h, keys]
    return out


def att_kernel(q, k, v, mask=None):
    return ops.attention(q, k, v, mask)


def att_scale_by_hs(q, k, v, mask=None):
    return _softmax32(q @ k.transpose(0, 1, 3, 2) / q.shape[-1] + _keys_mask(mask)) @ v


def att_no_scale(q, k, v, mask=None):
    return _softmax32(q @ k.transpose(0, 1, 3, 2) + _keys_mask(mask)) @ v


def att_mask_ignored(q, k, v, mask=None):
    return _softmax32(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])) @ v


def att_mask_inverted(q, k, v, mask=None):
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask[:, None, None, :] * -10000.0
    return _softmax32(scores) @ v


def att_mask_plus(q, k, v, mask=None):
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + (1 - mask[:, None, None, :]) * 10000.0
    return _softmax32(scores) @ v


def att_mask_on_queries(q, k, v, mask=None):
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + (1 - mask[:, None, :, None]) * -10000.0
    return _softmax32(scores) @ v


def att_softmax_over_queries(q, k, v, mask=None):
    return _softmax32(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + _keys_mask(mask), axis=-2) @ v


def att_no_max(q, k, v, mask=None):
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + _keys_mask(mask)
    p = np.exp(scores)
    return p / p.sum(-1, keepdims=True) @ v


def att_mask_after_softmax(q, k, v, mask=None):
    p = _softmax32(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]))
    if mask is not None:
        p = p * mask[:, None, None, :]
    return p @ v


def att_merged_heads(q, k, v, mask=None):
    B, NH, T, HS = q.shape
    return att_float32(q, k, v, mask).transpose(0, 2, 1, 3).reshape(B, T, NH * HS)


def att_mask_required(q, k, v, mask):
    return _softmax32(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
                      + (1 - mask[:, None, None, :]) * -10000.0) @ v


def att_scales_q_in_place(q, k, v, mask=None):
    q /= np.sqrt(q.shape[-1])
    return _softmax32(q @ k.transpose(0, 1, 3, 2) + _keys_mask(mask)) @ v


def att_float16(q, k, v, mask=None):
    return att_float32(q, k, v, mask).astype(np.float16)


@pytest.mark.parametrize("fn", [lab_solutions.attention, att_float32, att_minus_inf, att_loops, att_kernel])
def test_attention_accepts(fn, seeds):
    accepts(lab.check_attention, fn, seeds)


@pytest.mark.parametrize("fn, hint", [
    (att_scale_by_hs, "wrong scale"), (att_no_scale, "wrong scale"), (att_mask_ignored, "mask ignored"),
    (att_mask_inverted, "wrong way round"), (att_mask_plus, "wrong sign"), (att_mask_on_queries, "on the queries"),
    (att_softmax_over_queries, "wrong axis"), (att_no_max, "overflows"), (att_mask_after_softmax, "before the softmax"),
    (att_merged_heads, "shape"), (att_mask_required, "TypeError"), (att_scales_q_in_place, "in place"),
    (att_float16, None),
])
def test_attention_rejects(fn, hint, seeds):
    rejects(lab.check_attention, fn, seeds, hint)


def test_attention_accepts_float32_on_many_seeds(rng):
    """The tolerance allows what float32 can do: a plain float32 NumPy attention passes on many seeds."""
    for seed in rng.integers(0, 2**31, 40):
        assert lab.check_attention(att_float32, seed=int(seed), verbose=False).passed


# =============================================================================================================
# AdamW
# =============================================================================================================


def adam_float64(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    p, g = param.astype(np.float64), grad.astype(np.float64)
    return lab_solutions.adamw(p, g, m.astype(np.float64), v.astype(np.float64), step, lr, beta1, beta2, eps,
                               weight_decay)


def adam_torch_form(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """As torch.optim.AdamW writes it: step_size = lr / bias_correction1, denom = sqrt(v) / sqrt(bc2) + eps."""
    param = param * (1 - lr * weight_decay)
    m = m * beta1 + grad * (1 - beta1)
    v = v * beta2 + grad * grad * (1 - beta2)
    denom = np.sqrt(v) / math.sqrt(1 - beta2**step) + eps
    return param - lr / (1 - beta1**step) * m / denom, m, v


def adam_kernel(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    param, m, v = param.copy(), m.copy(), v.copy()
    ops.adamw(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay)
    return param, m, v


def _adam(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay):
    param = param - lr * weight_decay * param
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad**2
    return param - lr * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps), m, v


def adam_no_bias_correction(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    param = param - lr * weight_decay * param
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad**2
    return param - lr * m / (np.sqrt(v) + eps), m, v


def adam_l2(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    return _adam(param, grad + weight_decay * param, m, v, step, lr, beta1, beta2, eps, 0.0)


def adam_step_from_0(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    return _adam(param, grad, m, v, step + 1, lr, beta1, beta2, eps, weight_decay)


def adam_eps_inside(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    param = param - lr * weight_decay * param
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad**2
    return param - lr * (m / (1 - beta1**step)) / np.sqrt(v / (1 - beta2**step) + eps), m, v


def adam_no_eps(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    return _adam(param, grad, m, v, step, lr, beta1, beta2, 0.0, weight_decay)


def adam_returns_corrected(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    param = param - lr * weight_decay * param
    m = (beta1 * m + (1 - beta1) * grad) / (1 - beta1**step)
    v = (beta2 * v + (1 - beta2) * grad**2) / (1 - beta2**step)
    return param - lr * m / (np.sqrt(v) + eps), m, v


def adam_decay_without_lr(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    new, m, v = _adam(param, grad, m, v, step, lr, beta1, beta2, eps, 0.0)
    return new - weight_decay * param, m, v


def adam_decay_after(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    new, m, v = _adam(param, grad, m, v, step, lr, beta1, beta2, eps, 0.0)
    return new * (1 - lr * weight_decay), m, v


def adam_in_place(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    ops.adamw(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay)
    return param, m, v


def _counter():
    calls = [0]

    def adam_own_counter(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        calls[0] += 1  # counts its own calls instead of using `step`
        return _adam(param, grad, m, v, calls[0], lr, beta1, beta2, eps, weight_decay)
    return adam_own_counter


def adam_fixed_betas(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    return _adam(param, grad, m, v, step, lr, 0.9, 0.999, eps, weight_decay)


def adam_torch_default_decay(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
    return _adam(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay)


def adam_param_only(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    return _adam(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay)[0]


def adam_swapped_moments(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    param, m, v = _adam(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay)
    return param, v, m


@pytest.mark.parametrize("fn", [lab_solutions.adamw, adam_float64, adam_torch_form, adam_kernel])
def test_adamw_accepts(fn, seeds):
    accepts(lab.check_adamw, fn, seeds)


@pytest.mark.parametrize("fn, hint", [
    (adam_no_bias_correction, "no bias correction"), (adam_l2, "L2 added to the gradient"),
    (adam_step_from_0, "step counts from 1"), (adam_eps_inside, "outside the square root"),
    (adam_no_eps, "add eps to the denominator"), (adam_returns_corrected, "not the bias-corrected"),
    (adam_decay_without_lr, "scaled by the learning rate"), (adam_decay_after, "before this step"),
    (adam_in_place, "in place"), (adam_fixed_betas, None), (adam_torch_default_decay, None),
    (adam_param_only, "tuple (param, m, v)"), (adam_swapped_moments, None),
])
def test_adamw_rejects(fn, hint, seeds):
    rejects(lab.check_adamw, fn, seeds, hint)


def test_adamw_rejects_a_step_counter_of_its_own(seeds):
    for seed in seeds:  # a fresh counter per run: it is right at step 1, wrong from the first later step
        assert not lab.check_adamw(_counter(), seed=seed, verbose=False).passed


def test_adamw_accepts_float32_on_many_seeds(rng):
    for seed in rng.integers(0, 2**31, 40):
        assert lab.check_adamw(lab_solutions.adamw, seed=int(seed), verbose=False).passed
        assert lab.check_adamw(adam_kernel, seed=int(seed), verbose=False).passed


def test_adamw_several_steps_feed_each_step_the_last():
    """The multi-step case calls the learner's function once per step with what the previous call returned."""
    seen = []

    def spy(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        seen.append((step, m.copy()))
        return lab_solutions.adamw(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay)

    assert lab.check_adamw(spy, seed=0, verbose=False).passed
    steps = [s for s, _ in seen]
    k = steps.index(1, len(steps) - 6)
    assert steps[k:] == [1, 2, 3, 4, 5, 6]
    assert not seen[k][1].any() and seen[k + 1][1].any()  # m starts at 0, then is the returned one


# =============================================================================================================
# Span loss
# =============================================================================================================


def _log_softmax32(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def sl_float32(s, e, sp, ep):
    rows = np.arange(len(s))
    return float(-(_log_softmax32(s)[rows, sp].mean() + _log_softmax32(e)[rows, ep].mean()) / 2)


def sl_kernel(s, e, sp, ep):
    return ops.span_loss(s, e, sp.astype(np.int64), ep.astype(np.int64))[0]


def sl_sum_of_halves(s, e, sp, ep):
    rows = np.arange(len(s))
    return float(-(_log_softmax32(s)[rows, sp].mean() + _log_softmax32(e)[rows, ep].mean()))


def sl_batch_sum(s, e, sp, ep):
    rows = np.arange(len(s))
    return float(-(_log_softmax32(s)[rows, sp].sum() + _log_softmax32(e)[rows, ep].sum()) / 2)


def sl_start_only(s, e, sp, ep):
    return float(-_log_softmax32(s)[np.arange(len(s)), sp].mean())


def sl_off_by_one(s, e, sp, ep):
    T = s.shape[1]
    return sl_float32(s, e, np.minimum(sp + 1, T - 1), np.minimum(ep + 1, T - 1))


def sl_batch_axis(s, e, sp, ep):
    def lsm(z):
        z = z - z.max(0, keepdims=True)
        return z - np.log(np.exp(z).sum(0, keepdims=True))
    rows = np.arange(len(s))
    return float(-(lsm(s)[rows, sp].mean() + lsm(e)[rows, ep].mean()) / 2)


def sl_naive_softmax(s, e, sp, ep):
    rows = np.arange(len(s))
    ps = np.exp(s) / np.exp(s).sum(1, keepdims=True)
    pe = np.exp(e) / np.exp(e).sum(1, keepdims=True)
    return float(-(np.log(ps[rows, sp]).mean() + np.log(pe[rows, ep]).mean()) / 2)


def sl_negated(s, e, sp, ep):
    return -sl_float32(s, e, sp, ep)


def sl_mean_of_all_logprobs(s, e, sp, ep):
    return float(-(_log_softmax32(s).mean() + _log_softmax32(e).mean()) / 2)


def sl_per_row(s, e, sp, ep):
    rows = np.arange(len(s))
    return -(_log_softmax32(s)[rows, sp] + _log_softmax32(e)[rows, ep]) / 2


@pytest.mark.parametrize("fn", [lab_solutions.span_loss, sl_float32, sl_kernel])
def test_span_loss_accepts(fn, seeds):
    accepts(lab.check_span_loss, fn, seeds)


@pytest.mark.parametrize("fn, hint", [
    (sl_sum_of_halves, "not their sum"), (sl_batch_sum, "mean over the batch"), (sl_start_only, "end position"),
    (sl_off_by_one, "positions index the logits"), (sl_batch_axis, "axis=1"), (sl_naive_softmax, "log-sum-exp"),
    (sl_negated, None), (sl_mean_of_all_logprobs, None), (sl_per_row, "one number"),
])
def test_span_loss_rejects(fn, hint, seeds):
    rejects(lab.check_span_loss, fn, seeds, hint)


# =============================================================================================================
# Best span
# =============================================================================================================


def bs_loops(s, e, max_answer_length):
    best, best_score = (0, 0), -np.inf
    for i in range(len(s)):
        for j in range(i, min(i + max_answer_length, len(e))):
            if s[i] + e[j] > best_score:
                best, best_score = (i, j), s[i] + e[j]
    return best


def bs_numpy_array(s, e, max_answer_length):
    return np.array(lab_solutions.best_span(s, e, max_answer_length))


def bs_independent(s, e, max_answer_length):
    return int(np.argmax(s)), int(np.argmax(e))


def bs_too_long(s, e, max_answer_length):
    return bs_loops(s, e, max_answer_length + 1)


def bs_too_short(s, e, max_answer_length):
    return bs_loops(s, e, max(max_answer_length - 1, 1))


def bs_no_limit(s, e, max_answer_length):
    return bs_loops(s, e, len(s))


def bs_backwards(s, e, max_answer_length):
    best, best_score = (0, 0), -np.inf
    for i in range(len(s)):
        for j in range(max(0, i - max_answer_length + 1), min(i + max_answer_length, len(e))):
            if s[i] + e[j] > best_score:
                best, best_score = (i, j), s[i] + e[j]
    return best


def bs_exclusive_end(s, e, max_answer_length):
    i, j = bs_loops(s, e, max_answer_length)
    return i, j + 1


def bs_swapped(s, e, max_answer_length):
    i, j = bs_loops(s, e, max_answer_length)
    return j, i


def bs_score_only(s, e, max_answer_length):
    i, j = bs_loops(s, e, max_answer_length)
    return float(s[i] + e[j])


@pytest.mark.parametrize("fn", [lab_solutions.best_span, bs_loops, bs_numpy_array])
def test_best_span_accepts(fn, seeds):
    accepts(lab.check_best_span, fn, seeds)


@pytest.mark.parametrize("fn, hint", [
    (bs_independent, "taken separately"), (bs_too_long, "end - start + 1"), (bs_too_short, "too strict"),
    (bs_no_limit, None), (bs_backwards, "end must not come before start"), (bs_exclusive_end, "inclusive"),
    (bs_swapped, None), (bs_score_only, "pair"),
])
def test_best_span_rejects(fn, hint, seeds):
    rejects(lab.check_best_span, fn, seeds, hint)


# =============================================================================================================
# F1
# =============================================================================================================


def _norm(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1_tokens(p, g, use_set=False):
    common = len(set(p) & set(g)) if use_set else sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_mine(prediction, ground_truth):
    return _f1_tokens(_norm(prediction).split(), _norm(ground_truth).split())


def f1_no_normalisation(prediction, ground_truth):
    return _f1_tokens(prediction.split(), ground_truth.split())


def f1_lower_only(prediction, ground_truth):
    return _f1_tokens(prediction.lower().split(), ground_truth.lower().split())


def f1_keeps_articles(prediction, ground_truth):
    def norm(s):
        return "".join(ch for ch in s.lower() if ch not in set(string.punctuation)).split()
    return _f1_tokens(norm(prediction), norm(ground_truth))


def f1_replace_articles(prediction, ground_truth):
    def norm(s):
        s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
        for article in ("the", "an", "a"):
            s = s.replace(article, " ")
        return s.split()
    return _f1_tokens(norm(prediction), norm(ground_truth))


def f1_punctuation_to_space(prediction, ground_truth):
    def norm(s):
        s = "".join(" " if ch in string.punctuation else ch for ch in s.lower())
        return re.sub(r"\b(a|an|the)\b", " ", s).split()
    return _f1_tokens(norm(prediction), norm(ground_truth))


def f1_set(prediction, ground_truth):
    return _f1_tokens(_norm(prediction).split(), _norm(ground_truth).split(), use_set=True)


def f1_percent(prediction, ground_truth):
    return 100 * f1_mine(prediction, ground_truth)


def f1_precision_only(prediction, ground_truth):
    p, g = _norm(prediction).split(), _norm(ground_truth).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    return common / len(p) if p else 0.0


def f1_recall_only(prediction, ground_truth):
    p, g = _norm(prediction).split(), _norm(ground_truth).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    return common / len(g) if g else 0.0


def f1_divides_by_zero(prediction, ground_truth):
    p, g = _norm(prediction).split(), _norm(ground_truth).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    precision, recall = common / len(p), common / len(g)
    return 0.0 if common == 0 else 2 * precision * recall / (precision + recall)


def f1_exact_match(prediction, ground_truth):
    return float(_norm(prediction) == _norm(ground_truth))


def f1_empty_is_one(prediction, ground_truth):
    p, g = _norm(prediction).split(), _norm(ground_truth).split()
    return 1.0 if not p and not g else _f1_tokens(p, g)


@pytest.mark.parametrize("fn", [lab_solutions.f1, f1_mine])
def test_f1_accepts(fn, seeds):
    accepts(lab.check_f1, fn, seeds)


@pytest.mark.parametrize("fn, hint", [
    (f1_no_normalisation, "normalise both"), (f1_lower_only, "punctuation"), (f1_keeps_articles, "articles"),
    (f1_replace_articles, "str.replace"), (f1_punctuation_to_space, None), (f1_set, "multiplicity"),
    (f1_percent, "[0, 1]"), (f1_precision_only, None), (f1_recall_only, None),
    (f1_divides_by_zero, "ZeroDivisionError"), (f1_exact_match, None), (f1_empty_is_one, None),
])
def test_f1_rejects(fn, hint, seeds):
    rejects(lab.check_f1, fn, seeds, hint)


# =============================================================================================================
# The machinery: unattempted exercises, errors, solutions mode, replay, helpers
# =============================================================================================================

CHECKS = [lab.check_gelu, lab.check_layernorm, lab.check_attention, lab.check_adamw, lab.check_span_loss,
          lab.check_best_span, lab.check_f1]


def not_written(*args):
    raise NotImplementedError


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("fn", [None, not_written])
def test_not_attempted_is_reported_not_raised(check, fn, capsys):
    result = check(fn)
    assert not result.passed and not result.attempted and not result.used_solution
    out = capsys.readouterr().out
    assert "not attempted yet" in out and "lab.show_solution" in out


@pytest.mark.parametrize("check", CHECKS)
def test_solutions_env_checks_the_reference_in_place_of_unattempted(check, monkeypatch, capsys):
    monkeypatch.setenv(lab.SOLUTIONS_ENV, "1")
    result = check(not_written)
    assert result.passed and result.used_solution
    assert lab.SOLUTIONS_ENV in capsys.readouterr().out


def test_solutions_env_makes_a_failed_check_raise(monkeypatch):
    monkeypatch.setenv(lab.SOLUTIONS_ENV, "1")
    with pytest.raises(lab.LabCheckFailed, match="tanh"):
        lab.check_gelu(gelu_tanh)


def test_exception_in_learner_code_is_reported_with_its_line(capsys):
    def my_gelu(x):
        return x * undefined_name  # noqa: F821

    result = lab.check_gelu(my_gelu)
    assert not result.passed and result.attempted
    assert "NameError" in result.message and "undefined_name" in result.message


def test_same_seed_same_inputs():
    first = lab.check_layernorm(ln_unbiased, verbose=False)
    again = lab.check_layernorm(ln_unbiased, seed=first.seed, verbose=False)
    assert first.message == again.message


def test_fresh_inputs_without_a_seed():
    seeds = {lab.check_gelu(lab_solutions.gelu, verbose=False).seed for _ in range(5)}
    assert len(seeds) > 1


def test_implementation_prefers_a_passing_learner_function(capsys):
    def my_gelu(x):
        return lab_solutions.gelu(x)

    assert lab.implementation("gelu", my_gelu) is lab_solutions.gelu  # not checked yet
    lab.check_gelu(my_gelu, verbose=False)
    assert lab.implementation("gelu", my_gelu) is my_gelu
    lab.check_gelu(gelu_tanh, verbose=False)
    assert lab.implementation("gelu", gelu_tanh) is lab_solutions.gelu
    assert lab.implementation("gelu", None) is lab_solutions.gelu


@pytest.mark.parametrize("name", list(lab.EXERCISES))
def test_show_solution_prints_the_source(name, capsys):
    lab.show_solution(name)
    assert f"def {name}(" in capsys.readouterr().out


def test_unknown_exercise_names_the_exercises():
    with pytest.raises(KeyError, match="gelu"):
        lab.solution("softmax")


def test_result_is_quiet_in_a_notebook():
    result = lab.check_f1(f1_mine, verbose=False)
    assert bool(result) and "passed" in repr(result)
    assert result._ipython_display_() is None
