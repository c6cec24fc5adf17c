"""Tiny latent-diffusion parts built from configs with random weights (nothing is downloaded): an
AutoencoderKL, a CLIPTextModel and a CLIPTokenizer whose vocabulary and merges the test writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_LENGTH = 12


def tiny_vae(seed: int = 0, *, shift_factor: float | None = None, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()


def tiny_tokenizer(directory: Path):
    """A CLIP tokenizer over single letters (and the word "cat"), padded with its end token."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for word in [*LETTERS, *(c + "</w>" for c in LETTERS), "at</w>", "cat</w>"]:
        vocab[word] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\na t</w>\nc at</w>\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=MAX_LENGTH,
        pad_token="<|endoftext|>",
    )


def tiny_text_encoder(seed: int = 0, vocab_size: int = 59):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_images(n: int = 10, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``n`` smooth images in [-1, 1] (a VAE sees structure, not only noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
