"""The GPU all-reduce of data-parallel training, checked across two MPI ranks (bench/gpu_check.sh's `nccl` stage).

    mpirun -n 2 python bench/nccl_allreduce.py            # on a GPU machine
    mpirun -n 2 python bench/nccl_allreduce.py --dry-run  # anywhere: what runs without a GPU

Rank 0 makes the NCCL unique id and broadcasts it over MPI (mpi4py), as llm.c does; each rank opens its communicator
(bertqa.cuda.NcclComm) on its GPU: one GPU per rank when there are enough, else both on GPU 0, which NCCL 2.30 and
newer allows with NCCL_MULTI_RANK_GPU_ENABLE=1 (set here before NCCL starts). Checks, one line each:
  sum            each rank uploads its own gradient buffer (random, seeded by rank); after allreduce_sum_grads every
                 rank holds the float32 NumPy sum of all ranks' buffers, bit for bit (two ranks: one rounding each)
  data parallel  rank r runs forward_backward on rows r, r+2 of a batch of 4 (their window ids, loss_scale 1/2);
                 after the sum its gradients are those of one engine on the whole batch (fp32, 1e-4 relative)
  timing         the all-reduce of the gradient buffer of a 110M-parameter (BERT-base) buffer, median of 5
--dry-run: the MPI launch, NCCL loading, the id broadcast (every rank holds the same 128 bytes) and the argument checks
up to the communicator, which needs a GPU. Exit status 0 when every check that could run passed, 1 when one failed,
3 when the checks could not be shown here (the reason is printed).
"""
import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpi4py import MPI  # noqa: E402

import bertqa.cuda as bcuda  # noqa: E402

NOT_SHOWN = 3


def say(comm, msg):
    print(f"[rank {comm.Get_rank()}/{comm.Get_size()}] {msg}", flush=True)


def tiny_model(device, rng_seed=7):
    """The same random tiny BERT on every rank, on CUDA device `device` (hidden 36, 3 heads, 2 layers, T up to 40),
    dropout on."""
    from bertqa import checkpoint
    from bertqa.config import BertConfig
    from bertqa.model import BertQA
    config = BertConfig.from_dict(dict(
        vocab_size=53, hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=50,
        max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, initializer_range=0.02, pad_token_id=0))
    rng = np.random.default_rng(rng_seed)
    tensors = {name: (rng.standard_normal(shape) * 0.1).astype(np.float32)
               for name, shape in checkpoint.expected_shapes(config).items()}
    return BertQA(config, tensors, seed=1234, device=f"cuda:{device}", precision="fp32")


