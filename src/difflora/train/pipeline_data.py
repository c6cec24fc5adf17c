"""The batches of a run on a latent or text pipeline: latents and contexts read from their caches.

A run whose ``model.latent`` is set (a pipeline with a VAE) trains on the VAE's latents of its
images, and one whose ``model.text`` is set (a text encoder) on the contexts of its captions. Both
are computed once into the caches of :mod:`difflora.latent` (:mod:`difflora.model.pipeline` loads
the VAE and the text encoder only when a cache must be built, and frees them), so the training
steps never hold either model. One image folder (``data.streams``) is encoded file by file, never
held in memory (its content id: the folder index's fingerprint with every file's size and
modification time); other data is loaded into memory and its pixels hashed. A text pipeline
without a VAE trains on pixels and holds them in memory.

Draws, all from the loop's generator, so a resumed run continues bit-identically: the indices
(``torch.randint``, as in pixel space), the flips (the cache's mirrored latents, the same coins as
pixel flips), then one number per sample for prompt dropout (drawn whatever
``train.prompt_dropout`` is): below it, the sample's context is the empty prompt's.

A distillation (``train.objective: distill``) guides its teacher to every caption: no prompt
dropout, and each batch carries the empty prompt's context as ``null_context`` [N x L x D] (an
expanded view, no copy), the unconditional branch of the teacher's guidance.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from difflora.config.schema import Config, DataConfig
from difflora.data import BatchSource, open_batches
from difflora.data.dataset import ImageDataset
from difflora.data.folder import read_image
from difflora.data.folder_index import FolderSplit, index_folder
from difflora.data.load import load_dataset
from difflora.data.source import uint8_to_unit
from difflora.errors import DiffloraError
from difflora.latent import LatentCache, PromptCache
from difflora.model.pipeline import encode_text, latent_cache, prompt_cache

__all__ = [
    "CaptionError",
    "FolderImages",
    "PipelineBatches",
    "Samples",
    "folder_content_id",
    "grid_context",
    "open_training_batches",
    "text_inputs",
]


class CaptionError(ValueError, DiffloraError):
    """A text pipeline's data has no captions."""


class FolderImages(Dataset):
    """The training images of one image folder, read file by file (``read_image``: as streamed)."""

    def __init__(self, index: FolderSplit, cfg: DataConfig):
        self.files, (self.size, self.channels) = index.files, cfg.resolved_shape()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return uint8_to_unit(read_image(self.files[i], self.channels, self.size))


@dataclass
class Samples:
    """What a pipeline run knows of its samples without their pixels: labels [N], class names,
    per-sample conditions ([N] each, e.g. ``task``), and ``pixels`` (in memory) when it trains on them."""

    labels: torch.Tensor
    class_names: list[str]
    conditions: dict[str, torch.Tensor]
    pixels: ImageDataset | None = None


