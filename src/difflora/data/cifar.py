"""CIFAR-10 from its binary version (``cifar-10-binary.tar.gz``), never from the pickled one.

Each ``.bin`` file is a sequence of 3,073-byte records: 1 label byte (0..9), then the 32x32 image
as 1,024 red, 1,024 green and 1,024 blue bytes, each plane row-major. The files::

    data_batch_1.bin ... data_batch_5.bin   train, 10,000 records each (kept in this order)
    test_batch.bin                          test, 10,000 records
    batches.meta.txt                        class names, one per line (optional here)

They are looked for in ``data.root`` and in ``data.root/cifar-10-batches-bin`` (the directory the
archive extracts to). The pickled "python version" is not read: unpickling a user's file can run
arbitrary code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflora.config.schema import DataConfig
from difflora.data.source import DatasetFormatError, SplitData, not_found, uint8_to_unit

__all__ = ["CIFAR10_CLASSES", "cifar_file_names", "load_cifar10", "read_cifar_batch"]

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
_SIDE = 32
_RECORD = 1 + 3 * _SIDE * _SIDE  # 3,073 bytes
_SUBDIR = "cifar-10-batches-bin"
_META = "batches.meta.txt"


def cifar_file_names(split: str) -> list[str]:
    """The batch files of a split, in the order their records are concatenated."""
    if split == "train":
        return [f"data_batch_{i}.bin" for i in range(1, 6)]
    return ["test_batch.bin"]


def read_cifar_batch(path: str | Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch -> (uint8 images [N x 3 x 32 x 32], uint8 labels [N]).

    Raises :class:`DatasetFormatError` naming the file if its size is not a whole number of records
    or a label is not below ``num_classes``.
    """
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD:
        raise DatasetFormatError(
            f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records ({_RECORD} bytes each: "
            "1 label byte + 3072 pixel bytes); truncated, or not the binary version?"
        )
    records = raw.reshape(-1, _RECORD)
    labels = records[:, 0]
    if labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise DatasetFormatError(f"{path}: record {bad} has label {labels[bad]}, expected 0..{num_classes - 1}")
    images = records[:, 1:].reshape(-1, 3, _SIDE, _SIDE)
    return images, labels


def _read_class_names(directory: Path) -> list[str]:
    meta = directory / _META
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    names = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
    if len(names) != len(CIFAR10_CLASSES):
        raise DatasetFormatError(f"{meta}: expected {len(CIFAR10_CLASSES)} class names, found {len(names)}")
    return names


def load_cifar10(cfg: DataConfig, split: str) -> SplitData:
    """CIFAR-10 (50,000 train / 10,000 test 32x32 RGB images, 10 classes) from ``cfg.root``."""
    files = cifar_file_names(split)
    expected = ", ".join(cifar_file_names("train") + cifar_file_names("test") + [_META])
    fix = (
        "Pass --set data.root=DIR for the extracted binary version of CIFAR-10 "
        f"(cifar-10-binary.tar.gz; DIR or DIR/{_SUBDIR} holding {expected})."
    )
    if cfg.root is None:
        raise not_found("cifar10", [], "cifar10 has no default location. " + fix)
    root = Path(cfg.root)
    tried: list[Path] = []
    for directory in (root, root / _SUBDIR):
        paths = [directory / f for f in files]
        tried += paths
        if all(p.is_file() for p in paths):
            break
    else:
        raise not_found("cifar10", tried, fix)
    num_classes = len(CIFAR10_CLASSES)
    class_names = _read_class_names(directory)
    parts = [read_cifar_batch(p, num_classes) for p in paths]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return SplitData(uint8_to_unit(images), torch.from_numpy(labels.astype(np.int64)), class_names)
