"""The compiled-object cache of the build (buildtools/build_cache.py, issue 21): an unchanged source reuses its
object, and any change of the source, a header it includes, a header that newly shadows one, the flags or the
compiler's environment compiles again. Run on small C files with the system's C compiler (and nvcc where found)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "buildtools"))
from build_cache import ObjectCache, key_arguments, parse_depfile  # noqa: E402

CC = shutil.which("gcc") or shutil.which("cc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler")


class Project:
    """src/main.c including inc/value.h; build(flags) makes the object through the cache, counting compiles."""

    def __init__(self, root: Path):
        self.root = root
        (root / "src").mkdir()
        (root / "inc").mkdir()
        (root / "shadow").mkdir()
        (root / "src" / "main.c").write_text('#include "value.h"\nint value(void) { return VALUE; }\n')
        (root / "inc" / "value.h").write_text("#define VALUE 1\n")
        self.cache = ObjectCache(root / "cache", log=lambda line: None)
        self.compiles = 0

    def build(self, flags=("-O2",), include=("inc",), out="build/main.o") -> bytes:
        obj = str(self.root / out)
        Path(obj).parent.mkdir(parents=True, exist_ok=True)
        incs = [f"-I{self.root / d}" for d in include]
        src = str(self.root / "src" / "main.c")
        cmd = [CC, *flags, *incs, "-c", src, "-o", obj]

        def run():
            self.compiles += 1
            subprocess.run(cmd, check=True)

        self.cache.compile(cmd, src, obj, run, [CC, *flags, *incs, "-c", src, "-M", "-MF", "{depfile}"])
        return Path(obj).read_bytes()

    def value(self, obj: bytes) -> int:
        """What value() returns in this object: link it with a main and run it."""
        o = self.root / "probe.o"
        o.write_bytes(obj)
        (self.root / "probe_main.c").write_text(
            "int value(void);\nint main(void) { return value(); }\n")
        exe = self.root / "probe"
        subprocess.run([CC, str(self.root / "probe_main.c"), str(o), "-o", str(exe)], check=True)
        return subprocess.run([str(exe)]).returncode


@pytest.fixture
def project(tmp_path):
    return Project(tmp_path)


def test_unchanged_source_reuses_the_object(project):
    first = project.build()
    assert project.compiles == 1 and project.cache.misses == 1
    # another (temporary) build folder each time, as pip's builds have
    again = project.build(out="other-build/main.o")
    assert project.compiles == 1 and project.cache.hits == 1
    assert again == first and project.value(again) == 1


def test_include_folders_are_not_part_of_the_key_but_what_they_resolve_to_is(project):
    project.build()
    moved = project.root / "inc-moved"
    shutil.copytree(project.root / "inc", moved)   # a new temporary folder holding the same header
    project.build(include=("inc-moved",))
    assert project.compiles == 1
    (moved / "value.h").write_text("#define VALUE 5\n")
    assert project.value(project.build(include=("inc-moved",))) == 5 and project.compiles == 2


def test_a_changed_header_compiles_again(project):
    project.build()
    header = project.root / "inc" / "value.h"
    stat = header.stat()
    header.write_text("#define VALUE 2\n")
    os.utime(header, ns=(stat.st_atime_ns, stat.st_mtime_ns))   # same size and time: content decides
    obj = project.build()
    assert project.compiles == 2 and project.value(obj) == 2
    header.write_text("#define VALUE 1\n")   # back to the first content: its object again, from the cache
    assert project.value(project.build()) == 1 and project.compiles == 2


def test_a_header_nested_deeper_compiles_again(project):
    (project.root / "inc" / "value.h").write_text('#include "deep.h"\n')
    (project.root / "inc" / "deep.h").write_text("#define VALUE 3\n")
    assert project.value(project.build()) == 3
    (project.root / "inc" / "deep.h").write_text("#define VALUE 4\n")
    assert project.value(project.build()) == 4 and project.compiles == 2


def test_a_new_header_that_shadows_the_old_one_compiles_again(project):
    project.build(include=("shadow", "inc"))
    (project.root / "shadow" / "value.h").write_text("#define VALUE 7\n")
    assert project.value(project.build(include=("shadow", "inc"))) == 7 and project.compiles == 2


def test_a_changed_source_flags_or_environment_compile_again(project, monkeypatch):
    project.build()
    (project.root / "src" / "main.c").write_text('#include "value.h"\nint value(void) { return VALUE + 10; }\n')
    assert project.value(project.build()) == 11 and project.compiles == 2
    project.build(flags=("-O0",))
    assert project.compiles == 3
    project.build(flags=("-O0", "-DEXTRA=1"))
    assert project.compiles == 4
    monkeypatch.setenv("CPATH", str(project.root / "shadow"))
    project.build(flags=("-O0", "-DEXTRA=1"))
    assert project.compiles == 5


def test_a_failed_compile_stores_nothing(project):
    (project.root / "src" / "main.c").write_text('#include "value.h"\nint value(void) { return VALUE }\n')
    with pytest.raises(subprocess.CalledProcessError):
        project.build()
    assert not list((project.root / "cache").glob("*/*.o"))


def test_off_and_prune(project, monkeypatch):
    monkeypatch.setenv("BERTQA_BUILD_CACHE", "0")
    assert not ObjectCache.from_environment().enabled
    monkeypatch.setenv("BERTQA_BUILD_CACHE", str(project.root / "elsewhere"))
    assert ObjectCache.from_environment().root == project.root / "elsewhere"
    project.build()
    project.build(flags=("-O0",))
    entries = sorted((project.root / "cache").glob("*/*.o"), key=lambda p: p.stat().st_mtime)
    assert len(entries) == 2
    os.utime(entries[0], (1, 1))   # unused for longest
    project.cache.limit_bytes = entries[1].stat().st_size
    project.cache.prune()
    assert [p.exists() for p in entries] == [False, True]


def test_parse_depfile_and_key_arguments():
    assert parse_depfile("main.o: src/main.c /usr/include/a\\ b.h \\\n  inc/value.h\n") == \
        ["src/main.c", "/usr/include/a b.h", "inc/value.h"]
    assert parse_depfile("x.o : x.cu \\\n    /usr/local/cuda/include/cuda_runtime.h\n") == \
        ["x.cu", "/usr/local/cuda/include/cuda_runtime.h"]
    cmd = ["gcc", "-O2", "-I", "/tmp/a", "-I/tmp/b", "-isystem", "/tmp/c", "-c", "m.c", "-o", "/tmp/t/m.o", "-fopenmp"]
    assert key_arguments(cmd, "/tmp/t/m.o") == ["-O2", "-c", "m.c", "-fopenmp"]


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file(),
                    reason="no nvcc")
def test_nvcc_objects(tmp_path):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    (tmp_path / "k.cuh").write_text("#define SCALE 2.0f\n")
    src = tmp_path / "k.cu"
    src.write_text('#include "k.cuh"\n__global__ void scale(float *x) { x[threadIdx.x] *= SCALE; }\n')
    cache = ObjectCache(tmp_path / "cache", log=lambda line: None)
    compiles = []

    def build():
        obj = str(tmp_path / "k.o")
        flags = [f"-I{tmp_path}", "-gencode", "arch=compute_80,code=sm_80"]
        cmd = [nvcc, *flags, "-c", str(src), "-o", obj]
        cache.compile(cmd, str(src), obj, lambda: compiles.append(subprocess.run(cmd, check=True)),
                      [nvcc, *flags, "-M", str(src)], tools=[[nvcc], ["gcc"]])

    build()
    build()
    assert len(compiles) == 1
    (tmp_path / "k.cuh").write_text("#define SCALE 3.0f\n")
    build()
    assert len(compiles) == 2


def test_wheel_builds_keep_no_objects_unless_told(monkeypatch):
    """pip install . / pip wheel . (the Docker images) leave nothing in ~/.cache; pip install -e . uses the cache."""
    import bertqa_build

    seen = []
    monkeypatch.setattr(bertqa_build._setuptools, "build_wheel",
                        lambda *a: seen.append(os.environ.get("BERTQA_BUILD_CACHE")) or "x.whl")
    monkeypatch.delenv("BERTQA_BUILD_CACHE", raising=False)
    assert bertqa_build.build_wheel("dist") == "x.whl" and seen == ["0"]
    assert "BERTQA_BUILD_CACHE" not in os.environ
    monkeypatch.setenv("BERTQA_BUILD_CACHE", "/tmp/objects")
    bertqa_build.build_wheel("dist")
    assert seen[-1] == "/tmp/objects" and bertqa_build.build_editable is bertqa_build._setuptools.build_editable
