"""What a config will allocate, estimated before anything is built, and the refusal of what cannot fit.

A huge value (``model.num_classes``, ``diffusion.steps``, a rank, a batch size, ``--num``,
channels, context tokens, an image size) used to be found by the allocator: a MemoryError or a
RuntimeError traceback, sometimes after gigabytes were allocated and a study's first arm had
trained. Every command now asks :func:`check_memory` first. The estimate needs no memory:

- **weights**: the model is built on PyTorch's ``meta`` device (shapes without storage), so every
  parameter and buffer is counted exactly, whatever the backbone, adapters or expansions;
- **activations**: one forward of that meta model at the batch the command runs, under a dispatch
  mode that follows every tensor the forward creates and records the most bytes alive at once
  (with gradients on, the tensors autograd keeps for backward are among them; with
  ``model.checkpoint_blocks`` the meta model's blocks are checkpointed as in training);
- **training state**: a gradient, two Adam moments and an EMA copy per trainable parameter;
- **samples**: the noise, the drawn batches and the joined result of ``num`` images (three copies);
- **diffusion**: its per-timestep tables, measured on a short process and scaled by ``diffusion.steps``.

The budget is the memory available on the device (CUDA: ``torch.cuda.mem_get_info``; otherwise the
system's available memory, from psutil when installed, else ``/proc/meminfo``), or the size given
by the environment variable ``DIFFLORA_MEMORY_BUDGET`` (e.g. ``64G``; ``off`` skips the check).
"""

from __future__ import annotations

import math
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from difflora.config.schema import Config
from difflora.errors import DiffloraError
from difflora.model.build import NET_INPUTS, build_diffusion, build_model
from difflora.model.expand import adapter_entries
from difflora.train.activation_checkpointing import checkpoint_blocks

try:  # optional: the system's available memory on any OS
    import psutil
except ImportError:  # Linux: /proc/meminfo tells the same
    psutil = None

__all__ = [
    "BUDGET_ENV",
    "Footprint",
    "MemoryRefused",
    "available_memory",
    "check_memory",
    "estimate",
    "format_bytes",
    "training_batch",
]

