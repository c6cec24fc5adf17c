"""The published configs of the architectures ``bench_real_arch.py`` measures, and their builders
(random weights, nothing downloaded): Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text
encoder, DiT-XL/2 at 256 px (diffusers' and difflora's own)."""

from __future__ import annotations

UNET_PARAMS = 859_520_964

# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/ config.json).
SD_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
}
VAE_SCALE = 0.18215
CLIP_L = {  # openai/clip-vit-large-patch14, text model
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
DIT_XL2 = {  # facebook/DiT-XL-2-256 transformer/config.json
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "activation_fn": "gelu-approximate",
}


def build_sd(frozen_dtype):
    """The SD 1.5 UNet (fp32), VAE and text encoder (frozen, in ``frozen_dtype``), random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD_UNET)
    vae = AutoencoderKL(**SD_VAE).eval().requires_grad_(False).to(frozen_dtype)
    text = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval().requires_grad_(False).to(frozen_dtype)
    return unet, vae, text


def encode_sd(vae, text, size: int, batch: int):
    """Latents [B x 4 x size/8 x size/8] of a random image batch, and the prompt and empty-prompt contexts."""
    import torch

    g = torch.Generator().manual_seed(0)
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        image = torch.rand(batch, 3, size, size, generator=g).mul(2).sub(1).to(dtype)
        latents = vae.encode(image).latent_dist.sample(generator=g).float() * VAE_SCALE
        tokens = torch.randint(0, CLIP_L["vocab_size"], (2 * batch, 77), generator=g)
        ctx = text(tokens).last_hidden_state.float()
    return latents, ctx[:batch], ctx[batch:]


def wrap(unet):
    """difflora's model around a diffusers UNet (integer t, the caller's context)."""
    from difflora.model.build import DiffusionModel
    from difflora.nets.diffusers_wrap import DiffusersNet

    return DiffusionModel(DiffusersNet(unet))


def dit_cfg(kind: str, ratio: float, latent: int):
    """difflora's DiT-XL/2 (1000 classes, learned variance) on 4-channel latents, hybrid loss."""
    from difflora.config.schema import load_config
    from difflora.presets import CONFIGS_DIR

    over = ["data.name=cifar10", f"data.image_size={latent}", "model.dit.preset=DiT-XL/2", "model.num_classes=1000"]
    over += ["diffusion.steps=1000", f"train.mask_ratio={ratio}"]
    if kind == "affiner":
        over += ["model.affiner={latent: 64}", "data.task_id=0", "train.train_base=false"]
    else:
        over += ["train.train_base=true"]
    cfg = load_config(CONFIGS_DIR / "tiny-dit.yaml", over)
    # difflora has no latent dataset: cifar10's shape stands in, with the SD VAE's 4 latent channels.
    object.__setattr__(cfg.model, "in_channels", 4)
    return cfg
