"""Config loading: defaults, overrides, presets and the errors a user sees."""

import pytest

from difflora.config.schema import ConfigError, load_config, parse_config, parse_override
from difflora.presets import CONFIGS_DIR

CONFIGS = CONFIGS_DIR


def test_every_preset_loads():
    paths = sorted(CONFIGS.rglob("*.yaml"))
    assert len(paths) >= 5
    for p in paths:
        load_config(p)


def test_overrides_are_typed_and_nested():
    cfg = load_config(CONFIGS / "digits.yaml", ["train.lr=2e-4", "model.unet.channel_mult=[1,2,2]", "data.hflip=true"])
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.model.unet.channel_mult == [1, 2, 2]
    assert cfg.data.hflip is True


def test_shape_is_filled_from_the_data():
    cfg = parse_config({"data": {"name": "fashion-mnist", "image_size": 16}})
    assert (cfg.model.image_size, cfg.model.in_channels) == (16, 1)
    cfg = parse_config({"data": {"name": "cifar10"}})
    assert (cfg.model.image_size, cfg.model.in_channels) == (32, 3)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.lrr=1"], "train.lrr: unknown key (did you mean 'lr'?)"),
        (["train.lr=fast"], "train.lr: input should be a valid number"),
        (["train.steps=0"], "train.steps: input should be greater than or equal to 1"),
        (["diffusion.noise_schedule=quadratic"], "diffusion.noise_schedule: input should be 'linear' or 'cosine'"),
        (["model.learn_sigma=false", "diffusion.loss=hybrid"], "needs model.learn_sigma=true"),
        (["model.image_size=16"], "model.image_size (16) differs from the data's image size (8)"),
        (["data.name=imagenet"], "data.name: input should be"),
        (["train"], "not of the form key=value"),
        (["train.lr.x=1"], "'lr' is a value, not a section"),
    ],
)
def test_bad_configs_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny-unet.yaml", overrides)
    assert needle in str(err.value)


def test_missing_file_points_at_presets(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_scientific_notation_is_a_number():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("data.root=/tmp/x.y") == ("data.root", "/tmp/x.y")
