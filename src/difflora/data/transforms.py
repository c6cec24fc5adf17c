"""The two image transforms of difflora's data layer: a batched resize and a random horizontal flip.

Resizing happens once, when a dataset is loaded; flipping happens per batch (``ImageDataset.batch``)
with coin flips drawn from the caller's ``torch.Generator``, so augmentation is reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["flip_coins", "random_hflip", "resize_images"]


def resize_images(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize [N x C x H x W] images to [N x C x size x size] (bilinear, antialiased).

    Non-square images are stretched to a square. Bilinear weights (with antialiasing, a triangle
    filter) are non-negative and sum to one, so the output stays in the input's range and a constant
    image stays constant; the final clamp only removes float rounding outside [-1, 1]. Work is done in
    chunks of ``chunk`` images to bound the memory of the antialiasing intermediates. Returns the input
    itself when it already has the requested size.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images [N x C x H x W], got shape {tuple(images.shape)}")
    if images.shape[-2:] == (size, size):
        return images
    out = images.new_empty(images.shape[0], images.shape[1], size, size)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk]
        out[start : start + chunk] = F.interpolate(
            part, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return out.clamp_(-1.0, 1.0)


def random_hflip(images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image of [N x C x H x W] left-right with probability ``p``; returns a new tensor.

    One coin per sample, ``torch.rand(N, generator=generator) < p``, drawn on the generator's device
    (CPU when None) so the same seed gives the same flips on every device.
    """
    coins = flip_coins(images.shape[0], generator, p).to(images.device).view(-1, *([1] * (images.ndim - 1)))
    return torch.where(coins, images.flip(-1), images)


def flip_coins(n: int, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """The coins of :func:`random_hflip`: bool [n], ``torch.rand(n, generator=generator) < p`` on the
    generator's device (CPU when None). A cache of flipped latents draws the same coins, so training
    from it consumes the generator exactly as training from the images does."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=device) < p
