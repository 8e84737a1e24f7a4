"""Where the build finds the CUDA toolkit, cuDNN and the cudnn-frontend headers, shared by setup.py and the
PEP 517 build backend that pyproject.toml names (this module: setuptools' own backend, plus one hook).

The hook: cuDNN's fused attention (cuda/cudnn_attention.cu) is written with NVIDIA's header-only cudnn-frontend,
which comes from the `nvidia-cudnn-frontend` wheel. The backend asks pip for it only where it will be used (a CUDA
toolkit and a cuDNN 9 found, BERTQA_NO_CUDA / BERTQA_NO_CUDNN unset, no headers given by CUDNN_FRONTEND_INCLUDE),
so a CPU-only install never downloads it. Offline: `pip download -d wheels/ setuptools wheel numpy
scipy-openblas32 nvidia-cudnn-frontend` once, then `pip install --no-index --find-links wheels/ .`.

The build cache (buildtools/build_cache.py, used by setup.py) is on for editable installs (`pip install -e .`,
which a developer re-runs) and `setup.py build_ext`; a wheel build (`pip install .`, `pip wheel .`, the Docker
images) keeps no objects in ~/.cache unless BERTQA_BUILD_CACHE names a folder.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the PEP 517 hooks this module does not change)

CUDNN_FRONTEND_REQUIREMENT = "nvidia-cudnn-frontend>=1.10"


def env_flag(name):
    return os.environ.get(name, "").strip() not in ("", "0", "false", "no")


def cuda_home():
    """The CUDA toolkit to build with, or None (then only the CPU package is built): also None without the cuda/
    sources (a copy of the CPU core alone, as tests/sanitize.sh makes) and for sanitizer builds (BERTQA_SANITIZE
    instruments the CPU core; the CUDA runtime does not run under ASan's default shadow layout)."""
    if env_flag("BERTQA_NO_CUDA") or env_flag("BERTQA_SANITIZE") or not Path("cuda", "module.c").is_file():
        return None
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / "include" / "cublasLt.h").is_file():
            return home
    return None


def cudnn_paths(home):
    """(include dir, lib dir, link flag) of a cuDNN 9 (the graph API: cudnn_graph.h), or None. Looked for in
    CUDNN_HOME, the toolkit, an nvidia-cudnn-cu* wheel on sys.path (PyTorch's), then /usr; BERTQA_NO_CUDNN=1: None."""
    if env_flag("BERTQA_NO_CUDNN"):
        return None
    roots = [os.environ.get("CUDNN_HOME"), home] + [str(Path(p) / "nvidia" / "cudnn") for p in sys.path if p] + ["/usr"]
    for root in filter(None, roots):
        inc = [d for d in (Path(root) / "include", Path(root) / "include" / "x86_64-linux-gnu")
               if (d / "cudnn_graph.h").is_file()]
        if not inc:
            continue
        for lib in (Path(root) / "lib64", Path(root) / "lib", Path(root) / "lib" / "x86_64-linux-gnu"):
            if (lib / "libcudnn.so").exists():
                return str(inc[0]), str(lib), "-lcudnn"
            if (lib / "libcudnn.so.9").exists():   # the wheels ship the versioned name only
                return str(inc[0]), str(lib), "-l:libcudnn.so.9"
    return None


def cudnn_frontend_include():
    """A folder holding cudnn_frontend.h: CUDNN_FRONTEND_INCLUDE, else the nvidia-cudnn-frontend wheel's (its
    headers install into <site-packages>/include), else None."""
    given = os.environ.get("CUDNN_FRONTEND_INCLUDE")
    if given:
        return given if (Path(given) / "cudnn_frontend.h").is_file() else None
    for p in sys.path:
        if p and (Path(p) / "include" / "cudnn_frontend.h").is_file():
            return str(Path(p) / "include")
    return None


def _extra_requires():
    home = cuda_home()
    if home and cudnn_paths(home) and not os.environ.get("CUDNN_FRONTEND_INCLUDE"):
        return [CUDNN_FRONTEND_REQUIREMENT]
    return []


def _listing(hook, config_settings):
    """setuptools' hook runs setup.py, before the frontend is installed: setup.py then keeps its notice to itself."""
    os.environ["BERTQA_LISTING_BUILD_REQUIRES"] = "1"
    try:
        return hook(config_settings) + _extra_requires()
    finally:
        del os.environ["BERTQA_LISTING_BUILD_REQUIRES"]


def get_requires_for_build_wheel(config_settings=None):
    return _listing(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _listing(_setuptools.get_requires_for_build_editable, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    given = os.environ.get("BERTQA_BUILD_CACHE")
    if given is None:
        os.environ["BERTQA_BUILD_CACHE"] = "0"
    try:
        return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    finally:
        if given is None:
            del os.environ["BERTQA_BUILD_CACHE"]

