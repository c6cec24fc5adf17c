"""Golden tests: difflora's diffusion against diffusers' own DDPMScheduler and DDIMScheduler.

For each beta_schedule (linear, scaled_linear, squaredcos_cap_v2) and prediction_type (epsilon,
v_prediction): add_noise, the training target, one DDPM step and one DDIM step from the same model
output. diffusers computes its schedule in float32, difflora in float64: they agree to float32
rounding, checked at an absolute tolerance of 1e-5 on unit-scale tensors (TOL).
"""

import numpy as np
import pytest
import torch

from difflora.config.diffusion import DiffusionConfig
from difflora.diffusion import create_diffusion, ddim_step, diffusers_betas, p_sample_step

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
T = 100
SCHEDULES = [("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0.0001, 0.02)]


def _ours(schedule, start, end, prediction, respacing=None):
    cfg = DiffusionConfig(
        steps=T,
        beta_schedule=schedule,
        beta_start=start,
        beta_end=end,
        prediction_type=prediction,
        sigma_small=True,
        rescale_timesteps=False,
    )
    return create_diffusion(cfg, learn_sigma=False, respacing=respacing)


def _theirs(cls, schedule, start, end, prediction, **extra):
    return cls(
        num_train_timesteps=T,
        beta_schedule=schedule,
        beta_start=start,
        beta_end=end,
        prediction_type=prediction,
        clip_sample=False,
        **extra,
    )


@pytest.mark.parametrize(("schedule", "start", "end"), SCHEDULES)
def test_betas_match_diffusers(schedule, start, end):
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule, beta_start=start, beta_end=end)
    np.testing.assert_allclose(diffusers_betas(schedule, T, start, end), theirs.betas.double().numpy(), atol=1e-7)
    # diffusers' linear is NOT IDDPM's (1000/T-scaled) one below T = 1000.
    if schedule == "linear":
        ours = create_diffusion(DiffusionConfig(steps=T), learn_sigma=False)
        assert not np.allclose(ours.betas, theirs.betas.double().numpy())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("schedule", "start", "end"), SCHEDULES)
def test_add_noise_and_targets_match_diffusers(schedule, start, end, prediction):
    ours = _ours(schedule, start, end, prediction)
    theirs = _theirs(diffusers.DDPMScheduler, schedule, start, end, prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 17, 50, 98, 99])
    torch.testing.assert_close(ours.q_sample(x0, t, noise), theirs.add_noise(x0, noise, t), atol=TOL, rtol=0)
    want = noise if prediction == "epsilon" else theirs.get_velocity(x0, noise, t)
    torch.testing.assert_close(ours.prediction_target(x0, t, noise), want, atol=TOL, rtol=0)


class _Fixed(torch.nn.Module):
    """A 'model' that returns a given output whatever it is asked."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, t, **kwargs):
        return self.output


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("schedule", "start", "end"), SCHEDULES)
@pytest.mark.parametrize("step", [90, 0])
def test_one_ddpm_and_one_ddim_step_match_diffusers(schedule, start, end, prediction, step):
    """Ten sampling steps (diffusers' "leading" grid 90, 80, ..., 0 = difflora's ddim10): one step from the same output."""
    g = torch.Generator().manual_seed(1)
    x, out, z = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    ours = _ours(schedule, start, end, prediction, respacing="ddim10")
    index = torch.full((3,), step // 10)
    assert ours.model_timesteps(index).tolist() == [step] * 3

    ddim = _theirs(diffusers.DDIMScheduler, schedule, start, end, prediction)
    ddim.set_timesteps(10)
    want = ddim.step(out, step, x, eta=0.0).prev_sample
    got = ddim_step(ours, _Fixed(out), x, index, clip_denoised=False).sample
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)

    ddpm = _theirs(diffusers.DDPMScheduler, schedule, start, end, prediction, variance_type="fixed_small")
    ddpm.set_timesteps(10)
    # diffusers draws the step's noise from the generator; difflora takes it as an argument.
    want = ddpm.step(out, step, x, generator=torch.Generator().manual_seed(5)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    got = p_sample_step(ours, _Fixed(out), x, index, clip_denoised=False, noise=noise).sample
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize(("schedule", "start", "end"), SCHEDULES)
def test_one_ddpm_step_with_a_learned_variance_matches_diffusers(schedule, start, end):
    """variance_type learned_range: the model's second C channels interpolate the log variance."""
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    out[:, 2:] = out[:, 2:].tanh()  # variance values in [-1, 1]
    cfg = DiffusionConfig(steps=T, beta_schedule=schedule, beta_start=start, beta_end=end, loss="hybrid")
    ours = create_diffusion(cfg, learn_sigma=True, respacing="ddim10")
    ddpm = _theirs(diffusers.DDPMScheduler, schedule, start, end, "epsilon", variance_type="learned_range")
    ddpm.set_timesteps(10)
    want = ddpm.step(out, 50, x, generator=torch.Generator().manual_seed(5)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    got = p_sample_step(ours, _Fixed(out), x, torch.full((3,), 5), clip_denoised=False, noise=noise).sample
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
