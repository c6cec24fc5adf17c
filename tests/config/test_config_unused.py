"""Issue 28 class 14 and the known gaps in the config: a section or key the run cannot use, set
explicitly, is refused (config.hold_fixed); switching the arch by an override leaves the file's
backbone behind; saved configs of older runs, which record every section, still load."""

from __future__ import annotations

import pytest

from difflora.config.schema import ConfigError, config_to_dict, parse_config, parse_saved_config

UNET = {"model": {"arch": "unet", "unet": {"model_channels": 16, "channel_mult": [1, 2]}}}


@pytest.mark.parametrize(
    ("tree", "overrides", "error"),
    [
        (
            {"model": {"arch": "dit", "unet": {"model_channels": 16}}},
            [],
            r"model\.unet\.model_channels=16 cannot take effect: model\.arch=dit",
        ),
        (UNET, ["model.dit.depth=3"], r"model\.dit\.depth=3 cannot take effect: model\.arch=unet holds it at 12"),
        ({}, ["distill.rank=4"], r"distill\.rank=4 cannot take effect: train\.objective=diffusion"),
        ({}, ["model.context.dim=8"], r"model\.context\.dim=8 cannot take effect: model\.attention=self"),
        ({}, ["sample.steps=2000"], r"sample\.steps \(2000\) exceeds diffusion\.steps \(1000\)"),
    ],
)
def test_a_setting_the_run_cannot_use_is_refused_naming_it(tree, overrides, error):
    with pytest.raises(ConfigError, match=error):
        parse_config(tree, overrides)


def test_switching_the_arch_by_an_override_drops_the_files_backbone_section():
    cfg = parse_config(UNET, ["model.arch=dit", "model.dit.preset=DiT-T/2"])
    assert cfg.model.arch == "dit" and cfg.model.unet.model_channels == 128  # held at its default
    back = parse_config({"model": {"arch": "dit", "dit": {"preset": "DiT-T/2"}}}, ["model.arch=unet"])
    assert back.model.dit.preset is None
    # An override of the other section next to the switch is still an explicit value.
    with pytest.raises(ConfigError, match=r"model\.unet\.num_res_blocks=1 cannot take effect"):
        parse_config(UNET, ["model.arch=dit", "model.unet.num_res_blocks=1"])


def test_unused_defaults_are_held_and_context_settings_apply_under_cross_attention():
    cfg = parse_config({"diffusion": {"steps": 20}})
    assert cfg.sample.steps == 20  # the default 50 held at the process's 20 steps
    assert parse_config({}, ["model.attention=cross", "model.context.dim=8"]).model.context.dim == 8


def test_a_saved_config_recording_sections_its_mode_did_not_use_still_loads():
    # What an older run saved after `--set model.arch=dit` on a U-Net preset, with a distill section it ignored.
    saved = config_to_dict(parse_config({"model": {"arch": "dit", "dit": {"preset": "DiT-T/2"}}}))
    saved["model"]["unet"]["model_channels"] = 16
    saved["distill"]["rank"] = 4
    with pytest.raises(ConfigError):
        parse_config(saved)
    cfg = parse_saved_config(saved)
    assert cfg.model.unet.model_channels == 128 and cfg.distill.rank == 8  # what ran: defaults, unused
    assert config_to_dict(parse_saved_config(config_to_dict(cfg))) == config_to_dict(cfg)
