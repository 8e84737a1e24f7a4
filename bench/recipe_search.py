"""Recipe search for fine-tuning all-MiniLM-L6-v2 on SQuAD (issue 15): trained on train.json, scored on
valid.json only, every run a real `python -m bertqa finetune` command line.

    python bench/recipe_search.py --quick                 # the staged search on subsets (about 35 min on 2 cores)
    python bench/recipe_search.py --quick --stage 3       # one stage (its base is the best run so far)
    python bench/recipe_search.py --quick --table         # the markdown table of what has run (BENCHMARKS.md)
    python bench/recipe_search.py --quick --dry-run       # the commands, without running them

Stages, each built from the results so far (OUT/results.jsonl; a run already there is not run again):
  1. peak learning rate 5e-5, 1e-4, 2e-4, 3e-4 at 2 epochs (warm-up 0.1, batch 16, 384/128, no layer-wise decay);
  2. epochs 1, 3, 5 at stage 1's best learning rate;
  3. at the best (learning rate, epochs) so far (epochs capped at 3, the budget): layer-wise lr decay 0.8, max_seq_length 256 (doc_stride 85, the
     same share of a window), batch 32 (same peak lr), no warm-up, each alone;
  4. seeds 43 and 44 for the best two recipes of at most 3 epochs (seed 42 ran already): the seed spread;
  5. the next lower learning rate at the best recipe, seeds 42-44 (added when stage 4 showed a seed of the best
     recipe failing at 500 questions: is the highest learning rate stable?);
  6. full size only (run it without --quick): the chosen recipe (the defaults) at seeds 42-44, the runner-up
     (2e-4) at seeds 42-43, and one change at a time at seed 42 (lr 5e-4, 4 epochs, 256-token windows, warm-up 0.2,
     which also ran at seed 43), each evaluated after every epoch (--eval_strategy epoch). BENCHMARKS.md's full-size
     table is these runs.

--quick trains on the first --train_samples questions of train.json (default 500) and scores on the first
--eval_samples of valid.json (default 500: a fixed subset, the same for every run), with --jobs runs at a time
(default 2) of --threads OpenMP threads each (default 1): 2 runs x 1 thread use 2 cores better than 1 run x 2.
Without --quick every run takes all 7,235 training and 1,746 validation questions (hours a run on 2 cores).
Each run's folder keeps its log, eval_results.json and training_curve.png; its weights are deleted.
The site's OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, if set, are removed from the runs' environment (a setting of
this workplace that halves sgemm speed; users do not have it).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BERTQA_DATA_DIR", ROOT.parent / "shared" / "data"))

BASE = {"learning_rate": 2e-4, "num_train_epochs": 2.0, "warmup_ratio": 0.1, "per_device_train_batch_size": 16,
        "max_seq_length": 384, "doc_stride": 128, "layerwise_lr_decay": 1.0, "seed": 42}
KEYS = list(BASE)
SHORT = {"learning_rate": "lr", "num_train_epochs": "ep", "warmup_ratio": "wu", "per_device_train_batch_size": "bs",
         "max_seq_length": "T", "doc_stride": "stride", "layerwise_lr_decay": "llrd", "seed": "seed"}


def run_name(cfg: dict) -> str:
    return "-".join(f"{SHORT[k]}{cfg[k]:g}" for k in KEYS)


def recipe(cfg: dict) -> tuple:
    """A run's hyperparameters without its seed."""
    return tuple(cfg[k] for k in KEYS if k != "seed")


def load_results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best(results: list[dict], where=lambda cfg: True) -> dict | None:
    found = [r for r in results if where(r["config"]) and "f1" in r]
    return max(found, key=lambda r: r["f1"]) if found else None


def is_base(cfg: dict, **free) -> bool:
    """cfg differs from BASE only in learning rate, epochs and the keys given."""
    return all(cfg[k] == BASE[k] for k in KEYS if k not in ("learning_rate", "num_train_epochs", "seed", *free))


