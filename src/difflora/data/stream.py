"""Streaming an image folder from disk: a deterministic order, workers that prefetch it, DDP shards.

**The order is a pure function of (seed, position).** Position s is the s-th sample a run reads
(0, 1, 2, ...). With N samples, s falls in epoch ``e = s // N`` at place ``i = s % N``; it reads
sample ``perm_e[i]``, flipped when ``coin_e[i] < 1/2`` (with ``data.hflip``), where ``perm_e`` (a
random permutation of the N samples) and ``coin_e`` (N uniform numbers) are drawn, in that order,
from a generator seeded with a hash of (seed, e) (:class:`EpochOrder`). Step k of a run reads
positions ``k B .. k B + B - 1`` (B: the global batch), so every epoch sees every sample once,
batches run across epoch boundaries, and what any step reads is known before it runs: the
``DataLoader``'s workers prefetch it, and neither their number nor their timing changes a pixel.

**DDP.** Each process asks its loader for its own rows of each global batch only (``rows``, the
rows its micro-batches compute), so a process decodes 1/W of the images; the labels and other
per-sample conditions of the whole batch come from the index, which every process holds.

**Resume.** A checkpoint stores the position (``state``: samples read, N and a fingerprint of the
samples' paths, labels and captions); resuming restarts the loader there, and refuses a folder whose
samples changed since (the order would differ). The loop's generator is not used to draw data.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from difflora.config.schema import DataConfig
from difflora.data.folder import read_image
from difflora.data.folder_index import FolderSplit
from difflora.data.source import DatasetFormatError, uint8_to_unit

__all__ = ["EpochOrder", "StreamBatches", "default_workers"]

_EPOCHS_KEPT = 2  # a batch spans at most two epochs when B <= N; more are recomputed (cheap)


def default_workers() -> int:
    """``data.workers`` when unset: one fewer than this process's share of the CPUs, at most 4 (the
    share: the CPUs it may use over the processes torchrun started on this machine)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(4, share - 1))


