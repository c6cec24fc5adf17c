"""Injection by module path, reports, whole-model zero-init, freezing, and save/load of adapters."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from difflora.adapters import (
    DEFAULT_TARGETS,
    AdapterLoadError,
    ConditionalLayer,
    IndexWeighting,
    LinearWeighting,
    TrainableWeighting,
    adapter_layers,
    adapter_parameters,
    conditions,
    find_targets,
    freeze_base,
    inject_adapter,
    load_adapters,
    match_target,
    save_adapters,
)
from difflora.config.schema import ModelConfig
from difflora.nets import build_net


class ToyAttention(nn.Module):
    """Attention-like block with IDDPM's names: 1x1 Conv1d ``qkv`` and ``proj_out``."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(2, c)
        self.qkv = nn.Conv1d(c, 3 * c, 1)
        self.proj_out = nn.Conv1d(c, c, 1)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)  # each (N, C, L)
        a = torch.softmax(q.transpose(1, 2) @ k / q.shape[1] ** 0.5, dim=-1)  # (N, L, L)
        return x + self.proj_out((a @ v.transpose(1, 2)).transpose(1, 2))


class ToyNet(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv1d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList([ToyAttention(c) for _ in range(2)])
        self.myqkv = nn.Linear(c, c)  # "qkv" as a suffix must match whole path components only
        self.head = nn.Linear(c, 2)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.myqkv(h.mean(-1)))


def toy(seed: int = 0) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet()


