"""004's sweep on a saved SD-like pipeline folder (``model.pretrained``: UNet2DConditionModel + VAE +
CLIP text encoder): ``difflora sweep`` trains position adapters at the diffusers-block taps of the
pipeline's UNet from the latent and prompt caches, evaluates them and writes one row per cell."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from difflora.cli.commands import main  # noqa: E402
from difflora.design_space.sweep import read_results  # noqa: E402
from latent_pipelines import image_folder, sd_pipeline  # noqa: E402

ADAPTER = {
    "name": "pa",
    "form": "position",
    "source": "attn2_out",
    "dest": "ff_in",
    "rank": 2,
    "condition": "t",
    "weighting": "shared",
    "targets": [r"re:.*transformer_blocks\.\d+"],
}


def test_difflora_sweep_runs_on_an_sd_like_pipeline_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    with contextlib.redirect_stderr(io.StringIO()):
        pipe = sd_pipeline(tmp_path / "pipe")
    images = image_folder(tmp_path / "images", n=60, classes=3)
    sweep = {
        "name": "tiny-pipeline-sweep",
        "seeds": [0],
        "eval": {"num_samples": 4, "steps": 2, "guidance": [1], "feature_steps": 3},
        "base": {
            "data": {"name": "image-folder", "root": str(images), "index_cache": str(tmp_path / "idx")},
            "model": {"pretrained": str(pipe), "adapters": [ADAPTER], "latent": {"cache": str(tmp_path / "lat")}},
            "train": {"steps": 2, "batch_size": 4, "log_every": 1, "ckpt_every": 2, "train_base": False},
            "sample": {"num": 2, "steps": 2},
        },
        "factors": {"input": {s: {"model.adapters.0.source": s} for s in ("attn1_in", "attn2_out")}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    rows = read_results(tmp_path / "out" / "results.csv")
    assert [r["input"] for r in rows] == ["attn1_in", "attn2_out"]
    # One shared adapter (down w -> 2, up 2 -> w, with biases) in each transformer block of the UNet: the
    # down block's (w = 16), the middle block's (32) and the two of the up block (16 each).
    assert all(r["params_trainable"] == sum(5 * w + 2 for w in (16, 32, 16, 16)) for r in rows)
    for r in rows:
        assert r["fd"] > 0
        cfg = json.loads((Path(r["run_dir"]) / "config.json").read_text())
        assert cfg["model"]["pretrained"] == str(pipe.resolve())
        assert cfg["model"]["adapters"][0]["source"] == r["input"]
