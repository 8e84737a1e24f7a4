"""Bad arguments raise TypeError / ValueError naming the argument; nothing crashes; the GIL is released."""
import threading
import time

import numpy as np
import pytest

from bertqa import ops


def a(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


# A valid call for each function, as (function, kwargs); each bad-input case perturbs one argument.
def valid_calls():
    q = a(2, 3, 5, 4)
    return {
        "layernorm": (ops.layernorm, dict(x=a(2, 3, 8), weight=a(8), bias=a(8))),
        "layernorm_backward": (ops.layernorm_backward, dict(dy=a(2, 3, 8), x=a(2, 3, 8), weight=a(8))),
        "gelu": (ops.gelu, dict(x=a(3, 4))),
        "gelu_backward": (ops.gelu_backward, dict(dy=a(3, 4), x=a(3, 4))),
        "linear": (ops.linear, dict(x=a(3, 8), weight=a(5, 8), bias=a(5))),
        "linear_backward": (ops.linear_backward, dict(dy=a(3, 5), x=a(3, 8), weight=a(5, 8))),
        "attention": (ops.attention, dict(q=q, k=q.copy(), v=q.copy(), mask=a(2, 5))),
        "attention_backward": (ops.attention_backward, dict(dout=q.copy(), q=q, k=q.copy(), v=q.copy(), mask=a(2, 5))),
        "embedding": (ops.embedding, dict(input_ids=a(2, 5, dtype=np.int64), token_type_ids=a(2, 5, dtype=np.int64),
                                          word_embeddings=a(10, 8), position_embeddings=a(6, 8),
                                          token_type_embeddings=a(2, 8))),
        "span_loss": (ops.span_loss, dict(start_logits=a(2, 5), end_logits=a(2, 5),
                                          start_positions=a(2, dtype=np.int64), end_positions=a(2, dtype=np.int64))),
        "adamw": (ops.adamw, dict(param=a(7), grad=a(7), m=a(7), v=a(7), step=1, lr=1e-3)),
        "dropout": (ops.dropout, dict(x=a(7), p=0.1, seed=1)),
    }


CALLS = valid_calls()


@pytest.mark.parametrize("name", sorted(CALLS))
def test_valid_call_works(name):
    fn, kw = valid_calls()[name]
    fn(**kw)


def array_args(name):
    fn, kw = CALLS[name]
    return [(name, arg) for arg, val in kw.items() if isinstance(val, np.ndarray)]


ALL_ARRAY_ARGS = [case for name in sorted(CALLS) for case in array_args(name)]


def call_with(name, arg, value):
    fn, kw = valid_calls()[name]
    kw[arg] = value
    return fn(**kw)


@pytest.mark.parametrize("name,arg", ALL_ARRAY_ARGS)
def test_none_is_type_error(name, arg):
    if name == "attention" and arg == "mask" or name == "attention_backward" and arg == "mask" \
            or name == "embedding" and arg == "token_type_ids" or name == "linear" and arg == "bias":
        pytest.skip(f"{arg} is optional: None is valid")
    with pytest.raises(TypeError, match=arg):
        call_with(name, arg, None)


@pytest.mark.parametrize("name,arg", ALL_ARRAY_ARGS)
def test_list_is_type_error(name, arg):
    _, kw = valid_calls()[name]
    with pytest.raises(TypeError, match=arg):
        call_with(name, arg, kw[arg].tolist())


@pytest.mark.parametrize("name,arg", ALL_ARRAY_ARGS)
def test_wrong_dtype(name, arg):
    _, kw = valid_calls()[name]
    val = kw[arg]
    if val.dtype == np.float32:
        if arg == "mask":
            bad = val.astype(np.complex64)
        else:
            bad = val.astype(np.float64)
    else:
        bad = val.astype(np.float32)   # ids/positions must be integers
    with pytest.raises(TypeError, match=arg):
        call_with(name, arg, bad)


@pytest.mark.parametrize("name,arg", ALL_ARRAY_ARGS)
def test_non_contiguous(name, arg):
    _, kw = valid_calls()[name]
    val = kw[arg]
    big = np.repeat(val[..., None], 2, axis=-1)   # same values, every second element: a strided view
    view = big[..., 0]
    assert view.shape == val.shape and not view.flags.c_contiguous
    with pytest.raises(ValueError, match=arg):
        call_with(name, arg, view)


@pytest.mark.parametrize("name,arg", ALL_ARRAY_ARGS)
def test_empty(name, arg):
    _, kw = valid_calls()[name]
    val = kw[arg]
    empty = np.zeros((0,) + val.shape[1:], val.dtype)
    with pytest.raises(ValueError, match=arg):
        call_with(name, arg, empty)


@pytest.mark.parametrize("name,arg", ALL_ARRAY_ARGS)
def test_wrong_rank_or_size(name, arg):
    _, kw = valid_calls()[name]
    val = kw[arg]
    bad = np.ones(val.shape[:-1] + (val.shape[-1] + 1,), val.dtype)   # one more in the last axis
    if name in ("gelu", "dropout", "adamw") and arg in ("x", "param"):
        bad = None   # single-array elementwise ops accept any shape; rank is checked below
    if name == "adamw" and arg == "param":
        bad = np.ones(8, np.float32)
    if bad is None:
        pytest.skip("any shape is valid")
    with pytest.raises(ValueError):
        call_with(name, arg, bad)


def test_messages_say_what_was_expected():
    with pytest.raises(TypeError, match=r"x must have dtype float32, got .*float64"):
        ops.gelu(np.ones(3))
    with pytest.raises(ValueError, match=r"weight.shape\[0\] must be 8"):
        ops.layernorm(a(2, 8), a(7), a(8))
    with pytest.raises(ValueError, match=r"q must have 4 dimensions, got 3"):
        ops.attention(a(2, 5, 4), a(2, 5, 4), a(2, 5, 4))
    with pytest.raises(ValueError, match=r"k must have the same shape as q"):
        ops.attention(a(2, 3, 5, 4), a(2, 3, 6, 4), a(2, 3, 5, 4))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, T\) = \(2, 5\)"):
        ops.attention(a(2, 3, 5, 4), a(2, 3, 5, 4), a(2, 3, 5, 4), mask=a(2, 4))
    with pytest.raises(ValueError, match=r"mask must hold only 0 .* and 1"):
        ops.attention(a(2, 3, 5, 4), a(2, 3, 5, 4), a(2, 3, 5, 4), mask=a(2, 5) * 2)


