"""The SageMaker image as SageMaker runs it: built from the repository's Dockerfile with podman, started as
`docker run IMAGE serve` with a model in /opt/ml/model, and as `docker run IMAGE train` for training jobs on one
and on two instances (containers algo-1 and algo-2 on one network, ssh + Open MPI between them), a lost instance,
and a spot restart. tests/test_sagemaker_local.py drives the same image through the SageMaker SDK's local mode.

Needs podman, runc and debootstrap (installed with apt-get when root on Debian, unless
BERTQA_NO_CONTAINER_INSTALL=1; otherwise the tests skip naming the command). Registries are unreachable here: the
base image is a local stand-in for python:3.11-slim (tests/containers.py). The models are tiny BERTs; the jobs run
a few dozen steps on real SQuAD questions.
"""
from __future__ import annotations

import contextlib
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

import containers as C
from qa_helpers import assert_answers_a_span, engine_available, free_port, http_call, tiny_job_inputs
from test_training_job import TINY_HYPERPARAMETERS, make_job, sagemaker_model_tar

pytestmark = [pytest.mark.containers,
              pytest.mark.skipif(not engine_available(), reason="bertqa's engine is not built")]

PING_BUDGET_S = 60      # we ask for far less than SageMaker's start-up health-check budget
SIGTERM_BUDGET_S = 30   # SageMaker sends SIGKILL 30 s after SIGTERM (docker stop -t 30)
LR = 1e-3


@pytest.fixture(scope="module")
def inputs(shared_data_dir, tmp_path_factory):
    """A tiny random BERT (the job's model channel) and 48 training / 12 validation questions."""
    return tiny_job_inputs(shared_data_dir, tmp_path_factory.mktemp("container_inputs"), 48, 12)


# Global batch 8 in every job: 1 process x 8 or 2 instances x 1 process x 4.
JOB_HP = {**TINY_HYPERPARAMETERS, "learning_rate": str(LR), "max_steps": "16", "save_steps": "4", "eval_steps": "0"}


def job_folder(base: Path, inputs, host: str = "algo-1", hosts=("algo-1",), **hp) -> Path:
    """/opt/ml of one instance: hyperparameters, its own resourceconfig.json, the channels (model included)."""
    model, train, valid = inputs
    make_job(base, {**JOB_HP, **hp}, train, valid,
             {"current_host": host, "hosts": list(hosts), "network_interface_name": "eth0"})
    (base / "input" / "data" / "model").mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        (base / "input" / "data" / "model" / f.name).write_bytes(f.read_bytes())
    return base


def start_job(podman, image, base: Path, host: str, net: str | None = None, name: str | None = None,
              env: tuple[str, ...] = ()) -> str:
    """`docker run IMAGE train` with /opt/ml mounted, named and addressed as SageMaker's instances are."""
    name = name or C.unique(host)
    args = ["--hostname", host, "-v", f"{base}:/opt/ml", "-e", "OMP_NUM_THREADS=1"]
    for e in env:
        args += ["-e", e]
    if net:
        args += ["--network", net, "--network-alias", host]
    return C.run_detached(podman, *args, image, "train", name=name)


def run_job(podman, image, base: Path, timeout: float = 300) -> tuple[int, str]:
    name = start_job(podman, image, base, "algo-1")
    try:
        code = C.wait_exit(podman, name, timeout)
        return code, podman.logs(name)
    finally:
        podman("rm", "-f", name, check=False)


@contextlib.contextmanager
def two_instances(podman, image, bases: dict[str, Path]):
    """algo-1 and algo-2 on one network, each with its /opt/ml; yields {host: container name}; removed after."""
    with C.network(podman) as net:
        names = {}
        try:
            for host, base in bases.items():
                names[host] = start_job(podman, image, base, host, net)
            yield names
        finally:
            for name in names.values():
                podman("rm", "-f", "-t", "0", name, check=False)


def two_bases(root: Path, inputs, **hp) -> dict[str, Path]:
    hosts = ("algo-1", "algo-2")
    return {h: job_folder(root / h, inputs, h, hosts, per_device_train_batch_size="4", **hp) for h in hosts}


def weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def softmax_invariant(name: str, layers: int = 2) -> bool:
    """Exact gradient 0 (a softmax cancels a shift along them): rounding noise that AdamW scales to step size."""
    return (name.endswith("attention.self.key.bias") or name == "qa_outputs.bias"
            or name == f"bert.encoder.layer.{layers - 1}.output.LayerNorm.bias")


def max_relative_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    gaps = []
    for name in a:
        diff = float(np.abs(a[name] - b[name]).max())
        if softmax_invariant(name):
            assert diff < LR, (name, diff)
        else:
            gaps.append(diff / max(float(np.abs(a[name]).max()), 1e-6))
    return max(gaps)


def wait_for(predicate, what: str, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)


# ---- the image ---------------------------------------------------------------------------------------------


