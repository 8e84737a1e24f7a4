"""Loads the C extension bertqa._C after its BLAS.

The extension links OpenBLAS from the scipy-openblas32 wheel. Wheels install into site-packages at paths no
build can know, so the library is loaded here first, by its absolute path, with RTLD_GLOBAL; the dynamic
loader then satisfies the extension's dependency on it by its soname.
"""
import ctypes
import os

# OpenMP threads that wait for work sleep instead of spinning, unless the user chose otherwise. Spinning wins
# a few microseconds per parallel region on an idle machine, but as soon as another busy process shares the
# cores (a second server worker, a data loader, a notebook kernel) spinning threads steal the time slices the
# working threads need, and a forward pass gets up to 10x slower (measured: BENCHMARKS.md). libgomp reads
# this once, when the extension below loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _preload_blas():
    try:
        import scipy_openblas32
    except ImportError:  # built with BERTQA_SYSTEM_BLAS, or the rpath finds it
        return
    path = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True))
    # OpenBLAS runs single-threaded inside bertqa's OpenMP threads (csrc/threads.c); with this set while the
    # library initialises it never starts the worker pool whose idle threads would poll beside ours. Other
    # libraries loaded later see the user's own setting again.
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    finally:
        if saved is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved


_preload_blas()

try:
    from bertqa import _C  # noqa: E402
except ImportError as e:  # pragma: no cover - what a user sees with a broken install
    raise ImportError(
        f"bertqa's C extension could not be loaded ({e}). Build it with `pip install -e .` from the source "
        "checkout, or reinstall bertqa."
    ) from e

__all__ = ["_C"]
