"""The CUDA backend (bertqa.cuda, bertqa._cuda; cuda/*.cu) against the CPU kernels and the CPU engine.

Tests marked `cuda` need a GPU (compute capability 8.0+) and skip with the reason otherwise; run them alone with
`pytest -m cuda`. The others check what a machine without a GPU can: the package imports and the CPU engine works
with the CUDA extension built, and asking for device="cuda" fails with a clear error.

Tolerances: fp32 mode, kernels 1e-5 and the whole engine 1e-4 relative (max |gpu - cpu| / max |cpu|), the
difference being summation order only; bf16 mode 2e-2 (kernels: max-relative; the engine's logits and loss: relative
L2 error ||gpu - cpu|| / ||cpu||, since bf16 round-off is relative to each element, not to the tensor's largest).
bf16 logits against the fp32 CPU engine: on the scale of the terms the QA head sums (logit_scale); bf16 gradients:
1.5e-1 per tensor (relative L2 with a floor, tensor_errors) and 5e-2 for all of them as one vector. Kernel results
in bf16 whose sums cancel (a dot product over 7 inputs) are measured on the scale of their terms too (term_err). The bf16 engine stores activations and their gradients in bf16, so its gradients carry
the round-off of every layer above: under the CPU emulator (tests/test_cuda_emu.py, whose products round once from
double, more exactly than a GPU's) 30 seeds of test_engine_logits_and_gradients_match_the_cpu_engine's setup measured
at most 0.093 per tensor, 0.032 as one vector and 0.003 for the logits on their term scale, against 2.7e-5, 1.4e-6
and 1.2e-7 in fp32; with the earlier measures (relative to each result's own size) about one run in eight failed. Gradients that are zero in exact
arithmetic (roundoff_only) are checked on the scale of the other gradients instead.
Dropout masks agree bit for bit (the Philox keying is the CPU's), so the comparisons run with dropout on, with the
engine's own attention kernels (twin(..., attention="own")): cuDNN's fused attention, the default in bf16, draws its
dropout masks from cuDNN's own Philox stream, so the tests of that path run without attention dropout or check its
masks statistically.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bertqa
from bertqa import checkpoint, ops
from bertqa import cuda as bcuda
from bertqa.config import BertConfig
from bertqa.model import BertQA, check_device
from qa_helpers import needs_minilm

REPO = Path(__file__).resolve().parents[1]
GPU_REASON = bcuda.unavailable_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"no usable CUDA GPU: {GPU_REASON}")
gpu = [pytest.mark.cuda, needs_gpu]

TOL = {"fp32": 1e-5, "bf16": 2e-2}
ENGINE_TOL = {"fp32": 1e-4, "bf16": 2e-2}
# gradients: per tensor (tensor_errors) and all of them as one vector (global_grad_error); the docstring says why
GRAD_TOL = {"fp32": 1e-4, "bf16": 1.5e-1}
GLOBAL_GRAD_TOL = {"fp32": 1e-4, "bf16": 5e-2}
PRECISIONS = ["fp32", "bf16"]


def _finite_pair(got, want):
    """float64 copies; positions where both read the same infinity (logits of padding: -inf) count as equal.
    An infinity on one side only stays and makes the error infinite."""
    got, want = np.array(got, np.float64), np.array(want, np.float64)
    same = np.isinf(want) & (got == want)
    got[same] = want[same] = 0.0
    return got, want


def rel_err(got, want):
    got, want = _finite_pair(got, want)
    scale = np.abs(want).max()
    return np.abs(got - want).max() / (scale if scale > 0 else 1.0)


def rel_l2(got, want):
    got, want = _finite_pair(got, want)
    norm = np.linalg.norm(want)
    return np.linalg.norm(got - want) / (norm if norm > 0 else 1.0)


def engine_err(precision):
    """The engine comparisons' error measure: max-relative in fp32, relative L2 in bf16."""
    return rel_err if precision == "fp32" else rel_l2


def term_err(got, want, scale):
    """max over elements of |got - want| / scale, scale being the size of the terms a sum added (|x| @ |w|^T for a
    product): bf16's rounding of the inputs is relative to those, not to a result that cancellation made small (a
    dot product of 7 terms of size 1 can come out at 0.01)."""
    got, want = _finite_pair(got, want)
    return float((np.abs(got - want) / np.maximum(np.asarray(scale, np.float64), 1e-30)).max())


def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---- without a GPU -----------------------------------------------------------------------------------------

def toolkit_present():
    if os.environ.get("BERTQA_NO_CUDA", "").strip() not in ("", "0"):
        return False
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return any(h and (Path(h) / "bin" / "nvcc").is_file() for h in homes) or shutil.which("nvcc") is not None