class PipelineBatches:
    """Batches of ``samples`` as cached latents (``latents``, else its pixels) and with contexts (``prompts``)."""

    def __init__(
        self,
        samples: Samples,
        batch_size: int,
        latents: LatentCache | None,
        prompts: PromptCache | None,
        rows: torch.Tensor | None,
        prompt_dropout: float,
        null_context: bool = False,
    ):
        self.samples, self.batch_size, self.latents, self.prompts = samples, batch_size, latents, prompts
        self.rows, self.prompt_dropout, self.null_context = rows, prompt_dropout, null_context
        self.class_names, self.conditions = samples.class_names, samples.conditions
        self.captions = None if prompts is None else [prompts.texts[int(r)] for r in rows]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples.labels)

    def batch_conditions(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[idx] for k, v in self.conditions.items()}

    def draw(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.randint(len(self), (self.batch_size,), generator=generator)
        if self.latents is not None:
            x = self.latents.batch(idx, generator).float()
        else:
            assert self.samples.pixels is not None
            x = self.samples.pixels.batch(idx, generator)[0]
        y, conditions = self.samples.labels[idx], self.batch_conditions(idx)
        if self.prompts is not None:
            assert self.rows is not None
            dropped = torch.rand(self.batch_size, generator=generator) < self.prompt_dropout
            rows = torch.where(dropped, torch.zeros_like(idx), self.rows[idx])  # row 0: the empty prompt
            conditions["context"] = self.prompts.embeddings[rows].float()
            if self.null_context:
                conditions["null_context"] = self.prompts.empty.float().expand_as(conditions["context"])
        return x, y, conditions

    def state(self, step: int) -> None:
        """Nothing: the generator's state is the position (as for any dataset in memory)."""

    def restore(self, saved: dict[str, Any] | None, step: int) -> None:
        """Nothing to restore (see :meth:`state`)."""

    def close(self) -> None:
        """Nothing holds resources."""


def _train_index(cfg: DataConfig) -> FolderSplit | None:
    """The training split's index of an image folder (``data.limit`` applied); None for other data."""
    if cfg.name != "image-folder" or cfg.tasks or cfg.spatial is not None:
        return None
    index = index_folder(cfg, "train")
    return index.head(cfg.limit) if cfg.limit > 0 else index


def _captions(cfg: Config, index: FolderSplit | None) -> list[str]:
    """The training images' captions (an image folder's metadata.jsonl), or a one-line error."""
    if index is None or index.captions is None:
        raise CaptionError(
            f"model.pretrained: {cfg.model.pretrained} is a text pipeline but data.name={cfg.data.name} has no "
            "captions; train on an image folder with a metadata.jsonl giving each image's text"
        )
    return index.captions


def folder_content_id(index: FolderSplit) -> str:
    """What a folder's latents depend on besides the settings: its samples (paths, labels, captions:
    the index's fingerprint) and every file's size and modification time (a rewritten file is
    another id; its pixels are not read for this)."""
    h = hashlib.sha256(index.fingerprint().encode())
    for path in index.files:
        st = os.stat(path)
        h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _samples(cfg: Config, index: FolderSplit | None, log: Callable[[str], None]) -> tuple[Samples, LatentCache | None]:
    """The run's samples and, with a VAE, their latent cache: one folder encoded file by file, other
    data loaded into memory (pixels kept only when the run trains on them)."""
    d = cfg.data
    if cfg.model.latent is not None and index is not None and d.streams:
        task = {} if d.task_id is None else {"task": torch.full((len(index),), d.task_id, dtype=torch.long)}
        labels = torch.from_numpy(index.labels).long()
        cache = latent_cache(cfg, FolderImages(index, d), log, content_id=folder_content_id(index))
        return Samples(labels, index.class_names, task), cache
    data = load_dataset(d, "train")
    cache = latent_cache(cfg, data, log) if cfg.model.latent is not None else None
    return Samples(data.labels, data.class_names, data.conditions, None if cache else data), cache


def open_training_batches(
    cfg: Config, *, seed: int, batch_size: int, rows: Sequence[int], log: Callable[[str], None]
) -> BatchSource:
    """The training batches of ``cfg``: :func:`difflora.data.open_batches`, or for a latent or text
    pipeline the batches read from the caches (built here when missing; see the module docstring)."""
    m = cfg.model
    if m.latent is None and m.text is None:
        return open_batches(cfg.data, seed=seed, batch_size=batch_size, rows=rows)
    index = _train_index(cfg.data)
    captions = _captions(cfg, index) if m.text is not None else None
    # Building a cache (a DataLoader's seed, a model's loading) must not move the global RNG, which
    # initialises the adapters next: a run that finds its caches starts exactly like one that built them.
    with torch.random.fork_rng(devices=[]):
        samples, latents = _samples(cfg, index, log)
        prompts = prompt_cache(cfg, captions, log) if captions is not None else None
    rows_of = prompts.indices(captions) if prompts is not None else None
    dropout = 0.0 if cfg.distilled else cfg.train.prompt_dropout
    return PipelineBatches(samples, batch_size, latents, prompts, rows_of, dropout, null_context=cfg.distilled)


def grid_context(data: BatchSource, num: int) -> dict[str, torch.Tensor]:
    """A training grid's text inputs: the contexts of the first ``num`` distinct captions (cycled) and
    the empty prompt's for guidance; ``{}`` without text."""
    prompts = getattr(data, "prompts", None)
    if prompts is None:
        return {}
    rows = torch.arange(num) % max(len(prompts) - 1, 1) + (1 if len(prompts) > 1 else 0)
    return {"context": prompts.embeddings[rows].float(), "null_context": prompts.empty.float()}


def text_inputs(cfg: Config, prompts: Sequence[str] | None, num: int) -> dict[str, torch.Tensor]:
    """generate's text inputs for ``num`` samples of ``prompts`` (cycled; None: the test split's
    captions), encoded with the pipeline's text encoder loaded now; ``{}`` for a run without text."""
    if cfg.model.text is None:
        if prompts:
            raise CaptionError(
                "--prompt is for a text pipeline's run; this run's base has no text encoder: sample without prompts"
            )
        return {}
    if prompts is None:
        prompts = index_folder(cfg.data, "test").captions if cfg.data.name == "image-folder" else None
    if not prompts:
        raise CaptionError(
            "a text pipeline's run samples from prompts: give --prompt TEXT (repeatable) or --prompts FILE"
        )
    context, null = encode_text(cfg, [prompts[i % len(prompts)] for i in range(num)])
    return {"context": context, "null_context": null}
