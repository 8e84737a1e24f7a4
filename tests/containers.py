"""Containers for the tests: podman (daemonless, with runc) in a private store, a local stand-in for the
`python:3.11-slim` base image, and the project's image built from its own, unchanged Dockerfile.

Registries are not reachable on the machines that run these tests, so `FROM python:3.11-slim` cannot be pulled. The
stand-in is Debian bookworm made with debootstrap (its tarball is cached), with Debian's python3, pip, venv and
headers, tagged `docker.io/library/python:3.11-slim` in the private store only: the Dockerfile then builds with
`--pull=never` exactly as a user's `docker build .` does. It is a test fixture, not a user step; paths that the
Dockerfile might assume about the official image's layout (Python in /usr/local) are not tested by it.

The cache ($BERTQA_CONTAINER_CACHE, default ~/.cache/bertqa-containers) keeps the debootstrap tarball and the podman
store with the stand-in base images, so a run pays the project image's build (about a minute) and not the base's.
pip inside a build here must trust the host's CA bundle: it is mounted read-only for the build's RUN steps with a
pip.conf pointing at it (users' builds need neither).

Tool facts (../shared/CONTAINERS.md): crun fails on this host ("cgroups in hybrid mode"), so every command passes
`--runtime runc`; `podman run` as root must lower the open-files limit (`--ulimit nofile=20000:20000`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("BERTQA_CONTAINER_CACHE") or Path.home() / ".cache" / "bertqa-containers")
# The run root is fixed: podman records it in its store's database and refuses another one later.
RUN_ROOT = Path(os.environ.get("BERTQA_CONTAINER_RUNROOT") or "/run/bertqa-containers")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
APT_PACKAGES = ["podman", "runc", "debootstrap", "uidmap", "slirp4netns"]
INSTALL_CMD = ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
BASE_IMAGE = "localhost/bertqa-test/debian:bookworm"
PYTHON_STANDIN = "docker.io/library/python:3.11-slim"
PYTHON_STANDIN_FILE = REPO / "tests" / "fixtures" / "containers" / "python-standin.Containerfile"
IMAGE = "localhost/bertqa:test"
LABEL = "bertqa-test"  # every container and network the tests make carries it, valued with the test process's pid
OWNER = f"{LABEL}={os.getpid()}"


def log(msg: str) -> None:
    print(f"[containers] {msg}", file=sys.stderr, flush=True)


# ---- the tools ------------------------------------------------------------------------------------------------


def missing_tools() -> list[str]:
    return [t for t in ("podman", "runc", "debootstrap") if shutil.which(t) is None]


def install_tools() -> str:
    """apt-get installs podman, runc and debootstrap when root on Debian (not with BERTQA_NO_CONTAINER_INSTALL=1);
    '' when the tools are there afterwards, else why not (for the skip reason)."""
    if not missing_tools():
        return ""
    why = f"missing {', '.join(missing_tools())}: run `apt-get update && {' '.join(INSTALL_CMD)}`"
    if os.environ.get("BERTQA_NO_CONTAINER_INSTALL") == "1" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return why
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    start = time.monotonic()
    for cmd in (INSTALL_CMD, ["apt-get", "update"], INSTALL_CMD):  # lists absent or stale: refresh once, again
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
        if r.returncode == 0 and cmd is INSTALL_CMD:
            break
    log(f"apt-get install {' '.join(APT_PACKAGES)}: {time.monotonic() - start:.0f} s")
    return why + f" (the install failed: {r.stdout[-500:]})" if missing_tools() else ""


# ---- podman in a private store ------------------------------------------------------------------------------


class Podman:
    """`podman --runtime runc --root STORE --runroot RUN` with a containers.conf of this host's limits."""

    def __init__(self, store: Path = CACHE / "storage", runroot: Path = RUN_ROOT):
        self.store, self.runroot = store, runroot
        store.mkdir(parents=True, exist_ok=True)
        runroot.mkdir(parents=True, exist_ok=True)
        self.conf = CACHE / "containers.conf"
        text = ('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
                '[engine]\nruntime = "runc"\n')
        if not self.conf.is_file() or self.conf.read_text() != text:
            self.conf.write_text(text)

    @property
    def argv(self) -> list[str]:
        return ["podman", "--runtime", "runc", "--root", str(self.store), "--runroot", str(self.runroot)]

    @property
    def env(self) -> dict:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} -> {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        return r

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([*self.argv, *args], env=self.env, **kw)

    def has_image(self, ref: str) -> bool:
        return self("image", "exists", ref, check=False).returncode == 0

    def label_of(self, ref: str, key: str) -> str | None:
        r = self("image", "inspect", "--format", "{{json .Labels}}", ref, check=False)
        return (json.loads(r.stdout or "null") or {}).get(key) if r.returncode == 0 else None

    def logs(self, name: str) -> str:
        r = self("logs", name, check=False)
        return r.stdout + r.stderr

    def remove_labelled(self) -> None:
        """The containers and networks of this test process and of test processes that have ended (a run killed
        half-way leaves some behind); a test session running beside this one keeps its own."""
        def stale(pid: str) -> bool:
            if not pid.isdigit() or int(pid) == os.getpid():
                return True
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False

        for kind in ("ps", "network"):
            args = ["ps", "-a"] if kind == "ps" else ["network", "ls"]
            listed = self(*args, "--filter", f"label={LABEL}", "--format",
                          f'{{{{.{"Names" if kind == "ps" else "Name"}}}}} {{{{index .Labels "{LABEL}"}}}}',
                          check=False).stdout
            names = [line.split()[0] for line in listed.splitlines()
                     if line.split() and stale(line.split()[-1] if len(line.split()) > 1 else "")]
            if names:
                rm = ["rm", "-f", "-t", "0"] if kind == "ps" else ["network", "rm", "-f"]
                self(*rm, *names, check=False, timeout=180)


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def base_tarball() -> Path:
    """Debian bookworm (debootstrap --variant=minbase) as a tarball, made once (~40-70 s) and cached."""
    tarball = CACHE / "bookworm-minbase.tar"
    if tarball.is_file():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        start = time.monotonic()
        r = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs)], capture_output=True,
                           text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"debootstrap failed ({r.returncode}): {r.stdout[-2000:]}{r.stderr[-2000:]}")
        part = _atomic_path(tarball)
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(part), "."], check=True, timeout=300)
        part.replace(tarball)
        log(f"debootstrap bookworm -> {tarball}: {time.monotonic() - start:.0f} s")
    return tarball


