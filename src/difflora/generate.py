"""Generate images from a model: the one sampling entry point used by training grids, the CLI and eval."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from difflora.config import Config
from difflora.diffusion.guidance import ClassifierFreeGuidance
from difflora.diffusion.samplers import sample
from difflora.model import DiffusionModel, build_diffusion

__all__ = ["default_labels", "generate"]


def default_labels(num: int, num_classes: int, cls: int | None = None) -> torch.Tensor | None:
    """Labels for ``num`` samples: all ``cls`` if given, else 0, 1, ..., C-1 repeated (a grid with one
    class per column); None for an unconditional model."""
    if num_classes == 0:
        if cls is not None:
            raise ValueError("--class was given but the model is unconditional (model.num_classes = 0)")
        return None
    if cls is not None:
        if not 0 <= cls < num_classes:
            raise ValueError(f"class {cls} is out of range: the model has classes 0..{num_classes - 1}")
        return torch.full((num,), cls, dtype=torch.long)
    return torch.arange(num, dtype=torch.long) % num_classes


@torch.no_grad()
def generate(
    model: nn.Module,
    cfg: Config,
    num: int,
    *,
    steps: int | None = None,
    sampler: str | None = None,
    eta: float | None = None,
    guidance: float | None = None,
    labels: torch.Tensor | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Draw ``num`` samples [num x C x H x W] in [-1, 1]; unset options come from ``cfg.sample``.

    ``labels`` [num] selects classes (-1 = unconditional); guidance != 1 wraps the model in
    classifier-free guidance. The same seed and ``cfg.sample.batch_size`` give the same images.
    """
    s = cfg.sample
    steps = steps or s.steps
    sampler = sampler or s.sampler
    eta = s.eta if eta is None else eta
    guidance = s.guidance if guidance is None else guidance
    if num < 1:
        raise ValueError(f"the number of samples must be at least 1, got {num}")
    if steps > cfg.diffusion.steps:
        raise ValueError(f"--steps {steps} exceeds the diffusion's {cfg.diffusion.steps} timesteps")
    if guidance != 1.0 and cfg.model.num_classes == 0:
        raise ValueError("guidance needs a class-conditional model (model.num_classes > 0)")
    diffusion = build_diffusion(cfg, respacing=f"ddim{steps}" if sampler == "ddim" else steps)
    fn = ClassifierFreeGuidance(model, guidance) if guidance != 1.0 else model
    m = cfg.model
    shape = (m.in_channels, m.image_size, m.image_size)
    was_training = model.training
    model.eval()
    # One generator for the whole draw: the initial noise of every sample is drawn up front so that
    # splitting into batches does not change which noise a sample gets.
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num, *shape), generator=gen)
    out = []
    # Every sample of a sampler step shares t: the TimeLoRA update is merged once per step (exact,
    # undone on exit); class adapters stay per sample, as classifier-free guidance needs.
    merged = model.merged("t") if isinstance(model, DiffusionModel) else contextlib.nullcontext()
    try:
        with merged:
            for start in range(0, num, s.batch_size):
                end = min(num, start + s.batch_size)
                kwargs = {} if labels is None else {"y": labels[start:end].to(device)}
                x = sample(
                    diffusion,
                    fn,
                    (end - start, *shape),
                    generator=gen,
                    sampler=sampler,
                    eta=eta,
                    model_kwargs=kwargs,
                    progress=progress,
                    device=device,
                    noise=noise[start:end].to(device),
                )
                out.append(x.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
