"""DiffScaler's Affiner (002 eq. 5) as a recipe over the generic forms: counts, zero start, 1x1 branches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflora.adapters import ConditionalLayer, IndexWeighting, adapter_layers, conditions
from difflora.cli.commands import main
from difflora.config.schema import ConfigError, DataConfig, parse_config
from difflora.data import load_dataset
from difflora.diffscaler import AFFINER_NAMES, affiner_adapter_configs, affiner_counts
from difflora.model.build import build_model
from difflora.presets import CONFIGS_DIR
from helpers import FROZEN_TASK0, TINY_ARCH

ROOT = Path(__file__).resolve().parents[2]
TOL = dict(rtol=0, atol=1e-5)


def test_dit_xl2_a_only_and_b_only_count_the_bias_of_every_adapted_layer():
    # 002 Table 3(a): "a only" and "b only" both 0.48M = the biases of DiT-XL/2's qkv, proj, fc1,
    # fc2 and adaLN layers. Counted from the shapes, independently: hidden 1152, MLP 4 x 1152.
    d = 1152
    per_block_bias = 3 * d + d + 4 * d + d + 6 * d
    assert 28 * per_block_bias == 28 * 17_280 == 483_840
    for part in ("scale", "shift"):
        cfg = parse_config(
            {
                "data": {"name": "cifar10", "task_id": 0},
                "model": {
                    "arch": "dit",
                    "num_classes": 1000,
                    "dit": {"preset": "DiT-XL/2"},
                    "affiner": {"parts": [part]},
                },
                "train": {"train_base": False},
            }
        )
        with torch.device("meta"):
            model = build_model(cfg)
        counts = affiner_counts(model.net)
        assert counts["per_task"] == {AFFINER_NAMES[part]: 483_840}
        assert counts["layers"] == 28 * 5
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == 483_840


def test_dit_xl2_full_affiner_at_d64_counts_the_low_rank_branch_from_the_shapes():
    cfg = parse_config(
        {
            "data": {"name": "cifar10", "task_id": 0},
            "model": {"arch": "dit", "num_classes": 1000, "dit": {"preset": "DiT-XL/2"}, "affiner": {"tasks": 2}},
        }
    )
    with torch.device("meta"):
        model = build_model(cfg)
    d, r = 1152, 64
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d), (d, 6 * d)]  # (in, out) of the five targets
    low_rank = 28 * sum(r * (i + o) + 1 for i, o in shapes)  # W_down, W_up and the scalar s
    counts = affiner_counts(model.net)
    assert counts["tasks"] == 2
    assert counts["per_task"]["affiner_lr"] == low_rank == 47_480_972
    assert counts["total_per_task"] == low_rank + 2 * 483_840 == 48_448_652


def test_default_targets_dit_blocks_only_and_every_unet_layer(tiny_config):
    dit = build_model(tiny_config(FROZEN_TASK0, TINY_ARCH["dit"], {"model.affiner": {}}))
    paths = {p for p, _ in adapter_layers(dit.net)}
    block = {f"blocks.0.{s}" for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")}
    assert block <= paths and len(paths) == 5 * len(dit.net.blocks)
    assert not any(p.startswith(("x_embedder", "final_layer", "t_embedder")) for p in paths)
    unet = build_model(tiny_config(FROZEN_TASK0, TINY_ARCH["unet"], {"model.affiner": {}}))
    layers = {p for p, m in unet.net.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    wrapped = {p for p, _ in adapter_layers(unet.net)}
    base_paths = {p.removesuffix(".base_layer") for p in layers}
    assert wrapped == base_paths and "input_blocks.0.0" in wrapped and "out.2" in wrapped
    # The U-Net's default latent width is 32, the DiT's 64 (002 section 4.3).
    assert unet.net.get_submodule("out.2").adapters["affiner_lr"].rank == 32
    assert dit.net.get_submodule("blocks.0.attn.qkv").adapters["affiner_lr"].rank == 64


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_an_untrained_affiner_changes_no_output_bit_for_bit(arch, tiny_config):
    torch.manual_seed(0)
    plain = build_model(tiny_config(FROZEN_TASK0, TINY_ARCH[arch], {"model.affiner": None}))
    with torch.no_grad():  # a "trained" base: zero-initialised layers (adaLN, out.2) would hide changes
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    adapted = build_model(tiny_config(FROZEN_TASK0, TINY_ARCH[arch], {"model.affiner": {"tasks": 3}}))
    _, unexpected = adapted.load_state_dict(_base_state(adapted, plain), strict=False)
    assert not unexpected
    x, t = torch.randn(6, 1, 8, 8), torch.randint(50, (6,))
    y = torch.tensor([0, 1, 2, -1, 4, 5])
    task = torch.tensor([0, 1, 2, -1, 2, 0])
    with torch.no_grad():
        assert torch.equal(adapted(x, t, y, task=task), plain(x, t, y))


def _base_state(adapted: nn.Module, plain: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's weights under the adapted model's keys (wrapped layers hold ``base_layer``)."""
    state = plain.state_dict()
    out = {}
    for key in adapted.state_dict():
        base_key = key.replace(".base_layer", "")
        if base_key in state:
            out[key] = state[base_key]
    assert len(out) == len(state)
    return out


