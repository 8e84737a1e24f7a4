"""bertqa's CUDA backend from Python: whether it can run here, and its kernels one by one.

The GPU engine and kernels live in the extension ``bertqa._cuda`` (cuda/*.cu), built only when a CUDA toolkit was
found at install time. It is imported on first use, never by ``import bertqa``, so the CPU package works on
machines without CUDA libraries. ``BertQA(..., device="cuda")`` goes through :func:`load`.

The kernel functions below mirror :mod:`bertqa.ops` (same arguments, same semantics, same dropout masks: the
Philox keying is shared) and take ``precision="fp32"`` or ``"bf16"`` (inputs rounded to bf16 on the GPU, every sum
in fp32, results widened back to float32). They copy to and from the GPU on every call: they exist for tests and
the lab, not for speed.

For data-parallel training on GPUs, :class:`NcclComm` sums the engines' gradient buffers across ranks with NCCL,
which is loaded at run time (:func:`nccl_version`, :func:`nccl_unique_id`): bertqa imports and runs without it.
"""
from __future__ import annotations

import os

import numpy as np

_module = None
_import_error: str | None = None


def _load_extension_file(path: str):
    """bertqa._cuda from a file: the CPU emulator's build (cuda/emu/build.py), for testing the backend's code on a
    machine without a GPU. Never set in production."""
    import importlib.machinery  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415

    if not os.path.isfile(path):
        raise ImportError(f"BERTQA_CUDA_EXTENSION={path}: no such file")
    loader = importlib.machinery.ExtensionFileLoader("bertqa._cuda", path)
    spec = importlib.util.spec_from_file_location("bertqa._cuda", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bertqa._cuda"] = module
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules["bertqa._cuda"]
        raise
    return module


def _import():
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            path = os.environ.get("BERTQA_CUDA_EXTENSION", "").strip()
            if path:
                _module = _load_extension_file(path)
            else:
                # deliberately lazy, and by the extension's own name: `from . import _cuda` would reach back up
                # through the package bertqa, whose cuda_available() imports this module
                import bertqa._cuda as _cuda  # noqa: PLC0415
                _module = _cuda
        except ImportError as e:
            _import_error = str(e)
    return _module


def unavailable_reason() -> str | None:
    """None when a GPU can be used, else why not (no CUDA build, no driver, no GPU of compute capability 8.0+)."""
    mod = _import()
    if mod is None:
        return ("this bertqa was built without its CUDA backend (no CUDA toolkit at install time, or "
                f"BERTQA_NO_CUDA=1; import error: {_import_error})")
    n, reason = mod.device_count()
    return None if n > 0 else reason


def available() -> bool:
    """Whether ``device="cuda"`` can be used here."""
    return unavailable_reason() is None


def load():
    """The ``bertqa._cuda`` module, or RuntimeError saying why the CUDA backend cannot run here."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"device='cuda': no CUDA backend usable here: {reason}; use device='cpu'")
    return _module


def device_info(device: int = 0) -> dict:
    """Name, compute capability, memory and multiprocessor count of a GPU, plus the CUDA runtime/driver versions."""
    mod = load()
    info = mod.device_info(device)
    info["cuda_runtime"], info["cuda_driver"] = mod.versions()
    return info


# ---- kernels one by one (host arrays in, host arrays out) ----------------------------------------------------

def _f32(x, name):
    a = np.asarray(x)
    if a.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {a.dtype}")
    return np.ascontiguousarray(a)


def _ids(x):
    return None if x is None else np.ascontiguousarray(np.asarray(x), dtype=np.int64)


def uniform(n, seed, step=0, tensor_id=0, first=0):
    """The dropout RNG's uniforms for elements first .. first+n-1 (as the CPU's bq_uniform)."""
    u = np.empty(int(n), np.float32)
    load().uniform(u, seed, step, tensor_id, first)
    return u


def dropout(x, p, seed, step=0, tensor_id=0, precision="fp32"):
    """As bertqa.ops.dropout, on the GPU."""
    x = _f32(x, "x")
    out = np.empty_like(x)
    load().dropout(out, x, p, seed, step, tensor_id, precision)
    return out


def residual_layernorm(x, y, weight, bias, eps=1e-12, p=0.0, seed=0, step=0, site=0, precision="fp32"):
    """res = x + dropout(y); out = LayerNorm(res) over the last dimension; x may be None.
    Returns (res, out, mean [N], rstd [N])."""
    y = _f32(y, "y")
    C = y.shape[-1]
    N = y.size // C
    x = None if x is None else _f32(x, "x")
    res, out = np.empty_like(y), np.empty_like(y)
    mean, rstd = np.empty(N, np.float32), np.empty(N, np.float32)
    load().residual_layernorm(res, out, mean, rstd, x, y, _f32(weight, "weight"), _f32(bias, "bias"), N, C, eps, p,
                              seed, step, site, precision)
    return res, out, mean, rstd


def layernorm_backward(dout, inp, weight, mean, rstd, p_in=0.0, in_site=0, p_out=0.0, out_site=0, seed=0, step=0,
                       precision="fp32", branch=False):
    """g = dropout'(dout) (p_in), dinp = LayerNorm'(g), branch = dropout'(dinp) (p_out) when asked.
    Returns (dinp, branch or None, dweight, dbias)."""
    dout = _f32(dout, "dout")
    C = dout.shape[-1]
    N = dout.size // C
    dinp = np.empty_like(dout)
    br = np.empty_like(dout) if branch else None
    dw, db = np.zeros(C, np.float32), np.zeros(C, np.float32)
    load().layernorm_backward(dinp, br, dw, db, dout, _f32(inp, "inp"), _f32(weight, "weight"), _f32(mean, "mean"),
                              _f32(rstd, "rstd"), N, C, p_in, in_site, p_out, out_site, seed, step, precision)
    return dinp, br, dw, db


def embedding_layernorm(input_ids, token_type_ids, wte, wpe, wtt, weight, bias, eps=1e-12, p=0.0, seed=0, step=0,
                        precision="fp32"):
    """emb = wte[ids] + wpe[t] + wtt[types]; out = dropout(LayerNorm(emb)) (dropout site 0).
    Returns (emb, out, mean, rstd)."""
    ids = _ids(input_ids)
    B, T = ids.shape
    wte, wpe, wtt = _f32(wte, "wte"), _f32(wpe, "wpe"), _f32(wtt, "wtt")
    C = wte.shape[1]
    emb, out = np.empty((B, T, C), np.float32), np.empty((B, T, C), np.float32)
    mean, rstd = np.empty(B * T, np.float32), np.empty(B * T, np.float32)
    load().embedding_layernorm(emb, out, mean, rstd, ids, _ids(token_type_ids), wte, wpe, wtt, _f32(weight, "weight"),
                               _f32(bias, "bias"), B, T, C, wte.shape[0], wpe.shape[0], wtt.shape[0], eps, p, seed,
                               step, precision)
    return emb, out, mean, rstd


def embedding_backward(dout, input_ids, token_type_ids, vocab_size, max_position_embeddings, type_vocab_size,
                       padding_idx=None, precision="fp32"):
    """As bertqa.ops.embedding_backward, on the GPU: (dword, dposition, dtype)."""
    ids = _ids(input_ids)
    B, T = ids.shape
    dout = _f32(dout, "dout")
    C = dout.shape[-1]
    dw = np.zeros((vocab_size, C), np.float32)
    dp = np.zeros((max_position_embeddings, C), np.float32)
    dt = np.zeros((type_vocab_size, C), np.float32)
    load().embedding_backward(dw, dp, dt, dout, ids, _ids(token_type_ids), B, T, C, vocab_size,
                              max_position_embeddings, type_vocab_size, -1 if padding_idx is None else padding_idx,
                              precision)
    return dw, dp, dt


def gelu(x, precision="fp32"):
    x = _f32(x, "x")
    out = np.empty_like(x)
    load().gelu(out, x, precision)
    return out


def gelu_backward(dy, x, precision="fp32"):
    """dx = dy * gelu'(x)"""
    x = _f32(x, "x")
    dx = np.empty_like(x)
    load().gelu_backward(dx, x, _f32(dy, "dy"), precision)
    return dx


