"""Checkers for the lab's exercises (notebooks/bert_qa_lab.ipynb).

Each checker runs a learner's function on fresh random inputs of awkward sizes, plus a few hand-made cases
aimed at the usual mistakes, and compares the answers with a float64 reference and with bertqa's own
implementation (the C kernels in bertqa.ops, the decoder and the official metric in bertqa.squad):

    from bertqa import lab
    lab.check_gelu(my_gelu)              # prints what passed, or the first failing input, expected vs got, a hint
    lab.check_gelu(my_gelu, seed=1234)   # replay the exact inputs of an earlier run (the seed is printed)
    lab.show_solution("gelu")            # a reference solution (bertqa/lab_solutions.py)

Exercises: gelu, layernorm, attention, adamw, span_loss, best_span, f1 (see EXERCISES).

A checker never raises because of the learner's code: an exception inside it, a wrong shape or a wrong value
is reported and the checker returns a falsy CheckResult, so "Run all" goes on through a half-done notebook.
An exercise not attempted yet (the function is None or raises NotImplementedError) is reported as such.

With the environment variable BERTQA_LAB_SOLUTIONS=1 (how CI runs the notebook), an exercise not attempted
is checked with the reference solution in its place, and any failed check raises LabCheckFailed, so a broken
checker or solution fails the run instead of printing a message nobody reads.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from . import lab_solutions
from . import ops
from . import squad

SOLUTIONS_ENV = "BERTQA_LAB_SOLUTIONS"

EXERCISES = {
    "gelu": "my_gelu(x) -> GELU(x) in the exact erf form, elementwise, same shape",
    "layernorm": "my_layernorm(x, weight, bias, eps) -> LayerNorm over the last axis",
    "attention": "my_attention(q, k, v, mask=None) -> softmax(q k^T / sqrt(HS) + mask) v, [B, NH, T, HS]",
    "adamw": "my_adamw(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay) -> (param, m, v)",
    "span_loss": "my_span_loss(start_logits, end_logits, start_positions, end_positions) -> float",
    "best_span": "my_best_span(start_logits, end_logits, max_answer_length) -> (start, end), end inclusive",
    "f1": "my_f1(prediction, ground_truth) -> SQuAD F1 in [0, 1]",
}


class LabCheckFailed(AssertionError):
    """A check failed while BERTQA_LAB_SOLUTIONS=1 (CI): the checker or the reference solution is broken."""


@dataclass
class CheckResult:
    """What a checker found. Truthy when the function passed every case."""

    exercise: str
    passed: bool
    attempted: bool
    message: str
    seed: int
    used_solution: bool = False  # BERTQA_LAB_SOLUTIONS=1 checked the reference in place of an unattempted one

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        state = "passed" if self.passed else ("failed" if self.attempted else "not attempted")
        return f"CheckResult({self.exercise!r}: {state}, seed={self.seed})"

    def _ipython_display_(self) -> None:
        """The checker printed the message already; a notebook cell ending in the call shows nothing more."""


@dataclass
class Case:
    """One input for the learner's function: args, the float64 reference answer, and what the case is about."""

    what: str
    args: tuple
    expected: Any
    note: str = ""  # shown when this case fails: what it is there to catch
    tol: Optional[tuple[float, float]] = None  # (atol, rtol) when this case needs other than the checker's
    call: Optional[Callable] = None  # call(fn, *args) when the case is more than fn(*args) (several AdamW steps)


class _Mismatch(Exception):
    """The learner's answer to a case is wrong; str() says where and how."""


_passed_functions: dict[str, Callable] = {}  # exercise -> the learner's function that last passed


# =============================================================================================================
# Public helpers
# =============================================================================================================


def solutions_enabled() -> bool:
    return os.environ.get(SOLUTIONS_ENV, "").strip() not in ("", "0", "false", "no")


def solution(name: str) -> Callable:
    """The reference solution of exercise `name` (a function of bertqa.lab_solutions)."""
    _check_name(name)
    return getattr(lab_solutions, name)


def show_solution(name: str) -> None:
    """Print the source of the reference solution of exercise `name`."""
    fn = solution(name)
    print(inspect.getsource(fn))
    if name == "f1":
        print(inspect.getsource(lab_solutions.normalize_answer))


def implementation(name: str, fn: Optional[Callable]) -> Callable:
    """fn when it passed its checker in this session, else the reference solution (says which it returns)."""
    _check_name(name)
    if fn is not None and _passed_functions.get(name) is fn:
        print(f"{name}: using your implementation")
        return fn
    print(f"{name}: using the reference solution (yours has not passed lab.check_{name} yet)")
    return solution(name)


def _check_name(name: str) -> None:
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; the exercises are {', '.join(EXERCISES)}")


# =============================================================================================================
# The machinery shared by the checkers
# =============================================================================================================


def _fresh_seed(seed: Optional[int]) -> int:
    return int(np.random.SeedSequence().entropy % (2**31)) if seed is None else int(seed)


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.7g}"
    if isinstance(v, np.ndarray):
        with np.printoptions(precision=5, threshold=12, edgeitems=3):
            return f"array(shape={v.shape}, dtype={v.dtype}) {v}"
    if isinstance(v, str):
        return repr(v)
    return repr(v)


