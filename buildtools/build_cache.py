"""A cache of compiled objects, so that re-running `pip install -e .` on an unchanged tree links in seconds.

Why it is needed: pip builds in a fresh isolated environment and setuptools' editable build in a fresh temporary
build folder each time, so nothing of the previous build is there to compare timestamps with, and every C and CUDA
file was compiled again (about 5 minutes on 2 cores with the CUDA backend).

An object is reused when everything that goes into it is the same, compared by content, never by timestamp:

- the compiler: its resolved path and its `--version` (for nvcc also the host compiler's), and the environment
  variables that add flags behind the command line (NVCC_PREPEND_FLAGS, NVCC_APPEND_FLAGS, ...);
- the command line, without the output path and the -I/-isystem folders (these name a new temporary folder each
  time; which header they resolved to is in the next item);
- the source and every file it includes: the compiler itself lists them (`-M`, run before each lookup, so a new
  header that shadows an old one on the include path is seen), and their contents are hashed in that order;
- for nvcc, every project header given as `extra_inputs` as well (a header included only in a device pass would
  not be in the host-side `-M` list).

Layout: <root>/<key[:2]>/<key>.o, written by rename (never half an object). The root is $BERTQA_BUILD_CACHE, else
$XDG_CACHE_HOME/bertqa/build, else ~/.cache/bertqa/build; BERTQA_BUILD_CACHE=0 (or off, none, no) turns the cache
off. Entries unused for longest are deleted when the cache grows past $BERTQA_BUILD_CACHE_MB (default 2000).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

FORMAT = "bertqa-build-cache-1"
# Environment variables that change what a compiler does without appearing on its command line.
COMPILER_ENV = ("NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS", "NVCC_CCBIN", "GCC_EXEC_PREFIX", "COMPILER_PATH",
                "CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH", "SOURCE_DATE_EPOCH")
# Options whose argument is an include folder: left out of the key (the headers they resolved to are in it).
INCLUDE_OPTIONS = ("-I", "-isystem", "-iquote", "-idirafter", "--include-path")
DEFAULT_LIMIT_MB = 2000


def default_root() -> Optional[Path]:
    """The cache folder from the environment, or None when BERTQA_BUILD_CACHE turns the cache off."""
    given = os.environ.get("BERTQA_BUILD_CACHE", "").strip()
    if given.lower() in ("0", "off", "none", "no", "false"):
        return None
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bertqa" / "build"


def parse_depfile(text: str) -> list[str]:
    """The prerequisites of a make rule as `gcc -M` / `nvcc -M` write it (`obj.o: src.c a.h \\` lines; a space
    inside a path is written `\\ `)."""
    text = text.replace("\\\r\n", " ").replace("\\\n", " ")
    _, sep, rest = text.partition(": ")
    if not sep:
        _, sep, rest = text.partition(":\n")
    paths, word, i = [], [], 0
    while i < len(rest):
        c = rest[i]
        if c == "\\" and i + 1 < len(rest) and rest[i + 1] in " #":
            word.append(rest[i + 1])
            i += 2
            continue
        if c.isspace():
            if word:
                paths.append("".join(word))
                word = []
        elif c == "$" and rest[i + 1:i + 2] == "$":
            word.append("$")
            i += 1
        else:
            word.append(c)
        i += 1
    if word:
        paths.append("".join(word))
    return paths


def key_arguments(cmd: Sequence[str], obj: str) -> list[str]:
    """cmd without its compiler, the output (-o obj) and include folders; the source stays (as given, relative)."""
    out, args, i = [], list(cmd[1:]), 0
    while i < len(args):
        a = args[i]
        if (a == "-o" and args[i + 1:i + 2] == [obj]) or a in INCLUDE_OPTIONS:
            i += 2
        elif a.startswith(INCLUDE_OPTIONS):   # -Ifolder, --include-path=folder
            i += 1
        else:
            out.append(a)
            i += 1
    return out


class ObjectCache:
    """compile(cmd, src, obj, run, deps_cmd): obj from the cache when its key is there, else run() and store obj."""

    def __init__(self, root: Optional[Path], limit_mb: Optional[float] = None, log: Callable[[str], None] = print):
        self.root = Path(root) if root is not None else None
        self.limit_bytes = int((limit_mb if limit_mb is not None else
                                float(os.environ.get("BERTQA_BUILD_CACHE_MB", DEFAULT_LIMIT_MB))) * 2**20)
        self.log = log
        self.hits = self.misses = 0
        self._lock = threading.Lock()   # compile() runs in several threads (the nvcc jobs)
        self._file_hashes: dict[tuple, str] = {}
        self._tool_ids: dict[tuple[str, ...], str] = {}
        if self.root is not None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self.log(f"bertqa: build cache off: cannot create {self.root}: {e.strerror or e}")
                self.root = None

    @classmethod
    def from_environment(cls, log: Callable[[str], None] = print) -> "ObjectCache":
        return cls(default_root(), log=log)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    # ---- the key ---------------------------------------------------------------------------------------------

    def file_hash(self, path: str) -> str:
        st = os.stat(path)
        # (memo within this process; ctime changes on every write, even one that keeps size and mtime)
        k = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if k not in self._file_hashes:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._file_hashes[k] = h.hexdigest()
        return self._file_hashes[k]

    def tool_id(self, *argv: str) -> str:
        """Resolved path and `--version` output of a compiler (once per process)."""
        if argv not in self._tool_ids:
            exe = shutil.which(argv[0]) or argv[0]
            try:
                version = subprocess.run([exe, *argv[1:], "--version"], capture_output=True, text=True,
                                         timeout=60).stdout
            except (OSError, subprocess.SubprocessError) as e:
                version = f"unavailable: {e}"
            self._tool_ids[argv] = f"{os.path.realpath(exe)}\n{version}"
        return self._tool_ids[argv]

    def dependencies(self, deps_cmd: Sequence[str]) -> Optional[list[str]]:
        """The files the compiler reads for this source (its `-M` list), or None when it cannot say (then the
        source is compiled, and its own error, if any, shown)."""
        with tempfile.TemporaryDirectory(prefix="bertqa-deps-") as tmp:
            depfile = os.path.join(tmp, "deps.d")
            cmd = [a.replace("{depfile}", depfile) for a in deps_cmd]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                return None
            text = Path(depfile).read_text() if "{depfile}" in " ".join(deps_cmd) else r.stdout
        deps = parse_depfile(text)
        return deps or None

    def key(self, cmd: Sequence[str], src: str, obj: str, deps: Iterable[str], tools: Sequence[Sequence[str]],
            extra_inputs: Iterable[str] = ()) -> str:
        h = hashlib.sha256()

        def put(*parts: str) -> None:
            for p in parts:
                h.update(p.encode("utf-8", "surrogateescape"))
                h.update(b"\0")

        put(FORMAT)
        for tool in tools:
            put("tool", self.tool_id(*tool))
        for name in COMPILER_ENV:
            put("env", name, os.environ.get(name, "\1unset"))
        put("args", *key_arguments(cmd, obj))
        put("source", src, self.file_hash(src))
        for d in deps:   # in the compiler's order; the paths themselves may name temporary folders
            put("dep", self.file_hash(d))
        for d in sorted(extra_inputs):
            put("extra", d, self.file_hash(d))
        return h.hexdigest()

    # ---- lookup and store ------------------------------------------------------------------------------------

    def entry(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.o"

    def compile(self, cmd: Sequence[str], src: str, obj: str, run: Callable[[], object],
                deps_cmd: Sequence[str], tools: Optional[Sequence[Sequence[str]]] = None,
                extra_inputs: Sequence[str] = ()) -> bool:
        """Make obj: copied from the cache when the key matches (returns True), else by run() (returns False),
        whose object is stored unless an input changed while it ran. deps_cmd: cmd's `-M` form; it writes the
        rule to stdout, or to {depfile} where it names one."""
        if not self.enabled:
            run()
            return False
        tools = tools if tools is not None else [[cmd[0]]]
        deps = self.dependencies(deps_cmd)
        if deps is None:
            run()
            return False
        try:
            key = self.key(cmd, src, obj, deps, tools, extra_inputs)
        except OSError:   # a listed file vanished: compile, and let the compiler say what is wrong
            run()
            return False
        entry = self.entry(key)
        if entry.is_file():
            Path(obj).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{obj}.{os.getpid()}.tmp"
            shutil.copyfile(entry, tmp)
            os.replace(tmp, obj)
            try:
                os.utime(entry)   # recently used: pruned last
            except OSError:
                pass
            with self._lock:
                self.hits += 1
            return True
        run()
        with self._lock:
            self.misses += 1
        try:
            self._file_hashes.clear()   # hash again: store only what was built from the inputs of the key
            if self.key(cmd, src, obj, deps, tools, extra_inputs) == key:
                entry.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=entry.parent)
                os.close(fd)
                shutil.copyfile(obj, tmp)
                os.replace(tmp, entry)
        except OSError as e:
            self.log(f"bertqa: build cache: could not store {src}: {e.strerror or e}")
        return False

    def prune(self) -> None:
        """Delete the entries unused for longest until the cache holds at most limit_bytes."""
        if not self.enabled:
            return
        entries = []
        for p in self.root.glob("*/*.o"):
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.limit_bytes:
                break
            try:
                p.unlink()
                total -= size
            except OSError:
                pass
        for p in self.root.glob("*/.*.tmp"):   # left by a build killed while storing
            try:
                p.unlink()
            except OSError:
                pass

    def summary(self) -> str:
        return (f"bertqa: build cache {self.root}: {self.hits} object(s) reused, {self.misses} compiled"
                if self.enabled else "bertqa: build cache off (BERTQA_BUILD_CACHE)")

