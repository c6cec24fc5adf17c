"""Every call that changes a model's adapters is all-or-nothing (issue 28, class 7).

Each entry point (inject_adapter, inject_position_adapter, load_adapters, import_peft, new class
tokens, a bank's set_entries, 002's import_task) is made to fail after its first layer would have
been changed; the model must then be exactly as before: the same module tree (every path and
module type), the same state_dict keys and every tensor bit for bit, and no forward hook added.
They all plan through one mechanism, :class:`difflora.adapters.ModelEdit`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from difflora.adapters import (
    AdapterLoadError,
    IndexWeighting,
    LowRankForm,
    ModelEdit,
    add_new_class_tokens,
    inject_adapter,
    inject_position_adapter,
    load_adapters,
    merge_adapters,
    save_adapters,
)
from difflora.adapters.peft_format import PeftFormatError, export_peft, import_peft
from difflora.model.build import build_model
from difflora.nets.unet import AttentionBlock, ResBlock


class Layers(nn.Module):
    """Two Linear layers and a grouped convolution (which adapters cannot wrap)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.grouped = nn.Conv2d(4, 4, 1, groups=2)


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ResBlock(4, None, 0.0, 4), AttentionBlock(4, 2)])


def snapshot(model: nn.Module) -> tuple:
    """The module tree, the state dict (cloned) and the number of forward hooks of every module."""
    tree = [(p, type(m).__name__) for p, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [len(m._forward_hooks) for m in model.modules()]
    return tree, state, hooks


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    tree, state, hooks = snapshot(model)
    assert tree == before[0]
    assert list(state) == list(before[1])
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert hooks == before[2]


def fails_on_second_call(factory):
    """A weighting factory that raises on its second call: the second layer's branch cannot be built."""
    calls = []

    def make():
        calls.append(1)
        if len(calls) > 1:
            raise ValueError("no second weighting")
        return factory()

    return make


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name"}, "Python identifier"),
        ({"condition": "bad-condition"}, "identifier"),
        ({"weighting": fails_on_second_call(lambda: IndexWeighting(2))}, "no second weighting"),
        ({"targets": ["a", "grouped"]}, "grouped convolutions"),
        ({"targets": ["a", "b"], "form": "lowrank", "activation": "relu"}, "has no activation"),
    ],
    ids=["name", "condition", "weighting", "grouped", "option"],
)
def test_inject_adapter_that_fails_changes_nothing(kwargs, message):
    model = Layers()
    before = snapshot(model)
    args = {"name": "lora", "weighting": lambda: IndexWeighting(2), "condition": "task", "targets": ["a", "b"]}
    with pytest.raises(ValueError, match=message):
        inject_adapter(model, **{**args, **kwargs})
    assert_unchanged(model, before)


def test_inject_adapter_on_a_layer_with_that_name_changes_nothing():
    model = Layers()
    inject_adapter(model, "lora", lambda: IndexWeighting(2), "task", ["b"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="'b': this layer already has an adapter named 'lora'"):
        inject_adapter(model, "lora", lambda: IndexWeighting(2), "task", ["a", "b"])
    assert_unchanged(model, before)


def test_inject_position_adapter_that_fails_changes_nothing():
    model = Blocks()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no second weighting"):
        inject_position_adapter(
            model, "pa", fails_on_second_call(lambda: IndexWeighting(2)), "task", ["blocks.0", "blocks.1"], "in", "out"
        )
    assert_unchanged(model, before)


def test_load_adapters_that_fails_changes_nothing(tmp_path: Path):
    source = Layers()
    inject_adapter(source, "lora", lambda: IndexWeighting(2), "task", ["a", "b"])
    save_adapters(source, tmp_path / "ad")
    config_path = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["adapters"].append(config["adapters"][-1])  # the second layer's adapter twice
    config_path.write_text(json.dumps(config))
    model = Layers()
    model.load_state_dict(source.state_dict(), strict=False)
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match="two adapters named 'lora'"):
        load_adapters(model, tmp_path / "ad", check_weights=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize(("name", "condition"), [("bad name", "lora"), ("lora", "bad-condition")])
def test_import_peft_that_fails_changes_nothing(tmp_path: Path, name, condition):
    source = Layers()
    inject_adapter(source, "lora", lambda: IndexWeighting(1), "lora", ["a", "b"])
    export_peft(source, tmp_path / "peft")
    model = Layers()
    before = snapshot(model)
    with pytest.raises(PeftFormatError, match="identifier"):
        import_peft(model, tmp_path / "peft", name=name, condition=condition)
    assert_unchanged(model, before)


def test_new_class_tokens_that_fail_change_nothing(tiny_config):
    net = build_model(tiny_config("tiny-unet", "model.attention=cross")).net
    before = snapshot(net)
    with pytest.raises(ValueError, match="init must be one of"):
        add_new_class_tokens(net, "random")
    assert_unchanged(net, before)


def test_set_entries_that_fail_change_nothing():
    model = Layers()
    inject_adapter(model, "lr", lambda: IndexWeighting(2), "task", ["a"], form="lowrank_act", activation="relu")
    branch = model.a.adapters["lr"]
    before = snapshot(model)
    banks = {n: branch.entries(n).detach().clone() for n in branch.bank_names}
    banks["lora_s"] = torch.zeros(3)  # two entries in the other banks
    with pytest.raises(ValueError, match="'lora_s' of shape \\[3\\] does not fit \\[2\\]"):
        branch.set_entries(banks, 0)
    assert_unchanged(model, before)


def test_a_model_edit_changes_nothing_until_applied():
    model = Layers()
    before = snapshot(model)
    edit = ModelEdit(model)
    branch = edit.add_branch("a", "lora", LowRankForm(IndexWeighting(1), "lora", edit.layer("a").geometry, 2))
    with torch.no_grad():
        branch.lora_B.fill_(1.0)
    assert_unchanged(model, before)
    report = edit.apply()
    assert report.paths == ["a"] and torch.equal(model.a.adapters["lora"].lora_B, branch.lora_B)


@pytest.mark.parametrize(
    ("values", "message"),
    [({"t": 3}, "'b': adapter 'act' has form 'lowrank_act'"), ({"t": torch.tensor([1, 2])}, "one value shared")],
)
def test_merge_adapters_that_fails_merges_nothing(values, message):
    model = Layers()
    inject_adapter(model, "lr", lambda: IndexWeighting(4), "t", ["a", "b"])
    inject_adapter(model, "act", lambda: IndexWeighting(4), "t", ["b"], form="lowrank_act", activation="relu")
    with torch.no_grad():
        model.a.adapters["lr"].lora_B.fill_(1.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        merge_adapters(model, **values)
    assert_unchanged(model, before)
    assert not model.a.merged and not model.b.merged
