"""Beta schedules against their closed forms; timestep respacing; create_diffusion."""

import math
import warnings

import numpy as np
import pytest

from difflora.config.schema import DiffusionConfig
from difflora.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    cosine_beta_schedule,
    create_diffusion,
    get_named_beta_schedule,
    linear_beta_schedule,
    space_timesteps,
)


@pytest.mark.parametrize("T", [1000, 21, 4000, 10])
def test_linear_schedule_closed_form(T):
    # beta_i = (1000/T) * (1e-4 + i * (0.02 - 1e-4) / (T - 1)), written out term by term; capped
    # at 0.999 (binds only for T < 21, where the scaled schedule would exceed 1).
    s = 1000.0 / T
    expected = np.array([min(s * (1e-4 + i * (0.02 - 1e-4) / (T - 1)), 0.999) for i in range(T)])
    np.testing.assert_allclose(linear_beta_schedule(T), expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(get_named_beta_schedule("linear", T), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("T", [1000, 50, 4000])
def test_cosine_schedule_closed_form(T):
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    betas = cosine_beta_schedule(T)
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(get_named_beta_schedule("cosine", T), betas)
    # alpha_bar(t) = f(t)/f(0) wherever the 0.999 cap is inactive (all but the last step).
    abar = np.cumprod(1 - betas)[:-1]
    np.testing.assert_allclose(abar, [f((i + 1) / T) / f(0) for i in range(T - 1)], rtol=1e-9, atol=0)
    # The final step would have beta = 1 (alpha_bar(1) = 0): the cap holds it at 0.999.
    assert betas[-1] == 0.999


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="cosine"):
        get_named_beta_schedule("quadratic", 10)


def test_space_timesteps_ddim_stride():
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))
    assert space_timesteps(4000, "ddim50") == set(range(0, 4000, 80))
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim7")  # no stride gives exactly 7 of 10 steps


def test_space_timesteps_sections_match_evenly_spaced_reference():
    # IDDPM's docstring example: 300 steps, three sections of 100, keep 10 / 15 / 20.
    got = sorted(space_timesteps(300, "10,15,20"))
    expected = []
    for k, count in enumerate([10, 15, 20]):
        expected += list(100 * k + np.round(np.linspace(0, 99, count)).astype(int))
    assert got == expected
    assert space_timesteps(300, [10, 15, 20]) == set(expected)
    # Uneven split: 10 steps in 3 sections of sizes 4, 3, 3.
    assert sorted(space_timesteps(10, "2,1,3")) == [0, 3, 4, 7, 8, 9]
    with pytest.raises(ValueError, match="section of 3"):
        space_timesteps(10, "1,4,1")


def test_space_timesteps_full_and_single_section():
    assert space_timesteps(7, "7") == set(range(7))
    assert sorted(space_timesteps(4000, [5])) == [0, 1000, 2000, 2999, 3999]


def test_create_diffusion_from_config():
    cfg = DiffusionConfig(steps=40, noise_schedule="cosine", loss="hybrid")
    d = create_diffusion(cfg, learn_sigma=True)
    assert type(d) is GaussianDiffusion and d.num_timesteps == 40
    assert d.model_var_type == "learned_range" and d.loss_type == "hybrid" and d.rescale_timesteps
    np.testing.assert_array_equal(d.betas, cosine_beta_schedule(40))

    small = create_diffusion(DiffusionConfig(steps=40, sigma_small=True), learn_sigma=False)
    large = create_diffusion(DiffusionConfig(steps=40, rescale_timesteps=False), learn_sigma=False)
    assert small.model_var_type == "fixed_small" and large.model_var_type == "fixed_large"
    assert not large.rescale_timesteps

    # int N: N evenly spaced steps, first and last included (round(i * 39/4), ties to even);
    # strings follow space_timesteps.
    spaced = create_diffusion(cfg, learn_sigma=True, respacing=5)
    assert isinstance(spaced, SpacedDiffusion) and spaced.num_timesteps == 5
    assert spaced.timestep_map.tolist() == [0, 10, 20, 29, 39] and spaced.original_num_steps == 40
    assert create_diffusion(cfg, True, respacing="ddim4").timestep_map.tolist() == [0, 10, 20, 30]
    with pytest.raises(ValueError, match="1..40"):
        create_diffusion(cfg, True, respacing=41)


def test_mse_with_learned_variance_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_diffusion(DiffusionConfig(steps=10, loss="mse"), learn_sigma=True)
    assert any("no gradient" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="learned_range"):
        create_diffusion(DiffusionConfig(steps=10, loss="hybrid"), learn_sigma=False)
