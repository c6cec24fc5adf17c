"""train() on a model the user built (issue 29, item 6), and difflora.open_run on a pretrained base."""

import pytest
import torch

import difflora
from difflora.config.schema import parse_config
from difflora.model.build import DiffusionModel
from difflora.nets.diffusers_wrap import DiffusersNet
from difflora.train import latest_checkpoint, load_checkpoint, train
from pretrained_folders import STEPS, unet_pipeline

diffusers = pytest.importorskip("diffusers")

QUIET = {"progress": False, "log": lambda s: None}
LORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": STEPS, "num_bases": 3, "rank": 2}


def _cfg(folder, **train_keys):
    tree = {
        "data": {"limit": 32},
        "model": {"pretrained": str(folder), "adapters": [LORA]},
        "train": {"train_base": False, "steps": 2, "batch_size": 4, "ckpt_every": 2} | train_keys,
    }
    return parse_config(tree)


@pytest.mark.parametrize("wrap", ["raw", "net", "model"])
def test_train_takes_a_from_pretrained_model_and_open_run_reopens_it(tmp_path, wrap):
    folder = unet_pipeline(tmp_path / "pipe")
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet")
    # However it is wrapped, the timestep convention is the diffusion's (here diffusers' integer t),
    # also over a DiffusionModel built with another one.
    given = {"raw": unet, "net": DiffusersNet(unet), "model": DiffusionModel(DiffusersNet(unet), rescale_steps=STEPS)}
    train(_cfg(folder), tmp_path / "run", model=given[wrap], **QUIET)
    cfg, model, meta = difflora.open_run(tmp_path / "run")
    assert model.rescale_steps is None and meta["base"]["format"] == "diffusers"
    for key, value in diffusers.UNet2DModel.from_pretrained(folder / "unet").state_dict().items():
        plain = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
        assert torch.equal(plain[f"net.model.{key}"], value), key
    trained = load_checkpoint(latest_checkpoint(tmp_path / "run")).model
    assert trained and all(".adapters." in k for k in trained)
    x = torch.randn(2, 1, 8, 8)
    assert model(x, torch.tensor([3, 97])).shape == x.shape


def test_a_model_that_does_not_fit_the_config_is_refused_before_anything_is_written(tmp_path):
    folder = unet_pipeline(tmp_path / "pipe")
    other = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], norm_num_groups=4,
        down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"the model given does not fit the config's model section .*model\.pretrained"
    ):
        train(_cfg(folder), tmp_path / "run", model=other, **QUIET)
    assert not (tmp_path / "run").exists()
