"""The design-space study of 004 as committed: the cross-attention base preset, the shared (unconditional)
weighting its adapters use, the sweep / follow-up / baseline YAMLs, and the sweep -> ANOVA pipeline
end to end on a 4-cell tiny sweep (sums of squares against the balanced 2 x 2 closed form)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from difflora.adapters import IndexWeighting, SharedWeighting, conditions, inject_position_adapter
from difflora.cli.commands import resolve_config_path
from difflora.config.schema import ConfigError, load_config, parse_config
from difflora.design_space.anova import run_anova
from difflora.design_space.sweep import load_sweep, plan_sweep, read_results, run_sweep
from difflora.experiments.study_spec import load_study
from difflora.model.build import build_model
from difflora.nets.transformer import TransformerBlock
from difflora.presets import CONFIGS_DIR, EXPERIMENTS_DIR
from difflora.train import train

STUDY = EXPERIMENTS_DIR / "design-space"
TOL = 1e-9


def test_cross_preset_is_a_class_conditional_cross_attention_unet():
    cfg = load_config(resolve_config_path("pretrain/fmnist16-cross-unet"))
    assert (cfg.data.name, cfg.data.image_size, cfg.model.num_classes, cfg.model.attention) == (
        "fashion-mnist",
        16,
        10,
        "cross",
    )
    assert cfg.train.label_dropout > 0 and cfg.train.init_from is None and cfg.model.context.new_tokens is None
    with torch.device("meta"):
        net = build_model(cfg).net
    blocks = [m for m in net.modules() if isinstance(m, TransformerBlock)]
    assert len(blocks) == 4  # 8 px: one input level, the middle block, two output blocks
    assert net.context_embedder.embedding.weight.shape == (11, 2 * 64)  # 10 classes + null, 2 tokens of 64


def test_shared_weighting_is_one_adapter_for_every_sample():
    torch.manual_seed(0)
    blocks = [TransformerBlock(8, 2, 6, 16).double() for _ in range(2)]
    blocks[1].load_state_dict(blocks[0].state_dict())
    holders = [nn.ModuleDict({"b": b}) for b in blocks]
    inject_position_adapter(holders[0], "pa", SharedWeighting, "t", ["b"], "attn2_out", "ff_in", 3, "silu")
    inject_position_adapter(holders[1], "pa", lambda: IndexWeighting(1), "task", ["b"], "attn2_out", "ff_in", 3, "silu")
    shared, index = (b.position_adapters["pa"] for b in blocks)
    with torch.no_grad():
        for p in shared.parameters():
            p.normal_()
        for p, q in zip(index.parameters(), shared.parameters(), strict=True):
            p.copy_(q)
    x, ctx = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 2, 6, dtype=torch.float64)
    with conditions(t=torch.tensor([0.0, 500.0, float("nan")])):
        out = blocks[0](x, ctx)
    with conditions(task=torch.tensor([0, 0, -1])):  # the reference: one index entry for everyone
        ref = blocks[1](x, ctx)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    with conditions(t=None):
        plain = blocks[0](x, ctx)
    torch.testing.assert_close(out[2], plain[2], atol=0, rtol=0)  # NaN: no update
    assert (out[:2] - plain[:2]).abs().max() > 1e-3
    entry = {"name": "pa", "form": "position", "source": "in", "dest": "out", "targets": ["x"], "weighting": "shared"}
    with pytest.raises(ConfigError, match="a shared weighting has one entry for every sample"):
        parse_config({"model": {"adapters": [{**entry, "num_values": 10}]}})


def test_main_sweep_is_the_balanced_tenth_of_input_output_form():
    sweep = load_sweep(STUDY / "sweep.yaml")
    runnable, skipped = plan_sweep(sweep)
    cells = [c for c, _ in runnable]
    assert not skipped and len(cells) == 10 and len(sweep.seeds) >= 2
    for factor, times in (("input", 2), ("output", 5), ("form", 2)):
        assert set(Counter(c[factor] for c in cells).values()) == {times}
    assert len({(c["input"], c["output"]) for c in cells}) == 10  # every cell a distinct position pair
    assert sweep.base["train"]["init_from"] == "pretrained:fmnist16-cross-unet"
    assert sweep.base["model"]["context"]["new_tokens"] == "base"
    width = load_sweep(STUDY / "width.yaml")
    assert [c["width"] for c, _ in plan_sweep(width)[0]] == ["2", "8", "32"]
    assert {k: v for k, v in width.base.items() if k != "model"} == {
        k: v for k, v in sweep.base.items() if k != "model"
    }


def test_baselines_share_the_sweep_budget_and_build():
    # The baselines of the redesigned study (issue 31) share stage 1's base, task and evaluation; they
    # run a third seed so that each claim's Welch test has two degrees of freedom per arm.
    study = load_study(STUDY / "baselines.yaml")
    sweep = load_sweep(STUDY / "stage1.yaml")
    assert study.base == sweep.base and study.eval == sweep.eval
    assert study.seeds == [0, 1, 2] and sweep.seeds == [0, 1]
    assert [a.name for a in study.arms] == ["recipe-004", "full-ft", "lora-attn", "tokens-only"]
    counts = {}
    for arm in study.arms:
        tree = yaml.safe_load(yaml.safe_dump(study.base))
        if arm.adapters is not None:
            tree["model"]["adapters"] = arm.adapters
        cfg = parse_config(tree, [f"{k}={json.dumps(v)}" for k, v in arm.set.items()])
        with torch.device("meta"):
            model = build_model(cfg)
        counts[arm.name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert counts["full-ft"] == total
    assert counts["tokens-only"] == 10 * 2 * 64
    # The recipe: 4 blocks x (64 x 8 + 8 + 8 x 64 + 64) on the 64-channel blocks' widths, or 32 at 16 px.
    assert counts["tokens-only"] < counts["recipe-004"] < 0.02 * total


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = tiny_config("tiny-cross-unet", "train.steps=2", "train.ckpt_every=2", "sample.num=1")
    train(cfg, out, progress=False, log=lambda _: None)
    return out


def test_sweep_to_anova_end_to_end_on_four_cells(tmp_path, monkeypatch, tiny_base):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    base = yaml.safe_load((CONFIGS_DIR / "tiny-cross-unet.yaml").read_text())
    base["model"]["context"]["new_tokens"] = "unconditional"
    base["model"]["adapters"] = [
        {
            "name": "pa",
            "form": "position",
            "source": "attn2_out",
            "dest": "ff_in",
            "rank": 2,
            "condition": "t",
            "weighting": "shared",
            "targets": ["re:.*transformer_blocks\\.\\d+"],
        }
    ]
    base["train"].update(init_from=str(tiny_base), train_base=False, steps=2, batch_size=4, ckpt_every=2)
    base["sample"].update(num=2, steps=2)
    tree = {
        "name": "tiny-design-space",
        "seeds": [0],
        "eval": {"num_samples": 8, "steps": 2, "guidance": [2], "feature_steps": 3},
        "base": base,
        "factors": {
            "input": {"attn1_in": {"model.adapters.0.source": "attn1_in"}, "attn2_out": {}},
            "form": {
                "linear": {"model.adapters.0.activation": "identity"},
                "relu": {"model.adapters.0.activation": "relu"},
            },
        },
    }
    tree["factors"]["input"]["attn2_out"] = {"model.adapters.0.source": "attn2_out"}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    table = run_sweep(path, out=tmp_path / "out", progress=False, log=lambda _: None)
    rows = read_results(table)
    assert sorted((r["input"], r["form"]) for r in rows) == [
        ("attn1_in", "linear"),
        ("attn1_in", "relu"),
        ("attn2_out", "linear"),
        ("attn2_out", "relu"),
    ]
    lines = run_anova(table, ["fd"])
    record = json.loads((tmp_path / "out" / "anova" / "anova.json").read_text())["metrics"]["fd"]
    terms = {r["term"]: r for r in record["table"]}
    # Balanced 2 x 2, one run per cell: SS(factor) = 2 * sum over its levels of (level mean - grand)^2.
    fd = {(r["input"], r["form"]): r["fd"] for r in rows}
    grand = np.mean(list(fd.values()))
    ss = {}
    for factor, index in (("input", 0), ("form", 1)):
        levels = {k[index] for k in fd}
        means = [np.mean([v for k, v in fd.items() if k[index] == lv]) for lv in levels]
        ss[factor] = 2 * sum((m - grand) ** 2 for m in means)
        assert terms[factor]["sum_sq"] == pytest.approx(ss[factor], abs=TOL)
        assert terms[factor]["df"] == 1
    assert terms["Residual"]["df"] == 1
    largest = max(ss, key=ss.get)  # the sentence names the factor with the largest effect
    assert (
        f"for fd is {largest} (F =" in record["sentence"] or f"largest effect is {largest} (F =" in record["sentence"]
    )
    assert record["sentence"] in lines


@pytest.mark.parametrize("kernel,size", [("full", 3), ("1x1", 1)])
def test_resblock_adapter_kernel_from_config_saves_and_reloads(tmp_path, kernel, size, tiny_config):
    from difflora.adapters import load_adapters, save_adapters

    entry = {"name": "pa", "form": "position", "source": "in", "dest": "out", "rank": 2, "activation": "gelu"}
    entry.update(condition="t", weighting="shared", kernel=kernel, targets=["input_blocks.1.0"])
    cfg = tiny_config("tiny-unet", {"model.adapters": [entry]})
    model = build_model(cfg)
    adapter = model.net.input_blocks[1][0].position_adapters["pa"]
    assert adapter.kernel == size and adapter.lora_down.shape == (1, 2, 16 * size * size)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 50])
    with torch.no_grad():
        want = model(x, t)
    save_adapters(model, tmp_path / "ad")
    fresh = build_model(tiny_config("tiny-unet"))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".position_adapters." not in k})
    load_adapters(fresh, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(x, t), want)
