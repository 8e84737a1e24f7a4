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
LABEL = "bertqa-test"  # every container and network the tests make carries it, and is removed by it


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
        """Every container and network the tests made (a run killed half-way leaves some behind)."""
        self("rm", "-f", "-t", "0", "--filter", f"label={LABEL}", check=False, timeout=180)
        for net in self("network", "ls", "--format", "{{.Name}}", "--filter", f"label={LABEL}",
                        check=False).stdout.split():
            self("network", "rm", "-f", net, check=False)


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
    podman("run", "-d", "--name", name, "--label", LABEL, *args, timeout=120)
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
    podman("network", "create", "--label", LABEL, name)
    try:
        yield name
    finally:
        podman("network", "rm", "-f", name, check=False)