def test_image_runs_bertqa_with_its_compiled_core(podman, image):
    r = podman("run", "--rm", "--entrypoint", "python3", image, "-c",
               "import json, bertqa, bertqa.ops as o; print(json.dumps([bertqa.__file__, o.runtime_info()]))")
    where, info = json.loads(r.stdout.strip().splitlines()[-1])
    assert where.startswith("/usr/") and ("site-packages" in where or "dist-packages" in where), where
    assert info["isa"] in ("avx2", "avx512") and info["blas_core"], info
    r = podman("run", "--rm", image, "--help")  # the ENTRYPOINT is `python3 -m bertqa`
    assert "train" in r.stdout and "serve" in r.stdout
    r = podman("run", "--rm", "--entrypoint", "sh", image, "-c", "command -v mpirun sshd ssh && ls /tmp")
    assert r.stdout.count("/") >= 3 and "bertqa-src" not in r.stdout, r.stdout


# ---- training jobs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_instance(podman, image, inputs, tmp_path_factory):
    """A one-instance job, one process, batch 8: (its /opt/ml, its log)."""
    base = job_folder(tmp_path_factory.mktemp("one") / "opt_ml", inputs, per_device_train_batch_size="8")
    code, log = run_job(podman, image, base)
    assert code == 0, log[-4000:]
    return base, log


def test_one_instance_job_writes_model_checkpoints_and_results(one_instance):
    base, log = one_instance
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json"} <= \
        {p.name for p in (base / "model").iterdir()}
    assert sorted(p.name for p in (base / "checkpoints").glob("checkpoint-*")) == \
        ["checkpoint-12", "checkpoint-16", "checkpoint-4", "checkpoint-8"]
    results = json.loads((base / "output" / "data" / "eval_results.json").read_text())
    assert results["train_steps"] == 16 and results["eval_examples"] == 12
    assert "job: eval_exact_match=" in log and not (base / "output" / "failure").exists()


def test_bad_hyperparameter_fails_the_job_with_a_failure_file(podman, image, inputs, tmp_path):
    base = job_folder(tmp_path / "opt_ml", inputs, learning_rate="fast")
    code, log = run_job(podman, image, base, timeout=120)
    assert code == 2, log[-2000:]
    failure = (base / "output" / "failure").read_text()
    assert "learning_rate='fast'" in failure and "expected a number" in failure
    assert not (base / "model").exists() or not any((base / "model").iterdir())