def linear(x, weight, bias=None, precision="fp32"):
    """x @ weight.T + bias through cuBLASLt (bias epilogue) or the cuBLAS fallback."""
    x, weight = _f32(x, "x"), _f32(weight, "weight")
    OUT, IN = weight.shape
    N = x.size // IN
    out = np.empty(x.shape[:-1] + (OUT,), np.float32)
    load().linear(out, x, weight, None if bias is None else _f32(bias, "bias"), N, IN, OUT, precision)
    return out


def linear_backward(dy, x, weight, precision="fp32"):
    """(dx, dweight, dbias) of linear."""
    x, weight, dy = _f32(x, "x"), _f32(weight, "weight"), _f32(dy, "dy")
    OUT, IN = weight.shape
    N = x.size // IN
    dx = np.empty_like(x)
    dw, db = np.zeros_like(weight), np.zeros(OUT, np.float32)
    load().linear_backward(dx, dw, db, dy, x, weight, N, IN, OUT, precision)
    return dx, dw, db


def attention(q, k, v, mask=None, dropout_p=0.0, seed=0, step=0, tensor_id=0, precision="fp32"):
    """q, k, v: [B, T, NH, HS] (heads side by side, as the engine holds them; bertqa.ops.attention takes
    [B, NH, T, HS]). Returns (out [B, T, NH, HS], att [B, NH, T, T] probabilities before dropout)."""
    q, k, v = _f32(q, "q"), _f32(k, "k"), _f32(v, "v")
    B, T, NH, HS = q.shape
    out = np.empty_like(q)
    att = np.empty((B, NH, T, T), np.float32)
    m = None if mask is None else np.ascontiguousarray(mask, dtype=np.float32)
    load().attention(out, att, q, k, v, m, B, NH, T, HS, dropout_p, seed, step, tensor_id, precision)
    return out, att