def test_import_bertqa_does_not_load_the_cuda_extension():
    code = ("import sys, bertqa, bertqa.model, bertqa.ops; "
            "assert 'bertqa._cuda' not in sys.modules, 'imported eagerly'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@pytest.mark.skipif(not toolkit_present(), reason="no CUDA toolkit here: bertqa._cuda is not built")
def test_cuda_extension_is_built_and_imports_without_a_gpu(rng):
    import bertqa._cuda as ext   # a toolkit was found at install time, so the build must have made it
    n, reason = ext.device_count()
    assert (n > 0) == (reason == "")
    runtime, driver = ext.versions()
    assert runtime >= 12000
    # the CPU engine keeps working with the extension loaded
    config = tiny_config()
    model = random_model(config, rng)
    batch = tiny_batch(rng)
    start, end = model.forward(*batch_inputs(batch))
    assert np.isfinite(start[batch["attention_mask"] == 1]).all() and start.shape == (2, 37)


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is usable here")
def test_cuda_without_gpu_is_a_clear_error():
    assert bertqa.cuda_available() is False
    assert bcuda.unavailable_reason()
    with pytest.raises(RuntimeError, match="device='cuda': no CUDA backend usable here"):
        BertQA(tiny_config(), device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA backend usable here"):
        check_device("cuda:0")
    with pytest.raises(RuntimeError, match="no CUDA backend usable here"):
        bcuda.gelu(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="device must be"):
        check_device("cuda:x")


needs_extension = pytest.mark.skipif(bcuda._import() is None, reason="bertqa._cuda is not built (no CUDA toolkit)")


@needs_extension
def test_an_uninitialised_gpu_engine_refuses_every_call():
    """No GPU needed: csrc/engine_methods.c's shared methods and the CUDA engine's own check for a model first."""
    ext = bcuda._import()
    bare = ext.Engine.__new__(ext.Engine)
    calls = {"forward": (np.ones((1, 3), np.int64),), "forward_backward": (), "adamw_step": (), "tensor_sizes": (),
             "arena_bytes": (), "release_arena": (), "zero_grad": (), "enable_training": (), "synchronize": (),
             "download": ("params", np.zeros(1, np.float32))}
    for name, args in calls.items():
        with pytest.raises(RuntimeError, match="Engine is not initialised"):
            getattr(bare, name)(*args)
    for name in ("precision", "attention", "attention_used"):
        with pytest.raises(RuntimeError, match="Engine is not initialised"):
            getattr(bare, name)
    with pytest.raises(RuntimeError, match="Engine is not initialised"):
        bare.attention = "own"


@needs_extension
def test_cudnn_is_linked_when_the_build_found_it():
    """bertqa._cuda built with cuDNN's fused attention links libcudnn and reports the cuDNN 9 it loaded; a build
    without it says 0 (the engine then runs its own attention kernels)."""
    version = bcuda.cudnn_version()
    if version == 0:
        pytest.skip("bertqa._cuda was built without cuDNN (setup.py prints why: no cuDNN 9 or no cudnn-frontend "
                    "headers at build time)")
    assert 90000 <= version < 100000, version
    readelf = shutil.which("readelf")
    if readelf:
        needed = subprocess.run([readelf, "-d", bcuda._import().__file__], capture_output=True, text=True).stdout
        assert "libcudnn.so" in needed, needed


@needs_extension
@pytest.mark.parametrize("first", [0, 3, 2**33 + 1])
def test_host_build_of_the_kernel_rng_is_the_cpu_rng(first):
    """The kernels' Philox code, compiled for the host, against csrc/rng.c (no GPU needed)."""
    for seed, step, tid in [(0, 0, 0), (2**63 + 12345, 7, 38), (42, 2**32 - 1, 5)]:
        u = np.empty(1001, np.float32)
        bcuda._import().host_uniform(u, seed, step, tid, first)
        np.testing.assert_array_equal(u, bertqa._core._C.uniform(1001, seed, step, tid, first))


@needs_extension
@pytest.mark.parametrize("rows,cols,first", [(3, 37, 0), (2, 36, 5), (4, 385, 2), (7, 1, 3), (1, 4099, 1)])
def test_host_build_of_the_kernel_row_walk_is_cpu_dropout(rng, rows, cols, first):
    """for_row_quads (how every fused kernel draws its row's dropout mask, a Philox quad per lane) against
    dropout_forward over the same element numbering."""
    x = f32(rng, rows, cols)
    out = np.empty_like(x)
    bcuda._import().host_dropout_rows(out, x, rows, cols, 0.3, 99, 4, 6, first)
    padded = np.concatenate([np.zeros(first, np.float32), x.ravel()])
    want = ops.dropout(padded, 0.3, 99, step=4, tensor_id=6)[first:].reshape(rows, cols)
    np.testing.assert_array_equal(out, want)


def window_dropout_reference(x, p, seed, step, tensor_id, index):
    """dropout(x) with element k drawing the uniform of RNG index index[k]: bertqa.ops.dropout of ones over the flat
    numbering (0 or 1 / (1 - p) at each index), gathered at those indices, times x."""
    keep_scale = ops.dropout(np.ones(int(index.max()) + 1, np.float32), p, seed, step=step, tensor_id=tensor_id)
    return x * keep_scale[index]


@needs_extension
@pytest.mark.parametrize("B,T,C,P,win", [(3, 37, 37, 40, [5, 0, 2]), (2, 5, 3, 7, [1, 1]), (1, 1, 1, 1, [0]),
                                         (4, 9, 36, 9, None), (2, 11, 7, 40, [6, 3])])
def test_host_build_of_the_window_keyed_hidden_numbering(rng, B, T, C, P, win):
    """The engine's hidden-state dropout numbering (drop_hidden_base + for_row_quads, host build) against NumPy
    indices (window_ids[b] * P + t) * C + c and bertqa.ops.dropout's RNG: odd C, T < P, window ids not 0..B-1,
    repeated window ids (same mask), None (row b is window b)."""
    x = f32(rng, B, T, C)
    out = np.empty_like(x)
    bcuda._import().host_dropout_windows(out, x, B, 0, T, C, P, None if win is None else np.array(win), 0.3, 99, 4, 6)
    w = np.arange(B) if win is None else np.array(win)
    index = (w[:, None, None] * P + np.arange(T)[None, :, None]) * C + np.arange(C)[None, None, :]
    np.testing.assert_array_equal(out, window_dropout_reference(x, 0.3, 99, 4, 6, index))
    if win is not None and len(set(win)) < B:   # one window, one mask, wherever it sits in the batch
        np.testing.assert_array_equal(out[0] == 0, out[1] == 0)


@needs_extension
@pytest.mark.parametrize("B,NH,T,P,win", [(2, 3, 37, 40, [7, 2]), (1, 1, 1, 3, [4]), (3, 2, 5, 5, None),
                                          (2, 4, 13, 16, [0, 9])])
def test_host_build_of_the_window_keyed_attention_numbering(rng, B, NH, T, P, win):
    """The same for attention probabilities [B,NH,T,T]: index ((window_ids[b] * NH + h) * P + i) * P + j."""
    x = f32(rng, B, NH, T, T)
    out = np.empty_like(x)
    bcuda._import().host_dropout_windows(out, x, B, NH, T, 0, P, None if win is None else win, 0.2, 5, 2**32 - 1, 4)
    w = np.arange(B) if win is None else np.array(win)
    b, h, i, j = np.meshgrid(np.arange(B), np.arange(NH), np.arange(T), np.arange(T), indexing="ij")
    index = ((w[b] * NH + h) * P + i) * P + j
    np.testing.assert_array_equal(out, window_dropout_reference(x, 0.2, 5, 2**32 - 1, 4, index))


@needs_extension
def test_host_window_numbering_is_independent_of_batch_place_and_width(rng):
    """What the keying is for: a window's mask is the same in a batch of width 11 at row 1 as alone at width 7."""
    C, P = 5, 16
    x = f32(rng, 2, 11, C)
    out = np.empty_like(x)
    bcuda._import().host_dropout_windows(out, x, 2, 0, 11, C, P, np.array([3, 8]), 0.5, 1, 0, 2)
    alone = np.empty((1, 7, C), np.float32)
    bcuda._import().host_dropout_windows(alone, np.ascontiguousarray(x[1:, :7]), 1, 0, 7, C, P, [8], 0.5, 1, 0, 2)
    np.testing.assert_array_equal(alone[0], out[1, :7])


@needs_extension
def test_host_window_ids_are_checked():
    x = np.zeros((2, 3, 4), np.float32)
    hook = bcuda._import().host_dropout_windows
    for bad, match in [([1], "1-D array of 2 integers"), ([0, -1], r"window_ids holds -1 at index 1"),
                       ([0, 2**40], r"in \[0, 2\^40\)"), (np.array([0.5, 1.0]), "window_ids must be None or"),
                       (np.zeros((2, 1), np.int64), "1-D array of 2")]:
        with pytest.raises(ValueError, match=match):
            hook(np.empty_like(x), x, 2, 0, 3, 4, 5, bad, 0.1, 0, 0, 0)
    with pytest.raises(ValueError, match="P >= T"):
        hook(np.empty_like(x), x, 2, 0, 3, 4, 2, None, 0.1, 0, 0, 0)


def run_python(code, **env):
    """code in a fresh interpreter (NCCL is loaded once per process), with env added; (returncode, stdout, stderr)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, **env}, timeout=120)
    return r.returncode, r.stdout, r.stderr


def nccl_reason():
    """None when an NCCL library loads here (no GPU needed), else why not."""
    try:
        bcuda.nccl_version()
        return None
    except RuntimeError as e:
        return str(e)


@needs_extension
def test_nccl_missing_library_is_a_clear_error():
    """BERTQA_NCCL_LIBRARY names the file to load, and no other: a missing one is a RuntimeError naming it and the
    loader's reason; argument checks still come first (ValueError); the package imports and the CPU engine runs."""
    code = """if True:
        import bertqa, bertqa.cuda as c
        for call in (c.nccl_version, c.nccl_unique_id, lambda: c.NcclComm(bytes(128), 2, 1, 0)):
            try:
                call()
                print("no error")
            except RuntimeError as e:
                print("RuntimeError", e)
        try:
            c.NcclComm(bytes(128), 2, 2, 0)
        except ValueError as e:
            print("ValueError", e)
        print("ok")
    """
    rc, out, err = run_python(code, BERTQA_NCCL_LIBRARY="/nonexistent/dir/libnccl.so.2")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[-1] == "ok"
    for line in lines[:3]:
        assert line.startswith("RuntimeError NCCL: NCCL error: NCCL could not be loaded from "
                               "BERTQA_NCCL_LIBRARY=/nonexistent/dir/libnccl.so.2"), line
        assert "No such file" in line, line
    assert lines[3].startswith("ValueError") and "rank=2" in lines[3], lines[3]


@needs_extension
def test_nccl_library_without_the_nccl_functions_is_named():
    libm = next((p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib64/libm.so.6", "/lib64/libm.so.6")
                 if Path(p).is_file()), None)
    if libm is None:
        pytest.skip("no libm.so.6 at a known path")
    rc, out, err = run_python("import bertqa.cuda as c\ntry: c.nccl_version()\nexcept RuntimeError as e: print(e)",
                              BERTQA_NCCL_LIBRARY=libm)
    assert rc == 0, err
    assert f"{libm} has no ncclGetVersion" in out, out


@needs_extension
def test_nccl_arguments_are_checked_before_nccl_or_cuda():
    with pytest.raises(ValueError, match="unique_id must be the 128 bytes of nccl_unique_id"):
        bcuda.NcclComm(b"x" * 127, 2, 0)
    with pytest.raises(TypeError):
        bcuda.NcclComm("not bytes" * 20, 2, 0)
    for nranks, rank, device in [(2, 2, 0), (2, -1, 0), (0, 0, 0), (1, 0, -1)]:
        with pytest.raises(ValueError, match=f"nranks={nranks}, rank={rank}, device={device}"):
            bcuda.NcclComm(bytes(128), nranks, rank, device)


@needs_extension
def test_nccl_version_and_unique_id_need_no_gpu():
    reason = nccl_reason()
    if reason is not None:
        pytest.skip(f"no NCCL library here: {reason}")
    v = bcuda.nccl_version()
    assert v >= 20400, v   # 2.4: ncclCommAbort, ncclCommGetAsyncError
    assert Path(bcuda.nccl_library()).is_file()
    a, b = bcuda.nccl_unique_id(), bcuda.nccl_unique_id()
    assert isinstance(a, bytes) and len(a) == 128 and a != b
    # the same library through BERTQA_NCCL_LIBRARY
    rc, out, err = run_python("import bertqa.cuda as c; print(c.nccl_version(), c.nccl_library())",
                              BERTQA_NCCL_LIBRARY=bcuda.nccl_library())
    assert rc == 0 and out.split()[0] == str(v), err
    if GPU_REASON is not None:   # a communicator needs a GPU: the error says why there is none
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            bcuda.NcclComm(a, 1, 0, 0)


@pytest.mark.cuda
@needs_gpu
def test_nccl_single_rank_allreduce_is_the_identity(rng):
    """nranks = 1: the sum over one rank leaves the gradients as they are; errors name their cause."""
    reason = nccl_reason()
    if reason is not None:
        pytest.skip(f"no NCCL library: {reason}")
    dev = random_model(tiny_config(), rng, device="cuda", precision="fp32", scale=0.1)
    dev.zero_grad()
    dev.forward_backward(tiny_batch(rng))
    before = dev.gradient("qa_outputs.weight").copy()
    with bcuda.NcclComm(bcuda.nccl_unique_id(), 1, 0, 0) as comm:
        assert (comm.nranks, comm.rank, comm.device, comm.closed) == (1, 0, 0, False)
        comm.allreduce_sum_grads(dev, timeout=60)
        np.testing.assert_array_equal(dev.gradient("qa_outputs.weight"), before)
        with pytest.raises(TypeError, match="bertqa._cuda.Engine"):
            comm.allreduce_sum_grads(object())
    assert comm.closed
    with pytest.raises(RuntimeError, match="closed"):
        comm.allreduce_sum_grads(dev)


@needs_extension
def test_group_ids_for_the_embedding_scatter(rng):
    ids = rng.integers(0, 9, 200).astype(np.int32)
    uniq, start, tok = bcuda._import().group_ids(ids, 9, 0)
    assert 0 not in uniq and len(set(uniq.tolist())) == len(uniq)
    assert list(uniq) == [i for i in dict.fromkeys(ids.tolist()) if i != 0]   # order of first appearance
    for g, u in enumerate(uniq):
        np.testing.assert_array_equal(tok[start[g]:start[g + 1]], np.flatnonzero(ids == u))
    uniq, start, tok = bcuda._import().group_ids(np.zeros(5, np.int32), 9, 0)   # all padding
    assert len(uniq) == 0 and list(start) == [0] and len(tok) == 0


def test_precision_argument_is_checked():
    # The CPU's own precisions (bf16, int8) are tests/test_precision.py's; an unknown name is refused on every device.
    with pytest.raises(ValueError, match="precision must be 'fp32', 'bf16' or 'int8', got 'fp16'"):
        BertQA(tiny_config(), precision="fp16")
    assert BertQA(tiny_config()).precision == "fp32"


# ---- helpers shared with the GPU tests ---------------------------------------------------------------------

def tiny_config(**overrides):
    """Awkward sizes: hidden 36, 3 heads of 12, intermediate 50, T not a multiple of anything."""
    cfg = dict(vocab_size=53, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=50,
               max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
               attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, initializer_range=0.5, pad_token_id=0)
    cfg.update(overrides)
    return BertConfig.from_dict(cfg)


def tiny_batch(rng, B=2, T=37, V=53):
    ids = rng.integers(1, V, (B, T))
    ids[:, 0] = 2                                      # a repeated id across rows
    mask = np.ones((B, T), np.int64)
    mask[0, T - 9:] = 0
    ids[mask == 0] = 0                                 # [PAD]: its row gets no gradient
    types = np.zeros((B, T), np.int64)
    types[:, T // 3:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
                start_positions=np.array([5, T - 2, 1, 3])[:B], end_positions=np.array([7, T, 2, 40])[:B])


def batch_inputs(batch):
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def random_model(config, rng, device="cpu", precision=None, scale=0.5, seed=None):
    tensors = {name: (rng.standard_normal(shape) * scale).astype(np.float32)
               for name, shape in checkpoint.expected_shapes(config).items()}
    return BertQA(config, tensors, seed=int(rng.integers(2**31)) if seed is None else seed, device=device,
                  precision=precision)


def twin(cpu_model, precision, attention="own"):
    """The same parameters and dropout seed on the GPU; attention="own" by default: the CPU's dropout masks."""
    model = BertQA(cpu_model.config, cpu_model.state_dict(), seed=cpu_model.seed, device="cuda", precision=precision)
    model._engine.attention = attention
    return model


# ---- kernels, one by one ------------------------------------------------------------------------------------

@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("n,first", [(1, 0), (4097, 0), (1237, 3), (10, 2**33 + 1)])
def test_uniform_is_the_cpu_rng(n, first):
    for seed, step, tid in [(0, 0, 0), (2**63 + 12345, 7, 38), (42, 2**32 - 1, 5)]:
        np.testing.assert_array_equal(bcuda.uniform(n, seed, step, tid, first),
                                      bertqa._core._C.uniform(n, seed, step, tid, first))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_dropout_masks_agree_bit_for_bit(rng, precision):
    x = f32(rng, 3, 1001)
    got = bcuda.dropout(x, 0.1, 1234, step=9, tensor_id=4, precision=precision)
    want = ops.dropout(x, 0.1, 1234, step=9, tensor_id=4)
    np.testing.assert_array_equal(got == 0, want == 0)
    if precision == "fp32":
        np.testing.assert_array_equal(got, want)
    else:
        assert rel_err(got, want) < TOL[precision]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("N,C", [(1, 7), (37, 36), (130, 385)])
def test_residual_layernorm_forward(rng, precision, N, C):
    x, y = f32(rng, N, C), f32(rng, N, C, scale=3.0)
    w, b = f32(rng, C), f32(rng, C)
    res, out, mean, rstd = bcuda.residual_layernorm(x, y, w, b, 1e-12, p=0.1, seed=5, step=2, site=8,
                                                    precision=precision)
    want_res = x + ops.dropout(y, 0.1, 5, step=2, tensor_id=8)
    assert rel_err(res, want_res) < TOL[precision]
    assert rel_err(out, ops.layernorm(want_res, w, b, 1e-12)) < TOL[precision] * 4
    assert term_err(mean, want_res.mean(-1), np.abs(want_res).mean(-1)) < TOL[precision] * 4
    # no residual, no dropout: plain LayerNorm
    _, out2, _, _ = bcuda.residual_layernorm(None, y, w, b, 1e-5, precision=precision)
    assert rel_err(out2, ops.layernorm(y, w, b, 1e-5)) < TOL[precision] * 4


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("N,C", [(1, 7), (37, 36), (300, 385)])
def test_layernorm_backward(rng, precision, N, C):
    x, dy = f32(rng, N, C, scale=2.0), f32(rng, N, C)
    w, b = f32(rng, C), f32(rng, C)
    _, _, mean, rstd = bcuda.residual_layernorm(None, x, w, b, 1e-12)   # fp32 statistics for both
    dx, branch, dw, db = bcuda.layernorm_backward(dy, x, w, mean, rstd, p_out=0.1, out_site=3, seed=11, step=1,
                                                  precision=precision, branch=True)
    want_dx, want_dw, want_db = ops.layernorm_backward(dy, x, w, 1e-12)
    tol = TOL[precision] * (1 if precision == "bf16" else 10)
    assert rel_err(dx, want_dx) < tol
    assert rel_err(dw, want_dw) < tol and rel_err(db, want_db) < tol
    assert rel_err(branch, ops.dropout_backward(want_dx, 0.1, 11, step=1, tensor_id=3)) < tol
    # dropout on the incoming gradient (the embedding LayerNorm's order)
    dx2, _, dw2, _ = bcuda.layernorm_backward(dy, x, w, mean, rstd, p_in=0.1, in_site=0, seed=11, step=1,
                                              precision=precision)
    want2 = ops.layernorm_backward(ops.dropout_backward(dy, 0.1, 11, step=1, tensor_id=0), x, w, 1e-12)
    assert rel_err(dx2, want2[0]) < tol and rel_err(dw2, want2[1]) < tol


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_embedding_layernorm_and_backward(rng, precision):
    B, T, C, V, P, NT = 3, 29, 36, 41, 40, 2
    ids = rng.integers(0, V, (B, T))
    ids[:, :3] = 5                       # repeated ids
    ids[2, 20:] = 0                      # padding
    types = rng.integers(0, NT, (B, T))
    wte, wpe, wtt = f32(rng, V, C), f32(rng, P, C), f32(rng, NT, C)
    w, b = f32(rng, C), f32(rng, C)
    emb, out, mean, rstd = bcuda.embedding_layernorm(ids, types, wte, wpe, wtt, w, b, 1e-12, p=0.1, seed=3, step=4,
                                                     precision=precision)
    want_emb = ops.embedding(ids, types, wte, wpe, wtt)
    want_out = ops.dropout(ops.layernorm(want_emb, w, b, 1e-12), 0.1, 3, step=4, tensor_id=0)
    assert rel_err(emb, want_emb) < TOL[precision]
    assert rel_err(out, want_out) < TOL[precision] * 4
    np.testing.assert_array_equal(out == 0, want_out == 0)
    dout = f32(rng, B, T, C)
    for t in (types, None):
        got = bcuda.embedding_backward(dout, ids, t, V, P, NT, padding_idx=0, precision=precision)
        want = ops.embedding_backward(dout, ids, t, V, P, NT, padding_idx=0)
        for g, w_ in zip(got, want):
            assert rel_err(g, w_) < TOL[precision]
        assert not got[0][0].any()       # the [PAD] row


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gelu(rng, precision):
    x, dy = f32(rng, 5, 1003, scale=3.0), f32(rng, 5, 1003)
    assert rel_err(bcuda.gelu(x, precision), ops.gelu(x)) < TOL[precision]
    assert rel_err(bcuda.gelu_backward(dy, x, precision), ops.gelu_backward(dy, x)) < TOL[precision] * 2


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("N,IN,OUT", [(37, 36, 50), (1, 7, 3), (512, 128, 96), (37, 50, 2)])
def test_linear(rng, precision, N, IN, OUT):
    x, w, b, dy = f32(rng, N, IN), f32(rng, OUT, IN), f32(rng, OUT), f32(rng, N, OUT)
    pairs = [(bcuda.linear(x, w, b, precision), ops.linear(x, w, b), np.abs(x) @ np.abs(w).T + np.abs(b)),
             (bcuda.linear(x, w, None, precision), ops.linear(x, w), np.abs(x) @ np.abs(w).T)]
    scales = (np.abs(dy) @ np.abs(w), np.abs(dy).T @ np.abs(x), np.abs(dy).sum(0))   # dx, dw, db
    pairs += list(zip(bcuda.linear_backward(dy, x, w, precision), ops.linear_backward(dy, x, w), scales))
    for got, want, scale in pairs:
        if precision == "fp32":
            assert rel_err(got, want) < TOL[precision]
        else:   # bf16 inputs: on the scale of the terms (term_err)
            assert term_err(got, want, scale) < TOL[precision]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("B,NH,T,HS", [(2, 3, 37, 12), (1, 1, 1, 8), (2, 4, 130, 16)])
def test_attention(rng, precision, B, NH, T, HS):
    q, k, v, dout = (f32(rng, B, T, NH, HS) for _ in range(4))
    mask = np.ones((B, T), np.float32)
    mask[0, T - T // 4:] = 0
    heads = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1, 3))   # [B,T,NH,HS] -> [B,NH,T,HS]  # noqa: E731
    for p in (0.0, 0.1):
        out, att = bcuda.attention(q, k, v, mask, p, seed=7, step=3, tensor_id=4, precision=precision)
        want = ops.attention(heads(q), heads(k), heads(v), mask, p, seed=7, step=3, tensor_id=4)
        assert rel_err(heads(out), want) < TOL[precision] * 4
        np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5 if precision == "fp32" else 2e-2)
        got = bcuda.attention_backward(dout, att, q, k, v, p, seed=7, step=3, tensor_id=4, precision=precision)
        wants = ops.attention_backward(heads(dout), heads(q), heads(k), heads(v), mask, p, seed=7, step=3, tensor_id=4)
        for g, w_ in zip(got, wants):
            assert rel_err(heads(g), w_) < TOL[precision] * 10


