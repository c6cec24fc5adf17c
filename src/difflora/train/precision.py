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
* ``auto`` is bf16 where the hardware computes in bf16 natively (a CPU listing ``avx512_bf16`` or
  ``amx_bf16`` in ``/proc/cpuinfo``, a CUDA GPU that supports bf16) and fp32 elsewhere: on an
  AVX2-only CPU bf16 is emulated and several times slower than fp32 (docs/speed.md).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

__all__ = ["BF16_CPU_FLAGS", "DTYPES", "autocast", "cpu_flags", "grad_scaler", "native_bf16", "resolve_precision"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The CPU flags of native bf16 arithmetic (AVX512-BF16's dot products, AMX's bf16 tiles).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (empty where the file does not exist: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA GPU that supports it, or a CPU listing
    one of :data:`BF16_CPU_FLAGS` (``flags``: the CPU's, default :func:`cpu_flags`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return bool(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` with ``auto`` resolved for ``device``: bf16 where :func:`native_bf16`, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in DTYPES:
        raise ValueError(f"train.precision={precision!r}; choices: {', '.join(DTYPES)}, auto")
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward's precision context: ``torch.autocast`` for bf16/fp16, nothing for fp32."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (a disabled scaler passes every call through)."""
    return torch.amp.GradScaler(device.type, enabled=resolve_precision(precision, device) == "fp16")
