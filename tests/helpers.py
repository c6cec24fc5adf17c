"""Helpers shared by test folders: small files written the way users' datasets are."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray, type_byte: int) -> bytes:
    """IDX encoding written from the format's definition: 00 00 type ndim, big-endian dims, data."""
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    data = idx_bytes(array, {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype])
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_mnist_like(root: Path, compress: bool, sizes=(7, 3), side=6, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in zip(("train", "t10k"), sizes, strict=True):
        images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255  # the two ends of the range
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
        out[prefix + "_x"], out[prefix + "_y"] = images, labels
    return out
