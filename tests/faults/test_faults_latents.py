"""Fault catalogue, part 6: the latent and prompt caches (difflora.latent), through the API.

A cache of another VAE or text encoder at an explicit path, damaged and forged shards, manifests
that disagree with their shards: each is one line naming the cache and the fix, and no file of the
cache changes (the caches are built inside the run copy, which the check snapshots)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from faultkit import Fault, both, cases, check_fault, edit_json, flip_byte, remove, truncate, write
from safetensors.torch import save_file

from difflora.latent import (
    CacheError,
    LatentSettings,
    cache_latents,
    cache_prompts,
    open_latent_cache,
    open_prompt_cache,
)
from tiny_latent import tiny_images, tiny_text_encoder, tiny_tokenizer, tiny_vae

pytest.importorskip("diffusers")
SETTINGS = LatentSettings(batch_size=4, shard_size=4)
SHARD0, MANIFEST = "lc/shard_00000.safetensors", "lc/manifest.json"
CAPTIONS = ["a cat", "a dog", "a cat"]


def _latents(run: Path, vae_seed: int = 0, size: int = 16):
    return cache_latents(tiny_vae(vae_seed), tiny_images(10, size), SETTINGS, path=run / "lc")


def built(run: Path, tmp: Path) -> None:
    _latents(run)


def _prompts(run: Path, tmp: Path, encoder_seed: int = 0):
    return cache_prompts(tiny_tokenizer(tmp / "tok"), tiny_text_encoder(encoder_seed), CAPTIONS, path=run / "pc")


def forge_shard(run: Path, tmp: Path) -> None:
    """Shard 0 rewritten with NaN latents, and the manifest's size and hash updated to match."""
    path = run / SHARD0
    meta = {"key_hash": json.loads((run / MANIFEST).read_text())["key_hash"], "start": "0", "count": "4"}
    save_file({"latents": torch.full((4, 4, 8, 8), float("nan"))}, str(path), metadata=meta)
    data = path.read_bytes()
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["shards"][0] |= {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (run / MANIFEST).write_text(json.dumps(manifest))


def _set(key: str, value):
    return edit_json(MANIFEST, lambda m: {**m, key: value})


OPEN = dict(api=lambda r, t: open_latent_cache(r / "lc"), exc=CacheError)
LATENTS = [
    Fault(
        "latent-cache-of-another-vae",
        api=lambda r, t: _latents(r, vae_seed=1),
        exc=CacheError,
        error=r"^latents cache .*lc holds shards made for another key \(vae: \w+ there, \w+ here\); .*delete it",
        damage=built,
    ),
    Fault(
        "latent-cache-of-another-resolution",
        api=lambda r, t: _latents(r, size=24),
        exc=CacheError,
        error=r"made for another key \(data: .*; resolution: \[16, 16\] there, \[24, 24\] here\)",
        damage=built,
    ),
    Fault(
        "latent-cache-unfinished-of-another-vae",
        api=lambda r, t: _latents(r, vae_seed=1),
        exc=CacheError,
        error=r"latents cache .*lc holds shards of another cache; .*delete it or point at another cache path",
        damage=both(built, remove(MANIFEST)),
    ),
    Fault(
        "latent-cache-unfinished",
        error=r"lc is an unfinished build \(no manifest yet\)",
        damage=both(built, remove(MANIFEST)),
        **OPEN,
    ),
    Fault(
        "latent-cache-shard-bitflip",
        error=r"shard_00000\.safetensors is damaged \(its size or sha256 differs",
        damage=both(built, flip_byte(SHARD0)),
        **OPEN,
    ),
    Fault(
        "latent-cache-shard-truncated",
        error=r"shard_00000\.safetensors is damaged",
        damage=both(built, truncate(SHARD0)),
        **OPEN,
    ),
    Fault(
        "latent-cache-shard-missing",
        error=r"shard_00001\.safetensors is missing \(listed in manifest\.json\)",
        damage=both(built, remove("lc/shard_00001.safetensors")),
        **OPEN,
    ),
    Fault(
        "latent-cache-shard-forged-nan",
        error=r"shard_00000\.safetensors: tensor 'latents' holds 1024 NaN",
        damage=both(built, forge_shard),
        **OPEN,
    ),
    Fault(
        "latent-cache-manifest-rows",
        error=r"its shards do not cover rows 0\.\.12 in order; delete .*lc to rebuild",
        damage=both(built, _set("rows", 12)),
        **OPEN,
    ),
    Fault(
        "latent-cache-manifest-shapes",
        error=r"tensor 'latents' is float32 \[4, 4, 8, 8\], manifest\.json says float32 \[4, 4, 4, 4\]",
        damage=both(built, _set("shapes", {"latents": [4, 4, 4]})),
        **OPEN,
    ),
    Fault(
        "latent-cache-manifest-dtype",
        error=r"tensor 'latents' is float32 .* manifest\.json says float16",
        damage=both(built, _set("dtype", "float16")),
        **OPEN,
    ),
    Fault(
        "latent-cache-manifest-garbage",
        error=r"manifest\.json is not valid JSON .*; delete .*lc to rebuild",
        damage=both(built, lambda r, t: (r / MANIFEST).write_text("{oops")),
        **OPEN,
    ),
    Fault(
        "latent-cache-manifest-key-edited",
        error=r"its key does not match its key_hash",
        damage=both(built, edit_json(MANIFEST, lambda m: {**m, "key": {**m["key"], "vae": "x"}})),
        **OPEN,
    ),
    Fault(
        "latent-cache-manifest-no-scaling",
        error=r"lacks scaling_factor or shift_factor",
        damage=both(built, edit_json(MANIFEST, lambda m: {k: v for k, v in m.items() if k != "shift_factor"})),
        **OPEN,
    ),
    Fault(
        "latent-cache-manifest-of-prompts",
        error=r"is not a difflora-cache/1 latents cache manifest \(it says .*'prompts'\)",
        damage=both(built, _set("kind", "prompts")),
        **OPEN,
    ),
    Fault(
        "latent-cache-expected-another-key",
        api=lambda r, t: open_latent_cache(r / "lc", expect={**open_latent_cache(r / "lc").key, "crop": "center"}),
        exc=CacheError,
        error=r"made for another key \(crop: \"resize\" there, \"center\" here\)",
        damage=built,
    ),
]

LATENTS += [
    Fault(
        "latent-cache-path-holds-other-files",
        api=lambda r, t: _latents(r),
        exc=CacheError,
        error=r"lc is not a latents cache \(it holds a\.png\); point the cache at a new or empty directory",
        damage=write("lc/a.png", "not a cache"),
    ),
    Fault(
        "latent-cache-path-is-a-file",
        api=lambda r, t: _latents(r),
        exc=CacheError,
        error=r"lc is a file, not a latents cache",
        damage=write("lc", "x"),
    ),
]

PROMPTS = [
    Fault(
        "prompt-cache-of-another-encoder",
        api=lambda r, t: _prompts(r, t, encoder_seed=1),
        exc=CacheError,
        error=r"prompts cache .*pc holds shards made for another key \(encoder: \w+ there, \w+ here\)",
        damage=lambda r, t: _prompts(r, t),
    ),
    Fault(
        "prompt-cache-texts-disagree",
        api=lambda r, t: open_prompt_cache(r / "pc"),
        exc=CacheError,
        error=r"pc/manifest\.json: its texts do not match its embedding rows",
        damage=both(
            lambda r, t: _prompts(r, t), edit_json("pc/manifest.json", lambda m: {**m, "texts": ["", "a cat"]})
        ),
    ),
]


@pytest.mark.parametrize("fault", cases(LATENTS + PROMPTS))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
