"""Adapter files with every form and position adapters; all-or-nothing loading; config and model wiring."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflora.adapters import (
    AdapterLoadError,
    adapter_parameters,
    load_adapters,
    save_adapters,
)
from difflora.config.schema import ConfigError
from difflora.model.build import build_model
from helpers import tiny_config

# A two-block DiT on digits with a frozen base; the tests add the adapters.
FROZEN_DIT = {
    "data": {"name": "digits"},
    "diffusion": {"steps": 20},
    "train": {"train_base": False},
    "model": {"arch": "dit", "dit": {"depth": 2, "hidden_size": 16, "num_heads": 2, "patch_size": 2}},
}
ADAPTERS = [
    {"name": "time", "condition": "t", "weighting": "linear", "num_values": 20, "num_bases": 3},
    {
        "name": "act",
        "form": "lowrank_act",
        "condition": "task",
        "weighting": "index",
        "num_values": 3,
        "activation": "silu",
    },
    {
        "name": "sc",
        "form": "scale",
        "condition": "task",
        "weighting": "index",
        "num_values": 3,
        "targets": ["fc1", "fc2"],
    },
    {"name": "sh", "form": "shift", "condition": "task", "weighting": "index", "num_values": 3, "targets": ["fc1"]},
    {
        "name": "pa",
        "form": "position",
        "condition": "task",
        "weighting": "index",
        "num_values": 3,
        "source": "attn_out",
        "dest": "mlp_in",
        "rank": 4,
        "activation": "relu",
        "scale": 0.5,
        "targets": ["re:blocks\\.\\d+"],
    },
]


def trained(seed: int = 0):
    """A model whose base and adapters all hold non-zero values."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(FROZEN_DIT, {"model.adapters": ADAPTERS}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 1, 8, 8, generator=g)
    return x, torch.tensor([0, 5, 19, 10]), torch.tensor([0, 2, -1, 1])


def test_build_model_injects_every_form_with_any_condition_name():
    model = build_model(tiny_config(FROZEN_DIT, {"model.adapters": ADAPTERS}))
    forms = {(row.adapter, row.form) for row in model.adapter_report.layers}
    assert forms == {("time", "lowrank"), ("act", "lowrank_act"), ("sc", "scale"), ("sh", "shift"), ("pa", "position")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if any(p is q for q in adapter_parameters(model))}
    assert "net.blocks.1.position_adapters.pa.lora_down" in trainable
    assert "net.blocks.0.mlp.fc1.adapters.sh.shift" in trainable
    x, t, task = inputs()
    with torch.no_grad():
        out = model(x, t, task=task)
        with model.adapters_disabled():
            base = model(x, t, task=task)
    assert torch.equal(out, base)  # zero-initialised: injection changes nothing


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="condition"):
        tiny_config(FROZEN_DIT, {"model.adapters": [{**ADAPTERS[0], "condition": "not an identifier"}]})
    with pytest.raises(ConfigError, match="form"):
        tiny_config(FROZEN_DIT, {"model.adapters": [{**ADAPTERS[0], "form": "affine"}]})
    with pytest.raises(ConfigError, match="activation"):
        tiny_config(FROZEN_DIT, {"model.adapters": [{**ADAPTERS[1], "activation": "tanh"}]})
    with pytest.raises(ConfigError, match="form position needs source and dest"):
        tiny_config(FROZEN_DIT, {"model.adapters": [{**ADAPTERS[4], "source": None}]})
    with pytest.raises(ConfigError, match="only forms lowrank_act and position have an activation"):
        tiny_config(FROZEN_DIT, {"model.adapters": [{**ADAPTERS[2], "activation": "relu"}]})


def test_model_adapters_disabled_by_name():
    model = trained()
    x, t, task = inputs()
    with torch.no_grad():
        full = model(x, t, task=task)
        with model.adapters_disabled("pa"):
            no_pa = model(x, t, task=task)
        with model.adapters_disabled():
            base = model(x, t, task=task)
        # Null rows for every task adapter: only TimeLoRA remains, exactly as with them disabled.
        null = model(x, t, task=torch.full((4,), -1))
        with model.adapters_disabled("act", "sc", "sh", "pa"):
            time_only = model(x, t, task=task)
    assert (full - no_pa).abs().max() > 1e-4 and (no_pa - base).abs().max() > 1e-4
    torch.testing.assert_close(null, time_only, atol=1e-6, rtol=0)


def test_save_reload_every_form_gives_identical_outputs(tmp_path):
    model = trained()
    x, t, task = inputs()
    with torch.no_grad():
        want = model(x, t, task=task)
    save_adapters(model, tmp_path / "ad", metadata={"step": 3})
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert {e["form"] for e in saved["adapters"]} == {"lowrank", "lowrank_act", "scale", "shift", "position"}
    fresh = build_model(tiny_config(FROZEN_DIT, {"model.adapters": []}))
    # The base weights of a plain model live at <path>.weight, the adapted model's at base_layer.weight.
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()}
    fresh.load_state_dict({k: v for k, v in state.items() if k in fresh.state_dict()})
    report = load_adapters(fresh, tmp_path / "ad")
    assert {row.form for row in report.layers} == {"lowrank", "lowrank_act", "scale", "shift", "position"}
    with torch.no_grad():
        assert torch.equal(fresh(x, t, task=task), want)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [n for n, _ in model.named_modules()]


