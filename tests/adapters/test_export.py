"""Export at fixed conditions (issue 30): every format round-trips against the model it came from.

References are the readers of the other stacks, on the same base weights: peft
(``PeftModel.from_pretrained``), diffusers (``load_lora_adapter`` on UNet2DModel,
UNet2DConditionModel and DiTTransformer2DModel; ``from_pretrained`` for a merged model), and
diffusers' own writers (``save_lora_adapter``, ``save_lora_weights``) for import. Outputs agree
within 1e-5 relative to the output's largest magnitude.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("diffusers")

import diffusers
import peft
from diffusers.loaders import PeftAdapterMixin
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from difflora.adapters import (
    IndexWeighting,
    LinearWeighting,
    adapter_layers,
    conditions,
    delete_adapter,
    inject_adapter,
    inject_position_adapter,
)
from difflora.adapters.lora_export import ExportError, export_lora, fixed_loras
from difflora.adapters.peft_format import DIFFUSERS_WEIGHTS, import_peft, merge_and_unload
from difflora.model.build import build_model
from difflora.model.export import save_merged
from difflora.nets.diffusers_wrap import build_diffusers_model
from helpers import TINY_ARCH, tiny_config

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
COND_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
    "cross_attention_dim": 6,
}
DIT = {
    "num_attention_heads": 2,
    "attention_head_dim": 4,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
    "norm_num_groups": 4,
}
TARGETS = ["to_q", "to_v", "to_out.0"]


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def randomize_updates(model: nn.Module, seed: int = 3) -> None:
    """Nonzero B (and scale, shift): zero-initialised adapters would export nothing worth checking."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for branch in layer.adapters.values():
                for name in branch.bank_names:
                    if name in ("lora_B", "scale", "shift", "lora_s"):
                        p = getattr(branch, name)
                        p.copy_(0.1 * torch.randn(p.shape, generator=g))


def time_and_class(base: nn.Module, targets=TARGETS) -> nn.Module:
    """TimeLoRA (5 bases over t in 0..99, rank 2, alpha 3) and ClassLoRA (rank 3) on the same layers."""
    model = copy.deepcopy(base)
    inject_adapter(model, "time", lambda: LinearWeighting(5, 0, 99), "t", targets, rank=2, alpha=3.0)
    inject_adapter(model, "cls", lambda: IndexWeighting(3), "y", targets[:1], rank=3)
    randomize_updates(model)
    return model


def with_mixin(base: nn.Module) -> nn.Module:
    """``base``'s class with diffusers' PeftAdapterMixin (diffusers 0.42 gives it to UNet2DConditionModel
    only), same config and weights: diffusers' own ``load_lora_adapter`` then reads the file."""
    cls = type(f"Lora{type(base).__name__}", (type(base), PeftAdapterMixin), {})
    model = cls.from_config(base.config)
    model.load_state_dict(base.state_dict())
    return model.eval()


def run_unet(model, x, t, **_):
    return model(x, t).sample


def run_cond_unet(model, x, t, ctx=None):
    return model(x, t, encoder_hidden_states=ctx).sample


def run_dit(model, x, t, labels=None):
    return model(x, timestep=t, class_labels=labels).sample


x8 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
steps = torch.tensor([3, 70])


@pytest.mark.parametrize("t", [0, 24, 37, 50, 99])
def test_timelora_exports_at_several_t_equal_difflora_at_those_t(tmp_path, t):
    """peft and diffusers' load_lora_adapter compute what difflora computes at (t, y); the LoRA of a
    layer holds the 2 bases TimeLoRA mixes between basis times (1 on a basis time) plus ClassLoRA's."""
    base = build_diffusers_model("UNet2DModel", UNET).eval()
    ours = time_and_class(base)
    export_lora(ours, tmp_path / "peft", "peft", t=t, y=1)
    export_lora(ours, tmp_path / "dl", "diffusers-lora", prefix="unet", t=t, y=1)
    on_basis = t in (0, 99)  # bases at 0, 24.75, 49.5, 74.25, 99
    ranks = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert ranks["r"] == (2 if on_basis else 4)  # time-only layers: rank r on a basis, 2r between
    with torch.no_grad(), conditions(t=torch.full((2,), t), y=torch.ones(2, dtype=torch.long)):
        expected = ours(x8, steps).sample
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    loader = with_mixin(base)
    loader.load_lora_adapter(tmp_path / "dl", prefix="unet", use_safetensors=True)
    with torch.no_grad():
        assert rel(theirs(x8, steps).sample, expected) < TOL
        assert rel(loader(x8, steps).sample, expected) < TOL
        assert (expected - base(x8, steps).sample).abs().max() > 1e-3  # the adapters do something


