"""Gaussian KL divergence and the discretised Gaussian decoder likelihood (IDDPM's losses).

All functions are elementwise on broadcastable tensors and return nats; divide by log(2) for bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["approx_standard_normal_cdf", "discretized_gaussian_log_likelihood", "mean_flat", "normal_kl"]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch one: [N x ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor | float, logvar1: Tensor | float, mean2: Tensor | float, logvar2: Tensor | float) -> Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) elementwise, in nats.

    Variances enter as log-variances so that tiny posterior variances (early timesteps) stay
    representable. Arguments broadcast; at least one must be a tensor.
    """
    tensor = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (torch.as_tensor(v, dtype=tensor.dtype, device=tensor.device) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) by the tanh approximation (max abs. error about 2e-4), as IDDPM uses; cheap and smooth."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of 8-bit images in [-1, 1] under N(means, exp(log_scales)^2) discretised into bins.

    Each pixel value owns the bin [x - 1/255, x + 1/255]; the two edge bins extend to -inf and
    +inf so the 256 bins carry all the mass. ``x`` [N x C x H x W] holds values on the 8-bit grid
    rescaled to [-1, 1]; ``means`` and ``log_scales`` broadcast to it. Returns [N x C x H x W] nats.
    """
    if x.shape != means.shape:
        raise ValueError(f"x {tuple(x.shape)} and means {tuple(means.shape)} must have one shape")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    # Clamps keep log() finite where the approximate CDF saturates to exactly 0 or 1.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # 0.999 sits between the last interior bin centre (1 - 2/255) and the edge value 1.
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
