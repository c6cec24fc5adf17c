"""What the training step draws its batches from: one interface, a source in memory or on disk.

    batches = open_batches(cfg.data, seed=cfg.train.seed, batch_size=B, rows=own_rows)
    x, y, conditions = batches.draw(step, generator)     # the global batch of step ``step``

- :class:`MemoryBatches`: a dataset held in memory (:func:`~difflora.data.load.load_dataset`: every
  named dataset, several as tasks, spatial tasks). Each draw takes B indices
  ``torch.randint(N, (B,), generator=generator)`` and the flips from the loop's generator, the draws
  difflora has always made, so committed results do not change.
- :class:`~difflora.data.stream.StreamBatches`: one image folder (``data.streams``), read from disk
  by a DataLoader in an order fixed by (seed, position) alone; its position is checkpointed.

Both expose ``num_classes``, ``class_names``, ``conditions`` (name -> [N], e.g. ``task``, and
``caption`` for a captioned folder), ``captions`` (``list[str]`` aligned with the samples, or None),
``batch_conditions(indices)``, ``state(step)`` (what a checkpoint stores; None: nothing) and
``restore(saved, step)``, and ``close()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from difflora.config.schema import DataConfig
from difflora.data.dataset import ImageDataset
from difflora.data.folder_index import index_folder
from difflora.data.load import load_dataset
from difflora.data.stream import StreamBatches

__all__ = ["BatchSource", "MemoryBatches", "open_batches"]

Drawn = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class BatchSource(Protocol):
    """The data a training run reads (see the module docstring)."""

    class_names: list[str]
    captions: list[str] | None
    conditions: dict[str, torch.Tensor]

    @property
    def num_classes(self) -> int: ...

    def __len__(self) -> int: ...

    def batch_conditions(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]: ...

    def draw(self, step: int, generator: torch.Generator) -> Drawn: ...

    def state(self, step: int) -> dict[str, Any] | None: ...

    def restore(self, saved: dict[str, Any] | None, step: int) -> None: ...

    def close(self) -> None: ...


class MemoryBatches:
    """Batches of an :class:`ImageDataset` held in memory, drawn from the loop's generator."""

    captions = None

    def __init__(self, data: ImageDataset, batch_size: int):
        self.data, self.batch_size = data, batch_size
        self.class_names, self.conditions = data.class_names, data.conditions

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def __len__(self) -> int:
        return len(self.data)

    def batch_conditions(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        return self.data.batch_conditions(indices)

    def draw(self, step: int, generator: torch.Generator) -> Drawn:
        idx = torch.randint(len(self.data), (self.batch_size,), generator=generator)
        return self.data.batch_with_conditions(idx, generator=generator)

    def state(self, step: int) -> None:
        """Nothing: the generator's state, which a checkpoint stores anyway, is the position."""

    def restore(self, saved: dict[str, Any] | None, step: int) -> None:
        """Nothing to restore (see :meth:`state`)."""

    def close(self) -> None:
        """Nothing holds resources."""


def open_batches(cfg: DataConfig, *, seed: int, batch_size: int, rows: Sequence[int]) -> BatchSource:
    """The training batches of ``cfg``: streamed when ``cfg.streams`` (one image folder), else in memory.
    ``rows``: the rows of each global batch this process computes (a streamed folder reads only those)."""
    if not cfg.streams:
        return MemoryBatches(load_dataset(cfg, "train"), batch_size)
    index = index_folder(cfg, "train")
    if cfg.limit > 0:
        index = index.head(cfg.limit)
    return StreamBatches(index, cfg, seed=seed, batch_size=batch_size, rows=rows)