BUDGET_ENV = "DIFFLORA_MEMORY_BUDGET"
_FLOAT = 4  # bytes of a float32: weights, optimizer state, samples
# Adam's two moments, the gradient and the EMA shadow of every trainable parameter.
_STATE_PER_TRAINABLE = 4
# The sampler's noise, its batches' outputs and their concatenation: three tensors of num images.
_SAMPLE_COPIES = 3
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class MemoryRefused(MemoryError, DiffloraError):
    """The estimated footprint of a command exceeds the memory its device has available."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Footprint:
    """Bytes a command will hold at its peak, by what holds them; ``knobs`` names what sets each part."""

    parts: dict[str, int]
    knobs: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        shown = ", ".join(f"{name} {format_bytes(n)}" for name, n in self.parts.items() if n)
        return f"about {format_bytes(self.total)} ({shown})"

    def largest(self) -> str:
        return max(self.parts, key=lambda k: self.parts[k])


class _LiveBytes(TorchDispatchMode):
    """Follows every tensor an operation creates (not views, not in-place results) until it is freed,
    and records the most bytes alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            # A check on values (`if (y >= n).any(): raise`) reads a number a meta tensor does not
            # hold: the inputs are zeros, valid for every check, so the check passes as it would.
            dtype = args[0].dtype
            return False if dtype == torch.bool else (0.0 if dtype.is_floating_point else 0)
        out = func(*args, **(kwargs or {}))
        given = {id(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t._base is None and id(t) not in given:
                n = t.numel() * t.element_size()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n


# The context length of a text pipeline (CLIP tokenizers pad to 77): the config does not record the
# tokenizer's, and the estimate only needs its order of magnitude.
_TEXT_TOKENS = 77


def _meta_inputs(cfg: Config, batch: int) -> dict[str, torch.Tensor]:
    m = cfg.model
    zeros = {"device": "meta"}
    inputs: dict[str, torch.Tensor] = {
        "x": torch.zeros(batch, m.in_channels, m.image_size, m.image_size, **zeros),
        "t": torch.zeros(batch, dtype=torch.long, **zeros),
    }
    if m.num_classes:
        inputs["y"] = torch.zeros(batch, dtype=torch.long, **zeros)
    if m.spatial_channels:
        inputs["spatial"] = torch.zeros(batch, m.spatial_channels, m.image_size, m.image_size, **zeros)
    if m.text is not None:  # a text pipeline's UNet needs the prompts' context
        inputs["context"] = torch.zeros(batch, _TEXT_TOKENS, m.text.hidden, **zeros)
    for a in adapter_entries(cfg):
        if a.condition not in ("t", "y", *NET_INPUTS):
            inputs[a.condition] = torch.zeros(batch, dtype=torch.long, **zeros)
    return inputs


def _activation_bytes(model: torch.nn.Module, cfg: Config, batch: int, grad: bool) -> int:
    """The most bytes alive at once during one forward of ``batch`` samples (meta tensors: free)."""
    mode = _LiveBytes()
    with torch.set_grad_enabled(grad), mode:
        out = model(**_meta_inputs(cfg, batch))
    del out
    return mode.peak


def _diffusion_bytes(cfg: Config) -> int:
    """The diffusion's per-timestep tables, measured on a 100-step copy and scaled to ``diffusion.steps``."""
    probe = cfg.model_copy(update={"diffusion": cfg.diffusion.model_copy(update={"steps": 100})})
    tables = [v for v in vars(build_diffusion(probe)).values() if isinstance(v, np.ndarray | torch.Tensor)]
    per_step = sum(v.nbytes if isinstance(v, np.ndarray) else v.numel() * v.element_size() for v in tables) / 100
    return math.ceil(per_step * cfg.diffusion.steps)


def estimate(
    cfg: Config, *, train_batch: int = 0, samples: int = 0, sample_batch: int = 0, guided: bool = False
) -> Footprint:
    """The peak bytes of a command on ``cfg``: training at micro-batch ``train_batch`` (0: no
    training), and/or drawing ``samples`` images in batches of ``sample_batch`` (doubled when
    ``guided``: classifier-free guidance runs both halves in one batch). Builds nothing real."""
    with torch.device("meta"):
        model = build_model(cfg)
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])
    trainable = sum(p.numel() for p in params if p.requires_grad) * _FLOAT
    parts = {"weights": weights, "diffusion tables": _diffusion_bytes(cfg)}
    shrink = "shrink the model (model.num_classes, channels, adapter ranks, context tokens)"
    knobs = {"weights": shrink, "diffusion tables": "lower diffusion.steps"}
    draw = min(samples, sample_batch) * (2 if guided else 1)
    sample_act = _activation_bytes(model.eval(), cfg, draw, grad=False) if samples else 0
    if train_batch and cfg.model.checkpoint_blocks:
        checkpoint_blocks(model)
    train_act = _activation_bytes(model.train(), cfg, train_batch, grad=True) if train_batch else 0
    m = cfg.model
    images = samples * m.in_channels * m.image_size**2 * _FLOAT * _SAMPLE_COPIES
    if train_batch:
        parts["training state"] = trainable * _STATE_PER_TRAINABLE
        knobs["training state"] = f"{shrink} or train less of it (train.train_base=false)"
    # Training and sampling do not overlap: a command's peak is the larger of the two phases.
    if train_act >= sample_act + images:
        parts[f"activations at batch {train_batch}"] = train_act
        knobs[f"activations at batch {train_batch}"] = "lower train.batch_size or raise train.grad_accum"
    else:
        parts[f"activations at batch {draw}"] = sample_act
        parts[f"{samples} samples"] = images
        knobs[f"activations at batch {draw}"] = "lower sample.batch_size"
        knobs[f"{samples} samples"] = "draw fewer samples"
    return Footprint(parts, knobs)


def _meminfo_available() -> int | None:
    path = Path("/proc/meminfo")
    if not path.is_file():
        return None
    found = re.search(r"^MemAvailable:\s+(\d+) kB", path.read_text(), re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def _parse_size(text: str) -> int:
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not found:
        raise ValueError(f"{BUDGET_ENV}={text!r}: give a size such as 16G or 512M, or off")
    return int(float(found.group(1)) * _UNITS[found.group(2).upper()])


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes the command may use on ``device``, where that number comes from); None: unknown (no check)."""
    given = os.environ.get(BUDGET_ENV, "").strip()
    if given.lower() == "off":
        return None, f"{BUDGET_ENV}=off"
    if given:
        return _parse_size(given), f"{BUDGET_ENV}={given}"
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    if psutil is not None:
        return psutil.virtual_memory().available, "available on this machine"
    return _meminfo_available(), "available on this machine"


def training_batch(cfg: Config, processes: int = 1) -> int:
    """The micro-batch one process trains on: ``train.batch_size`` split over processes and ``train.grad_accum``."""
    return math.ceil(cfg.train.batch_size / (cfg.train.grad_accum * processes))


def check_memory(
    cfg: Config,
    device: torch.device | str,
    what: str,
    *,
    train_batch: int = 0,
    samples: int = 0,
    guided: bool = False,
) -> Footprint:
    """Raise :class:`MemoryRefused` (one line: the estimate, the memory, the knob to turn) when
    ``what`` (e.g. "train", "sample --num 100000") cannot fit on ``device``; returns the estimate."""
    dev = torch.device(device)
    fp = estimate(cfg, train_batch=train_batch, samples=samples, sample_batch=cfg.sample.batch_size, guided=guided)
    budget, source = available_memory(dev)
    if budget is not None and fp.total > budget:
        big = fp.largest()
        raise MemoryRefused(
            f"{what} needs {fp.describe()} but {format_bytes(budget)} is {source}; {fp.knobs[big]} "
            f"(the largest part: {big}), or set {BUDGET_ENV}=SIZE if more will be free"
        )
    return fp