def attention_backward(dout, att, q, k, v, dropout_p=0.0, seed=0, step=0, tensor_id=0, precision="fp32"):
    """(dq, dk, dv), [B, T, NH, HS] each; att from :func:`attention`."""
    q, k, v, dout = _f32(q, "q"), _f32(k, "k"), _f32(v, "v"), _f32(dout, "dout")
    B, T, NH, HS = q.shape
    dq, dk, dv = np.empty_like(q), np.empty_like(q), np.empty_like(q)
    load().attention_backward(dq, dk, dv, dout, _f32(att, "att"), q, k, v, B, NH, T, HS, dropout_p, seed, step,
                              tensor_id, precision)
    return dq, dk, dv


def cudnn_version() -> int:
    """cudnnGetVersion() of the cuDNN bertqa._cuda links (e.g. 91900 for 9.19.0); 0 for a build without cuDNN, whose
    engine runs its own attention kernels only. Needs no GPU."""
    mod = _import()
    return mod.cudnn_version() if mod is not None else 0


def cudnn_attention(q, k, v, lengths=None, dropout_p=0.0, seed=0, dout=None):
    """cuDNN's fused scaled-dot-product attention alone (bf16 on the GPU, the engine's default attention there).
    q, k, v: [B, T, NH, HS] float32; row b attends to its first lengths[b] keys (default all T); dropout on the
    probabilities from cuDNN's own Philox stream (seed). Returns out [B, T, NH, HS], or with dout given
    (out, dq, dk, dv). RuntimeError saying why where cuDNN is missing or refuses the shape."""
    q, k, v = _f32(q, "q"), _f32(k, "k"), _f32(v, "v")
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, T, NH, HS] alike, got {q.shape}, {k.shape}, {v.shape}")
    B, T, NH, HS = q.shape
    lens = np.full(B, T, np.int64) if lengths is None else np.ascontiguousarray(lengths, dtype=np.int64)
    out = np.empty_like(q)
    grads = (None, None, None)
    if dout is not None:
        dout = _f32(dout, "dout")
        grads = (np.empty_like(q), np.empty_like(q), np.empty_like(q))
    load().cudnn_attention(out, *grads, dout, q, k, v, lens, B, NH, T, HS, float(dropout_p), int(seed))
    return out if dout is None else (out, *grads)


