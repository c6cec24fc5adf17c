"""DiT masked training (002 section 4.2, ``train.mask_ratio``): the diffusion loss on a random
subset of each sample's patch tokens, the others never entering the network.

:class:`MaskedDiffusionObjective` is the variant of the shared "diffusion" objective that a
config with ``train.mask_ratio > 0`` selects (registered in
:data:`difflora.train.objectives.DIFFUSION_VARIANTS`); the DiT reads the kept tokens as a strip of
their patches (``net(strip, t, y, keep=idx)``, :mod:`difflora.nets.dit`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difflora.config.schema import Config
from difflora.nets.dit import patch_strip
from difflora.train.objectives import Batch, DiffusionObjective

__all__ = ["MaskedDiffusionObjective", "masked_training", "random_keep"]


def random_keep(n: int, tokens: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """[N x K] indices of the tokens each sample keeps, ascending: a uniformly random subset of
    ``K = tokens - round(ratio * tokens)`` (at least 1) per sample, drawn in one batched op."""
    keep = max(1, tokens - round(ratio * tokens))
    scores = torch.rand(n, tokens, generator=generator)
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values


def masked_training(cfg: Config) -> bool:
    """Whether ``cfg`` asks for masked training (``train.mask_ratio`` > 0)."""
    return bool(cfg.train.mask_ratio)


class MaskedDiffusionObjective(DiffusionObjective):
    """DiT masked training (002 section 4.2, ``train.mask_ratio`` r > 0): the diffusion loss on the
    kept patches only, with the dropped tokens never entering the network.

    After :class:`DiffusionObjective`'s draws it draws, per sample, the kept tokens (a random subset
    of ``T - round(r T)``, :func:`random_keep`). Images and noise become strips of
    the kept patches (:func:`~difflora.nets.dit.patch_strip`), which the DiT reads with ``keep``; the
    diffusion's element-wise loss terms, averaged over the strip, are the loss over kept pixels.
    """

    def __init__(self, cfg: Config, diffusion: Any):
        super().__init__(cfg, diffusion)
        self.ratio = cfg.train.mask_ratio
        self.patch = cfg.model.dit.patch_size  # a preset's, when there is one
        assert cfg.model.image_size is not None  # resolved from the data
        self.tokens = (cfg.model.image_size // self.patch) ** 2

    def __call__(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, device: torch.device
    ) -> dict[str, torch.Tensor]:
        t, noise, kwargs = self.draw(batch, generator)
        keep = random_keep(batch.x.shape[0], self.tokens, self.ratio, generator)
        x, t, noise, keep, kwargs = (batch.local(v) for v in (batch.x, t, noise, keep, kwargs))
        keep = keep.to(device)
        x, noise = patch_strip(x.to(device), keep, self.patch), patch_strip(noise.to(device), keep, self.patch)
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        return self.diffusion.training_losses(model, x, t.to(device), {**kwargs, "keep": keep}, noise=noise)
