"""The baselines of 002 Table 1 and the Affiner ablations of 002 Table 3 train exactly what they name."""

from __future__ import annotations

import pytest

from difflora.diffscaler import affiner_counts
from difflora.diffscaler.baselines import BASELINES, baseline_overrides, per_task_counts
from difflora.model.build import build_model
from difflora.presets import EXPERIMENTS_DIR
from helpers import tiny_config

# DiT-T/2 on 8x8 digits, learn_sigma: depth 2, hidden D = 64, MLP 4D, patch 2, 2 output channels.
D, DEPTH = 64, 2
BLOCK_OUT = 3 * D + D + 4 * D + D + 6 * D  # qkv, proj, fc1, fc2, adaLN: 960 biases per block
BLOCK_IN = D + D + D + 4 * D + D  # their fan-ins: 512


def _build(arch: str, method: str, tasks: int = 1):
    sets = [*baseline_overrides(method, arch, tasks), f"data.task_id={tasks - 1}"]
    return build_model(tiny_config(f"tiny-{arch}", *sets))


def _trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def test_each_dit_baseline_trains_the_hand_counted_parameters():
    x_embed_b, t_mlp_b, final_b = D, D + D, 2 * D + 2 * 2 * 2  # final adaLN 2D, final linear p*p*C_out
    bitfit = x_embed_b + t_mlp_b + DEPTH * BLOCK_OUT + final_b
    assert bitfit == 2248
    expected = {
        "bitfit": bitfit,
        # DiT's norms have no affine parameters; gamma: one per channel of attn.proj and mlp.fc2.
        "difffit": bitfit + DEPTH * (D + D),
        # t_embedder.mlp: Linear(256, D), Linear(D, D); y_embedder: 10 classes + the null row.
        "embeddings": (256 * D + D) + (D * D + D) + 11 * D,
        # rank 8 on attn.qkv (D -> 3D) and attn.proj (D -> D).
        "lora": DEPTH * 8 * ((D + 3 * D) + (D + D)),
        "affiner-b": DEPTH * BLOCK_OUT,
        "affiner-a": DEPTH * BLOCK_OUT,
        "affiner-ab": 2 * DEPTH * BLOCK_OUT,
    }
    # Latent d: a, b and per layer s W_up ReLU(W_down x): d (fan_in + fan_out) + 1 (s), 5 layers a block.
    for d in (1, 4, 16, 32):
        expected[f"affiner-d{d}"] = DEPTH * (2 * BLOCK_OUT + d * (BLOCK_IN + BLOCK_OUT) + 5)
    expected["affiner"] = DEPTH * (2 * BLOCK_OUT + 64 * (BLOCK_IN + BLOCK_OUT) + 5)
    full = sum(p.numel() for p in build_model(tiny_config("tiny-dit")).parameters())
    expected["full"] = full
    assert set(expected) == set(BASELINES)
    for method, count in expected.items():
        model = _build("dit", method)
        assert sum(_trainable(model).values()) == count, method
        counts = per_task_counts(model.net)
        assert counts["stored_per_task"] == count, method


def test_unet_baselines_train_the_parameters_named_by_an_independent_rule():
    plain = build_model(tiny_config("tiny-unet"))
    names = {n: p.numel() for n, p in plain.named_parameters()}
    norms = (".in_layers.0.", ".out_layers.0.", ".norm.", "net.out.0.")
    rule = {
        "bitfit": {n for n in names if n.endswith(".bias")},
        "embeddings": {n for n in names if n.startswith(("net.time_embed.", "net.label_emb."))},
    }
    rule["difffit"] = rule["bitfit"] | {n for n in names if any(k in n for k in norms)}
    for method, chosen in rule.items():
        trained = _trainable(_build("unet", method))
        base = {n.replace(".base_layer", ""): k for n, k in trained.items() if ".adapters." not in n}
        assert set(base) == chosen, method
        gamma = {n for n in trained if ".adapters." in n}
        if method == "difffit":  # one gamma per output channel of every residual branch's last layer
            outs = {n.rsplit(".", 1)[0] for n in names if n.endswith(("out_layers.3.weight", "proj_out.weight"))}
            assert sum(trained[n] for n in gamma) == sum(names[o + ".bias"] for o in outs)
            assert len(gamma) == len(outs)
        else:
            assert not gamma


def test_affiner_ablation_counts_match_the_formulae_per_task_with_three_tasks():
    for method, per_layer in (("affiner-b", 1), ("affiner-a", 1), ("affiner-ab", 2)):
        model = _build("dit", method, tasks=3)
        counts = affiner_counts(model.net)
        assert counts["tasks"] == 3 and counts["total_per_task"] == per_layer * DEPTH * BLOCK_OUT
        assert per_task_counts(model.net)["task_entry"] == per_layer * DEPTH * BLOCK_OUT
        assert sum(_trainable(model).values()) == 3 * per_layer * DEPTH * BLOCK_OUT


def test_base_groups_need_a_frozen_base_and_unknown_methods_are_refused():
    with pytest.raises(ValueError, match="train.train_base=false"):
        build_model(tiny_config("tiny-unet", "train.base_groups=[bias]"))
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_overrides("adapterx", "unet")


def test_params_prints_the_parameters_stored_per_task(capsys):
    from difflora.cli.commands import main

    sets = [f"--set={o}" for o in baseline_overrides("bitfit", "dit", tasks=1)] + ["--set=data.task_id=0"]
    assert main(["params", "tiny-dit", *sets]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("stored per task"))
    assert "2,248" in line and "shared trainable 2,248" in line


def test_the_study_arms_are_the_baselines_at_one_budget():
    from difflora.diffscaler.baselines import baseline_values
    from difflora.experiments.study_spec import arm_config, load_study

    study = load_study(EXPERIMENTS_DIR / "diffscaler" / "datasets.yaml")
    steps = set()
    for arm in study.arms:
        arch, _, method = arm.name.split("-", 2)
        cfg = arm_config(study, arm, 0)
        if method.endswith("-masked-600"):  # post hoc: masked training at the unmasked arm's compute
            assert (cfg.train.steps, cfg.train.mask_ratio) == (600, 0.5), arm.name
            method = method.removesuffix("-masked-600")
        else:
            steps.add(cfg.train.steps)
        method = method.removesuffix("-masked")
        assert arm.set.items() >= baseline_values(method, arch).items(), arm.name
    assert steps == {300}