def _describe_exception(e: BaseException) -> str:
    """The exception and the line of the learner's code (the innermost frame outside bertqa.lab) it came from."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if os.path.abspath(f.filename) != os.path.abspath(__file__)]
    where = ""
    if mine:
        f = mine[-1]
        where = f" (at line {f.lineno}: {f.line.strip()})" if f.line else f" (line {f.lineno})"
    return f"{type(e).__name__}: {e}{where}"


def _copy_args(args: tuple) -> tuple:
    return tuple(a.copy() if isinstance(a, np.ndarray) else a for a in args)


def _apply(fn: Callable, case: Case, args: tuple):
    return case.call(fn, *args) if case.call is not None else fn(*args)


def _call(fn: Callable, case: Case):
    """fn(*case.args) on copies of the inputs; _Mismatch if it modified them in place."""
    args = _copy_args(case.args)
    out = _apply(fn, case, args)
    for k, (before, after) in enumerate(zip(case.args, args)):
        if isinstance(before, np.ndarray) and not np.array_equal(before, after, equal_nan=True):
            raise _Mismatch(f"your function changed its input argument {k + 1} in place (e.g. `x *= ...` or "
                            f"`x[...] = ...`); compute into a new array instead")
    return out


def _quietly(fn: Callable, *args):
    with np.errstate(all="ignore"):
        return fn(*args)


def _run(name: str, fn: Optional[Callable], cases: Sequence[Case], compare: Callable[[Any, Case], str],
         mistakes: Sequence[tuple[Callable, str]], hint: str, seed: int, verbose: bool,
         on_pass: Callable[[list], str], fn_name: str) -> CheckResult:
    """Check fn on cases; compare(got, case) returns '' when right or says what is wrong."""
    used_solution = False
    attempted = fn is not None
    if attempted:
        try:
            _quietly(_call, fn, cases[0])
        except NotImplementedError:
            attempted = False
        except Exception:
            pass  # reported below, with the case that raised it
    if not attempted:
        if not solutions_enabled():
            msg = (f"- {name}: not attempted yet: write {fn_name} in the cell above (replace the "
                   f"`raise NotImplementedError`) and run both cells again.\n"
                   f"  Stuck? lab.show_solution({name!r}) prints a reference solution.")
            return _finish(CheckResult(name, False, False, msg, seed), verbose, strict=False)
        fn, used_solution = solution(name), True

    outputs = []
    for k, case in enumerate(cases):
        try:
            got = _quietly(_call, fn, case)
            problem = compare(got, case)
        except _Mismatch as e:
            got, problem = None, str(e)
        except Exception as e:  # the learner's code raised: report it, never propagate it
            got, problem = None, f"your function raised {_describe_exception(e)}"
        if problem:
            lines = [f"✗ {name}: case {k + 1} of {len(cases)} failed: {case.what}", f"  {problem}"]
            diagnosis = _diagnose(got, case, compare, mistakes) if got is not None else ""
            if case.note:
                lines.append(f"  this case checks: {case.note}")
            lines.append(f"  hint: {diagnosis or hint}")
            lines.append(f"  replay these inputs: lab.check_{name}({fn_name}, seed={seed})")
            if used_solution:
                lines.insert(0, f"({SOLUTIONS_ENV}=1: checked the reference solution in place of {fn_name})")
            return _finish(CheckResult(name, False, True, "\n".join(lines), seed, used_solution), verbose,
                           strict=solutions_enabled())
        outputs.append(got)
    if not used_solution:
        _passed_functions[name] = fn
    head = (f"({SOLUTIONS_ENV}=1: {fn_name} is not written; checked the reference solution instead)\n"
            if used_solution else "")
    msg = f"{head}✓ {name}: passed all {len(cases)} cases (seed {seed}). {on_pass(outputs)}"
    return _finish(CheckResult(name, True, True, msg, seed, used_solution), verbose, strict=False)


def _diagnose(got, case: Case, compare, mistakes) -> str:
    """The hints of the known mistakes whose answer to this case equals the learner's ('' if none does)."""
    hints = []
    for wrong, hint in mistakes:
        try:
            theirs = _quietly(_apply, wrong, case, _copy_args(case.args))
            # Within the checker's own tolerance of the mistake's answer: the learner may have made that mistake.
            if not compare(got, dataclasses.replace(case, expected=theirs)):
                hints.append(hint)
        except Exception:
            continue
    return "\n  or: ".join(hints)


def _finish(result: CheckResult, verbose: bool, strict: bool) -> CheckResult:
    if verbose:
        print(result.message)
    if strict and not result.passed:
        raise LabCheckFailed(result.message)
    return result


def _compare_arrays(got, expected: np.ndarray, atol: float, rtol: float, where: Callable[[tuple], str]) -> str:
    """'' when got matches expected elementwise within atol + rtol * |expected|; else the worst element."""
    if got is None:
        return "your function returned None: did you forget `return`?"
    try:
        got = np.asarray(got)
    except Exception:
        return f"expected an array, got {type(got).__name__}"
    if got.dtype.kind not in "fiu":
        return f"expected a float array, got dtype {got.dtype}"
    if got.shape != expected.shape:
        return f"expected shape {expected.shape}, got shape {got.shape}"
    got = got.astype(np.float64)
    finite = np.isfinite(expected)
    bad_nan = finite & ~np.isfinite(got)
    if bad_nan.any():
        idx = tuple(int(i) for i in np.argwhere(bad_nan)[0])
        return f"at {where(idx)}: expected {_fmt(expected[idx])}, got {_fmt(got[idx])}"
    err = np.where(finite, np.abs(got - expected), 0.0)
    tol = atol + rtol * np.abs(expected)
    excess = np.where(finite, err / tol, 0.0)
    if (excess > 1).any():
        idx = np.unravel_index(int(np.argmax(excess)), expected.shape)
        idx = tuple(int(i) for i in idx)
        return (f"at {where(idx)}: expected {_fmt(expected[idx])}, got {_fmt(got[idx])} "
                f"(off by {err[idx]:.2g}; allowed {tol[idx]:.2g})")
    return ""


def _compare_scalar(got, expected: float, atol: float, rtol: float) -> str:
    if got is None:
        return "your function returned None: did you forget `return`?"
    try:
        if np.size(got) != 1:
            return f"expected one number, got {type(got).__name__} of shape {np.shape(got)}"
        value = float(np.asarray(got).reshape(()))
    except (TypeError, ValueError):
        return f"expected a number, got {type(got).__name__}: {got!r}"
    if not (math.isfinite(value) and math.isfinite(expected)):
        # References are finite, so this matters only when diagnosing: an overflowing mistake gives nan or inf
        # depending on the dtype and the inputs; any non-number matches any other.
        same = not math.isfinite(value) and not math.isfinite(expected)
        return "" if same else f"expected {_fmt(expected)}, got {_fmt(value)}"
    if abs(value - expected) > atol + rtol * abs(expected):
        return f"expected {_fmt(expected)}, got {_fmt(value)} (off by {abs(value - expected):.2g})"
    return ""


def _max_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# =============================================================================================================
# Float64 references (written from the formulas; bertqa's implementations are compared with them too)
# =============================================================================================================

_erf64 = np.vectorize(math.erf, otypes=[np.float64])


def _gelu64(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + _erf64(x / math.sqrt(2.0)))


