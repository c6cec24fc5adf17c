"""ControlNet-style spatial conditioning: the baseline DiffScaler's spatial tasks are compared against.

``model.spatial_input: controlnet`` (registered in :data:`difflora.nets.SPATIAL_INPUTS`) builds
:class:`ControlUNet`: the IDDPM U-Net (``nets/unet.py``)
plus a :class:`ControlBranch`, a trainable copy of its encoder (``input_blocks``) and middle block
(Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion Models", arXiv 2302.05543):

* the copy reads the noisy x, with the condition image added after its first conv through a
  zero-initialised 3x3 conv (``hint``; our images are already at the model's resolution, so
  ControlNet's small encoder of the condition reduces to that one conv);
* the copy's output after input block i goes through a zero-initialised 1x1 conv
  (``zero_convs[i]``) and is added to the U-Net's skip feature i; its middle output goes through
  ``middle_zero`` and is added to the U-Net's middle output.

The branch uses the U-Net's own time and class embedding (a frozen base's, when adapting; not a
copy), and starts as an exact copy of the encoder: :func:`copy_encoder_into_control` repeats the
copy after ``train.init_from`` has loaded the base's weights (a hook of
:data:`difflora.train.base.BASE_LOADED`). Every zero conv starts at zero, so
at step 0 the model is exactly the base. The branch is a
:class:`~difflora.nets.layers.BaseExtension`: trained while the base is frozen, new to the base
checkpoint, stored in the run's checkpoints.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from difflora.config.schema import ModelConfig
from difflora.nets.layers import BaseExtension, zero_module
from difflora.nets.unet import UNetModel

__all__ = ["ControlBranch", "ControlUNet", "copy_encoder_into_control"]


class ControlBranch(BaseExtension):
    """The trainable encoder copy of a U-Net and its zero convs.

    ``branch(x, emb, ctx, spatial)`` -> (residuals for the skip features, one [N x C_i x H_i x W_i]
    per input block, and the middle residual [N x C_mid x H_mid x W_mid]).
    """

    def __init__(self, unet: UNetModel, spatial_channels: int) -> None:
        super().__init__()
        mc = unet.model_channels
        self.hint = zero_module(nn.Conv2d(spatial_channels, mc, 3, padding=1))
        self.input_blocks = copy.deepcopy(unet.input_blocks)
        self.middle_block = copy.deepcopy(unet.middle_block)
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in unet.skip_channels)
        mid = unet.skip_channels[-1]
        self.middle_zero = zero_module(nn.Conv2d(mid, mid, 1))

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor | None, ctx: torch.Tensor | None, spatial: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        residuals = []
        h = x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, ctx)
            if i == 0:
                h = h + self.hint(spatial.to(h.dtype))
            residuals.append(zero(h))
        return residuals, self.middle_zero(self.middle_block(h, emb, ctx))


class ControlUNet(UNetModel):
    """The U-Net with a :class:`ControlBranch` (attribute ``control``); state-dict keys of the U-Net
    itself are unchanged, so a base U-Net checkpoint loads into it. Called as the U-Net, with
    ``spatial`` [N x C_s x H x W] (without it, the branch is skipped: the base's output)."""

    def __init__(self, cfg: ModelConfig) -> None:
        if not cfg.spatial_channels:
            raise ValueError("model.spatial_input=controlnet needs spatial tasks (data.spatial)")
        super().__init__(cfg)
        self.control = ControlBranch(self, cfg.spatial_channels)

    def encode(
        self, x: torch.Tensor, emb: torch.Tensor | None, ctx: torch.Tensor | None, spatial: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The U-Net's skip features and middle output, plus the branch's zero-conv residuals."""
        hs, h = super().encode(x, emb, ctx, None)
        if spatial is None:
            return hs, h
        residuals, mid = self.control(x, emb, ctx, spatial)
        return [a + r for a, r in zip(hs, residuals, strict=True)], h + mid


@torch.no_grad()
def copy_encoder_into_control(net: nn.Module) -> int:
    """Copy the U-Net's input and middle blocks into the ControlNet branch of every
    :class:`ControlUNet` in ``net`` (after a base was loaded into them); returns how many branches.

    Reads through adapter wrappers: the branch holds plain layers, the U-Net's may be wrapped, so
    tensors are matched by their path without ``base_layer``.
    """
    count = 0
    for module in net.modules():
        if not isinstance(module, ControlUNet):
            continue
        for name in ("input_blocks", "middle_block"):
            src = {k.replace(".base_layer", ""): v for k, v in getattr(module, name).state_dict().items()}
            dst = getattr(module.control, name)
            dst.load_state_dict({k: src[k] for k in dst.state_dict()})
        count += 1
    return count