def to_bf16(a):
    """float32 -> the nearest bf16 (round to nearest even), as float32: what the GPU reads in bf16 mode."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def needs_cudnn():
    if bcuda.cudnn_version() == 0:
        pytest.skip("bertqa._cuda was built without cuDNN")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("B,T,NH,HS", [(2, 37, 3, 16), (3, 5, 2, 8), (1, 130, 4, 64), (2, 384, 12, 32)])
def test_cudnn_attention_matches_float64(rng, B, T, NH, HS):
    """cuDNN's fused attention (bf16) against the float64 reference on the same bf16-rounded inputs: rows of
    different key lengths (one of 1 key), forward and backward."""
    from reference import attention as ref_attention, attention_backward as ref_backward
    needs_cudnn()
    q, k, v, dout = (to_bf16(f32(rng, B, T, NH, HS)) for _ in range(4))
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    lengths[-1] = 1 if B > 1 else lengths[-1]
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    heads = lambda a: a.transpose(0, 2, 1, 3)   # [B,T,NH,HS] -> [B,NH,T,HS]  # noqa: E731
    out, dq, dk, dv = bcuda.cudnn_attention(q, k, v, lengths, dout=dout)
    want = ref_attention(heads(q), heads(k), heads(v), mask)
    assert rel_err(heads(out), want) < TOL["bf16"], rel_err(heads(out), want)
    assert np.array_equal(out, bcuda.cudnn_attention(q, k, v, lengths))   # the forward alone: the same bits
    wants = ref_backward(heads(dout), heads(q), heads(k), heads(v), mask)
    for name, g, w_ in zip("qkv", (dq, dk, dv), wants):
        assert rel_l2(heads(g), w_) < TOL["bf16"] * 2, (name, rel_l2(heads(g), w_))
    with pytest.raises(RuntimeError, match="lengths"):
        bcuda.cudnn_attention(q, k, v, np.zeros(B, np.int64))


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_cudnn_attention_dropout_keep_rate_and_backward_mask(rng, p):
    """q = k = 0 makes every probability 1/T; V = the identity makes out = dropout(P) itself. The share of dropped
    probabilities is p (within 5 sigma of a binomial), the kept ones read 1/(T(1-p)); the same seed gives the same
    mask, another seed another one; and dV = dropout(P)^T dO shows the backward regenerates the forward's mask."""
    needs_cudnn()
    B, T, NH, HS = 4, 64, 1, 64
    q = k = np.zeros((B, T, NH, HS), np.float32)
    v = np.broadcast_to(np.eye(T, HS, dtype=np.float32)[None, :, None, :], (B, T, NH, HS)).copy()
    dout = to_bf16(f32(rng, B, T, NH, HS))
    out, dq, dk, dv = bcuda.cudnn_attention(q, k, v, dropout_p=p, seed=1234, dout=dout)
    probs = out[:, :, 0, :T]                                  # [B, Tq, Tk]
    dropped = (probs == 0).mean()
    sigma = np.sqrt(p * (1 - p) / probs.size)
    assert abs(dropped - p) < 5 * sigma, (dropped, p)
    np.testing.assert_allclose(probs[probs != 0], 1.0 / (T * (1 - p)), rtol=1e-2)
    assert np.array_equal(out, bcuda.cudnn_attention(q, k, v, dropout_p=p, seed=1234))
    other = bcuda.cudnn_attention(q, k, v, dropout_p=p, seed=1235)
    assert not np.array_equal(out, other)
    want_dv = np.einsum("bij,bid->bjd", probs.astype(np.float64), dout[:, :, 0, :].astype(np.float64))
    assert rel_l2(dv[:, :, 0, :], want_dv) < TOL["bf16"], rel_l2(dv[:, :, 0, :], want_dv)