def randomize_adapters_(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


X = torch.randn(4, 3, 10, generator=torch.Generator().manual_seed(5))
T = torch.tensor([0, 3, 9, 9])
Y = torch.tensor([1, -1, 0, 2])


# ----------------------------------------------------------------------------- matching
def test_match_target_exact_suffix_regex():
    assert match_target("blocks.0.qkv", "blocks.0.qkv")
    assert match_target("blocks.0.qkv", "qkv") and match_target("blocks.0.qkv", "0.qkv")
    assert not match_target("myqkv", "qkv") and not match_target("blocks.0.qkv", "kv")
    assert match_target("blocks.1.proj_out", r"re:blocks\.\d\.proj_out")
    assert not match_target("blocks.1.proj_out", r"re:blocks\.\d")  # regexes match the whole path


def test_find_targets_and_report():
    net = toy()
    assert find_targets(net, DEFAULT_TARGETS["unet"]) == [
        "blocks.0.qkv",
        "blocks.0.proj_out",
        "blocks.1.qkv",
        "blocks.1.proj_out",
    ]
    assert find_targets(net, [r"re:blocks\.1\.(qkv|proj_out)"]) == ["blocks.1.qkv", "blocks.1.proj_out"]
    report = inject_adapter(net, "time", lambda: LinearWeighting(3, 0, 9), "t", ["qkv", "blocks.1.proj_out"], rank=2)
    assert report.paths == ["blocks.0.qkv", "blocks.1.qkv", "blocks.1.proj_out"]
    # qkv: 3 bases x rank 2 x (8 in + 24 out); proj_out: 3 x 2 x (8 + 8).
    assert [e.num_params for e in report.layers] == [192, 192, 96]
    assert report.adapter_params == 480
    assert report.total_params == sum(p.numel() for p in net.parameters())
    assert isinstance(net.blocks[0].qkv, ConditionalLayer) and isinstance(net.blocks[0].proj_out, nn.Conv1d)
    text = str(report)
    assert "blocks.1.proj_out" in text and "480 adapter parameters" in text


def test_regex_matching_a_non_layer_is_an_error():
    with pytest.raises(ValueError, match=r"matches 'blocks\.1\.norm', a GroupNorm"):
        find_targets(toy(), [r"re:blocks\.1\..*"])


def test_no_match_is_a_clear_error_and_changes_nothing():
    net = toy()
    with pytest.raises(ValueError, match=r"matched no module: 'qvk'.*close: .*qkv"):
        inject_adapter(net, "time", lambda: LinearWeighting(3, 0, 9), "t", ["qkv", "qvk"])
    assert not list(adapter_layers(net))
    with pytest.raises(ValueError, match="no adapter targets"):
        find_targets(net, [])


def test_two_adapters_share_one_wrapper_and_names_are_unique():
    net = toy()
    inject_adapter(net, "time", lambda: LinearWeighting(3, 0, 9), "t", ["qkv"])
    inject_adapter(net, "cls", lambda: IndexWeighting(3), "y", ["qkv"])
    layer = net.blocks[0].qkv
    assert list(layer.adapters) == ["time", "cls"] and isinstance(layer.base_layer, nn.Conv1d)
    assert [p for p, _ in adapter_layers(net)] == ["blocks.0.qkv", "blocks.1.qkv"]
    with pytest.raises(ValueError, match="already has an adapter named 'time'"):
        inject_adapter(net, "time", lambda: LinearWeighting(3, 0, 9), "t", ["qkv"])
    names = {n for n, _ in net.named_parameters()}
    assert {
        "blocks.0.qkv.base_layer.weight",
        "blocks.0.qkv.adapters.time.lora_A",
        "blocks.0.qkv.adapters.cls.lora_B",
    } <= names


# ----------------------------------------------------------------------------- whole models
def test_injection_leaves_a_toy_model_unchanged():
    net = toy()
    before = net(X)
    inject_adapter(net, "time", lambda: TrainableWeighting(10, 3, "gaussian"), "t", ["qkv", "proj_out"])
    inject_adapter(net, "cls", lambda: IndexWeighting(3), "y", ["qkv", "proj_out"])
    with conditions(t=T, y=Y):
        assert torch.equal(net(X), before)
        randomize_adapters_(net)
        assert not torch.allclose(net(X), before)


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_injection_leaves_tiny_backbones_unchanged(arch):
    # Each backbone's section only with its arch: the other's section cannot take effect (issue 28).
    extra = {
        "unet": {"unet": {"model_channels": 16, "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 2}},
        "dit": {"dit": {"preset": "DiT-T/2"}},
    }
    cfg = ModelConfig.model_validate({"arch": arch, "image_size": 8, "in_channels": 1, "num_classes": 3, **extra[arch]})
    torch.manual_seed(0)
    net = build_net(cfg)
    with torch.no_grad():  # zero-initialised output layers would hide any change: randomise all
        for p in net.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    before = net(x, t, Y[:4].clamp(max=2))
    report = inject_adapter(net, "time", lambda: LinearWeighting(11, 0, 999), "t", DEFAULT_TARGETS[arch])
    inject_adapter(net, "cls", lambda: IndexWeighting(3), "y", DEFAULT_TARGETS[arch])
    suffixes = {p.rsplit(".", 1)[-1] for p in report.paths}
    assert suffixes == ({"qkv", "proj_out"} if arch == "unet" else {"qkv", "proj"})
    if arch == "dit":  # the patch embedding's x_embedder.proj is not an attention projection
        assert all(".attn." in p for p in report.paths)
    with conditions(t=t, y=Y[:4].clamp(max=2)):
        assert torch.equal(net(x, t, Y[:4].clamp(max=2)), before)
        randomize_adapters_(net)
        assert not torch.allclose(net(x, t, Y[:4].clamp(max=2)), before)


def test_freeze_base_trains_only_adapters():
    net = toy()
    inject_adapter(net, "time", lambda: TrainableWeighting(10, 3), "t", ["qkv", "proj_out"])
    randomize_adapters_(net)
    frozen = freeze_base(net)
    assert frozen == sum(p.numel() for p in toy().parameters())
    with conditions(t=T):
        net(X).sum().backward()
    own = {id(p) for p in adapter_parameters(net)}
    for name, p in net.named_parameters():
        if id(p) in own:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


# ----------------------------------------------------------------------------- save / load
def adapted(seed: int = 0) -> ToyNet:
    net = toy(seed)
    inject_adapter(net, "time", lambda: TrainableWeighting(10, 3, "onehot"), "t", ["qkv", "proj_out"], alpha=4.0)
    inject_adapter(net, "cls", lambda: IndexWeighting(3), "y", ["qkv"])
    randomize_adapters_(net, seed=seed + 1)
    return net


def test_save_load_round_trip(tmp_path):
    net = adapted()
    save_adapters(net, tmp_path / "ad", metadata={"step": 7})
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["metadata"] == {"step": 7} and len(config["fingerprint"]["weights_sha256"]) == 64
    assert {(e["path"], e["name"]) for e in config["adapters"]} >= {
        ("blocks.0.qkv", "cls"),
        ("blocks.1.proj_out", "time"),
    }
    with conditions(t=T, y=Y):
        expected = net(X)
        # Into a plain base with the same weights: the adapters are injected at the saved paths.
        fresh = toy(0)
        report = load_adapters(fresh, tmp_path / "ad")
        assert sorted(report.paths) == sorted(p for p, _ in adapter_layers(net))
        assert torch.equal(fresh(X), expected)
        # Into a model that already has them (other values): overwritten.
        other = adapted(seed=0)
        randomize_adapters_(other, seed=9)
        load_adapters(other, tmp_path / "ad")
        assert torch.equal(other(X), expected)


def test_save_while_merged_keeps_the_unmerged_fingerprint(tmp_path):
    net = adapted()
    save_adapters(net, tmp_path / "a")
    net.blocks[0].qkv.merge(t=3)
    save_adapters(net, tmp_path / "b")
    fp = [json.loads((tmp_path / d / "adapter_config.json").read_text())["fingerprint"] for d in "ab"]
    assert fp[0] == fp[1]


def test_loading_into_a_different_base_fails_clearly(tmp_path):
    save_adapters(adapted(), tmp_path / "ad")
    # Same architecture, different base weights: fingerprint mismatch, nothing changed.
    other = toy(seed=1)
    with pytest.raises(AdapterLoadError, match="fingerprint mismatch"):
        load_adapters(other, tmp_path / "ad")
    assert not list(adapter_layers(other))
    load_adapters(other, tmp_path / "ad", check_weights=False)  # deliberate: allowed
    # Different shapes.
    wide = ToyNet(c=10)
    with pytest.raises(AdapterLoadError, match=r"layer 'blocks\.0\.qkv' differs"):
        load_adapters(wide, tmp_path / "ad")
    # Missing layers (e.g. a bare net's adapters loaded into a wrapper around it).
    with pytest.raises(AdapterLoadError, match="has no module 'blocks.0.qkv'"):
        load_adapters(nn.Sequential(toy()), tmp_path / "ad")
    with pytest.raises(AdapterLoadError, match="not an adapter directory"):
        load_adapters(toy(), tmp_path / "nothing")


def test_loading_over_a_different_spec_fails(tmp_path):
    save_adapters(adapted(), tmp_path / "ad")
    net = toy(0)
    inject_adapter(net, "time", lambda: LinearWeighting(3, 0, 9), "t", ["qkv"])
    with pytest.raises(AdapterLoadError, match="different spec"):
        load_adapters(net, tmp_path / "ad")
