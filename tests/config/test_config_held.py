"""Issue 28 class 3: a config value that cannot take effect is an error naming the key (config.hold_fixed),
and what a config (so config.json) records is what runs."""

from __future__ import annotations

import pytest

from difflora.config.schema import DIT_PRESETS, ConfigError, SampleConfig, config_to_dict, parse_config
from difflora.sampling.generate import sampling_settings

DIT = {"model": {"arch": "dit", "dit": {"preset": "DiT-T/4"}}}


def test_a_preset_fills_its_fields_and_the_saved_config_reloads_to_the_same():
    cfg = parse_config(DIT)
    d = cfg.model.dit
    assert (d.depth, d.hidden_size, d.num_heads, d.patch_size) == DIT_PRESETS["DiT-T/4"]
    saved = config_to_dict(cfg)
    assert saved["model"]["dit"]["depth"] == 2  # config.json records what runs, not the class default 12
    assert config_to_dict(parse_config(saved)) == saved


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (
            ["model.dit.depth=5"],
            r"^invalid config:\n  model\.dit\.depth=5 cannot take effect: model\.dit\.preset=DiT-T/4",
        ),
        (
            ["model.dit.patch_size=2"],
            r"model\.dit\.patch_size=2 cannot take effect: model\.dit\.preset=DiT-T/4 holds it at 4",
        ),
        (["model.arch=diffusers", "model.dit.mlp_ratio=2"], r"model\.dit\.preset='DiT-T/4' cannot take effect"),
        (["sample.sampler=ddpm", "sample.eta=1"], r"sample\.eta=1\.0 cannot take effect: sample\.sampler=ddpm"),
        (["train.token_lr=0.1"], r"train\.token_lr=0\.1 cannot take effect"),
    ],
)
def test_values_that_cannot_take_effect_are_refused_naming_the_key(overrides, error):
    with pytest.raises(ConfigError, match=error):
        parse_config(DIT, overrides)


def test_explicit_values_equal_to_what_is_held_are_accepted():
    cfg = parse_config(DIT, ["model.dit.depth=2", "sample.sampler=ddpm", "sample.eta=0", "train.init_weights=ema"])
    assert cfg.model.dit.depth == 2 and cfg.sample.eta == 0.0


def test_a_sampler_change_drops_the_eta_of_the_old_sampler_but_an_explicit_eta_is_refused():
    cfg = parse_config({}, ["sample.sampler=ddim", "sample.eta=0.5"])
    assert sampling_settings(cfg, sampler="ddpm").eta == 0.0
    assert sampling_settings(cfg).eta == 0.5
    with pytest.raises(ValueError, match=r"sample\.eta=0\.5 cannot take effect"):
        sampling_settings(cfg, sampler="ddpm", eta=0.5)
    assert SampleConfig(sampler="ddim", eta=0.3).with_changes({"steps": 3}).eta == 0.3
