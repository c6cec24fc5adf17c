"""``difflora export RUN --to FORMAT OUT --condition NAME=V`` on a trained TimeLoRA run of a diffusers
UNet2DModel: each format, loaded by the stack it is for, computes what the run computes at that t."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

pytest.importorskip("peft")
pytest.importorskip("diffusers")

import diffusers
import peft
from diffusers.loaders import PeftAdapterMixin

from difflora.adapters import conditions
from difflora.adapters.peft_format import merge_and_unload
from difflora.cli.commands import main
from difflora.cli.inputs import run_config
from difflora.model.build import build_model
from difflora.train import latest_checkpoint, load_weights

TOL = 1e-5
UNET = {
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 8,
}
TIMELORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": 51, "num_bases": 6, "rank": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three training steps of TimeLoRA on to_q/to_v of a frozen diffusers UNet2DModel (lr 1e-2 moves B)."""
    root = tmp_path_factory.mktemp("export")
    tree = {
        "model": {
            "arch": "diffusers",
            "learn_sigma": False,
            "diffusers": {"class_name": "UNet2DModel", "config": UNET},
            "adapters": [{**TIMELORA, "targets": ["to_q", "to_v"]}],
        },
        "diffusion": {"steps": 50},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "train_base": False, "ckpt_every": 3, "ema_decay": 0},
        "sample": {"num": 2, "steps": 2},
    }
    (root / "time.yaml").write_text(yaml.safe_dump(tree))
    assert main(["train", str(root / "time.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def run_unet(run_dir):
    state, _ = load_weights(latest_checkpoint(run_dir), "ema")
    model = build_model(run_config(run_dir))
    model.load_state_dict(state)
    return model.net.model.eval()


@pytest.mark.parametrize("to", ["peft", "diffusers-lora", "diffusers"])
def test_each_export_format_computes_the_run_at_its_t(run, tmp_path, capsys, to):
    out = tmp_path / "out"
    assert main(["export", str(run), "--to", to, str(out), "--condition", "t=33"]) == 0
    assert f"wrote {to} export at t=33" in capsys.readouterr().out
    unet = run_unet(run)
    base = merge_and_unload(copy.deepcopy(unet), t=float("nan"))  # the frozen base the run adapted
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        plain = base(x, t).sample
    if to == "peft":
        theirs = peft.PeftModel.from_pretrained(base, out)
    elif to == "diffusers-lora":  # diffusers' reader; UNet2DModel lacks its mixin in diffusers 0.42
        theirs = type("LoraUNet2DModel", (diffusers.UNet2DModel, PeftAdapterMixin), {}).from_config(base.config)
        theirs.load_state_dict(base.state_dict())
        theirs.load_lora_adapter(out, prefix="unet", use_safetensors=True)
    else:
        theirs = diffusers.UNet2DModel.from_pretrained(out)
    with torch.no_grad(), conditions(t=torch.full((2,), 33)):
        ours = unet(x, t).sample
    with torch.no_grad():
        got = theirs.eval()(x, t).sample
    assert float((got - ours).abs().max() / ours.abs().max()) < TOL
    assert (ours - plain).abs().max() > 1e-5  # three steps at lr 1e-2 moved B


def test_export_names_missing_conditions_and_export_peft_says_it_is_deprecated(run, tmp_path, capsys):
    assert main(["export", str(run), "--to", "diffusers", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: the adapters read condition(s) t: give a value for each (--condition t=VALUE" in err
    assert not (tmp_path / "out").exists()
    assert main(["export-peft", str(run), str(tmp_path / "peft")]) == 2  # TimeLoRA is no plain LoRA
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: export-peft is deprecated: use `difflora export")
    assert "plain LoRA only" in err[1]
