"""Files that following README.md creates in the checkout are ignored by git, and no source file is (issue 21)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# what the README's commands write into the checkout's root
MADE_BY_README = ["model.tar.gz", "model.onnx", "model-int8.onnx", "model-fused.onnx", "eval/eval_results.json",
                  "runs/minilm-squad/config.json", "out/model.safetensors", "job/input/config/hyperparameters.json",
                  "wheels/numpy-2.0-cp311-cp311-linux_x86_64.whl", ".venv/bin/bertqa",
                  "bertqa/_C.cpython-311-x86_64-linux-gnu.so"]


def _ignored(paths):
    r = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(paths),
                       capture_output=True, text=True)
    if r.returncode not in (0, 1):
        pytest.skip(f"git check-ignore failed: {r.stderr.strip()}")
    return set(r.stdout.split())


@pytest.fixture(scope="module", autouse=True)
def _git_checkout():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")


def test_files_the_readme_makes_are_ignored():
    assert set(MADE_BY_README) - _ignored(MADE_BY_README) == set()


def test_no_tracked_file_is_ignored():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert _ignored(tracked) == set()