def test_ids_out_of_range():
    _, kw = valid_calls()["embedding"]
    kw["input_ids"][1, 2] = 10
    with pytest.raises(ValueError, match=r"input_ids holds 10 .* outside \[0, 10\)"):
        ops.embedding(**kw)
    _, kw = valid_calls()["embedding"]
    kw["token_type_ids"][0, 0] = -1
    with pytest.raises(ValueError, match="token_type_ids"):
        ops.embedding(**kw)
    _, kw = valid_calls()["embedding"]
    kw["input_ids"] = np.zeros((2, 7), np.int64)
    kw["token_type_ids"] = None
    with pytest.raises(ValueError, match="position_embeddings"):
        ops.embedding(**kw)
    with pytest.raises(ValueError, match="input_ids"):
        ops.embedding_backward(a(1, 2, 3), np.array([[0, 5]]), None, 5, 4, 2)


def test_bad_scalars():
    with pytest.raises(ValueError, match="step counts from 1"):
        ops.adamw(a(3), a(3), a(3), a(3), step=0, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        ops.adamw(a(3), a(3), a(3), a(3), step=1, lr=float("nan"))
    with pytest.raises(ValueError, match="beta2"):
        ops.adamw(a(3), a(3), a(3), a(3), step=1, lr=1e-3, beta2=1.0)
    with pytest.raises(ValueError, match="p must be in"):
        ops.dropout(a(3), 1.0, 1)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(a(1, 1, 2, 2), a(1, 1, 2, 2), a(1, 1, 2, 2), dropout_p=-0.1)
    with pytest.raises(ValueError, match="eps"):
        ops.layernorm(a(2, 3), a(3), a(3), eps=-1.0)
    with pytest.raises(ValueError, match="max_norm"):
        ops.clip_grad_norm([a(3)], 0.0)
    with pytest.raises(ValueError, match="grads is empty"):
        ops.global_norm([])


def test_adamw_in_place_arguments():
    p = a(4)
    p.flags.writeable = False
    with pytest.raises(ValueError, match="param must be writeable"):
        ops.adamw(p, a(4), a(4), a(4), 1, 1e-3)
    p = a(4)
    with pytest.raises(ValueError, match="three different arrays"):
        ops.adamw(p, a(4), p, a(4), 1, 1e-3)


def test_huge_attention_is_memory_error_not_crash():
    q = np.ones((1, 1, 1, 1), np.float32)
    big = np.lib.stride_tricks.as_strided(q, shape=(64, 64, 100_000, 1), strides=(0, 0, 0, 0))
    with pytest.raises(ValueError):   # a broadcast view is not C-contiguous: refused before any allocation
        ops.attention(big, big, big)


def test_gil_released_during_kernels():
    # while a long matrix product runs in another thread, this thread keeps running Python code
    x = np.ones((1536, 1536), np.float32)
    w = np.ones((1536, 1536), np.float32)
    ops.linear(x, w)   # warm up the BLAS threads
    done = threading.Event()

    def work():
        for _ in range(20):
            ops.linear(x, w)
        done.set()

    t = threading.Thread(target=work)
    ticks = 0
    start = time.perf_counter()
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    elapsed = time.perf_counter() - start
    # holding the GIL would leave ~1 tick for the whole run; released, this loop ticks every ~1 ms
    assert ticks >= max(5, 0.2 * elapsed / 0.001), (ticks, elapsed)
