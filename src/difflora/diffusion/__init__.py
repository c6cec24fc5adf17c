"""Gaussian diffusion: schedules, forward process, posterior, losses, samplers and guidance.

Plain math on tensors; the network is always a callable argument ``model(x, t, **model_kwargs)``.
"""

from difflora.diffusion.gaussian import GaussianDiffusion, LossType, ModelVarType, extract_into_tensor, randn
from difflora.diffusion.guidance import NULL_LABEL, ClassifierFreeGuidance, drop_labels
from difflora.diffusion.likelihoods import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from difflora.diffusion.respace import SpacedDiffusion, create_diffusion, space_timesteps
from difflora.diffusion.samplers import StepOutput, ddim_step, p_sample_step, sample
from difflora.diffusion.schedules import (
    betas_for_alpha_bar,
    cosine_beta_schedule,
    diffusers_betas,
    get_named_beta_schedule,
    linear_beta_schedule,
)

__all__ = [
    "NULL_LABEL",
    "ClassifierFreeGuidance",
    "GaussianDiffusion",
    "LossType",
    "ModelVarType",
    "SpacedDiffusion",
    "StepOutput",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "cosine_beta_schedule",
    "create_diffusion",
    "diffusers_betas",
    "ddim_step",
    "discretized_gaussian_log_likelihood",
    "drop_labels",
    "extract_into_tensor",
    "get_named_beta_schedule",
    "linear_beta_schedule",
    "mean_flat",
    "normal_kl",
    "p_sample_step",
    "randn",
    "sample",
    "space_timesteps",
]
