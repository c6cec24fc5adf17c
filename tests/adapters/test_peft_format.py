"""peft's on-disk LoRA format: difflora's export loads into peft, peft's LoRA imports into difflora.

The reference is peft itself (``PeftModel.from_pretrained``, ``get_peft_model``, ``merge_and_unload``)
on the same base weights: outputs must agree to one tolerance.
"""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("diffusers")

import peft

from difflora.adapters import IndexWeighting, LinearWeighting, adapter_layers, conditions, inject_adapter
from difflora.adapters.peft_format import PeftFormatError, export_peft, import_peft, merge_and_unload
from difflora.cli.commands import main
from difflora.cli.inputs import run_config
from difflora.model.build import build_model
from difflora.nets.diffusers_wrap import build_diffusers_model
from difflora.train import latest_checkpoint, load_weights

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 8,
}


class Base(nn.Module):
    """A Conv2d (3x3, stride 2), a Conv1d (k = 3) and a Linear: every layer kind both libraries adapt."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.mix = nn.Conv1d(5, 4, 3, padding=1)
        self.proj = nn.Linear(4, 6)

    def forward(self, x):  # [N x 3 x 8 x 8] -> [N x 16 x 6]
        h = self.mix(self.conv(x).flatten(2))
        return self.proj(h.transpose(1, 2))


def _x(n=3):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def _random_b(model, gen_seed=3):
    g = torch.Generator().manual_seed(gen_seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for branch in layer.adapters.values():
                branch.lora_B.copy_(0.1 * torch.randn(branch.lora_B.shape, generator=g))


def _difflora_lora(base):
    """A plain LoRA (a bank of one) on every layer; proj gets another rank and alpha."""
    model = copy.deepcopy(base)
    inject_adapter(model, "lora", lambda: IndexWeighting(1), "lora", ["conv", "mix"], rank=3, alpha=6.0)
    inject_adapter(model, "lora", lambda: IndexWeighting(1), "lora", ["proj"], rank=2, alpha=5.0)
    _random_b(model)
    return model


def test_an_exported_lora_loads_into_peft_and_computes_the_same(tmp_path):
    base = Base()
    model = _difflora_lora(base)
    export_peft(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["rank_pattern"] == {"proj": 2}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    x = _x()
    with torch.no_grad(), conditions(lora=0):
        ours = model(x)
    with torch.no_grad():
        assert (ours - theirs(x)).abs().max() < TOL
        assert (ours - base(x)).abs().max() > 1e-2  # the LoRA does something
        with conditions(lora=-1):  # off per sample: the base exactly
            assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_trained_lora_imports_and_merges_into_a_plain_model(tmp_path, rslora):
    base = Base()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["conv", "mix", "proj"],
        rank_pattern={"proj": 2},
        alpha_pattern={"proj": 5},
        use_rslora=rslora,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    report = import_peft(ours, tmp_path / "peft")
    assert sorted(report.paths) == ["conv", "mix", "proj"]
    assert ours.proj.adapters["lora"].rank == 2
    x = _x()
    with torch.no_grad():
        expected = theirs(x)
        with conditions(lora=0):
            assert (ours(x) - expected).abs().max() < TOL
        plain = merge_and_unload(ours, lora=0)
        assert not [m for m in plain.modules() if type(m).__module__.startswith("difflora")]
        assert type(plain.conv) is nn.Conv2d and type(plain.proj) is nn.Linear
        assert (plain(x) - expected).abs().max() < TOL
        assert (plain(x) - theirs.merge_and_unload()(x)).abs().max() < TOL


def test_a_lora_on_a_diffusers_unet_round_trips_through_peft(tmp_path):
    unet = build_diffusers_model("UNet2DModel", UNET).eval()
    ours = copy.deepcopy(unet)
    inject_adapter(ours, "lora", lambda: IndexWeighting(1), "lora", ["to_q", "to_v", "conv1"], rank=4)
    _random_b(ours)
    export_peft(ours, tmp_path / "lora")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "lora").eval()
    back = copy.deepcopy(unet)
    import_peft(back, tmp_path / "lora")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    with torch.no_grad():
        expected = theirs(x, t).sample
        with conditions(lora=0):
            assert (ours(x, t).sample - expected).abs().max() < TOL
            assert (back(x, t).sample - expected).abs().max() < TOL


def test_what_peft_format_cannot_hold_is_refused_with_the_reason(tmp_path):
    base = Base()
    timed = copy.deepcopy(base)
    inject_adapter(timed, "time", lambda: LinearWeighting(5, 0, 99), "t", ["proj"])
    with pytest.raises(PeftFormatError, match="plain LoRA only"):
        export_peft(timed, tmp_path / "x")
    dora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(PeftFormatError, match="use_dora"):
        import_peft(copy.deepcopy(base), tmp_path / "dora")
    export_peft(_difflora_lora(base), tmp_path / "lora")
    other = nn.Module()
    other.conv, other.mix, other.proj = nn.Conv2d(3, 5, 3), nn.Conv1d(5, 4, 3), nn.Linear(4, 7)
    with pytest.raises(PeftFormatError, match="'proj'.*another base"):
        import_peft(other, tmp_path / "lora")
    assert not list(adapter_layers(other))  # all-or-nothing: nothing was injected
    both = _difflora_lora(base)
    inject_adapter(both, "cls", lambda: IndexWeighting(3), "y", ["proj"])
    with pytest.raises(ValueError, match=r"reading \['y'\]"):
        merge_and_unload(both, lora=0)
    assert list(adapter_layers(both))


def test_difflora_export_peft_writes_a_trained_runs_lora_for_peft(tmp_path, capsys):
    """A plain LoRA fine-tuned with ``difflora train`` (condition ``task``, data.task_id=0), exported
    by the CLI, computes in peft what the run's model computes."""
    tree = {
        "data": {"task_id": 0},
        "model": {
            "arch": "diffusers",
            "learn_sigma": False,
            "diffusers": {"class_name": "UNet2DModel", "config": {k: v for k, v in UNET.items() if "size" not in k}},
            "adapters": [{"name": "lora", "condition": "task", "weighting": "index", "num_values": 1, "rank": 2}],
        },
        "diffusion": {"steps": 50},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "train_base": False, "ckpt_every": 3, "ema_decay": 0},
        "sample": {"num": 2, "steps": 2},
    }
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(tree))
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 0
    assert main(["export-peft", str(run), str(tmp_path / "peft")]) == 0
    assert "wrote a peft LoRA" in capsys.readouterr().out
    state, _ = load_weights(latest_checkpoint(run), "ema")
    model = build_model(run_config(run))
    model.load_state_dict(state)
    unet = model.net.model.eval()
    base = merge_and_unload(copy.deepcopy(unet), task=-1)  # -1: the LoRA off, i.e. the plain base
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        plain = base(x, t).sample
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()  # wraps base in place
    with torch.no_grad(), conditions(task=0):
        ours = unet(x, t).sample
        assert (ours - theirs(x, t).sample).abs().max() < TOL
        assert (ours - plain).abs().max() > 1e-4  # three steps at lr 1e-2 moved B


def test_the_python_examples_of_docs_interop_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "interop.md").read_text(), re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/interop.md", "exec"), {})
    out = capsys.readouterr().out
    assert "8 layers wrapped" in out  # 2 DiT blocks x (to_q, to_k, to_v, to_out.0)
    errors = [float(v) for v in re.findall(r"(?:difflora|merged) vs peft: (\S+)", out)]
    assert len(errors) == 2 and max(errors) < TOL