@pytest.mark.cuda
@needs_gpu
def test_engine_attention_is_cudnn_by_default_in_bf16_and_matches_the_cpu(rng):
    """bf16 engine, no dropout: the default attention is cuDNN's (attention_used says so), its logits and gradients
    match the CPU engine to the bf16 tolerance, and the own kernels give the same to that tolerance."""
    needs_cudnn()
    cpu = random_model(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   hidden_size=48, num_attention_heads=3), rng, scale=0.1)   # HS = 16: cuDNN's
    dev = BertQA(cpu.config, cpu.state_dict(), seed=cpu.seed, device="cuda", precision="bf16")
    assert dev._engine.attention == "cudnn"
    batch = tiny_batch(rng, B=3)
    start, end = dev.forward(*batch_inputs(batch))
    assert dev._engine.attention_used == "cudnn", dev._engine.attention_used
    want_start, want_end = cpu.forward(*batch_inputs(batch))
    tol = ENGINE_TOL["bf16"]
    assert logits_err("bf16", start, want_start, cpu, 0) < tol and logits_err("bf16", end, want_end, cpu, 1) < tol
    for model in (cpu, dev):
        model.zero_grad()
    loss, want_loss = dev.forward_backward(batch), cpu.forward_backward(batch)
    assert dev._engine.attention_used == "cudnn"
    assert abs(loss - want_loss) < tol * max(1.0, abs(want_loss))
    bad = {k: v for k, v in tensor_errors(dev, cpu, grads=True, err=rel_l2).items() if v > GRAD_TOL["bf16"]}
    assert not bad, bad
    assert global_grad_error(dev, cpu) < GLOBAL_GRAD_TOL["bf16"]
    dev._engine.attention = "own"
    own_start, _ = dev.forward(*batch_inputs(batch))
    assert dev._engine.attention_used == "own (attention='own')"
    assert logits_err("bf16", own_start, start, cpu, 0) < tol


