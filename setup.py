"""Build of bertqa._C, the C compute core, and (when a CUDA toolkit is found) bertqa._cuda, the GPU backend,
with plain setuptools.

bertqa._cuda is a separate extension, so `import bertqa` and the CPU engine never need the CUDA libraries: the
package imports it only when device="cuda" is asked for. Its .cu files are compiled by nvcc (in parallel, for
sm_80 and sm_90 plus PTX for newer GPUs), its CPython glue (cuda/module.c, and csrc/pyargs.c and
csrc/engine_methods.c, the argument checks and Engine methods bertqa._C uses too) by the C compiler, and it links
the CUDA runtime statically and cuBLASLt/cuBLAS dynamically (rpath to the toolkit's lib64). The toolkit is
CUDA_HOME, else /usr/local/cuda, else the nvcc on PATH; a compile error fails the build. Where a cuDNN 9 and the
cudnn-frontend headers are found too (buildtools/bertqa_build.py, which also makes pip fetch the
nvidia-cudnn-frontend wheel for such builds), bertqa._cuda links libcudnn and runs attention through cuDNN's fused
scaled-dot-product attention (cuda/cudnn_attention.cu); without them it is built with its own attention kernels
only, and says so.

Environment switches:
  BERTQA_SANITIZE=1    build with AddressSanitizer + UndefinedBehaviorSanitizer (see README: run the tests with
                       LD_PRELOAD of libasan, as tools/sanitize_tests.sh does)
  BERTQA_DEBUG=1       -O0 -g
  BERTQA_NATIVE=1      -march=native (a binary for this machine only; the default runs on any x86-64 with AVX2)
  BERTQA_SYSTEM_BLAS=1 link the system's cblas/openblas instead of the scipy-openblas32 wheel
  BERTQA_NO_CUDA=1     do not build bertqa._cuda even when a CUDA toolkit is found (sanitizer builds never do)
  BERTQA_CUDA_ARCHS    GPU targets for nvcc, default "80;90" (each as machine code; PTX of the last one too)
  BERTQA_NO_CUDNN=1    build bertqa._cuda without cuDNN
  CUDNN_HOME           a cuDNN install (include/, lib64/ or lib/) to use before the toolkit's and PyTorch's wheel's
  CUDNN_FRONTEND_INCLUDE  a folder with cudnn_frontend.h (else the nvidia-cudnn-frontend wheel's on sys.path)
  BERTQA_BUILD_CACHE   where compiled objects are kept for the next build (default ~/.cache/bertqa/build; 0: off):
                       an object is reused only when its source, every header it includes, the command
                       line and the compiler are the same (buildtools/build_cache.py)
"""
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent / "buildtools"))
from bertqa_build import cuda_home, cudnn_frontend_include, cudnn_paths, env_flag  # noqa: E402
from build_cache import ObjectCache  # noqa: E402


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

def nvcc_flags(extra=()):
    archs = [a.strip() for a in os.environ.get("BERTQA_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    flags = ["-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wall", "-lineinfo", "-Icsrc", "-Icuda",
             "--expt-relaxed-constexpr", *extra]
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]   # PTX: runs on newer GPUs too
    if env_flag("BERTQA_DEBUG"):
        flags += ["-O0", "-g"]
    else:
        flags += ["-O3"]
    return flags


class BuildExt(build_ext):
    """Compiles cuda/*.cu with nvcc into objects linked into bertqa._cuda; bertqa._C builds as before. Every C and
    CUDA object goes through the build cache (buildtools/build_cache.py): pip builds in a new temporary folder each
    time, so without it a re-install of an unchanged tree compiled everything again."""

    def build_extensions(self):
        self.object_cache = ObjectCache.from_environment(log=lambda line: print(line, flush=True))
        self._cache_c_objects()
        try:
            super().build_extensions()
        finally:
            print(self.object_cache.summary(), flush=True)
            self.object_cache.prune()

    def _cache_c_objects(self):
        """Route the C compiler's per-object step (distutils' _compile) through the cache."""
        compiler, cache = self.compiler, self.object_cache
        compile_one = getattr(compiler, "_compile", None)
        if not cache.enabled or compile_one is None or not hasattr(compiler, "compiler_so"):
            return

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if not src.endswith(".c"):
                return compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts)
            cmd = [*compiler.compiler_so, *cc_args, src, "-o", obj, *extra_postargs]
            deps_cmd = [*compiler.compiler_so, *cc_args, src, *extra_postargs, "-M", "-MF", "{depfile}"]
            cache.compile(cmd, src, obj, lambda: compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts),
                          deps_cmd)

        compiler._compile = _compile

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
        headers = [p for p in ext.depends if p.endswith((".h", ".cuh"))]
        newest_header = max((Path(h).stat().st_mtime for h in headers), default=0)
        flags = nvcc_flags(getattr(ext, "nvcc_extra", ()))
        jobs = []
        for src in ext.cuda_sources:
            obj = out_dir / (Path(src).stem + ".o")
            stale = (self.force or not obj.exists() or obj.stat().st_mtime < Path(src).stat().st_mtime
                     or obj.stat().st_mtime < newest_header)
            jobs.append((src, obj, stale))

        nvcc = str(Path(home) / "bin" / "nvcc")
        cache = getattr(self, "object_cache", None) or ObjectCache(None)

        def run(job):
            src, obj, stale = job
            if not stale:
                return None
            cmd = [nvcc, *flags, "-c", src, "-o", str(obj)]
            result = []

            def compile_():
                print(" ".join(cmd), flush=True)
                r = subprocess.run(cmd, capture_output=True, text=True)
                result.append((src, r.returncode, r.stdout + r.stderr))
                if r.returncode:
                    raise _CompileFailed()   # nothing is stored

            try:
                # nvcc -M lists the host pass's includes; the project's headers (ext.depends) go into the key too
                cache.compile(cmd, src, str(obj), compile_, [nvcc, *flags, "-M", src],
                              tools=[[nvcc], ["gcc"], ["g++"]], extra_inputs=headers)
            except _CompileFailed:
                pass
            return result[0] if result else None

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


