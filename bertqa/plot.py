"""The training curve of a finetune run: output_dir/training_curve.png, drawn from train_log.jsonl and
eval_results.json when the run ends.

    plot_run("runs/minilm-squad")      # -> Path of the PNG, or None without matplotlib (pip install 'bertqa[plot]')
    draw_run("runs/minilm-squad")      # -> the matplotlib Figure itself

A series of a single point (one evaluation, one logged step) is drawn with a marker: a line through one point
alone draws nothing.

Top panel: the logged training loss per step (each point the mean over its logging window) and the learning rate
on a second axis; bottom panel: EM and F1 of each evaluation during training, and the final model's (a star;
with --load_best_model_at_end it sits at the best evaluation's step). matplotlib is an optional extra: it is
imported here only, through its object API (no pyplot, no global backend change in the caller's process).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from ._atomic import atomic_write

logger = logging.getLogger(__name__)


def _records(output_dir: Path) -> tuple[list[dict], list[dict], dict]:
    steps, evals, final = [], [], {}
    log = output_dir / "train_log.jsonl"
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(r, dict) or "step" not in r:
                continue
            (evals if "eval_f1" in r else steps).append(r)
    results = output_dir / "eval_results.json"
    if results.is_file():
        try:
            final = json.loads(results.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            final = {}
    return steps, evals, final


def plot_run(output_dir: str | os.PathLike, path: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """Draw the run in output_dir into path (default output_dir/training_curve.png), atomically; returns the path,
    or None (one log line) when matplotlib is missing or the log holds no step."""
    output_dir = Path(output_dir)
    path = Path(path) if path is not None else output_dir / "training_curve.png"
    fig = draw_run(output_dir)
    if fig is None:
        return None
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _marked(n_points: int) -> dict:
    """Line style arguments that keep a series visible: a line of one point draws nothing without a marker."""
    return {"marker": "o", "ms": 4} if n_points == 1 else {}


def draw_run(output_dir: str | os.PathLike):
    """The training curve of the run in output_dir as a matplotlib Figure (two Axes: loss and learning rate, and
    EM/F1), or None (one log line) when matplotlib is missing or the log holds no step."""
    output_dir = Path(output_dir)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("training curve not drawn: matplotlib is not installed (pip install 'bertqa[plot]')")
        return None
    steps, evals, final = _records(output_dir)
    if not steps:
        logger.info("training curve not drawn: %s has no training steps", output_dir / "train_log.jsonl")
        return None

    fig = Figure(figsize=(8, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    x = [r["step"] for r in steps]
    top.plot(x, [r["loss"] for r in steps], color="tab:blue", lw=1.2, label="training loss", **_marked(len(x)))
    top.set_ylabel("loss (mean over each logging window)")
    top.grid(alpha=0.3)
    lr_axis = top.twinx()
    lr_axis.plot(x, [r["lr"] for r in steps], color="tab:orange", lw=1.0, ls="--", label="learning rate",
                 **_marked(len(x)))
    lr_axis.set_ylabel("peak-layer learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lines = top.get_lines() + lr_axis.get_lines()
    top.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=8)

    if evals:
        ex = [r["step"] for r in evals]
        bottom.plot(ex, [r["eval_exact_match"] for r in evals], "o-", color="tab:green", label="EM")
        bottom.plot(ex, [r["eval_f1"] for r in evals], "s-", color="tab:red", label="F1")
    if "f1" in final:
        at = final.get("best_model_step", final.get("train_steps", x[-1]))
        which = "best model's" if "best_model_step" in final else "final"
        bottom.plot([at], [final["f1"]], "*", ms=13, color="tab:red", label=f"{which} F1 {final['f1']:.1f}")
        bottom.plot([at], [final["exact_match"]], "*", ms=13, color="tab:green",
                    label=f"{which} EM {final['exact_match']:.1f}")
    scores = [v for line in bottom.get_lines() for v in line.get_ydata()]
    if scores:   # from 0, so that EM and F1 stars are never cut at the edge
        bottom.set_ylim(0, min(100.0, max(scores) * 1.1 + 2))
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("validation EM / F1")
    bottom.grid(alpha=0.3)
    if bottom.get_lines():
        bottom.legend(loc="lower right", fontsize=8)
    else:
        bottom.text(0.5, 0.5, "no evaluation", ha="center", va="center", transform=bottom.transAxes)
    title = output_dir.name or str(output_dir)
    if "f1" in final:
        title += f": EM {final['exact_match']:.1f} / F1 {final['f1']:.1f} on {final.get('eval_examples', '?')} questions"
    if "train_seconds" in final:
        title += f", {final['train_seconds'] / 60:.1f} min training"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
