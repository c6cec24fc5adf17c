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
from difflora.config.schema import parse_config
from difflora.diffusion import create_diffusion, ddim_step, diffusers_betas, p_sample_step

diffusers = pytest.importorskip("diffusers")
from pretrained_folders import unet_pipeline  # noqa: E402  (it needs diffusers)

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


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_steps_offset_one_matches_diffusers_ddim_and_ddpm(eta):
    """Stable Diffusion's schedulers: T = 1000, scaled_linear, steps_offset 1 ("leading" grid 901, 801, ..., 1).

    difflora's ddim10 grid is shifted by diffusion.steps_offset: the same timesteps as set_timesteps(10),
    and every step from the same output as diffusers' (set_alpha_to_one, so the last step ends at x_0 in both)."""
    cfg = DiffusionConfig(
        steps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        sigma_small=True, rescale_timesteps=False,
    )  # fmt: skip
    ours = create_diffusion(cfg, learn_sigma=False, respacing="ddim10")
    extra = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)
    ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=True, **extra)
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small", **extra)
    for scheduler in (ddim, ddpm):
        scheduler.set_timesteps(10)
        assert scheduler.timesteps.tolist() == ours.timestep_map[::-1].tolist() == list(range(901, 0, -100))
    g = torch.Generator().manual_seed(3)
    for i in range(10):
        x, out, z = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
        index, step = torch.full((3,), i), int(ours.timestep_map[i])
        want = ddim.step(out, step, x, eta=eta, variance_noise=z).prev_sample
        got = ddim_step(ours, _Fixed(out), x, index, eta=eta, clip_denoised=False, noise=z).sample
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
        want = ddpm.step(out, step, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        got = p_sample_step(ours, _Fixed(out), x, index, clip_denoised=False, noise=noise).sample
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_a_pipelines_steps_offset_is_read_and_a_grid_past_the_last_timestep_is_refused(tmp_path):
    folder = unet_pipeline(tmp_path / "pipe", steps_offset=1)
    cfg = parse_config({"data": {"name": "digits"}, "model": {"pretrained": str(folder)}})
    assert cfg.diffusion.steps_offset == 1
    assert create_diffusion(cfg.diffusion, False, respacing="ddim4").timestep_map.tolist() == [1, 26, 51, 76]
    with pytest.raises(ValueError, match="steps_offset 1 would reach timestep 100, past the last one"):
        create_diffusion(cfg.diffusion, False, respacing="ddim100")
    # The DDPM sampler's evenly spaced grid (diffusers' "linspace") has no offset, as in diffusers.
    assert create_diffusion(cfg.diffusion, False, respacing=4).timestep_map.tolist() == [0, 33, 66, 99]
