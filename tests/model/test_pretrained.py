"""A diffusers model or pipeline folder as a base (model.pretrained): what the folder decides, its
weights, and difflora's sampler against diffusers' own pipelines from the same folder.

Reference: diffusers' DDPMPipeline and DDIMPipeline loaded with from_pretrained from the folder,
run from the same initial noise (and, for DDPM, the same per-step noise from one generator) with
the same number of steps. difflora's model carries zero-initialised TimeLoRA adapters. Images in
[0, 1] agree to SAMPLE_TOL = 1e-4 (float32 through 10 network evaluations computed two ways).
"""

import json

import pytest
import torch

from difflora.config.schema import ConfigError, parse_config
from difflora.diffusion import sample
from difflora.model.build import build_diffusion, build_model
from difflora.model.pretrained import pretrained_weights
from difflora.train.base import load_base
from pretrained_folders import STEPS, cond_unet_pipeline, dit_pipeline, unet_pipeline

diffusers = pytest.importorskip("diffusers")

SAMPLE_TOL = 1e-4
TIME_LORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": STEPS, "num_bases": 5, "rank": 2}


def _loaded(folder, *adapters):
    cfg = parse_config(
        {"model": {"pretrained": str(folder), "adapters": list(adapters)}, "train": {"train_base": False}}
    )
    model = build_model(cfg)
    record = load_base(model, cfg.train.init_from)
    return cfg, model.eval(), record


def test_the_folder_decides_the_architecture_and_the_noise_process(tmp_path):
    folder = dit_pipeline(tmp_path / "dit", beta_schedule="scaled_linear", prediction_type="v_prediction")
    cfg = parse_config({"model": {"pretrained": str(folder)}})
    m, d = cfg.model, cfg.diffusion
    assert (m.arch, m.diffusers.class_name, m.image_size, m.in_channels) == ("diffusers", "DiTTransformer2DModel", 8, 1)
    assert (m.learn_sigma, m.num_classes, d.steps, d.beta_schedule) == (True, 10, STEPS, "scaled_linear")
    assert (d.prediction_type, d.rescale_timesteps, d.loss) == ("v_prediction", False, "hybrid")
    assert cfg.train.init_from == str(folder.resolve())
    # The same through train.init_from alone; and a restated, agreeing architecture is accepted.
    assert parse_config({"train": {"init_from": str(folder)}}) == cfg
    assert parse_config({"model": {"pretrained": str(folder), "learn_sigma": True, "num_classes": 10}}) == cfg


def test_a_model_folder_takes_the_noise_process_from_the_config(tmp_path):
    folder = unet_pipeline(tmp_path / "pipe") / "unet"
    cfg = parse_config({"model": {"pretrained": str(folder)}, "diffusion": {"steps": 50, "beta_schedule": "linear"}})
    assert (cfg.diffusion.steps, cfg.diffusion.beta_schedule, cfg.diffusion.rescale_timesteps) == (50, "linear", False)
    assert cfg.model.learn_sigma is False


