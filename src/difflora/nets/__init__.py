"""Backbones: the IDDPM U-Net and DiT, both called ``net(x, t, y=None)`` -> [N x C_out x H x W].

Both take the whole :class:`difflora.config.schema.ModelConfig`; ``y == -1`` is the null label (no class
conditioning for that sample), ``y=None`` makes the whole batch unconditional. They know nothing
about diffusion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from difflora.config.schema import ModelConfig
from difflora.nets.diffusers_wrap import DiffusersNet  # imports diffusers (optional) only when used
from difflora.nets.dit import DIT_PRESETS, DiT
from difflora.nets.layers import count_parameters
from difflora.nets.unet import UNetModel, default_channel_mult
from difflora.registry import Registry

__all__ = [
    "DIT_PRESETS",
    "SPATIAL_INPUTS",
    "DiT",
    "UNetModel",
    "adopt_net",
    "build_net",
    "count_parameters",
    "default_channel_mult",
]

# model.spatial_input -> the U-Net that reads a spatial condition that way. "concat" is the U-Net's
# own input; a paper package registers others in its register() (difflora.registry), e.g. 002's
# ControlNet-style branch.
SPATIAL_INPUTS: Registry[Callable[[ModelConfig], nn.Module]] = Registry("model.spatial_input")
SPATIAL_INPUTS.register("concat", UNetModel)


def build_net(cfg: ModelConfig) -> nn.Module:
    """The backbone named by ``cfg.arch`` ("unet", "dit" or "diffusers"), freshly initialised."""
    if cfg.arch == "unet":
        return SPATIAL_INPUTS[cfg.spatial_input](cfg) if cfg.spatial_channels else UNetModel(cfg)
    if cfg.arch == "dit":
        return DiT(cfg)
    if cfg.arch == "diffusers":
        return DiffusersNet.from_config(cfg)
    raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}; choose unet, dit or diffusers")


def adopt_net(net: nn.Module, cfg: ModelConfig) -> nn.Module:
    """A backbone the caller built (e.g. a diffusers model loaded with ``from_pretrained``) as the
    backbone of ``cfg``: a diffusers model is wrapped as a :class:`DiffusersNet` with ``cfg``'s
    classes. Its tensors must be the ones :func:`build_net` gives ``cfg`` (names and shapes), so that
    a run trained on it reopens from its config; a ValueError names the first that differ."""
    if type(net).__module__.split(".")[0] == "diffusers":
        net = DiffusersNet(net, cfg.num_classes, cfg.class_embed, cfg.context.tokens)
    with torch.device("meta"):  # shapes only: no second copy of the weights
        reference = {k: tuple(v.shape) for k, v in build_net(cfg).state_dict().items()}
    given = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    differ = sorted(set(reference) ^ set(given)) or sorted(k for k in given if given[k] != reference[k])
    if differ:
        key = differ[0]
        raise ValueError(
            f"the model given does not fit the config's model section ({len(differ)} tensor(s) differ, e.g. {key}: "
            f"{given.get(key, 'absent')} given, {reference.get(key, 'absent')} in the config's model); describe the "
            "same backbone in model.* (model.pretrained: its folder) and its adapters in model.adapters"
        )
    return net
