"""Build of bertqa._C, the C compute core, with plain setuptools.

Environment switches:
  BERTQA_SANITIZE=1    build with AddressSanitizer + UndefinedBehaviorSanitizer (see README: run the tests with
                       LD_PRELOAD of libasan, as tools/sanitize_tests.sh does)
  BERTQA_DEBUG=1       -O0 -g
  BERTQA_NATIVE=1      -march=native (a binary for this machine only; the default runs on any x86-64 with AVX2)
  BERTQA_SYSTEM_BLAS=1 link the system's cblas/openblas instead of the scipy-openblas32 wheel
"""
import os
import platform
import sys
from pathlib import Path

import numpy
from setuptools import Extension, setup


def env_flag(name):
    return os.environ.get(name, "").strip() not in ("", "0", "false", "no")


def blas_config():
    """Include/lib dirs and macros for the BLAS: OpenBLAS from the scipy-openblas32 wheel by default (the
    same build NumPy and SciPy ship, so users need no system package)."""
    if env_flag("BERTQA_SYSTEM_BLAS"):
        return dict(include_dirs=["/usr/include/x86_64-linux-gnu/openblas-pthread", "/usr/include/openblas"],
                    library_dirs=[], libraries=["openblas"], define_macros=[("BERTQA_SYSTEM_BLAS", "1")],
                    runtime_library_dirs=[])
    import scipy_openblas32

    return dict(include_dirs=[scipy_openblas32.get_include_dir()], library_dirs=[scipy_openblas32.get_lib_dir()],
                libraries=[scipy_openblas32.get_library()], define_macros=[],
                # At run time bertqa preloads the library from the installed wheel (bertqa/_core.py); this rpath
                # covers the usual layout where both packages sit in the same site-packages.
                runtime_library_dirs=["$ORIGIN/../scipy_openblas32/lib"])


def compile_flags():
    cflags = ["-std=c11", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
              "-fno-strict-aliasing"]
    ldflags = ["-fopenmp"]
    if env_flag("BERTQA_DEBUG") or env_flag("BERTQA_SANITIZE"):
        cflags += ["-O1" if env_flag("BERTQA_SANITIZE") else "-O0", "-g", "-fno-omit-frame-pointer"]
    else:
        cflags += ["-O3"]
    if env_flag("BERTQA_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        cflags += san
        ldflags += san
    if platform.machine().lower() in ("x86_64", "amd64"):
        # AVX2 + FMA is the floor (Haswell, 2013, and every cloud x86 since); faster paths come from the BLAS,
        # which picks its kernels at run time.
        cflags += ["-march=native"] if env_flag("BERTQA_NATIVE") else ["-mavx2", "-mfma", "-mf16c"]
    return cflags, ldflags


blas = blas_config()
cflags, ldflags = compile_flags()
sources = sorted(str(p) for p in Path("csrc").glob("*.c"))

ext = Extension(
    "bertqa._C",
    sources=sources,
    depends=sorted(str(p) for p in Path("csrc").glob("*.h")),
    include_dirs=["csrc", numpy.get_include()] + blas["include_dirs"],
    library_dirs=blas["library_dirs"],
    libraries=blas["libraries"] + ["m"],
    runtime_library_dirs=blas["runtime_library_dirs"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")] + blas["define_macros"],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
)

setup(ext_modules=[ext])
