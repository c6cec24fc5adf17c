"""Classifier-free guidance (Ho & Salimans) as a wrapper around the model callable.

The wrapper has the model's own signature, ``guided(x, t, y, **kw)``, so every sampler, the
evaluation code and the distillation teacher use it like the bare network. ``y == -1`` is the
null label: the unconditional branch, which adds no class conditioning.

Selective guidance (Golnari, Yao and He, "Selective guidance: are all the denoising steps of
guided diffusion important?", arXiv 2305.09847): ``min_t`` guides only the steps whose timestep is
at least ``min_t``, the early, noisy steps that set the layout and class; the later steps refine
details, are the least sensitive to guidance, and run the conditional model alone (one pass of N
instead of 2N). :func:`selective_threshold` turns "guide the first fraction F of a sampler's
steps" into that ``min_t``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from difflora.diffusion.gaussian import ModelFn

__all__ = ["NULL_LABEL", "ClassifierFreeGuidance", "drop_labels", "guide", "selective_threshold"]

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
    doubling. ``scale == 0`` is exactly the unconditional model: one pass with the null label, its
    variance channels included (at w = 0 the unconditional distribution is the one sampled; per
    sample scales of 0 in a tensor get the same rows).
    ``y=None`` (a wholly unconditional batch) has nothing to guide: one plain pass.

    Args:
        model: ``model(x, t, y=..., **kw) -> [N x C_out x H x W]``; kept by reference (no copy).
        scale: guidance scale w (1 = conditional, 0 = unconditional), a float or a tensor [N]
            of per-sample scales.
        min_t: selective guidance: samples whose timestep (the model's ``t``: original-process
            units) is below ``min_t`` get the conditional prediction (a step where every sample is
            below runs one pass of N); None guides every step.
        null_context: [L x D], the empty prompt's context (a text pipeline): the unconditional
            half's ``context``, and with it a batch without labels is guided too.
    """

    def __init__(
        self, model: ModelFn, scale: float | Tensor, min_t: float | None = None, null_context: Tensor | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.scale = scale
        self.min_t = min_t
        self.null_context = null_context

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, *, guidance_scale: float | Tensor | None = None, **kw: Any
    ) -> Tensor:
        """x [N x C x H x W], t [N], y int64 [N] (-1 allowed). ``guidance_scale`` overrides the
        wrapper's scale for this call. Tensor keyword arguments with a leading batch dimension of
        N (per-sample conditions such as a task id) are duplicated for the 2N batch; others pass as is.
        Returns [N x C_out x H x W]."""
        scale = self.scale if guidance_scale is None else guidance_scale
        text = self.null_context is not None and kw.get("context") is not None
        if (y is None and not text) or (isinstance(scale, int | float) and scale == 1):
            return self.model(x, t, y=y, **kw)
        y_null = None if y is None else torch.full_like(y, NULL_LABEL)
        if isinstance(scale, int | float) and scale == 0 and self.min_t is None:
            return self.model(x, t, y=y_null, **self._unconditional(kw, x.shape[0]))
        guided = None if self.min_t is None else t >= self.min_t
        if guided is not None and not bool(guided.any()):
            return self.model(x, t, y=y, **kw)  # a selective-guidance step without guidance: one pass
        n, c = x.shape[:2]
        # One batch of 2N: the conditional half with y (and the prompts' context), the unconditional
        # half with the null label (and the empty prompt's).
        kw2 = {k: _double(v, n) for k, v in kw.items()}
        if text:
            kw2["context"] = torch.cat([kw["context"], self._unconditional(kw, n)["context"]])
        y2 = None if y is None else torch.cat([y, y_null])
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=y2, **kw2)
        cond, uncond = out[:n], out[n:]
        result = guide(cond, uncond, scale, c)
        if guided is not None:
            result = torch.where(guided.reshape(-1, *([1] * (x.ndim - 1))), result, cond)
        return result

    def _unconditional(self, kw: dict[str, Any], n: int) -> dict[str, Any]:
        """``kw`` of the unconditional branch: the empty prompt's context for every sample."""
        if self.null_context is None or kw.get("context") is None:
            return kw
        context = kw["context"]
        return kw | {"context": self.null_context.to(context).expand(n, *self.null_context.shape)}


def guide(cond: Tensor, uncond: Tensor, scale: float | Tensor, channels: int) -> Tensor:
    """The classifier-free-guidance output from the two predictions [N x C_out x H x W]:
    ``uncond + scale (cond - uncond)`` on the first ``channels`` (noise) channels, the conditional
    prediction on the rest (learned variance; see :class:`ClassifierFreeGuidance`), except at a
    scale of exactly 0, the unconditional model, whose rows take the unconditional variance.
    ``scale``: a number or [N]. Also the distillation target (difflora.distill.objective)."""
    c = channels
    if isinstance(scale, Tensor):
        scale = scale.to(device=cond.device, dtype=cond.dtype).reshape(-1, *([1] * (cond.ndim - 1)))
        var = torch.where(scale == 0, uncond[:, c:], cond[:, c:])
    else:
        var = uncond[:, c:] if scale == 0 else cond[:, c:]
    # Extrapolate from the unconditional towards (and past) the conditional noise prediction.
    eps = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([eps, var], dim=1)


def selective_threshold(diffusion: Any, fraction: float) -> float | None:
    """``min_t`` that guides the first ``fraction`` of the sampler steps of ``diffusion``.

    The sampler visits process indices T'-1, ..., 0; the first ``round(fraction * T')`` of them
    (the noisiest) are guided. Returns the original-process timestep of the last guided step
    (the one the model sees, as the sampler computes it), ``inf`` when no step is guided, and None
    when every step is (plain guidance).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the guidance fraction must lie in [0, 1], got {fraction}")
    steps = diffusion.num_timesteps
    guided = round(fraction * steps)
    if guided >= steps:
        return None
    if guided == 0:
        return float("inf")
    return float(diffusion.model_timesteps(torch.tensor([steps - guided]))[0])


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
