"""The contract between a dataset source (a file format reader) and :class:`ImageDataset`.

A source is a function ``load(cfg, split) -> SplitData``: it finds its files, checks them, and
returns the images of one split scaled to [-1, 1] at their native size. It fails in one of two
ways, both with a message a user can act on:

- :class:`DatasetNotFoundError` (a ``FileNotFoundError``): the files are not there. The message
  lists every path that was tried and says how to get the files.
- :class:`DatasetFormatError` (a ``ValueError``): a file is there but is not what it claims to be
  (wrong magic number, truncated, inconsistent sizes). The message names the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "DatasetFormatError",
    "DatasetNotFoundError",
    "SplitData",
    "find_first",
    "not_found",
    "uint8_to_unit",
]


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are missing. The message lists the paths tried and the fix."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is corrupt, truncated or of the wrong format. The message names it."""


class SplitData(NamedTuple):
    """One split of a dataset as a source returns it.

    images: float32 [N x C x H x W] in [-1, 1] (native size unless the source had to resize).
    labels: int64 [N], values in [0, len(class_names)).
    class_names: one human-readable name per class.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


def uint8_to_unit(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 tensor of the same shape in [-1, 1]: ``p / 127.5 - 1``.

    0 maps to -1 and 255 to 1 exactly. The conversion goes uint8 -> float32 directly (no float64
    copy), which matters for CIFAR-10 (50,000 x 3,072 pixels).
    """
    if pixels.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    if not pixels.flags.writeable:
        # torch.from_numpy warns on read-only arrays (np.frombuffer's); .float() copies anyway.
        pixels = np.array(pixels)
    return torch.from_numpy(pixels).float().div_(127.5).sub_(1.0)


def find_first(candidates: Sequence[Path]) -> Path | None:
    """The first existing file among ``candidates`` (in order), or None."""
    for path in candidates:
        if path.is_file():
            return path
    return None


def not_found(dataset: str, tried: Sequence[Path], fix: str) -> DatasetNotFoundError:
    """A :class:`DatasetNotFoundError` whose message lists ``tried`` (full paths) and ``fix``."""
    if not tried:
        return DatasetNotFoundError(f"dataset '{dataset}' not found. {fix}")
    lines = "\n".join(f"  {p.absolute()}" for p in tried)
    return DatasetNotFoundError(f"dataset '{dataset}' not found; looked for:\n{lines}\n{fix}")
