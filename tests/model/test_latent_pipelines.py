"""Latent and text pipelines as a base (model.latent, model.text): what the folder decides, the caches
a run trains from, and difflora's sampler against diffusers' own pipelines from the same folder.

Reference: diffusers' StableDiffusionPipeline and DiTPipeline loaded with from_pretrained from the
folder, DDIM, the same initial latents (``latents=``; DiTPipeline draws them from the same seeded
generator as difflora), prompts, guidance scale and steps, decoded by the same VAE. difflora's
model carries zero-initialised TimeLoRA adapters. Decoded images in [0, 1] agree to SAMPLE_TOL
(float32 through 10 guided network evaluations and a VAE decoder, computed two ways; the guided
batch is [cond, uncond] in difflora and [uncond, cond] in diffusers).
"""

import contextlib
import io

import pytest
import torch
from PIL import Image

from difflora.config.schema import parse_config
from difflora.data.dataset import load_source
from difflora.model.build import build_model
from difflora.model.pipeline import encode_text, load_vae
from difflora.sampling.generate import generate, sampling_settings
from difflora.train import train
from difflora.train.base import load_base
from difflora.train.pipeline_data import open_training_batches
from difflora.train.run_loader import open_run
from latent_pipelines import dit_latent_pipeline, image_folder, sd_pipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

SAMPLE_TOL = 1e-4
LORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": 100, "num_bases": 3, "rank": 2}


def _config(tmp_path, pipe, **sections):
    data = {"name": "image-folder", "root": str(image_folder(tmp_path / "f", n=20)), "index_cache": str(tmp_path / "i")}
    tree = {"data": data, "model": {"pretrained": str(pipe), "adapters": [LORA]}, "train": {"train_base": False}}
    for key, value in sections.items():
        tree[key] = tree.get(key, {}) | value
    return parse_config(tree)


def _quiet(build, path):
    with contextlib.redirect_stderr(io.StringIO()):
        return build(path)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _quiet(sd_pipeline, tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return _quiet(dit_latent_pipeline, tmp_path_factory.mktemp("dit") / "pipe")


def test_the_vae_and_the_text_encoder_decide_the_latent_space_and_the_context(tmp_path, sd):
    cfg = _config(tmp_path, sd)
    assert (cfg.model.latent.channels, cfg.model.latent.downsample, cfg.model.latent.image_channels) == (4, 2, 3)
    assert cfg.model.latent.posterior == "mean" and cfg.model.text.hidden == 32
    assert (cfg.data.image_size, cfg.model.image_size, cfg.model.in_channels) == (16, 8, 4)
    assert cfg.train.prompt_dropout == 0.1
    other = _config(tmp_path, sd, data={"image_size": 24})
    assert other.model.image_size == 12


def test_batches_are_the_cached_latents_and_contexts_with_prompt_dropout(tmp_path, sd, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path, sd, train={"prompt_dropout": 0.5})
    batches = open_training_batches(cfg, seed=0, batch_size=8, rows=range(8), log=lambda s: None)
    g = torch.Generator().manual_seed(3)
    x, y, cond = batches.draw(0, g)
    # The same draws by hand: indices, then one dropout number per sample.
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(len(batches), (8,), generator=g)
    dropped = torch.rand(8, generator=g) < 0.5
    vae = load_vae(cfg)
    with torch.no_grad():
        # The folder was encoded file by file; the same pixels loaded into memory give the same latents.
        pixels = load_source(cfg.data, "train").images[idx]
        want = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(x, want, atol=1e-5, rtol=0)
    contexts, empty = encode_text(cfg, [batches.captions[i] for i in idx])
    want_context = torch.where(dropped.view(-1, 1, 1), empty.expand_as(contexts), contexts)
    torch.testing.assert_close(cond["context"], want_context, atol=1e-5, rtol=0)
    assert 0 < int(dropped.sum()) < 8


def _images(x):
    return (x + 1) / 2


def test_sd_pipeline_gives_diffusers_images_from_the_same_latents_and_prompts(tmp_path, sd):
    cfg = _config(tmp_path, sd)
    model = build_model(cfg)
    load_base(model, cfg.train.init_from)
    prompts = ["a cat", "a dog"]
    context, null = encode_text(cfg, prompts)
    s = sampling_settings(cfg, num=2, steps=10, sampler="ddim", guidance=3.0)
    ours = generate(model.eval(), cfg, s, seed=0, context=context, null_context=null)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # generate's noise
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False)
    # The folder's scheduler has steps_offset 1 (StableDiffusionPipeline writes it): difflora's grid honours it.
    assert pipe.scheduler.config.steps_offset == cfg.diffusion.steps_offset == 1
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, latents=latents, num_inference_steps=10, guidance_scale=3.0, output_type="np").images
    assert (_images(ours) - torch.from_numpy(theirs).permute(0, 3, 1, 2)).abs().max() < SAMPLE_TOL


