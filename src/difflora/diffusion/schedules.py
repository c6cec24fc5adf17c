"""Beta schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

Timesteps count 0..T-1 (IDDPM's convention): index 0 is the first noising step. Schedules are
float64 numpy arrays so that cumulative products over thousands of steps stay accurate; the
diffusion object casts to the data's dtype only when a coefficient is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = [
    "betas_for_alpha_bar",
    "cosine_beta_schedule",
    "diffusers_betas",
    "get_named_beta_schedule",
    "linear_beta_schedule",
]


def linear_beta_schedule(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Ho et al.'s linear schedule (1e-4 to 0.02 at T=1000), scaled by 1000/T as IDDPM does.

    The scaling keeps the total amount of noise (sum of betas) roughly independent of T, so a
    T=4000 process ends as close to pure noise as the T=1000 one. Below T = 21 the scaled betas
    would reach 1 (a singular step) or more, so they are capped at ``max_beta`` as the cosine
    schedule's are; for T >= 21 the cap never binds and the schedule is IDDPM's. Returns [T] float64.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64), max_beta)


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[np.ndarray], np.ndarray], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into T betas.

    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta); the cap avoids beta = 1
    (a singular step) at the very end of the cosine schedule. ``alpha_bar`` must accept an array.
    Returns [T] float64.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    a = alpha_bar(s)
    return np.minimum(1.0 - a[1:] / a[:-1], max_beta)


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2).

    The offset s keeps beta from being vanishingly small near u = 0. Returns [T] float64.
    """
    return betas_for_alpha_bar(
        num_timesteps, lambda u: np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2, max_beta=max_beta
    )


_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
}


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """The schedule called ``name`` ("linear" or "cosine") with ``num_timesteps`` steps."""
    try:
        factory = _SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown noise schedule {name!r}; valid: {', '.join(sorted(_SCHEDULES))}") from None
    return factory(num_timesteps)


def diffusers_betas(name: str, num_timesteps: int, beta_start: float = 0.0001, beta_end: float = 0.02) -> np.ndarray:
    """diffusers' ``beta_schedule`` ``name`` with ``num_timesteps`` steps, [T] float64.

    ``linear``: linspace(beta_start, beta_end, T), with no 1000/T scaling (unlike IDDPM's linear);
    ``scaled_linear``: linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2 (Stable Diffusion);
    ``squaredcos_cap_v2``: the cosine schedule (s = 0.008) with betas capped at 0.999. diffusers
    computes these in float32; float64 here agrees with them to float32 rounding.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "linear":
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    if name == "squaredcos_cap_v2":
        return cosine_beta_schedule(num_timesteps)
    raise ValueError(f"unknown beta_schedule {name!r}; valid: linear, scaled_linear, squaredcos_cap_v2")
