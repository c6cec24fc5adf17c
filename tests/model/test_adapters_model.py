"""Adapters inside the model callable: conditions in original timestep units, the merged sampling
path (== the per-sample path, also under classifier-free guidance), config validation, build_model
injection and 000's parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflora.adapters import (
    ConditionalLayer,
    IndexWeighting,
    LinearWeighting,
    adapter_layers,
    adapter_parameters,
    current,
    inject_adapter,
    merge_shared,
)
from difflora.config.schema import ConfigError, parse_config
from difflora.diffusion import ClassifierFreeGuidance, create_diffusion, sample
from difflora.model.build import DiffusionModel, build_model


class ToyDenoiser(nn.Module):
    """net(x, t, y) with two named attention-like 1x1 projections; ignores t and y itself."""

    def __init__(self, c: int = 2, hidden: int = 8):
        super().__init__()
        self.inp = nn.Conv2d(c, hidden, 1)
        self.qkv = nn.Conv1d(hidden, hidden, 1)
        self.proj_out = nn.Conv1d(hidden, hidden, 1)
        self.out = nn.Conv2d(hidden, c, 1)
        self.seen_t: list[torch.Tensor] = []

    def forward(self, x, t, y=None):
        n, _, h, w = x.shape
        z = self.inp(x).reshape(n, -1, h * w)
        z = self.proj_out(torch.tanh(self.qkv(z)))
        self.seen_t.append(current("t"))
        return self.out(z.reshape(n, -1, h, w))


def toy_model(steps: int = 40, rescale: bool = True, seed: int = 0) -> DiffusionModel:
    torch.manual_seed(seed)
    net = ToyDenoiser()
    inject_adapter(net, "time", lambda: LinearWeighting(5, 0, steps - 1), "t", ["qkv", "proj_out"])
    inject_adapter(net, "cls", lambda: IndexWeighting(3), "y", ["qkv"])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in adapter_parameters(net):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return DiffusionModel(net, rescale_steps=steps if rescale else None)


def diffusion(steps: int = 40, respacing=None, rescale: bool = True):
    cfg = parse_config(
        {"diffusion": {"steps": steps, "rescale_timesteps": rescale}, "model": {"learn_sigma": False}}
    ).diffusion
    return create_diffusion(cfg, learn_sigma=False, respacing=respacing)


# ----------------------------------------------------------------------------- conditions
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("respacing", [None, 7])
def test_adapters_see_original_integer_timesteps(rescale, respacing):
    model = toy_model(steps=4000, rescale=rescale)
    diff = diffusion(4000, respacing, rescale)
    idx = torch.arange(diff.num_timesteps)
    original = torch.from_numpy(diff.timestep_map)[idx] if respacing else idx
    model(torch.zeros(len(idx), 2, 2, 2), diff.model_timesteps(idx))
    seen = model.net.seen_t[-1]
    assert seen.dtype == torch.int64 and torch.equal(seen, original)


class TimeProbe(nn.Module):
    """net(x, t, y) that keeps the t it receives and returns x."""

    def forward(self, x, t, y=None):
        self.t = t
        return x


@pytest.mark.parametrize("respacing", [None, 7])
def test_backbone_gets_rescaled_original_timesteps_from_the_wrapper(respacing):
    # IDDPM's t * 1000 / T of the ORIGINAL process (T = 4000, not the respaced 7 steps).
    original = diffusion(4000, respacing).model_timesteps(torch.arange(7))
    rescaled = DiffusionModel(TimeProbe(), rescale_steps=4000)
    rescaled(torch.zeros(7, 1, 1, 1), original)
    assert torch.equal(rescaled.net.t, original.float() * (1000.0 / 4000)) and rescaled.net.t.dtype == torch.float32
    plain = DiffusionModel(TimeProbe())
    plain(torch.zeros(7, 1, 1, 1), original)
    assert plain.net.t is original
    with pytest.raises(TypeError, match="integer timestep"):
        rescaled(torch.zeros(7, 1, 1, 1), original.float())
    with pytest.raises(ValueError, match="rescale_steps"):
        DiffusionModel(TimeProbe(), 4000 / 1000)


def test_extra_conditions_reach_adapters_only():
    model = toy_model()
    inject_adapter(model.net, "task", lambda: IndexWeighting(2), "task", ["proj_out"])
    x = torch.randn(3, 2, 2, 2)
    t = torch.tensor([0, 20, 39])
    out0 = model(x, t, torch.tensor([0, -1, 2]), task=torch.tensor([-1, -1, -1]))
    with torch.no_grad():  # make the task adapter do something
        model.net.proj_out.adapters["task"].lora_B.normal_()
    out1 = model(x, t, torch.tensor([0, -1, 2]), task=torch.tensor([-1, -1, -1]))
    out2 = model(x, t, torch.tensor([0, -1, 2]), task=torch.tensor([1, -1, 0]))
    assert torch.equal(out0, out1)  # null task: no update
    assert torch.equal(out2[1], out1[1]) and not torch.allclose(out2[0], out1[0])


# ----------------------------------------------------------------------------- merged sampling
def run_sampler(model, diff, sampler, guided=False, y=None):
    fn = ClassifierFreeGuidance(model, 3.0) if guided else model
    g = torch.Generator().manual_seed(3)
    kwargs = {"y": y} if y is not None else {}
    return sample(diff, fn, (4, 2, 4, 4), generator=g, sampler=sampler, model_kwargs=kwargs)


@pytest.mark.parametrize(("sampler", "guided"), [("ddpm", False), ("ddim", True)])
def test_merged_sampling_equals_per_sample_path(sampler, guided):
    model = toy_model()
    diff = diffusion(40, respacing=10)
    y = torch.tensor([0, 2, -1, 1])
    reference = run_sampler(model, diff, sampler, guided, y)
    weights = {p: layer.base_layer.weight.clone() for p, layer in adapter_layers(model.net)}
    merges = []
    model.net.qkv.register_forward_pre_hook(lambda m, a: merges.append(dict(m.merged)))
    with model.merged():
        fast = run_sampler(model, diff, sampler, guided, y)
    # One merged TimeLoRA value per step (the step's original timestep); ClassLoRA stays per sample.
    assert [m["time"] for m in merges] == [int(t) for t in torch.from_numpy(diff.timestep_map).flip(0)]
    assert all("cls" not in m for m in merges)
    # float32 sampling over 10 steps: merged W + dW vs W x + B(A x) differ by rounding only.
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    assert not any(layer.merged for _, layer in adapter_layers(model.net))
    assert all(torch.equal(layer.base_layer.weight, weights[p]) for p, layer in adapter_layers(model.net))


def test_merged_mode_falls_back_to_per_sample_for_mixed_t():
    model = toy_model()
    x = torch.randn(4, 2, 4, 4)
    t_mixed = torch.tensor([0, 10, 20, 39])
    t_same = torch.full((4,), 20)
    ref_mixed, ref_same = model(x, t_mixed), model(x, t_same)
    with model.merged("t"):
        same = model(x, t_same)
        assert model.net.qkv.merged == {"time": 20}
        mixed = model(x, t_mixed)
        assert model.net.qkv.merged == {}
    torch.testing.assert_close(same, ref_same, atol=1e-6, rtol=0)  # float32 rounding of the merge
    assert torch.equal(mixed, ref_mixed)  # the per-sample path is the very same computation


def test_merged_tiny_unet_with_scales_on_two_conditions_equals_per_sample(tiny_config):
    # Two weight scales on one layer, reading t and y: model.merged("t") must compute
    # (1 + a_t + a_y) W x as the per-sample path does (it used to merge to (1 + a_t)(1 + a_y) W x).
    adapters = [
        {"name": "ts", "form": "scale", "weighting": "linear", "num_values": 100, "num_bases": 5},
        {"name": "ys", "form": "scale", "condition": "y", "weighting": "index", "num_values": 10},
    ]
    model = build_model(tiny_config("tiny-unet", {"model.adapters": adapters}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the scales, and the zero-initialised output layers that would hide them
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.full((3,), 50), torch.tensor([1, 4, -1])
    per_sample = model(x, t, y)
    with model.merged("t"):
        fast = model(x, t, y)
    torch.testing.assert_close(fast, per_sample, atol=1e-5, rtol=0)


def test_merge_shared_reports_and_skips_repeat_merges():
    model = toy_model()
    assert merge_shared(model.net, t=torch.tensor([3, 3]), y=torch.tensor([1, 2])) == {"t": True, "y": False}
    assert model.net.qkv.merged == {"time": 3}
    saved = model.net.qkv._unmerged_weight
    merge_shared(model.net, t=torch.tensor([3, 3]))
    assert model.net.qkv._unmerged_weight is saved
    merge_shared(model.net, t=torch.tensor([3, 4]))
    assert not model.net.qkv.merged and model.net.qkv._unmerged_weight is None
    # Both conditions shared (read back together): merged at Python numbers of the tensors' kind.
    assert merge_shared(model.net, t=torch.tensor([7, 7]), y=torch.tensor([2, 2])) == {"t": True, "y": True}
    assert model.net.qkv.merged == {"time": 7, "cls": 2} and type(model.net.qkv.merged["time"]) is int
    # A float condition, one sample with NaN ("no update": shared, as any one value), an empty batch.
    assert merge_shared(model.net, w=torch.tensor([2.5, 2.5]), v=torch.tensor([float("nan")]), e=torch.ones(0)) == {
        "w": True,
        "v": True,
        "e": False,
    }


# ----------------------------------------------------------------------------- config and build_model
# A tiny U-Net on digits without time and class embeddings: the adapters carry t and y.
UNET_NO_EMBEDS = {
    "data": {"name": "digits"},
    "model": {
        "arch": "unet",
        "num_classes": 10,
        "time_embed": False,
        "class_embed": False,
        "unet": {"model_channels": 16, "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 2},
    },
    "diffusion": {"steps": 100},
}


def test_build_model_injects_config_adapters_and_freezes(tiny_config):
    adapters = [
        {"name": "time", "weighting": "linear", "num_values": 100, "num_bases": 5},
        {"name": "cls", "condition": "y", "weighting": "index", "num_values": 10, "targets": ["re:.*\\.qkv"]},
    ]
    model = build_model(tiny_config(UNET_NO_EMBEDS, {"model.adapters": adapters, "train.train_base": False}))
    report = model.adapter_report
    assert {e.adapter for e in report.layers} == {"time", "cls"}
    assert all(p.endswith(("qkv", "proj_out")) for p in report.paths)
    assert model.rescale_steps == 100
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model)}
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0, 50, 99]), torch.tensor([3, -1, 9]))
    assert out.shape == (3, 2, 8, 8)
    assert isinstance(model.net.get_submodule(report.paths[0]), ConditionalLayer)


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ({"name": "t", "weighting": "linear", "num_values": 100}, r"time\]\.num_bases: linear weighting needs"),
        ({"name": "t", "weighting": "index", "num_values": 100, "num_bases": 4}, "leave num_bases unset"),
        ({"name": "t", "weighting": "trainable", "num_values": 100, "num_bases": 4, "init": "zeros"}, "init"),
        ({"name": "t", "weighting": "index", "num_values": 100, "value_range": [0, 1]}, "only the linear"),
        ({"name": "bad name", "weighting": "index", "num_values": 100}, "name"),
    ],
)
def test_adapter_config_errors_name_the_key(adapter, message, tiny_config):
    adapter = {**adapter, "name": "time"} if adapter["name"] == "t" else adapter
    with pytest.raises(ConfigError, match=message):
        tiny_config(UNET_NO_EMBEDS, {"model.adapters": [adapter]})


def test_build_model_checks_adapter_ranges_against_the_diffusion(tiny_config):
    with pytest.raises(ValueError, match="num_values >= 100"):
        build_model(
            tiny_config(
                UNET_NO_EMBEDS,
                {"model.adapters": [{"name": "time", "weighting": "linear", "num_values": 50, "num_bases": 3}]},
            )
        )
    with pytest.raises(ValueError, match="num_values >= 100"):
        build_model(
            tiny_config(UNET_NO_EMBEDS, {"model.adapters": [{"name": "time", "weighting": "index", "num_values": 99}]})
        )
    with pytest.raises(ValueError, match="num_classes"):
        build_model(
            tiny_config(
                UNET_NO_EMBEDS,
                {"model.adapters": [{"name": "cls", "condition": "y", "weighting": "index", "num_values": 9}]},
            )
        )


# ----------------------------------------------------------------------------- 000's parameter counts
CIFAR = {
    "data": {"name": "cifar10"},
    "model": {
        "arch": "unet",
        "learn_sigma": True,
        "time_embed": False,
        "unet": {
            "model_channels": 128,
            "num_res_blocks": 3,
            "attention_resolutions": [16, 8],
            "num_heads": 4,
            "dropout": 0.3,
        },
    },
}
TIME_LINEAR = {"name": "time", "weighting": "linear", "num_values": 4001, "num_bases": 11, "rank": 4}


@pytest.mark.parametrize(
    ("steps", "num_classes", "adapters", "expected"),
    [
        (1000, 0, [{"name": "time", "weighting": "index", "num_values": 1000}], 137_417_350),
        (4000, 0, [TIME_LINEAR], 46_271_110),
        (4000, 0, [{**TIME_LINEAR, "weighting": "trainable", "init": "onehot"}], 47_591_440),
        (4000, 0, [{**TIME_LINEAR, "rank": 8, "weighting": "trainable"}], 48_605_200),  # 000 Table 3, r = 8
        (4000, 0, [{**TIME_LINEAR, "num_bases": 41, "weighting": "trainable"}], 53_957_140),  # Table 3, m = 40
        (
            4000,
            10,
            [TIME_LINEAR, {"name": "cls", "condition": "y", "weighting": "index", "num_values": 10}],
            47_192_710,
        ),
        (
            4000,
            10,
            [
                {**TIME_LINEAR, "weighting": "trainable"},
                {"name": "cls", "condition": "y", "weighting": "index", "num_values": 10},
            ],
            48_513_040,
        ),
    ],
)
def test_paper_parameter_counts(steps, num_classes, adapters, expected):
    model_tree = {**CIFAR["model"], "num_classes": num_classes, "class_embed": False, "adapters": adapters}
    cfg = parse_config({**CIFAR, "model": model_tree, "diffusion": {"steps": steps}})
    with torch.device("meta"):  # shapes only: counting needs no memory or init time
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert len(model.adapter_report.paths) == 30  # 15 attention blocks x (qkv, proj_out)
