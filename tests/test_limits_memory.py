"""Issue 22's measure: a malformed model file of at most 2 MB is rejected with peak RSS under 300 MB above the
interpreter's. Each file is loaded in a fresh interpreter that reads its own peak RSS (VmHWM in
/proc/self/status) after importing bertqa and again after the loader refused the file. The address space is
capped at 3 GB above the interpreter's, so a loader that does blow up (as these files made it do) fails the test
instead of the machine.
"""
import json
import os
import struct
import subprocess
import sys
import zipfile

import pytest

from test_limits_loaders import st_file, tensors_pickle, torch_zip

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc/self/status (Linux)")

LIMIT_MB = 300

CHILD = r"""
import json, resource, sys

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

from bertqa import checkpoint as ck
before = status("VmHWM")
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + 3 * 2 ** 30, resource.RLIM_INFINITY))
try:
    ck.load_state_dict(sys.argv[1])
    outcome = "loaded"
except ck.CheckpointError as e:
    outcome = "CheckpointError: " + str(e)
except BaseException as e:
    outcome = f"{type(e).__name__}: {e}"
print(json.dumps({"outcome": outcome, "peak_above_interpreter": status("VmHWM") - before}))
"""


def memo_bomb(folder):
    # LONG_BINPUT 2**26: the unpickler's memo table grows to 2**27 pointers (1 GB), for 10 bytes of pickle.
    return torch_zip(folder / "pytorch_model.bin", b"\x80\x02}r\x00\x00\x00\x04.")


def stride_zero(folder):
    # One float32 element viewed as 16384 x 16384 with strides (0, 0): 1 GB once copied.
    return torch_zip(folder / "pytorch_model.bin", tensors_pickle([("t", "0", 1, 0, (16384, 16384), (0, 0))]),
                     {"0": b"\0" * 4})


def deflated_storage(folder):
    # 1 GB of zero storage deflates to ~1 MB.
    n = 2 ** 28
    path = folder / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", tensors_pickle([("t", "0", n, 0, (n,), (1,))]))
        with z.open("archive/data/0", "w") as f:
            chunk = b"\0" * 2 ** 24
            for _ in range(4 * n // len(chunk)):
                f.write(chunk)
    return path


def repeated_views(folder):
    # 1,000 tensors that are each the whole 1 MB storage.
    n = 2 ** 18
    return torch_zip(folder / "pytorch_model.bin", tensors_pickle([(f"cls.t{i}", "0", n, 0, (n,), (1,))
                                                                    for i in range(1000)]), {"0": b"\0" * (4 * n)})


def overlapping_bf16(folder):
    # 250 BF16 tensors over the same 1 MB of data: 250 x 2 MB of float32.
    n = 2 ** 19
    header = {f"cls.t{i}": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]} for i in range(250)}
    return st_file(folder / "model.safetensors", header, b"\0" * (2 * n))


def many_entries(folder):
    # A 2 MB header of ~28,000 empty tensors.
    entry = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    header, size, i = {}, 0, 0
    while size < 1_900_000:
        header[f"cls.predictions.t{i:07d}"] = entry
        size += 84
        i += 1
    return st_file(folder / "model.safetensors", header)


@pytest.mark.parametrize("make", [memo_bomb, stride_zero, deflated_storage, repeated_views, overlapping_bf16,
                                  many_entries])
def test_malformed_file_rejected_with_bounded_peak_rss(tmp_path, make):
    path = make(tmp_path)
    size = path.stat().st_size
    assert size <= 2 * 10 ** 6
    run = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    peak_mb = result["peak_above_interpreter"] / 2 ** 20
    print(f"{make.__name__}: {size} bytes, {result['outcome'][:160]!r}, peak RSS +{peak_mb:.1f} MB")
    assert result["outcome"].startswith("CheckpointError: " + str(path)), result["outcome"]
    assert peak_mb < LIMIT_MB, f"{make.__name__}: peak RSS {peak_mb:.0f} MB above the interpreter's"
