"""Issue 31's design-space changes: the ANOVA refuses a factor aliased with an interaction and reports
least-squares (adjusted) means; the two-stage design, the reference recipe beside difflora's, the scale
sweep and the token pilot as committed; the position adapter's nn.Linear start (004's reference code)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from difflora.adapters import SharedWeighting, conditions, inject_position_adapter
from difflora.config.schema import ConfigError, parse_config
from difflora.design_space.anova import adjusted_means, anova
from difflora.design_space.sweep import SweepError, load_sweep, plan_sweep
from difflora.experiments.study_spec import load_study
from difflora.nets.transformer import TransformerBlock
from difflora.presets import EXPERIMENTS_DIR

STUDY = EXPERIMENTS_DIR / "design-space"
INPUTS = ["attn1_in", "attn1_out", "attn2_in", "attn2_out", "ff_in"]
FORMS = ["linear", "relu", "silu", "sigmoid", "gelu"]


def test_anova_refuses_the_fraction_that_aliases_form_with_input_by_output():
    rng = np.random.default_rng(0)
    rows = []
    for (i, inp), (o, out) in itertools.product(enumerate(INPUTS), enumerate(["ff_in", "out"])):
        form = FORMS[(i + o) % 5]  # sweep.yaml's generator
        for seed in range(2):
            rows.append({"input": inp, "output": out, "form": form, "seed": seed, "fd": 50 + rng.normal()})
    with pytest.raises(
        SweepError, match=r"aliases main effects with interactions \(.*form with the input:output interaction"
    ):
        anova(rows, "fd", ["input", "output", "form"])
    # The stage-1 design (every input x output pair at one form) is estimable, with its interaction.
    stage1 = [{**r, "fd": r["fd"] + 3 * (r["input"] == "ff_in")} for r in rows]
    table = {t["term"]: t for t in anova(stage1, "fd", ["input", "output"], interactions=True)}
    assert {"input", "output", "input:output", "Residual"} <= set(table)


def test_adjusted_means_remove_what_raw_means_carry_from_the_other_factor():
    # Additive effects, an unbalanced design: a0 met b1 (the costly level) more often than a1 did.
    effect_a, effect_b = {"a0": 0.0, "a1": 1.0}, {"b0": 0.0, "b1": 10.0}
    cells = {("a0", "b0"): 1, ("a0", "b1"): 3, ("a1", "b0"): 3, ("a1", "b1"): 1}
    rows = [{"A": a, "B": b, "fd": 5 + effect_a[a] + effect_b[b]} for (a, b), n in cells.items() for _ in range(n)]
    raw = {a: np.mean([r["fd"] for r in rows if r["A"] == a]) for a in effect_a}
    assert raw["a0"] > raw["a1"]  # the raw means rank A backwards
    adj = adjusted_means(rows, "fd", ["A", "B"])
    # Closed form: the intercept plus each level's effect plus the mean of the other factor's effects.
    for a, e in effect_a.items():
        assert adj["A"][a] == pytest.approx(5 + e + np.mean(list(effect_b.values())), abs=1e-9)
    assert adj["B"]["b1"] - adj["B"]["b0"] == pytest.approx(10.0, abs=1e-9)


def test_two_stage_design_recipes_and_token_pilot_as_committed():
    stage1 = [c for c, _ in plan_sweep(load_sweep(STUDY / "stage1.yaml"))[0]]
    assert sorted((c["input"], c["output"]) for c in stage1) == sorted(itertools.product(INPUTS, ["ff_in", "out"]))
    stage2 = load_sweep(STUDY / "stage2.yaml")
    cells = [c for c, _ in plan_sweep(stage2)[0]]
    assert sorted((c["form"], c["input"]) for c in cells) == sorted(itertools.product(FORMS, INPUTS))
    recipes = load_sweep(STUDY / "recipes.yaml")
    reference = recipes.factors["recipe"]["reference-004"]
    assert reference == {
        "model.adapters.0.activation": "relu",
        "model.adapters.0.rank": 60,
        "model.adapters.0.up_init": "linear",
    }
    assert [c["scale"] for c, _ in plan_sweep(recipes)[0]][:5] == ["0.25", "0.5", "1", "2", "4"]
    for sweep in (load_sweep(STUDY / n) for n in ("stage1.yaml", "stage2.yaml", "recipes.yaml")):
        assert sweep.design == "full" and sweep.eval.seed == "per_run" and sweep.base["train"]["token_lr"] == 0.03
    pilot = load_study(STUDY / "tokens.yaml")
    assert [a.set.get("train.token_lr") for a in pilot.arms] == [None, 0.01] + [0.03] * 6
    assert [a.set.get("train.steps") for a in pilot.arms] == [None] * 4 + [1000, 1000, None, None]
    assert [a.set.get("model.context.new_tokens") for a in pilot.arms][-2:] == ["unconditional"] * 2


@pytest.mark.parametrize("up_init", ["zero", "linear"])
def test_the_reference_start_changes_the_output_and_difflora_start_does_not(up_init):
    torch.manual_seed(0)
    block = TransformerBlock(8, 2, 6, 16).double()
    holder = nn.ModuleDict({"b": block})
    x, ctx = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(3, 2, 6, dtype=torch.float64)
    with torch.no_grad():
        plain = block(x, ctx)
    inject_position_adapter(
        holder, "pa", SharedWeighting, "t", ["b"], "attn2_out", "ff_in", 4, "relu", 1.0, "full", up_init
    )
    adapter = block.position_adapters["pa"]
    with torch.no_grad(), conditions(t=torch.zeros(3)):
        out = block(x, ctx)
    if up_init == "zero":
        torch.testing.assert_close(out, plain, atol=0, rtol=0)
        return
    bound = 1 / math.sqrt(adapter.lora_up.shape[-1])  # nn.Linear's bias bound, 1/sqrt(fan_in)
    assert adapter.bias.abs().max() <= bound and adapter.lora_up.abs().max() <= bound
    assert (out - plain).abs().max() > 1e-3


def test_up_init_is_a_position_adapter_option_only():
    entry = {"name": "lora", "rank": 2, "targets": ["qkv"], "weighting": "shared", "up_init": "linear"}
    with pytest.raises(ConfigError, match="up_init"):
        parse_config({"model": {"adapters": [entry]}})
