"""Build of bertqa._C, the C compute core, and (when a CUDA toolkit is found) bertqa._cuda, the GPU backend,
with plain setuptools.

bertqa._cuda is a separate extension, so `import bertqa` and the CPU engine never need the CUDA libraries: the
package imports it only when device="cuda" is asked for. Its .cu files are compiled by nvcc (in parallel, for
sm_80 and sm_90 plus PTX for newer GPUs), its CPython glue (cuda/module.c, and csrc/pyargs.c and
csrc/engine_methods.c, the argument checks and Engine methods bertqa._C uses too) by the C compiler, and it links
the CUDA runtime statically and cuBLASLt/cuBLAS dynamically (rpath to the toolkit's lib64). The toolkit is
CUDA_HOME, else /usr/local/cuda, else the nvcc on PATH; a compile error fails the build.

Environment switches:
  BERTQA_SANITIZE=1    build with AddressSanitizer + UndefinedBehaviorSanitizer (see README: run the tests with
                       LD_PRELOAD of libasan, as tools/sanitize_tests.sh does)
  BERTQA_DEBUG=1       -O0 -g
  BERTQA_NATIVE=1      -march=native (a binary for this machine only; the default runs on any x86-64 with AVX2)
  BERTQA_SYSTEM_BLAS=1 link the system's cblas/openblas instead of the scipy-openblas32 wheel
  BERTQA_NO_CUDA=1     do not build bertqa._cuda even when a CUDA toolkit is found (sanitizer builds never do)
  BERTQA_CUDA_ARCHS    GPU targets for nvcc, default "80;90" (each as machine code; PTX of the last one too)
"""
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


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



# ---- the CUDA backend ------------------------------------------------------------------------------------------

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


def nvcc_flags():
    archs = [a.strip() for a in os.environ.get("BERTQA_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    flags = ["-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wall", "-lineinfo", "-Icsrc", "-Icuda",
             "--expt-relaxed-constexpr"]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]   # PTX: runs on newer GPUs too
    if env_flag("BERTQA_DEBUG"):
        flags += ["-O0", "-g"]
    else:
        flags += ["-O3"]
    return flags


class BuildExt(build_ext):
    """Compiles cuda/*.cu with nvcc into objects linked into bertqa._cuda; bertqa._C builds as before."""

    def build_extension(self, ext):
        if not getattr(ext, "cuda_sources", None):
            return super().build_extension(ext)
        ext.extra_objects = self.compile_cuda(ext)
        # csrc/pyargs.c and engine_methods.c are compiled into both extensions with each one's flags: keep the
        # two sets of objects apart
        build_temp, self.build_temp = self.build_temp, str(Path(self.build_temp) / "bertqa_cuda")
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = build_temp

    def compile_cuda(self, ext):
        home = ext.cuda_home
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        headers = [Path(p) for p in ext.depends if p.endswith((".h", ".cuh"))]
        newest_header = max((h.stat().st_mtime for h in headers), default=0)
        flags = nvcc_flags()
        jobs = []
        for src in ext.cuda_sources:
            obj = out_dir / (Path(src).stem + ".o")
            stale = (self.force or not obj.exists() or obj.stat().st_mtime < Path(src).stat().st_mtime
                     or obj.stat().st_mtime < newest_header)
            jobs.append((src, obj, stale))

        def run(job):
            src, obj, stale = job
            if not stale:
                return None
            cmd = [str(Path(home) / "bin" / "nvcc"), *flags, "-c", src, "-o", str(obj)]
            print(" ".join(cmd), flush=True)
            r = subprocess.run(cmd, capture_output=True, text=True)
            return (src, r.returncode, r.stdout + r.stderr)

        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            results = [r for r in pool.map(run, jobs) if r]
        failed = [r for r in results if r[1] != 0]
        for src, code, log in results:
            if log.strip():
                print(log, file=sys.stderr if code else sys.stdout, flush=True)
        if failed:
            raise RuntimeError("nvcc failed on " + ", ".join(src for src, _, _ in failed) +
                               " (set BERTQA_NO_CUDA=1 to build the CPU package alone)")
        return [str(obj) for _, obj, _ in jobs]


def nccl_include(home):
    """A folder with nccl.h, for the types cuda/nccl.c takes from it (it links no NCCL): the toolkit's include, else
    an nvidia-nccl wheel's on sys.path, else None (then nccl.c declares the few ABI-stable types itself)."""
    for d in [Path(home) / "include"] + [Path(p) / "nvidia" / "nccl" / "include" for p in sys.path if p]:
        if (d / "nccl.h").is_file():
            return str(d)
    return None


def cuda_extension(home):
    lib = Path(home) / ("lib64" if (Path(home) / "lib64").is_dir() else "lib")
    nccl_h = nccl_include(home)
    ext = Extension(
        "bertqa._cuda",
        # nccl.c dlopen()s libnccl at run time: no -lnccl; csrc/pyargs.c, csrc/engine_methods.c: the argument
        # checks and the Engine methods bertqa._C shares
        sources=["cuda/module.c", "cuda/nccl.c", "csrc/pyargs.c", "csrc/engine_methods.c"],
        depends=sorted(str(p) for p in list(Path("cuda").glob("*.cu")) + list(Path("cuda").glob("*.cuh")) +
                       list(Path("cuda").glob("*.h"))) +
                ["csrc/bertqa.h", "csrc/model.h", "csrc/pyargs.h", "csrc/engine_methods.h"],
        include_dirs=["cuda", "csrc", numpy.get_include(), str(Path(home) / "include")] + [nccl_h] * bool(nccl_h),
        library_dirs=[str(lib)],
        libraries=["cublasLt", "cublas", "cudart_static", "stdc++", "dl", "rt", "pthread", "m"],
        runtime_library_dirs=[str(lib)],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("BQ_ARRAY_API", "bertqa_cuda_ARRAY_API")] +
                      [("BERTQA_HAVE_NCCL_H", "1")] * bool(nccl_h),
        extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-Wno-missing-field-initializers"],
    )
    ext.cuda_sources = sorted(str(p) for p in Path("cuda").glob("*.cu"))
    ext.cuda_home = home
    return ext


extensions = [ext]
_cuda_home = cuda_home()
if _cuda_home:
    extensions.append(cuda_extension(_cuda_home))

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
