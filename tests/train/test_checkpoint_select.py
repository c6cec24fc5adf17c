"""Choosing a checkpoint: by step, by path, or the newest intact one (a damaged newest is skipped
and named); resuming from a chosen older checkpoint replays the same steps bit for bit."""

from __future__ import annotations

import shutil

import pytest
import torch

from difflora.train import CheckpointError, load_checkpoint, train
from difflora.train.checkpoint import CheckpointWarning, checkpoint_problem, select_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config):
    out = tmp_path_factory.mktemp("select") / "run"
    cfg = tiny_config("tiny-unet", "train.steps=4", "train.ckpt_every=2", "sample.num=2")
    train(cfg, out, progress=False, log=lambda s: None)
    return out


def test_select_by_step_and_path(run):
    ckpts = run / "checkpoints"
    assert select_checkpoint(run, 2) == ckpts / "step_0000002"
    assert select_checkpoint(run, "4") == ckpts / "step_0000004"
    assert select_checkpoint(run, "step_0000002") == ckpts / "step_0000002"
    assert select_checkpoint(run, str(ckpts / "step_0000004")) == ckpts / "step_0000004"
    assert select_checkpoint(run) == ckpts / "step_0000004"
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 3; steps: 2, 4"):
        select_checkpoint(run, 3)
    with pytest.raises(CheckpointError, match=r"not a step number nor a checkpoint directory"):
        select_checkpoint(run, "latest")


def test_damaged_newest_is_skipped_and_named(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    model = copy / "checkpoints" / "step_0000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    said = []
    assert select_checkpoint(copy, warn=said.append).name == "step_0000002"
    assert said == [
        f"skipping a damaged checkpoint: checkpoint {model.parent} is cut short: model.safetensors has 100 "
        f"bytes, state.json records {(run / 'checkpoints' / 'step_0000004' / 'model.safetensors').stat().st_size}"
    ]
    with pytest.warns(CheckpointWarning, match="step_0000004 is cut short"):
        select_checkpoint(copy)
    (copy / "checkpoints" / "step_0000002" / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged \(steps 2, 4\)"):
        select_checkpoint(copy, warn=lambda m: None)
    assert "state.json is not valid JSON" in checkpoint_problem(copy / "checkpoints" / "step_0000002")
    assert checkpoint_problem(run / "checkpoints" / "step_0000002") is None


def test_resume_from_an_earlier_checkpoint_replays_the_same_steps(run, tmp_path, tiny_config):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = tiny_config("tiny-unet", "train.steps=4", "train.ckpt_every=2", "sample.num=2")
    train(cfg, copy, resume=True, checkpoint=select_checkpoint(copy, 2), progress=False, log=lambda s: None)
    a = load_checkpoint(run / "checkpoints" / "step_0000004")
    b = load_checkpoint(copy / "checkpoints" / "step_0000004")
    for name in ("model", "ema"):
        for k, v in getattr(a, name).items():
            assert torch.equal(v, getattr(b, name)[k]), f"{name}.{k}"
