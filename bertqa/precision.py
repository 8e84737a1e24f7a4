"""Names and environment variables of the engine's precisions, without the engine (the command-line parsers and
the server's settings read them before anything loads bertqa._C).

    fp32   the default on the CPU: OpenBLAS sgemm
    bf16   bf16 inputs to the linear layers' products, fp32 sums; training and inference (AVX-512 BF16 on the
           CPU; the default on cuda). Master weights, gradients and AdamW stay fp32
    int8   int8 weights (a scale per output channel) and activations (a scale per token, or per tensor with
           BERTQA_INT8_ACTIVATIONS=tensor), int32 sums; inference only, CPU only (AVX-512 VNNI)

bertqa.model.check_precision says whether this machine runs one (bertqa._core._C.runtime_info()["precisions"]).
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

PRECISIONS = ("fp32", "bf16", "int8")
PRECISION_ENV = "BERTQA_PRECISION"                # evaluate, predict and serve's default precision
INT8_ACTIVATIONS_ENV = "BERTQA_INT8_ACTIVATIONS"  # int8: "token" (default) or "tensor"


def precision_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """$BERTQA_PRECISION, or None where it is unset or empty; ValueError naming the variable for a value other
    than fp32, bf16, int8."""
    raw = (os.environ if environ is None else environ).get(PRECISION_ENV, "").strip()
    if not raw:
        return None
    if raw not in PRECISIONS:
        raise ValueError(f"environment variable {PRECISION_ENV}={raw!r}: must be fp32, bf16 or int8")
    return raw


def int8_activations_from_env(environ: Optional[Mapping[str, str]] = None) -> str:
    """How an int8 engine quantizes activations: $BERTQA_INT8_ACTIVATIONS, "token" (one scale per token, the
    default) or "tensor" (one scale per tensor); ValueError naming the variable otherwise."""
    raw = (os.environ if environ is None else environ).get(INT8_ACTIVATIONS_ENV, "").strip()
    if not raw:
        return "token"
    if raw not in ("token", "tensor"):
        raise ValueError(f"environment variable {INT8_ACTIVATIONS_ENV}={raw!r}: must be 'token' (one scale per "
                         f"token, the default) or 'tensor' (one scale per tensor)")
    return raw
