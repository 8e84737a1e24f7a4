"""`bertqa finetune`'s training speed (windows/s) on the full recipe's data, for two builds side by side.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/finetune_speed.py --tree before=/tmp/wt-before \
        --tree after=. --steps 40 --rounds 2
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/finetune_speed.py --tree fp32=. --tree bf16=. \
        --precision bf16=bf16      # one tree in two precisions (finetune --precision)

Each tree is a source checkout with its C extension built in place (`setup.py build_ext --inplace`); its
`python -m bertqa finetune` runs the first --steps optimizer steps of the full recipe (all of train.json, T=384,
stride 128, batch 16, lr 1e-4, seed 42: the same windows in the same order in every tree) with PYTHONPATH set
to the tree, in alternating rounds (this machine's speed drifts within minutes). Prints each run's windows/s as
`bertqa finetune` reports it (training time only) and the ratio of the medians.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BERTQA_DATA_DIR", REPO.parent / "shared" / "data"))


def run(tree: Path, steps: int, precision: str | None = None) -> float:
    with tempfile.TemporaryDirectory(prefix="bertqa-speed-") as out:
        cmd = [sys.executable, "-m", "bertqa", "finetune", "--model_name_or_path", "all-MiniLM-L6-v2",
               "--train_file", str(DATA / "squad" / "train.json"), "--output_dir", out,
               "--max_seq_length", "384", "--doc_stride", "128", "--per_device_train_batch_size", "16",
               "--learning_rate", "1e-4", "--num_train_epochs", "1", "--seed", "42", "--max_steps", str(steps),
               "--save_steps", "0", "--logging_steps", str(steps), "--disable_tqdm", "--overwrite_output_dir"]
        if precision:
            cmd += ["--precision", precision]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
        m = re.search(r"trained (\d+) steps in ([0-9.]+) s \(([0-9.]+) sequences/s\)", p.stdout)
        if p.returncode or not m:
            raise SystemExit(f"{tree}: {' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        return float(m.group(3))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=PATH", help="a built source tree")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", action="append", default=[], metavar="NAME=PRECISION",
                    help="run tree NAME in this precision (finetune --precision fp32|bf16)")
    a = ap.parse_args()
    precision = dict(p.split("=", 1) for p in a.precision)
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in a.tree]
    print(f"full recipe (train.json, T=384, batch 16), first {a.steps} steps; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}", flush=True)
    rates = {name: [] for name, _ in trees}
    for r in range(a.rounds):
        for name, tree in (trees if r % 2 == 0 else trees[::-1]):
            rates[name].append(run(tree, a.steps, precision.get(name)))
            print(f"  round {r + 1} {name}: {rates[name][-1]:.2f} windows/s", flush=True)
    base = statistics.median(rates[trees[0][0]])
    print("\n| build | windows/s (runs) | median | vs " + trees[0][0] + " |\n|---|---|---:|---:|")
    for name, _ in trees:
        med = statistics.median(rates[name])
        print(f"| {name} | {', '.join(f'{x:.2f}' for x in rates[name])} | {med:.2f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
