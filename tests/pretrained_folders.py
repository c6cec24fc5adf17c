"""Tiny diffusers folders written by save_pretrained, as a user has them on disk (random weights, offline).

- :func:`unet_pipeline`: a pixel ``DDPMPipeline`` (``UNet2DModel`` in ``unet/`` and a scheduler); its
  ``unet/`` alone is a model folder.
- :func:`dit_pipeline`: a pixel, class-conditional ``DiTTransformer2DModel`` with a learned variance
  and a ``DDIMScheduler``.
- :func:`cond_unet_pipeline`: a ``UNet2DConditionModel`` with a ``DDPMScheduler`` (no VAE or text
  encoder: those are the latent and prompt follow-ups').

All take 8 x 8 single-channel images (digits) and T = 100 training timesteps.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

STEPS = 100
UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}
COND_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "cross_attention_dim": 16,
}
DIT = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_layers": 2,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
}
SCHEDULE = {"num_train_timesteps": STEPS, "beta_schedule": "linear", "clip_sample": False}


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random: diffusers zero-initialises output layers, which would hide a
    wrong input (timestep, class) behind a zero output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _index(path: Path, pipeline: str, denoiser: str, denoiser_cls: str, scheduler_cls: str) -> None:
    index = {
        "_class_name": pipeline,
        "_diffusers_version": diffusers.__version__,
        denoiser: ["diffusers", denoiser_cls],
        "scheduler": ["diffusers", scheduler_cls],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def unet_pipeline(path: Path, seed: int = 0, classes: int = 0, **schedule) -> Path:
    """A DDPMPipeline folder (UNet2DModel + DDPMScheduler); ``classes``: a class table of that many rows;
    ``schedule`` overrides the scheduler's config."""
    unet = _randomised(diffusers.UNet2DModel(**UNET, num_class_embeds=classes or None), seed)
    scheduler = diffusers.DDPMScheduler(**(SCHEDULE | schedule))
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


def dit_pipeline(path: Path, seed: int = 0, **schedule) -> Path:
    """A pixel DiT pipeline folder (transformer + DDIMScheduler, no VAE), 10 classes, learned variance."""
    path.mkdir(parents=True, exist_ok=True)
    _randomised(diffusers.DiTTransformer2DModel(**DIT), seed).save_pretrained(path / "transformer")
    diffusers.DDIMScheduler(**(SCHEDULE | schedule)).save_pretrained(path / "scheduler")
    _index(path, "DiTPipeline", "transformer", "DiTTransformer2DModel", "DDIMScheduler")
    return path


def cond_unet_pipeline(path: Path, seed: int = 0, **schedule) -> Path:
    """A UNet2DConditionModel + DDPMScheduler pipeline folder (no VAE, no text encoder)."""
    path.mkdir(parents=True, exist_ok=True)
    _randomised(diffusers.UNet2DConditionModel(**COND_UNET), seed).save_pretrained(path / "unet")
    diffusers.DDPMScheduler(**(SCHEDULE | schedule)).save_pretrained(path / "scheduler")
    _index(path, "StableDiffusionPipeline", "unet", "UNet2DConditionModel", "DDPMScheduler")
    return path