@pytest.mark.cuda
@needs_gpu
def test_engine_attention_falls_back_to_the_own_kernels_and_says_why(rng):
    needs_cudnn()
    config = tiny_config(hidden_size=48, num_attention_heads=3)
    fp32 = random_model(config, rng, device="cuda", precision="fp32", scale=0.1)
    batch = tiny_batch(rng)
    fp32.forward(*batch_inputs(batch))
    assert fp32._engine.attention_used.startswith("own (cuDNN's fused attention takes bf16"), fp32._engine.attention_used
    bf16 = random_model(config, rng, device="cuda", precision="bf16", scale=0.1)
    holes = batch["attention_mask"].copy()
    holes[1, 4] = 0
    bf16.forward(batch["input_ids"], holes, batch["token_type_ids"])
    assert bf16._engine.attention_used.startswith("own (a row's mask has a hole"), bf16._engine.attention_used
    bf16.forward(batch["input_ids"][:, :1], None, None)
    assert bf16._engine.attention_used == "own (T = 1)"
    bf16.forward(*batch_inputs(batch))
    assert bf16._engine.attention_used == "cudnn"
    with pytest.raises(ValueError, match="attention must be 'cudnn' or 'own'"):
        bf16._engine.attention = "flash"


@pytest.mark.cuda
@needs_gpu
def test_engine_trains_through_cudnn_attention_with_dropout(rng):
    """bf16, dropout on (cuDNN's masks in attention): twenty steps lower the loss, every step finite, and the same
    seed twice gives the same losses bit for bit (the backward is cuDNN's deterministic one)."""
    needs_cudnn()
    runs = []
    state = int(rng.integers(2**31))
    for _ in range(2):
        r = np.random.default_rng(state)
        model = random_model(tiny_config(hidden_size=48, num_attention_heads=3, initializer_range=0.02), r,
                             device="cuda", precision="bf16", scale=0.1)
        batch = tiny_batch(r)
        runs.append([model.train_step(batch, lr=1e-3) for _ in range(20)])
        assert model._engine.attention_used == "cudnn"
    losses = np.array(runs[0])
    assert np.isfinite(losses).all() and losses[-5:].mean() < losses[:5].mean(), losses
    assert runs[0] == runs[1]


