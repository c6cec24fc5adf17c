"""The backbone sections of the model config: difflora's U-Net, the DiT (and its presets), and the
context of cross-attention. Imported and re-exported by ``difflora.config.schema``; like it, this
imports nothing else of difflora."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from difflora.config.base import StrictModel, hold_fixed

__all__ = ["DIT_PRESETS", "ContextConfig", "DiTConfig", "UNetConfig"]

# name -> (depth, hidden_size, num_heads, patch_size). The twelve published models (DiT paper,
# Table 1) plus tiny ones for CPU tests and demos.
DIT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    **{f"DiT-XL/{p}": (28, 1152, 16, p) for p in (2, 4, 8)},
    **{f"DiT-L/{p}": (24, 1024, 16, p) for p in (2, 4, 8)},
    **{f"DiT-B/{p}": (12, 768, 12, p) for p in (2, 4, 8)},
    **{f"DiT-S/{p}": (12, 384, 6, p) for p in (2, 4, 8)},
    **{f"DiT-T/{p}": (2, 64, 2, p) for p in (1, 2, 4)},
}


class UNetConfig(StrictModel):
    """improved-diffusion's UNetModel flags, same names where they exist."""

    model_channels: int = Field(default=128, ge=1)
    """Base channel width of the U-Net."""
    num_res_blocks: int = Field(default=3, ge=1)
    """Residual blocks per resolution level."""
    # Resolutions (side lengths in pixels) at which attention blocks sit.
    attention_resolutions: list[int] = Field(default_factory=lambda: [16, 8])
    """Image sides (in pixels) at which attention blocks sit."""
    # None: improved-diffusion's choice by image size.
    channel_mult: list[int] | None = None
    """Channel multiplier per resolution level (unset: improved-diffusion's choice by image size)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout probability inside the residual blocks."""
    num_heads: int = Field(default=4, ge=1)
    """Attention heads per attention block."""
    num_heads_upsample: int = -1
    """Attention heads in the upsampling path (-1: num_heads)."""
    use_scale_shift_norm: bool = True
    """Condition the residual blocks by scale and shift of the normalised activations (FiLM)."""
    conv_resample: bool = True
    """Learned convolutions when down- and upsampling (false: pooling and nearest upsampling)."""


class DiTConfig(StrictModel):
    """DiT (Peebles & Xie) with adaLN-Zero. ``preset`` (a key of :data:`DIT_PRESETS`) fixes the four
    size fields: the config then holds the preset's values (an explicit other value is an error)."""

    preset: str | None = None
    """A named DiT size (e.g. DiT-S/2) fixing depth, hidden_size, num_heads and patch_size."""
    patch_size: int = Field(default=2, ge=1)
    """Side of the square patches the image is cut into (tokens)."""
    depth: int = Field(default=12, ge=1)
    """Number of DiT blocks."""
    hidden_size: int = Field(default=384, ge=1)
    """Token width."""
    num_heads: int = Field(default=6, ge=1)
    """Attention heads per block."""
    mlp_ratio: float = Field(default=4.0, gt=0)
    """Width of each block's MLP as a multiple of hidden_size."""

    @model_validator(mode="after")
    def _preset(self) -> DiTConfig:
        if self.preset is None:
            return self
        if self.preset not in DIT_PRESETS:
            raise ValueError(
                f"model.dit.preset: unknown preset {self.preset!r}; choose one of {', '.join(DIT_PRESETS)}"
            )
        sizes = dict(zip(("depth", "hidden_size", "num_heads", "patch_size"), DIT_PRESETS[self.preset], strict=True))
        hold_fixed(self, "model.dit", sizes, f"model.dit.preset={self.preset}")
        return self


class ContextConfig(StrictModel):
    """The context of ``model.attention: cross`` (LDM-style transformer blocks, ``nets/transformer.py``)."""

    # Width D of the context [N x L x D] the cross-attention reads (keys and values: D -> block width).
    dim: int = Field(default=64, ge=1)
    """Width of the context tokens the cross-attention reads."""
    # Learned context tokens L per class label (and for the null context of y = -1).
    tokens: int = Field(default=1, ge=1)
    """Learned context tokens per class label (and for the null context)."""
    # U-Net only: transformer blocks per attention site (LDM's transformer_depth) and the GEGLU
    # feed-forward's inner width as a multiple of the block width (the DiT uses dit.mlp_ratio).
    depth: int = Field(default=1, ge=1)
    """U-Net only: transformer blocks per attention site."""
    ff_mult: float = Field(default=4.0, gt=0)
    """U-Net only: the GEGLU feed-forward's inner width as a multiple of the block width."""
    # New class tokens on an adapted base (difflora.adapters.tokens): a trainable token table in place
    # of the base's class tokens (the base's null context stays for y = -1), started at the base's
    # null context ("unconditional": every class starts as the unconditional base, exactly) or at the
    # mean of its class tokens ("mean"), or at the base's token of the same class ("base": distinct
    # from step 0; see adapters/tokens.py for why that matters). None: the base's own class tokens.
    new_tokens: Literal["unconditional", "mean", "base"] | None = None
    """New trainable class tokens on an adapted base, started at: unconditional, mean or base (unset: the base's own)."""