@pytest.mark.parametrize("damage", ["missing_tensor", "wrong_shape", "int_dtype", "extra_tensor"])
def test_loading_is_all_or_nothing(tmp_path, damage):
    model = trained()
    save_adapters(model, tmp_path / "ad")
    path = tmp_path / "ad" / "adapters.safetensors"
    tensors = load_file(str(path))
    key = "net.blocks.1.position_adapters.pa.lora_up"  # among the last entries: earlier ones would load first
    if damage == "missing_tensor":
        del tensors[key]
    elif damage == "wrong_shape":
        tensors[key] = tensors[key][:, :, :2].contiguous()
    elif damage == "int_dtype":
        tensors[key] = tensors[key].long()
    else:
        tensors["net.blocks.0.attn.qkv.adapters.stray.lora_A"] = torch.zeros(1)
    save_file(tensors, str(path))
    target = trained(seed=0)
    for _, layer in [(n, m) for n, m in target.named_modules() if hasattr(m, "adapters")]:
        with torch.no_grad():
            for p in layer.adapters.parameters():
                p.zero_()
    before = _snapshot(target)
    with pytest.raises(AdapterLoadError, match="adapters.safetensors"):
        load_adapters(target, tmp_path / "ad")
    after = _snapshot(target)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())


def test_damaged_files_become_adapter_load_errors(tmp_path):
    model = trained()
    save_adapters(model, tmp_path / "ad")
    cfg_path, weights = tmp_path / "ad" / "adapter_config.json", tmp_path / "ad" / "adapters.safetensors"
    good_cfg, good_weights = cfg_path.read_text(), weights.read_bytes()
    weights.write_bytes(good_weights[:100])  # truncated: a SafetensorError inside
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file.*save the adapters again"):
        load_adapters(trained(), tmp_path / "ad")
    weights.write_bytes(good_weights)
    cfg_path.write_text(good_cfg[:50])  # torn JSON
    with pytest.raises(AdapterLoadError, match="adapter_config.json is not valid JSON"):
        load_adapters(trained(), tmp_path / "ad")
    bad = json.loads(good_cfg)
    bad["adapters"][1]["form"] = "affine"
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(AdapterLoadError, match="invalid spec.*unknown adapter form 'affine'"):
        load_adapters(trained(), tmp_path / "ad")
    del bad["fingerprint"]
    cfg_path.write_text(json.dumps(bad))
    with pytest.raises(AdapterLoadError, match="lacks 'fingerprint'"):
        load_adapters(trained(), tmp_path / "ad")


def test_wrong_base_is_refused_before_any_change(tmp_path):
    save_adapters(trained(seed=0), tmp_path / "ad")
    other = trained(seed=3)
    before = _snapshot(other)
    with pytest.raises(AdapterLoadError, match="fingerprint mismatch"):
        load_adapters(other, tmp_path / "ad")
    assert all(torch.equal(_snapshot(other)[0][k], v) for k, v in before[0].items())
    wide = build_model(tiny_config(FROZEN_DIT, "model.dit.hidden_size=32"))
    with pytest.raises(AdapterLoadError, match="differs from the base"):
        load_adapters(wide, tmp_path / "ad")


def test_version_1_files_still_load(tmp_path):
    """Files written before forms existed: no kind / form keys, version 1 (low-rank banks only)."""
    model = trained()
    save_adapters(model, tmp_path / "ad", names=["time"])
    path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["version"] = 1
    for entry in cfg["adapters"]:
        del entry["kind"], entry["form"]
    path.write_text(json.dumps(cfg))
    x, t, task = inputs()
    target = trained()
    with torch.no_grad():
        for name, p in target.named_parameters():
            if ".adapters.time." in name:
                p.zero_()
        load_adapters(target, tmp_path / "ad")
        assert torch.equal(target(x, t, task=task), model(x, t, task=task))


def test_adapters_package_does_not_import_the_config_schema():
    """Layering (issue 7 item 8): adapters/ takes Python objects; model building reads the YAML schema."""
    import ast
    import pathlib

    import difflora.adapters

    for file in pathlib.Path(difflora.adapters.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                bad = [
                    n
                    for n in names
                    if n.startswith(("difflora.config.schema", "difflora.model.build", "difflora.train"))
                ]
                assert not bad, f"{file.name} imports {bad}"


def test_merged_sampling_path_skips_layers_it_cannot_merge():
    """model.merged("t", "task"): scale / shift / lowrank layers merge, lowrank_act layers stay per sample."""
    model = trained()
    x, t, _ = inputs()
    t = torch.full((4,), 7)
    task = torch.full((4,), 2)
    with torch.no_grad():
        per_sample = model(x, t, task=task)
        with model.merged("t", "task"):
            merged = model(x, t, task=task)
            fc1 = model.net.blocks[0].mlp.fc1
            qkv = model.net.blocks[0].attn.qkv
            assert set(fc1.merged) == {"sc", "sh"} and not qkv.merged  # qkv holds the lowrank_act branch
        assert not fc1.merged and fc1._unmerged_weight is None
    torch.testing.assert_close(merged, per_sample, atol=1e-5, rtol=1e-5)
