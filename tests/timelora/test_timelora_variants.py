"""000's model variants from config: train a few steps with label dropout, checkpoint, sample with guidance.

Variants (tiny configs on 8x8 digits): U-Net and DiT with TimeLoRA replacing the time embedding
(class embedding kept), with TimeLoRA and ClassLoRA replacing both embeddings, and the U-Net of
000 section 5.3 (time embedding kept, TimeLoRA added).
"""

import math

import pytest
import torch

from difflora.cli.commands import main
from difflora.model.build import build_model
from difflora.train import train

VARIANTS = {  # name: the preset and its overrides
    "unet-tlora": ("tiny-timelora-unet",),
    "unet-tclora": ("tiny-tclora-unet",),
    "unet-time-embed+tlora": ("tiny-timelora-unet", "model.time_embed=true"),
    "dit-tlora": ("tiny-timelora-dit",),
    "dit-tclora": ("tiny-tclora-dit",),
}
# label_dropout 0.5: with batch 8 both conditional and null labels occur in each step.
SHORT = ["train.steps=3", "train.batch_size=8", "train.ckpt_every=3", "train.label_dropout=0.5"]
SHORT += ["sample.num=2", "sample.steps=2"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_trains_checkpoints_and_samples_with_guidance(name, tmp_path, capsys, tiny_config):
    cfg = tiny_config(*VARIANTS[name], *SHORT)
    out = tmp_path / "run"
    result = train(cfg, out, progress=False, log=lambda s: None)
    assert result["step"] == 3 and math.isfinite(result["last"]["loss"])
    assert (out / "checkpoints" / "step_0000003").is_dir()
    png = tmp_path / "g.png"
    argv = ["sample", str(out), "--num", "4", "--steps", "2", "--guidance", "2", "--out", str(png), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _names(model):
    return [n for n, _ in model.named_parameters()]


def test_unet_variants_have_the_right_embeddings(tiny_config):
    tlora = build_model(tiny_config(*VARIANTS["unet-tlora"], *SHORT))
    tclora = build_model(tiny_config(*VARIANTS["unet-tclora"], *SHORT))
    both = build_model(tiny_config(*VARIANTS["unet-time-embed+tlora"], *SHORT))
    assert not any("time_embed" in n for n in _names(tlora)) and any("label_emb" in n for n in _names(tlora))
    assert not any(k in n for n in _names(tclora) for k in ("time_embed", "label_emb", "emb_layers"))
    assert any("time_embed" in n for n in _names(both)) and any(".adapters.time." in n for n in _names(both))
    # The class adapter sits next to the time adapter in the same wrappers.
    assert any(".adapters.cls.lora_A" in n for n in _names(tclora))


def test_tclora_unet_output_depends_on_t_and_y_only_through_the_adapters(tiny_config):
    torch.manual_seed(0)
    model = build_model(tiny_config(*VARIANTS["unet-tclora"], *SHORT)).eval()
    x = torch.randn(2, 1, 8, 8)
    # Original timesteps 5 and 90 lie in different bases of the onehot table (bases every 10 steps).
    t, late = torch.tensor([5, 5]), torch.tensor([90, 90])
    y = torch.tensor([1, -1])
    with torch.no_grad():
        # Fresh adapters (B = 0): neither t nor y may change anything yet.
        ref = model(x, t, y)
        assert torch.equal(model(x, late, torch.tensor([7, 3])), ref)
        # Give every zero-initialised tensor (lora_B, the U-Net's zero_module outputs) values.
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
        assert not torch.allclose(model(x, late, y), model(x, t, y))
        changed = model(x, t, torch.tensor([7, -1]))
        # ClassLoRA: sample 0's class changed; sample 1 is null in both calls, so it is unchanged.
        assert not torch.allclose(changed[0], model(x, t, y)[0]) and torch.equal(changed[1], model(x, t, y)[1])


@pytest.mark.parametrize("name, sees_class", [("dit-tclora", False), ("dit-tlora", True)])
def test_dit_adaln_input_without_time_embedding(name, sees_class, tiny_config):
    torch.manual_seed(0)
    net = build_model(tiny_config(*VARIANTS[name], *SHORT)).net
    assert net.t_embedder is None
    y = torch.tensor([0, 3, -1])
    c_early = net.condition(torch.tensor([0, 50, 99]), y, 3, torch.float32)
    c_late = net.condition(torch.tensor([99, 0, 50]), y, 3, torch.float32)
    assert torch.equal(c_early, c_late)  # adaLN never sees t
    if sees_class:
        assert torch.equal(c_early, net.y_embedder(y))  # the class embedding alone (null row for -1)
    else:
        assert torch.equal(c_early, torch.zeros(3, net.hidden_size))  # adaLN = its learned bias