@pytest.mark.cuda
@needs_gpu
def test_span_loss(rng):
    B, T = 5, 37
    s, e = f32(rng, B, T, scale=3.0), f32(rng, B, T, scale=3.0)
    sp, ep = np.array([0, 36, -4, 37, 100]), np.array([3, 37, 5, 2, 37])   # clamped and ignored rows
    loss, ds, de = bcuda.span_loss(s, e, sp, ep)
    want_loss, want_ds, want_de = ops.span_loss(s, e, sp, ep)
    assert abs(loss - want_loss) < 1e-6 * max(1.0, abs(want_loss))
    assert rel_err(ds, want_ds) < 1e-6 and rel_err(de, want_de) < 1e-6
    loss, ds, de = bcuda.span_loss(s, e, np.full(B, T), np.full(B, T))   # every row ignored
    assert loss == 0.0 and not ds.any() and not de.any()


@pytest.mark.cuda
@needs_gpu
def test_adamw_and_sum_squares(rng):
    n = 3 * 4096 + 17
    p, g, m, v = f32(rng, n), f32(rng, n), f32(rng, n, scale=0.1), np.abs(f32(rng, n, scale=0.1))
    p2, m2, v2 = p.copy(), m.copy(), v.copy()
    bcuda.adamw(p, g, m, v, 3, 1e-3, weight_decay=0.01, grad_scale=0.5)
    ops.adamw(p2, g, m2, v2, 3, 1e-3, weight_decay=0.01, grad_scale=0.5)
    assert rel_err(p, p2) < 1e-6 and rel_err(m, m2) < 1e-6 and rel_err(v, v2) < 1e-6
    want = float(np.sum(g.astype(np.float64) ** 2))
    got = bcuda.sum_squares(g)
    assert abs(got - want) < 1e-9 * want
    assert bcuda.sum_squares(g) == got   # deterministic


# ---- the engine --------------------------------------------------------------------------------------------

def logit_scale(model):
    """[2]: a bound on the size of the terms each QA logit sums, sum_i |h_i| |w_i| + |b|, for the last LayerNorm's
    output h = g * xhat + beta: since xhat has RMS 1 over the C features, sum_i |g_i xhat_i w_i| <= sqrt(C) ||g * w||
    (Cauchy-Schwarz). bf16's error in a logit is relative to this, not to the logit, which with small random weights
    is near 0 and the same at every position (the weights' and biases' terms cancel)."""
    last = model.config.num_hidden_layers - 1
    g = np.abs(model.tensor(f"bert.encoder.layer.{last}.output.LayerNorm.weight")).astype(np.float64)
    beta = np.abs(model.tensor(f"bert.encoder.layer.{last}.output.LayerNorm.bias")).astype(np.float64)
    w = np.abs(model.tensor("qa_outputs.weight")).astype(np.float64)   # [2, C]
    return np.sqrt(g.size) * np.linalg.norm(g * w, axis=1) + (beta * w).sum(1) + np.abs(model.tensor("qa_outputs.bias"))


def logits_err(precision, got, want, model, which):
    """fp32: max-relative; bf16: on the QA head's term scale (logit_scale), which = 0 start, 1 end."""
    return rel_err(got, want) if precision == "fp32" else term_err(got, want, logit_scale(model)[which])


def roundoff_only(config):
    """The parameters whose gradient is zero in exact arithmetic, so that what any engine computes for it is round-off
    (~1e-8 of the other gradients in fp32, ~1e-2 in bf16), and Adam's g / sqrt(v) turns that into +-lr steps of
    arbitrary sign: qa_outputs.bias and the last layer's output.LayerNorm.bias add the same amount to every
    position's logit, which the softmax over positions cancels; each layer's attention.self.key.bias adds q . b to
    all of a query's scores, which the softmax over keys cancels. Their own size is no scale for an error."""
    last = config.num_hidden_layers - 1
    return ({"qa_outputs.bias", f"bert.encoder.layer.{last}.output.LayerNorm.bias"} |
            {f"bert.encoder.layer.{i}.attention.self.key.bias" for i in range(config.num_hidden_layers)})


def tensor_errors(gpu_model, cpu_model, grads=False, err=rel_err):
    """Per-tensor error of the GPU model's parameters (or gradients) against the CPU model's, leaving out the
    round-off-only gradients (roundoff_only; roundoff_error checks those).

    Relative L2 (bf16) is taken against the larger of the tensor's norm and its share of the whole model's (the norm
    it would have if its elements had the RMS size of all of them): in a tensor far smaller than the rest (query
    gradients where attention is near uniform, sums of gradients that largely cancel) bf16 storage leaves mostly
    round-off, on any hardware."""
    names = [n for n in cpu_model.layout if n not in roundoff_only(cpu_model.config)]
    get = (lambda m, n: m.gradient(n)) if grads else (lambda m, n: m.tensor(n))
    want = {n: np.array(get(cpu_model, n), np.float64) for n in names}
    rms = np.sqrt(sum(float(np.square(w).sum()) for w in want.values()) / sum(w.size for w in want.values()))
    errs = {}
    for name in names:
        if err is rel_l2:
            got, w = _finite_pair(get(gpu_model, name), want[name])
            errs[name] = np.linalg.norm(got - w) / max(np.linalg.norm(w), rms * np.sqrt(w.size), 1e-30)
        else:
            errs[name] = err(get(gpu_model, name), want[name])
    return errs


