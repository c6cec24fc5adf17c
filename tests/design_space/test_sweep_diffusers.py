"""004's sweep on a diffusers UNet2DConditionModel (``model.arch: diffusers``): the shipped sweep's
factors apply unchanged (the same tap names, the same block targets), and ``difflora sweep`` runs,
skipping the pairs outside 004's space with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("diffusers")

from difflora.cli.commands import main  # noqa: E402
from difflora.design_space.sweep import Sweep, plan_sweep, read_results  # noqa: E402
from difflora.presets import EXPERIMENTS_DIR  # noqa: E402

SHIPPED = yaml.safe_load((EXPERIMENTS_DIR / "design-space" / "sweep.yaml").read_text())
UNET = {
    "block_out_channels": [16, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "cross_attention_dim": 16,
}


def tiny_sweep(factors: dict, **extra) -> dict:
    """A sweep over a tiny diffusers UNet with the shipped sweep's adapter (rank 2)."""
    return {
        "name": "tiny-diffusers-sweep",
        "seeds": [0],
        "eval": {"num_samples": 8, "steps": 2, "guidance": [1], "feature_steps": 3},
        "base": {
            "data": {"name": "digits"},
            "model": {
                "arch": "diffusers",
                "num_classes": 10,
                "learn_sigma": False,
                "diffusers": {"class_name": "UNet2DConditionModel", "config": UNET},
                "adapters": [{**SHIPPED["base"]["model"]["adapters"][0], "rank": 2}],
            },
            "diffusion": {"steps": 20},
            "train": {
                "steps": 2,
                "batch_size": 4,
                "log_every": 1,
                "ckpt_every": 2,
                "device": "cpu",
                "train_base": False,
            },
            "sample": {"num": 2, "steps": 2},
        },
        "factors": factors,
        **extra,
    }


def test_the_shipped_design_space_factors_apply_unchanged_to_a_diffusers_unet():
    tree = tiny_sweep(SHIPPED["factors"], design=SHIPPED["design"], generators=SHIPPED["generators"])
    runnable, skipped = plan_sweep(Sweep.model_validate(tree))
    assert len(runnable) == 10 and not skipped  # the 10 cells of the fraction, every one builds
    assert {(c["input"], c["output"]) for c, _ in runnable} == {
        (i, o) for i in SHIPPED["factors"]["input"] for o in SHIPPED["factors"]["output"]
    }


def test_difflora_sweep_runs_on_a_diffusers_unet_and_skips_pairs_outside_004(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    factors = {
        "input": {s: {"model.adapters.0.source": s} for s in ("attn2_out", "ff_out")},
        "output": {d: {"model.adapters.0.dest": d} for d in ("attn2_in", "out")},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep(factors, skip_invalid=True), sort_keys=False))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("skipped")]
    assert len(skipped) == 2 and all("valid pairs" in line for line in skipped)
    rows = read_results(tmp_path / "out" / "results.csv")
    assert [(r["input"], r["output"]) for r in rows] == [("attn2_out", "out"), ("ff_out", "out")]
    for r in rows:
        assert r["fd"] > 0 and r["params_trainable"] == 3 * (5 * 16 + 2) + (
            5 * 32 + 2
        )  # down, up and biases at widths 16 (x3) and 32
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.json").read_text())
        assert cfg["model"]["arch"] == "diffusers" and cfg["model"]["adapters"][0]["source"] == r["input"]
