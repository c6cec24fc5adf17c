"""Spatial tasks end to end: adapt a base (Affiner + spatial input, or ControlNet), sample, evaluate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflora.cli.commands import main
from difflora.eval import FeatureTrainConfig
from difflora.eval.evaluate import EvalSettings, evaluate_run
from difflora.train import latest_checkpoint, load_checkpoint, train
from helpers import tiny_config

SPATIAL = "data.spatial={tasks: [edges, lowres, inpaint], lowres: 2}"
SHORT = ["train.steps=3", "train.ckpt_every=3", "train.lr=0.01", "train.label_dropout=1.0", "sample.steps=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    cfg = tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2")
    out = tmp_path_factory.mktemp("base") / "run"
    train(cfg, out, progress=False, log=lambda _m: None)
    return out


def _adapt(base: Path, out: Path, *extra: str) -> Path:
    overrides = [SPATIAL, f"train.init_from={base}", "train.train_base=false", *SHORT, *extra]
    train(tiny_config("tiny-unet", *overrides), out, progress=False, log=lambda _m: None)
    return out


@pytest.fixture(scope="module")
def affiner_run(base, tmp_path_factory) -> Path:
    return _adapt(base, tmp_path_factory.mktemp("aff") / "run", "model.affiner={tasks: 3, latent: 4}")


def test_the_adapted_run_stores_its_spatial_input_and_affiner_only(affiner_run):
    stored = load_checkpoint(latest_checkpoint(affiner_run)).model
    assert "net.spatial_in.conv.weight" in stored
    assert stored["net.spatial_in.conv.weight"].abs().sum() > 0  # trained away from zero
    assert not any(k.endswith("base_layer.weight") for k in stored)


def test_controlnet_run_starts_from_a_copy_of_the_base_encoder(base, tmp_path):
    run = _adapt(base, tmp_path / "run", "model.spatial_input=controlnet", "train.lr=1e-12")
    stored = load_checkpoint(latest_checkpoint(run)).model
    base_state = load_checkpoint(latest_checkpoint(base)).ema
    key = "net.input_blocks.1.0.in_layers.2.weight"
    # lr ~ 0: the trained copy still equals the base's (EMA) encoder weights it was copied from.
    torch.testing.assert_close(stored[key.replace("net.", "net.control.")], base_state[key], rtol=1e-5, atol=1e-5)
    assert key not in stored  # the frozen base stays in the base


def test_sample_takes_condition_images_per_task(affiner_run, tmp_path, capsys):
    out, tensor = tmp_path / "s.png", tmp_path / "s.safetensors"
    args = ["sample", str(affiner_run), "--num", "3", "--out", str(out), "--no-progress"]
    assert main([*args, "--condition", "task=0,1,2", "--save-tensor", str(tensor)]) == 0
    saved = load_file(str(tensor))
    assert saved["images"].shape == (3, 1, 8, 8) and saved["spatial"].shape == (3, 4, 8, 8)
    assert "labels" not in saved  # trained with every label dropped: sampled unconditionally
    # Sample 1 (task 1, lowres) has only its slot filled.
    assert saved["spatial"][1, [0, 2, 3]].abs().sum() == 0 and saved["spatial"][1, 1].abs().sum() > 0
    clean = tmp_path / "clean.safetensors"
    save_file({"images": torch.zeros(3, 1, 8, 8)}, str(clean))
    assert main([*args, "--condition", "task=2", "--condition-images", str(clean), "--save-tensor", str(tensor)]) == 0
    assert load_file(str(tensor))["spatial"][:, 2].abs().sum() == 0  # the known region of a blank image
    capsys.readouterr()
    assert main([*args, "--condition", "task=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --condition task") and "5" in err
    assert main(args) == 2
    assert "pass --condition task=K" in capsys.readouterr().err


def test_eval_scores_each_task_with_its_fidelity(affiner_run, tmp_path):
    tiny = FeatureTrainConfig(epochs=1, batch_size=64, max_steps=3, seed=0)
    result = evaluate_run(
        affiner_run,
        EvalSettings(num_samples=12, steps=2, bootstrap=0, floor_draws=2),
        cache_dir=tmp_path / "cache",
        feature_train=tiny,
        out=tmp_path / "eval",
    )
    entries = result["results"]
    assert [e["task"] for e in entries] == ["edges", "lowres", "inpaint"]
    assert set(entries[0]["fidelity"]) == {"edge_f1", "edge_corr"}
    assert set(entries[2]["fidelity"]) == {"known_mse", "known_psnr"}
    assert all("fd" in e and (tmp_path / "eval" / e["grid"]).is_file() for e in entries)