def _layernorm64(x, w, b, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(w, np.float64) + np.asarray(b, np.float64)


def _cross_entropy64(logits, positions):
    logits = np.asarray(logits, np.float64)
    m = logits.max(1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    return float(-logp[np.arange(len(logits)), np.asarray(positions, np.int64)].mean())


def _span_loss64(s, e, sp, ep):
    return (_cross_entropy64(s, sp) + _cross_entropy64(e, ep)) / 2


def _best_span64(s, e, max_answer_length):
    """Exhaustive search over every valid (start, end); a loop, so it shares no code with the solution."""
    s, e = np.asarray(s, np.float64), np.asarray(e, np.float64)
    best, best_score = None, -math.inf
    for i in range(len(s)):
        for j in range(i, min(len(e), i + max_answer_length)):
            if s[i] + e[j] > best_score:
                best, best_score = (i, j), s[i] + e[j]
    return best


def _attention64(q, k, v, mask):
    """softmax(q k^T / sqrt(HS) + (1 - mask) * -10000) v per batch row and head; einsum, unlike the solution."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])  # [B, NH, T, T]
    if mask is not None:
        scores = scores + (1.0 - np.asarray(mask, np.float64))[:, None, None, :] * -10000.0
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhij,bhjd->bhid", probs, v)


def _adamw64(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
    """One step of torch.optim.AdamW (decoupled decay first, then the bias-corrected Adam update)."""
    p, g, m, v = (np.asarray(a, np.float64) for a in (param, grad, m, v))
    p = p - lr * weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


# =============================================================================================================
# Exercise 1: GELU
# =============================================================================================================


def _gelu_mistakes():
    def tanh_form(x):
        x = np.asarray(x, np.float64)
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    return [
        (tanh_form, "that is the tanh approximation of GELU (GPT-2's); BERT uses the exact form "
                    "0.5 * x * (1 + erf(x / sqrt(2))), which differs by up to 5e-4"),
        (lambda x: np.asarray(x, np.float64) / (1 + np.exp(-1.702 * np.asarray(x, np.float64))),
         "that is the sigmoid approximation x * sigmoid(1.702 x); use 0.5 * x * (1 + erf(x / sqrt(2)))"),
        (lambda x: 0.5 * np.asarray(x, np.float64) * (1 + _erf64(np.asarray(x, np.float64))),
         "divide x by sqrt(2) inside erf: Phi(x) = (1 + erf(x / sqrt(2))) / 2 is the normal CDF"),
        (lambda x: np.asarray(x, np.float64) * (1 + _erf64(np.asarray(x, np.float64) / math.sqrt(2))),
         "you are missing the factor 0.5: GELU(x) = 0.5 * x * (1 + erf(x / sqrt(2)))"),
        (lambda x: np.maximum(np.asarray(x, np.float64), 0.0),
         "that is ReLU; GELU weights x by the normal CDF: 0.5 * x * (1 + erf(x / sqrt(2)))"),
    ]


def check_gelu(fn: Optional[Callable], seed: Optional[int] = None, verbose: bool = True) -> CheckResult:
    """Check fn(x) -> GELU(x) = 0.5 * x * (1 + erf(x / sqrt(2))), elementwise, on float32 arrays of any shape.

    Tolerance: |got - expected| <= 1e-5 + 1e-5 * |expected| against a float64 reference.
    """
    seed = _fresh_seed(seed)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(500, 2000))
    special = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 30.0, -30.0, 1e3, -1e3, 2.7, -0.7], np.float32)
    inputs = [
        (f"x of shape ({n},), uniform in [-6, 6]", rng.uniform(-6, 6, n).astype(np.float32), ""),
        ("x of shape (3, 17, 5), normal with std 2", (2 * rng.standard_normal((3, 17, 5))).astype(np.float32), ""),
        ("x of shape (1,)", np.array([rng.uniform(-3, 3)], np.float32), ""),
        ("x = " + ", ".join(f"{v:g}" for v in special), special,
         "zeros, tiny and huge values (GELU(x) -> x for large x, -> 0 for very negative x)"),
    ]
    cases = [Case(what, (x,), _gelu64(x), note) for what, x, note in inputs]

    def compare(got, case):
        x = case.args[0]
        return _compare_arrays(got, case.expected, 1e-5, 1e-5, where=lambda i: f"x{list(i)} = {_fmt(x[i])}")

    def on_pass(outputs):
        yours = max(_max_error(o, c.expected) for o, c in zip(outputs, cases))
        kernel = max(_max_error(ops.gelu(np.ascontiguousarray(c.args[0])), c.expected) for c in cases)
        return (f"Largest difference from the float64 reference: yours {yours:.1e}, "
                f"bertqa.ops.gelu (the C kernel) {kernel:.1e}.")

    return _run("gelu", fn, cases, compare, _gelu_mistakes(),
                "GELU(x) = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))). math.erf takes one float: "
                "np.vectorize(math.erf) applies it to an array (or use scipy.special.erf)",
                seed, verbose, on_pass, "my_gelu")


# =============================================================================================================
# Exercise 2: LayerNorm
# =============================================================================================================


def _layernorm_mistakes():
    def f64(x, w, b):
        return np.asarray(x, np.float64), np.asarray(w, np.float64), np.asarray(b, np.float64)

    def unbiased(x, w, b, eps):
        x, w, b = f64(x, w, b)
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + eps) * w + b

    def eps_outside(x, w, b, eps):
        x, w, b = f64(x, w, b)
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / (x.std(-1, keepdims=True) + eps) * w + b

    def no_affine(x, w, b, eps):
        return _layernorm64(x, np.ones_like(w), np.zeros_like(b), eps)

    def no_eps(x, w, b, eps):
        x, w, b = f64(x, w, b)
        return (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True) * w + b

    def first_axis(x, w, b, eps):
        x, w, b = f64(x, w, b)
        mu = x.mean(0, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(0, keepdims=True) + eps) * w + b

    def single_pass_float32(x, w, b, eps):
        x = np.asarray(x, np.float32)
        mu = x.mean(-1, keepdims=True)
        var = (x * x).mean(-1, keepdims=True) - mu * mu
        return (x - mu) / np.sqrt(var + np.float32(eps)) * w + b

    return [
        (unbiased, "use the biased variance, the mean of the squared deviations (divide by C, not C - 1): "
                   "np.var's default ddof=0, as torch.nn.LayerNorm"),
        (eps_outside, "eps goes inside the square root: (x - mean) / sqrt(var + eps)"),
        (no_eps, "a row whose values are all equal has variance 0: add eps inside the square root, "
                 "sqrt(var + eps), so it stays finite"),
        (first_axis, "normalise over the last axis (the C features of one token): axis=-1, keepdims=True"),
        (no_affine, "after normalising, scale by weight and shift by bias: y = x_hat * weight + bias"),
        (single_pass_float32, "mean(x**2) - mean(x)**2 loses almost every digit in float32 when |mean| is large "
                              "next to the spread; use mean((x - mean)**2), or compute in float64"),
    ]


def check_layernorm(fn: Optional[Callable], seed: Optional[int] = None, verbose: bool = True) -> CheckResult:
    """Check fn(x, weight, bias, eps) -> LayerNorm of x over its last axis (x: [..., C] float32; weight,
    bias: [C]), as torch.nn.LayerNorm: (x - mean) / sqrt(var + eps) * weight + bias, biased variance.

    Tolerance: |got - expected| <= 1e-4 + 1e-4 * |expected| against a float64 reference (4e-4 for inputs
    around 500, where float32 itself holds only ~3e-5).
    """
    seed = _fresh_seed(seed)
    rng = np.random.default_rng(seed)

    def params(C):
        return ((1 + 0.5 * rng.standard_normal(C)).astype(np.float32),
                (0.5 * rng.standard_normal(C)).astype(np.float32))

    T = int(rng.integers(3, 12)) | 1  # odd
    constant = rng.standard_normal((3, 16)).astype(np.float32)
    constant[1] = 3.0
    # Around 500 a float32 holds ~3e-5, so even a careful float32 LayerNorm (bertqa's kernel included) is off by
    # up to ~1e-4 there: that case allows 4e-4; mean(x**2) - mean(x)**2 is off by 1e-2 and more.
    specs = [
        (f"x of shape (2, {T}, 384), normal (std 3, mean 1), eps=1e-12",
         (3 * rng.standard_normal((2, T, 384)) + 1).astype(np.float32), 1e-12, "", None),
        ("x of shape (5, 6) (C = 6), eps=1e-5", rng.standard_normal((5, 6)).astype(np.float32), 1e-5,
         "the variance divides by C (with C = 6, C - 1 is far off)", None),
        ("x of shape (4, 10), eps=0.5 (a large eps)", rng.standard_normal((4, 10)).astype(np.float32), 0.5,
         "where eps goes: sqrt(var + eps), not sqrt(var) + eps", None),
        ("x of shape (3, 16) whose row 1 is all 3.0, eps=1e-12", constant, 1e-12,
         "a row with zero variance: eps keeps it finite (the output is the bias)", None),
        ("x of shape (4, 64) = 500 + normal(0, 1), eps=1e-12",
         (500 + rng.standard_normal((4, 64))).astype(np.float32), 1e-12,
         "precision when |mean| >> std (activations with a large offset)", (4e-4, 4e-4)),
        ("x of shape (2, 3, 4, 8), eps=1e-12", rng.standard_normal((2, 3, 4, 8)).astype(np.float32), 1e-12,
         "any number of leading axes; normalise over the last one only", None),
    ]
    cases = []
    for what, x, eps, note, tol in specs:
        w, b = params(x.shape[-1])
        cases.append(Case(what, (x, w, b, eps), _layernorm64(x, w, b, eps), note, tol))

    def compare(got, case):
        x = case.args[0]
        return _compare_arrays(got, case.expected, *(case.tol or (1e-4, 1e-4)),
                               where=lambda i: f"index {list(i)} (row x{list(i[:-1])}, x = {_fmt(x[i])})")

    def on_pass(outputs):
        yours = max(_max_error(o, c.expected) for o, c in zip(outputs, cases))
        kernel = max(_max_error(ops.layernorm(*c.args[:3], eps=c.args[3]), c.expected) for c in cases)
        return (f"Largest difference from the float64 reference: yours {yours:.1e}, "
                f"bertqa.ops.layernorm (the C kernel) {kernel:.1e}.")

    return _run("layernorm", fn, cases, compare, _layernorm_mistakes(),
                "mean and variance over the last axis (axis=-1, keepdims=True); biased variance; "
                "y = (x - mean) / sqrt(var + eps) * weight + bias",
                seed, verbose, on_pass, "my_layernorm")


# =============================================================================================================
# Exercise 3: attention
# =============================================================================================================


def _attention_mistakes():
    def attn(q, k, v, mask, scale=None, masking="add", axis=-1, stable=True, dtype=np.float64):
        q, k, v = (np.asarray(a, dtype) for a in (q, k, v))
        HS, T = q.shape[-1], q.shape[-2]
        scores = q @ k.swapaxes(-1, -2) * (1 / math.sqrt(HS) if scale is None else scale(HS, T))
        real = None if mask is None else np.asarray(mask, dtype)
        if real is not None:
            if masking == "add":
                scores = scores + (1 - real[:, None, None, :]) * -10000.0
            elif masking == "sign":  # -10000 on the real tokens
                scores = scores + real[:, None, None, :] * -10000.0
            elif masking == "multiply":
                scores = scores * real[:, None, None, :]
        if stable:
            scores = scores - scores.max(axis, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(axis, keepdims=True)
        if real is not None and masking == "after":
            probs = probs * real[:, None, None, :]
        return probs @ v

    return [
        (lambda q, k, v, mask=None: attn(q, k, v, mask, scale=lambda HS, T: 1 / HS),
         "wrong scale: divide the scores by sqrt(HS) (HS = q.shape[-1], the head size), not by HS"),
        (lambda q, k, v, mask=None: attn(q, k, v, mask, scale=lambda HS, T: 1.0),
         "wrong scale: the scores are q @ k^T / sqrt(HS) (HS = q.shape[-1]); you did not scale them"),
        (lambda q, k, v, mask=None: attn(q, k, v, mask, scale=lambda HS, T: 1 / math.sqrt(T)),
         "wrong scale: divide by sqrt(HS), the head size q.shape[-1], not by sqrt(T), the sequence length"),
        # Masking the queries instead of the keys adds one constant to a query's whole row of scores, which the
        # softmax ignores: the same answer as no mask at all. mask * -10000 and (1 - mask) * +10000 differ by a
        # constant too. One hint each.
        (lambda q, k, v, mask=None: attn(q, k, v, None),
         "mask ignored (or put on the queries, mask[:, None, :, None], which comes to the same: a constant added "
         "to a query's whole row of scores changes nothing): a padded key (mask == 0) must take no attention, so "
         "add (1 - mask) * -10000 to the scores of the keys, the last axis: mask[:, None, None, :]"),
        (lambda q, k, v, mask=None: attn(q, k, v, mask, masking="sign"),
         "the mask is the wrong way round or has the wrong sign: 1 marks a real token and 0 padding, and the "
         "padding gets -10000 added: (1 - mask) * -10000 (not mask * -10000, not (1 - mask) * +10000)"),
        (lambda q, k, v, mask=None: attn(q, k, v, mask, masking="multiply"),
         "add -10000 to the scores of masked keys; multiplying the scores by the mask sets them to 0, which still "
         "takes probability"),
        (lambda q, k, v, mask=None: attn(q, k, v, mask, masking="after"),
         "mask the scores before the softmax; zeroing probabilities afterwards leaves rows that no longer sum to 1"),
        (lambda q, k, v, mask=None: attn(q, k, v, mask, axis=-2),
         "softmax over the wrong axis: each query's weights are a softmax over the keys, the last axis (axis=-1) "
         "of the scores [B, NH, T, T]"),
        (lambda q, k, v, mask=None: attn(q, k, v, mask, stable=False),
         "exp overflows for large scores: subtract each row's max first, scores - scores.max(-1, keepdims=True) "
         "(softmax does not change)"),
    ]


def check_attention(fn: Optional[Callable], seed: Optional[int] = None, verbose: bool = True) -> CheckResult:
    """Check fn(q, k, v, mask=None) -> out: BERT's multi-head self-attention for every batch row b and head h,

        scores = q[b, h] @ k[b, h].T / sqrt(HS) + (1 - mask[b]) * -10000     # [T, T]; the mask is on the keys
        out[b, h] = softmax(scores, axis=-1) @ v[b, h]                         # [T, HS]

    q, k, v: [B, NH, T, HS] float32; mask: [B, T] of 0/1 (1 = real token, 0 = padding; float or int), or None
    for no padding. Tolerance: 2e-5 absolute + 2e-5 relative against a float64 reference (float32 attention
    is within ~1e-6 at these sizes; tests/test_ops.py holds bertqa.ops.attention to 2e-5 too).
    """
    seed = _fresh_seed(seed)
    rng = np.random.default_rng(seed)

    def qkv(B, NH, T, HS, scale=1.0):
        return tuple((scale * rng.standard_normal((B, NH, T, HS))).astype(np.float32) for _ in range(3))

    T = int(rng.integers(9, 40)) | 1  # odd: never a multiple of 8 (or of any tile)
    HS = int(rng.choice([5, 7, 9, 13]))
    n_real = int(rng.integers(3, T - 2))
    padded = np.ones((2, T), np.float32)
    padded[1, n_real:] = 0
    many = np.zeros((3, 41), np.int32)  # integers, as Features.batch gives them
    many[0, :3] = 1
    many[1, rng.choice(41, 7, replace=False)] = 1  # holes anywhere, not only padding at the end
    many[2, :20] = 1
    single = np.ones((2, 12), np.float32)
    single[0, 1:] = 0
    T2 = int(rng.integers(5, 30))
    large = qkv(2, 2, 17, 8)
    large[0][1, 0, 3] = large[1][1, 0, 5] = 20.0  # that query's score for that key: 20 * 20 * 8 / sqrt(8) = 1131
    specs = [
        (f"B=2, NH=3, T={T}, HS={HS}; row 1 has {n_real} real tokens, then padding", (*qkv(2, 3, T, HS), padded),
         "padding at the end of a row: its keys take no attention"),
        (f"B=1, NH=2, T={T2}, HS=16, mask=None", (*qkv(1, 2, T2, 16), None), "no mask: mask=None means no padding"),
        ("B=3, NH=2, T=41, HS=8; rows with 3, 7 (scattered) and 20 real keys; mask of int32", (*qkv(3, 2, 41, 8), many),
         "most keys masked; the 0s of the mask are anywhere in the row"),
        ("B=2, NH=1, T=12, HS=6; row 0 has a single real key (token 0)", (*qkv(2, 1, 12, 6), single),
         "with one real key, every query of that row gets exactly that key's value vector"),
        ("B=2, NH=2, T=17, HS=8; one query-key score of 1131", (*large, np.ones((2, 17))),
         "numerical stability: exp(1131) overflows (float64 too) unless each row's max is subtracted first"),
        ("B=1, NH=1, T=1, HS=1", (*qkv(1, 1, 1, 1), np.ones((1, 1), np.float32)),
         "a single token attends only to itself: out = v"),
    ]
    cases = [Case(what, args, _attention64(*args), note) for what, args, note in specs]

    def compare(got, case):
        mask = case.args[3]

        def where(i):
            b, h, t, d = i
            real = "no mask" if mask is None else f"{int(np.sum(mask[b] != 0))} real keys of {mask.shape[1]}"
            return f"out[{b}, {h}, {t}, {d}] (batch row {b}: {real}; head {h}, query {t})"

        return _compare_arrays(got, case.expected, 2e-5, 2e-5, where)

    def on_pass(outputs):
        yours = max(_max_error(o, c.expected) for o, c in zip(outputs, cases))
        kernel = max(_max_error(ops.attention(*c.args), c.expected) for c in cases)
        return (f"Largest difference from the float64 reference: yours {yours:.1e}, "
                f"bertqa.ops.attention (the C kernel) {kernel:.1e}.")

    return _run("attention", fn, cases, compare, _attention_mistakes(),
                "scores = q @ k.swapaxes(-1, -2) / sqrt(HS); scores += (1 - mask[:, None, None, :]) * -10000; "
                "subtract each row's max, exp, divide by the row's sum (over the keys, axis=-1); out = probs @ v",
                seed, verbose, on_pass, "my_attention")


# =============================================================================================================
# Exercise 4: AdamW
# =============================================================================================================


def _adamw_mistakes():
    def step64(p, g, m, v, step, lr, b1, b2, eps, wd, *, correct=True, l2=False, t=None, eps_in=False,
               no_eps=False, corrected_out=False, decay_lr=True, decay_after=False, v_abs=False, ema_swap=False,
               correct_after_sqrt=False):
        p, g, m, v = (np.asarray(a, np.float64) for a in (p, g, m, v))
        t = step if t is None else t(step)
        if l2:
            g = g + wd * p
        decay = (lr if decay_lr else 1.0) * wd
        if not (l2 or decay_after):
            p = p - decay * p
        if ema_swap:
            m, v = b1 * g + (1 - b1) * m, b2 * g * g + (1 - b2) * v
        else:
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * (np.abs(g) if v_abs else g * g)
        c1, c2 = (1 - b1**t, 1 - b2**t) if correct else (1.0, 1.0)
        m_hat, v_hat = m / c1, v / c2
        if eps_in:
            denom = np.sqrt(v_hat + eps)
        elif correct_after_sqrt:
            denom = np.sqrt(v) / c2 + eps
        else:
            denom = np.sqrt(v_hat) + (0.0 if no_eps else eps)
        new = p - lr * m_hat / denom
        if decay_after:
            new = new - decay * new
        return (new, m_hat, v_hat) if corrected_out else (new, m, v)

    def mistake(**kw):
        def fn(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
            return step64(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, **kw)
        return fn

    return [
        (mistake(correct=False), "no bias correction: m and v start at 0, so divide them by (1 - beta1**step) and "
                                 "(1 - beta2**step) before the update: m_hat = m / (1 - beta1**step), ..."),
        (mistake(l2=True), "L2 added to the gradient (that is Adam with L2, not AdamW): decay the parameter "
                           "itself, param -= lr * weight_decay * param, and leave the gradient, m and v alone"),
        (mistake(t=lambda s: s + 1), "step counts from 1: the first update has step = 1, bias corrections "
                                     "1 - beta**step with that step (do not add 1)"),
        (mistake(eps_in=True), "eps goes outside the square root: sqrt(v_hat) + eps, not sqrt(v_hat + eps)"),
        (mistake(no_eps=True), "add eps to the denominator, sqrt(v_hat) + eps: a zero gradient at step 1 gives "
                               "m_hat / sqrt(v_hat) = 0 / 0"),
        (mistake(corrected_out=True), "return the moments m and v themselves, not the bias-corrected m_hat and "
                                      "v_hat (the next step corrects them again)"),
        (mistake(decay_lr=False), "the decay is scaled by the learning rate: param -= lr * weight_decay * param"),
        (mistake(decay_after=True), "decay the parameter as it was before this step (torch.optim.AdamW: param *= "
                                    "1 - lr * weight_decay, then the Adam update)"),
        (mistake(v_abs=True), "v is the moving average of the squared gradient: v = beta2 * v + (1 - beta2) * "
                              "grad**2"),
        (mistake(ema_swap=True), "the moving averages keep beta of the old value: m = beta1 * m + (1 - beta1) * "
                                 "grad (likewise v with beta2)"),
        (mistake(correct_after_sqrt=True), "bias-correct v before the square root: sqrt(v / (1 - beta2**step)), "
                                           "not sqrt(v) / (1 - beta2**step)"),
    ]


def _adamw_steps(fn, param, grads, m, v, first_step, *hyper):
    """Several steps in a row, each step's (param, m, v) fed to the next: grads[j] is the gradient of step
    first_step + j."""
    for step, grad in enumerate(grads, first_step):
        out = fn(param, grad, m, v, step, *hyper)
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            raise _Mismatch(f"at step {step}: expected the tuple (param, m, v), got {type(out).__name__}")
        param, m, v = out
    return param, m, v


def check_adamw(fn: Optional[Callable], seed: Optional[int] = None, verbose: bool = True) -> CheckResult:
    """Check fn(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0) -> (param, m, v):
    one step of torch.optim.AdamW, returning new arrays (the inputs are left as they are)::

        param = param - lr * weight_decay * param                  # decoupled weight decay
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        param = param - lr * m_hat / (sqrt(v_hat) + eps)           # m_hat = m / (1 - beta1**step), v_hat likewise

    with step counting from 1. Tolerance against a float64 reference: param 1e-6 absolute + 1e-6 relative (an
    update is ~lr); m and v 1e-4 relative, plus 1e-6 of the largest input they are made of.
    """
    seed = _fresh_seed(seed)
    rng = np.random.default_rng(seed)

    def f32(*arrays):
        return tuple(np.asarray(a, np.float32) for a in arrays)

    def history(shape, steps, b1, b2):
        """m and v after `steps` steps of gradients of std 1 (exactly as a run would leave them)."""
        m, v = np.zeros(shape), np.zeros(shape)
        for _ in range(steps):
            g = rng.standard_normal(shape)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        return m, v

    n = int(rng.integers(50, 200)) | 1
    zeros = np.zeros(n, np.float32)
    tiny = (1e-6 * rng.standard_normal(n)).astype(np.float32)
    tiny[::7] = 0.0
    m7, v7 = history((7, 5), 6, 0.8, 0.99)
    late_m = 0.3 * rng.standard_normal((3, 4, 5))
    late_v = (np.abs(rng.standard_normal((3, 4, 5))) + 0.1) ** 2
    m3, v3 = history((16,), 2, 0.9, 0.999)
    chain = rng.standard_normal((6, 33))
    specs = [
        (f"step 1 (m = v = 0), param of shape ({n},), lr=1e-3, weight_decay=0.01",
         (*f32(rng.standard_normal(n), rng.standard_normal(n), zeros, zeros), 1, 1e-3, 0.9, 0.999, 1e-8, 0.01),
         "the first step: the bias corrections 1 - beta**1 matter most here", None),
        ("step 7 (m, v from 6 earlier steps), param of shape (7, 5), lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-8, "
         "weight_decay=0.1",
         (*f32(rng.standard_normal((7, 5)), rng.standard_normal((7, 5)), m7, v7), 7, 1e-2, 0.8, 0.99, 1e-8, 0.1),
         "betas other than the defaults, and a strong weight decay (decoupled: param -= lr * wd * param)", None),
        (f"step 1, gradients of size ~1e-6 (every 7th exactly 0), eps=1e-8, weight_decay=0",
         (*f32(rng.standard_normal(n), tiny, zeros, zeros), 1, 1e-3, 0.9, 0.999, 1e-8, 0.0),
         "where eps goes: sqrt(v_hat) + eps; a zero gradient gives a zero update", None),
        ("step 10000 (a late step: the bias corrections are ~1), param of shape (3, 4, 5), lr=5e-4, "
         "weight_decay=0.01",
         (*f32(rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5)), late_m, late_v), 10000, 5e-4,
          0.9, 0.999, 1e-8, 0.01),
         "a large step number (the step comes from the argument, not from a counter of calls)", None),
        ("step 3, param of shape (16,), lr=1e-2 and the defaults (beta1=0.9, beta2=0.999, eps=1e-8, "
         "weight_decay=0.0) left out of the call",
         (*f32(rng.standard_normal(16), rng.standard_normal(16), m3, v3), 3, 1e-2),
         "the defaults are torch.optim.AdamW's betas and eps, with weight_decay=0.0", None),
        ("steps 1 to 6 in a row from m = v = 0 (each step's param, m, v fed to the next), param of shape (33,), "
         "lr=3e-3, weight_decay=0.01",
         (*f32(rng.standard_normal(33), chain, np.zeros(33), np.zeros(33)), 1, 3e-3, 0.9, 0.999, 1e-8, 0.01),
         "several steps: the returned m and v are the ones the next step needs", _adamw_steps),
    ]
    cases = []
    for what, args, note, call in specs:
        expected = _adamw_steps(_adamw64, *args) if call else _adamw64(*args)
        cases.append(Case(what, args, expected, note, call=call))

    def compare(got, case):
        if got is None:
            return "your function returned None: did you forget `return param, m, v`?"
        if not (isinstance(got, (tuple, list)) and len(got) == 3):
            size = f" of length {len(got)}" if isinstance(got, (tuple, list)) else ""
            return f"expected the tuple (param, m, v) of three arrays, got {type(got).__name__}{size}"
        param, grad, m, v = case.args[:4]
        # m and v: relative to the size of the terms summed (beta1 * m and (1 - beta1) * grad may nearly cancel),
        # 1e-4 because 1 - beta2 in float32 (as bertqa's kernel computes it) is off by 1.3e-5 already
        g = float(np.max(np.abs(grad)))
        tols = [(1e-6, 1e-6), (1e-6 * (float(np.max(np.abs(m))) + g) + 1e-30, 1e-4),
                (1e-6 * (float(np.max(np.abs(v))) + g * g) + 1e-30, 1e-4)]
        for name, theirs, expected, (atol, rtol) in zip(("param", "m", "v"), got, case.expected, tols):

            def where(i, name=name):
                if case.call is not None:
                    return f"{name}{list(i)} after the last step"
                return (f"{name}{list(i)} (inputs there: param {_fmt(param[i])}, grad {_fmt(grad[i])}, "
                        f"m {_fmt(m[i])}, v {_fmt(v[i])})")

            problem = _compare_arrays(theirs, expected, atol, rtol, where)
            if problem:
                return f"{name}: {problem}"
        return ""

    def kernel(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        param, m, v = (np.array(a, np.float32) for a in (param, m, v))  # copies: ops.adamw works in place
        ops.adamw(param, np.ascontiguousarray(grad, np.float32), m, v, step, lr, beta1, beta2, eps, weight_decay)
        return param, m, v

    def on_pass(outputs):
        yours = max(_max_error(o[0], c.expected[0]) for o, c in zip(outputs, cases))
        theirs = max(_max_error(_apply(kernel, c, c.args)[0], c.expected[0]) for c in cases)
        return (f"Largest difference of param from the float64 reference: yours {yours:.1e}, "
                f"bertqa.ops.adamw (the C kernel, which updates in place) {theirs:.1e}.")

    return _run("adamw", fn, cases, compare, _adamw_mistakes(),
                "p = param - lr * weight_decay * param; m = beta1 * m + (1 - beta1) * grad; v = beta2 * v + "
                "(1 - beta2) * grad**2; m_hat = m / (1 - beta1**step); v_hat = v / (1 - beta2**step); "
                "return p - lr * m_hat / (sqrt(v_hat) + eps), m, v",
                seed, verbose, on_pass, "my_adamw")


# =============================================================================================================
# Exercise 5: the span loss
# =============================================================================================================


def _span_loss_mistakes():
    def ce(logits, pos, axis=1):
        logits = np.asarray(logits, np.float64)
        m = logits.max(axis, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis, keepdims=True))
        return -logp[np.arange(len(logits)), np.asarray(pos)]

    def naive_ce(logits, pos):
        logits = np.asarray(logits, np.float64)
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return -np.log(p[np.arange(len(logits)), np.asarray(pos)])

    def shifted(s, e, sp, ep):
        T = np.shape(s)[1]
        return (ce(s, np.minimum(np.asarray(sp) + 1, T - 1)).mean()
                + ce(e, np.minimum(np.asarray(ep) + 1, T - 1)).mean()) / 2

    return [
        (lambda s, e, sp, ep: ce(s, sp).mean() + ce(e, ep).mean(),
         "average the two cross-entropies: (CE(start) + CE(end)) / 2, not their sum"),
        (lambda s, e, sp, ep: (ce(s, sp).sum() + ce(e, ep).sum()) / 2,
         "take the mean over the batch, not the sum"),
        (lambda s, e, sp, ep: ce(s, sp).mean(), "the loss has two halves: the end position counts too"),
        (shifted, "positions index the logits directly: the right token of row b is logits[b, positions[b]]"),
        (lambda s, e, sp, ep: (ce(s, sp, axis=0).mean() + ce(e, ep, axis=0).mean()) / 2,
         "the softmax runs over the tokens of one row (axis=1), not over the batch (axis=0)"),
        (lambda s, e, sp, ep: (naive_ce(s, sp).mean() + naive_ce(e, ep).mean()) / 2,
         "exp overflows for large logits: subtract each row's max before exp (the log-sum-exp trick): "
         "log_softmax(z) = z - max(z) - log(sum(exp(z - max(z))))"),
    ]


def check_span_loss(fn: Optional[Callable], seed: Optional[int] = None, verbose: bool = True) -> CheckResult:
    """Check fn(start_logits, end_logits, start_positions, end_positions) -> float: the mean over the batch of
    the cross-entropy of the start logits at the start positions, likewise for the end, averaged:
    (CE_start + CE_end) / 2 (Hugging Face BertForQuestionAnswering's loss). Logits [B, T] float32, positions
    [B] int in [0, T). Tolerance 1e-5 absolute + 1e-5 relative against a float64 reference."""
    seed = _fresh_seed(seed)
    rng = np.random.default_rng(seed)

    def make(B, T, scale=3.0):
        s = (scale * rng.standard_normal((B, T))).astype(np.float32)
        e = (scale * rng.standard_normal((B, T))).astype(np.float32)
        sp = rng.integers(0, T, B)
        ep = np.minimum(sp + rng.integers(0, 5, B), T - 1)
        return s, e, sp, ep

    T = int(rng.integers(20, 60)) | 1
    specs = [
        (f"B=4, T={T}", make(4, T), ""),
        ("B=1, T=5", make(1, 5), "a batch of one"),
        ("B=8, T=384, some answers at [CLS] (position 0)", make(8, 384), "position 0 is a real class ([CLS])"),
        ("B=3, T=20 with logits of size ~1000", make(3, 20, scale=1000.0),
         "numerical stability: exp(1000) overflows unless the row max is subtracted first"),
    ]
    specs[2][1][2][:3] = 0
    specs[2][1][3][:3] = 0
    cases = [Case(what, args, _span_loss64(*args), note) for what, args, note in specs]

    def compare(got, case):
        return _compare_scalar(got, case.expected, 1e-5, 1e-5)

    def on_pass(outputs):
        kernel = max(abs(ops.span_loss(c.args[0], c.args[1], c.args[2].astype(np.int64),
                                       c.args[3].astype(np.int64))[0] - c.expected) / max(1.0, abs(c.expected))
                     for c in cases)
        return (f"bertqa.ops.span_loss (the C kernel, which also returns the gradients) agrees with the float64 "
                f"reference to {kernel:.1e} (relative).")

    return _run("span_loss", fn, cases, compare, _span_loss_mistakes(),
                "for each row b: CE = -log softmax(logits[b])[positions[b]]; average over the batch; "
                "loss = (CE_start + CE_end) / 2",
                seed, verbose, on_pass, "my_span_loss")


# =============================================================================================================
# Exercise 6: best-span decoding
# =============================================================================================================


def _best_span_mistakes():
    def independent(s, e, L):
        return int(np.argmax(s)), int(np.argmax(e))

    def allowing(L_shift=0, allow_backwards=False):
        def fn(s, e, L):
            best, score = None, -math.inf
            for i in range(len(s)):
                first = max(0, i - L + 1) if allow_backwards else i  # backwards: |end - start| < L
                for j in range(first, min(len(e), i + L + L_shift)):
                    if s[i] + e[j] > score:
                        best, score = (i, j), s[i] + e[j]
            return best
        return fn

    def exclusive(s, e, L):
        i, j = _best_span64(s, e, L)
        return i, j + 1

    return [  # the more specific mistakes first: the first whose answer matches gives the hint
        (allowing(+1), "a span from start to end (inclusive) has end - start + 1 tokens; it may have at most "
                       "max_answer_length, so end <= start + max_answer_length - 1"),
        (allowing(-1), "too strict by one: a span of exactly max_answer_length tokens is allowed "
                       "(end = start + max_answer_length - 1)"),
        (allowing(0, allow_backwards=True), "end must not come before start"),
        (exclusive, "return the end token itself (inclusive), not one past it"),
        (independent, "the best start and the best end taken separately can be an invalid pair (end before "
                      "start, or too long): score every valid (start, end) pair together"),
    ]


def check_best_span(fn: Optional[Callable], seed: Optional[int] = None, verbose: bool = True) -> CheckResult:
    """Check fn(start_logits, end_logits, max_answer_length) -> (start, end): the pair with the highest
    start_logits[start] + end_logits[end] among start <= end < start + max_answer_length (end inclusive)."""
    seed = _fresh_seed(seed)
    rng = np.random.default_rng(seed)

    def logits(T, scale=1.0):
        return ((scale * rng.standard_normal(T)).astype(np.float32),
                (scale * rng.standard_normal(T)).astype(np.float32))

    T = int(rng.integers(40, 90))
    specs = [(f"T={T} random logits, max_answer_length=30", (*logits(T), 30), "")]
    # A span of max_answer_length + 1 tokens scores best, one of exactly max_answer_length second best.
    L = int(rng.integers(4, 10))
    s, e = logits(60, 0.1)
    i = int(rng.integers(0, 60 - L - 1))
    s[i], e[i + L], e[i + L - 1] = 10.0, 10.0, 9.0
    specs.append((f"T=60, max_answer_length={L}, the highest-scoring span is {L + 1} tokens long", (s, e, L),
                  f"the length limit: {L + 1} tokens is one too many, exactly {L} is allowed"))
    # The best start comes after the best end.
    s, e = logits(50, 0.1)
    s[35], e[8] = 10.0, 10.0
    specs.append(("T=50, max_answer_length=30, the best end comes before the best start", (s, e, 30),
                  "end >= start"))
    specs.append(("T=1", (*logits(1), 30), "a single token: the only span is (0, 0)"))
    specs.append(("T=25, max_answer_length=1", (*logits(25), 1), "one-token answers: start == end"))
    specs.append(("T=384, max_answer_length=30", (*logits(384, 3.0), 30), "a full-length window"))
    cases = [Case(what, args, _best_span64(*args), note) for what, args, note in specs]

    def compare(got, case):
        if got is None:
            return "your function returned None: did you forget `return`?"
        try:
            pair = tuple(int(v) for v in got)
        except (TypeError, ValueError):
            return f"expected a pair (start, end) of ints, got {got!r}"
        if len(pair) != 2:
            return f"expected a pair (start, end), got {len(pair)} values: {got!r}"
        if pair != case.expected:
            s, e, _ = case.args
            exp = case.expected
            scored = (f"start_logits[{pair[0]}] + end_logits[{pair[1]}] = "
                      f"{float(s[pair[0]]) + float(e[pair[1]]):.4f}"
                      if 0 <= pair[0] < len(s) and 0 <= pair[1] < len(e) else "out of range")
            return (f"expected {exp} (score {float(s[exp[0]]) + float(e[exp[1]]):.4f}), got {pair} ({scored})")
        return ""

    def on_pass(outputs):
        decoded = [squad.best_span(*c.args, n_best_size=len(c.args[0])) for c in cases]
        agree = all((d.start, d.end) == c.expected for d, c in zip(decoded, cases))
        return ("bertqa.squad.best_span (the decoder evaluation uses, here over all tokens) gives the same spans."
                if agree else "(bertqa.squad.best_span disagrees on some case: please report it)")

    return _run("best_span", fn, cases, compare, _best_span_mistakes(),
                "try every start s, and every end e from s to s + max_answer_length - 1 (and < T); keep the "
                "pair with the largest start_logits[s] + end_logits[e]",
                seed, verbose, on_pass, "my_best_span")


# =============================================================================================================
# Exercise 7: the SQuAD F1
# =============================================================================================================

_F1_FIXED = [
    ("Denver Broncos", "Denver Broncos", "identical answers"),
    ("the Denver Broncos!", "denver broncos", "normalisation: case, punctuation and articles do not count"),
    ("Broncos", "Denver Broncos", "partial overlap: precision 1, recall 1/2"),
    ("in 1,000 B.C.", "1000 BC", "punctuation is deleted, not replaced by a space ('1,000' -> '1000')"),
    ("Santa Clara, California", "Levi's Stadium", "no overlap"),
    ("a", "the", "both sides normalise to nothing: F1 is 0 (and no division by zero)"),
    ("", "Denver", "an empty prediction"),
    ("go go", "go go", "tokens count with multiplicity (collections.Counter, not set)"),
    ("an apple a day", "An apple every day", "articles are removed as whole words"),
    ("  Denver\tBroncos  ", "Denver Broncos", "whitespace of any kind separates tokens"),
    ("theater", "the ater", "articles only as whole words: 'theater' keeps its 'the'"),
    ("Super Bowl 50 50", "Super Bowl 50", "repeated tokens in the prediction lower the precision"),
]


def _f1_mistakes():
    from collections import Counter

    def f1_of(pred_tokens, gold_tokens, use_set=False, scale=1.0):
        if use_set:
            common = len(set(pred_tokens) & set(gold_tokens))
        else:
            common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common == 0:
            return 0.0
        p, r = common / len(pred_tokens), common / len(gold_tokens)
        return scale * 2 * p * r / (p + r)

    norm = lab_solutions.normalize_answer

    def replace_articles(s):
        s = "".join(ch for ch in s.lower() if ch not in set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"))
        for art in ("the", "an", "a"):
            s = s.replace(art, " ")
        return s.split()

    def lower_only(s):
        return s.lower().split()

    def no_articles_step(s):
        s = "".join(ch for ch in s.lower() if ch not in set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"))
        return s.split()

    return [
        (lambda p, g: f1_of(p.split(), g.split()), "normalise both strings first (the official SQuAD "
                                                   "normalize_answer: lower case, drop punctuation, drop a/an/the, "
                                                   "collapse whitespace)"),
        (lambda p, g: f1_of(lower_only(p), lower_only(g)), "normalisation also drops punctuation "
                                                           "(string.punctuation) and the articles a/an/the"),
        (lambda p, g: f1_of(no_articles_step(p), no_articles_step(g)),
         "normalisation also drops the articles a, an, the (as whole words: re.sub(r'\\b(a|an|the)\\b', ' ', s))"),
        (lambda p, g: f1_of(replace_articles(p), replace_articles(g)),
         "str.replace removes 'the' inside words too ('theater' -> 'ater'); remove articles as whole words "
         "with re.sub(r'\\b(a|an|the)\\b', ' ', s)"),
        (lambda p, g: f1_of(norm(p).split(), norm(g).split(), use_set=True),
         "count shared tokens with multiplicity: sum((Counter(pred) & Counter(gold)).values()), not a set"),
        (lambda p, g: f1_of(norm(p).split(), norm(g).split(), scale=100.0),
         "return F1 as a fraction in [0, 1] (evaluate() multiplies the mean by 100 itself)"),
    ]


def check_f1(fn: Optional[Callable], seed: Optional[int] = None, verbose: bool = True) -> CheckResult:
    """Check fn(prediction, ground_truth) -> the SQuAD v1.1 F1 in [0, 1] of one prediction against one reference
    answer: token precision/recall after the official normalisation, tokens counted with multiplicity, 0 when
    nothing is shared. Compared with bertqa.squad.f1_score (the official evaluate-v1.1.py metric) to 1e-9."""
    seed = _fresh_seed(seed)
    rng = np.random.default_rng(seed)
    words = ["Denver", "Broncos", "Super", "Bowl", "50", "Santa", "Clara", "1,000", "U.S.", "the", "a", "an",
             "Levi's", "stadium", "Carolina", "Panthers", "February", "7", "2016", "gold", "(NFL)", "theater"]
    punct = ["", "", "", ",", ".", "!", "'s", ";"]

    def phrase():
        n = int(rng.integers(1, 7))
        out = []
        for _ in range(n):
            w = str(rng.choice(words))
            if rng.random() < 0.3:
                w = w.upper() if rng.random() < 0.5 else w.lower()
            out.append(w + str(rng.choice(punct)))
        return (" " if rng.random() < 0.8 else "  ").join(out)

    pairs = [(p, g, note) for p, g, note in _F1_FIXED]
    for _ in range(20):
        g = phrase()
        p = g if rng.random() < 0.2 else phrase()
        pairs.append((p, g, ""))
    cases = [Case(f"prediction={p!r}, ground_truth={g!r}", (p, g), float(squad.f1_score(p, g)), note)
             for p, g, note in pairs]

    def compare(got, case):
        return _compare_scalar(got, case.expected, 1e-9, 0.0)

    return _run("f1", fn, cases, compare, _f1_mistakes(),
                "normalise both (lower case, drop punctuation, drop a/an/the as words, split on whitespace); "
                "common = shared tokens with multiplicity; precision = common / len(pred), recall = common / "
                "len(gold); F1 = 2PR / (P + R), and 0 when common == 0",
                seed, verbose, lambda outputs: "Same as bertqa.squad.f1_score (the official SQuAD v1.1 metric).",
                "my_f1")
