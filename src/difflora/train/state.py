"""What a running training holds: :class:`TrainState` (every part of the loop's state, which
``train(callback=...)`` receives after each step) and its metrics :class:`Window`.

A module of its own, below both the loop (``loop.py``, which builds the state) and a step
(``step.py``, which advances it), so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflora.config.schema import Config
from difflora.data import BatchSource
from difflora.train.distributed import Dist
from difflora.train.ema import EMA
from difflora.train.objectives import Objective
from difflora.train.trackers import Trackers

__all__ = ["TrainState", "Window"]


class Window:
    """The loss terms of the steps since the last metrics row, summed on the device.

    ``pending[name]`` (float64, so a window split by a checkpoint sums exactly as one that is not)
    holds this process's share of each step's global batch mean; :meth:`flush` adds them over
    processes into ``totals`` (Python floats, checkpointed) with one collective.
    ``first_bad`` is the first step whose loss was not finite (0: none).
    """

    def __init__(self, device: torch.device, totals: dict[str, float] | None = None):
        self.device = device
        self.totals: dict[str, float] = dict(totals or {})
        self.pending: dict[str, torch.Tensor] = {}
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, values: dict[str, torch.Tensor], step: int) -> None:
        for name, v in values.items():
            v = v.detach().double()
            self.pending[name] = self.pending[name] + v if name in self.pending else v
        bad = ~torch.isfinite(values["loss"])
        self.first_bad = torch.where(bad & (self.first_bad == 0), step, self.first_bad)
        self.totals["_n"] = self.totals.get("_n", 0) + 1

    def flush(self, ctx: Dist) -> int:
        """Fold the pending sums into ``totals`` (all processes must call it); returns ``first_bad``."""
        if self.pending:
            names = sorted(self.pending)
            summed = ctx.sum(torch.stack([self.pending[k] for k in names])).tolist()
            for k, v in zip(names, summed, strict=True):
                self.totals[k] = self.totals.get(k, 0.0) + v
            self.pending = {}
        return int(ctx.max(self.first_bad).item())


@dataclass
class TrainState:
    """Everything a running training holds; ``train(callback=...)`` receives it after each step.

    ``step`` counts completed steps. ``stored_keys`` are the model's state-dict keys a checkpoint
    holds (all of them, or the trainable ones when adapting a base); ``base`` is the base record
    (``difflora.train.base.load_base``) or None; ``dist`` this process's rank among the run's.
    """

    cfg: Config
    out: Path
    device: torch.device
    model: torch.nn.Module
    # What a step calls: ``model``, or DDP / torch.compile around it (same parameters).
    train_model: torch.nn.Module
    objective: Objective
    data: BatchSource
    optimizer: torch.optim.Optimizer
    ema: EMA
    generator: torch.Generator
    params: list[torch.nn.Parameter]
    stored_keys: list[str]
    base: dict[str, Any] | None
    dist: Dist
    scaler: torch.amp.GradScaler
    # The loss terms since the last metrics row (:class:`Window`; its totals are checkpointed).
    window: Window
    step: int = 0
    last_good: int | None = None  # step of the newest checkpoint
    timed_s: float = 0.0
    timed_steps: int = 0
    row_s: float = 0.0  # seconds of the steps since the last metrics row (of this segment)
    row_steps: int = 0
    # The RNG state at the start of the step in progress (None between steps), and whether the
    # optimizer/EMA update is under way: what an interrupt checkpoint needs to know.
    rng_mark: dict[str, torch.Tensor] | None = None
    updating: bool = False
    last_row: dict[str, Any] = field(default_factory=dict)
    # TensorBoard / wandb (train.trackers), open on process 0 while it trains; None elsewhere.
    trackers: Trackers | None = None