def tiny_batch(B=4, T=37):
    rng = np.random.default_rng(11)
    ids = rng.integers(1, 53, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[0, T - 9:] = 0
    ids[mask == 0] = 0
    types = np.zeros((B, T), np.int64)
    types[:, T // 3:] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, start_positions=np.array([5, 20, 1, 3]),
                end_positions=np.array([7, 30, 2, 11]))


def layout(comm, version):
    """(device, note) for this rank, or (None, why not)."""
    ngpu, reason = bcuda._import().device_count()
    size = comm.Get_size()
    if ngpu == 0:
        return None, f"no usable GPU ({reason})"
    if ngpu >= size:
        return comm.Get_rank(), f"one GPU per rank ({ngpu} GPUs)"
    if version >= 23000:
        os.environ["NCCL_MULTI_RANK_GPU_ENABLE"] = "1"   # before NCCL starts (first read at communicator creation)
        return 0, f"{size} ranks on GPU 0 ({ngpu} GPU(s); NCCL {version} with NCCL_MULTI_RANK_GPU_ENABLE=1)"
    return None, (f"{size} ranks need {size} GPUs or NCCL 2.30+ (NCCL_MULTI_RANK_GPU_ENABLE); this machine has {ngpu} "
                  f"and NCCL {version}")


def check_arguments(uid):
    """Argument errors come before NCCL or CUDA is touched."""
    for args, match in [((uid[:5], 2, 0), "128 bytes"), ((uid, 2, 2), "rank=2"), ((uid, 0, 0), "nranks=0")]:
        try:
            bcuda.NcclComm(*args)
        except ValueError as e:
            assert match in str(e), e
        else:
            raise AssertionError(f"NcclComm{args[1:]} did not raise")


def check_sum(comm, nccl, model):
    rank, size = comm.Get_rank(), comm.Get_size()
    n = model.params.size
    mine = np.random.default_rng(100 + rank).standard_normal(n).astype(np.float32)
    want = np.zeros(n, np.float32)
    for r in range(size):   # the ranks' buffers summed in rank order, in float32 (two ranks: exactly NCCL's sum)
        want += np.random.default_rng(100 + r).standard_normal(n).astype(np.float32)
    model._engine.upload("grads", mine)
    nccl.allreduce_sum_grads(model, timeout=60)
    got = np.empty(n, np.float32)
    model._engine.download("grads", got)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    exact = bool(np.array_equal(got, want))
    ok = exact if size == 2 else err < 1e-6
    return ok, f"sum of {n} floats over {size} ranks: {'bit-identical to NumPy' if exact else f'max rel err {err:.2e}'}"


def check_data_parallel(comm, nccl, model, device):
    rank, size = comm.Get_rank(), comm.Get_size()
    batch = tiny_batch()
    rows = np.arange(rank, 4, size)
    model.zero_grad()
    loss = model.forward_backward({k: v[rows] for k, v in batch.items()}, loss_scale=len(rows) / 4,
                                  window_ids=rows, rng_step=3)
    nccl.allreduce_sum_grads(model, timeout=60)
    mean_loss = comm.allreduce(loss * len(rows) / 4)
    whole = tiny_model(device)   # one engine, the whole batch, default window ids 0..3
    whole.zero_grad()
    want_loss = whole.forward_backward(batch, rng_step=3)
    errs = {}
    for name in whole.layout:
        if name == "qa_outputs.bias":   # round-off only (its gradient cancels in the softmax): see tests/test_cuda.py
            continue
        got, want = model.gradient(name), whole.gradient(name)
        scale = float(np.abs(want).max()) or 1.0
        errs[name] = float(np.abs(got - want).max()) / scale
    worst = max(errs, key=errs.get)
    ok = errs[worst] < 1e-4 and abs(mean_loss - want_loss) < 1e-5 * max(1.0, abs(want_loss))
    return ok, (f"rows {rows.tolist()} of 4 per rank + all-reduce = one engine on the whole batch: loss "
                f"{mean_loss:.6f} vs {want_loss:.6f}, worst gradient {worst} rel err {errs[worst]:.1e}")


def time_allreduce(comm, nccl, device, reps=5):
    """The all-reduce of a BERT-base engine's gradient buffer (110M floats): median wall time of `reps` (after one
    warm-up), each from a barrier to the sum's completion, and the ring's bus bandwidth 2 (n-1)/n * bytes / time."""
    from bertqa.config import BertConfig
    from bertqa.model import BertQA
    config = BertConfig.from_dict(dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, initializer_range=0.02, pad_token_id=0))
    model = BertQA(config, seed=1, device=f"cuda:{device}", precision="fp32")
    model._ensure_training_buffers()
    times = []
    for _ in range(reps + 1):
        comm.Barrier()
        t0 = time.perf_counter()
        nccl.allreduce_sum_grads(model, timeout=60)
        times.append(time.perf_counter() - t0)
    nparams = model.params.size
    ms = 1e3 * float(np.median(times[1:]))
    gbs = 2 * (comm.Get_size() - 1) / comm.Get_size() * nparams * 4 / (ms * 1e-3) / 1e9
    return (f"all-reduce of {nparams / 1e6:.1f}M floats (BERT-base gradients): {ms:.2f} ms median of {reps}, "
            f"bus bandwidth {gbs:.0f} GB/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="no GPU: everything up to the communicator")
    ap.add_argument("--no-timing", action="store_true", help="skip the 110M-float timing")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 2:
        say(comm, "run under mpirun -n 2 (or more): one process per rank")
        return 1
    try:
        version, library = bcuda.nccl_version(), bcuda.nccl_library()
    except RuntimeError as e:
        say(comm, f"NOT SHOWN: {e}")
        return NOT_SHOWN
    say(comm, f"NCCL {version} from {library}")
    device, note = layout(comm, version)
    # the unique id: made on rank 0, broadcast over MPI
    uid = comm.bcast(bcuda.nccl_unique_id() if rank == 0 else None, root=0)
    digests = comm.allgather(hashlib.sha256(uid).hexdigest()[:16])
    if len(uid) != 128 or len(set(digests)) != 1:
        say(comm, f"FAILED: the broadcast id differs between ranks: {digests}")
        return 1
    if rank == 0:
        say(comm, f"unique id broadcast over MPI: {len(uid)} bytes, the same on all {size} ranks ({digests[0]})")
    check_arguments(uid)
    if device is None:
        if args.dry_run:
            try:   # the path up to the device check
                bcuda.NcclComm(uid, size, rank, 0)
                msg = "NcclComm was made without a GPU?"
            except RuntimeError as e:
                msg = f"NcclComm without a GPU: {e}"
            if rank == 0:
                say(comm, msg)
                say(comm, f"dry run: argument checks ok; the all-reduce needs a GPU, not run ({note})")
            return 0
        say(comm, f"NOT SHOWN: {note}")
        return NOT_SHOWN
    say(comm, f"device {device}: {note}")
    failed = False
    try:
        nccl = bcuda.NcclComm(uid, size, rank, device)
    except RuntimeError as e:
        say(comm, f"FAILED: {e}")
        return 1
    with nccl:
        model = tiny_model(device)
        model._ensure_training_buffers()
        for name, check in [("sum", lambda: check_sum(comm, nccl, model)),
                            ("data parallel", lambda: check_data_parallel(comm, nccl, model, device))]:
            try:
                ok, msg = check()
            except Exception as e:   # noqa: BLE001 - report and go on to the next check
                ok, msg = False, f"{type(e).__name__}: {e}"
            oks = comm.allgather(ok)
            failed |= not all(oks)
            if rank == 0 or not ok:
                say(comm, f"{name}: {'ok' if all(oks) else 'FAILED'}: {msg}")
        if not args.no_timing and not failed:
            try:
                msg = time_allreduce(comm, nccl, device)
            except Exception as e:   # noqa: BLE001
                msg = f"timing not run: {type(e).__name__}: {e}"
            if rank == 0:
                say(comm, msg)
    comm.Barrier()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