@pytest.mark.parametrize("kind", ["UNet2DConditionModel", "DiTTransformer2DModel"])
def test_diffusers_lora_loads_into_the_conditional_unet_and_the_dit(tmp_path, kind):
    config, run = (COND_UNET, run_cond_unet) if kind == "UNet2DConditionModel" else (DIT, run_dit)
    base = build_diffusers_model(kind, config).eval()
    ours = time_and_class(base)
    prefix = "unet" if kind.startswith("UNet") else "transformer"
    export_lora(ours, tmp_path / "dl", "diffusers-lora", prefix=prefix, t=60, y=2)
    loader = copy.deepcopy(base) if kind == "UNet2DConditionModel" else with_mixin(base)
    loader.load_lora_adapter(tmp_path / "dl", prefix=prefix, use_safetensors=True)  # UNet2DConditionModel's own loader
    extra = {"ctx": torch.randn(2, 3, 6)} if kind.startswith("UNet") else {"labels": torch.tensor([1, 4])}
    with torch.no_grad(), conditions(t=torch.full((2,), 60), y=torch.full((2,), 2)):
        expected = run(ours, x8, steps, **extra)
    with torch.no_grad():
        assert rel(run(loader, x8, steps, **extra), expected) < TOL
        merged = merge_and_unload(copy.deepcopy(ours), t=60, y=2)
        assert rel(run(merged, x8, steps, **extra), expected) < TOL


def test_a_merged_diffusers_model_loads_with_from_pretrained(tmp_path):
    """Low-rank, weight-scale and bias-shift adapters merge into the weights; the saved model loads
    offline with its class's from_pretrained and computes what difflora does at those conditions."""
    base = build_diffusers_model("UNet2DModel", UNET).eval()
    ours = time_and_class(base)
    inject_adapter(ours, "sc", lambda: IndexWeighting(2), "task", ["to_q", "conv1"], form="scale")
    inject_adapter(ours, "sh", lambda: IndexWeighting(2), "task", ["to_v", "conv2"], form="shift")
    randomize_updates(ours, seed=7)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    save_merged(ours, tmp_path / "unet", t=40, y=0, task=1)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())  # ours is unchanged
    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    assert not [m for m in loaded.modules() if type(m).__module__.startswith("difflora")]
    with torch.no_grad(), conditions(t=torch.full((2,), 40), y=torch.zeros(2, dtype=torch.long), task=torch.ones(2)):
        expected = ours(x8, steps).sample
    with torch.no_grad():
        assert rel(loaded(x8, steps).sample, expected) < TOL
    with pytest.raises(ExportError, match=r"'sc' \(form scale.*LoRA file cannot hold"):
        export_lora(ours, tmp_path / "lora", "peft", t=40, y=0, task=1)
    export_lora(ours, tmp_path / "lora", "peft", t=40, y=0, task=-1)  # scale and shift at no update: fine


def test_a_plain_lora_keeps_rank_and_alpha_and_imports_back_from_the_diffusers_file(tmp_path):
    base = build_diffusers_model("UNet2DModel", UNET).eval()
    ours = copy.deepcopy(base)
    inject_adapter(ours, "lora", lambda: IndexWeighting(1), "lora", ["to_q", "conv1"], rank=3, alpha=6.0)
    randomize_updates(ours)
    layers = fixed_loras(ours, lora=0)
    assert {(p, v.rank, v.alpha) for p, v in layers.items()} >= {("mid_block.attentions.0.to_q", 3, 6.0)}
    path = export_lora(ours, tmp_path / "dl", "diffusers-lora", prefix="unet", lora=0)
    assert path.name == DIFFUSERS_WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        assert all(k.startswith("unet.") and ".lora_" in k for k in f.keys())
    back = copy.deepcopy(base)
    report = import_peft(back, tmp_path / "dl")  # the prefix "unet" is found from the keys
    assert sorted(report.paths) == sorted(layers)
    with torch.no_grad(), conditions(lora=0):
        assert rel(back(x8, steps).sample, ours(x8, steps).sample) < TOL


@pytest.mark.parametrize("writer", ["save_lora_adapter", "save_lora_weights"])
def test_diffusers_own_lora_files_import(tmp_path, writer):
    """Files diffusers writes: a model's save_lora_adapter (no prefix) and a pipeline's save_lora_weights
    (keys and config under ``unet.``), rank and alpha from the header."""
    base = build_diffusers_model("UNet2DConditionModel", COND_UNET).eval()
    theirs = copy.deepcopy(base)
    theirs.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=2, target_modules=["to_k", "to_out.0"], rank_pattern={"to_k": 2})
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    if writer == "save_lora_adapter":
        theirs.save_lora_adapter(tmp_path / "lora")
    else:
        meta = theirs.peft_config["default"].to_dict()
        diffusers.StableDiffusionPipeline.save_lora_weights(
            tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(theirs), unet_lora_adapter_metadata=meta
        )
    ours = copy.deepcopy(base)
    import_peft(ours, tmp_path / "lora")
    ctx = torch.randn(2, 3, 6)
    with torch.no_grad(), conditions(lora=0):
        assert rel(run_cond_unet(ours, x8, steps, ctx), run_cond_unet(theirs, x8, steps, ctx)) < TOL


# ------------------------------------------------------------------------------ refusals


