"""GaussianDiffusion against independent derivations: the forward process by step-by-step
recursion, the posterior by Bayes' rule, the bound by torch.distributions, the losses by hand."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from difflora.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    approx_standard_normal_cdf,
    cosine_beta_schedule,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    mean_flat,
    normal_kl,
    space_timesteps,
)

# float64 throughout: the references are exact, so any gap is a bug, not rounding.
TOL = dict(rtol=1e-10, atol=1e-12)
T = 50
SHAPE = (6, 2, 3, 3)


def marginals_by_recursion(betas):
    # x_t = sqrt(1 - b_t) x_{t-1} + sqrt(b_t) z  =>  mean coef m_t = sqrt(1 - b_t) m_{t-1},
    # variance v_t = (1 - b_t) v_{t-1} + b_t, from m = 1, v = 0 before the first step.
    m, v, ms, vs = 1.0, 0.0, [], []
    for b in betas:
        m, v = math.sqrt(1 - b) * m, (1 - b) * v + b
        ms.append(m)
        vs.append(v)
    return np.array(ms), np.array(vs)


@pytest.fixture
def diffusion():
    return GaussianDiffusion(cosine_beta_schedule(T), model_var_type="fixed_small")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 17, T - 2, T - 1])
    return x0, noise, t


def col(values, t):
    return torch.as_tensor(np.asarray(values)[t.numpy()], dtype=torch.float64).reshape(-1, 1, 1, 1)


def test_q_sample_matches_step_by_step_recursion(diffusion):
    x0, noise, t = batch()
    m, v = marginals_by_recursion(diffusion.betas)
    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, col(m, t) * x0, **TOL)
    torch.testing.assert_close(var, col(v, t), **TOL)
    torch.testing.assert_close(log_var, col(np.log(v), t), **TOL)
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), col(m, t) * x0 + col(np.sqrt(v), t) * noise, **TOL)
    # The epsilon parameterisation inverts q_sample.
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(diffusion.predict_xstart_from_eps(x_t, t, noise), x0, **TOL)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(x_t, t, x0), noise, **TOL)


def test_q_sample_generator_reproducible(diffusion):
    x0, _, t = batch()
    a = diffusion.q_sample(x0, t, generator=torch.Generator().manual_seed(3))
    b = diffusion.q_sample(x0, t, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_posterior_matches_bayes_rule(diffusion):
    # q(x_{t-1} | x_t, x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; m_{t-1} x_0, v_{t-1}):
    # a product of Gaussians in x_{t-1}: precision a_t / b_t + 1 / v_{t-1},
    # mean = (sqrt(a_t) x_t / b_t + m_{t-1} x_0 / v_{t-1}) / precision.
    x0, noise, t = batch()
    t = t[t > 0]
    x0, noise = x0[: len(t)], noise[: len(t)]
    x_t = diffusion.q_sample(x0, t, noise)
    m, v = marginals_by_recursion(diffusion.betas)
    b = col(diffusion.betas, t)
    m_prev, v_prev = col(m, t - 1), col(v, t - 1)
    precision = (1 - b) / b + 1 / v_prev
    mean_ref = (torch.sqrt(1 - b) * x_t / b + m_prev * x0 / v_prev) / precision
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(mean, mean_ref, **TOL)
    torch.testing.assert_close(var, 1 / precision, **TOL)
    torch.testing.assert_close(log_var, torch.log(1 / precision), **TOL)


def test_posterior_at_t0_is_x0_with_clipped_log_variance(diffusion):
    # At t = 0, x_{-1} is x_0 itself: variance 0; its log is clipped to beta-tilde_1's.
    x0, noise, _ = batch()
    t = torch.zeros(SHAPE[0], dtype=torch.long)
    x_t = diffusion.q_sample(x0, t, noise)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    torch.testing.assert_close(mean, x0, **TOL)
    assert (var == 0).all()
    torch.testing.assert_close(log_var, torch.full_like(log_var, math.log(diffusion.posterior_variance[1])), **TOL)


def test_model_variance_types():
    betas = linear_beta_schedule(T)
    x, _, t = batch()
    eps = torch.randn(SHAPE, dtype=torch.float64)
    post = GaussianDiffusion(betas).posterior_variance
    small = GaussianDiffusion(betas, model_var_type="fixed_small").p_from_output(eps, x, t)
    large = GaussianDiffusion(betas, model_var_type="fixed_large").p_from_output(eps, x, t)
    torch.testing.assert_close(small["variance"], col(post, t).expand(SHAPE), **TOL)
    # Fixed-large: beta_t, but beta-tilde_1 at t = 0 (IDDPM).
    large_ref = col(np.where(np.arange(T) == 0, post[1], betas), t).expand(SHAPE)
    torch.testing.assert_close(large["variance"], large_ref, **TOL)
    torch.testing.assert_close(large["log_variance"], torch.log(large_ref), **TOL)

    learned = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="hybrid")
    sel = t > 0  # at t = 0 beta-tilde is 0 and its log is clipped: covered by the posterior test
    tt, xx, ee = t[sel], x[sel], eps[sel]
    for v, ref in [(-1.0, col(post, tt)), (1.0, col(betas, tt)), (0.0, torch.sqrt(col(post, tt) * col(betas, tt)))]:
        out = learned.p_from_output(torch.cat([ee, torch.full_like(ee, v)], 1), xx, tt)
        torch.testing.assert_close(out["variance"], ref.expand_as(xx), **TOL)
    # The mean depends only on the noise channels, identically for every variance type.
    torch.testing.assert_close(out["mean"], small["mean"][sel], **TOL)
    with pytest.raises(ValueError, match="learn_sigma"):
        learned.p_from_output(eps, x, t)


def test_mean_is_posterior_mean_of_predicted_x0(diffusion):
    x0, noise, t = batch()
    x_t = diffusion.q_sample(x0, t, noise)
    # With the true noise (and no clipping) the model's mean is the true posterior mean.
    out = diffusion.p_from_output(noise, x_t, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0, **TOL)
    torch.testing.assert_close(out["mean"], diffusion.q_posterior_mean_variance(x0, x_t, t)[0], **TOL)
    clipped = diffusion.p_from_output(noise * 5, x_t, t, clip_denoised=True)["pred_xstart"]
    assert clipped.abs().max() <= 1


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1, m2, lv1, lv2 = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(4))
    ref = kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(m2, torch.exp(0.5 * lv2)))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, **TOL)
    torch.testing.assert_close(
        normal_kl(m1, lv1, 0.0, 0.0), kl_divergence(Normal(m1, torch.exp(0.5 * lv1)), Normal(0.0, 1.0)), **TOL
    )


def test_discretized_log_likelihood_against_exact_cdf():
    # Independent reference: the same bins with scipy's exact normal CDF. The tanh approximation
    # of the CDF is within 2e-4 (measured) of the exact one, so bin probabilities (a difference of
    # two CDFs) agree within 4e-4; that is the one tolerance of this test.
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x = grid[torch.randint(0, 256, (4000,), generator=g)]
    x[:20], x[20:40] = -1.0, 1.0
    means = torch.rand(4000, generator=g, dtype=torch.float64) * 2.4 - 1.2
    log_scales = torch.rand(4000, generator=g, dtype=torch.float64) * 3 - 5  # sigma in [e^-5, e^-2]
    lp = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    xn, mn, sn = x.numpy(), means.numpy(), np.exp(log_scales.numpy())
    upper = np.where(xn > 0.999, 1.0, norm.cdf((xn + 1 / 255 - mn) / sn))
    lower = np.where(xn < -0.999, 0.0, norm.cdf((xn - 1 / 255 - mn) / sn))
    np.testing.assert_allclose(torch.exp(lp).numpy(), upper - lower, rtol=0, atol=4e-4)
    # The 256 bins carry all the mass (the interior bins telescope onto the two edges); exact but
    # for the 1e-12 floor each far-tail bin's probability is clamped to (<= 256 bins: 2.6e-10).
    m, ls = torch.tensor([0.3], dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)
    total = torch.exp(discretized_gaussian_log_likelihood(grid, means=m.expand(256), log_scales=ls.expand(256))).sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=2.6e-10)
    assert (approx_standard_normal_cdf(torch.tensor([-40.0, 0.0, 40.0])) == torch.tensor([0.0, 0.5, 1.0])).all()


def test_vb_terms_against_torch_distributions():
    d = GaussianDiffusion(cosine_beta_schedule(T), model_var_type="learned_range", loss_type="hybrid")
    x0, noise, t = batch()
    x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1  # on the 8-bit grid, as the decoder assumes
    x_t = d.q_sample(x0, t, noise)
    g = torch.Generator().manual_seed(4)
    out_model = torch.cat(
        [
            torch.randn(SHAPE, generator=g, dtype=torch.float64),
            torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1,
        ],
        1,
    )
    vb = d.vb_terms_bpd(out_model, x0, x_t, t)["output"]
    p = d.p_from_output(out_model, x_t, t, clip_denoised=False)
    q_mean, _, q_log_var = d.q_posterior_mean_variance(x0, x_t, t)
    kl = kl_divergence(
        Normal(q_mean, torch.exp(0.5 * q_log_var)), Normal(p["mean"], torch.exp(0.5 * p["log_variance"]))
    )
    kl_bits = kl.mean(dim=(1, 2, 3)) / math.log(2)
    # Decoder NLL at t = 0, written directly: -log of the CDF mass of each pixel's bin.
    std = torch.exp(0.5 * p["log_variance"])
    cdf = lambda z: approx_standard_normal_cdf((z - p["mean"]) / std)
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), cdf(x0 - 1 / 255))
    nll_bits = -torch.log(upper - lower).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(vb, torch.where(t == 0, nll_bits, kl_bits), **TOL)
    # The t = 0 sample exercises the decoder branch, which differs from the KL there.
    assert t[0] == 0 and abs(nll_bits[0] - kl_bits[0]) > 0.1


class SplitModel(torch.nn.Module):
    """eps = a * x (noise channels), v = tanh(b * x + c) (variance channels): disjoint parameters."""

    def __init__(self, learn_sigma=True):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        self.seen_t = []

    def forward(self, x, t):
        self.seen_t.append(t)
        eps = self.a * x
        return torch.cat([eps, torch.tanh(self.b * x + self.c)], 1) if self.learn_sigma else eps


def test_training_losses_mse(diffusion):
    x0, noise, t = batch()
    model = SplitModel(learn_sigma=False)
    terms = diffusion.training_losses(model, x0, t, noise=noise)
    x_t = diffusion.q_sample(x0, t, noise)
    expected = ((model.a * x_t - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], expected, **TOL)
    torch.testing.assert_close(terms["loss"], expected, **TOL)
    assert "vb" not in terms
    # The model callable sees the integer t, also with rescale_timesteps (its wrapper rescales).
    torch.testing.assert_close(model.seen_t[0], t, rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(
        diffusion.training_losses(model, x0, t, generator=g1)["loss"],
        diffusion.training_losses(model, x0, t, generator=g2)["loss"],
        rtol=0,
        atol=0,
    )


def test_hybrid_loss_value_and_rescaling():
    T_big = 4000
    d = GaussianDiffusion(linear_beta_schedule(T_big), model_var_type="learned_range", loss_type="hybrid")
    x0, noise, _ = batch()
    t = torch.tensor([0, 1, 5, 1000, 3998, 3999])
    model = SplitModel()
    terms = d.training_losses(model, x0, t, noise=noise)
    x_t = d.q_sample(x0, t, noise)
    with torch.no_grad():
        vb = d.vb_terms_bpd(model(x_t, t), x0, x_t, t)["output"]
    # IDDPM's RESCALED_MSE: the per-step bound term times T / 1000 (= lambda 1e-3 on the full bound).
    torch.testing.assert_close(terms["vb"], vb * (T_big / 1000), **TOL)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"], **TOL)
    torch.testing.assert_close(terms["mse"], mean_flat((model.a * x_t - noise) ** 2), **TOL)


def test_hybrid_vb_sends_no_gradient_to_the_mean():
    d = GaussianDiffusion(cosine_beta_schedule(T), model_var_type="learned_range", loss_type="hybrid")
    x0, noise, t = batch()
    model = SplitModel()
    terms = d.training_losses(model, x0, t, noise=noise)
    ga, gb, gc = torch.autograd.grad(terms["vb"].sum(), [model.a, model.b, model.c], retain_graph=True)
    assert ga == 0  # stop-gradient on the mean: exactly zero
    assert gb != 0 and gc != 0  # the bound trains the variance
    ga, gb, gc = torch.autograd.grad(
        terms["mse"].sum(), [model.a, model.b, model.c], allow_unused=True, materialize_grads=True
    )
    assert ga != 0 and gb == 0 and gc == 0  # L_simple trains only the mean


def test_full_length_respacing_reproduces_the_base_process():
    betas = cosine_beta_schedule(T)
    base = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="hybrid")
    spaced = SpacedDiffusion(space_timesteps(T, [T]), betas, model_var_type="learned_range", loss_type="hybrid")
    for name in [
        "betas",
        "alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "fixed_large_variance",
    ]:
        np.testing.assert_allclose(getattr(spaced, name), getattr(base, name), rtol=1e-10, atol=0, err_msg=name)
    t = torch.arange(T)
    torch.testing.assert_close(spaced.model_timesteps(t), base.model_timesteps(t), rtol=0, atol=0)
    x0, noise, tb = batch()
    model = SplitModel()
    a, b = base.training_losses(model, x0, tb, noise=noise), spaced.training_losses(model, x0, tb, noise=noise)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-10, atol=0)


def test_respaced_process_keeps_marginals_and_original_timesteps():
    betas = linear_beta_schedule(4000)
    kept = sorted(space_timesteps(4000, "ddim10"))
    spaced = SpacedDiffusion(kept, betas, model_var_type="fixed_small")
    np.testing.assert_allclose(spaced.alphas_cumprod, np.cumprod(1 - betas)[kept], rtol=1e-10, atol=0)
    t = torch.arange(10)
    # The model sees the ORIGINAL integer timesteps (with rescale_timesteps too: its wrapper rescales).
    torch.testing.assert_close(spaced.model_timesteps(t), torch.tensor(kept), rtol=0, atol=0)
    raw = SpacedDiffusion(kept, betas, rescale_timesteps=False)
    assert raw.model_timesteps(t).tolist() == kept