def stage_configs(stage: int, results: list[dict]) -> list[dict]:
    if stage == 1:
        return [{**BASE, "learning_rate": lr} for lr in (5e-5, 1e-4, 2e-4, 3e-4)]
    if stage == 2:
        b = best(results, lambda c: is_base(c) and c["num_train_epochs"] == 2 and c["seed"] == 42)
        lr = b["config"]["learning_rate"] if b else BASE["learning_rate"]
        return [{**BASE, "learning_rate": lr, "num_train_epochs": e} for e in (1.0, 3.0, 5.0)]
    if stage == 3:
        b = best(results, lambda c: is_base(c) and c["seed"] == 42)
        top = {**BASE, **({k: b["config"][k] for k in ("learning_rate", "num_train_epochs")} if b else {})}
        top["num_train_epochs"] = min(top["num_train_epochs"], 3.0)   # the budget: 5 variants x at most 3 epochs
        return [{**top, "layerwise_lr_decay": 0.8}, {**top, "max_seq_length": 256, "doc_stride": 85},
                {**top, "per_device_train_batch_size": 32}, {**top, "warmup_ratio": 0.0}]
    if stage == 4:
        ranked, seen = [], set()
        runs = [r for r in results if "f1" in r and r["config"]["seed"] == 42 and r["config"]["num_train_epochs"] <= 3]
        for r in sorted(runs, key=lambda r: -r["f1"]):
            if recipe(r["config"]) not in seen:
                seen.add(recipe(r["config"]))
                ranked.append(r["config"])
        return [{**cfg, "seed": s} for cfg in ranked[:2] for s in (43, 44)]
    if stage == 5:   # the next lower learning rate of stage 1 at the best recipe, 3 seeds: is the best lr stable?
        b = best(results, lambda c: is_base(c) and c["seed"] == 42 and c["num_train_epochs"] <= 3)
        top = b["config"] if b else BASE
        lower = max((lr for lr in (5e-5, 1e-4, 2e-4, 3e-4) if lr < top["learning_rate"]), default=None)
        return [] if lower is None else [{**top, "learning_rate": lower, "seed": s} for s in (42, 43, 44)]
    if stage == 6:
        chosen = {**BASE, "learning_rate": 3e-4, "num_train_epochs": 3.0}
        return ([{**chosen, "seed": s} for s in (42, 43, 44)] +
                [{**chosen, "learning_rate": 2e-4, "seed": s} for s in (42, 43)] +
                [{**chosen, "learning_rate": 5e-4}, {**chosen, "num_train_epochs": 4.0},
                 {**chosen, "max_seq_length": 256, "doc_stride": 85}] +
                [{**chosen, "warmup_ratio": 0.2, "seed": s} for s in (42, 43)])
    raise ValueError(f"no stage {stage}")


def command(cfg: dict, a, out_dir: Path, stage: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "bertqa", "finetune", "--model_name_or_path", a.model,
           "--train_file", str(DATA / "squad" / "train.json"), "--validation_file", str(DATA / "squad" / "valid.json"),
           "--output_dir", str(out_dir), "--overwrite_output_dir", "--save_steps", "0", "--logging_steps", "10",
           "--disable_tqdm"]
    for k in KEYS:
        cmd += [f"--{k}", f"{cfg[k]:g}" if isinstance(cfg[k], float) else str(cfg[k])]
    if a.quick:
        cmd += ["--max_train_samples", str(a.train_samples), "--max_eval_samples", str(a.eval_samples)]
    if stage == 6:
        cmd += ["--eval_strategy", "epoch"]   # the curve: EM / F1 after every epoch
    return cmd


