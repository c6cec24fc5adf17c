"""Generate images from a model: the one sampling entry point used by training grids, the CLI and eval."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from difflora.config import Config
from difflora.diffusion.guidance import ClassifierFreeGuidance
from difflora.diffusion.samplers import sample
from difflora.model import DiffusionModel, build_diffusion

__all__ = ["NonFiniteSamplesError", "condition_tensors", "default_labels", "generate"]


class NonFiniteSamplesError(ValueError):
    """Sampling produced NaN or infinite values: a diverged checkpoint or settings far outside the
    trained range. Raised instead of writing an image of NaNs."""


def condition_tensors(conditions: dict[str, object] | None, num: int) -> dict[str, torch.Tensor]:
    """Per-sample conditions for ``num`` samples: name -> [num] tensor.

    A value is a number (shared by every sample), a sequence of ``num`` numbers or a tensor [num].
    Integral values become int64 (task ids, indices), others float32 (a guidance scale). Names
    must be identifiers other than ``t`` (the sampler sets it) and ``y`` (``labels``); values finite.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in (conditions or {}).items():
        if not isinstance(name, str) or not name.isidentifier() or name in ("t", "y"):
            hint = " (use --class / labels for y)" if name == "y" else ""
            raise ValueError(f"condition name {name!r} must be an identifier other than t and y{hint}")
        v = torch.as_tensor(value)
        if v.ndim == 0:
            v = v.expand(num)
        if v.shape != (num,):
            raise ValueError(f"condition {name}: give one value or {num} (one per sample), got {v.numel()}")
        if v.dtype == torch.bool or not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"condition {name}: values must be numbers, got {v.dtype}")
        if v.is_floating_point():
            if not torch.isfinite(v).all():
                raise ValueError(f"condition {name}: values must be finite, got {v.tolist()}")
            v = v.long() if (v == v.round()).all() else v.float()
        out[name] = v.long() if not v.is_floating_point() else v
    return out


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
    conditions: dict[str, object] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Draw ``num`` samples [num x C x H x W] in [-1, 1]; unset options come from ``cfg.sample``.

    ``labels`` [num] selects classes (-1 = unconditional); guidance != 1 wraps the model in
    classifier-free guidance. ``conditions`` (e.g. ``{"task": 2}`` or ``{"task": [0, 1, 2]}``, see
    :func:`condition_tensors`) reach the adapters reading them, in both halves of a guided batch.
    The same seed and ``cfg.sample.batch_size`` give the same images. Raises
    :class:`NonFiniteSamplesError` when a sample holds NaN or inf.
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
    extra = condition_tensors(conditions, num)
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
                kwargs = {k: v[start:end].to(device) for k, v in extra.items()}
                if labels is not None:
                    kwargs["y"] = labels[start:end].to(device)
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
    images = torch.cat(out)
    bad = ~torch.isfinite(images).flatten(1).all(1)
    if bad.any():
        raise NonFiniteSamplesError(
            f"sampling produced NaN or infinite values in {int(bad.sum())} of {num} samples "
            f"({sampler}, {steps} steps, guidance {guidance:g}); the weights may have diverged: "
            "try the other weights (--weights) or an earlier --checkpoint"
        )
    return images