def test_weights_load_and_fp16_variants_too(tmp_path):
    folder = unet_pipeline(tmp_path / "pipe")
    raw = diffusers.UNet2DModel.from_pretrained(folder / "unet")
    _, model, record = _loaded(folder)
    for key, value in raw.state_dict().items():
        assert torch.equal(model.state_dict()[f"net.model.{key}"], value), key
    assert record["format"] == "diffusers" and record["path"] == str(folder.resolve())
    # save_pretrained(variant="fp16") alone: read, cast into the fp32 model, another fingerprint.
    half = tmp_path / "half"
    raw.half().save_pretrained(half, variant="fp16")
    assert [p.name for p in half.iterdir() if p.suffix == ".safetensors"] == [
        "diffusion_pytorch_model.fp16.safetensors"
    ]
    _, model16, record16 = _loaded(half)
    assert record16["fingerprint"] != record["fingerprint"]
    w = model16.state_dict()["net.model.conv_in.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, raw.state_dict()["conv_in.weight"].float())


def test_sharded_weights_load(tmp_path):
    raw = diffusers.UNet2DModel.from_pretrained(unet_pipeline(tmp_path / "pipe") / "unet")
    raw.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(set(pretrained_weights(tmp_path / "sharded").values())) > 1
    _, model, _ = _loaded(tmp_path / "sharded")
    torch.testing.assert_close(model.state_dict()["net.model.conv_out.weight"], raw.conv_out.weight, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("sampler", "prediction", "clip"),
    [
        ("ddim", "epsilon", False),
        ("ddim", "v_prediction", False),
        ("ddpm", "epsilon", False),
        ("ddpm", "v_prediction", False),
        # DDPM clips x_0 and forms the mean from it exactly as diffusers does; DDIM keeps the clipped
        # x_0's noise (IDDPM), diffusers the raw one, so DDIM is compared where nothing is clipped.
        ("ddpm", "epsilon", True),
    ],
)
def test_difflora_samples_as_diffusers_pipelines(tmp_path, sampler, prediction, clip):
    folder = unet_pipeline(tmp_path / "pipe", prediction_type=prediction, variance_type="fixed_small", clip_sample=clip)
    cfg, model, _ = _loaded(folder, TIME_LORA)
    assert model.adapter_report is not None and model.adapter_report.layers
    steps, shape = 10, (3, 1, 8, 8)
    pipe_cls = diffusers.DDIMPipeline if sampler == "ddim" else diffusers.DDPMPipeline
    pipe = pipe_cls.from_pretrained(folder)
    if sampler == "ddim":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    # The pipeline draws x_T, then (DDPM) each step's noise, from one generator: difflora does the same.
    g = torch.Generator().manual_seed(3)
    want = pipe(batch_size=3, generator=g, num_inference_steps=steps, output_type="np").images
    # The run clips as the scheduler does (diffusion.clip_denoised); diffusers' "leading" grid of 10 steps is ddim10.
    assert cfg.diffusion.clip_denoised is clip
    diffusion = build_diffusion(cfg, respacing=f"ddim{steps}")
    got = sample(diffusion, model, shape, generator=torch.Generator().manual_seed(3), sampler=sampler)
    got = ((got + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(got - want).max() < SAMPLE_TOL


def test_dit_and_conditional_unet_pipelines_load_and_run(tmp_path):
    for folder in (dit_pipeline(tmp_path / "dit"), cond_unet_pipeline(tmp_path / "cond")):
        cfg, model, record = _loaded(folder, TIME_LORA)
        x = torch.randn(2, 1, 8, 8)
        y = torch.tensor([3, -1]) if cfg.model.num_classes else None
        out = model(x, torch.tensor([5, 90]), y)
        assert out.shape == (2, cfg.model.out_channels, 8, 8) and torch.isfinite(out).all()
    # The conditional UNet's learned context is not in the folder: it stays as built.
    assert not any(k.startswith("net.context_embedder") for k in record["keys"])


def test_the_dit_pipeline_gets_the_integer_timestep_and_its_labels(tmp_path):
    folder = dit_pipeline(tmp_path / "dit")
    _, model, _ = _loaded(folder)
    raw = diffusers.DiTTransformer2DModel.from_pretrained(folder / "transformer").eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([7, 93]), torch.tensor([2, 9])
    want = raw(x, timestep=t, class_labels=y, return_dict=False)[0]
    torch.testing.assert_close(model(x, t, y), want, rtol=0, atol=1e-5)


def test_restating_the_architecture_otherwise_is_refused(tmp_path):
    folder = unet_pipeline(tmp_path / "pipe")
    with pytest.raises(ConfigError, match=r"model.learn_sigma=True contradicts the pretrained folder .* remove"):
        parse_config({"model": {"pretrained": str(folder), "learn_sigma": True}})
    with pytest.raises(ConfigError, match="multiple of 2"):
        parse_config({"model": {"pretrained": str(folder)}, "data": {"image_size": 9}})
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ConfigError, match="no unet or transformer"):
        parse_config({"model": {"pretrained": str(folder)}})
