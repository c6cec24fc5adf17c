"""distill, sweep and study on a pretrained pixel UNet2DModel folder (model.pretrained) as on a difflora run."""

import pytest
import yaml

from difflora.cli.commands import main
from difflora.experiments import study as study_mod
from difflora.train import latest_checkpoint, load_checkpoint
from pretrained_folders import unet_pipeline

pytest.importorskip("diffusers")

LORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": 100, "num_bases": 3, "rank": 2}
TRAIN = {"steps": 2, "batch_size": 4, "log_every": 1, "ckpt_every": 2, "device": "cpu", "train_base": False}
EVAL = {"num_samples": 8, "steps": 2, "guidance": [1], "feature_steps": 3}


def _base(folder):
    return {
        "data": {"name": "digits", "limit": 32},
        "model": {"pretrained": str(folder), "adapters": [LORA]},
        "train": TRAIN,
        "sample": {"num": 2, "steps": 2},
    }


def _write(path, tree):
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def test_distill_a_class_conditional_pretrained_folder(tmp_path, capsys):
    folder = unet_pipeline(tmp_path / "pipe", classes=10)
    out = tmp_path / "student"
    sets = ["distill.targets=[to_q, to_v]", "train.steps=2", "train.batch_size=4", "data.limit=32"]
    argv = ["distill", str(folder), "--guidance", "2", "--out", str(out), "--no-progress"]
    assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0, capsys.readouterr().err
    ckpt = load_checkpoint(latest_checkpoint(out))
    assert ckpt.state["base"]["format"] == "diffusers" and ckpt.state["base"]["path"] == str(folder.resolve())
    assert main(["sample", str(out), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0
    # An unconditional folder cannot teach guidance: said in one line.
    plain = unet_pipeline(tmp_path / "plain")
    assert main(["distill", str(plain), "--out", str(tmp_path / "no"), "--set", "distill.targets=[to_q]"]) == 2
    assert "unconditional" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_sweep_on_a_pretrained_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    folder = unet_pipeline(tmp_path / "pipe")
    factors = {"rank": {"r1": {"model.adapters.0.rank": 1}, "r2": {"model.adapters.0.rank": 2}}}
    sweep = {"name": "pretrained-sweep", "seeds": [0], "eval": EVAL, "base": _base(folder), "factors": factors}
    out = tmp_path / "out"
    assert main(["sweep", _write(tmp_path / "sweep.yaml", sweep), "--out", str(out), "--no-progress"]) == 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3


def test_study_on_a_pretrained_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(study_mod, "git_state", lambda ignore=None: ("c0ffee" * 6 + "c0ff", False))
    folder = unet_pipeline(tmp_path / "pipe")
    arms = [{"name": "lora", "adapters": [LORA]}, {"name": "lora-r1", "adapters": [LORA | {"rank": 1}]}]
    base = _base(folder)
    del base["model"]["adapters"]
    study = {"name": "pretrained-study", "seeds": [0], "eval": EVAL, "base": base, "arms": arms}
    out = tmp_path / "out"
    path = _write(tmp_path / "study.yaml", {**study, "report_dir": str(tmp_path / "docs")})
    assert main(["study", path, "--out", str(out), "--no-progress"]) == 0
    assert "| lora-r1 |" in (tmp_path / "docs" / "pretrained-study.md").read_text()
