"""``ImageDataset`` (images and labels held in memory as tensors) and ``load_source``, the registry.

Every dataset difflora trains on is small enough to hold in memory as one float32 tensor (CIFAR-10's
train split, the largest, is 600 MB), so a dataset is two tensors and batches are index lookups:
no worker processes, no per-sample Python. ``load_source`` picks the source by ``DataConfig.name``
(see the modules of this package for each format, its files and its split), applies ``data.limit``,
and resizes once to ``data.image_size``. Datasets built from sources (``data.tasks``,
``data.spatial``) build on it; :func:`difflora.data.load.load_dataset` picks among them.

    >>> ds = load_source(DataConfig(name="digits"), "train")
    >>> ds.images.shape, ds.num_classes
    (torch.Size([1438, 1, 8, 8]), 10)
    >>> x, y = ds.batch(torch.arange(16), generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch.utils.data import Dataset

from difflora.config.schema import DataConfig
from difflora.data.cifar import load_cifar10
from difflora.data.digits import load_digits, load_mnist_5k
from difflora.data.folder import load_image_folder
from difflora.data.idx import load_fashion_mnist, load_mnist
from difflora.data.source import SplitData
from difflora.data.transforms import random_hflip, resize_images

__all__ = ["LOADERS", "ImageDataset", "Split", "load_source"]

Split = Literal["train", "test"]
Loader = Callable[[DataConfig, str], SplitData]

# DataConfig.name -> source. Each returns one split at native size in [-1, 1].
LOADERS: dict[str, Loader] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "mnist-5k": load_mnist_5k,
    "cifar10": load_cifar10,
    "image-folder": load_image_folder,
}


class ImageDataset(Dataset):
    """A labelled image dataset held in memory.

    images: float32 [N x C x H x W] in [-1, 1].
    labels: int64 [N], values in [0, num_classes).
    class_names: list of num_classes names; ``name``: the dataset's registry name.
    hflip: whether :meth:`batch` flips each sample left-right with probability 1/2.

    conditions: per-sample conditions beyond the label, name -> [N] tensor (``{"task": ...}`` for
    a multi-dataset run, see :mod:`difflora.data.tasks`; empty for one dataset), or [N x ...]
    (``spatial`` condition images, :mod:`difflora.data.spatial`).

    ``ds[i]`` returns ``(image [C x H x W], label)`` without augmentation (for evaluation and for
    ``DataLoader`` users); training draws batches with :meth:`batch`, which augments, and their
    conditions with :meth:`batch_conditions`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str],
        name: str = "",
        hflip: bool = False,
        conditions: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor [N x C x H x W], got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or labels.dtype != torch.int64 or len(labels) != len(images):
            raise ValueError(
                f"labels must be int64 [N] with N = {len(images)}, got {labels.dtype} {tuple(labels.shape)}"
            )
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
            raise ValueError(
                f"labels must lie in [0, {len(class_names)}), got [{int(labels.min())}, {int(labels.max())}]"
            )
        conditions = dict(conditions or {})
        for key, value in conditions.items():
            if key in ("t", "y") or not key.isidentifier():
                raise ValueError(f"condition name {key!r} must be an identifier other than t and y")
            # Per-sample values: [N] (a task id), or [N x ...] (a spatial condition image, data.spatial).
            if value.ndim == 0 or value.shape[0] != len(images):
                raise ValueError(
                    f"condition {key!r} must be [N] with N = {len(images)} (or [N x ...]), got {tuple(value.shape)}"
                )
        self.conditions = conditions
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)
        self.name = name
        self.hflip = hflip

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """Side length H (= W for every built-in dataset after loading)."""
        return self.images.shape[-1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def batch(
        self, indices: torch.Tensor | Sequence[int], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather a batch: (x [B x C x H x W], y int64 [B]) on the dataset's device.

        With ``hflip``, each sample is flipped left-right when its coin ``torch.rand(B, generator=generator)``
        is below 1/2 (one draw of B numbers on the generator's device; none without hflip, so the
        generator's state is untouched then).
        """
        idx = torch.as_tensor(indices, dtype=torch.long).to(self.images.device)
        x, y = self.images[idx], self.labels[idx]
        if self.hflip:
            x = random_hflip(x, generator)
        return x, y

    def batch_conditions(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """The per-sample conditions of a batch, name -> [B] (``{}`` for a single dataset).

        Draws no random numbers, so adding it to a loop changes no other draw. The training loop
        passes them to the model as keyword arguments next to ``y``.
        """
        if not self.conditions:
            return {}
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx.to(v.device)] for k, v in self.conditions.items()}

    def batch_with_conditions(
        self, indices: torch.Tensor | Sequence[int], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`batch` and :meth:`batch_conditions` in one call: (x, y, conditions)."""
        x, y = self.batch(indices, generator)
        return x, y, self.batch_conditions(indices)

    def to(self, device: torch.device | str) -> ImageDataset:
        """A dataset with the same contents on ``device`` (e.g. to gather batches on the GPU)."""
        cond = {k: v.to(device) for k, v in self.conditions.items()}
        return ImageDataset(
            self.images.to(device), self.labels.to(device), self.class_names, self.name, self.hflip, cond
        )

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.images.shape[1:])
        cond = f", conditions={sorted(self.conditions)}" if self.conditions else ""
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, shape={shape}, classes={self.num_classes}, "
            f"hflip={self.hflip}{cond})"
        )


def load_source(cfg: DataConfig, split: Split) -> ImageDataset:
    """Load split ``split`` of the one dataset ``cfg.name`` (``data.tasks`` and ``data.spatial`` are
    :func:`difflora.data.load.load_dataset`'s; they must be unset here).

    The train split is cut to its first ``cfg.limit`` examples when ``cfg.limit > 0`` (the test split
    never is); images are resized once to ``cfg.image_size`` when it is set. Raises
    :class:`DatasetNotFoundError` (files missing: the message says where it looked and how to get
    them) or :class:`DatasetFormatError` (a file is corrupt).
    """
    assert not cfg.tasks and cfg.spatial is None, "load_source reads one dataset; load_dataset builds the others"
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.name not in LOADERS:
        raise ValueError(f"unknown dataset {cfg.name!r}; choices: {', '.join(LOADERS)}")
    images, labels, class_names = LOADERS[cfg.name](cfg, split)
    if split == "train" and cfg.limit > 0:
        # clone: a slice would keep the whole split's storage alive.
        images, labels = images[: cfg.limit].clone(), labels[: cfg.limit].clone()
    if cfg.image_size is not None:
        images = resize_images(images, cfg.image_size)
    channels = cfg.resolved_shape()[1]
    # A source returning the wrong channel count would break the model built from the same config.
    assert images.shape[1] == channels, f"{cfg.name} source returned {images.shape[1]} channels, expected {channels}"
    # data.task_id: every sample of this one dataset carries that task id (condition ``task``).
    task = {} if cfg.task_id is None else {"task": torch.full((len(labels),), cfg.task_id, dtype=torch.long)}
    return ImageDataset(
        images.contiguous(), labels.contiguous(), class_names, name=cfg.name, hflip=cfg.hflip, conditions=task
    )