class _CompileFailed(Exception):
    """nvcc failed on a source (its output is reported with the others')."""


def nccl_include(home):
    """A folder with nccl.h, for the types cuda/nccl.c takes from it (it links no NCCL): the toolkit's include, else
    an nvidia-nccl wheel's on sys.path, else None (then nccl.c declares the few ABI-stable types itself)."""
    for d in [Path(home) / "include"] + [Path(p) / "nvidia" / "nccl" / "include" for p in sys.path if p]:
        if (d / "nccl.h").is_file():
            return str(d)
    return None


def cudnn_config(home):
    """nvcc flags, library dir and link flag for cuDNN's fused attention, or None (with the reason printed): the
    engine then runs its own attention kernels only."""
    cudnn = cudnn_paths(home)
    fe = cudnn_frontend_include()
    if not cudnn or not fe:
        missing = ("cuDNN 9 (cudnn_graph.h + libcudnn; CUDNN_HOME)" if not cudnn else
                   "cudnn-frontend headers (pip install nvidia-cudnn-frontend, or CUDNN_FRONTEND_INCLUDE)")
        # (quiet while pip only asks which build requirements there are: the frontend is not installed yet then)
        if not env_flag("BERTQA_NO_CUDNN") and not env_flag("BERTQA_LISTING_BUILD_REQUIRES"):
            print(f"bertqa: building bertqa._cuda without cuDNN's fused attention: no {missing}", flush=True)
        return None
    inc, lib, link = cudnn
    print(f"bertqa: cuDNN's fused attention: cuDNN from {inc}, {lib}; cudnn-frontend from {fe}", flush=True)
    # CUDNN_FRONTEND_SKIP_JSON_LIB: no nlohmann/json (graph serialisation, unused here), a much shorter compile
    # (-diag-suppress=128: an unreachable loop inside the frontend's own headers)
    return dict(nvcc=["-DBERTQA_HAVE_CUDNN", "-DCUDNN_FRONTEND_SKIP_JSON_LIB", "-diag-suppress=128", "-I" + inc,
                      "-I" + fe], lib=lib,
                link=link)


def cuda_extension(home):
    lib = Path(home) / ("lib64" if (Path(home) / "lib64").is_dir() else "lib")
    nccl_h = nccl_include(home)
    cudnn = cudnn_config(home)
    ext = Extension(
        "bertqa._cuda",
        # nccl.c dlopen()s libnccl at run time: no -lnccl; csrc/pyargs.c, csrc/engine_methods.c: the argument
        # checks and the Engine methods bertqa._C shares
        sources=["cuda/module.c", "cuda/nccl.c", "csrc/pyargs.c", "csrc/engine_methods.c"],
        depends=sorted(str(p) for p in list(Path("cuda").glob("*.cu")) + list(Path("cuda").glob("*.cuh")) +
                       list(Path("cuda").glob("*.h"))) +
                ["csrc/bertqa.h", "csrc/model.h", "csrc/pyargs.h", "csrc/engine_methods.h"],
        include_dirs=["cuda", "csrc", numpy.get_include(), str(Path(home) / "include")] + [nccl_h] * bool(nccl_h),
        library_dirs=[str(lib)] + ([cudnn["lib"]] if cudnn else []),
        libraries=["cublasLt", "cublas", "cudart_static", "stdc++", "dl", "rt", "pthread", "m"],
        runtime_library_dirs=[str(lib)] + ([cudnn["lib"]] if cudnn and cudnn["lib"] != str(lib) else []),
        # cudnn-frontend's experimental engines call NVRTC (the toolkit's runtime compiler) too
        extra_link_args=[cudnn["link"], "-lnvrtc"] if cudnn else [],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("BQ_ARRAY_API", "bertqa_cuda_ARRAY_API")] +
                      [("BERTQA_HAVE_NCCL_H", "1")] * bool(nccl_h),
        extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-Wno-missing-field-initializers"],
    )
    ext.cuda_sources = sorted(str(p) for p in Path("cuda").glob("*.cu"))
    ext.cuda_home = home
    ext.nvcc_extra = cudnn["nvcc"] if cudnn else []
    ext.has_cudnn = bool(cudnn)
    return ext


extensions = [ext]
_cuda_home = cuda_home()
if _cuda_home:
    extensions.append(cuda_extension(_cuda_home))

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
