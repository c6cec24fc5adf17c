"""The CLI end to end on a pretrained pixel UNet2DModel pipeline folder (model.pretrained): params,
adapter training, an interrupted run resumed bit for bit, sample, eval; a changed folder is found."""

import json
import re

import pytest
import yaml

from difflora.cli.commands import main
from difflora.train import latest_checkpoint, load_checkpoint
from difflora.train.objectives import DiffusionObjective
from pretrained_folders import unet_pipeline

pytest.importorskip("diffusers")

LORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": 100, "num_bases": 3, "rank": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return unet_pipeline(tmp_path_factory.mktemp("pretrained") / "pipe")


def _config(folder, tmp_path):
    tree = {
        "data": {"name": "digits", "limit": 64},
        "model": {"pretrained": str(folder), "adapters": [LORA]},
        "train": {"train_base": False, "steps": 6, "batch_size": 8, "ckpt_every": 2, "log_every": 1},
        "sample": {"num": 4, "steps": 5},
    }
    path = tmp_path / "adapt.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _interrupt_at(monkeypatch, call):
    real, calls = DiffusionObjective.__call__, {"n": 0}

    def patched(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionObjective, "__call__", patched)


def test_train_interrupt_resume_sample_eval(folder, tmp_path, monkeypatch, capsys):
    config = _config(folder, tmp_path)
    assert main(["params", config]) == 0
    out = capsys.readouterr().out
    total, trainable = (int(re.search(rf"{k}\s+([\d,]+)", out)[1].replace(",", "")) for k in ("total", "trainable"))
    assert 0 < trainable < total  # the adapters train, the pretrained base is frozen
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(["train", config, "--out", str(straight), "--no-progress"]) == 0
    _interrupt_at(monkeypatch, 4)
    assert main(["train", config, "--out", str(cut), "--no-progress"]) != 0
    monkeypatch.undo()
    assert load_checkpoint(latest_checkpoint(cut)).step == 3
    assert main(["train", config, "--out", str(cut), "--resume", "--no-progress"]) == 0
    a, b = (load_checkpoint(latest_checkpoint(r)) for r in (straight, cut))
    assert a.step == b.step == 6 and a.model.keys() == b.model.keys()
    for name in ("model", "ema"):
        for key, value in getattr(a, name).items():
            assert value.equal(getattr(b, name)[key]), f"{name}.{key}"
    # The checkpoints hold the adapters only; the base is the folder, recorded with its fingerprint.
    base = a.state["base"]
    assert base["path"] == str(folder.resolve()) and base["format"] == "diffusers"
    assert all(".adapters." in k for k in a.model)
    capsys.readouterr()
    png = tmp_path / "grid.png"
    assert main(["sample", str(straight), "--num", "4", "--steps", "5", "--out", str(png)]) == 0 and png.is_file()
    ev = tmp_path / "ev"
    argv = ["eval", str(straight), "--num-samples", "8", "--steps", "2", "--feature-steps", "3", "--no-progress"]
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--out", str(ev)]) == 0
    assert json.loads((ev / "metrics.json").read_text())


def test_a_changed_folder_is_found_when_the_run_is_reopened(tmp_path, capsys):
    folder = unet_pipeline(tmp_path / "pipe")
    config = _config(folder, tmp_path)
    run = tmp_path / "run"
    assert main(["train", config, "--out", str(run), "--no-progress", "--set", "train.steps=2"]) == 0
    unet_pipeline(tmp_path / "pipe", seed=1)  # the same architecture, other weights
    capsys.readouterr()
    assert main(["sample", str(run), "--num", "4", "--steps", "5", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "now holds other weights" in err and str(folder.resolve()) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()