class EpochOrder:
    """The sample and flip of every position of a run over ``n`` samples (see the module docstring)."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("an order needs at least one sample")
        self.n, self.seed = n, seed
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation int64 [n], coins float32 [n]) of epoch ``e``."""
        if e not in self._epochs:
            digest = hashlib.sha256(f"difflora-order:{self.seed}:{e}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            perm = torch.randperm(self.n, generator=g).numpy()
            coins = torch.rand(self.n, generator=g).numpy()
            if len(self._epochs) >= _EPOCHS_KEPT:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = (perm, coins)
        return self._epochs[e]

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sample indices int64, flips bool) at ``positions`` (non-negative ints)."""
        positions = np.asarray(positions, dtype=np.int64)
        index = np.empty(len(positions), dtype=np.int64)
        flip = np.empty(len(positions), dtype=bool)
        epochs = positions // self.n
        for e in np.unique(epochs):
            at = epochs == e
            perm, coins = self.epoch(int(e))
            index[at] = perm[positions[at] % self.n]
            flip[at] = coins[positions[at] % self.n] < 0.5
        return index, flip


class _RowBatches:
    """The DataLoader's batch sampler: from step ``start`` on, this process's rows of each global
    batch as (sample index, flip) pairs."""

    def __init__(self, order: EpochOrder, batch_size: int, rows: np.ndarray, hflip: bool, start: int):
        self.order, self.batch_size, self.rows, self.hflip, self.start = order, batch_size, rows, hflip, start

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for step in itertools.count(self.start):
            index, flip = self.order.take(step * self.batch_size + self.rows)
            flip &= self.hflip
            yield list(zip(index.tolist(), flip.tolist(), strict=True))


class _FolderReader(Dataset):
    """``reader[(i, flip)]`` -> (uint8 [C x S x S], "") or (an empty tensor, the one-line error):
    a worker hands the error back to the training process, which raises it as it is."""

    def __init__(self, files: Sequence[str], channels: int, size: int):
        self.files, self.channels, self.size = files, channels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, str]:
        i, flip = item
        try:
            return torch.from_numpy(read_image(self.files[i], self.channels, self.size, flip)), ""
        except DatasetFormatError as exc:
            return torch.empty(0, dtype=torch.uint8), str(exc)


def _collate(samples: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    errors = [e for _, e in samples if e]
    return (torch.empty(0, dtype=torch.uint8) if errors else torch.stack([x for x, _ in samples])), errors


def _ignore_interrupts(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: the training process alone handles it (it finishes
    the step and checkpoints), so its workers must not die first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StreamBatches:
    """The batches of one image folder (``index``), read from disk by a DataLoader (see the module
    docstring). ``rows``: the rows of each global batch of ``batch_size`` this process reads."""

    def __init__(self, index: FolderSplit, cfg: DataConfig, *, seed: int, batch_size: int, rows: Sequence[int]):
        self.index = index
        self.size, self.channels = cfg.resolved_shape()
        self.hflip, self.batch_size, self.seed = cfg.hflip, batch_size, seed
        self.rows = np.asarray(rows, dtype=np.int64)
        self.workers = default_workers() if cfg.workers is None else cfg.workers
        self.order = EpochOrder(len(index), seed)
        self.labels = torch.from_numpy(index.labels)
        self.class_names = index.class_names
        # captions[i] is sample i's; a batch carries the indices of its samples' captions.
        self.captions = index.captions
        self.conditions: dict[str, torch.Tensor] = {}
        if cfg.task_id is not None:
            self.conditions["task"] = torch.full((len(index),), cfg.task_id, dtype=torch.long)
        if index.captions is not None:
            self.conditions["caption"] = torch.arange(len(index))
        self._loader: Iterator[tuple[torch.Tensor, list[str]]] | None = None
        self._next = -1
        self._fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.index)

    def batch_conditions(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.conditions.items()}

    def _start(self, step: int) -> None:
        self.close()
        batches = _RowBatches(self.order, self.batch_size, self.rows, self.hflip, step)
        loader = DataLoader(
            _FolderReader(self.index.files, self.channels, self.size),
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            worker_init_fn=_ignore_interrupts if self.workers else None,
        )
        self._loader, self._next = iter(loader), step

    def draw(
        self, step: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The global batch of step ``step``: (x [B x C x S x S] with this process's rows read and the
        others zero, y [B], conditions). ``generator`` is not drawn from."""
        if self._loader is None or step != self._next:
            self._start(step)  # a new run, a resume, or a step skipped: the loader restarts there
        pixels, errors = next(self._loader)
        self._next = step + 1
        if errors:
            self.close()
            raise DatasetFormatError(errors[0])
        index, _ = self.order.take(step * self.batch_size + np.arange(self.batch_size))
        x = torch.zeros(self.batch_size, self.channels, self.size, self.size)
        x[torch.from_numpy(self.rows)] = uint8_to_unit(pixels.numpy())
        idx = torch.from_numpy(index)
        return x, self.labels[idx], self.batch_conditions(idx)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.index.fingerprint()
        return self._fingerprint

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint after ``step`` steps stores: the position and what the order depends on."""
        return {
            "position": step * self.batch_size,
            "samples": len(self),
            "seed": self.seed,
            "order": self.fingerprint(),
        }

    def restore(self, saved: dict[str, Any] | None, step: int) -> None:
        """Continue after a checkpoint's ``saved`` state (at ``step``): the loader starts at its
        position, if the folder still holds the samples it was reading."""
        if saved is None:
            return
        if saved.get("samples") != len(self) or saved.get("order") != self.fingerprint():
            raise ValueError(
                f"the image folder {self.index.root} changed since this run's checkpoint at step {step} "
                f"({saved.get('samples')} samples then, {len(self)} now, or other files, labels or captions): "
                f"its order would differ; restore the folder, or train into another --out"
            )
        if saved.get("position") != step * self.batch_size:
            raise ValueError(
                f"the checkpoint at step {step} records data position {saved.get('position')}, "
                f"not {step} x train.batch_size={self.batch_size}; it was not written by this run"
            )

    def close(self) -> None:
        """Stop the loader's workers (a new :meth:`draw` starts them again)."""
        self._loader = None  # dropping the iterator shuts its workers down
