"""Fault catalogue: latent and text pipelines (model.latent, model.text) given inputs they cannot take.

A latent denoiser in a pipeline without its vae, a text pipeline trained on images without
captions, a latent cache made by another VAE at an explicit ``model.latent.cache``, an image
size the VAE (or the model) cannot take, prompt dropout asked of a distillation (its teacher is
guided to every caption), and prompts for a run without a text encoder: each one
``error:`` line, exit code 2, nothing on disk changed.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from faultkit import Fault, cases, check_fault

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from difflora.config.schema import parse_config  # noqa: E402
from difflora.data.dataset import load_source  # noqa: E402
from difflora.data.folder_index import index_folder  # noqa: E402
from difflora.latent import LatentSettings, cache_latents  # noqa: E402
from latent_pipelines import dit_latent_pipeline, image_folder, sd_pipeline  # noqa: E402
from tiny_latent import tiny_vae  # noqa: E402

LORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": 100, "num_bases": 3, "rank": 2}


def _tree(tmp: Path, pipe: Path, **latent) -> dict:
    data = {"name": "image-folder", "root": str(tmp / "f"), "index_cache": str(tmp / "idx")}
    model = {"pretrained": str(pipe), "adapters": [LORA]} | ({"latent": latent} if latent else {})
    return {"data": data, "model": model, "train": {"train_base": False, "steps": 2, "batch_size": 2}}


def setup(kind: str, captions: bool = True, other_vae_cache: bool = False, drop_vae: bool = False):
    """A damage: pipeline {tmp}/pipe, an indexed folder {tmp}/f and {tmp}/c.yaml adapting the pipeline."""

    def damage(run: Path, tmp: Path) -> None:
        with contextlib.redirect_stderr(io.StringIO()):  # save_pretrained's progress bar
            pipe = (dit_latent_pipeline if kind == "dit" else sd_pipeline)(tmp / "pipe")
        if drop_vae:
            shutil.rmtree(pipe / "vae")
            index = json.loads((pipe / "model_index.json").read_text())
            (pipe / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "vae"}))
        image_folder(tmp / "f", n=20, captions=captions)
        tree = _tree(tmp, pipe, **({"cache": str(tmp / "lc")} if other_vae_cache else {}))
        (tmp / "c.yaml").write_text(yaml.safe_dump(tree))
        if drop_vae:
            return
        cfg = parse_config(tree)
        index_folder(cfg.data, "train")  # the folder's index exists: the failing command writes nothing
        if other_vae_cache:
            cache_latents(
                tiny_vae(seed=1), load_source(cfg.data, "train"), LatentSettings(crop="center"), path=tmp / "lc"
            )

    return damage


PARAMS = ("params", "{tmp}/c.yaml")
TRAIN = ("train", "{tmp}/c.yaml", "--out", "{tmp}/new", "--no-progress")

CASES = [
    Fault(
        "latent-pipeline-without-vae",
        PARAMS,
        r"the DiTTransformer2DModel of .*pipe takes 4 channels, latents of a VAE, but the pipeline has no vae",
        damage=setup("dit", drop_vae=True),
    ),
    Fault(
        "text-pipeline-without-captions",
        TRAIN,
        r"pipe is a text pipeline but data\.name=image-folder has no captions; train on an image folder with a metadata\.jsonl",
        damage=setup("sd", captions=False),
    ),
    Fault(
        "latent-cache-of-another-vae",
        TRAIN,
        r"latents cache .*lc holds shards made for another key \(.*vae: .*\); it is never reused for other inputs",
        damage=setup("dit", other_vae_cache=True),
    ),
    Fault(
        "latent-resolution-vae-cannot-take",
        (*PARAMS, "--set", "data.image_size=17"),
        r"data\.image_size=17: the pipeline's vae downsamples by 2, so the image size must be a multiple of 2; use data\.image_size=16",
        damage=setup("dit"),
    ),
    Fault(
        "latent-resolution-model-cannot-take",
        (*PARAMS, "--set", "data.image_size=18"),
        r"model\.diffusers\.config\.patch_size \(2\) must be a positive integer dividing model\.image_size \(9\)",
        damage=setup("dit"),
    ),
    Fault(
        "distill-text-pipeline-with-prompt-dropout",
        (
            *("distill", "{tmp}/pipe", "--out", "{tmp}/d", "--no-progress", "--set", "data.name=image-folder"),
            *("--set", "data.root={tmp}/f", "--set", "distill.targets=[to_q]", "--set", "train.prompt_dropout=0.2"),
        ),
        r"train\.prompt_dropout=0\.2 cannot take effect: train\.objective=distill \(the teacher's labels and captions",
        damage=setup("sd"),
    ),
    Fault(
        "sample-prompt-without-text-encoder",
        ("sample", "{run}", "--prompt", "a cat", "--out", "{tmp}/g.png", "--no-progress"),
        r"--prompt is for a text pipeline's run; this run's base has no text encoder: sample without prompts$",
    ),
]


@pytest.mark.parametrize("fault", cases(CASES))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