def test_dit_pipeline_gives_diffusers_images_from_the_same_noise(tmp_path, dit):
    cfg = _config(tmp_path, dit)
    model = build_model(cfg)
    load_base(model, cfg.train.init_from)
    s = sampling_settings(cfg, num=3, steps=10, sampler="ddim", guidance=1.0)
    ours = generate(model.eval(), cfg, s, seed=0, labels=torch.tensor([0, 1, 2]))
    pipe = diffusers.DiTPipeline.from_pretrained(dit)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        [0, 1, 2],
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=10,
        output_type="np",
    ).images
    assert (_images(ours) - torch.from_numpy(theirs).permute(0, 3, 1, 2)).abs().max() < SAMPLE_TOL


def test_per_sample_adapter_conditions_work_with_the_text_context(tmp_path, sd, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    task = {"name": "task", "condition": "task", "weighting": "index", "num_values": 3, "rank": 2}
    cfg = _config(
        tmp_path,
        sd,
        data={"task_id": 1},
        model={"adapters": [LORA, task]},
        train={"steps": 2, "batch_size": 4, "lr": 0.05, "ema_decay": 0.0},
    )
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    cfg, model, _ = open_run(tmp_path / "run")
    context, null = encode_text(cfg, ["a cat"] * 2)
    s = sampling_settings(cfg, num=2, steps=3, guidance=2.0)
    draw = dict(seed=0, context=context, null_context=null)
    by_task = [generate(model, cfg, s, conditions={"task": k}, **draw) for k in (0, 1)]
    # Task 1 trained its adapter, task 0 did not: the same prompt and noise give other images.
    assert not torch.allclose(by_task[0], by_task[1], atol=1e-4)
    with model.adapters_disabled("task"):
        assert torch.allclose(generate(model, cfg, s, conditions={"task": 1}, **draw), by_task[0], atol=1e-5)


def test_the_cache_keys_follow_model_latent(tmp_path, dit, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    mean = open_training_batches(_config(tmp_path, dit), seed=0, batch_size=2, rows=range(2), log=lambda s: None)
    drawn_cfg = _config(tmp_path, dit, model={"latent": {"posterior": "sample", "seed": 3, "dtype": "float16"}})
    drawn = open_training_batches(drawn_cfg, seed=0, batch_size=2, rows=range(2), log=lambda s: None)
    assert mean.latents.key["posterior"] == "mean" and mean.latents.key["crop"] == "center"
    assert (drawn.latents.key["posterior"], drawn.latents.key["seed"], drawn.latents.key["dtype"]) == (
        "sample",
        3,
        "float16",
    )
    assert drawn.latents.latents.dtype == torch.float16 and mean.latents.path != drawn.latents.path
    assert mean.latents.key["vae"] == drawn.latents.key["vae"] and len(mean.latents.key["vae"]) == 64


def test_a_rewritten_image_makes_another_latent_cache(tmp_path, dit, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path, dit)
    first = open_training_batches(cfg, seed=0, batch_size=2, rows=range(2), log=lambda s: None).latents
    again = open_training_batches(cfg, seed=0, batch_size=2, rows=range(2), log=lambda s: None).latents
    assert again.path == first.path
    path = tmp_path / "f" / "01.png"
    Image.open(path).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(path)
    changed = open_training_batches(cfg, seed=0, batch_size=2, rows=range(2), log=lambda s: None).latents
    # Only the rewritten image's latents change (01.png is in the training split).
    differ = (changed.latents != first.latents).flatten(1).any(1)
    assert changed.path != first.path and int(differ.sum()) == 1
