"""Issue 31's arms of the DiffScaler study: LoRA and the Affiner at each other's budget, 002's embedding
row, and DiffFit as 002 describes it, counted on the study's own backbones by independent rules."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from difflora.adapters import conditions
from difflora.config.schema import parse_config
from difflora.diffscaler.baselines import ALL_LAYERS, baseline_overrides
from difflora.experiments.study_spec import arm_config, load_study
from difflora.model.build import build_model
from difflora.presets import EXPERIMENTS_DIR

STUDY = load_study(EXPERIMENTS_DIR / "diffscaler" / "datasets.yaml")
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _tree(arch: str) -> dict:
    arm = next(a for a in STUDY.arms if a.name == f"{arch}-mnist5k-lora")
    return arm_config(STUDY, arm, 0).model_dump(mode="json")


def _build(arch: str, *sets: str):
    return build_model(parse_config(_tree(arch), ["train.init_from=null", *sets, "data.task_id=0"]))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _layers(arch: str) -> dict[str, nn.Module]:
    plain = _build(arch, "model.adapters=[]", "model.affiner=null")
    return {p: m for p, m in plain.net.named_modules() if isinstance(m, LAYERS)}


@pytest.mark.parametrize(("arch", "rank", "affiner"), [("unet", 13, 292_508), ("dit", 59, 769_044)])
def test_lora_on_every_layer_reaches_the_affiner_budget(arch, rank, affiner):
    layers = _layers(arch)
    # LoRA of rank r adds r (fan_in + fan_out) per layer; a k x k convolution's fan_in is in x k x k.
    per_rank = sum(m.weight[0].numel() + m.weight.shape[0] for m in layers.values())
    model = _build(arch, *baseline_overrides(f"lora-all-r{rank}", arch))
    wrapped = {p.removesuffix(".base_layer") for p, m in model.net.named_modules() if isinstance(m, LAYERS)}
    assert set(layers) <= wrapped  # every Linear and Conv of the backbone is wrapped
    assert _trainable(model) == rank * per_rank
    assert (rank - 1) * per_rank < affiner <= rank * per_rank * 1.01  # the smallest rank within 1%
    assert _trainable(_build(arch, *baseline_overrides("affiner", arch))) == affiner


@pytest.mark.parametrize(
    ("arch", "method", "count", "budget"),
    [
        ("unet", "affiner-at-lora", 12_564, 12_288),
        ("dit", "affiner-at-lora", 25_616, 24_576),
        ("unet", "affiner-at-difffit", 8_708, 8_802),
        ("dit", "affiner-at-difffit", 9_216, 9_352),
    ],
)
def test_the_affiner_at_the_baselines_budgets(arch, method, count, budget):
    layers = _layers(arch)
    latent = {"affiner-at-lora": {"unet": 1, "dit": 2}, "affiner-at-difffit": {"unet": 0, "dit": 0}}[method][arch]
    if arch == "unet":  # every layer; at LoRA's budget without the ResBlocks' timestep projections
        chosen = [m for p, m in layers.items() if method == "affiner-at-difffit" or "emb_layers" not in p]
    else:  # the blocks' attention and MLP layers
        chosen = [m for p, m in layers.items() if p.startswith("blocks.") and "adaLN" not in p]
    # a and b: one per output channel each; the branch: d (in + out) with 1x1 convolutions, plus s.
    branch = sum(latent * (m.weight.shape[1] + m.weight.shape[0]) + 1 for m in chosen) if latent else 0
    expected = sum(2 * m.weight.shape[0] for m in chosen) + branch
    assert _trainable(_build(arch, *baseline_overrides(method, arch))) == expected == count
    assert abs(count - budget) / budget < 0.05


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_the_task_row_trains_one_embedding_row_with_every_label_dropped(arch):
    model = _build(arch, *baseline_overrides("task-row", arch))
    assert _trainable(model) == 128  # the time (conditioning) embedding's width
    torch.manual_seed(0)
    with torch.no_grad():  # a trained base: no zero-initialised output layer blocks the gradient
        for p in model.parameters():
            if not p.requires_grad:
                p.normal_(0, 0.05)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 500])
    y = torch.full((2,), -1)  # every label dropped, as in the study
    task = torch.zeros(2, dtype=torch.long)
    with conditions(task=task):
        model.net(x, t, y).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_difffit_as_002_describes_it_trains_the_mlp_and_attention_output_biases():
    layers = _layers("dit")
    chosen = [m for p, m in layers.items() if p.endswith(("mlp.fc1", "mlp.fc2", "attn.proj"))]
    assert len(chosen) == 12
    model = _build("dit", *baseline_overrides("difffit-002", "dit"))
    assert _trainable(model) == sum(m.bias.numel() for m in chosen) == 3_072


def test_all_layers_selects_exactly_the_linear_and_conv_layers():
    for arch in ("unet", "dit"):
        lora = {"name": "l", "condition": "task", "weighting": "index", "num_values": 1, "targets": ALL_LAYERS[arch]}
        model = _build(arch, "model.affiner=null", f"model.adapters={json.dumps([lora])}")
        assert sum(type(m).__name__ == "ConditionalLayer" for m in model.net.modules()) == len(_layers(arch))
