"""Builds bertqa._cuda for the CPU emulator: the CUDA backend's own code (cuda/*.cu, module.c, nccl.c and the
csrc/ files the real extension links) compiled by the host compiler against the real CUDA headers, with
cuda/emu/runtime.cpp in place of libcudart, libcublas and libcublasLt. No GPU, driver or nvcc is needed, only the
toolkit's headers. cuDNN is left out (BERTQA_HAVE_CUDNN unset), as in a build without cuDNN: attention runs the
backend's own kernels.

    python cuda/emu/build.py [--out DIR] [--debug] [--asan] [--selftest]

writes DIR/_cuda<EXT_SUFFIX> (default build/cuda-emu/) and prints its path. Load it with
BERTQA_CUDA_EXTENSION=<that path> (bertqa/cuda.py), e.g. `BERTQA_CUDA_EXTENSION=... pytest -m cuda tests/test_cuda.py`;
tests/test_cuda_emu.py does both.

The only change made to the sources is the launch syntax, which a host compiler does not parse:
`kernel<T><<<grid, block, smem, stream>>>(args);` becomes
`bq_emu_launch(dim3(grid), dim3(block), smem, stream, "kernel<T>", [=]() { kernel<T>(args); });`.
Objects are rebuilt only when their source or a header changed (by content hash).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "buildtools"))
from bertqa_build import cuda_home  # noqa: E402


class LaunchSyntaxError(ValueError):
    pass


def _matching(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes text[i] (== open_), skipping nested brackets and string literals."""
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c in "\"'":
            q, j = c, j + 1
            while text[j] != q:
                j += 2 if text[j] == "\\" else 1
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                if c != close:
                    raise LaunchSyntaxError(f"unbalanced {open_}{close} at offset {i}")
                return j + 1
        j += 1
    raise LaunchSyntaxError(f"no closing {close} for offset {i}")


def _split_top(args: str) -> list[str]:
    """Split on the commas outside brackets (template angle brackets are not tracked: launch configurations with a
    template argument list containing commas must be parenthesised)."""
    out, depth, cur = [], 0, []
    for c in args:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    out.append("".join(cur).strip())
    return out


def rewrite_launches(text: str, name: str = "<source>") -> tuple[str, int]:
    """(the text with every <<<...>>> launch rewritten, how many there were)."""
    out, pos, count = [], 0, 0
    while True:
        i = text.find("<<<", pos)
        if i < 0:
            out.append(text[pos:])
            return "".join(out), count
        # the kernel expression: an identifier with optional ::, and a template argument list <...>
        k = i
        if text[k - 1] == ">":
            depth = 0
            while True:
                k -= 1
                if text[k] == ">":
                    depth += 1
                elif text[k] == "<":
                    depth -= 1
                    if depth == 0:
                        break
        while k > 0 and (text[k - 1].isalnum() or text[k - 1] in "_:"):
            k -= 1
        kernel = text[k:i].strip()
        j = text.find(">>>", i)
        if not kernel or j < 0:
            raise LaunchSyntaxError(f"{name}: cannot parse the launch at offset {i}")
        config = _split_top(text[i + 3:j])
        if not 2 <= len(config) <= 4:
            raise LaunchSyntaxError(f"{name}: launch of {kernel} has {len(config)} configuration arguments")
        config += ["0", "0"][: 4 - len(config)]
        p = j + 3
        while text[p].isspace():
            p += 1
        if text[p] != "(":
            raise LaunchSyntaxError(f"{name}: launch of {kernel}: no argument list")
        end = _matching(text, p, "(", ")")
        args = text[p + 1:end - 1]
        grid, block, smem, stream = config
        out.append(text[pos:k])
        breaks = "\n" * text.count("\n", k, p)   # the configuration's line breaks: the lines after keep their numbers
        out.append(f"bq_emu_launch(dim3({grid}), dim3({block}), {smem}, {stream}, \"{kernel}\",{breaks or ' '}"
                   f"[=]() {{ {kernel}({args}); }})")
        pos, count = end, count + 1


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
        h.update(b"\0")
    return h.hexdigest()[:20]


