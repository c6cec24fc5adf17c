"""Image folders: reading one file the way training sees it, and a whole split into memory.

Which files a folder holds, their labels and captions: :mod:`difflora.data.folder_index`. Each file
is read by :func:`read_image`, the same function for a run that streams the folder from disk
(:mod:`difflora.data.stream`) and for one that holds it in memory (:func:`load_image_folder`: a
folder as one of ``data.tasks``, with ``data.spatial``, or its test split for evaluation), so both
see the same pixels:

1. decoded by Pillow and converted to ``data.channels``: ``"L"`` (1, ITU-R 601-2 luma) or ``"RGB"``
   (3; an alpha channel is dropped, a palette expanded);
2. resized (Pillow's bilinear filter, antialiased when shrinking) so that the shorter side is
   ``data.image_size``, the longer one ``int(image_size * long / short)``;
3. centre-cropped to ``image_size`` x ``image_size``, the crop's corner at
   ``round((side - image_size) / 2)``, as diffusers' text-to-image training scripts do
   (``transforms.Resize`` then ``transforms.CenterCrop``);
4. flipped left-right when the sample's flip says so (training with ``data.hflip``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflora.config.schema import DataConfig
from difflora.data.folder_index import IMAGE_EXTENSIONS, TEST_FRACTION, index_folder
from difflora.data.source import DatasetFormatError, SplitData, uint8_to_unit

__all__ = ["IMAGE_EXTENSIONS", "TEST_FRACTION", "load_image_folder", "read_image", "resized_size"]

_MODES = {1: "L", 3: "RGB"}


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size`` and the longer one ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def read_image(path: str | Path, channels: int, size: int, flip: bool = False) -> np.ndarray:
    """One image file -> uint8 [channels x size x size], read as the module docstring says. A file
    that does not decode raises :class:`DatasetFormatError` naming it (one line)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert(_MODES[channels])
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a file that does not decode
        raise DatasetFormatError(
            f"{path}: cannot read as an image ({type(exc).__name__}: {exc}); remove or replace it"
        ) from None
    w, h = resized_size(*img.size, size)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BILINEAR)
    left, top = round((w - size) / 2), round((h - size) / 2)
    pixels = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    pixels = pixels.reshape(size, size, channels).transpose(2, 0, 1)
    return np.ascontiguousarray(pixels[:, :, ::-1] if flip else pixels)


def load_image_folder(cfg: DataConfig, split: str) -> SplitData:
    """Split ``split`` of an image folder, every file read into one float32 [N x C x S x S] tensor."""
    index = index_folder(cfg, split)
    size, channels = cfg.resolved_shape()
    pixels = np.stack([read_image(p, channels, size) for p in index.files])  # one call per file: file I/O
    return SplitData(uint8_to_unit(pixels), torch.from_numpy(index.labels), index.class_names)
