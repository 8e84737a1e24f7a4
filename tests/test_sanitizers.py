"""The kernel tests again, against a build instrumented with AddressSanitizer and UndefinedBehaviorSanitizer:
any out-of-bounds access, use after free or undefined behaviour in the C core aborts the run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def have_asan():
    if shutil.which("gcc") is None:
        return False
    lib = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(lib) and os.path.exists(lib)


@pytest.mark.skipif(not have_asan(), reason="gcc with libasan is needed for the sanitizer build")
@pytest.mark.skipif(os.environ.get("BERTQA_SKIP_SANITIZE") == "1", reason="BERTQA_SKIP_SANITIZE=1")
@pytest.mark.skipif(os.environ.get("BERTQA_IN_SANITIZER") == "1", reason="already inside the sanitizer run")
def test_kernels_clean_under_asan_and_ubsan():
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("LD_PRELOAD", None)
    r = subprocess.run(["bash", str(REPO / "tests" / "sanitize.sh"), "-x"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "failed" not in r.stdout, tail
