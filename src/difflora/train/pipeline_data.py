"""The batches of a run on a latent or text pipeline: latents and contexts read from their caches.

A run whose ``model.latent`` is set (a pipeline with a VAE) trains on the VAE's latents of its
images, and one whose ``model.text`` is set (a text encoder) on the contexts of its captions. Both
are computed once into the caches of :mod:`difflora.latent` (:mod:`difflora.model.pipeline` loads
the VAE and the text encoder only when a cache must be built, and frees them), so the training
steps never hold either model. The images are held in memory while a cache is built (an image
folder is read into memory, not streamed: the latents of the whole set are read whole anyway).

Draws, all from the loop's generator, so a resumed run continues bit-identically: the indices
(``torch.randint``, as in pixel space), the flips (the cache's mirrored latents, the same coins as
pixel flips), then one number per sample for prompt dropout (drawn whatever
``train.prompt_dropout`` is): below it, the sample's context is the empty prompt's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from difflora.config.schema import Config
from difflora.data import BatchSource, open_batches
from difflora.data.dataset import ImageDataset
from difflora.data.folder_index import index_folder
from difflora.data.load import load_dataset
from difflora.errors import DiffloraError
from difflora.latent import LatentCache, PromptCache
from difflora.model.pipeline import encode_text, latent_cache, prompt_cache

__all__ = ["CaptionError", "PipelineBatches", "grid_context", "open_training_batches", "text_inputs"]


class CaptionError(ValueError, DiffloraError):
    """A text pipeline's data has no captions."""


class PipelineBatches:
    """Batches of a dataset held in memory, as latents (``latents``) and with contexts (``prompts``)."""

    def __init__(
        self,
        data: ImageDataset,
        batch_size: int,
        latents: LatentCache | None,
        prompts: PromptCache | None,
        rows: torch.Tensor | None,
        prompt_dropout: float,
    ):
        self.data, self.batch_size, self.latents, self.prompts = data, batch_size, latents, prompts
        self.rows, self.prompt_dropout = rows, prompt_dropout
        self.class_names, self.conditions = data.class_names, data.conditions
        self.captions = None if prompts is None else [prompts.texts[int(r)] for r in rows]

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def __len__(self) -> int:
        return len(self.data)

    def batch_conditions(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        return self.data.batch_conditions(indices)

    def draw(self, step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.randint(len(self.data), (self.batch_size,), generator=generator)
        if self.latents is not None:
            x, y = self.latents.batch(idx, generator).float(), self.data.labels[idx]
        else:
            x, y = self.data.batch(idx, generator)
        conditions = self.data.batch_conditions(idx)
        if self.prompts is not None:
            assert self.rows is not None
            dropped = torch.rand(self.batch_size, generator=generator) < self.prompt_dropout
            rows = torch.where(dropped, torch.zeros_like(idx), self.rows[idx])  # row 0: the empty prompt
            conditions["context"] = self.prompts.embeddings[rows].float()
        return x, y, conditions

    def state(self, step: int) -> None:
        """Nothing: the generator's state is the position (as for any dataset in memory)."""

    def restore(self, saved: dict[str, Any] | None, step: int) -> None:
        """Nothing to restore (see :meth:`state`)."""

    def close(self) -> None:
        """Nothing holds resources."""


def _captions(cfg: Config) -> list[str]:
    """The training images' captions (an image folder's metadata.jsonl), or a one-line error."""
    captions = index_folder(cfg.data, "train").captions if cfg.data.name == "image-folder" else None
    if captions is None:
        raise CaptionError(
            f"model.pretrained: {cfg.model.pretrained} is a text pipeline but data.name={cfg.data.name} has no "
            "captions; train on an image folder with a metadata.jsonl giving each image's text"
        )
    return captions[: cfg.data.limit] if cfg.data.limit > 0 else captions


def open_training_batches(
    cfg: Config, *, seed: int, batch_size: int, rows: Sequence[int], log: Callable[[str], None]
) -> BatchSource:
    """The training batches of ``cfg``: :func:`difflora.data.open_batches`, or for a latent or text
    pipeline the batches read from the caches (built here when missing; see the module docstring)."""
    m = cfg.model
    if m.latent is None and m.text is None:
        return open_batches(cfg.data, seed=seed, batch_size=batch_size, rows=rows)
    captions = _captions(cfg) if m.text is not None else None
    data = load_dataset(cfg.data, "train")
    latents = latent_cache(cfg, data, log) if m.latent is not None else None
    prompts = prompt_cache(cfg, captions, log) if captions is not None else None
    rows_of = prompts.indices(captions) if prompts is not None else None
    return PipelineBatches(data, batch_size, latents, prompts, rows_of, cfg.train.prompt_dropout)


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
