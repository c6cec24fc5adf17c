"""Parameter accounting: every adapter form and position adapter lands in the "adapters" group."""

from __future__ import annotations

from pathlib import Path

from difflora.adapters import adapter_parameters
from difflora.model.accounting import parameter_counts
from difflora.model.build import build_model

ROOT = Path(__file__).resolve().parents[2]


def test_every_adapter_form_is_counted_as_adapters(tiny_config):
    adapters = (
        "model.adapters=["
        "{name: a, form: scale, condition: task, weighting: index, num_values: 2, targets: [fc1]},"
        "{name: b, form: shift, condition: task, weighting: index, num_values: 2, targets: [fc1]},"
        "{name: lr, form: lowrank_act, activation: relu, rank: 3, condition: task, weighting: index, num_values: 2, targets: [fc2]},"
        "{name: lin, form: lowrank, weighting: trainable, num_values: 100, num_bases: 3, targets: [attn.qkv]},"
        "{name: pa, form: position, source: attn_out, dest: mlp_in, rank: 4, condition: task, weighting: index,"
        ' num_values: 2, targets: ["re:blocks\\\\.\\\\d+"]}]'
    )
    cfg = tiny_config("tiny-dit", adapters)
    model = build_model(cfg)
    groups = parameter_counts(model)["by_group"]
    tables = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weighting.table"))
    owned = sum(p.numel() for p in adapter_parameters(model))
    assert tables > 0
    assert groups["weighting"] == tables
    assert groups["adapters"] == owned - tables
    assert groups["base"] + groups["embeddings"] == sum(p.numel() for p in model.parameters()) - owned
