"""Build the network a config describes and wrap it as the model callable the diffusion code uses.

``build_model(cfg)`` returns a :class:`DiffusionModel`: ``model(x, t, y=None)``. The wrapper is
where per-sample conditions (t, y, task, ...) are handed to adapters for the duration of one
forward, so that backbones keep their plain ``net(x, t, y)`` signature.
"""

from __future__ import annotations

import torch
from torch import nn

from difflora.config import Config
from difflora.diffusion import create_diffusion
from difflora.nets import build_net

__all__ = ["DiffusionModel", "build_diffusion", "build_model"]


class DiffusionModel(nn.Module):
    """The model callable: ``forward(x [N x C x H x W], t [N], y [N] | None) -> [N x C_out x H x W]``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, t, y)


def build_model(cfg: Config) -> DiffusionModel:
    """The network of ``cfg.model`` wrapped as a :class:`DiffusionModel` (weights freshly initialised)."""
    return DiffusionModel(build_net(cfg.model))


def build_diffusion(cfg: Config, respacing: str | int | None = None):
    """The Gaussian diffusion of ``cfg.diffusion``; ``respacing`` (e.g. 50 or "ddim50") for sampling."""
    return create_diffusion(cfg.diffusion, learn_sigma=cfg.model.learn_sigma, respacing=respacing)
