"""Latent and prompt-embedding caches: what a latent, text-conditioned model trains from.

    >>> from difflora.latent import cache_latents, cache_prompts, decode_latents
    >>> cache = cache_latents(vae, dataset)            # built once (resumable), then read from disk
    >>> z = cache.batch(idx, generator=g)              # [B x c x h x w], no VAE needed
    >>> prompts = cache_prompts(tokenizer, text_encoder, dataset.captions)
    >>> context = prompts.embeddings[rows[idx]]        # rows = prompts.indices(dataset.captions)
    >>> images = decode_latents(vae, z)                # [-1, 1], for sampling and evaluation

The VAE (diffusers' AutoencoderKL) and the text encoder (transformers' CLIPTextModel, with its
tokenizer) are passed in as modules, or as functions that load them only when a cache must be
built; nothing here imports diffusers or transformers. See docs/latents.md.
"""

from difflora.latent.fingerprint import module_fingerprint, tensor_fingerprint
from difflora.latent.latents import (
    LatentCache,
    LatentSettings,
    cache_latents,
    decode_latents,
    encode_images,
    open_latent_cache,
    vae_scaling,
)
from difflora.latent.prompts import PromptCache, cache_prompts, encode_prompts, open_prompt_cache, tokenize_prompts
from difflora.latent.store import CacheError

__all__ = [
    "CacheError",
    "LatentCache",
    "LatentSettings",
    "PromptCache",
    "cache_latents",
    "cache_prompts",
    "decode_latents",
    "encode_images",
    "encode_prompts",
    "module_fingerprint",
    "open_latent_cache",
    "open_prompt_cache",
    "tensor_fingerprint",
    "tokenize_prompts",
    "vae_scaling",
]
