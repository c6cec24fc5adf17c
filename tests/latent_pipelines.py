"""Tiny latent and text pipelines written by save_pretrained (random weights, offline), and a captioned folder.

- :func:`dit_latent_pipeline`: a class-conditional DiT + AutoencoderKL + DDIMScheduler (DiTPipeline-like);
- :func:`sd_pipeline`: a UNet2DConditionModel + AutoencoderKL + CLIPTextModel + CLIPTokenizer +
  DDIMScheduler, written by ``StableDiffusionPipeline.save_pretrained`` (no safety checker).

Both take 16 x 16 RGB images (8 x 8 x 4 latents) and T = 100 training timesteps.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
from PIL import Image

from pretrained_folders import STEPS, _index, _randomised
from tiny_latent import tiny_text_encoder, tiny_tokenizer, tiny_vae

SCHEDULE = {"num_train_timesteps": STEPS, "beta_schedule": "scaled_linear", "clip_sample": False}
DIT = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_layers": 2,
    "patch_size": 2,
    "num_embeds_ada_norm": 3,
}
SD_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [16, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
}


def dit_latent_pipeline(path: Path, seed: int = 0) -> Path:
    """A DiT (3 classes, learned variance) on a VAE's latents, with a DDIMScheduler."""
    path.mkdir(parents=True, exist_ok=True)
    _randomised(diffusers.DiTTransformer2DModel(**DIT), seed).save_pretrained(path / "transformer")
    tiny_vae(seed).save_pretrained(path / "vae")
    diffusers.DDIMScheduler(**SCHEDULE).save_pretrained(path / "scheduler")
    _index(path, "DiTPipeline", "transformer", "DiTTransformer2DModel", "DDIMScheduler")
    index = json.loads((path / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderKL"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def sd_pipeline(path: Path, seed: int = 0) -> Path:
    """A Stable-Diffusion-like pipeline folder (UNet2DConditionModel, AutoencoderKL, CLIP text encoder)."""
    unet = _randomised(diffusers.UNet2DConditionModel(**SD_UNET), seed)
    tokenizer = tiny_tokenizer(path.parent / f"{path.name}-tokenizer-files")
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed, vocab_size=len(tokenizer)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(**SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def image_folder(path: Path, n: int = 12, size: int = 16, captions: bool = True, classes: int = 0) -> Path:
    """``n`` smooth RGB images (in class subfolders c0.. when ``classes``), with a metadata.jsonl of captions."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"c{i % classes}/{i:02d}.png" if classes else f"{i:02d}.png"
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(path / name)
        rows.append({"file_name": name, "text": ["a cat", "a red cat", "a dog"][i % 3]})
    if captions:
        (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
