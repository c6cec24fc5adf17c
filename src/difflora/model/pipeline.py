"""A pipeline folder's VAE, tokenizer and text encoder: loaded only when a cache is built or an image decoded.

The denoiser of a pipeline is the run's base (:mod:`difflora.model.pretrained`); its other parts
turn data into what the denoiser reads and back (``model.latent``, ``model.text``):

- :func:`latent_cache` / :func:`prompt_cache`: the run's caches (:mod:`difflora.latent`), keyed by
  the component folder's fingerprint, so a cache that exists is read without loading the model;
- :func:`encode_text`: prompts given when sampling, and the empty prompt, with the encoder loaded;
- :func:`decode`: latents back to images in [-1, 1] with the VAE loaded.

Only safetensors weights are read (``use_safetensors=True``): a pickle-only component is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from difflora.config.schema import Config
from difflora.data.dataset import ImageDataset
from difflora.latent import (
    LatentCache,
    LatentSettings,
    PromptCache,
    cache_latents,
    cache_prompts,
    decode_latents,
    encode_prompts,
)
from difflora.model.pretrained import PretrainedError
from difflora.optional import require

__all__ = ["component_fingerprint", "decode", "encode_text", "latent_cache", "load_vae", "prompt_cache"]

_CHUNK = 1 << 20


def component_fingerprint(cfg: Config, name: str) -> str:
    """sha256 of a pipeline component's folder (``vae``, ``text_encoder``): its config and weight files."""
    folder = _folder(cfg) / name
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors")):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _folder(cfg: Config) -> Path:
    assert cfg.model.pretrained is not None, "a pipeline's parts need model.pretrained"
    return Path(cfg.model.pretrained)


def _loaded(what: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PretrainedError(
            f"cannot load {what} ({first}); difflora reads safetensors weights only: re-save it with save_pretrained"
        ) from None


def load_vae(cfg: Config) -> nn.Module:
    """The pipeline's AutoencoderKL, in eval mode."""
    diffusers = require("diffusers", "a latent pipeline", extra="interop")
    where = _folder(cfg) / "vae"
    vae = _loaded(where, lambda: diffusers.AutoencoderKL.from_pretrained(where, use_safetensors=True))
    return vae.float().eval()


def _load_tokenizer(cfg: Config) -> Any:
    transformers = require("transformers", "a text pipeline", extra="interop")
    where = _folder(cfg) / "tokenizer"
    return _loaded(where, lambda: transformers.CLIPTokenizer.from_pretrained(where))


def _load_text_encoder(cfg: Config) -> nn.Module:
    transformers = require("transformers", "a text pipeline", extra="interop")
    where = _folder(cfg) / "text_encoder"
    encoder = _loaded(where, lambda: transformers.CLIPTextModel.from_pretrained(where, use_safetensors=True))
    return encoder.float().eval()


def latent_cache(
    cfg: Config, images: ImageDataset | Dataset, log: Callable[[str], None], content_id: str | None = None
) -> LatentCache:
    """The latents of ``images`` (the run's training images, in memory or a dataset of files with
    its ``content_id``), built once with the pipeline's VAE."""
    lat = cfg.model.latent
    assert lat is not None
    # An image folder is resized and centre-cropped when it is read; other data resized as a whole.
    crop = "center" if cfg.data.name == "image-folder" else "resize"
    # Files are decoded by data.workers processes (none unless set); tensors in memory need none.
    workers = (cfg.data.workers or 0) if content_id is not None else 0
    settings = LatentSettings(
        posterior=lat.posterior, seed=lat.seed, flips=cfg.data.hflip, crop=crop, dtype=lat.dtype, workers=workers
    )
    vae_id = component_fingerprint(cfg, "vae")
    return cache_latents(
        lambda: load_vae(cfg), images, settings, path=lat.cache, content_id=content_id, vae_id=vae_id, log=log
    )


def prompt_cache(cfg: Config, captions: Sequence[str], log: Callable[[str], None]) -> PromptCache:
    """The contexts of ``captions`` and of the empty prompt, built once with the pipeline's text encoder."""
    text = cfg.model.text
    assert text is not None
    encoder_id = component_fingerprint(cfg, "text_encoder")
    return cache_prompts(
        _load_tokenizer(cfg),
        lambda: _load_text_encoder(cfg),
        captions,
        path=text.cache,
        encoder_id=encoder_id,
        dtype=text.dtype,
        log=log,
    )


def encode_text(cfg: Config, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(contexts [N x L x D] of ``prompts``, the empty prompt's [L x D]), with the text encoder loaded."""
    contexts = encode_prompts(_load_tokenizer(cfg), _load_text_encoder(cfg), ["", *prompts]).cpu().float()
    return contexts[1:], contexts[0]


def decode(
    cfg: Config, latents: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 64
) -> torch.Tensor:
    """Images in [-1, 1] of ``latents`` [N x c x h x w], with the pipeline's VAE loaded (once), in batches."""
    vae = load_vae(cfg).to(device)
    return torch.cat([decode_latents(vae, part).cpu().float() for part in latents.split(batch_size)])
