"""`difflora pretrain NAME`: shared bases trained once into the cache, resumed, reused, adapted by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from difflora.cli.commands import main, resolve_config_path
from difflora.config.schema import load_config
from difflora.model.build import build_model
from difflora.train import train
from difflora.train.base import resolve_base_checkpoint
from helpers import write_mnist_like

ROOT = Path(__file__).resolve().parents[2]
# The preset, shrunk to seconds: a small batch, a tiny sample grid (data.root: files the test writes).
SHRINK = ["train.batch_size=4", "train.ckpt_every=2", "sample.num=2", "sample.steps=2"]


@pytest.fixture
def fashion(tmp_path) -> list[str]:
    """Override pointing data.root at 28 x 28 Fashion-MNIST-format IDX files written here."""
    write_mnist_like(tmp_path / "fmnist", compress=True, sizes=(32, 8), side=28)
    return [*SHRINK, f"data.root={tmp_path / 'fmnist'}"]


@pytest.mark.parametrize("name", ["fmnist16-unet", "fmnist16-dit"])
def test_presets_are_class_conditional_fashion_mnist_16px_with_label_dropout(name):
    cfg = load_config(resolve_config_path(f"pretrain/{name}"))
    assert (cfg.data.name, cfg.data.image_size, cfg.model.num_classes) == ("fashion-mnist", 16, 10)
    assert cfg.train.label_dropout > 0 and cfg.train.init_from is None and cfg.model.affiner is None
    with torch.device("meta"):
        assert sum(p.numel() for p in build_model(cfg).parameters()) > 0


def test_pretrain_resumes_reuses_and_is_adapted_by_name(tmp_path, monkeypatch, capsys, fashion, tiny_config):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "cache" / "bases" / "fmnist16-unet"
    cfg = tiny_config("pretrain/fmnist16-unet", *fashion, "train.steps=4")
    train(cfg, run, stop_at=2, progress=False, log=lambda _: None)  # an interrupted pretraining
    with pytest.raises(ValueError, match="unfinished"):
        resolve_base_checkpoint("pretrained:fmnist16-unet")

    args = [
        "pretrain",
        "fmnist16-unet",
        "--no-progress",
        *[a for s in [*fashion, "train.steps=4"] for a in ("--set", s)],
    ]
    assert main(args) == 0  # resumes from step 2
    out = capsys.readouterr().out
    assert "resuming" in out and out.strip().splitlines()[-1] == str(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4
    assert main(args) == 0  # finished: reused, nothing trained
    assert "nothing to train" in capsys.readouterr().out
    assert (run / "metrics.jsonl").read_text().count("\n") == len(rows)
    assert resolve_base_checkpoint("pretrained:fmnist16-unet") == (run / "checkpoints" / "step_0000004").resolve()

    # Another config under the same name is refused, naming the cached run.
    assert main([*args, "--set", "train.lr=0.5"]) == 2
    assert "trained with another config" in capsys.readouterr().err

    # A study adapts it by name.
    adapted = tiny_config(
        "pretrain/fmnist16-unet",
        *fashion,
        "train.steps=1",
        "train.init_from=pretrained:fmnist16-unet",
        "train.train_base=false",
        "model.affiner={tasks: 1, latent: 2}",
        "data.task_id=0",
    )
    result = train(adapted, tmp_path / "adapted", progress=False, log=lambda _: None)
    assert result["step"] == 1


def test_a_missing_base_names_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="difflora pretrain fmnist16-dit"):
        resolve_base_checkpoint("pretrained:fmnist16-dit")
    with pytest.raises(ValueError, match="preset name"):
        resolve_base_checkpoint("pretrained:../x")