def global_grad_error(gpu_model, cpu_model):
    """Relative L2 error of all gradients together (every parameter, one vector)."""
    got = np.concatenate([np.asarray(gpu_model.gradient(n), np.float64).ravel() for n in cpu_model.layout])
    want = np.concatenate([np.asarray(cpu_model.gradient(n), np.float64).ravel() for n in cpu_model.layout])
    return rel_l2(got, want)


def roundoff_error(gpu_model, cpu_model):
    """max |gpu - cpu| over the round-off-only gradients (roundoff_only), relative to the largest gradient element of
    the CPU model: what the cancellation leaves must be round-off on the gradients' own scale."""
    scale = max(float(np.abs(cpu_model.gradient(n)).max()) for n in cpu_model.layout)
    return max(float(np.abs(np.asarray(gpu_model.gradient(n), np.float64) - cpu_model.gradient(n)).max())
               for n in roundoff_only(cpu_model.config)) / scale


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_logits_and_gradients_match_the_cpu_engine(rng, precision):
    # every tensor random; bf16 with weights of a trained model's size (0.1), fp32 with larger ones too
    cpu = random_model(tiny_config(), rng, scale=0.3 if precision == "fp32" else 0.1)
    dev = twin(cpu, precision)
    assert dev.device == "cuda" and dev.precision == precision
    batch = tiny_batch(rng)
    err, tol = engine_err(precision), ENGINE_TOL[precision]
    start, end = dev.forward(*batch_inputs(batch))
    want_start, want_end = cpu.forward(*batch_inputs(batch))
    assert logits_err(precision, start, want_start, cpu, 0) < tol and logits_err(precision, end, want_end, cpu, 1) < tol
    for model in (cpu, dev):
        model.zero_grad()
        model.rng_step = 5
    loss = dev.forward_backward(batch)   # dropout on: the masks are the CPU's
    want_loss = cpu.forward_backward(batch)
    assert abs(loss - want_loss) < tol * max(1.0, abs(want_loss))
    errs = tensor_errors(dev, cpu, grads=True, err=err)
    bad = {k: v for k, v in errs.items() if v > GRAD_TOL[precision]}
    assert not bad, bad
    assert global_grad_error(dev, cpu) < GLOBAL_GRAD_TOL[precision]
    assert roundoff_error(dev, cpu) < GLOBAL_GRAD_TOL[precision]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_window_ids_match_the_cpu_engine(rng, precision):
    """Dropout masks keyed by window ids (not 0..B-1, one repeated) agree with the CPU engine's bit for bit: the
    losses and gradients agree to the engine tolerance, with dropout on."""
    cpu = random_model(tiny_config(), rng, scale=0.3 if precision == "fp32" else 0.1)
    dev = twin(cpu, precision)
    batch = tiny_batch(rng, B=3)
    win = np.array([17, 4, 17])
    err, tol = engine_err(precision), ENGINE_TOL[precision]
    for model in (cpu, dev):
        model.zero_grad()
    loss = dev.forward_backward(batch, window_ids=win, rng_step=5)
    want_loss = cpu.forward_backward(batch, window_ids=win, rng_step=5)
    assert abs(loss - want_loss) < tol * max(1.0, abs(want_loss))
    bad = {k: v for k, v in tensor_errors(dev, cpu, grads=True, err=err).items() if v > GRAD_TOL[precision]}
    assert not bad, bad
    assert global_grad_error(dev, cpu) < GLOBAL_GRAD_TOL[precision]
    assert roundoff_error(dev, cpu) < GLOBAL_GRAD_TOL[precision]
    # the ids change the masks: the default numbering (row b is window b) gives another loss
    dev.zero_grad()
    assert dev.forward_backward(batch, rng_step=5) != loss
    with pytest.raises(ValueError, match="window_ids"):
        dev._engine.forward_backward(*[batch[k] for k in ("input_ids", "token_type_ids", "attention_mask",
                                                          "start_positions", "end_positions")],
                                     window_ids=np.array([0, -1, 2]))


