"""Prompt embeddings (the cross-attention context of a text-conditioned model), computed once per
distinct caption and cached on disk.

The context of a prompt is what diffusers' ``StableDiffusionPipeline.encode_prompt`` computes: the
tokenizer pads (and truncates) it to ``model_max_length`` tokens, and the text encoder's last hidden
state is the context, [model_max_length x hidden]. The attention mask is passed only when the
encoder's config asks for it (``use_attention_mask``), as the pipeline does.

The cache holds one row per distinct caption (many images share one), sorted, after row 0, the
empty prompt "": the unconditional context of classifier-free guidance and of prompt dropout. It
is keyed by the encoder's fingerprint and by the token ids of every row (which cover the tokenizer:
another vocabulary, another padding or length gives other ids), and the captions' text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflora.latent.fingerprint import ModuleOrLoader, hash_tensor, loaded_once, module_config, module_fingerprint
from difflora.latent.store import STORAGE_DTYPES, CacheError, StorePlan, build_store, read_store

__all__ = ["PromptCache", "cache_prompts", "encode_prompts", "open_prompt_cache", "tokenize_prompts"]


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), int64 [N x model_max_length]: padded to the tokenizer's
    ``model_max_length`` and truncated to it, as StableDiffusionPipeline tokenizes."""
    out = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return out.input_ids, out.attention_mask


@torch.no_grad()
def _encode_ids(text_encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    device = next(text_encoder.parameters()).device
    use_mask = bool(module_config(text_encoder).get("use_attention_mask", False))
    out = text_encoder(ids.to(device), attention_mask=mask.to(device) if use_mask else None)
    return out[0]  # the last hidden state


def encode_prompts(
    tokenizer: Any, text_encoder: nn.Module, prompts: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """The cross-attention context of each prompt, [N x model_max_length x hidden], on the encoder's device."""
    ids, mask = tokenize_prompts(tokenizer, prompts)
    parts = [
        _encode_ids(text_encoder, ids[s : s + batch_size], mask[s : s + batch_size])
        for s in range(0, len(ids), batch_size)
    ]
    return torch.cat(parts)


@dataclass
class PromptCache:
    """A built prompt cache, read whole into memory: tensors and texts only, no encoder.

    texts: the cached captions, ``texts[0] == ""``; embeddings: [len(texts) x L x D], row i the
    context of ``texts[i]``."""

    path: Path
    key: dict[str, Any]
    texts: list[str]
    embeddings: torch.Tensor

    def __post_init__(self) -> None:
        self._rows = {text: i for i, text in enumerate(self.texts)}

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def empty(self) -> torch.Tensor:
        """The empty prompt's context [L x D]: the unconditional branch of guidance and prompt dropout."""
        return self.embeddings[0]

    def indices(self, captions: Sequence[str]) -> torch.Tensor:
        """Row of each caption, int64 [N] (compute once per dataset; a batch is ``embeddings[rows[idx]]``)."""
        missing = [c for c in captions if c not in self._rows]
        if missing:
            raise CacheError(
                f"{len(missing)} caption(s) are not in the prompt cache {self.path} (first: {missing[0][:60]!r}); "
                "build the cache from this dataset's captions"
            )
        return torch.tensor([self._rows[c] for c in captions], dtype=torch.long)

    def lookup(self, captions: Sequence[str]) -> torch.Tensor:
        """The contexts of ``captions``, [N x L x D]."""
        return self.embeddings[self.indices(captions)]


def open_prompt_cache(path: str | Path, expect: dict[str, Any] | None = None) -> PromptCache:
    """Read the prompt cache in ``path`` (no tokenizer or encoder needed); ``expect``: the key it must have."""
    path = Path(path)
    manifest, tensors = read_store(path, "prompts", expect)
    texts = manifest.get("texts")
    if not isinstance(texts, list) or len(texts) != len(tensors["embeddings"]) or texts[:1] != [""]:
        raise CacheError(
            f"{path}/manifest.json: its texts do not match its embedding rows; delete {path} to rebuild it"
        )
    return PromptCache(path, manifest["key"], texts, tensors["embeddings"])


def cache_prompts(
    tokenizer: Any,
    text_encoder: ModuleOrLoader,
    captions: Sequence[str],
    *,
    root: str | Path | None = None,
    path: str | Path | None = None,
    encoder_id: str | None = None,
    dtype: str = "float32",
    batch_size: int = 64,
    shard_size: int = 1024,
    log: Callable[[str], None] = lambda s: None,
) -> PromptCache:
    """The contexts of the distinct ``captions`` and of "", built once and cached; then read.

    Where the cache lives and what a mismatch does are as for :func:`difflora.latent.cache_latents`
    (default root ``$DIFFLORA_CACHE/latents``). ``encoder_id`` stands in for hashing the encoder's
    weights; with it, ``text_encoder`` may be a function that loads the encoder, called only when
    something must be encoded. ``dtype`` is the storage dtype."""
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    if encoder_id is None and not isinstance(text_encoder, nn.Module):
        raise ValueError("cache_prompts: pass encoder_id with a text encoder loader")
    texts = ["", *sorted(set(captions) - {""})]
    ids, mask = tokenize_prompts(tokenizer, texts)
    tokens = hashlib.sha256()
    hash_tensor(tokens, ids)
    hash_tensor(tokens, mask)
    get_encoder = loaded_once(text_encoder)
    key = {
        "encoder": encoder_id or module_fingerprint(get_encoder()),
        "texts": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
        "tokens": tokens.hexdigest(),
        "num_texts": len(texts),
        "dtype": dtype,
    }
    plan = StorePlan("prompts", key, len(texts), shard_size)
    directory = Path(path) if path is not None else plan.directory(root)

    def compute(start: int, count: int) -> dict[str, torch.Tensor]:
        rows = slice(start, start + count)
        parts = [
            _encode_ids(get_encoder(), ids[rows][s : s + batch_size], mask[rows][s : s + batch_size])
            for s in range(0, count, batch_size)
        ]
        return {"embeddings": torch.cat(parts).to("cpu", getattr(torch, dtype))}

    build_store(directory, plan, compute, lambda: {"texts": texts}, log)
    return open_prompt_cache(directory, key)
