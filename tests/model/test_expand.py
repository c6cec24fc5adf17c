"""The one expansion step of model building: shared parts first, then the papers', each applied once."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from difflora.adapters import adapter_layers
from difflora.diffscaler import AFFINER_NAMES
from difflora.model.expand import EXPANSIONS, adapter_entries, expand_model, freeze_entries
from helpers import FROZEN_TASK0, TINY_ARCH


def test_the_shared_parts_come_first_then_002s_in_its_order():
    names = list(EXPANSIONS)
    assert names[:2] == ["adapters", "context_tokens"]
    mine = [n for n in names if n in ("affiner", "base_groups", "new_classes")]
    assert mine == ["affiner", "base_groups", "new_classes"]


def test_adapter_entries_list_model_adapters_then_the_affiner_and_targets_need_the_net(tiny_config):
    lora = {"name": "lora", "condition": "task", "weighting": "index", "num_values": 2, "rank": 2}
    cfg = tiny_config(
        FROZEN_TASK0, TINY_ARCH["unet"], {"model.adapters": [lora], "model.affiner": {"tasks": 2, "latent": 4}}
    )
    entries = adapter_entries(cfg)
    assert [e.name for e in entries] == ["lora", *AFFINER_NAMES.values()]
    assert all(not e.targets for e in entries[1:])  # no net: no default targets (enough for --condition)
    net, report = expand_model(cfg)
    assert all(e.targets for e in adapter_entries(cfg, net)[1:])
    assert {row.adapter for row in report.layers} == {"lora", *AFFINER_NAMES.values()}


def test_a_plain_config_injects_nothing_and_reports_none(tiny_config):
    net, report = expand_model(tiny_config(FROZEN_TASK0, TINY_ARCH["unet"]))
    assert report is None
    assert all(not p.requires_grad for p in net.parameters())  # train.train_base false: all frozen


def test_building_under_the_meta_device_leaves_no_meta_tensor_in_the_modules_it_imports():
    # Building loads the paper packages (difflora.registry); `difflora params` does that under
    # torch.device("meta"), so a tensor made at import would stay on "meta" for the process.
    code = (
        "import torch\n"
        "from difflora.config.schema import parse_config\n"
        "from difflora.model.build import build_model\n"
        "cfg = parse_config({'data': {'name': 'digits'}, 'model': {'arch': 'unet', 'unet': {'model_channels': 16,"
        " 'num_res_blocks': 1, 'attention_resolutions': [4], 'channel_mult': [1, 2]}}})\n"
        "with torch.device('meta'):\n"
        "    build_model(cfg)\n"
        "from difflora.data.spatial import edge_map\n"
        "print(edge_map(torch.zeros(1, 1, 4, 4)).device)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cpu"


def test_freezing_entries_is_all_or_nothing_over_the_layers(tiny_config):
    lora = {"name": "a", "condition": "task", "weighting": "index", "num_values": 3, "rank": 2}
    net, _ = expand_model(tiny_config(FROZEN_TASK0, TINY_ARCH["unet"], {"model.adapters": [lora]}))
    layers = list(adapter_layers(net))
    assert len(layers) > 1
    # The last layer's bank holds 2 entries: freezing 3 fits every layer but that one.
    last = layers[-1][1].adapters["a"]
    last.set_entries({n: last.entries(n)[:2] for n in last.bank_names}, 0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {k: p.requires_grad for k, p in net.named_parameters()}
    with pytest.raises(
        ValueError, match=rf"adapter a on {layers[-1][0]}: frozen entries must be in 0\.\.2, got 3; no layer"
    ):
        freeze_entries(net, "a", 3)
    assert {k: p.requires_grad for k, p in net.named_parameters()} == grads  # no parameter renamed or frozen
    assert (
        all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and before.keys() == net.state_dict().keys()
    )
    freeze_entries(net, "a", 2)
    assert all(layer.adapters["a"].frozen == 2 for _, layer in layers)
