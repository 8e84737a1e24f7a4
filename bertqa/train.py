"""Fine-tuning for SQuAD: TrainingArguments (transformers' run_qa.py names), the Trainer loop, evaluation.

    args = TrainingArguments(output_dir="runs/minilm", max_seq_length=256, doc_stride=64)
    results = finetune("all-MiniLM-L6-v2", "train.json", "valid.json", args)   # {"exact_match", "f1", ...}

The loop (Trainer.train), one optimizer step at a time:

    lr = linear_schedule(step, total_steps, warmup_steps, learning_rate)      # warmup, then linear decay
    zero_grad; forward_backward on this rank's share of each micro-batch (loss_scale = share / step's windows)
    all-reduce the gradients (data parallel under mpirun; see Trainer)
    optimizer_step(lr, ...)                                                     # AdamW + global-norm clipping
    log every logging_steps, evaluate per --eval_strategy, checkpoint every save_steps

Data order: epoch e visits the training features in the order `np.random.default_rng([seed, e]).permutation`;
a step takes the next global batch of it, its micro-batches consecutive slices (the engine computes no padding).
Dropout masks are keyed by (model.seed, epoch, the window's position in that order). A checkpoint therefore holds all the
state the rest of the run depends on: the parameters, Adam moments and counters (model.save_training_state),
and the epoch, the position in it and the data RNG state (trainer_state.json); resuming from it gives the
same subsequent losses, bit for bit, as a run that was never interrupted.

Files in output_dir:
    train_log.jsonl           one JSON object per logging step (step, epoch, loss, lr, grad_norm, seq_per_s,
                              elapsed) and per evaluation (step, eval_exact_match, eval_f1, ...)
    checkpoint-N/             model (save_pretrained), training_state.bin, trainer_state.json and, written last,
                              manifest.json (every file's size and sha256); built in a temporary folder and
                              renamed, so a crash mid-save leaves the previous ones intact. Resuming verifies the
                              checkpoint it picks and falls back from a damaged one (resolve_resume)
    config.json, model.safetensors, tokenizer files      the final model (save_pretrained); with
                              --load_best_model_at_end the best evaluation's (kept in memory on every rank, and
                              in best-model/ for a resumed run), eval_results.json's best_model_step says which
    eval_results.json, predictions.json                  the final evaluation
    training_curve.png        loss and learning rate per step, EM/F1 per evaluation (bertqa.plot; needs matplotlib)

Evaluation during training: --eval_strategy epoch (after each epoch) or steps (every --eval_steps); its time is
not training time (train_seconds, the log's elapsed). --bf16 (or --precision bf16) trains and evaluates with bf16
matrix products (fp32 master weights, gradients and AdamW); trainer_state.json records the precision and a run
resumes only in the one it began in. --layerwise_lr_decay d < 1 gives each tensor
lr * model.layerwise_lr_scale (the head and top layer 1, each layer below one more factor d).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ._atomic import atomic_write, fsync_dir
from .distributed import Distributed, shard
from .precision import PRECISION_ENV, PRECISIONS, precision_from_env
from .squad import Example, Features, evaluate as squad_evaluate, file_sha256, load_features, load_squad, postprocess_predictions

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
TRAINING_STATE_NAME = "training_state.bin"
TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_ARGS_NAME = "training_args.json"
LOG_NAME = "train_log.jsonl"
BEST_MODEL_NAME = "best-model"
CURVE_NAME = "training_curve.png"
EVAL_RESULTS_NAME = "eval_results.json"
PREDICTIONS_NAME = "predictions.json"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Bumped when trainer_state.json changes meaning; a checkpoint of another format is not resumed.
# 2: position counts windows (not micro-batches), world_size and global_batch_size recorded, dropout masks keyed
#    by (epoch, window position).
TRAINER_STATE_FORMAT = 2


class TrainingError(ValueError):
    """A user-level problem with a run (arguments, output folder, checkpoint to resume); the message says which."""


# =============================================================================================================
# Arguments
# =============================================================================================================


def _arg(default: Any, help: str, commands: str = "finetune") -> Any:
    """A dataclass field with its --help text and the CLI sub-commands ("finetune evaluate") that take it."""
    return field(default=default, metadata={"help": help, "commands": tuple(commands.split())})


@dataclass
class TrainingArguments:
    """Hyper-parameters and run settings, named as transformers' run_qa.py / TrainingArguments name them."""

    output_dir: str = _arg(None, "where checkpoints, the log, the final model and the results go",
                           "finetune evaluate")
    per_device_train_batch_size: int = _arg(16, "sequences (windows) per micro-batch")
    per_device_eval_batch_size: int = _arg(64, "sequences per prediction batch", "finetune evaluate")
    # learning_rate, num_train_epochs (and the other defaults: warm-up 0.1, batch 16, 384/128, no layer-wise decay):
    # the recipe chosen on valid.json by bench/recipe_search.py (BENCHMARKS.md, issue 15)
    learning_rate: float = _arg(3e-4, "peak AdamW learning rate")
    num_train_epochs: float = _arg(3.0, "epochs (fractions allowed); ignored when max_steps > 0")
    max_steps: int = _arg(-1, "optimizer steps in all; > 0 overrides num_train_epochs")
    warmup_ratio: float = _arg(0.1, "share of the steps spent warming the learning rate up from 0")
    warmup_steps: int = _arg(0, "warmup steps; > 0 overrides warmup_ratio")
    weight_decay: float = _arg(0.01, "AdamW decoupled weight decay (not on biases and LayerNorm)")
    adam_beta1: float = _arg(0.9, "AdamW beta1")
    adam_beta2: float = _arg(0.999, "AdamW beta2")
    adam_epsilon: float = _arg(1e-8, "AdamW epsilon")
    max_grad_norm: float = _arg(1.0, "clip the global gradient norm to this (0: no clipping)")
    gradient_accumulation_steps: int = _arg(1, "micro-batches per optimizer step")
    seed: int = _arg(42, "seed of the data order, dropout and a freshly initialised QA head",
                     "finetune evaluate predict")
    logging_steps: int = _arg(10, "log (and update the progress bar's averages) every N steps")
    eval_steps: int = _arg(0, "evaluate every N steps (0: only at the end)")
    eval_strategy: Optional[str] = _arg(None, "evaluate during training: no, steps (every --eval_steps), epoch (after "
                                              "each epoch) (default: steps when --eval_steps > 0, else no)")
    load_best_model_at_end: bool = _arg(False, "keep the model of the best evaluation during training "
                                               "(--metric_for_best_model) as the final model, not the last step's")
    metric_for_best_model: str = _arg("f1", "f1 or exact_match: what --load_best_model_at_end compares")
    layerwise_lr_decay: float = _arg(1.0, "layer-wise learning-rate decay: the QA head and the top layer get the "
                                          "learning rate, each layer below one more factor of this, the embeddings "
                                          "the last (1.0: off)")
    save_steps: int = _arg(500, "write a checkpoint every N steps (0: none)")
    save_total_limit: Optional[int] = _arg(None, "keep at most this many checkpoints (oldest deleted first)")
    max_seq_length: int = _arg(384, "tokens per window: [CLS] question [SEP] context [SEP]",
                               "finetune evaluate predict")
    doc_stride: int = _arg(128, "tokens shared by consecutive windows of a long context",
                           "finetune evaluate predict")
    max_query_length: int = _arg(64, "question tokens kept", "finetune evaluate predict")
    max_answer_length: int = _arg(30, "longest answer span, in tokens", "finetune evaluate predict")
    n_best_size: int = _arg(20, "best starts x best ends considered per window", "finetune evaluate predict")
    version_2_with_negative: bool = _arg(False, "SQuAD v2.0: questions may have no answer", "finetune evaluate")
    null_score_diff_threshold: float = _arg(0.0, "v2.0: answer '' when null score - best score exceeds this",
                                            "finetune evaluate")
    max_train_samples: Optional[int] = _arg(None, "train on the first N questions only")
    max_eval_samples: Optional[int] = _arg(None, "evaluate on the first N questions only", "finetune evaluate")
    resume_from_checkpoint: Optional[str] = _arg(None, "checkpoint folder to resume from ('latest': the newest "
                                                       "in output_dir)")
    overwrite_output_dir: bool = _arg(False, "start afresh even if output_dir holds checkpoints (deletes them)")
    device: str = _arg("cpu", "cpu or cuda", "finetune evaluate predict")
    bf16: bool = _arg(False, "train and evaluate in bf16: bf16 inputs to the matrix products, fp32 master weights, "
                             "gradients and AdamW (the CPU needs AVX-512 BF16); the same as --precision bf16")
    precision: Optional[str] = _arg(None, "the engine's matrix products: fp32, bf16 (the CPU needs AVX-512 BF16) or "
                                          "int8 (inference only, CPU only: AVX-512 VNNI) (default: evaluate and "
                                          "predict $BERTQA_PRECISION; else fp32 on the CPU, bf16 on cuda)",
                                    "finetune evaluate predict")
    cache_dir: Optional[str] = _arg(None, "feature cache folder (default $BERTQA_CACHE_DIR or ~/.cache/bertqa)",
                                    "finetune evaluate")
    disable_tqdm: Optional[bool] = _arg(None, "no progress bars (default: bars only on a terminal)",
                                        "finetune evaluate")

    def validate(self, command: str = "finetune") -> "TrainingArguments":
        """Raise TrainingError naming the first argument with an impossible value; returns self."""
        def bad(name: str, what: str) -> None:
            raise TrainingError(f"--{name} {what}, got {getattr(self, name)!r}")

        def positive_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                bad(name, "must be a positive integer")

        def number(name: str, lo: float, hi: float = math.inf, lo_open=False, hi_open=True) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
                bad(name, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")

        if command in ("finetune", "evaluate") and not self.output_dir:
            raise TrainingError("--output_dir is required")
        for name in ("per_device_eval_batch_size", "max_seq_length", "max_query_length", "max_answer_length",
                     "n_best_size"):
            positive_int(name)
        positive_int("max_eval_samples", allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            bad("seed", "must be an integer in [0, 2**63)")
        if self.max_seq_length > 4096:
            bad("max_seq_length", "must be at most 4096")
        if isinstance(self.doc_stride, bool) or not isinstance(self.doc_stride, int) or self.doc_stride < 0:
            bad("doc_stride", "must be a non-negative integer")
        room = self.max_seq_length - self.max_query_length - 3  # context tokens per window, at the least
        if room < 1:
            raise TrainingError(f"--max_seq_length {self.max_seq_length} leaves no room for context after a "
                                f"question of --max_query_length {self.max_query_length} tokens and 3 special "
                                f"tokens")
        if self.doc_stride >= room:
            raise TrainingError(f"--doc_stride {self.doc_stride} must be less than the context tokens per window "
                                f"(max_seq_length - max_query_length - 3 = {room}), or windows would not advance")
        number("null_score_diff_threshold", -math.inf)
        if self.device not in ("cpu", "cuda"):
            bad("device", "must be 'cpu' or 'cuda'")
        self.resolved_precision(command)
        if command != "finetune":
            return self
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            positive_int(name)
        positive_int("max_train_samples", allow_none=True)
        positive_int("save_total_limit", allow_none=True)
        for name in ("max_steps", "warmup_steps", "eval_steps", "save_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 0 and name != "max_steps"):
                bad(name, "must be a non-negative integer" if name != "max_steps" else "must be an integer")
        number("learning_rate", 0.0, lo_open=True)
        if self.max_steps <= 0:
            number("num_train_epochs", 0.0, lo_open=True)
        number("warmup_ratio", 0.0, 1.0)
        number("weight_decay", 0.0)
        number("adam_beta1", 0.0, 1.0)
        number("adam_beta2", 0.0, 1.0)
        number("adam_epsilon", 0.0, lo_open=True)
        number("max_grad_norm", 0.0)
        number("layerwise_lr_decay", 0.0, 1.0, lo_open=True, hi_open=False)
        if self.eval_strategy not in (None, "no", "steps", "epoch"):
            bad("eval_strategy", "must be no, steps or epoch")
        if self.eval_strategy == "steps" and self.eval_steps < 1:
            raise TrainingError("--eval_strategy steps needs --eval_steps N > 0")
        if self.metric_for_best_model not in ("f1", "exact_match"):
            bad("metric_for_best_model", "must be f1 or exact_match")
        if self.load_best_model_at_end and self.resolved_eval_strategy() == "no":
            raise TrainingError("--load_best_model_at_end needs evaluations during training: --eval_strategy epoch, "
                                "or steps with --eval_steps N")
        return self

    def resolved_precision(self, command: str = "finetune") -> Optional[str]:
        """The precision the model runs in: --bf16 or --precision; for evaluate and predict else $BERTQA_PRECISION
        (finetune does not read it: a serving setting must not change how a model is trained); None: the
        device's default (bertqa.model.check_precision: fp32 on the CPU, bf16 on cuda). TrainingError for an
        unknown name, --bf16 beside another --precision, or int8 for finetune."""
        if self.precision is not None and self.precision not in PRECISIONS:
            raise TrainingError(f"--precision must be fp32, bf16 or int8, got {self.precision!r}")
        if self.bf16:
            if self.precision not in (None, "bf16"):
                raise TrainingError(f"--bf16 and --precision {self.precision} disagree: give one of them")
            precision = "bf16"
        elif self.precision is not None or command == "finetune":
            precision = self.precision
        else:
            try:
                precision = precision_from_env()
            except ValueError as e:
                raise TrainingError(str(e)) from None
        if command == "finetune" and precision == "int8":
            raise TrainingError("--precision int8 is for inference (evaluate, predict, serve): fine-tune in bf16 or "
                                "fp32, then load the saved model with --precision int8")
        return precision

    def resolved_eval_strategy(self) -> str:
        """no, steps or epoch: --eval_strategy, or steps when only --eval_steps is given."""
        if self.eval_strategy is not None:
            return self.eval_strategy
        return "steps" if self.eval_steps > 0 else "no"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# =============================================================================================================
# Schedule and data order
# =============================================================================================================


def linear_schedule(step: int, total_steps: int, warmup_steps: int, learning_rate: float) -> float:
    """Learning rate of the optimizer step taken after `step` completed steps.

    transformers' get_linear_schedule_with_warmup, whose scheduler.step() follows optimizer.step(), so the
    first step (step=0) runs at lr * 0 when there is warmup: lr * step / warmup during warmup, then
    lr * (total - step) / (total - warmup), never below 0.
    """
    if step < warmup_steps:
        return learning_rate * (float(step) / float(max(1, warmup_steps)))
    return learning_rate * max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def data_rng_state(seed: int, epoch: int) -> dict:
    """The bit-generator state that orders epoch `epoch` (JSON-serialisable, stored in checkpoints)."""
    return np.random.default_rng([seed, epoch]).bit_generator.state


def epoch_order(rng_state: dict, n: int) -> np.ndarray:
    """[n] int64: the permutation of the training features for the epoch whose data RNG state is rng_state."""
    bit_generator = getattr(np.random, rng_state["bit_generator"])()
    bit_generator.state = rng_state
    return np.random.Generator(bit_generator).permutation(n)


@dataclass(frozen=True)
class TrainPlan:
    """How many windows, micro-batches and optimizer steps a run takes (transformers' Trainer arithmetic).

    A step takes the next global_batch = world_size x batch_size x accumulation windows of the epoch's order
    (the epoch's last step takes what is left); each of its `accumulation` micro-batches takes the next
    world_size x batch_size of them, split over the ranks. In one process that is ceil(N / batch) micro-batches
    an epoch, the last possibly short, and an epoch's leftover micro-batches make one last, shorter step.
    """

    n_features: int
    batch_size: int
    accumulation: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    world_size: int = 1

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accumulation

    @classmethod
    def from_args(cls, n_features: int, args: TrainingArguments, world_size: int = 1) -> "TrainPlan":
        if n_features < 1:
            raise TrainingError("no training features: the training file has no usable questions")
        bs, k = args.per_device_train_batch_size, args.gradient_accumulation_steps
        micro = -(-n_features // (world_size * bs))
        steps_per_epoch = -(-n_features // (world_size * bs * k))   # = ceil(micro / k)
        total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_train_epochs * steps_per_epoch))
        warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(total * args.warmup_ratio)
        return cls(n_features, bs, k, micro, steps_per_epoch, total, warmup, world_size)

    def step_shares(self, lo: int, rank: int) -> list[slice]:
        """The windows of the step that starts at position `lo` of the epoch's order which rank `rank` runs:
        one slice of positions per micro-batch (possibly empty in an epoch's last step). Full micro-batches
        give each rank batch_size consecutive windows; a short one is shared out as evenly as it goes."""
        hi = min(lo + self.global_batch, self.n_features)
        per_micro = self.world_size * self.batch_size
        shares = []
        for m_lo in range(lo, hi, per_micro):
            m_hi = min(m_lo + per_micro, hi)
            part = shard(m_hi - m_lo, self.world_size, rank)
            shares.append(slice(m_lo + part.start, m_lo + part.stop))
        return shares


@dataclass
class TrainerState:
    """Where a run stands, saved as trainer_state.json in each checkpoint.

    epoch/position: the next step starts at window `position` of epoch `epoch`'s order, which comes from
    data_rng_state. The log_* fields carry a logging window that a checkpoint cut in two.
    global_batch_size = world_size x per_device_train_batch_size x gradient_accumulation_steps: a run resumes
    with any split of the same global batch (the same run, up to the order of float sums).
    """

    global_step: int = 0
    optimizer_steps: int = 0  # model.step: less than global_step when the engine skipped non-finite steps
    epoch: int = 0
    position: int = 0
    data_seed: int = 0
    data_rng_state: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    sequences: int = 0
    log_loss_sum: float = 0.0
    log_steps: int = 0
    total_steps: int = 0
    n_features: int = 0
    features_sha256: str = ""
    per_device_train_batch_size: int = 0
    gradient_accumulation_steps: int = 0
    world_size: int = 1
    global_batch_size: int = 0
    best_step: int = 0            # --load_best_model_at_end: the step of the best evaluation so far (0: none yet)
    best_metric: Optional[float] = None
    # What the features were made with (--max_seq_length, --doc_stride, --max_query_length, the tokenizer's
    # vocabulary and lower-casing): a resumed run must use the same, and is told which differs.
    preprocessing: dict = field(default_factory=dict)
    # The model's precision (fp32, bf16): a run resumes in the precision it began in (None: not recorded, from
    # before precisions were recorded, or a model without one).
    precision: Optional[str] = None
    manifest: str = MANIFEST_NAME  # the checkpoint holds this manifest (a state naming it without it: incomplete)
    format: int = TRAINER_STATE_FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "TrainerState":
        names = {f.name for f in dataclasses.fields(cls)}
        if isinstance(d.get("format"), int) and d["format"] < TRAINER_STATE_FORMAT:
            raise TrainingError(f"{source}: written by an earlier bertqa (trainer state format {d['format']}, this "
                                f"version reads {TRAINER_STATE_FORMAT}: data positions and dropout keys changed "
                                f"meaning), so it cannot be resumed exactly; start the run afresh "
                                f"(--overwrite_output_dir) or finish it with the bertqa that began it")
        missing = sorted(names - set(d) - _OPTIONAL_STATE)
        if missing or d.get("format") != TRAINER_STATE_FORMAT:
            raise TrainingError(f"{source}: not a trainer state of format {TRAINER_STATE_FORMAT} "
                                f"(missing {missing})" if missing else
                                f"{source}: trainer state format {d.get('format')!r}, expected {TRAINER_STATE_FORMAT}")
        return cls(**{k: d[k] for k in names if k in d})


# added to format 2 later: absent in older checkpoints
_OPTIONAL_STATE = {"best_step", "best_metric", "preprocessing", "manifest", "precision"}


def features_fingerprint(features: Features) -> str:
    """sha256 of the training inputs and labels: a resumed run must see the very same features."""
    h = hashlib.sha256()
    for name in ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"):
        a = np.ascontiguousarray(getattr(features, name))
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# =============================================================================================================
# Prediction and evaluation
# =============================================================================================================


# Without a progress bar (not a terminal, or --disable_tqdm) an evaluation logs a line this often, as training
# logs its steps.
EVAL_LOG_INTERVAL_S = 15.0


def _progress(total: int, desc: str, disable: Optional[bool], unit: str, initial: int = 0, leave: bool = True):
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar only when stderr is a terminal.
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                leave=leave)


def _bars_shown(disable: Optional[bool]) -> bool:
    """Whether _progress(..., disable) draws a bar (tqdm's own rule for disable=None)."""
    if disable is None:
        return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return not disable


def _say(line: str, bars_shown: bool) -> None:
    """One log line; with progress bars on screen it goes above them (tqdm.write) instead of through them."""
    if bars_shown:
        from tqdm.auto import tqdm

        tqdm.write(line)
    else:
        logger.info(line)


def predict_features(model, features: Features, batch_size: int = 64,
                     disable_tqdm: Optional[bool] = True, dist: Optional[Distributed] = None,
                     desc: str = "predict", log_progress: bool = False, leave: bool = True
                     ) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Start and end logits [N, T] float32 of every feature (model.forward, eval mode).

    Rows are batched longest first and each batch is trimmed to its longest row (a multiple of 8), so short
    windows cost little; logits at padding positions are -inf (they are never part of an answer).
    With `dist` of several ranks each predicts every world_size-th row of that order (balanced shares) and rank
    0 gathers them: it gets the logits, the other ranks (None, None).
    Progress: a tqdm bar named `desc` (disable_tqdm as TrainingArguments'; rank 0's alone); log_progress: where
    the bar is not shown, a log line every EVAL_LOG_INTERVAL_S seconds instead.
    """
    n, width = len(features), features.seq_len
    lengths = features.attention_mask.sum(axis=1)
    order = np.argsort(-lengths, kind="stable")
    if dist is not None and dist.enabled:
        mine = order[dist.rank::dist.world_size]
        start, end = predict_features(model, features.select(mine), batch_size,
                                      disable_tqdm if dist.is_main else True, desc=desc,
                                      log_progress=log_progress and dist.is_main, leave=leave)
        parts = dist.gather_object((mine, start, end))
        if not dist.is_main:
            return None, None
        start = np.full((n, width), -np.inf, dtype=np.float32)
        end = np.full((n, width), -np.inf, dtype=np.float32)
        for rows, s_, e_ in parts:
            start[rows], end[rows] = s_, e_
        return start, end
    start = np.full((n, width), -np.inf, dtype=np.float32)
    end = np.full((n, width), -np.inf, dtype=np.float32)
    bar = _progress(n, desc, disable_tqdm, "seq", leave=leave)
    t0 = last_line = time.perf_counter()
    try:
        for lo in range(0, n, batch_size):
            rows = order[lo:lo + batch_size]
            batch = features.batch(rows)
            s, e = model.forward(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            real = batch["attention_mask"].astype(bool)
            w = real.shape[1]
            start[rows, :w] = np.where(real, s, -np.inf)
            end[rows, :w] = np.where(real, e, -np.inf)
            bar.update(len(rows))
            now = time.perf_counter()
            if log_progress and bar.disable and now - last_line >= EVAL_LOG_INTERVAL_S and lo + batch_size < n:
                done = lo + len(rows)
                logger.info("%s: %d/%d windows (%.0f%%), %.0f s", desc, done, n, 100 * done / n, now - t0)
                last_line = now
    finally:
        bar.close()
    return start, end


def examples_dataset(examples: Sequence[Example]) -> dict:
    """The official SQuAD dict of these examples (one paragraph each), for bertqa.squad.evaluate."""
    qas = []
    for ex in examples:
        qa = {"id": ex.id, "question": ex.question,
              "answers": [{"text": t, "answer_start": s} for t, s in zip(ex.answers, ex.answer_starts)]}
        if ex.is_impossible:
            qa["is_impossible"] = True
        qas.append({"context": ex.context, "qas": [qa]})
    return {"version": "1.1", "data": [{"title": "", "paragraphs": qas}]}


def evaluate_model(model, examples: Sequence[Example], features: Features, args: TrainingArguments,
                   dist: Optional[Distributed] = None, during_training: bool = False
                   ) -> tuple[dict[str, Any], dict[str, str]]:
    """(metrics, predictions): official EM/F1 of the model's answers to `examples` and the answers by id.

    metrics holds exact_match, f1 (and the v2.0 breakdown when asked), eval_seconds, eval_sequences_per_second,
    eval_examples and eval_features. With `dist` of several ranks the prediction is split over them; every rank
    gets the metrics, rank 0 alone the predictions (the others an empty dict).
    Rank 0 logs the evaluation's size before it starts and shows an "evaluate" progress bar over the windows
    (args.disable_tqdm; without a bar, a log line every EVAL_LOG_INTERVAL_S s); during_training: the bar goes
    away when done (the training bar stays).
    """
    main = dist is None or not dist.enabled or dist.is_main
    if main:
        bar_shown = _bars_shown(args.disable_tqdm)
        split = f" over {dist.world_size} processes" if dist is not None and dist.enabled else ""
        _say(f"evaluate: {len(examples)} questions, {len(features)} windows of up to {features.seq_len} tokens, "
             f"batches of {args.per_device_eval_batch_size}{split}", bar_shown and during_training)
    progress = dict(desc="evaluate", log_progress=True, leave=not during_training)
    if dist is not None and dist.enabled:
        t0 = time.perf_counter()
        start, end = predict_features(model, features, args.per_device_eval_batch_size, args.disable_tqdm, dist,
                                      **progress)
        result = None
        if dist.is_main:
            metrics, predictions = _score(examples, features, start, end, args, t0)
            result = (metrics, predictions)
        metrics = dist.broadcast_object(None if result is None else result[0])
        return metrics, (result[1] if result is not None else {})
    t0 = time.perf_counter()
    start, end = predict_features(model, features, args.per_device_eval_batch_size, args.disable_tqdm, **progress)
    return _score(examples, features, start, end, args, t0)


def _score(examples, features, start, end, args, t0) -> tuple[dict[str, Any], dict[str, str]]:
    predictions = postprocess_predictions(
        examples, features, start, end, n_best_size=args.n_best_size, max_answer_length=args.max_answer_length,
        version_2_with_negative=args.version_2_with_negative,
        null_score_diff_threshold=args.null_score_diff_threshold)
    seconds = time.perf_counter() - t0
    metrics = squad_evaluate(examples_dataset(examples), predictions,
                             version_2_with_negative=args.version_2_with_negative)
    metrics.update(eval_seconds=seconds, eval_sequences_per_second=len(features) / max(seconds, 1e-9),
                   eval_examples=len(examples), eval_features=len(features))
    return metrics, predictions


# =============================================================================================================
# Files
# =============================================================================================================


def write_json_atomic(path: PathLike, obj: Any, indent: Optional[int] = 2) -> Path:
    """Write JSON to a temporary file beside path, fsync it, rename it over path."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
    return path


def prepare_output_dir(path: PathLike) -> Path:
    """Create output_dir (and parents) and check that files can be written there; TrainingError otherwise."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise TrainingError(f"--output_dir {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise TrainingError(f"--output_dir {path}: not writable ({e.strerror or e})") from None
    return path


@contextmanager
def _writing(what: str):
    """An OSError while writing `what` (a full disk, a read-only or vanished folder) becomes one TrainingError
    line naming it, not a traceback; whoever writes cleans up its temporary files on the way out."""
    try:
        yield
    except OSError as e:
        raise TrainingError(f"cannot write {what}: {e.strerror or e}") from None


def list_checkpoints(output_dir: PathLike) -> list[Path]:
    """Complete checkpoint-N folders of output_dir (those with a trainer_state.json), by step, oldest first."""
    return [p for p in checkpoint_folders(output_dir) if (p / TRAINER_STATE_NAME).is_file()]


def checkpoint_folders(output_dir: PathLike) -> list[Path]:
    """Every checkpoint-N folder of output_dir, complete or not (a sync cut off may leave one without its
    trainer_state.json), by step, oldest first."""
    found = []
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    for p in folder.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# ---- manifests: a checkpoint that proves itself ------------------------------------------------------------
#
# manifest.json = {"format": 1, "files": {"model.safetensors": {"size": 4391480, "sha256": "..."}, ...}}, written
# last into the temporary folder, so a checkpoint-N/ holding it was complete when it was renamed into place.
# checkpoint_problems() compares the files with it; a checkpoint written before manifests existed (its
# trainer_state.json names none) is checked for what can be checked without one: files present and non-empty,
# JSON that parses, archives (training_state.bin) whose every member passes its CRC, safetensors files whose
# tensors lie inside them.


def write_manifest(folder: PathLike) -> Path:
    """folder/manifest.json: the size and sha256 of every other file under folder (read back from disk)."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return write_json_atomic(folder / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "files": files})


_verified: dict[str, tuple[tuple, list[str]]] = {}   # folder -> (its files' names, sizes, mtimes; its problems)


def checkpoint_problems(folder: PathLike) -> list[str]:
    """What is wrong with checkpoint folder `folder`, one phrase per problem naming the file ([] if intact).

    Reads every file once (sha256); the answer is remembered while the folder's files keep their sizes and
    modification times, so the choice of a checkpoint and its loading read it once.
    """
    folder = Path(folder)
    try:
        signature = tuple(sorted((p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                                 for p in folder.rglob("*") if p.is_file()))
    except OSError as e:
        return [f"unreadable ({e.strerror or e})"]
    key = str(folder.resolve())
    if key in _verified and _verified[key][0] == signature:
        return list(_verified[key][1])
    problems = _checkpoint_problems(folder)
    _verified[key] = (signature, problems)
    return list(problems)


def _checkpoint_problems(folder: Path) -> list[str]:
    state_path, manifest_path = folder / TRAINER_STATE_NAME, folder / MANIFEST_NAME
    if not manifest_path.is_file():
        problems = _unverifiable_problems(folder)
        if not problems:
            try:
                named = json.loads(state_path.read_text(encoding="utf-8")).get("manifest")
            except (OSError, ValueError, AttributeError):
                named = None
            if named:   # written with a manifest that is not there: the copy of the folder stopped short
                problems.append(f"{MANIFEST_NAME} is missing")
        return problems
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        entries = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{MANIFEST_NAME} is unreadable ({_why(e)})"]
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        return [f"{MANIFEST_NAME} is not a checkpoint manifest ({type(e).__name__}: {e})"]
    problems = [f"{name} is not in {MANIFEST_NAME}" for name in (TRAINER_STATE_NAME, TRAINING_STATE_NAME)
                if name not in files]
    for name, size, sha256 in entries:
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            problems.append(f"{MANIFEST_NAME} names {name!r}, outside the checkpoint")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            have = path.stat().st_size
            problems.append(f"{name} has {have} of its {size} bytes (truncated)" if have < size else
                            f"{name} has {have} bytes, {MANIFEST_NAME} says {size}")
        elif file_sha256(path) != sha256:
            problems.append(f"{name} does not match its sha256 in {MANIFEST_NAME} (corrupt)")
    return problems


def _unverifiable_problems(folder: Path) -> list[str]:
    """A checkpoint without a manifest: what can be checked without one."""
    problems = [f"{name} is missing" for name in (TRAINER_STATE_NAME, TRAINING_STATE_NAME)
                if not (folder / name).is_file()]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        try:
            if path.stat().st_size == 0:
                problems.append(f"{name} is empty (0 bytes)")
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.name == TRAINING_STATE_NAME or path.suffix == ".npz":
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()   # reads every member and checks its CRC
                if bad is not None:
                    problems.append(f"{name} is corrupt (member {bad} fails its CRC)")
            elif path.suffix == ".safetensors":
                from .checkpoint import read_safetensors_header

                read_safetensors_header(path)
            elif path.suffix == ".npy":
                np.load(path, mmap_mode="r", allow_pickle=False)   # its header, and data of the size it says
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{name} is unreadable ({_why(e)})")
        except (zipfile.BadZipFile, EOFError) as e:
            problems.append(f"{name} is not a complete archive ({e})")
        except ValueError as e:   # CheckpointError: its message starts with the path
            problems.append(f"{name}: {str(e).replace(str(path) + ': ', '')}")
    return problems


def _why(e: BaseException) -> str:
    return str(e.strerror if isinstance(e, OSError) and e.strerror else e)


def _read_json_object(source: Path, what: str) -> dict:
    """A checkpoint's JSON object file; TrainingError naming the file in one line otherwise."""
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainingError(f"{source}: unreadable {what} ({_why(e)})") from None
    if not isinstance(raw, dict):
        raise TrainingError(f"{source}: not a {what} (a JSON {type(raw).__name__}, not an object)")
    return raw


def resolve_resume(output_dir: PathLike, resume: Union[None, bool, PathLike], overwrite_output_dir: bool = False
                   ) -> Optional[Path]:
    """The checkpoint a run continues from: None for a fresh run, the newest intact one for True/"latest", or
    the folder named (which must be intact).

    A damaged checkpoint (checkpoint_problems) met on the way to the newest intact one is skipped with one
    warning line naming its damaged files. TrainingError when there is nothing (intact) to resume, or when a
    fresh run would mix with the checkpoints already in output_dir (unless overwrite_output_dir).
    """
    output_dir = Path(output_dir)
    if resume is None or resume is False:
        existing = checkpoint_folders(output_dir)
        if existing and not overwrite_output_dir:
            raise TrainingError(f"--output_dir {output_dir} already holds {existing[-1].name}: pass --resume to "
                                f"continue that run, or --overwrite_output_dir to start afresh")
        return None
    if resume is True or str(resume) == "latest":
        candidates = checkpoint_folders(output_dir)
        if not candidates:
            raise TrainingError(f"--resume: no checkpoint-N folder in {output_dir} to resume from")
        damaged = []
        for folder in reversed(candidates):
            problems = checkpoint_problems(folder)
            if not problems:
                for bad, why in damaged:
                    logger.warning("%s is damaged (%s): resuming from %s instead", bad, "; ".join(why), folder.name)
                return folder
            damaged.append((folder, problems))
        raise TrainingError(f"--resume: no intact checkpoint in {output_dir}: "
                            + "; ".join(f"{bad.name}: {', '.join(why)}" for bad, why in damaged)
                            + " (--overwrite_output_dir starts afresh)")
    path = Path(resume)
    if not (path / TRAINER_STATE_NAME).is_file() or not (path / TRAINING_STATE_NAME).is_file():
        raise TrainingError(f"--resume_from_checkpoint {path}: not a checkpoint folder (needs "
                            f"{TRAINER_STATE_NAME} and {TRAINING_STATE_NAME})")
    problems = checkpoint_problems(path)
    if problems:
        raise TrainingError(f"--resume_from_checkpoint {path} is damaged: {'; '.join(problems)}")
    return path


def _remove_stale_temporaries(output_dir: Path) -> None:
    """Half-written checkpoint folders left by a run killed mid-save."""
    for p in output_dir.glob(f".{CHECKPOINT_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


class JsonlLog:
    """output_dir/train_log.jsonl, appended one flushed line per record."""

    def __init__(self, path: PathLike, keep_until_step: Optional[int] = None):
        """Open for appending. keep_until_step=None starts a new log; a step count keeps the records up to
        that step (what a resumed run has not redone) and drops later ones and any torn last line."""
        self.path = Path(path)
        kept = []
        if keep_until_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= keep_until_step:
                    kept.append(line)
        with _writing(str(self.path)), atomic_write(self.path) as tmp:
            Path(tmp).write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        with _writing(str(self.path)):
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_log(path: PathLike) -> list[dict]:
    """Records of a train_log.jsonl."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# =============================================================================================================
# Trainer
# =============================================================================================================


class Trainer:
    """Fine-tunes `model` (a bertqa.model.BertQA, or anything with its training API) on SQuAD features.

        trainer = Trainer(model, args, train_features, eval_examples, eval_features)
        trainer.train()                      # or train(resume_from_checkpoint="latest" / a folder)
        metrics, predictions = trainer.evaluate()

    Data parallel (`dist`, default bertqa.distributed.current(): a world of 1 unless the process was started by
    mpirun): every rank holds the model and the same features; each step's global batch comes from the one
    permutation of the epoch, each rank runs forward and backward on its share (TrainPlan.step_shares), the
    gradient buffer is summed over the ranks once per step, and every rank takes the same AdamW step. The loss
    of each share is weighted by its share of the step's windows, so the summed gradient is that of the mean
    loss over the global batch; the engine computes no padding (a window's loss and gradients do not depend on
    the batch it is in), and dropout masks are keyed by (epoch, the window's position in the epoch's order), so
    any split of a global batch over ranks and micro-batches computes the same step as one process. Rank 0 alone writes the log and checkpoints.
    """

    def __init__(self, model, args: TrainingArguments, train_features: Optional[Features] = None,
                 eval_examples: Optional[Sequence[Example]] = None, eval_features: Optional[Features] = None,
                 dist: Optional[Distributed] = None):
        from . import distributed

        self.model = model
        self.args = args
        self.train_features = train_features
        self.eval_examples = eval_examples
        self.eval_features = eval_features
        self.dist = dist or distributed.current() or Distributed()
        self.output_dir = Path(args.output_dir)
        self.state = TrainerState()
        self.history: list[dict] = []  # every record written to the log by this process
        self.last_eval: Optional[tuple[int, dict, dict]] = None  # (step, metrics, predictions)
        # --load_best_model_at_end: (step, metrics, predictions or None) of the best evaluation, and its parameters,
        # kept in memory on every rank (rank 0 also writes them to output_dir/best-model/ for a resumed run)
        self.best: Optional[tuple[int, dict, Optional[dict]]] = None
        self._best_params: Optional[np.ndarray] = None

    # ---- the loop --------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: Optional[PathLike] = None) -> dict[str, Any]:
        """Train to the planned number of steps (from a checkpoint: resume_from_checkpoint, or args'); returns
        train_seconds, train_steps, train_sequences and train_sequences_per_second, counted over the whole run
        (a resumed run includes its earlier segments; sequences are those of all ranks)."""
        args, model, features, dist = self.args, self.model, self.train_features, self.dist
        if features is None:
            raise TrainingError("Trainer.train needs train_features")
        main = dist.is_main
        plan = TrainPlan.from_args(len(features), args, dist.world_size)
        fingerprint = features_fingerprint(features)
        dist.check_same("the training features (sha256 of their arrays)", fingerprint)
        def prepare() -> Optional[str]:
            prepare_output_dir(self.output_dir)
            _remove_stale_temporaries(self.output_dir)
            found = self._resolve_resume(resume_from_checkpoint)
            return None if found is None else str(found)

        checkpoint = dist.on_main(prepare)
        if checkpoint is not None:
            # rank 0 reads the checkpoint and sends it: the other ranks need not see its filesystem
            state_dict = dist.on_main(lambda: self._load_checkpoint(Path(checkpoint), plan, fingerprint).to_dict())
            self.state = TrainerState.from_dict(state_dict, checkpoint)
            self._broadcast_training_state()
            if main:
                logger.info("resuming from %s at step %d (epoch %d, window %d)", checkpoint,
                            self.state.global_step, self.state.epoch, self.state.position)
        else:
            self.state = TrainerState(data_seed=args.seed, data_rng_state=data_rng_state(args.seed, 0),
                                      n_features=plan.n_features, features_sha256=fingerprint,
                                      per_device_train_batch_size=plan.batch_size,
                                      gradient_accumulation_steps=plan.accumulation, world_size=plan.world_size,
                                      global_batch_size=plan.global_batch)
            if dist.enabled:   # the same start everywhere, whatever each rank loaded
                dist.broadcast_(model.params)
                model.tensor(next(iter(model.layout)))   # cuda: the host parameters changed: upload them
        state = self.state
        state.total_steps = plan.total_steps
        state.preprocessing = self._preprocessing()   # checked against the checkpoint's in _load_checkpoint
        state.precision = getattr(model, "precision", None)   # likewise
        state.world_size, state.per_device_train_batch_size = plan.world_size, plan.batch_size
        state.gradient_accumulation_steps = plan.accumulation
        log = None
        if main:
            args_file = self.output_dir / TRAINING_ARGS_NAME
            with _writing(str(args_file)):
                write_json_atomic(args_file, {**args.to_dict(), "world_size": dist.world_size})
            log = JsonlLog(self.output_dir / LOG_NAME, keep_until_step=state.global_step if checkpoint else None)
            logger.info("training: %d features, %d steps (%d per epoch, %d warmup), global batch %d = %d process%s "
                        "x %d x %d accumulation", plan.n_features, plan.total_steps, plan.steps_per_epoch,
                        plan.warmup_steps, plan.global_batch, plan.world_size, "es" if plan.world_size > 1 else "",
                        plan.batch_size, plan.accumulation)
        bar = _progress(plan.total_steps, "finetune", args.disable_tqdm if main else True, "step",
                        initial=state.global_step)
        optimizer_kwargs = {}
        if args.layerwise_lr_decay != 1.0:
            from .model import layerwise_lr_scale

            optimizer_kwargs["lr_scale"] = layerwise_lr_scale(list(model.layout), model.config.num_hidden_layers,
                                                              args.layerwise_lr_decay)
        strategy = args.resolved_eval_strategy()
        if checkpoint is not None and args.load_best_model_at_end and state.best_step:
            self._restore_best_from_folder()
        order, order_epoch = None, None
        window_t0, window_seqs = time.perf_counter(), 0
        session_t0, session_eval_seconds = time.perf_counter(), 0.0
        train_seconds_before = state.train_seconds
        self.reduce_seconds = 0.0   # time in the gradient all-reduce (this rank), for the benchmark
        self._stop_requested = False
        restore_sigterm = self._stop_on_sigterm()
        try:
            while state.global_step < plan.total_steps:
                if order_epoch != state.epoch:
                    order, order_epoch = epoch_order(state.data_rng_state, plan.n_features), state.epoch
                lr = linear_schedule(state.global_step, plan.total_steps, plan.warmup_steps, args.learning_rate)
                lo = state.position
                hi = min(lo + plan.global_batch, plan.n_features)
                n_step = hi - lo
                model.zero_grad()
                loss_sum = 0.0   # sum over this rank's windows of the loss (means times rows)
                for share in plan.step_shares(lo, dist.rank):
                    rows = order[share]
                    if len(rows) == 0:
                        continue
                    loss = float(model.forward_backward(
                        features.batch(rows), loss_scale=len(rows) / n_step,
                        window_ids=np.arange(share.start, share.stop, dtype=np.int64), rng_step=state.epoch))
                    loss_sum += loss * len(rows)
                stop = self._stop_requested
                if dist.enabled:   # the stop request rides along with the loss: every rank stops at the same step
                    t_reduce = time.perf_counter()
                    dist.reduce_gradients(model)
                    loss_sum, stops = dist.sum([loss_sum, float(stop)])
                    loss_sum, stop = float(loss_sum), stops > 0
                    self.reduce_seconds += time.perf_counter() - t_reduce
                grad_norm = float(model.optimizer_step(
                    lr, weight_decay=args.weight_decay,
                    max_grad_norm=args.max_grad_norm,
                    beta1=args.adam_beta1, beta2=args.adam_beta2, eps=args.adam_epsilon, **optimizer_kwargs))
                loss = loss_sum / n_step

                state.global_step += 1
                state.optimizer_steps = int(model.step)
                state.position = hi
                epoch_done = state.position >= plan.n_features
                if epoch_done:
                    state.epoch += 1
                    state.position = 0
                    state.data_rng_state = data_rng_state(state.data_seed, state.epoch)
                state.sequences += n_step
                state.log_loss_sum += loss
                state.log_steps += 1
                window_seqs += n_step
                now = time.perf_counter()
                state.train_seconds = train_seconds_before + (now - session_t0 - session_eval_seconds)
                seq_per_s = window_seqs / max(now - window_t0, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", seq_s=f"{seq_per_s:.1f}", refresh=False)

                last = state.global_step == plan.total_steps
                if state.global_step % args.logging_steps == 0 or last:
                    record = {"step": state.global_step, "epoch": record_epoch(state, plan),
                              "loss": state.log_loss_sum / state.log_steps, "lr": lr, "grad_norm": grad_norm,
                              "seq_per_s": seq_per_s, "elapsed": state.train_seconds}
                    self._log(log, record, bar)
                    state.log_loss_sum, state.log_steps = 0.0, 0
                    window_t0, window_seqs = time.perf_counter(), 0
                due = (strategy == "steps" and state.global_step % args.eval_steps == 0) or \
                      (strategy == "epoch" and epoch_done)
                if due and self.eval_features is not None:
                    t_eval = time.perf_counter()
                    metrics, predictions = self.evaluate(during_training=True)
                    self.last_eval = (state.global_step, metrics, predictions)
                    self._log(log, {"step": state.global_step, "epoch": record_epoch(state, plan),
                                    **{k if k.startswith("eval_") else f"eval_{k}": v for k, v in metrics.items()}}, bar)
                    if args.load_best_model_at_end:
                        self._track_best(state.global_step, metrics, predictions)
                    session_eval_seconds += time.perf_counter() - t_eval
                    window_t0 = time.perf_counter()
                if args.save_steps and (state.global_step % args.save_steps == 0) and main:
                    self.save_checkpoint()
                if stop and not last:
                    if main and not (args.save_steps and state.global_step % args.save_steps == 0):
                        self.save_checkpoint()
                    raise KeyboardInterrupt(f"stopped by SIGTERM after step {state.global_step}; "
                                            f"{CHECKPOINT_PREFIX}{state.global_step} saved")
        finally:
            restore_sigterm()
            bar.close()
            if log is not None:
                log.close()
        if args.load_best_model_at_end and self._best_params is not None:
            self._set_params(self._best_params)
            if main:
                logger.info("best model: step %d (%s %.2f), the final model", state.best_step,
                            args.metric_for_best_model, state.best_metric)
        return {"train_seconds": state.train_seconds, "train_steps": state.global_step,
                "train_sequences": state.sequences,
                "train_sequences_per_second": state.sequences / max(state.train_seconds, 1e-9)}

    def _stop_on_sigterm(self):
        """SIGTERM (a SageMaker job stopped, a spot instance reclaimed, a scheduler's preemption) asks the loop to
        finish its step, write a checkpoint and raise KeyboardInterrupt, so no finished step is lost. Returns the
        function that puts the previous handler back (a no-op off the main thread, where signals cannot be set)."""
        def handler(signum, frame):
            self._stop_requested = True
            logger.warning("SIGTERM: finishing step %d, then writing a checkpoint and stopping",
                           self.state.global_step + 1)

        try:
            previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:   # not the main thread
            return lambda: None
        return lambda: signal.signal(signal.SIGTERM, previous)

    def _broadcast_training_state(self) -> None:
        """Rank 0's parameters, Adam moments and counters to every rank (after rank 0 loaded a checkpoint)."""
        dist, model = self.dist, self.model
        if not dist.enabled:
            return
        model.zero_grad()   # makes the training buffers
        for name in ("params", "m", "v"):
            if model.device != "cpu":
                model._pull(name)
            dist.broadcast_(getattr(model, name))
        model.step, model.rng_step = dist.broadcast_object((model.step, model.rng_step))
        if model.device != "cpu":
            for name in ("params", "m", "v"):
                model._engine.upload(name, getattr(model, name))
            model._stale.difference_update(("params", "m", "v"))
            model._params_written = False
        else:   # the CPU engine remakes its bf16 copies of the broadcast weights before its next call
            model._params_written = True

    # ---- the best model (--load_best_model_at_end) -----------------------------------------------------

    def _params_copy(self) -> np.ndarray:
        self.model.tensor(next(iter(self.model.layout)))   # cuda: refresh the host copy of the parameters
        return self.model.params.copy()

    def _set_params(self, params: np.ndarray) -> None:
        self.model.tensor(next(iter(self.model.layout)))   # cuda: marks the host parameters for upload
        self.model.params[...] = params

    def _track_best(self, step: int, metrics: dict, predictions: dict) -> None:
        """A better evaluation (every rank has the same metrics, so every rank decides alike): keep it."""
        value = float(metrics[self.args.metric_for_best_model])
        if self.state.best_metric is not None and value <= self.state.best_metric:
            return
        self.state.best_step, self.state.best_metric = step, value
        self.best = (step, metrics, predictions)
        self._best_params = self._params_copy()
        if self.dist.is_main:
            self._save_best_folder()

    def _save_best_folder(self) -> None:
        """output_dir/best-model: the best parameters so far, so that a resumed run can still end with them."""
        final = self.output_dir / BEST_MODEL_NAME
        with _writing(str(final)):
            self._write_best_folder(final)

    def _write_best_folder(self, final: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{BEST_MODEL_NAME}.", suffix=".tmp", dir=self.output_dir))
        try:
            self.model.save_pretrained(tmp)
            write_json_atomic(tmp / "best.json", {"step": self.state.best_step,
                                                  self.args.metric_for_best_model: self.state.best_metric})
            fsync_dir(tmp)
            old = None
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{BEST_MODEL_NAME}.", suffix=".old", dir=self.output_dir))
                os.replace(final, old / BEST_MODEL_NAME)
            os.replace(tmp, final)
            fsync_dir(self.output_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _restore_best_from_folder(self) -> None:
        """A resumed run whose best evaluation came before the checkpoint: rank 0 reads output_dir/best-model and
        sends it to the other ranks (its predictions are not kept: finetune evaluates that model again)."""
        from . import checkpoint as ckpt

        def read() -> np.ndarray:
            folder = self.output_dir / BEST_MODEL_NAME
            try:
                tensors = ckpt.load_state_dict(folder, self.model.config)
            except (OSError, ckpt.CheckpointError) as e:
                raise TrainingError(f"cannot resume --load_best_model_at_end: the best model of step "
                                    f"{self.state.best_step} is not readable in {folder} ({e})") from None
            params = np.zeros_like(self.model.params)
            for name, (offset, shape) in self.model.layout.items():
                params[offset:offset + int(np.prod(shape))] = np.asarray(tensors[name], np.float32).ravel()
            return params

        self._best_params = np.ascontiguousarray(self.dist.on_main(read))
        self.best = (self.state.best_step, {}, None)

    def _log(self, log: Optional[JsonlLog], record: dict, bar) -> None:
        if log is None:   # not the main rank
            return
        log.write(record)
        self.history.append(record)
        line = " ".join(f"{k}={_fmt(v)}" for k, v in record.items())
        if bar.disable:
            logger.info(line)
        else:
            bar.write(line)  # above the bar, which stays at the bottom

    # ---- evaluation ------------------------------------------------------------------------------------

    def evaluate(self, during_training: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
        if self.eval_features is None or self.eval_examples is None:
            raise TrainingError("Trainer.evaluate needs eval_examples and eval_features")
        return evaluate_model(self.model, self.eval_examples, self.eval_features, self.args, self.dist,
                              during_training=during_training)

    # ---- checkpoints -----------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """output_dir/checkpoint-<step>, complete or absent: built in a hidden temporary folder, then renamed.

        manifest.json (every file's size and sha256) is written last, so resuming can prove the checkpoint
        whole. A crash or a full disk before the rename leaves the earlier checkpoints as they were (the
        temporary folder is removed here on errors, and at the next start after a hard kill); a full disk is one
        TrainingError line naming the checkpoint. Then the oldest checkpoints beyond save_total_limit are deleted.
        """
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        final = self.output_dir / name
        with _writing(f"{final} (the earlier checkpoints are intact)"):
            self._write_checkpoint(name, final)
        self._rotate_checkpoints()
        return final

    def _write_checkpoint(self, name: str, final: Path) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.output_dir))
        try:
            self.model.save_pretrained(tmp)
            self.model.save_training_state(tmp / TRAINING_STATE_NAME)
            write_json_atomic(tmp / TRAINER_STATE_NAME, self.state.to_dict())
            write_manifest(tmp)
            fsync_dir(tmp)
            if final.exists():  # same step saved by an earlier, interrupted run: swap it out
                old = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=self.output_dir))
                os.replace(final, old / name)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(self.output_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        for old in list_checkpoints(self.output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _resolve_resume(self, resume: Optional[PathLike]) -> Optional[Path]:
        checkpoint = resolve_resume(self.output_dir, self.args.resume_from_checkpoint if resume is None else resume,
                                    self.args.overwrite_output_dir)
        if checkpoint is None:
            for old in checkpoint_folders(self.output_dir):  # --overwrite_output_dir: a new run, no stale mixing
                shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(self.output_dir / BEST_MODEL_NAME, ignore_errors=True)
        return checkpoint

    def _load_checkpoint(self, checkpoint: Path, plan: TrainPlan, fingerprint: str) -> TrainerState:
        source = checkpoint / TRAINER_STATE_NAME
        raw = _read_json_object(source, "trainer state")
        state = TrainerState.from_dict(raw, str(source))
        differences = self._model_differences(checkpoint) + _preprocessing_differences(
            raw.get("preprocessing") or {}, self._preprocessing())
        saved, now = raw.get("precision"), getattr(self.model, "precision", None)
        if saved is not None and now is not None and saved != now:
            differences.append(f"precision {_short(saved)} (now {_short(now)})")
        if differences:
            raise TrainingError(f"cannot resume from {checkpoint}: it was trained with {', '.join(differences)}; "
                                f"resume with the same settings, or start afresh (--overwrite_output_dir)")
        same = {"training features": (state.n_features, plan.n_features),
                "training features (content)": (state.features_sha256, fingerprint),
                "--seed": (state.data_seed, self.args.seed)}
        for what, (saved, now) in same.items():
            if saved != now:
                raise TrainingError(f"cannot resume from {checkpoint}: it was trained with other {what} "
                                    f"({_short(saved)} there, {_short(now)} now)")
        # Any split of the same global batch continues the same run (the step's windows, their dropout masks
        # and the loss weights do not depend on the split); another global batch would not.
        split = (state.world_size, state.per_device_train_batch_size, state.gradient_accumulation_steps)
        if state.global_batch_size != plan.global_batch:
            raise TrainingError(
                f"cannot resume from {checkpoint}: it was trained with a global batch of {state.global_batch_size} "
                f"windows ({split[0]} process(es) x --per_device_train_batch_size {split[1]} x "
                f"--gradient_accumulation_steps {split[2]}), this run's is {plan.global_batch} ({plan.world_size} x "
                f"{plan.batch_size} x {plan.accumulation}); resume with a split of the same global batch")
        if split != (plan.world_size, plan.batch_size, plan.accumulation):
            logger.info("resuming a run of %d x %d x %d with %d x %d x %d (processes x batch x accumulation): the "
                        "same global batch of %d", *split, plan.world_size, plan.batch_size, plan.accumulation,
                        plan.global_batch)
        if state.total_steps != plan.total_steps:
            logger.warning("resuming a run planned for %d steps with a plan of %d: the learning rate schedule "
                           "changes from here on", state.total_steps, plan.total_steps)
        path = checkpoint / TRAINING_STATE_NAME
        try:
            self.model.load_training_state(path)
        except Exception as e:   # noqa: BLE001 - whatever the reader raised, one line naming the file
            if str(path) in str(e):
                raise
            raise TrainingError(f"{path}: cannot load the training state ({type(e).__name__}: {e})") from None
        if int(self.model.step) != state.optimizer_steps:
            raise TrainingError(f"{checkpoint}: {TRAINING_STATE_NAME} is at optimizer step {self.model.step} but "
                                f"{TRAINER_STATE_NAME} says {state.optimizer_steps}")
        return state

    def _preprocessing(self) -> dict:
        """What the training features were made with (recorded in trainer_state.json, compared on resume)."""
        args = self.args
        record = {"max_seq_length": args.max_seq_length, "doc_stride": args.doc_stride,
                  "max_query_length": args.max_query_length}
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "tokenizer"):
            vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=False)
            tokens = sorted(vocab, key=vocab.__getitem__)
            record["tokenizer_vocab_sha256"] = hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()
            record["do_lower_case"] = bool(tokenizer.do_lower_case)
        return record

    def _model_differences(self, checkpoint: Path) -> list[str]:
        """The architecture fields (layers, hidden size, heads, vocabulary, ...) in which the checkpoint's
        config.json and the model being trained differ: the same number of parameters is not the same model."""
        config = getattr(self.model, "config", None)
        if config is None or not dataclasses.is_dataclass(config):
            return []
        source = checkpoint / "config.json"
        saved = _read_json_object(source, "model config")
        out = []
        for f in dataclasses.fields(config):
            if f.name in _CONFIG_NOT_COMPARED or f.name not in saved:
                continue
            now = getattr(config, f.name)
            if saved[f.name] != now:
                out.append(f"model config {f.name} {saved[f.name]!r} (this model: {now!r})")
        return out


# Config fields that do not change what a resumed run computes: the initialisation of weights it loads anyway.
_CONFIG_NOT_COMPARED = {"extra", "initializer_range"}
_PREPROCESSING_NAMES = {"tokenizer_vocab_sha256": "the tokenizer's vocabulary (sha256)",
                        "do_lower_case": "the tokenizer's do_lower_case"}


def _preprocessing_differences(saved: dict, now: dict) -> list[str]:
    """'--max_seq_length 128 (now 96)', ... for each recorded preprocessing setting that differs."""
    out = []
    for name, value in now.items():
        if name in saved and saved[name] != value:
            what = _PREPROCESSING_NAMES.get(name, f"--{name}")
            out.append(f"{what} {_short(saved[name])} (now {_short(value)})")
    return out


def record_epoch(state: TrainerState, plan: TrainPlan) -> float:
    return state.epoch + state.position / plan.n_features


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] + "..." if len(s) > 16 else s


# =============================================================================================================
# The main job
# =============================================================================================================


def select_examples(examples: list[Example], features: Features, n: Optional[int]
                    ) -> tuple[list[Example], Features]:
    """The first n examples and their features (run_qa.py's --max_*_samples); all when n is None."""
    if n is None or n >= len(examples):
        return examples, features
    return examples[:n], features.select(np.flatnonzero(features.example_index < n))


def load_split(path: PathLike, tokenizer, args: TrainingArguments, n: Optional[int], on_bad_answer: str = "raise"
               ) -> tuple[list[Example], Features]:
    """Validated examples and (cached) max_length-padded features of a SQuAD file, cut to the first n.

    on_bad_answer: see squad.load_squad ("warn" for training data: skip and count questions whose answers do
    not fit their contexts; "raise" for evaluation data).
    """
    examples, features = load_features(
        path, tokenizer, max_seq_length=args.max_seq_length, doc_stride=args.doc_stride,
        max_query_length=args.max_query_length, cache_dir=args.cache_dir,
        progress=None if args.disable_tqdm is None else not args.disable_tqdm, on_bad_answer=on_bad_answer)
    return select_examples(examples, features, n)


def engine_precision(args: TrainingArguments, command: str, device: str) -> str:
    """The precision a model for `command` runs in on `device` (args.resolved_precision, then the device's
    default); TrainingError naming the flag (or $BERTQA_PRECISION) when it is unknown there, or this CPU lacks
    its instructions (bertqa.model.check_precision), so a run fails before it reads data or weights."""
    from .model import check_precision

    precision = args.resolved_precision(command)
    try:
        return check_precision(device, precision)
    except (ValueError, RuntimeError) as e:
        if args.bf16:
            source = "--bf16"
        elif args.precision is not None:
            source = f"--precision {precision}"
        else:
            source = f"{PRECISION_ENV}={precision}"
        raise TrainingError(f"{source}: {e}") from None


def load_model(name_or_path: PathLike, args: TrainingArguments, device: Optional[str] = None,
               command: str = "evaluate"):
    """BertQA.from_pretrained, after cheap checks that the folder (or packaged name) has config, weights and
    tokenizer files (questions and contexts need the tokenizer), and that the device runs the precision
    (engine_precision: `command` "finetune" takes --bf16 / --precision; "evaluate" and "predict" fall back on
    $BERTQA_PRECISION)."""
    from .checkpoint import resolve_model

    from .tokenization import VOCAB_FILES

    folder = resolve_model(name_or_path)  # FileNotFoundError naming what is missing, before the engine starts
    if not any((folder / name).is_file() for name in VOCAB_FILES):
        raise TrainingError(f"{folder}: model folder is missing its tokenizer ({' or '.join(VOCAB_FILES)}); "
                            f"copy it from the checkpoint the model was trained from")
    from .model import BertQA, check_device

    device = device or args.device
    try:
        check_device(device)
    except RuntimeError as e:  # e.g. a build without the CUDA backend
        raise TrainingError(f"--device {device}: {e}") from None
    precision = engine_precision(args, command, device)
    return BertQA.from_pretrained(name_or_path, device=device, seed=args.seed, precision=precision)


def write_results(output_dir: Path, metrics: dict, predictions: dict[str, str]) -> None:
    with _writing(str(output_dir / EVAL_RESULTS_NAME)):
        write_json_atomic(output_dir / EVAL_RESULTS_NAME, metrics)
    with _writing(str(output_dir / PREDICTIONS_NAME)):
        write_json_atomic(output_dir / PREDICTIONS_NAME, predictions, indent=None)


def finetune(model_name_or_path: PathLike, train_file: PathLike, validation_file: Optional[PathLike],
             args: TrainingArguments, model=None) -> dict[str, Any]:
    """Fine-tune, save the model into args.output_dir, evaluate; returns what eval_results.json holds.

    Input files are checked before the model is loaded, so a bad file fails fast. model: an already loaded
    model (default: BertQA.from_pretrained(model_name_or_path)). Started by mpirun (N processes) this is
    data-parallel training (see Trainer); rank 0 alone writes into output_dir, and every rank returns the
    results.
    """
    from . import distributed

    args.validate("finetune")
    dist = distributed.init(args.device)
    # Everything that can be checked cheaply is checked before the model loads and features are built.
    def check_output_dir() -> tuple[Path, Optional[Path]]:
        folder = prepare_output_dir(args.output_dir)
        return folder, resolve_resume(folder, args.resume_from_checkpoint, args.overwrite_output_dir)

    # resume: the intact checkpoint chosen here (verified once: a damaged newest one is reported here, once)
    output_dir, resume = dist.on_main(check_output_dir)
    if model is None:
        engine_precision(args, "finetune", dist.device)   # this CPU runs it, before the data files are read
    load_squad(train_file, on_bad_answer="ignore")  # load_split reads it again (and warns about bad answers)
    if validation_file is not None:
        load_squad(validation_file)
    if model is None:
        model = load_model(model_name_or_path, args, device=dist.device, command="finetune")
    elif args.resolved_precision("finetune") not in (None, getattr(model, "precision", None)):
        raise TrainingError(f"the model given runs in precision {getattr(model, 'precision', None)}, the arguments "
                            f"ask for {args.resolved_precision('finetune')}")
    if not dist.is_main:
        args = dataclasses.replace(args, disable_tqdm=True)
    train_examples, train_features = load_split(train_file, model.tokenizer, args, args.max_train_samples,
                                                 on_bad_answer="warn" if dist.is_main else "ignore")
    eval_examples = eval_features = None
    if validation_file is not None:
        eval_examples, eval_features = load_split(validation_file, model.tokenizer, args, args.max_eval_samples)
    trainer = Trainer(model, args, train_features, eval_examples, eval_features, dist=dist)
    train_metrics = trainer.train(resume_from_checkpoint=resume)
    if dist.is_main:
        with _writing(f"the model into {output_dir}"):
            model.save_pretrained(output_dir)
    results: dict[str, Any] = {"model_name_or_path": str(model_name_or_path), **train_metrics}
    if dist.enabled:
        results["world_size"] = dist.world_size
    if args.load_best_model_at_end and trainer.best is not None:
        results["best_model_step"] = trainer.best[0]   # the final model is that evaluation's (Trainer.train)
        results["metric_for_best_model"] = args.metric_for_best_model
    if eval_features is not None:
        if trainer.best is not None and args.load_best_model_at_end and trainer.best[2] is not None:
            _, metrics, predictions = trainer.best
        elif trainer.best is None and trainer.last_eval is not None and \
                trainer.last_eval[0] == trainer.state.global_step:
            _, metrics, predictions = trainer.last_eval
        else:
            metrics, predictions = trainer.evaluate()
        results = {**metrics, **results}
        if dist.is_main:
            write_results(output_dir, results, predictions)
            logger.info("eval: exact_match %.2f f1 %.2f (%d questions, %.1f s)", metrics["exact_match"],
                        metrics["f1"], metrics["eval_examples"], metrics["eval_seconds"])
    elif dist.is_main:
        with _writing(str(output_dir / EVAL_RESULTS_NAME)):
            write_json_atomic(output_dir / EVAL_RESULTS_NAME, results)
    if dist.is_main:
        from .plot import plot_run

        with _writing(str(output_dir / CURVE_NAME)):
            plot_run(output_dir)   # training_curve.png (needs matplotlib: bertqa[plot]; skipped with a log line)
    dist.barrier()   # the files are complete when any rank returns
    dist.close()     # the NCCL communicator, if the run made one (every rank gets here)
    return results


def evaluate_checkpoint(model_name_or_path: PathLike, validation_file: PathLike, args: TrainingArguments,
                        model=None) -> dict[str, Any]:
    """Evaluate a saved model on a SQuAD file; writes eval_results.json and predictions.json into output_dir."""
    from . import distributed

    args.validate("evaluate")
    dist = distributed.init(args.device)   # under mpirun: the prediction is split over the ranks
    output_dir = dist.on_main(prepare_output_dir, args.output_dir)
    if model is None:
        engine_precision(args, "evaluate", dist.device)   # this CPU runs it, before the data file is read
    load_squad(validation_file)
    if model is None:
        model = load_model(model_name_or_path, args, device=dist.device, command="evaluate")
    examples, features = load_split(validation_file, model.tokenizer, args, args.max_eval_samples)
    metrics, predictions = evaluate_model(model, examples, features, args, dist)
    results = {**metrics, "model_name_or_path": str(model_name_or_path)}
    if dist.is_main:
        write_results(output_dir, results, predictions)
    dist.barrier()
    return results
