"""The Gaussian diffusion process: forward noising, posterior, model-predicted reverse step, losses.

Follows Nichol & Dhariwal's improved DDPM (IDDPM): epsilon prediction, fixed or learned-range
variance, L_simple and the hybrid loss; the network may instead predict v (``prediction_type``,
as diffusers' v_prediction models do: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0). Timesteps count 0..T-1; t = 0 is the first noising step,
so the reverse process ends by predicting x_0 from x at t = 0.

The object never owns the network: every method that needs predictions takes a model callable
``model(x, t, **model_kwargs) -> [N x C_out x H x W]`` (C_out = 2C with learned variance: first the
prediction (the noise, or v), then the variance interpolation values in [-1, 1]). ``t`` is always the
original-process integer timestep (int64 [N], 0..T-1; under respacing the original timestep a
process index stands for): IDDPM's rescaled float ``t * 1000 / T`` is the backbone's input, which
the model wrapper (:class:`difflora.model.build.DiffusionModel`) computes from it.

Coefficients are kept in float64 numpy (cumulative products over thousands of steps) and cast
to the data's dtype (at least float32) when gathered for a batch of timesteps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from difflora.diffusion.likelihoods import discretized_gaussian_log_likelihood, mean_flat, normal_kl

__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelFn",
    "ModelVarType",
    "PredictionType",
    "extract_into_tensor",
    "randn",
]

ModelVarType = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["mse", "hybrid"]
PredictionType = Literal["epsilon", "v_prediction"]
ModelFn = Callable[..., Tensor]

_VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
_LOSS_TYPES = ("mse", "hybrid")
_PREDICTION_TYPES = ("epsilon", "v_prediction")


def extract_into_tensor(arr: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
    """Gather ``arr[t]`` for a batch of timesteps ``t`` [N] and shape it [N x 1 x ... x 1] to broadcast
    against ``like``, on ``like``'s device, in ``like``'s dtype promoted to at least float32."""
    # The table goes to t's device (a small host-to-device copy), never t to the host: reading t
    # back would stall a GPU on every diffusion call.
    values = torch.from_numpy(np.ascontiguousarray(arr)).to(t.device)[t.detach().long()]
    dtype = torch.promote_types(like.dtype, torch.float32)
    return values.to(device=like.device, dtype=dtype).reshape(-1, *([1] * (like.ndim - 1)))


def randn(
    shape: Sequence[int], generator: torch.Generator | None, *, device: torch.device | str, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``.

    Drawing where the generator lives makes a seed give the same numbers whatever device the
    data is on (a CPU generator with CUDA data yields the CPU stream)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


class GaussianDiffusion:
    """Training and sampling utilities for a discrete-time Gaussian diffusion with T = len(betas) steps.

    Args:
        betas: [T] forward-process variances, each in (0, 1].
        model_var_type: "fixed_small" (posterior variance, beta-tilde), "fixed_large" (beta_t; at
            t = 0 the posterior variance of t = 1, IDDPM's choice for a better decoder likelihood),
            or "learned_range" (the model's extra C channels v in [-1, 1] interpolate the log
            variance between log beta-tilde_t and log beta_t).
        loss_type: "mse" (L_simple on the noise) or "hybrid" (L_simple plus the variational bound
            term, which trains the variance only; needs "learned_range").
        rescale_timesteps: the setting (``diffusion.rescale_timesteps``) that the backbone's time
            input is float t * 1000 / T, so time embeddings see the range of a T = 1000 process
            whatever T is. Kept with the process it belongs to, but applied by the model wrapper:
            the model callable itself always receives the integer t (see :meth:`model_timesteps`).
        prediction_type: what the model's first C channels predict: "epsilon" (the noise) or
            "v_prediction" (v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0); the training target and
            every sampler's x_0 and noise estimates follow it.
        clip_denoised: the samplers' default for clamping the x_0 estimate to [-1, 1] at each step
            (diffusers' ``clip_sample``).
    """

    def __init__(
        self,
        betas: np.ndarray | Sequence[float],
        *,
        model_var_type: ModelVarType = "fixed_small",
        loss_type: LossType = "mse",
        rescale_timesteps: bool = True,
        prediction_type: PredictionType = "epsilon",
        clip_denoised: bool = True,
    ) -> None:
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
        if model_var_type not in _VAR_TYPES:
            raise ValueError(f"model_var_type must be one of {_VAR_TYPES}, got {model_var_type!r}")
        if loss_type not in _LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {_LOSS_TYPES}, got {loss_type!r}")
        if loss_type == "hybrid" and model_var_type != "learned_range":
            raise ValueError("loss_type='hybrid' trains the variance: it needs model_var_type='learned_range'")
        if loss_type == "mse" and model_var_type == "learned_range":
            # Allowed (e.g. fine-tuning only the mean), but the variance channels then get no gradient.
            warnings.warn(
                "loss_type='mse' with a learned variance: the variance channels receive no gradient; "
                "use loss_type='hybrid' to train them",
                stacklevel=2,
            )
        self.model_var_type: ModelVarType = model_var_type
        self.loss_type: LossType = loss_type
        self.rescale_timesteps = rescale_timesteps
        self.prediction_type: PredictionType = prediction_type
        self.clip_denoised = clip_denoised

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])

        # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        # x_0 = x_t / sqrt(abar_t) - sqrt(1 / abar_t - 1) eps
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta-tilde_t I) (DDPM eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta-tilde_0 = 0: its log is clipped to beta-tilde_1 (the t = 0 step adds no noise anyway).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # Fixed-large: beta_t, except beta-tilde_1 at t = 0 for a better decoder likelihood (IDDPM).
        self.fixed_large_variance = np.append(first, betas[1:])
        self.log_betas = np.log(betas)

    # ----------------------------------------------------------------------------------------- time

    @property
    def learn_sigma(self) -> bool:
        """True when the model outputs 2C channels (noise, then variance values)."""
        return self.model_var_type == "learned_range"

    @property
    def original_num_steps(self) -> int:
        """T of the process the model was trained on (differs from num_timesteps when respaced)."""
        return self.num_timesteps

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The timesteps the model callable sees for process indices ``t`` [N]: the original-process
        integer timesteps (int64), here ``t`` itself (a respaced process maps its indices)."""
        return t.long()

    def call_model(self, model: ModelFn, x: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """``model(x, model_timesteps(t), **model_kwargs)``: the one place the network is evaluated."""
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    def sample_timesteps(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """n timesteps drawn uniformly from 0..T-1 (int64 [n]), on ``device``."""
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=gen_device)
        return t.to(device if device is not None else gen_device)

    # -------------------------------------------------------------------------------- forward process

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0); x_start [N x C x H x W], t [N]."""
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: Tensor, t: Tensor, noise: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise; [N x C x H x W]."""
        if noise is None:
            noise = randn(x_start.shape, generator, device=x_start.device, dtype=x_start.dtype)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have x_start's shape {tuple(x_start.shape)}")
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} must have one shape")
        mean = (
            extract_into_tensor(self.posterior_mean_coef1, t, x_t) * x_start
            + extract_into_tensor(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = extract_into_tensor(self.posterior_variance, t, x_t)
        log_variance = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (
            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        """The noise consistent with x_t and an x_0 estimate (inverse of predict_xstart_from_eps)."""
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / extract_into_tensor(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def prediction_target(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the model should output for x_t = q_sample(x_start, t, noise): the noise, or v."""
        if self.prediction_type == "epsilon":
            return noise
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * noise
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
        )

    def split_prediction(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> tuple[Tensor, Tensor]:
        """(x_0, eps) the model's prediction (its first C channels) at x_t stands for, unclipped."""
        if self.prediction_type == "epsilon":
            return self.predict_xstart_from_eps(x_t, t, prediction), prediction
        # v = a eps - s x_0 with x_t = a x_0 + s eps (a^2 + s^2 = 1): x_0 = a x_t - s v, eps = a v + s x_t.
        a = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t)
        s = extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return a * x_t - s * prediction, a * prediction + s * x_t

    # -------------------------------------------------------------------------------- reverse process

    def p_from_output(
        self, model_output: Tensor, x: Tensor, t: Tensor, *, clip_denoised: bool | None = None
    ) -> dict[str, Tensor]:
        """Turn a model output at x_t into p(x_{t-1} | x_t).

        Args:
            model_output: [N x C_out x H x W], C_out = C (the prediction: noise or v) or 2C (then the
                variance values in [-1, 1]).
            x: x_t [N x C x H x W]. t: process timesteps [N].
            clip_denoised: clamp the x_0 estimate to [-1, 1] before forming the mean (None: the
                diffusion's ``clip_denoised``).
        Returns a dict of [N x C x H x W] tensors: "mean", "variance", "log_variance",
        "pred_xstart" (clipped if asked) and "eps" (the predicted noise, unclipped).
        """
        n, c = x.shape[:2]
        want = 2 * c if self.learn_sigma else c
        if model_output.shape != (n, want, *x.shape[2:]):
            hint = " (is learn_sigma set the same for the network and the diffusion?)"
            raise ValueError(
                f"model output {tuple(model_output.shape)}; expected {(n, want, *x.shape[2:])} for "
                f"model_var_type={self.model_var_type!r}{hint}"
            )
        if self.learn_sigma:
            prediction, v = model_output[:, :c], model_output[:, c:]
            min_log = extract_into_tensor(self.posterior_log_variance_clipped, t, x)
            max_log = extract_into_tensor(self.log_betas, t, x)
            # v = -1 gives beta-tilde_t, v = 1 gives beta_t; interpolating logs spans orders of magnitude.
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            prediction = model_output
            if self.model_var_type == "fixed_small":
                var_arr, log_arr = self.posterior_variance, self.posterior_log_variance_clipped
            else:
                var_arr, log_arr = self.fixed_large_variance, np.log(self.fixed_large_variance)
            variance = extract_into_tensor(var_arr, t, x).expand_as(x)
            log_variance = extract_into_tensor(log_arr, t, x).expand_as(x)

        pred_xstart, eps = self.split_prediction(x, t, prediction)
        if self.clip_denoised if clip_denoised is None else clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        # The model's mean is the true posterior mean with x_0 replaced by its estimate.
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(
        self,
        model: ModelFn,
        x: Tensor,
        t: Tensor,
        *,
        clip_denoised: bool | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """Evaluate the model once at (x_t, t) and return p(x_{t-1} | x_t) (see ``p_from_output``)."""
        return self.p_from_output(self.call_model(model, x, t, model_kwargs), x, t, clip_denoised=clip_denoised)

    # ----------------------------------------------------------------------------------------- losses

    def vb_terms_bpd(
        self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor, *, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """One term of the variational bound, in bits per dimension, per sample.

        L_{t} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the decoder NLL
        -log p(x_0 | x_1) (discretised Gaussian) for t = 0. Returns {"output": [N], "pred_xstart"}.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: ModelFn,
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        noise: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample training losses for a batch.

        Args:
            model: callable ``model(x_t, model_timesteps(t), **model_kwargs)``.
            x_start: clean images [N x C x H x W] in [-1, 1]. t: timesteps [N] (int64, 0..T-1).
            noise: the noise to diffuse with; drawn from ``generator`` when None.
        Returns {"loss", "mse"} and, for the hybrid loss, "vb"; each [N]. "loss" = "mse" (+ "vb").
        "mse" is against :meth:`prediction_target` (the noise, or v).
        """
        if noise is None:
            noise = randn(x_start.shape, generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        model_output = self.call_model(model, x_t, t, model_kwargs)
        c = x_start.shape[1]
        terms: dict[str, Tensor] = {}
        if self.learn_sigma:
            prediction = model_output[:, :c]
            if self.loss_type == "hybrid":
                # Stop-gradient on the mean: the bound only trains the variance channels, so the noise
                # prediction is driven by L_simple alone (IDDPM section 3.1).
                frozen_out = torch.cat([prediction.detach(), model_output[:, c:]], dim=1)
                vb = self.vb_terms_bpd(frozen_out, x_start, x_t, t, clip_denoised=False)["output"]
                # Per-step terms average over t; T/1000 turns that into lambda = 1e-3 times the full
                # bound's sum over T steps (IDDPM's RESCALED_MSE), independent of T.
                terms["vb"] = vb * (self.num_timesteps / 1000.0)
        else:
            prediction = model_output
        if prediction.shape != noise.shape:
            raise ValueError(f"model output {tuple(model_output.shape)} does not match x {tuple(x_start.shape)}")
        terms["mse"] = mean_flat((self.prediction_target(x_start, t, noise) - prediction) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # ---------------------------------------------------------------------------------------- metrics

    def prior_bpd(self, x_start: Tensor) -> Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, [N]; small for a well-chosen schedule."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: ModelFn,
        x_start: Tensor,
        *,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The full variational bound of x_start [N x C x H x W] (T model evaluations).

        Returns {"total_bpd": [N], "prior_bpd": [N], "vb": [N x T], "mse": [N x T]}.
        """
        n = x_start.shape[0]
        vb, mse = [], []
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, dtype=torch.long, device=x_start.device)
            noise = randn(x_start.shape, generator, device=x_start.device, dtype=x_start.dtype)
            x_t = self.q_sample(x_start, t, noise)
            out = self.call_model(model, x_t, t, model_kwargs)
            vb.append(self.vb_terms_bpd(out, x_start, x_t, t, clip_denoised=clip_denoised)["output"])
            mse.append(mean_flat((out[:, : x_start.shape[1]] - self.prediction_target(x_start, t, noise)) ** 2))
        vb_t = torch.stack(vb[::-1], dim=1)
        prior = self.prior_bpd(x_start)
        return {"total_bpd": vb_t.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb_t, "mse": torch.stack(mse[::-1], 1)}
