"""The ``model.diffusers`` section: a diffusers backbone described inline (``model.arch: diffusers``).

Imported and re-exported by ``difflora.config.schema``; like it, this imports nothing else of difflora
(and not diffusers: the config validates without it; building the net needs it)::

    model:
      arch: diffusers
      num_classes: 10
      diffusers:
        class_name: UNet2DModel
        config: {block_out_channels: [16, 32], down_block_types: [DownBlock2D, AttnDownBlock2D], ...}

``config`` holds the class's constructor arguments (the keys of a diffusers ``config.json``).
``sample_size``, ``in_channels`` and ``out_channels`` default to the model section's image size,
channels and output channels (twice the channels with ``learn_sigma``); given, they must agree.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from difflora.config.base import StrictModel

__all__ = ["DIFFUSERS_CLASSES", "DiffusersConfig", "diffusers_problem"]

# The diffusers classes difflora wraps (difflora.nets.diffusers_wrap): a name -> class table there.
DIFFUSERS_CLASSES: tuple[str, ...] = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


class DiffusersConfig(StrictModel):
    """A diffusers model built from its config (never downloaded): class name and constructor arguments."""

    class_name: Literal["UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel"] = "UNet2DModel"
    """The diffusers model class to build."""
    # Constructor arguments of class_name (diffusers config.json keys); an unknown key is an error
    # naming the valid ones when the net is built.
    config: dict[str, Any] = Field(default_factory=dict)
    """Constructor arguments of class_name (the keys of a diffusers config.json)."""

    def resolved(self, image_size: int, in_channels: int, out_channels: int) -> dict[str, Any]:
        """``config`` with the shape keys filled from the model section."""
        return {"sample_size": image_size, "in_channels": in_channels, "out_channels": out_channels, **self.config}


def diffusers_problem(model: Any) -> str | None:
    """Why a ``model.arch: diffusers`` section (a resolved ``ModelConfig``) is invalid, or None.

    Checks what can be checked without diffusers: the shape keys against the data, and the keys
    of the model section that describe difflora's own backbones.
    """
    d = model.diffusers
    want = {"sample_size": model.image_size, "in_channels": model.in_channels, "out_channels": model.out_channels}
    for key, value in want.items():
        if key in d.config and d.config[key] != value:
            why = " (model.learn_sigma doubles the channels)" if key == "out_channels" else ""
            return (
                f"model.diffusers.config.{key} is {d.config[key]!r} but the data and model section give {value}"
                f"{why}; remove the key (it is filled in) or make them agree"
            )
    # DiTTransformer2DModel cuts the image into patch_size tiles (its default is 2): a size that does
    # not divide the image would fail at the first forward, after a run directory was written.
    patch = d.config.get("patch_size", 2)
    if d.class_name == "DiTTransformer2DModel" and (
        not isinstance(patch, int) or patch < 1 or model.image_size % patch
    ):
        return (
            f"model.diffusers.config.patch_size ({patch!r}) must be a positive integer dividing model.image_size "
            f"({model.image_size}); set model.diffusers.config.patch_size to a divisor of it"
        )
    # The UNets halve the image once per down block but the last: skips would not line up otherwise.
    blocks = d.config.get("block_out_channels", (0,) * 4)  # both classes default to four blocks
    if d.class_name != "DiTTransformer2DModel" and isinstance(blocks, list | tuple) and blocks:
        factor = 2 ** (len(blocks) - 1)
        if model.image_size % factor:
            return (
                f"model.image_size ({model.image_size}) cannot be taken by this {d.class_name}: its "
                f"{len(blocks)} blocks need a multiple of {factor}; set data.image_size to a multiple of {factor}"
            )
    if not model.time_embed:
        return (
            "model.time_embed=false: a diffusers model keeps its own time embedding (TimeLoRA then adds to it, "
            "000 section 5.3); set model.time_embed=true"
        )
    if model.attention != "self":
        return (
            "model.attention=cross is for difflora's backbones; use class_name UNet2DConditionModel for cross-attention"
        )
    if model.affiner is not None and (model.affiner.latent is None or not model.affiner.targets):
        return "model.affiner on a diffusers model needs model.affiner.latent and model.affiner.targets (no defaults)"
    return None