def _recipe_hash(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def ensure_base_images(podman: Podman) -> None:
    """The stand-in python:3.11-slim in the private store; rebuilt only when its Containerfile changed."""
    recipe = _recipe_hash(PYTHON_STANDIN_FILE.read_bytes())
    if podman.label_of(PYTHON_STANDIN, "bertqa.recipe") == recipe:
        return
    if not podman.has_image(BASE_IMAGE):
        podman("import", str(base_tarball()), BASE_IMAGE, timeout=300)
    start = time.monotonic()
    podman("build", "--pull=never", "--label", f"bertqa.recipe={recipe}", "-t", PYTHON_STANDIN,
           "-f", str(PYTHON_STANDIN_FILE), str(PYTHON_STANDIN_FILE.parent), timeout=900)
    log(f"stand-in {PYTHON_STANDIN}: built in {time.monotonic() - start:.0f} s")


def build_image(podman: Podman, tag: str = IMAGE, dockerfile: str = "Dockerfile", timeout: float = 1500,
                extra: tuple[str, ...] = ()) -> tuple[float, str]:
    """`podman build -f DOCKERFILE -t TAG REPO` as a user runs `docker build`, plus only what this host needs (the
    host's CA for pip, read-only); (seconds, the build's output)."""
    with tempfile.TemporaryDirectory() as tmp:
        pip_conf = Path(tmp) / "pip.conf"
        pip_conf.write_text("[global]\ncert = /etc/bertqa-host-ca.crt\n")
        args = ["build", "--pull=never", "-f", str(REPO / dockerfile), "-t", tag, *extra]
        if HOST_CA.is_file():
            args += ["-v", f"{HOST_CA}:/etc/bertqa-host-ca.crt:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
        start = time.monotonic()
        r = podman(*args, str(REPO), timeout=timeout, check=False)
        took = time.monotonic() - start
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"building {dockerfile} failed after {took:.0f} s:\n{out[-6000:]}")
    log(f"{dockerfile} -> {tag}: built in {took:.0f} s")
    podman("image", "prune", "-f", check=False, timeout=300)  # the previous build's image, now untagged
    return took, out


# ---- containers as SageMaker runs them --------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def run_detached(podman: Podman, *args: str, name: str) -> str:
    podman("run", "-d", "--name", name, "--label", OWNER, *args, timeout=120)
    return name


def wait_exit(podman: Podman, name: str, timeout: float) -> int:
    """The container's exit status once it has stopped (TimeoutError after `timeout`)."""
    r = podman("wait", name, check=False, timeout=timeout)
    if r.returncode != 0:
        raise TimeoutError(f"{name} still running after {timeout:.0f} s: {r.stderr[-500:]}")
    return int(r.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def network(podman: Podman, name: str | None = None):
    name = name or unique("bertqa-net")
    podman("network", "create", "--label", OWNER, name)
    try:
        yield name
    finally:
        podman("network", "rm", "-f", name, check=False)


# ---- Dockerfile.gpu's build stage, on a stand-in for its nvidia/cuda devel base ----------------------------------
#
# Dockerfile.gpu builds FROM nvidia/cuda:<version>-cudnn-devel-ubuntu24.04, which cannot be pulled here either. The
# stand-in is made from this machine's own CUDA toolkit, cuDNN 9 and NCCL, laid out as NVIDIA's image lays them out
# (the toolkit in /usr/local/cuda-X.Y with /usr/local/cuda pointing at it; cuDNN as the libcudnn9-dev-cuda-13
# package puts it: headers in /usr/include/x86_64-linux-gnu as cudnn*_v9.h with /usr/include/cudnn*.h links to them,
# libraries in /usr/lib/x86_64-linux-gnu; NCCL as libnccl2 + libnccl-dev: /usr/include/nccl*.h,
# /usr/lib/x86_64-linux-gnu/libnccl.so*), with the devel image's environment, on the debootstrap Debian 12 base:
# Debian's python3 3.11 (installed by Dockerfile.gpu's own apt-get line, as on Ubuntu 24.04, whose python3 is 3.12),
# externally managed (PEP 668) as Ubuntu's is. Of the toolkit's libraries it carries those bertqa._cuda builds and
# loads with (cudart, cuBLAS/cuBLASLt, NVRTC, the driver stub); cuFFT, cuSPARSE, cuSOLVER, cuRAND, CUPTI and the
# rest are left out (1.8 GB instead of 2.7 here). The files come in through read-only bind mounts of the build's RUN
# step, so no build context of that size is sent. The image is tagged with the exact name Dockerfile.gpu's build
# stage names, in the private store only, and rebuilt only when its recipe or the host's toolkit, cuDNN or NCCL
# changes.

GPU_BUILD_IMAGE = "localhost/bertqa-gpu-build:test"
CUDA_STANDIN_RECIPE = r"""# The stand-in for nvidia/cuda:<version>-cudnn-devel-ubuntu24.04 (tests/containers.py).
FROM localhost/bertqa-test/debian:bookworm
ARG CUDA_VERSION
ARG CUDA_DIR
ARG CUDNN_VERSION
ARG NCCL_VERSION
# /host/cuda, /host/cuda-lib, /host/cudnn-include, /host/cudnn-lib, /host/nccl-include, /host/nccl-lib: read-only
# bind mounts of this machine's folders (tests/containers.py, ensure_cuda_devel_standin)
RUN set -eu; \
    dst=/usr/local/$CUDA_DIR; mkdir -p $dst/lib /usr/include/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; \
    for d in bin nvvm include; do mkdir $dst/$d; cp -a /host/cuda/$d/. $dst/$d/; done; \
    rm -rf $dst/include/cudnn* $dst/include/nccl*; \
    cd /host/cuda-lib; \
    cp -a libcudart* libcudadevrt.a libculibos.a libcublas* libnvrtc* stubs $dst/lib/; \
    ln -s lib $dst/lib64; ln -s $CUDA_DIR /usr/local/cuda; ln -s $CUDA_DIR /usr/local/cuda-${CUDA_VERSION%%.*}; \
    echo "$dst/lib" > /etc/ld.so.conf.d/988_$CUDA_DIR.conf; \
    for h in /host/cudnn-include/cudnn*.h; do \
        b=$(basename $h .h); case $b in *_v9) continue;; esac; \
        cp $h /usr/include/x86_64-linux-gnu/${b}_v9.h; ln -s x86_64-linux-gnu/${b}_v9.h /usr/include/$b.h; \
    done; \
    cp -a /host/cudnn-lib/libcudnn*.so* /usr/lib/x86_64-linux-gnu/; \
    cp -a /host/nccl-include/nccl*.h /usr/include/; \
    if [ -d /host/nccl-include/nccl_device ]; then cp -a /host/nccl-include/nccl_device /usr/include/; fi; \
    cp -a /host/nccl-lib/libnccl.so* /usr/lib/x86_64-linux-gnu/; \
    ldconfig
ENV PATH=/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CUDA_VERSION=${CUDA_VERSION} \
    NV_CUDNN_VERSION=${CUDNN_VERSION} \
    NCCL_VERSION=${NCCL_VERSION}
"""


def dockerfile_stage_base(dockerfile: str = "Dockerfile.gpu", stage: str = "build") -> str:
    """The image a stage of a Dockerfile starts FROM, as written there (nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04)."""
    for line in (REPO / dockerfile).read_text().splitlines():
        words = line.split()
        if len(words) == 4 and words[0].upper() == "FROM" and words[2].upper() == "AS" and words[3] == stage:
            return words[1]
    raise ValueError(f"{dockerfile} has no stage named {stage!r}")


def qualified(ref: str) -> str:
    """docker.io/… for a short name (nvidia/cuda:tag -> docker.io/nvidia/cuda:tag, python:3 ->
    docker.io/library/python:3): the name under which `FROM <short name>` --pull=never finds the local image."""
    first = ref.split("/")[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return ref
    return f"docker.io/{ref}" if "/" in ref else f"docker.io/library/{ref}"


def _header_version(path: Path, *names: str) -> str:
    text = path.read_text(errors="replace")
    parts = []
    for name in names:
        for line in text.splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "#define" and words[1] == name:
                parts.append(words[2])
                break
        else:
            raise ValueError(f"{path}: no {name}")
    return ".".join(parts)


def host_cuda() -> tuple[dict | None, str]:
    """This machine's CUDA toolkit, cuDNN 9 and NCCL (headers and libraries) for the stand-in, found as setup.py finds
    them (buildtools/bertqa_build.py); (None, why not) when one is missing."""
    sys.path.insert(0, str(REPO / "buildtools"))
    try:
        from bertqa_build import cudnn_paths
    finally:
        sys.path.remove(str(REPO / "buildtools"))
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", nvcc and str(Path(nvcc).resolve().parent.parent)]
    home = next((Path(h).resolve() for h in homes if h and (Path(h) / "bin" / "nvcc").is_file()), None)
    if home is None:
        return None, "no CUDA toolkit here (CUDA_HOME, /usr/local/cuda, nvcc on PATH) for the nvidia/cuda stand-in"
    lib = home / "lib64" if (home / "lib64").is_dir() else home / "lib"
    r = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, timeout=60)
    release = next((w.rstrip(",") for line in r.stdout.splitlines() if "release" in line
                    for i, w in enumerate(line.split()) if i and line.split()[i - 1] == "release"), None)
    if r.returncode or not release:
        return None, f"{home}/bin/nvcc --version did not say its release: {r.stdout[-300:]}{r.stderr[-300:]}"
    cudnn = cudnn_paths(str(home))
    if not cudnn:
        return None, f"no cuDNN 9 found beside the toolkit {home} (CUDNN_HOME, the toolkit, PyTorch's wheel, /usr)"
    wheels = [Path(p) / "nvidia" / "nccl" for p in sys.path if p]
    places = [(home / "include", lib)] + [(w / "include", w / "lib") for w in wheels] + \
             [(Path("/usr/include"), Path("/usr/lib/x86_64-linux-gnu"))]
    nccl = next(((inc, nlib) for inc, nlib in places
                 if (inc / "nccl.h").is_file() and (nlib / "libnccl.so.2").exists()), None)
    if not nccl:
        return None, "no NCCL (nccl.h + libnccl.so.2: the toolkit's, an nvidia-nccl wheel's, /usr's) for the stand-in"
    found = dict(home=home, lib=lib, release=release, nvcc=r.stdout.strip(), cudnn_include=Path(cudnn[0]),
                 cudnn_lib=Path(cudnn[1]), nccl_include=nccl[0], nccl_lib=nccl[1],
                 # names and sizes of the libraries: a library updated in place rebuilds the stand-in too
                 files=sorted((f.name, f.stat().st_size) for d in {lib, Path(cudnn[1]), nccl[1]}
                              for f in d.iterdir() if f.is_file()))
    found["cudnn_version"] = _header_version(found["cudnn_include"] / "cudnn_version.h", "CUDNN_MAJOR", "CUDNN_MINOR",
                                             "CUDNN_PATCHLEVEL")
    found["nccl_version"] = _header_version(nccl[0] / "nccl.h", "NCCL_MAJOR", "NCCL_MINOR", "NCCL_PATCH")
    return found, ""


def cuda_standin_mismatch(base: str, cuda: dict) -> str:
    """'' when this machine's toolkit can stand in for the image `base` (same CUDA major.minor, cuDNN 9), else why."""
    tag = base.rsplit(":", 1)[-1]                 # 13.0.2-cudnn-devel-ubuntu24.04
    version = tag.split("-")[0]
    if "-cudnn-devel-" not in tag or version.count(".") != 2:
        return f"{base} is not an nvidia/cuda <version>-cudnn-devel-<os> image: no stand-in for it"
    if ".".join(version.split(".")[:2]) != cuda["release"]:
        return f"{base} is CUDA {version}, this machine's toolkit {cuda['release']}: it cannot stand in for it"
    if not cuda["cudnn_version"].startswith("9."):
        return f"{base} carries cuDNN 9, this machine has cuDNN {cuda['cudnn_version']}"
    return ""


def ensure_cuda_devel_standin(podman: Podman, base: str, cuda: dict, timeout: float = 1800) -> float:
    """The stand-in for `base` (Dockerfile.gpu's build stage's FROM) in the private store, tagged with its exact name;
    rebuilt only when the recipe or the host's toolkit, cuDNN or NCCL changed. Seconds it took (0 when cached)."""
    tag = qualified(base)
    version = base.rsplit(":", 1)[-1].split("-")[0]
    build_args = dict(CUDA_VERSION=version, CUDA_DIR=cuda["home"].name, CUDNN_VERSION=cuda["cudnn_version"],
                      NCCL_VERSION=cuda["nccl_version"])
    mounts = {"cuda": cuda["home"], "cuda-lib": cuda["lib"], "cudnn-include": cuda["cudnn_include"],
              "cudnn-lib": cuda["cudnn_lib"], "nccl-include": cuda["nccl_include"], "nccl-lib": cuda["nccl_lib"]}
    recipe = _recipe_hash(CUDA_STANDIN_RECIPE.encode(), tag.encode(), cuda["nvcc"].encode(),
                          json.dumps(build_args, sort_keys=True).encode(),
                          json.dumps({k: str(v) for k, v in mounts.items()}, sort_keys=True).encode(),
                          json.dumps(cuda["files"]).encode())
    if podman.label_of(tag, "bertqa.recipe") == recipe:
        return 0.0
    if not podman.has_image(BASE_IMAGE):
        podman("import", str(base_tarball()), BASE_IMAGE, timeout=300)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as ctx:
        (Path(ctx) / "Containerfile").write_text(CUDA_STANDIN_RECIPE)
        # --no-cache: the bind-mounted files are not in the layer cache's key; a changed toolkit would reuse the old
        args = ["build", "--pull=never", "--no-cache", "--label", f"bertqa.recipe={recipe}", "-t", tag]
        for k, v in build_args.items():
            args += ["--build-arg", f"{k}={v}"]
        for name, path in mounts.items():
            args += ["-v", f"{path}:/host/{name}:ro"]
        podman(*args, "-f", str(Path(ctx) / "Containerfile"), ctx, timeout=timeout)
    took = time.monotonic() - start
    log(f"stand-in {tag} (CUDA {cuda['release']} from {cuda['home']}, cuDNN {cuda['cudnn_version']}, NCCL "
        f"{cuda['nccl_version']}): built in {took:.0f} s")
    return took


def image_size(podman: Podman, ref: str) -> int:
    """Bytes of an image, all its layers (those shared with others included)."""
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())
