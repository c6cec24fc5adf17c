"""The ``diffusion`` section: the noise process a model is trained and sampled in.

Imported and re-exported by ``difflora.config.schema`` (it imports nothing else of difflora). Two
families of beta schedules:

- difflora's own (``noise_schedule``, IDDPM's): ``linear`` is Ho et al.'s 1e-4..0.02 scaled by
  1000/T, ``cosine`` is Nichol and Dhariwal's;
- diffusers' (``beta_schedule``, set by a pretrained pipeline's ``scheduler_config.json`` or by
  hand): ``linear`` is ``linspace(beta_start, beta_end, T)`` without any 1000/T scaling,
  ``scaled_linear`` is ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` (Stable
  Diffusion's) and ``squaredcos_cap_v2`` the cosine schedule with betas capped at 0.999.

``prediction_type`` is what the network outputs: ``epsilon`` (the noise) or ``v_prediction``
(v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, Salimans and Ho).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from difflora.config.base import StrictModel, hold_fixed, unused_at_default

__all__ = ["BETA_SCHEDULES", "PREDICTION_TYPES", "DiffusionConfig"]

# diffusers' beta_schedule values difflora computes (difflora.diffusion.schedules.diffusers_betas).
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")


class DiffusionConfig(StrictModel):
    steps: int = Field(default=1000, ge=1)
    """Number of diffusion timesteps T of the forward process."""
    noise_schedule: Literal["linear", "cosine"] = "linear"
    """difflora's beta schedule: linear or cosine (IDDPM)."""
    # diffusers' schedule (None: noise_schedule, difflora's own); beta_start and beta_end act with it only.
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] | None = None
    """A diffusers beta schedule instead of noise_schedule (unset: noise_schedule)."""
    beta_start: float = Field(default=0.0001, gt=0, lt=1)
    """First beta of a diffusers beta_schedule."""
    beta_end: float = Field(default=0.02, gt=0, lt=1)
    """Last beta of a diffusers beta_schedule."""
    # Shifts the DDIM sampler's stride grid of timesteps up by this many (diffusers' steps_offset of
    # its "leading" spacing; Stable Diffusion's schedulers have 1): e.g. 901, 801, ..., 1 of T = 1000.
    steps_offset: int = Field(default=0, ge=0)
    """Shift of the DDIM timestep grid (diffusers' steps_offset; Stable Diffusion uses 1)."""
    # What the network predicts: the noise, or v = sqrt(abar) eps - sqrt(1 - abar) x_0.
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the network predicts: the noise (epsilon) or v."""
    # Without learned variance: fixed-small (posterior variance) or fixed-large (beta_t).
    sigma_small: bool = False
    """Without a learned variance: the posterior variance (true) or beta_t (false)."""
    # mse: L_simple. hybrid: L_simple + lambda L_vb (IDDPM; needs learn_sigma).
    # None: hybrid with a learned variance, mse without (what improved-diffusion does).
    loss: Literal["mse", "hybrid"] | None = None
    """mse (L_simple) or hybrid (L_simple + lambda L_vb; needs learn_sigma); unset: hybrid with a learned variance."""
    # Feed the network t * 1000 / T, as improved-diffusion does, so time embeddings see one range.
    # False: the integer t (diffusers' models, whose pipelines give them the integer timestep).
    rescale_timesteps: bool = True
    """Feed the network t * 1000 / T (IDDPM) instead of the integer timestep."""
    # Sampling clamps each step's x_0 estimate to [-1, 1] (diffusers' clip_sample).
    clip_denoised: bool = True
    """Clamp each sampling step's x_0 estimate to [-1, 1]."""

    @model_validator(mode="after")
    def _one_schedule(self) -> DiffusionConfig:
        if self.beta_schedule is None:
            hold_fixed(
                self, "diffusion", unused_at_default(self, ("beta_start", "beta_end")), "diffusion.beta_schedule=None"
            )
        else:
            hold_fixed(
                self,
                "diffusion",
                unused_at_default(self, ("noise_schedule",)),
                f"diffusion.beta_schedule={self.beta_schedule}",
            )
            if self.beta_end < self.beta_start:
                raise ValueError(
                    f"diffusion.beta_end ({self.beta_end}) is below diffusion.beta_start ({self.beta_start})"
                )
        return self
