"""Mixed precision for training (``train.precision``): autocast, and a gradient scaler for fp16.

The weights, their gradients, the optimizer state and the EMA stay in float32 (the "master
weights"); only the forward runs in the low precision, inside ``torch.autocast``. Autocast picks
per op: matrix products and convolutions in bf16/fp16, reductions and normalisations in fp32
(difflora's GroupNorm computes in fp32 whatever its input). The loss terms leave the network in
low precision and are promoted to float32 by the first op with a float32 operand (the targets).

* ``bf16`` has float32's exponent range: no scaling is needed. On CPUs with AVX512-BF16/AMX and
  on Ampere+ GPUs it is the fast choice.
* ``fp16`` has a narrow range: small gradients underflow, so the loss is multiplied by a dynamic
  scale before backward and the gradients divided by it before clipping and the optimizer step
  (``torch.amp.GradScaler``); a step whose gradients overflow is skipped and the scale lowered.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["DTYPES", "autocast", "grad_scaler"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's precision context: ``torch.autocast`` for bf16/fp16, nothing for fp32."""
    if precision not in DTYPES:
        raise ValueError(f"train.precision={precision!r}; choices: {', '.join(DTYPES)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (a disabled scaler passes every call through)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
