"""Training objectives: what the one training loop minimises.

The loop draws a data batch and hands it to an objective, which draws whatever else it needs
(timesteps, noise, label dropout) from the loop's generator and returns per-sample loss terms.
The loop owns everything else (optimizer, EMA, checkpoints, logging), so distillation (a teacher
pass and a student pass) or a multi-task loss is a new objective, not a copy of the loop::

    objective = build_objective(cfg, diffusion)        # cfg.train.objective, e.g. "diffusion"
    losses = objective(model, batch, generator, device)
    losses["loss"].mean().backward()

An objective's every random draw must come from ``generator`` (or the global torch RNG, e.g.
dropout): both are checkpointed, which is what makes resuming bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from difflora.config.schema import Config
from difflora.diffusion.guidance import drop_labels
from difflora.registry import Registry

__all__ = [
    "DIFFUSION_VARIANTS",
    "OBJECTIVES",
    "Batch",
    "DiffusionObjective",
    "DiffusionVariant",
    "Objective",
    "build_objective",
]


@dataclass
class Batch:
    """One training batch as drawn from the data (on the CPU).

    x: [N x C x H x W] images in [-1, 1]. conditions: per-sample [N] values the data supplies
    (``y`` class labels, and e.g. ``task`` ids), keyed by condition name. ``rows``: the rows this
    call computes (a micro-batch, or this process's share under DDP; None: all). An objective
    makes its random draws for all N rows, then keeps ``rows`` (:meth:`local`), so that how a batch
    is split changes no draw (``difflora.train.step``).
    """

    x: torch.Tensor
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: slice | None = None

    def local(self, value: Any) -> Any:
        """``value`` [N x ...] (or a dict of them) cut to ``rows``."""
        if self.rows is None:
            return value
        if isinstance(value, dict):
            return {k: v[self.rows] for k, v in value.items()}
        return value[self.rows]


class Objective(Protocol):
    """``objective(model, batch, generator, device) -> {term: [N] tensor}``, with a ``"loss"`` term."""

    def __call__(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, device: torch.device
    ) -> dict[str, torch.Tensor]: ...


class DiffusionObjective:
    """The diffusion loss of ``cfg.diffusion`` (IDDPM's L_simple, or hybrid with L_vb).

    Per batch it draws, in this order from ``generator``: timesteps t ~ U{0..T-1} [N], noise
    ~ N(0, I) [N x C x H x W], and (class-conditional models) the classifier-free-guidance label
    dropout that sets a label to the null class -1 with probability ``train.label_dropout``.
    """

    def __init__(self, cfg: Config, diffusion: Any):
        self.diffusion = diffusion
        self.num_classes = cfg.model.num_classes
        self.label_dropout = cfg.train.label_dropout

    def draw(
        self, batch: Batch, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The draws of the whole (global) batch: t [N], noise [N x C x H x W] and the conditions.

        The conditions are the batch's, passed on as one dict: the labels ``y`` after label
        dropout (left out for an unconditional model, whose backbone takes none), the rest as the
        data supplied them. Every process draws the same values for the global batch and keeps its
        own rows (:meth:`Batch.local`), so the number of processes changes no random draw.
        """
        x = batch.x
        t = torch.randint(self.diffusion.num_timesteps, (x.shape[0],), generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        conditions = {
            k: drop_labels(v, self.label_dropout, generator) if k == "y" else v
            for k, v in batch.conditions.items()
            if k != "y" or self.num_classes
        }
        return t, noise, conditions

    def __call__(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, device: torch.device
    ) -> dict[str, torch.Tensor]:
        t, noise, kwargs = self.draw(batch, generator)
        x, t, noise, kwargs = (batch.local(v) for v in (batch.x, t, noise, kwargs))
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        return self.diffusion.training_losses(model, x.to(device), t.to(device), kwargs, noise=noise.to(device))


class DiffusionVariant(NamedTuple):
    """A variant of the diffusion objective: ``build(cfg, diffusion)`` when ``wanted(cfg)``."""

    wanted: Callable[[Config], bool]
    build: Callable[[Config, Any], Objective]


# Variants of "diffusion" chosen by the config (the first that wants it, else DiffusionObjective); a
# paper package registers its own in its register() (difflora.registry), e.g. 002's masked DiT training.
DIFFUSION_VARIANTS: Registry[DiffusionVariant] = Registry("train.objective.diffusion")


def _diffusion_objective(cfg: Config, diffusion: Any) -> Objective:
    for variant in DIFFUSION_VARIANTS.values():
        if variant.wanted(cfg):
            return variant.build(cfg, diffusion)
    return DiffusionObjective(cfg, diffusion)


# train.objective -> factory(cfg, diffusion). The shared one is "diffusion"; a paper package registers
# its own in its register() (difflora.registry), e.g. 003's "distill".
OBJECTIVES: Registry[Callable[[Config, Any], Objective]] = Registry("train.objective")
OBJECTIVES.register("diffusion", _diffusion_objective)


def build_objective(cfg: Config, diffusion: Any) -> Objective:
    """The objective ``cfg.train.objective`` names."""
    return OBJECTIVES[cfg.train.objective](cfg, diffusion)
