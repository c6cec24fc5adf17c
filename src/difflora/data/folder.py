"""Image folders: ``root/<class_name>/*.png|jpg|jpeg|bmp|webp``, one subfolder per class.

- Classes are the subfolder names, sorted (label i = i-th name); files are read in sorted order.
  Hidden entries (names starting with ".") are skipped; extensions match case-insensitively.
- Split: if ``root/train`` is a directory, the splits are ``root/train/<class>/...`` and
  ``root/test/<class>/...`` and the classes are the sorted union of both sides' subfolders (so a
  label means the same class in both). Otherwise every image under ``root/<class>/`` is split
  deterministically, stratified, 90 % train / 10 % test (:func:`~difflora.data.split.stratified_split`
  with the constant seed).
- Images are converted to RGB with Pillow and resized to ``data.image_size`` (required: folders have
  no native size) with the batched bilinear, antialiased resize, one batch per distinct source size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflora.config.schema import ConfigError, DataConfig
from difflora.data.source import DatasetFormatError, SplitData, not_found, uint8_to_unit
from difflora.data.split import stratified_split
from difflora.data.transforms import resize_images

__all__ = ["IMAGE_EXTENSIONS", "TEST_FRACTION", "load_image_folder", "read_rgb"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TEST_FRACTION = 0.1
_LAYOUT = "DIR/<class_name>/*.png|jpg|jpeg|bmp|webp (or DIR/train/<class_name>/... and DIR/test/<class_name>/...)"


def _class_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(directory: Path, class_names: list[str]) -> tuple[list[Path], np.ndarray]:
    """All image files of ``directory/<class>/`` for the given classes, and their labels (int64)."""
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = directory / name
        if not class_dir.is_dir():
            continue
        found = sorted(
            p
            for p in class_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        files += found
        labels += [label] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def read_rgb(path: Path) -> np.ndarray:
    """One image file -> uint8 [H x W x 3] (RGB). Raises :class:`DatasetFormatError` naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetFormatError(f"{path}: cannot read as an image ({exc})") from None


def _read_images(files: list[Path], size: int) -> torch.Tensor:
    """Read and resize ``files`` -> float32 [N x 3 x size x size] in [-1, 1], in the order given."""
    arrays = [read_rgb(p) for p in files]  # file I/O: one call per file is unavoidable
    out = torch.empty(len(files), 3, size, size)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(a.shape, []).append(i)
    # One batched resize per distinct source size (usually one or a handful).
    for idx in by_shape.values():
        batch = uint8_to_unit(np.stack([arrays[i] for i in idx])).permute(0, 3, 1, 2)  # [n x 3 x H x W]
        out[torch.tensor(idx)] = resize_images(batch.contiguous(), size)
    return out


def load_image_folder(cfg: DataConfig, split: str) -> SplitData:
    """A folder of class subfolders of images, split and resized as described in the module docstring."""
    fix = f"Pass --set data.root=DIR with the layout {_LAYOUT}."
    if cfg.image_size is None:
        raise ConfigError("data.image_size: required for data.name=image-folder (image folders have no native size)")
    if cfg.root is None:
        raise not_found("image-folder", [], "image-folder has no default location. " + fix)
    root = Path(cfg.root)
    if not root.is_dir():
        raise not_found("image-folder", [root], fix)
    if (root / "train").is_dir():
        side = root / split
        if not side.is_dir():
            raise not_found("image-folder", [side], f"{root / 'train'} exists, so {side} must too. " + fix)
        sides = [d for d in (root / "train", root / "test") if d.is_dir()]
        class_names = sorted(set().union(*(_class_names(d) for d in sides)))
        files, labels = _scan(side, class_names)
        searched = side
    else:
        class_names = _class_names(root)
        files, labels = _scan(root, class_names)
        train, test = stratified_split(labels, TEST_FRACTION)
        pick = train if split == "train" else test
        files, labels = [files[i] for i in pick], labels[pick]
        searched = root
    if not files:
        tried = [searched / name for name in class_names or ["<class_name>"]]
        exts = "|".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise not_found("image-folder", tried, f"No *.{exts} images for split '{split}' in these folders. " + fix)
    images = _read_images(files, cfg.image_size)
    return SplitData(images, torch.from_numpy(labels), class_names)