def test_job_without_a_model_channel_trains_all_minilm_from_the_image(podman, image, inputs, tmp_path):
    """The job's default model (all-MiniLM-L6-v2, shipped in the image): what the README's Estimator trains."""
    base = job_folder(tmp_path / "opt_ml", inputs, max_steps="2", save_steps="0", logging_steps="1")
    for f in (base / "input" / "data" / "model").iterdir():
        f.unlink()
    (base / "input" / "data" / "model").rmdir()
    code, log = run_job(podman, image, base, timeout=300)
    assert code == 0, log[-3000:]
    config = json.loads((base / "model" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (6, 384)
    assert "model all-MiniLM-L6-v2" in log


@pytest.fixture(scope="module")
def two_instance(podman, image, inputs, tmp_path_factory):
    """A two-instance job (algo-1, algo-2; one process each, batch 4): (the bases, algo-1's log, seconds)."""
    bases = two_bases(tmp_path_factory.mktemp("two"), inputs)
    start = time.monotonic()
    with two_instances(podman, image, bases) as names:
        codes = {h: C.wait_exit(podman, n, 300) for h, n in names.items()}
        logs = {h: podman.logs(n) for h, n in names.items()}
    took = time.monotonic() - start
    assert codes == {"algo-1": 0, "algo-2": 0}, (codes, logs["algo-1"][-4000:], logs["algo-2"][-2000:])
    return bases, logs, took


def test_two_instance_job_spans_both_containers_and_matches_one_process(two_instance, one_instance):
    bases, logs, took = two_instance
    master = logs["algo-1"]
    assert "algo-1:1,algo-2:1" in master and "-np 2" in master, master[-3000:]
    assert "global batch 8 = 2 processes x 4" in master
    assert "has gone" not in logs["algo-2"] and "ended with status 0" in logs["algo-2"], logs["algo-2"][-2000:]
    # rank 0 (on algo-1) writes the model; algo-2's /opt/ml/model stays empty, as on SageMaker
    assert (bases["algo-1"] / "model" / "model.safetensors").is_file()
    assert not (bases["algo-2"] / "model").exists() or not any((bases["algo-2"] / "model").iterdir())
    gap = max_relative_gap(weights(one_instance[0] / "model"), weights(bases["algo-1"] / "model"))
    print(f"two instances x 1 process x 4 vs one process x 8: max relative gap {gap:.2e}; job {took:.1f} s")
    assert gap < 1e-4


@pytest.mark.parametrize("killed, survivor, reason, budget_s", [
    ("algo-2", "algo-1", "lost the instance algo-2", 30),  # Open MPI reports the lost daemon at once
    ("algo-1", "algo-2", "lost the master instance algo-1", 25),  # three missed checks of port 22, 2 s apart
])
def test_a_killed_instance_ends_the_job_naming_it(podman, image, inputs, tmp_path, killed, survivor, reason,
                                                  budget_s):
    bases = two_bases(tmp_path, inputs, max_steps="100000", save_steps="0", logging_steps="1")
    with two_instances(podman, image, bases) as names:
        wait_for(lambda: "step=2 " in podman.logs(names["algo-1"]), "training to start", 180)
        podman("kill", names[killed])
        start = time.monotonic()
        code = C.wait_exit(podman, names[survivor], 120)
        took = time.monotonic() - start
        log = podman.logs(names[survivor])
    failure = (bases[survivor] / "output" / "failure").read_text()
    print(f"{survivor} ended {took:.1f} s after {killed} was killed; exit {code}; failure: {failure.strip()}")
    assert code == 1 and reason in failure, (failure, log[-3000:])
    assert took < budget_s, log[-3000:]


def test_a_host_that_never_comes_fails_the_job_after_the_wait(podman, image, inputs, tmp_path):
    bases = two_bases(tmp_path, inputs)
    with C.network(podman) as net:  # algo-2 is never started
        name = start_job(podman, image, bases["algo-1"], "algo-1", net, env=("BERTQA_WAIT_FOR_HOSTS_S=8",))
        try:
            code = C.wait_exit(podman, name, 120)
            log = podman.logs(name)
        finally:
            podman("rm", "-f", "-t", "0", name, check=False)
    failure = (bases["algo-1"] / "output" / "failure").read_text()
    assert code == 1 and "timed out after 8 s waiting for ssh to algo-2" in failure, (failure, log[-3000:])


def test_spot_restart_resumes_both_instances_to_the_same_model(podman, image, inputs, two_instance, tmp_path):
    bases = two_bases(tmp_path, inputs, max_steps="16", save_steps="4")
    with two_instances(podman, image, bases) as names:
        wait_for(lambda: (bases["algo-1"] / "checkpoints" / "checkpoint-8").is_dir(), "checkpoint-8", 180,
                 interval=0.05)
        for name in names.values():  # SageMaker reclaims the instances: SIGTERM, then SIGKILL
            podman("stop", "-t", "10", name, timeout=60)
        finished_anyway = (bases["algo-1"] / "model" / "model.safetensors").is_file()
    assert not finished_anyway, "the job finished before it was stopped: make it longer"
    interrupted = (bases["algo-1"] / "output" / "failure").read_text()
    assert "interrupted" in interrupted
    with two_instances(podman, image, bases) as names:  # the same /opt/ml folders, checkpoints/ kept
        codes = {h: C.wait_exit(podman, n, 300) for h, n in names.items()}
        log = podman.logs(names["algo-1"])
    assert codes == {"algo-1": 0, "algo-2": 0}, log[-4000:]
    assert "job: resuming from" in log and not (bases["algo-1"] / "output" / "failure").exists()
    straight = two_instance[0]["algo-1"]
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (b / "output" / "data" / "train_log.jsonl")
                                                   .read_text().splitlines()) if "loss" in r]
              for b in (straight, bases["algo-1"])]
    assert losses[0] == losses[1]
    assert (bases["algo-1"] / "model" / "model.safetensors").read_bytes() == \
        (straight / "model" / "model.safetensors").read_bytes()


# ---- the endpoint ------------------------------------------------------------------------------------------


def test_endpoint_serves_the_jobs_model_and_stops_on_sigterm(podman, image, one_instance, tmp_path):
    # SageMaker packs the job's /opt/ml/model as model.tar.gz and unpacks it into the endpoint's /opt/ml/model.
    archive = sagemaker_model_tar(one_instance[0] / "model", tmp_path / "model.tar.gz")
    model_dir = tmp_path / "endpoint-model"
    model_dir.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(model_dir, filter="data")
    port = free_port()
    started = time.monotonic()
    name = C.run_detached(podman, "-p", f"127.0.0.1:{port}:8080", "-v", f"{model_dir}:/opt/ml/model:ro", image,
                          "serve", name=C.unique("endpoint"))
    try:
        def ping():
            with contextlib.suppress(OSError):
                return http_call(port, "GET", "/ping", timeout=2)[0] == 200
            state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
            assert state == "running", podman.logs(name)[-3000:]
            return False

        wait_for(ping, "GET /ping", PING_BUDGET_S, interval=0.2)
        ready = time.monotonic() - started
        assert_answers_a_span(port)
        stop = time.monotonic()
        podman("stop", "-t", str(SIGTERM_BUDGET_S), name, timeout=SIGTERM_BUDGET_S + 30)
        stopped = time.monotonic() - stop
        code = int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())
        log = podman.logs(name)
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
    print(f"endpoint: /ping 200 after {ready:.1f} s; stopped {stopped:.1f} s after SIGTERM, exit {code}")
    assert stopped < 10 and code == 0, log[-3000:]
