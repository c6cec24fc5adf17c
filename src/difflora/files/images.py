"""Image grids: [-1, 1] tensors to PNG files (written atomically)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflora.files.atomic import write_bytes

__all__ = ["grid_png", "make_grid", "save_grid", "to_uint8"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N x C x H x W] floats in [-1, 1] -> uint8 array [N x H x W x C]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile [N x C x H x W] images into one uint8 [H' x W' x C] array, ``nrow`` images per row."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"make_grid expects a non-empty [N x C x H x W] batch, got shape {tuple(images.shape)}")
    arr = to_uint8(images)
    if upscale > 1:
        arr = arr.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):  # a few hundred tiles at most: a loop over tiles is clearer than strides
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = arr[i]
    return grid


def grid_png(images: torch.Tensor, nrow: int | None = None, upscale: int | None = None) -> bytes:
    """The PNG file of a grid of ``images``. Small images (8 px digits) are upscaled so a person can see them."""
    if upscale is None:
        upscale = max(1, 64 // images.shape[-1])
    grid = make_grid(images, nrow=nrow, upscale=upscale)
    mode = "L" if grid.shape[2] == 1 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if mode == "L" else grid, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int | None = None) -> Path:
    """Write a PNG grid (:func:`grid_png`) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, grid_png(images, nrow, upscale))
