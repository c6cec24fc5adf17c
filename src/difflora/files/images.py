"""Images to files, each written atomically: [-1, 1] tensors as a PNG grid, as one PNG per image in
a directory, or as an ``.npz`` array (the layouts external FID tools read)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from difflora.files.atomic import atomic_write, check_directory, write_bytes, write_directory
from difflora.optional import require

if TYPE_CHECKING:  # for the annotation only: matplotlib is imported on use (agg_figure)
    from matplotlib.figure import Figure

__all__ = [
    "agg_figure",
    "check_image_dir",
    "grid_png",
    "make_grid",
    "save_grid",
    "save_image_dir",
    "save_npz",
    "to_uint8",
]


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
    buf = io.BytesIO()
    _image(grid).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int | None = None) -> Path:
    """Write a PNG grid (:func:`grid_png`) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, grid_png(images, nrow, upscale))


def _image(arr: np.ndarray) -> Image.Image:
    """A uint8 [H x W x C] array as a PIL image: grayscale (C = 1) or RGB (C = 3)."""
    return Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr, mode="RGB")


def check_image_dir(directory: str | Path, overwrite: bool = False) -> None:
    """Raise (an OSError) if :func:`save_image_dir` would refuse ``directory``: a file, or a
    non-empty directory without ``overwrite``. Callers check before the work that makes the images."""
    check_directory(directory, "the images", overwrite)


def save_image_dir(images: torch.Tensor, directory: str | Path, overwrite: bool = False) -> Path:
    """Write each image of [N x C x H x W] in [-1, 1] as ``DIR/000000.png``, ``000001.png``, ...
    (the layout clean-fid and torch-fidelity read), all or nothing: into a hidden staging directory
    beside ``DIR``, renamed onto it when every file is written. An existing non-empty ``DIR`` is a
    FileExistsError unless ``overwrite`` (it is then replaced as a whole, never mixed with new files)."""
    check_image_dir(directory, overwrite)
    arr = to_uint8(images)
    width = max(6, len(str(len(arr) - 1)))

    def write(stage: Path) -> None:
        for i, one in enumerate(arr):
            _image(one).save(stage / f"{i:0{width}d}.png", format="PNG")

    return write_directory(directory, write, arr.nbytes, "the images", overwrite)


def save_npz(images: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None) -> Path:
    """Write [N x C x H x W] images in [-1, 1] as ``path`` (.npz): uint8 [N x H x W x C] under
    ``arr_0``, and the class labels [N] under ``arr_1`` when given: the layout of the ADM evaluation
    suite's sample batches (its ``evaluator.py``). Written atomically."""
    path = Path(path)
    arrays = {"arr_0": to_uint8(images)}
    if labels is not None:
        arrays["arr_1"] = labels.detach().cpu().numpy().astype(np.int64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" to its name
            np.savez(f, **arrays)

    atomic_write(path, write, sum(a.nbytes for a in arrays.values()) + 1024)
    return path


def agg_figure(figsize: tuple[float, float], needed_by: str) -> Figure:
    """A matplotlib ``Figure`` on the Agg canvas (the object-oriented API: no pyplot global state,
    no display needed). matplotlib is imported here, on use: it is the ``plots`` extra, so a
    missing one is a one-line error naming ``needed_by`` and the install."""
    figure = require("matplotlib.figure", needed_by, extra="plots")
    agg = require("matplotlib.backends.backend_agg", needed_by, extra="plots")
    fig = figure.Figure(figsize=figsize)
    agg.FigureCanvasAgg(fig)
    return fig
