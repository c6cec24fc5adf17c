"""``model.latent`` and ``model.text``: a pipeline's VAE and text encoder, as the config records them.

:func:`difflora.config.pretrained.expand_pretrained` fills the shape keys from the pipeline's
``vae/config.json`` and ``text_encoder/config.json`` (the YAML does not restate them); the user
keys say how the caches are made and where they live (docs/pretrained.md, "Latent and text
pipelines"). The caches themselves are :mod:`difflora.latent`'s.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from difflora.config.base import StrictModel

__all__ = ["LatentConfig", "TextConfig"]

StorageDtype = Literal["float32", "float16", "bfloat16"]


class LatentConfig(StrictModel):
    """The pipeline's VAE: the model trains and samples in its latent space."""

    # From vae/config.json: latent_channels, in_channels, 2 ** (len(block_out_channels) - 1).
    channels: int = Field(ge=1)
    """Latent channels of the VAE."""
    image_channels: int = Field(ge=1)
    """Image channels the VAE encodes."""
    downsample: int = Field(ge=1)
    """Factor by which the VAE shrinks each image side."""
    # The posterior's mean (deterministic: the default, see docs/latents.md) or one draw per image.
    posterior: Literal["mean", "sample"] = "mean"
    """Encode each image to the posterior's mean or to one draw of it."""
    # The draws of posterior: sample (image i from seed * 2**32 + i).
    seed: int = Field(default=0, ge=0, lt=2**31)
    """Seed of the posterior draws (posterior: sample)."""
    dtype: StorageDtype = "float32"
    """Storage dtype of the cached latents."""
    # The cache's directory; None: $DIFFLORA_CACHE/latents/latents-<key hash>. A cache of another
    # key at an explicit path is refused, never overwritten.
    cache: str | None = None
    """Directory of the latent cache (unset: under $DIFFLORA_CACHE/latents)."""

    def model_shape(self, size: int | None, channels: int) -> tuple[int | None, int]:
        """(latent side, latent channels) of images of side ``size`` with ``channels``; a size the VAE
        cannot take or channels it does not read are a ValueError naming the fix."""
        if channels != self.image_channels:
            raise ValueError(
                f"the pipeline's vae encodes {self.image_channels}-channel images but the data has {channels}; "
                f"set data.channels={self.image_channels} (an image folder) or use data with {self.image_channels}"
            )
        if size is None:
            return None, self.channels
        if size % self.downsample:
            lower = max(self.downsample, size - size % self.downsample)
            raise ValueError(
                f"data.image_size={size}: the pipeline's vae downsamples by {self.downsample}, so the image size "
                f"must be a multiple of {self.downsample}; use data.image_size={lower}"
            )
        return size // self.downsample, self.channels


class TextConfig(StrictModel):
    """The pipeline's tokenizer and text encoder: captions and prompts become cross-attention context."""

    # From text_encoder/config.json: hidden_size (the context's width; the UNet's cross_attention_dim).
    hidden: int = Field(ge=1)
    """Width of the text encoder's hidden states (the cross-attention context width)."""
    dtype: StorageDtype = "float32"
    """Storage dtype of the cached prompt embeddings."""
    # The prompt cache's directory; None: $DIFFLORA_CACHE/latents/prompts-<key hash>.
    cache: str | None = None
    """Directory of the prompt cache (unset: under $DIFFLORA_CACHE/latents)."""
