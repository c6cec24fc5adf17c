"""The command line end to end on a tiny config, and the errors a user sees."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from difflora.cli.commands import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert (
        main(
            [
                "train",
                "tiny-unet",
                "--out",
                str(out),
                "--no-progress",
                "--set",
                "train.steps=4",
                "--set",
                "train.ckpt_every=2",
            ]
        )
        == 0
    )
    return out


def test_train_writes_a_run_directory(run_dir):
    for name in ("config.json", "metrics.jsonl", "accounting.json"):
        assert (run_dir / name).is_file()
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 4
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_sample_writes_a_png(run_dir, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert (
        main(
            [
                "sample",
                str(run_dir),
                "--num",
                "6",
                "--steps",
                "3",
                "--sampler",
                "ddpm",
                "--guidance",
                "2",
                "--class",
                "3",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote 6 samples (step 4, ema weights)" in capsys.readouterr().out


def test_same_seed_same_samples(run_dir, tmp_path):
    from safetensors.torch import load_file

    files = []
    for i in range(2):
        f = tmp_path / f"s{i}.safetensors"
        args = ["sample", str(run_dir), "--num", "3", "--steps", "2", "--seed", "7", "--no-progress"]
        assert main(args + ["--out", str(tmp_path / f"s{i}.png"), "--save-tensor", str(f)]) == 0
        files.append(load_file(str(f))["images"])
    assert (files[0] == files[1]).all()


def test_params_json_counts_the_paper_baseline(capsys):
    assert main(["params", "paper/iddpm-cifar10", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["total"] == counts["trainable"] == 52_546_438


def test_params_table(capsys):
    assert main(["params", "tiny-unet"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "by module:" in out and "input_blocks" in out


def test_python_dash_m_works():
    r = subprocess.run(
        [sys.executable, "-m", "difflora", "params", "tiny-dit", "--json"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"] > 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["params", "tiny-unet", "--set", "train.lrr=1"], "train.lrr: unknown key"),
        (
            ["params", "tiny-unet", "--set", "train.batch_size=many"],
            "train.batch_size: input should be a valid integer",
        ),
        (
            ["params", "tiny-unet", "--set", "train.label_dropout=1.5"],
            "train.label_dropout: input should be less than or equal to 1",
        ),
        (["params", "no-such-preset"], "presets: "),
        (
            ["train", "tiny-unet", "--set", "data.name=cifar10", "--set", "data.root={tmp}/empty", "--out", "{tmp}/x"],
            "dataset 'cifar10' not found; looked for",
        ),
        (["sample", "{tmp}/nowhere", "--out", "{tmp}/a.png"], "is not a difflora run directory"),
        (
            ["sample", "{run}", "--class", "10", "--out", "{tmp}/a.png"],
            "class 10 is out of range: the model has classes 0..9",
        ),
        (
            ["sample", "{run}", "--num", "0", "--out", "{tmp}/a.png"],
            "--num: input should be greater than or equal to 1",
        ),
        (["sample", "{run}", "--steps", "1000", "--out", "{tmp}/a.png"], "exceeds the diffusion's 100 timesteps"),
        (["sample", "{run}", "--out", "{tmp}/a.jpg"], "--out must name a .png file"),
        (["train", "tiny-unet", "--out", "{run}"], "pass --resume"),
    ],
)
def test_bad_inputs_give_clear_errors(argv, needle, run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert needle in err


def test_sample_from_a_run_without_checkpoint(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"data": {"name": "digits"}}))
    assert main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "a.png")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
