"""Helpers shared by test folders: the one tiny-config factory, small files written the way users' datasets are."""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from difflora.config.schema import Config, load_config, parse_config

# The smallest backbones on 8 x 8 digits as overrides: tiny-unet's U-Net without its num_heads: 2, and DiT-T/2.
TINY_ARCH = {
    "unet": {
        "model.arch": "unet",
        "model.unet": {"model_channels": 16, "num_res_blocks": 1, "attention_resolutions": [4], "channel_mult": [1, 2]},
    },
    "dit": {"model.arch": "dit", "model.dit": {"preset": "DiT-T/2"}},
}
# 002's set-up: task 0 of digits on a frozen base, 50 diffusion steps; the test adds TINY_ARCH and the affiner.
FROZEN_TASK0 = {
    "data": {"name": "digits", "task_id": 0},
    "model": {"num_classes": 10},
    "diffusion": {"steps": 50},
    "train": {"train_base": False},
}


def tiny_config(base: str | Path | Mapping[str, Any] = "tiny-unet", *overrides: str | Mapping[str, Any]) -> Config:
    """A test's config: a shipped preset (name or path, see difflora.presets) or a config tree, then overrides.

    Overrides apply in order. Each is a ``key=value`` string as on the command line, or a mapping of
    dotted keys to values (as a study arm's ``set``), for adapter lists and sections that read badly
    as strings. The conftest fixture ``tiny_config`` is this function.
    """
    texts: list[str] = []
    for over in overrides:
        texts += [over] if isinstance(over, str) else [f"{k}={json.dumps(v)}" for k, v in over.items()]
    if isinstance(base, Mapping):
        return parse_config(dict(base), texts)
    return load_config(base, texts)


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
