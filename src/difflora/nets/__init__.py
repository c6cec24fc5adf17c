"""Backbones: the IDDPM U-Net and DiT, both called ``net(x, t, y=None)`` -> [N x C_out x H x W].

Both take the whole :class:`difflora.config.schema.ModelConfig`; ``y == -1`` is the null label (no class
conditioning for that sample), ``y=None`` makes the whole batch unconditional. They know nothing
about diffusion.
"""

from __future__ import annotations

import torch.nn as nn

from difflora.config.schema import ModelConfig
from difflora.nets.controlnet import ControlUNet
from difflora.nets.dit import DIT_PRESETS, DiT
from difflora.nets.layers import count_parameters
from difflora.nets.unet import UNetModel, default_channel_mult

__all__ = ["DIT_PRESETS", "ControlUNet", "DiT", "UNetModel", "build_net", "count_parameters", "default_channel_mult"]


def build_net(cfg: ModelConfig) -> nn.Module:
    """The backbone named by ``cfg.arch`` ("unet", "dit" or "diffusers"), freshly initialised."""
    if cfg.arch == "unet":
        # A ControlNet-style branch for spatial tasks (model.spatial_input), else the plain U-Net.
        return ControlUNet(cfg) if cfg.spatial_channels and cfg.spatial_input == "controlnet" else UNetModel(cfg)
    if cfg.arch == "dit":
        return DiT(cfg)
    if cfg.arch == "diffusers":
        from difflora.nets.diffusers_wrap import DiffusersNet  # diffusers is optional: imported on use

        return DiffusersNet.from_config(cfg)
    raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}; choose unet, dit or diffusers")
