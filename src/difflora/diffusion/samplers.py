"""Samplers: ancestral DDPM and DDIM, as short functions over a diffusion and a model callable.

``model(x, t, **model_kwargs)`` is any callable (a network, a ClassifierFreeGuidance wrapper, an
adapter-merging closure); the diffusion decides which timesteps it sees (the original-process
integer timesteps, also under respacing). Every random draw uses the caller's
``torch.Generator`` on the generator's device, so a seed fixes the samples on any device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from difflora.diffusion.gaussian import GaussianDiffusion, ModelFn, extract_into_tensor, randn

__all__ = ["StepOutput", "ddim_step", "p_sample_step", "sample"]


class StepOutput(NamedTuple):
    sample: Tensor  # x_{t-1} [N x C x H x W]
    pred_xstart: Tensor  # the model's x_0 estimate at this step [N x C x H x W]


def _last_step_mask(t: Tensor, like: Tensor) -> Tensor:
    # 0 where t == 0 (the final step returns the mean, adding no noise), 1 elsewhere.
    return (t != 0).to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def p_sample_step(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x: Tensor,
    t: Tensor,
    *,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool | None = None,
    noise: Tensor | None = None,
) -> StepOutput:
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); x [N x C x H x W], t [N] process indices.

    ``noise`` (same shape as x) replaces the draw from ``generator`` when given. ``clip_denoised``:
    clamp the x_0 estimate to [-1, 1] (None: the diffusion's ``clip_denoised``), as in every sampler.
    """
    # Mean and variance of p(x_{t-1} | x_t) from one model evaluation.
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    # Fresh noise from the caller's generator.
    if noise is None:
        noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
    # x_{t-1} = mean + sigma z, with no noise on the last step.
    sample = out["mean"] + _last_step_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
    return StepOutput(sample, out["pred_xstart"])


def ddim_step(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x: Tensor,
    t: Tensor,
    *,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool | None = None,
    noise: Tensor | None = None,
) -> StepOutput:
    """One DDIM step x_t -> x_{t-1} (Song et al. eq. 12); eta = 0 is deterministic, eta = 1 has
    DDPM's posterior variance. A learned variance is ignored (DDIM fixes sigma by eta)."""
    # The model's x_0 estimate (clipped if asked).
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    # The noise consistent with the (clipped) x_0, so both terms below describe one x_t (as IDDPM;
    # diffusers keeps the raw predicted noise instead, which differs only when clipping bites).
    eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    abar = extract_into_tensor(diffusion.alphas_cumprod, t, x)
    abar_prev = extract_into_tensor(diffusion.alphas_cumprod_prev, t, x)
    # Eq. 16: sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev).
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    # Eq. 12: x_{t-1} = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z.
    mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
    if eta == 0:
        return StepOutput(mean, out["pred_xstart"])
    # Fresh noise only when eta > 0 (no draw, no generator advance, for deterministic DDIM).
    if noise is None:
        noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return StepOutput(mean + _last_step_mask(t, x) * sigma * noise, out["pred_xstart"])


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    shape: Sequence[int],
    *,
    generator: torch.Generator,
    sampler: Literal["ddpm", "ddim"] = "ddpm",
    eta: float = 0.0,
    model_kwargs: dict[str, Any] | None = None,
    clip_denoised: bool | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    noise: Tensor | None = None,
    on_step: Callable[[Tensor], None] | None = None,
    clamp: bool = True,
) -> Tensor:
    """Generate images [N x C x H x W] in [-1, 1] by running every step of ``diffusion`` backwards.

    Args:
        diffusion: the (possibly respaced) process; its length is the number of model evaluations.
        model: ``model(x, t, **model_kwargs)``. shape: (N, C, H, W).
        generator: the source of every random draw (the initial noise and each step's noise).
        sampler: "ddpm" (ancestral, the diffusion's variance) or "ddim" (``eta`` sets the noise).
        device: where x lives; default: ``noise``'s device, else the generator's.
        noise: the starting x_T (else drawn from ``generator``).
        on_step: called with the timesteps the model will see [N] (original-process integers)
            before each model evaluation (e.g. to merge a timestep-dependent adapter into the
            weights for this step).
        clamp: clamp the result to [-1, 1] (False: latents, which a VAE decodes, have no such range).
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if device is None:
        device = noise.device if noise is not None else generator.device
    # Start from x_T ~ N(0, I), or the caller's starting noise.
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise {tuple(noise.shape)} must have shape {tuple(shape)}")
        x = noise.to(device)
    else:
        x = randn(shape, generator, device=device, dtype=torch.float32)
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{sampler} sampling", leave=False)
    for i in steps:
        t = torch.full((shape[0],), i, dtype=torch.long, device=device)
        # Let the caller prepare for this step's timestep before the model runs.
        if on_step is not None:
            on_step(diffusion.model_timesteps(t))
        # One reverse step x_t -> x_{t-1}.
        if sampler == "ddpm":
            x = p_sample_step(
                diffusion, model, x, t, generator=generator, model_kwargs=model_kwargs, clip_denoised=clip_denoised
            ).sample
        else:
            x = ddim_step(
                diffusion,
                model,
                x,
                t,
                generator=generator,
                eta=eta,
                model_kwargs=model_kwargs,
                clip_denoised=clip_denoised,
            ).sample
    # The last step returns the (clipped) x_0 estimate; clamp so unclipped runs also land in [-1, 1].
    return x.clamp(-1, 1) if clamp else x