def span_loss(start_logits, end_logits, start_positions, end_positions, grad_scale=1.0):
    """As bertqa.ops.span_loss, on the GPU: (loss, dstart, dend)."""
    s, e = _f32(start_logits, "start_logits"), _f32(end_logits, "end_logits")
    B, T = s.shape
    ds, de = np.empty_like(s), np.empty_like(e)
    loss = load().span_loss(ds, de, s, e, _ids(start_positions), _ids(end_positions), B, T, grad_scale)
    return loss, ds, de


def adamw(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, grad_scale=1.0):
    """As bertqa.ops.adamw (in place on param, m, v), through the engine's fused kernel."""
    load().adamw(param, _f32(grad, "grad"), m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale)


def sum_squares(g):
    """Sum of squares in double with the engine's deterministic reduction."""
    return load().sum_squares(_f32(g, "g"))


# ---- NCCL: the data-parallel gradient all-reduce --------------------------------------------------------------
# NCCL is loaded at run time (cuda/nccl.c), never linked: $BERTQA_NCCL_LIBRARY when set, else the nvidia-nccl-cu13
# wheel's nvidia/nccl/lib/libnccl.so.2 on sys.path, else the loader's libnccl.so.2. These need the CUDA extension
# but no GPU, except NcclComm.

def _nccl_module():
    mod = _import()
    if mod is None:
        raise RuntimeError(f"NCCL: this bertqa was built without its CUDA backend (import error: {_import_error})")
    return mod


def nccl_version() -> int:
    """NCCL's version code (e.g. 22809 for 2.28.9); RuntimeError naming what was tried when NCCL is missing."""
    return _nccl_module().nccl_version()


def nccl_library() -> str:
    """The libnccl.so.2 file in use."""
    return _nccl_module().nccl_library()


def nccl_unique_id() -> bytes:
    """A new NCCL unique id (128 bytes): rank 0 makes it and sends it to every rank (e.g. mpi4py's comm.bcast)."""
    return _nccl_module().nccl_unique_id()


class NcclComm:
    """One rank's NCCL communicator on a CUDA device, for summing gradients across data-parallel ranks.

    Every rank calls ``NcclComm(unique_id, nranks, rank, device)`` with rank 0's :func:`nccl_unique_id`; it returns
    once all ranks have joined. Bad arguments raise ValueError before NCCL or CUDA is touched; NCCL/CUDA failures
    raise RuntimeError naming the call and NCCL's error string. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, unique_id: bytes, nranks: int, rank: int, device: int = 0):
        self._comm = _nccl_module().NcclComm(unique_id, nranks, rank, device)

    nranks = property(lambda self: self._comm.nranks)
    rank = property(lambda self: self._comm.rank)
    device = property(lambda self: self._comm.device)
    closed = property(lambda self: self._comm.closed)

    def allreduce_sum_grads(self, model, timeout: float = 0.0) -> None:
        """Sum the device gradient buffer of ``model`` (a ``BertQA`` on device="cuda", or its ``bertqa._cuda.Engine``)
        over the ranks, in place, float32, on the engine's stream; returns when the sum is complete (NCCL's
        asynchronous errors are polled meanwhile). ``timeout`` > 0 seconds aborts the communicator past it. A sum,
        not a mean: scale the loss (``loss_scale``) for the mean."""
        engine = getattr(model, "_engine", model)
        self._comm.allreduce_sum_grads(engine, timeout)
        stale = getattr(model, "_stale", None)
        if stale is not None:   # a BertQA's host copy of the gradients is out of date now
            stale.add("grads")

    def abort(self) -> None:
        """Free the communicator without waiting for the other ranks (after an error)."""
        self._comm.abort()

    def close(self) -> None:
        """Free the communicator (ncclCommDestroy). Idempotent."""
        self._comm.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