def build(out_dir: Path, debug: bool = False, asan: bool = False, selftest: bool = False, jobs: int | None = None,
          log=print) -> Path:
    """Compiles what changed and links; returns the extension's path (selftest: the self-test program's)."""
    home = cuda_home() or os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    inc = Path(home) / "include"
    if not (inc / "cublasLt.h").is_file():
        raise RuntimeError(f"the CUDA emulator needs the CUDA toolkit's headers (cublasLt.h): not found under {inc}; "
                           "set CUDA_HOME")
    import numpy
    out_dir = Path(out_dir)
    obj_dir = out_dir / ("obj-selftest" if selftest else "obj")
    src_dir = out_dir / "src"
    obj_dir.mkdir(parents=True, exist_ok=True)
    src_dir.mkdir(parents=True, exist_ok=True)

    opt = ["-O0", "-g"] if debug else ["-O2", "-g1"]
    san = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    common = ["-fPIC", "-Wall", "-Wno-unused-function", "-Wno-unused-variable", *opt, *san,
              f"-I{REPO / 'cuda'}", f"-I{REPO / 'csrc'}", f"-I{inc}", f"-I{numpy.get_include()}",
              f"-I{sysconfig.get_paths()['include']}",
              "-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION", "-DBQ_ARRAY_API=bertqa_cuda_ARRAY_API", "-DBQ_CUDA_EMU=1"]
    if (inc / "nccl.h").is_file():
        common.append("-DBERTQA_HAVE_NCCL_H=1")
    cxx_plain = [os.environ.get("CXX", "g++"), "-std=c++17", *common, "-Wno-unknown-pragmas"]   # the emulator's own
    cxx = [*cxx_plain, "-include", str(REPO / "cuda/emu/bq_emu.h")]                             # the .cu files
    cc = [os.environ.get("CC", "gcc"), "-std=c11", *common, "-Wno-unused-parameter",
          "-Wno-missing-field-initializers"]

    headers = sorted(list((REPO / "cuda").glob("*.h")) + list((REPO / "cuda").glob("*.cuh")) +
                     list((REPO / "csrc").glob("*.h")) + [REPO / "cuda/emu/bq_emu.h"])
    header_key = _digest(*(h.read_bytes() for h in headers))

    jobs_list = []
    sources = [REPO / "cuda/emu/selftest.cu"] if selftest else sorted((REPO / "cuda").glob("*.cu"))
    for cu in sources:
        text, n = rewrite_launches(cu.read_text(), cu.name)
        src = src_dir / (cu.stem + ".cpp")
        header = f'#line 1 "{cu.relative_to(REPO)}"\n'   # the path nvcc sees (setup.py compiles from the root)
        if not src.exists() or src.read_text() != header + text:
            src.write_text(header + text)
        jobs_list.append((cxx, src, obj_dir / (cu.stem + ".o")))
    c_sources = ["cuda/emu/builtins.c"] if selftest else ["cuda/module.c", "cuda/nccl.c", "csrc/pyargs.c",
                                                          "csrc/engine_methods.c", "cuda/emu/builtins.c"]
    for c in c_sources:
        jobs_list.append((cc, Path(c), obj_dir / (Path(c).stem + ("_emu" if "emu" in c else "") + ".o")))
    jobs_list.append((cxx_plain, REPO / "cuda/emu/runtime.cpp", obj_dir / "runtime_emu.o"))

    def compile_one(job):
        cmd, src, obj = job
        key = _digest(" ".join(map(str, cmd)).encode(), (REPO / src).read_bytes(), header_key.encode())
        stamp = obj.with_suffix(".key")
        if obj.exists() and stamp.exists() and stamp.read_text() == key:
            return None
        tmp = obj.resolve().with_suffix(f".o.{os.getpid()}.tmp")   # two builds at once never see half an object
        r = subprocess.run([*map(str, cmd), "-c", str(src), "-o", str(tmp)], capture_output=True, text=True, cwd=REPO)
        if r.returncode == 0:
            os.replace(tmp, obj)
            stamp.write_text(key)
        else:
            tmp.unlink(missing_ok=True)
        return src, r.returncode, r.stdout + r.stderr

    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        results = [r for r in pool.map(compile_one, jobs_list) if r]
    failed = [r for r in results if r[1]]
    for src, code, text in results:
        if text.strip():
            log(f"--- {src}\n{text}")
    if failed:
        raise RuntimeError("the CUDA emulator build failed on " + ", ".join(str(s) for s, _, _ in failed))
    target = out_dir / ("selftest" if selftest else "_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    link = [os.environ.get("CXX", "g++"), *([] if selftest else ["-shared"]), *san, "-o", str(target) + ".tmp",
            *(str(o) for _, _, o in jobs_list), "-ldl", "-lpthread", "-lm"]
    r = subprocess.run(link, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"the CUDA emulator link failed:\n{r.stdout}{r.stderr}")
    os.replace(str(target) + ".tmp", target)
    return target


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "build" / "cuda-emu"))
    ap.add_argument("--debug", action="store_true", help="-O0 -g")
    ap.add_argument("--asan", action="store_true", help="AddressSanitizer (run with LD_PRELOAD=$(gcc -print-file-name=libasan.so))")
    ap.add_argument("--selftest", action="store_true", help="the emulator's self-test program (cuda/emu/selftest.cu)")
    a = ap.parse_args(argv)
    try:
        print(build(Path(a.out), debug=a.debug, asan=a.asan, selftest=a.selftest,
                    log=lambda s: print(s, file=sys.stderr)))
    except (RuntimeError, LaunchSyntaxError) as e:
        sys.exit(f"cuda/emu/build.py: {e}")


if __name__ == "__main__":
    main()
