"""Classifier-free guidance (Ho & Salimans) as a wrapper around the model callable.

The wrapper has the model's own signature, ``guided(x, t, y, **kw)``, so every sampler, the
evaluation code and the distillation teacher use it like the bare network. ``y == -1`` is the
null label: the unconditional branch, which adds no class conditioning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from difflora.diffusion.gaussian import ModelFn

__all__ = ["NULL_LABEL", "ClassifierFreeGuidance", "drop_labels"]

NULL_LABEL = -1


class ClassifierFreeGuidance(nn.Module):
    """eps_guided = eps(x, y = -1) + scale * (eps(x, y) - eps(x, y = -1)), in one batched forward.

    The conditional and unconditional passes run as ONE forward of 2N samples (the first N with
    ``y``, the last N with the null label), which is what per-sample adapters are built for and
    halves the number of kernel launches. The guidance applies to every predicted-noise channel,
    i.e. the first ``x.shape[1]`` output channels (not a hard-coded 3, DiT's trap with 1- or
    4-channel data).

    Learned-variance channels (the rest, if any) are taken from the conditional pass. Guidance is
    an extrapolation of the noise only: the extrapolated "variance" of two variance predictions
    would be no model's prediction and may leave the learned range [-1, 1]; the conditional
    variance is the one trained for the distribution being sampled (GLIDE and DiT do the same).

    ``scale == 1`` (a Python number) is exactly the conditional model: one conditional pass, no
    doubling. ``y=None`` (a wholly unconditional batch) has nothing to guide: one plain pass.

    Args:
        model: ``model(x, t, y=..., **kw) -> [N x C_out x H x W]``; kept by reference (no copy).
        scale: guidance scale w (1 = conditional, 0 = unconditional), a float or a tensor [N]
            of per-sample scales.
    """

    def __init__(self, model: ModelFn, scale: float | Tensor) -> None:
        super().__init__()
        self.model = model
        self.scale = scale

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, *, guidance_scale: float | Tensor | None = None, **kw: Any
    ) -> Tensor:
        """x [N x C x H x W], t [N], y int64 [N] (-1 allowed). ``guidance_scale`` overrides the
        wrapper's scale for this call. Tensor keyword arguments with a leading batch dimension of
        N (per-sample conditions such as a task id) are duplicated for the 2N batch; others pass as is.
        Returns [N x C_out x H x W]."""
        scale = self.scale if guidance_scale is None else guidance_scale
        if y is None or (isinstance(scale, int | float) and scale == 1):
            return self.model(x, t, y=y, **kw)
        n, c = x.shape[:2]
        # One batch of 2N: the conditional half with y, the unconditional half with the null label.
        y_null = torch.full_like(y, NULL_LABEL)
        kw2 = {k: _double(v, n) for k, v in kw.items()}
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, y_null]), **kw2)
        cond, uncond = out[:n], out[n:]
        if isinstance(scale, Tensor):
            scale = scale.to(device=out.device, dtype=out.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        # Extrapolate from the unconditional towards (and past) the conditional noise prediction.
        eps = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
        # Any learned-variance channels come from the conditional pass (see the class docstring).
        return torch.cat([eps, cond[:, c:]], dim=1)


def _double(value: Any, n: int) -> Any:
    # Per-sample tensors follow the batch into both halves; anything else is shared.
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n:
        return torch.cat([value, value])
    return value


def drop_labels(y: Tensor | None, p: float, generator: torch.Generator | None = None) -> Tensor | None:
    """Replace each label of ``y`` [N] by the null label -1 with probability ``p`` (training-time
    label dropout, so one network learns both the conditional and the unconditional model).

    The draws use ``generator`` (on its device) and are made whatever p is, so the generator's
    stream does not depend on p. Returns a new tensor; ``None`` passes through.
    """
    if y is None:
        return None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout probability must lie in [0, 1], got {p}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    drop = torch.rand(y.shape, generator=generator, device=gen_device).to(y.device) < p
    return torch.where(drop, torch.full_like(y, NULL_LABEL), y)
