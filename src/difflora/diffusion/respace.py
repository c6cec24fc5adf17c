"""Timestep respacing: sample a T-step model in fewer steps (IDDPM section 4).

A subsequence S of the original timesteps defines a shorter diffusion with the same marginals
q(x_t | x_0) at the kept steps: its betas are 1 - abar_{S_i} / abar_{S_{i-1}}. The model still
sees the ORIGINAL integer timesteps (its wrapper rescales them by 1000/T_original for the backbone
with ``rescale_timesteps``), so a network trained on T = 4000 steps samples in 50 without knowing
it; a learned variance interpolates between the respaced process's beta and beta-tilde, as in IDDPM.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difflora.config.schema import DiffusionConfig
from difflora.diffusion.gaussian import GaussianDiffusion
from difflora.diffusion.schedules import diffusers_betas, get_named_beta_schedule

__all__ = ["SpacedDiffusion", "create_diffusion", "space_timesteps"]


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int], offset: int = 0) -> set[int]:
    """Which of the original timesteps 0..T-1 to keep.

    ``section_counts`` is either "ddimN" (the stride-k grid range(0, T, k) with exactly N
    elements, as in the DDIM paper, shifted up by ``offset``: diffusers' ``steps_offset`` of its
    "leading" spacing, 1 in Stable Diffusion's schedulers) or a list / comma-separated string of
    counts: the process is cut into that many equal sections (the first T % len sections one step
    longer) and each section keeps its count of evenly spaced steps, first and last included
    (e.g. space_timesteps(300, "10,15,20") keeps 10 of steps 0-99, 15 of 100-199, 20 of 200-299).
    ``offset`` applies to the stride grid only (diffusers' evenly spaced "linspace" grid has none).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _stride_grid(num_timesteps, int(section_counts[len("ddim") :]), offset)
        section_counts = [int(x) for x in section_counts.split(",")]
    counts = list(section_counts)
    if not counts or any(c < 0 for c in counts):
        raise ValueError(f"section counts must be a non-empty list of non-negative ints, got {counts}")
    size_per, extra = divmod(num_timesteps, len(counts))
    steps: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        # Fractional stride so both ends of the section are kept; round() spreads the remainder.
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(j * stride) for j in range(count)]
        start += size
    return set(steps)


def _stride_grid(num_timesteps: int, desired: int, offset: int) -> set[int]:
    """The "ddimN" grid: range(0, T, k) with exactly ``desired`` elements, plus ``offset``."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
            grid = range(offset, num_timesteps + offset, stride)[:desired]
            if grid[-1] >= num_timesteps:
                raise ValueError(
                    f"{desired} DDIM steps of stride {stride} shifted by steps_offset {offset} would reach timestep "
                    f"{grid[-1]}, past the last one ({num_timesteps - 1}); take fewer steps"
                )
            return set(grid)
    raise ValueError(f"cannot take exactly {desired} steps of {num_timesteps} with a fixed stride")


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over a subsequence ``use_timesteps`` of the process defined by ``betas``.

    Process index i (0..len(use_timesteps)-1) stands for original timestep ``timestep_map[i]``;
    the model is called with original timesteps. Keyword arguments go to GaussianDiffusion.
    """

    def __init__(self, use_timesteps: Iterable[int], betas: np.ndarray | Sequence[float], **kwargs: Any) -> None:
        base_betas = np.asarray(betas, dtype=np.float64)
        kept = sorted(set(int(s) for s in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= len(base_betas):
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{len(base_betas) - 1}")
        alphas_cumprod = np.cumprod(1.0 - base_betas)[kept]
        # Same marginals at the kept steps: 1 - beta'_i = abar_{S_i} / abar_{S_{i-1}}.
        new_betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        self.timestep_map = np.asarray(kept, dtype=np.int64)
        self._original_num_steps = len(base_betas)
        super().__init__(new_betas, **kwargs)

    @property
    def original_num_steps(self) -> int:
        return self._original_num_steps

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The original-process integer timesteps (int64 [N]) that respaced indices ``t`` [N] stand
        for: the network was trained on the original process."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t.long()]


def create_diffusion(
    cfg: DiffusionConfig, learn_sigma: bool, respacing: str | int | Sequence[int] | None = None
) -> GaussianDiffusion:
    """Build the diffusion of a config.

    Args:
        cfg: steps (T), the beta schedule (noise_schedule, or diffusers' beta_schedule with
            beta_start and beta_end), steps_offset (of a "ddimN" respacing), prediction_type, sigma_small, loss, rescale_timesteps,
            clip_denoised.
        learn_sigma: the network outputs 2C channels (learned-range variance); otherwise the
            variance is fixed-small (cfg.sigma_small) or fixed-large.
        respacing: None for the full T-step process; an int N for N evenly spaced steps (first
            and last included); a string or list for ``space_timesteps`` ("ddim50", "10,20,30").
    """
    if cfg.beta_schedule is None:
        betas = get_named_beta_schedule(cfg.noise_schedule, cfg.steps)
    else:
        betas = diffusers_betas(cfg.beta_schedule, cfg.steps, cfg.beta_start, cfg.beta_end)
    if learn_sigma:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if cfg.sigma_small else "fixed_large"
    kwargs: dict[str, Any] = {
        "model_var_type": var_type,
        # None (the config default): hybrid with a learned variance, mse without, as improved-diffusion.
        "loss_type": cfg.loss or ("hybrid" if learn_sigma else "mse"),
        "rescale_timesteps": cfg.rescale_timesteps,
        "prediction_type": cfg.prediction_type,
        "clip_denoised": cfg.clip_denoised,
    }
    if respacing is None:
        return GaussianDiffusion(betas, **kwargs)
    if isinstance(respacing, bool):
        raise TypeError("respacing must be None, an int, a string or a list of ints")
    if isinstance(respacing, int):
        if not 1 <= respacing <= cfg.steps:
            raise ValueError(f"respacing={respacing} must lie in 1..{cfg.steps} (diffusion.steps)")
        respacing = [respacing]
    return SpacedDiffusion(space_timesteps(cfg.steps, respacing, cfg.steps_offset), betas, **kwargs)
