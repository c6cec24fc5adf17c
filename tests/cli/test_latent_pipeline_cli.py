"""The CLI end to end on latent pipelines: a class-conditional DiT + VAE and an SD-like text pipeline.

Adapters train from the latent (and prompt) caches, an interrupted run resumes bit for bit without
encoding anything again (the VAE's encoder is not run once the cache exists), ``sample`` decodes
(``--prompt`` / ``--prompts`` on the text pipeline) and ``eval`` scores decoded images.
"""

import contextlib
import io
import json

import pytest
import yaml

from difflora.cli.commands import main
from difflora.train import latest_checkpoint, load_checkpoint
from difflora.train.objectives import DiffusionObjective
from latent_pipelines import dit_latent_pipeline, image_folder, sd_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

LORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": 100, "num_bases": 3, "rank": 2}


@pytest.fixture(scope="module", params=["dit", "sd"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    with contextlib.redirect_stderr(io.StringIO()):
        pipe = (dit_latent_pipeline if request.param == "dit" else sd_pipeline)(root / "pipe")
    return request.param, pipe, image_folder(root / "images", n=60, classes=3)


def _config(pipe, images, tmp_path, kind):
    tree = {
        "data": {"name": "image-folder", "root": str(images), "index_cache": str(tmp_path / "idx"), "hflip": True},
        "model": {"pretrained": str(pipe), "adapters": [LORA], "latent": {"cache": str(tmp_path / "latents")}},
        "train": {"train_base": False, "steps": 6, "batch_size": 4, "ckpt_every": 2, "log_every": 1},
        "sample": {"num": 3, "steps": 4, **({"guidance": 2.0} if kind == "sd" else {})},
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


def _no_encoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the VAE encoded images although the latent cache exists")

    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", refuse)


def test_train_interrupt_resume_sample_eval(setup, tmp_path, monkeypatch, capsys):
    kind, pipe, images = setup
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    config = _config(pipe, images, tmp_path, kind)
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert main(["train", config, "--out", str(straight), "--no-progress"]) == 0
    assert (tmp_path / "latents" / "manifest.json").is_file()
    with monkeypatch.context() as m:
        _no_encoding(m)
        _interrupt_at(m, 4)
        assert main(["train", config, "--out", str(cut), "--no-progress"]) != 0
    assert load_checkpoint(latest_checkpoint(cut)).step == 3
    with monkeypatch.context() as m:
        _no_encoding(m)
        assert main(["train", config, "--out", str(cut), "--resume", "--no-progress"]) == 0
    a, b = (load_checkpoint(latest_checkpoint(r)) for r in (straight, cut))
    assert a.step == b.step == 6
    for name in ("model", "ema"):
        for key, value in getattr(a, name).items():
            assert value.equal(getattr(b, name)[key]), f"{name}.{key}"
    assert all(".adapters." in k for k in a.model), [k for k in a.model if ".adapters." not in k]
    capsys.readouterr()
    png = tmp_path / "grid.png"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n\na red cat\n")
    text = ["--prompt", "a cat", "--prompts", str(prompts)] if kind == "sd" else []
    assert main(["sample", str(straight), "--num", "3", "--steps", "4", "--out", str(png), *text]) == 0
    assert png.is_file() and "wrote 3 samples" in capsys.readouterr().out
    ev = tmp_path / "ev"
    argv = ["eval", str(straight), "--num-samples", "8", "--steps", "2", "--feature-steps", "3", "--no-progress"]
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--out", str(ev)]) == 0
    assert json.loads((ev / "metrics.json").read_text())
