"""Samplers against diffusers' DDPMScheduler / DDIMScheduler on the same betas, model outputs and
noise (golden values computed on the fly, offline), plus reproducibility and the on_step hook."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from difflora.config.schema import DiffusionConfig
from difflora.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    cosine_beta_schedule,
    create_diffusion,
    ddim_step,
    linear_beta_schedule,
    p_sample_step,
    sample,
    space_timesteps,
)

# diffusers keeps its schedule in float32 (cumulative product included); ours is float64 cast at
# use. 2e-5 covers that rounding over 200 steps; every comparison in this file uses it.
TOL = dict(rtol=2e-5, atol=2e-5)
T = 200
SHAPE = (3, 2, 4, 4)


def inputs(seed, learn_sigma=False):
    g = torch.Generator().manual_seed(seed)
    # x_t spread wider than N(0, 1) and large predicted noise so that clipping x_0 to [-1, 1] bites.
    x = 1.5 * torch.randn(SHAPE, generator=g)
    out = 2.0 * torch.randn(SHAPE, generator=g)
    if learn_sigma:
        out = torch.cat([out, torch.rand(SHAPE, generator=g) * 2 - 1], 1)
    return x, out


def const_model(output):
    return lambda x, t, **kw: output


def ddpm_scheduler(betas, variance_type, n_steps=None, spacing="leading"):
    s = DDPMScheduler(
        num_train_timesteps=len(betas),
        trained_betas=betas.tolist(),
        variance_type=variance_type,
        clip_sample=True,
        clip_sample_range=1.0,
        prediction_type="epsilon",
        timestep_spacing=spacing,
    )
    if n_steps is not None:
        s.set_timesteps(n_steps)
    return s


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_matches_diffusers(var_type):
    betas = linear_beta_schedule(T)
    loss = "hybrid" if var_type == "learned_range" else "mse"
    d = GaussianDiffusion(betas, model_var_type=var_type, loss_type=loss)
    sched = ddpm_scheduler(betas, var_type)
    for k, t in enumerate([T - 1, 120, 7, 1, 0]):
        x, out = inputs(k, learn_sigma=var_type == "learned_range")
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + k))
        ours = p_sample_step(d, const_model(out), x, torch.full((SHAPE[0],), t), noise=noise)
        ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(100 + k))
        torch.testing.assert_close(ours.pred_xstart, ref.pred_original_sample, **TOL)
        torch.testing.assert_close(ours.sample, ref.prev_sample, **TOL)
        assert ours.pred_xstart.abs().max() == 1  # clipping was exercised


def test_respaced_ddpm_step_matches_diffusers_learned_range():
    # create_diffusion(respacing=N) keeps round(linspace(0, T-1, N)): diffusers' "linspace" spacing.
    betas = cosine_beta_schedule(T)
    d = create_diffusion(DiffusionConfig(steps=T, noise_schedule="cosine", loss="hybrid"), True, respacing=10)
    sched = ddpm_scheduler(betas, "learned_range", n_steps=10, spacing="linspace")
    assert sched.timesteps.tolist() == d.timestep_map[::-1].tolist()
    for i in range(d.num_timesteps):
        x, out = inputs(i, learn_sigma=True)
        t_orig = int(d.timestep_map[i])
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        ours = p_sample_step(d, const_model(out), x, torch.full((SHAPE[0],), i), noise=noise)
        ref = sched.step(out, t_orig, x, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(ours.sample, ref.prev_sample, **TOL)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta):
    # "ddimN" keeps range(0, T, T // N): diffusers' "leading" spacing. IDDPM re-derives eps from
    # the clipped x_0: diffusers' use_clipped_model_output=True.
    betas = linear_beta_schedule(T)
    d = SpacedDiffusion(space_timesteps(T, "ddim10"), betas)
    sched = DDIMScheduler(
        num_train_timesteps=T,
        trained_betas=betas.tolist(),
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == d.timestep_map[::-1].tolist()
    for i in range(d.num_timesteps):
        x, out = inputs(i)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        ours = ddim_step(d, const_model(out), x, torch.full((SHAPE[0],), i), eta=eta, noise=noise)
        ref = sched.step(out, int(d.timestep_map[i]), x, eta=eta, use_clipped_model_output=True, variance_noise=noise)
        torch.testing.assert_close(ours.sample, ref.prev_sample, **TOL)


def toy_model(x, t, **kw):
    # A smooth, timestep-dependent stand-in for a network; t is the original integer timestep here.
    return 0.8 * torch.tanh(x) * (1 + t.float().reshape(-1, 1, 1, 1) / T) + 0.1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_full_sampling_loop_matches_diffusers(sampler):
    betas = linear_beta_schedule(T)
    d = SpacedDiffusion(space_timesteps(T, "ddim20"), betas, model_var_type="fixed_small", rescale_timesteps=False)
    ours = sample(d, toy_model, SHAPE, generator=torch.Generator().manual_seed(0), sampler=sampler, eta=0.0)

    if sampler == "ddpm":
        sched = ddpm_scheduler(betas, "fixed_small", n_steps=20)
    else:
        sched = DDIMScheduler(
            num_train_timesteps=T,
            trained_betas=betas.tolist(),
            clip_sample=True,
            set_alpha_to_one=True,
            steps_offset=0,
            timestep_spacing="leading",
        )
        sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)  # x_T first, then each step's noise: the same stream order
    for t in sched.timesteps:
        out = toy_model(x, torch.full((SHAPE[0],), int(t)))
        kw = dict(use_clipped_model_output=True) if sampler == "ddim" else {}
        x = sched.step(out, int(t), x, generator=g, **kw).prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1), **TOL)


def test_ddim_eta_one_is_the_ddpm_posterior_step():
    # DDIM paper: eta = 1 gives DDPM's fixed-small reverse process (with clipping too). Two
    # algebraic forms of one quantity, so float64 and a tight tolerance.
    d = GaussianDiffusion(cosine_beta_schedule(T), model_var_type="fixed_small")
    x, out = (v.double() for v in inputs(3))
    noise = torch.randn(SHAPE, dtype=torch.float64)
    for t in [T - 1, 50, 1, 0]:
        tt = torch.full((SHAPE[0],), t)
        a = ddim_step(d, const_model(out), x, tt, eta=1.0, noise=noise).sample
        b = p_sample_step(d, const_model(out), x, tt, noise=noise).sample
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_sample_is_reproducible_and_in_range():
    d = create_diffusion(DiffusionConfig(steps=50), learn_sigma=False)
    run = lambda seed, s: sample(d, toy_model, SHAPE, generator=torch.Generator().manual_seed(seed), sampler=s, eta=0.3)
    for s in ["ddpm", "ddim"]:
        a, b, c = run(1, s), run(1, s), run(2, s)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, c)
        assert a.abs().max() <= 1 and torch.isfinite(a).all()


def test_on_step_runs_before_each_model_call_with_model_timesteps():
    d = create_diffusion(DiffusionConfig(steps=400), learn_sigma=False, respacing=5)
    events = []

    def model(x, t, y=None):
        events.append(("model", t.clone(), y))
        return torch.zeros_like(x)

    sample(
        d,
        model,
        SHAPE,
        generator=torch.Generator().manual_seed(0),
        sampler="ddim",
        model_kwargs={"y": "label"},
        on_step=lambda t: events.append(("step", t.clone(), None)),
    )
    assert [e[0] for e in events] == ["step", "model"] * 5
    expected = [399, 299, 200, 100, 0]  # original integer timesteps (rescale_timesteps: the wrapper's)
    for i, k in enumerate(expected):
        torch.testing.assert_close(events[2 * i][1], torch.full((SHAPE[0],), k), rtol=0, atol=0)
        torch.testing.assert_close(events[2 * i + 1][1], events[2 * i][1], rtol=0, atol=0)
        assert events[2 * i + 1][2] == "label"


def test_respaced_learned_variance_sampling_runs():
    # A T = 4000 learned-variance process sampled in 10 steps; the model is called 10 times.
    d = create_diffusion(DiffusionConfig(steps=4000, loss="hybrid"), learn_sigma=True, respacing=10)
    calls = []

    def model(x, t):
        calls.append(t[0].item())
        return torch.cat([0.5 * torch.tanh(x), torch.tanh(x + t.reshape(-1, 1, 1, 1) / 1000)], 1)

    for s in ["ddpm", "ddim"]:
        calls.clear()
        out = sample(d, model, SHAPE, generator=torch.Generator().manual_seed(0), sampler=s, progress=True)
        assert len(calls) == 10 and calls[0] == 3999 and calls[-1] == 0
        assert out.shape == SHAPE and torch.isfinite(out).all() and out.abs().max() <= 1


def test_full_length_respacing_samples_like_the_base_process():
    betas = linear_beta_schedule(30)
    base = GaussianDiffusion(betas, model_var_type="learned_range", loss_type="hybrid")
    spaced = SpacedDiffusion(range(30), betas, model_var_type="learned_range", loss_type="hybrid")

    def model(x, t):
        return torch.cat([toy_model(x, t), torch.tanh(x)], 1)

    a = sample(base, model, SHAPE, generator=torch.Generator().manual_seed(0))
    b = sample(spaced, model, SHAPE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, **TOL)
    np.testing.assert_array_equal(spaced.timestep_map, np.arange(30))


def test_sample_rejects_unknown_sampler():
    d = GaussianDiffusion(linear_beta_schedule(30))
    with pytest.raises(ValueError, match="ddim"):
        sample(d, toy_model, SHAPE, generator=torch.Generator(), sampler="euler")