def run_one(cfg: dict, stage: int, a, out: Path) -> dict:
    name = run_name(cfg)
    run_dir = out / name
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(OMP_NUM_THREADS=str(a.threads), PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = command(cfg, a, run_dir, stage)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    record = {"name": name, "stage": stage, "config": cfg, "wall_seconds": round(wall, 1), "threads": a.threads,
              "jobs": a.jobs, "train_samples": a.train_samples if a.quick else None,
              "eval_samples": a.eval_samples if a.quick else None, "returncode": p.returncode}
    if p.returncode == 0:
        r = json.loads((run_dir / "eval_results.json").read_text())
        record.update({k: r[k] for k in ("exact_match", "f1", "train_seconds", "train_steps", "train_sequences",
                                         "eval_seconds", "eval_examples")})
        for heavy in ("model.safetensors", "best-model"):
            path = run_dir / heavy
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    else:
        record["error"] = p.stderr[-2000:]
    print(f"[stage {stage}] {name}: " + (f"EM {record['exact_match']:.2f} F1 {record['f1']:.2f}, train "
                                         f"{record['train_seconds'] / 60:.1f} min, wall {wall / 60:.1f} min"
                                         if p.returncode == 0 else f"FAILED ({p.returncode}): {p.stderr[-300:]}"),
          flush=True)
    return record


def run_stage(stage: int, a, out: Path) -> None:
    results = load_results(out)
    done = {r["name"] for r in results if r.get("returncode") == 0}
    if stage == 6 and a.quick:
        raise SystemExit("stage 6 is the full-size comparison: run it without --quick")
    todo = [c for c in stage_configs(stage, results) if run_name(c) not in done]
    print(f"stage {stage}: {len(todo)} run(s): {', '.join(run_name(c) for c in todo) or 'none'}", flush=True)
    if a.dry_run:
        for c in todo:
            print("  " + " ".join(command(c, a, out / run_name(c), stage)))
        return
    with ThreadPoolExecutor(max_workers=a.jobs) as pool, open(out / "results.jsonl", "a") as f:
        for record in pool.map(lambda c: run_one(c, stage, a, out), todo):
            f.write(json.dumps(record) + "\n")
            f.flush()


def table(out: Path) -> str:
    results = [r for r in load_results(out) if "f1" in r]
    lines = ["| stage | lr | epochs | warm-up | batch | T / stride | llrd | seed | steps | EM | F1 | train min | "
             "eval s | wall min |", "|" + "---|" * 14]
    for r in sorted(results, key=lambda r: (r["stage"], -r["f1"])):
        c = r["config"]
        lines.append(f"| {r['stage']} | {c['learning_rate']:g} | {c['num_train_epochs']:g} | {c['warmup_ratio']:g} | "
                     f"{c['per_device_train_batch_size']} | {c['max_seq_length']} / {c['doc_stride']} | "
                     f"{c['layerwise_lr_decay']:g} | {c['seed']} | {r['train_steps']} | {r['exact_match']:.2f} | "
                     f"**{r['f1']:.2f}** | {r['train_seconds'] / 60:.1f} | {r['eval_seconds']:.0f} | "
                     f"{r['wall_seconds'] / 60:.1f} |")
    groups = {}
    for r in results:
        groups.setdefault(recipe(r["config"]), []).append(r)
    spread = [(k, rs) for k, rs in groups.items() if len(rs) >= 2]
    if spread:
        lines += ["", "| recipe (lr, epochs, warm-up, batch, T, stride, llrd) | seeds | F1 mean ± sd | F1 min–max | "
                      "EM mean ± sd |", "|---|---|---|---|---|"]
        for k, rs in sorted(spread, key=lambda kv: -statistics.mean(r["f1"] for r in kv[1])):
            f1 = [r["f1"] for r in rs]
            em = [r["exact_match"] for r in rs]
            lines.append(f"| {', '.join(f'{v:g}' for v in k)} | {', '.join(str(r['config']['seed']) for r in rs)} | "
                         f"{statistics.mean(f1):.2f} ± {statistics.stdev(f1):.2f} | {min(f1):.2f}–{max(f1):.2f} | "
                         f"{statistics.mean(em):.2f} ± {statistics.stdev(em):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="subsets of train.json and valid.json (see above)")
    p.add_argument("--train_samples", type=int, default=500)
    p.add_argument("--eval_samples", type=int, default=500)
    p.add_argument("--stage", default="all", help="1, 2, 3, 4, 5, 6 (full size) or all (1-5, in order)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per run")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--out", default=None, help="default runs/recipe-search-quick (or -full)")
    p.add_argument("--table", action="store_true", help="print the table of the results so far and exit")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out or ROOT / "runs" / ("recipe-search-quick" if a.quick else "recipe-search-full"))
    if a.table:
        print(table(out))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    stages = [1, 2, 3, 4, 5] if a.stage == "all" else [int(s) for s in a.stage.split(",")]
    for s in stages:
        run_stage(s, a, out)
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