def test_the_1x1_branch_of_a_strided_3x3_conv_reads_the_centre_of_each_receptive_field():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    layer = ConditionalLayer(conv)
    branch = layer.add_adapter(
        "lr", IndexWeighting(2), "task", rank=3, form="lowrank_act", activation="relu", kernel="1x1"
    )
    with torch.no_grad():
        branch.lora_s.copy_(torch.tensor([0.7, -1.3]))
    assert branch.lora_down.shape == (2, 3, 4)  # 1x1: C inputs per row, not C k k
    x = torch.randn(3, 4, 9, 9)
    task = torch.tensor([1, -1, 0])
    with conditions(task=task), torch.no_grad():
        out = layer(x)
    # Reference: the centre taps of the base's 3x3 stride-2 padding-1 windows are x[:, :, ::2, ::2].
    centre = x[:, :, ::2, ::2]
    ref = conv(x)
    for n, k in enumerate(task.tolist()):
        if k < 0:
            continue
        h = F.relu(torch.einsum("rc,chw->rhw", branch.lora_down[k], centre[n]))
        ref[n] += branch.lora_s[k] * torch.einsum("or,rhw->ohw", branch.lora_up[k], h)
    torch.testing.assert_close(out, ref, **TOL)


def test_affiner_configs_expand_to_three_adapters_and_refuse_a_name_clash(tiny_config):
    cfg = tiny_config(FROZEN_TASK0, TINY_ARCH["dit"], {"model.affiner": {"tasks": 4, "latent": 8}})
    configs = affiner_adapter_configs(cfg.model, build_model(cfg).net)
    assert [(c.name, c.form, c.num_values) for c in configs] == [
        ("affiner_a", "scale", 4),
        ("affiner_b", "shift", 4),
        ("affiner_lr", "lowrank_act", 4),
    ]
    assert configs[2].rank == 8 and configs[2].activation == "relu" and configs[2].kernel == "1x1"
    shift = {"name": "affiner_b", "form": "shift", "weighting": "index", "num_values": 2}
    clash = tiny_config(FROZEN_TASK0, TINY_ARCH["dit"], {"model.affiner": {}, "model.adapters": [shift]})
    with pytest.raises(ValueError, match="affiner_b"):
        build_model(clash)


def test_params_prints_the_affiner_parameters_per_task(capsys):
    code = main(
        [
            "params",
            str(CONFIGS_DIR / "tiny-dit.yaml"),
            "--set",
            "model.affiner={tasks: 3, latent: 4}",
            "--set",
            "data.task_id=0",
            "--json",
        ]
    )
    assert code == 0
    counts = json.loads(capsys.readouterr().out)["affiner"]
    d, hidden = 4, 64  # DiT-T/2: 2 blocks, hidden 64
    shapes = [(hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden), (hidden, 6 * hidden)]
    bias = sum(o for _, o in shapes)
    assert counts["tasks"] == 3
    assert counts["per_task"] == {
        "affiner_a": 2 * bias,
        "affiner_b": 2 * bias,
        "affiner_lr": 2 * sum(d * (i + o) + 1 for i, o in shapes),
    }


def test_a_task_affiner_needs_task_ids_in_the_data_and_an_entry_for_each():
    model = {"arch": "dit", "dit": {"preset": "DiT-T/2"}, "affiner": {"tasks": 2}}
    with pytest.raises(ConfigError, match="data.task_id"):
        parse_config({"data": {"name": "digits"}, "model": model})
    with pytest.raises(ConfigError, match="model.affiner.tasks=3"):
        parse_config({"data": {"name": "digits", "task_id": 2}, "model": model})
    with pytest.raises(ConfigError, match="model.affiner.tasks=4"):
        parse_config(
            {
                "data": {"name": "digits", "task_id": 1, "tasks": [{"name": "digits"}, {"name": "digits"}]},
                "model": model,
            }
        )


def test_data_task_id_numbers_a_single_dataset_and_the_tasks_after_it():
    one = load_dataset(DataConfig(name="digits", task_id=3, limit=5), "train")
    assert one.batch_conditions(torch.arange(5))["task"].tolist() == [3] * 5
    many = load_dataset(DataConfig(name="digits", task_id=1, limit=2, tasks=[{"name": "digits", "limit": 3}]), "train")
    assert many.conditions["task"].tolist() == [1, 1, 2, 2, 2]
    assert load_dataset(DataConfig(name="digits", limit=2), "train").conditions == {}