def tiny_dit_with_everything():
    """difflora's DiT-T/2 with a low-rank, a lowrank_act and a position adapter (blocks with taps)."""
    model = build_model(tiny_config("tiny-unet", TINY_ARCH["dit"]))
    net = model.net.eval()
    inject_adapter(net, "time", lambda: LinearWeighting(3, 0, 99), "t", ["attn.qkv"], rank=2)
    inject_adapter(net, "act", lambda: IndexWeighting(2), "task", ["mlp.fc1"], form="lowrank_act", activation="relu")
    inject_position_adapter(net, "pa", lambda: IndexWeighting(2), "task", ["blocks.0"], "attn_out", "mlp_in", 3, "silu")
    randomize_updates(net)
    with torch.no_grad():
        for p in net.blocks[0].position_adapters["pa"].parameters():
            p.normal_(0, 0.1)
    return net


def test_what_no_lora_holds_is_refused_by_name_and_nothing_is_written(tmp_path):
    net = tiny_dit_with_everything()
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"earlier export")
    for to in ("peft", "diffusers-lora"):
        with pytest.raises(ExportError) as info:
            export_lora(net, out, to, t=50, task=1)
        message = str(info.value)
        assert "'act' (form lowrank_act" in message and "not linear in x" in message
        assert "'pa' (position adapter attn_out->mlp_in" in message and "nothing was written" in message
    with pytest.raises(
        ExportError, match=r"a merged model cannot hold adapter 'pa' \(position.*'act' \(form lowrank_act"
    ):
        save_merged(net, out, t=50, task=1)
    with pytest.raises(ExportError, match=r"condition\(s\) task: give a value"):
        export_lora(net, out, "peft", t=50)
    with pytest.raises(ExportError, match=r"no adapter reads condition\(s\) guidance"):
        export_lora(net, out, "peft", t=50, task=1, guidance=2.0)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_bytes() == b"earlier export"
    export_lora(net, out, "peft", t=50, task=-1)  # lowrank_act and position adapter at no update: exact


# ------------------------------------------------------------------ no update, delete_adapter


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_merge_and_unload_at_the_no_update_value_is_the_base_model_bit_for_bit():
    torch.manual_seed(1)
    base = build_model(tiny_config("tiny-unet", TINY_ARCH["dit"])).net.eval()
    torch.manual_seed(1)
    net = tiny_dit_with_everything()
    merged = merge_and_unload(net, t=float("nan"), task=-1)
    assert not [m for m in merged.modules() if type(m).__module__.startswith("difflora.adapters")]
    assert list(merged.state_dict()) == list(base.state_dict())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in merged.state_dict().items())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 60]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(merged(x, t, y), base(x, t, y))


def test_delete_adapter_restores_the_original_parameters_and_names():
    torch.manual_seed(1)
    base = build_model(tiny_config("tiny-unet", TINY_ARCH["dit"])).net.eval()
    names, modules = state(base), [n for n, _ in base.named_modules()]
    torch.manual_seed(1)
    net = tiny_dit_with_everything()
    with pytest.raises(ValueError, match="no adapter named 'nope'.*act, pa, time"):
        delete_adapter(net, "nope")
    net.blocks[0].attn.qkv.merge(t=5)
    with pytest.raises(ValueError, match="'time' is merged into the weights of 'blocks.0.attn.qkv'"):
        delete_adapter(net, "time")
    net.blocks[0].attn.qkv.unmerge()
    for name in ("pa", "act", "time"):
        delete_adapter(net, name)
    assert [n for n, _ in net.named_modules()] == modules
    assert list(net.state_dict()) == list(names)
    assert all(torch.equal(v, names[k]) for k, v in net.state_dict().items())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 60]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(net(x, t, y), base(x, t, y))  # the position adapter's hooks are gone too


def test_delete_one_of_two_adapters_keeps_the_other(tmp_path):
    base = build_diffusers_model("UNet2DModel", UNET).eval()
    ours = time_and_class(base)
    delete_adapter(ours, "cls")
    assert not [n for n, _ in ours.named_modules() if ".adapters.cls" in n]
    only_time = copy.deepcopy(base)
    inject_adapter(only_time, "time", lambda: LinearWeighting(5, 0, 99), "t", TARGETS, rank=2, alpha=3.0)
    only_time.load_state_dict(ours.state_dict())
    with torch.no_grad(), conditions(t=torch.full((2,), 30)):
        assert torch.equal(ours(x8, steps).sample, only_time(x8, steps).sample)


def test_every_form_merges_at_its_no_update_value_leaving_the_weights_bit_for_bit():
    """lowrank_act, scale and a shift on a layer without bias merge at task=-1 (refused at task=1)."""
    base = nn.Linear(4, 5, bias=False)
    model = nn.Sequential(copy.deepcopy(base))
    for name, form in (("act", "lowrank_act"), ("sc", "scale"), ("sh", "shift")):
        inject_adapter(model, name, lambda: IndexWeighting(2), "task", ["0"], form=form)
    randomize_updates(model)
    layer, x = model[0], torch.randn(3, 4)
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.merge(task=1)
    for null in (-1, float("nan"), torch.tensor(-1)):
        layer.merge(task=null)
        assert set(layer.merged) == {"act", "sc", "sh"} and torch.equal(layer.base_layer.weight, base.weight)
        with torch.no_grad():
            assert torch.equal(layer(x), base(x))
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, base.weight) and layer._unmerged_weight is None