@pytest.mark.cuda
@needs_gpu
@needs_minilm
@pytest.mark.parametrize("precision", PRECISIONS)
def test_real_minilm_on_squad_windows_matches_the_cpu_engine(data_dir, precision):
    """all-MiniLM-L6-v2's own weights at the recipe's shape (T=384, 12 heads of 32, hidden 384) on two real SQuAD
    windows, a third of each real tokens then padding: logits and gradients against the CPU engine, dropout on."""
    from bertqa.squad import build_features, load_squad   # noqa: PLC0415

    cpu = BertQA.from_pretrained("all-MiniLM-L6-v2")
    f = build_features(load_squad(data_dir / "squad" / "valid.json")[:2], cpu.tokenizer, max_seq_length=384,
                       doc_stride=128, progress=False)
    batch = {k: getattr(f, k)[:2].astype(np.int64) for k in
             ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions")}
    assert batch["input_ids"].shape == (2, 384) and batch["attention_mask"].sum() < 2 * 384
    dev = twin(cpu, precision)
    start, end = dev.forward(*batch_inputs(batch))
    want_start, want_end = cpu.forward(*batch_inputs(batch))
    tol = ENGINE_TOL[precision]
    assert logits_err(precision, start, want_start, cpu, 0) < tol and logits_err(precision, end, want_end, cpu, 1) < tol
    assert (start.argmax(1) == want_start.argmax(1)).all() and (end.argmax(1) == want_end.argmax(1)).all()
    for model in (cpu, dev):
        model.zero_grad()
        model.rng_step = 3
    loss, want_loss = dev.forward_backward(batch), cpu.forward_backward(batch)
    assert abs(loss - want_loss) < tol * max(1.0, abs(want_loss))
    errs = tensor_errors(dev, cpu, grads=True, err=engine_err(precision))
    assert max(errs.values()) < GRAD_TOL[precision], max(errs.items(), key=lambda kv: kv[1])
    assert global_grad_error(dev, cpu) < GLOBAL_GRAD_TOL[precision]
    assert roundoff_error(dev, cpu) < GLOBAL_GRAD_TOL[precision]


@pytest.mark.cuda
@needs_gpu
def test_engine_split_batch_with_window_ids_is_the_whole_batch(rng):
    """Data parallel in one process: the rows of a batch split in two halves (rows 0, 2 and 1, 3), each with its rows'
    window ids and loss_scale 1/2, accumulate the gradient of the whole batch (what N ranks + an all-reduce do)."""
    cpu = random_model(tiny_config(), rng, scale=0.1)
    dev = twin(cpu, "fp32")
    batch = tiny_batch(rng, B=4)
    batch["end_positions"] = np.array([7, 30, 2, 11])   # every position inside: each half has 2 valid rows
    dev.zero_grad()
    whole_loss = dev.forward_backward(batch, rng_step=3)
    whole = {name: dev.gradient(name).copy() for name in cpu.layout}
    dev.zero_grad()
    halves = []
    for rows in ([0, 2], [1, 3]):
        part = {k: v[rows] for k, v in batch.items()}
        halves.append(dev.forward_backward(part, loss_scale=0.5, window_ids=np.array(rows), rng_step=3))
    assert abs(np.mean(halves) - whole_loss) < 1e-5 * max(1.0, abs(whole_loss))
    skip = roundoff_only(cpu.config)
    errs = {name: rel_err(dev.gradient(name), whole[name]) for name in cpu.layout if name not in skip}
    assert max(errs.values()) < ENGINE_TOL["fp32"], max(errs.items(), key=lambda kv: kv[1])
    scale = max(float(np.abs(g).max()) for g in whole.values())
    assert max(float(np.abs(dev.gradient(n) - whole[n]).max()) for n in skip) < ENGINE_TOL["fp32"] * scale


@pytest.mark.cuda
@needs_gpu
def test_engine_at_an_aligned_shape_uses_cublaslt(rng):
    """MiniLM-like widths (hidden 384, 12 heads, T=128): the cuBLASLt path with its bias epilogue, in fp32."""
    config = tiny_config(vocab_size=1000, hidden_size=384, num_attention_heads=12, intermediate_size=1536,
                         max_position_embeddings=128, num_hidden_layers=2)
    cpu = random_model(config, rng, scale=0.05)
    dev = twin(cpu, "fp32")
    batch = tiny_batch(rng, B=4, T=128, V=1000)
    start, _ = dev.forward(*batch_inputs(batch))
    assert rel_err(start, cpu.forward(*batch_inputs(batch))[0]) < ENGINE_TOL["fp32"]
    for model in (cpu, dev):
        model.zero_grad()
    assert abs(dev.forward_backward(batch) - cpu.forward_backward(batch)) < 1e-4
    errs = tensor_errors(dev, cpu, grads=True)
    assert max(errs.values()) < ENGINE_TOL["fp32"], max(errs.items(), key=lambda kv: kv[1])
    assert roundoff_error(dev, cpu) < ENGINE_TOL["fp32"]
    stats = dev._engine.gemm_stats
    assert stats["cublaslt"] > 0, stats


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_twenty_step_loss_curve_matches_the_cpu_engine(rng, precision):
    cpu = random_model(tiny_config(initializer_range=0.02), rng, scale=0.1)
    dev = twin(cpu, precision)
    batch = tiny_batch(rng)
    want = [cpu.train_step(batch, lr=1e-3) for _ in range(20)]
    got = [dev.train_step(batch, lr=1e-3) for _ in range(20)]
    got, want = np.array(got), np.array(want)
    tol = 1e-3 if precision == "fp32" else 5e-2
    assert np.abs(got - want).max() < tol * np.abs(want).max(), np.c_[got, want]
    assert dev.step == cpu.step == 20
    errs = tensor_errors(dev, cpu, err=engine_err(precision))
    assert max(errs.values()) < tol, max(errs.items(), key=lambda kv: kv[1])
    # the round-off-only tensors: each engine moves them at most ~lr per step (Adam), in any direction
    for name in roundoff_only(cpu.config):
        assert np.abs(dev.tensor(name) - cpu.tensor(name)).max() <= 2 * 20 * 1e-3 * 1.01, name


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_same_seed_twice_is_bit_identical(rng, precision):
    state = int(rng.integers(2**31))
    runs = []
    for _ in range(2):
        r = np.random.default_rng(state)
        model = random_model(tiny_config(), r, device="cuda", precision=precision, scale=0.1)
        batch = tiny_batch(r)
        losses = [model.train_step(batch, lr=1e-3) for _ in range(5)]
        runs.append((losses, model.state_dict()["bert.encoder.layer.1.output.dense.weight"].copy()))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert len(set(runs[0][0])) == 5


@pytest.mark.cuda
@needs_gpu
def test_host_device_copies_and_training_state(rng, tmp_path):
    cpu = random_model(tiny_config(), rng, scale=0.1)
    dev = twin(cpu, "fp32")
    batch = tiny_batch(rng)
    dev.train_step(batch, lr=1e-3)
    # a write through a tensor view reaches the device before the next call
    dev.tensor("qa_outputs.bias")[...] = [3.0, -1.0]
    start, end = dev.forward(*batch_inputs(batch))
    dev.tensor("qa_outputs.bias")[...] = [0.0, 0.0]
    start0, end0 = dev.forward(*batch_inputs(batch))
    real = batch["attention_mask"] == 1
    np.testing.assert_allclose(start[real] - start0[real], 3.0, atol=1e-4)   # (padding: -inf on both sides)
    np.testing.assert_allclose(end[real] - end0[real], -1.0, atol=1e-4)
    # training state: save on the GPU model, load into a fresh one, continue identically
    dev.save_training_state(tmp_path / "state.npz")
    other = twin(cpu, "fp32")
    other.load_training_state(tmp_path / "state.npz")
    assert other.step == dev.step and other.rng_step == dev.rng_step
    assert dev.train_step(batch, lr=1e-3) == other.train_step(batch, lr=1e-3)
    # save_pretrained writes the device parameters
    dev.save_pretrained(tmp_path / "model")
    back = BertQA.from_pretrained(tmp_path / "model")
    np.testing.assert_array_equal(back.tensor("qa_outputs.weight"), dev.tensor("qa_outputs.weight"))


@pytest.mark.cuda
@needs_gpu
def test_nonfinite_gradient_skips_the_step(rng):
    dev = random_model(tiny_config(), rng, device="cuda", precision="fp32", scale=0.1)
    batch = tiny_batch(rng)
    dev.zero_grad()
    dev.forward_backward(batch)
    before, after = dev.params.copy(), np.empty_like(dev.params)
    dev._pull("grads")
    dev.grads[7] = np.nan
    dev._engine.upload("grads", dev.grads)
    norm = dev.optimizer_step(1e-2)
    assert not np.isfinite(norm) and dev.step == 0
    dev._engine.download("params", after)
    np.testing.assert_array_equal(after, before)


@pytest.mark.cuda
@needs_gpu
def test_errors_name_the_cause(rng):
    dev = random_model(tiny_config(), rng, device="cuda", precision="bf16", scale=0.1)
    ids = np.ones((2, 5), np.int64)
    with pytest.raises(ValueError, match="input_ids holds 53"):
        dev.forward(ids * 53)
    with pytest.raises(ValueError, match="more than max_position_embeddings"):
        dev.forward(np.ones((1, 41), np.int64))
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        dev.forward(ids, attention_mask=ids * 2)
    # a device allocation that cannot succeed: the message names cudaMalloc, the error and file:line
    big = random_model(tiny_config(max_position_embeddings=512), rng, device="cuda", precision="fp32", scale=0.1)
    with pytest.raises(MemoryError, match=r"cudaMalloc\(.*bytes\) failed: out of memory .* at cuda/model\.cu:\d+"):
        big.forward(np.ones((40000, 512), np.int64))
    # and the engine still works afterwards
    start, _ = big.forward(ids)
    assert np.isfinite(start).all()
