"""Latents of a VAE (diffusers' AutoencoderKL), computed once and cached on disk; and decoded back.

A latent is ``(z - shift_factor) * scaling_factor`` with z the posterior's mean (the default) or
one draw from it, as diffusers' pipelines scale them; decoding inverts it: ``vae.decode(latents /
scaling_factor + shift_factor)``, clamped to [-1, 1]. ``shift_factor`` is 0 when the VAE's config
has none. The VAE is passed in (a module, or a function that loads one only when a cache must be
built): nothing here loads a model, and reading a cache needs no VAE.

The cache (a :mod:`difflora.latent.store`) is keyed by the images' content, the VAE's
fingerprint, the resolution, the crop, the flips, the posterior setting and the storage dtype:
each is a field of the key, so another VAE or another resolution is another cache. With flips,
the latents of the mirrored images are cached too (``flipped``): mirroring a latent is not
mirroring the image, since a VAE's convolutions are not mirror-symmetric.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from difflora.data.dataset import ImageDataset
from difflora.data.transforms import flip_coins
from difflora.files.tensorfile import check_finite
from difflora.latent.fingerprint import ModuleOrLoader, hash_tensor, loaded_once, module_config, module_fingerprint
from difflora.latent.store import STORAGE_DTYPES, CacheError, StorePlan, build_store, read_store

__all__ = [
    "LatentCache",
    "LatentSettings",
    "cache_latents",
    "decode_latents",
    "encode_images",
    "open_latent_cache",
    "vae_scaling",
]

Posterior = Literal["mean", "sample"]
Images = ImageDataset | torch.Tensor | Dataset
# Seeds of the per-sample posterior draws: seed * _SEED_STRIDE + index fits a 64-bit generator seed.
_SEED_STRIDE = 2**32
_HASH_CHUNK = 256


@dataclass(frozen=True)
class LatentSettings:
    """How latents are made and stored.

    posterior: "mean" (the posterior's mean, deterministic: the default, see docs/latents.md) or
        "sample" (one draw per image, sample i from ``torch.Generator().manual_seed(seed * 2**32 + i)``,
        so the draws do not depend on the batch size or on where a build resumed; a mirrored image
        draws with its original's seed).
    flips: cache the mirrored images' latents too (None: as the dataset's ``hflip`` says).
    crop: how the images were brought to their resolution (a label recorded in the key: the pixels
        of a folder of files are not hashed, so the crop must be).
    dtype: storage dtype of the cached latents.
    batch_size / shard_size / workers: encoding batch, rows per shard file, DataLoader workers for
        a dataset that reads its images from disk; none of them changes the latents.
    """

    posterior: Posterior = "mean"
    seed: int = 0
    flips: bool | None = None
    crop: str = "resize"
    dtype: str = "float32"
    batch_size: int = 16
    shard_size: int = 1024
    workers: int = 0

    def __post_init__(self) -> None:
        if self.posterior not in ("mean", "sample"):
            raise ValueError(f"posterior must be 'mean' or 'sample', got {self.posterior!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must lie in [0, 2**31), got {self.seed}")
        if self.batch_size < 1 or self.shard_size < 1 or self.workers < 0:
            raise ValueError("batch_size and shard_size must be >= 1 and workers >= 0")


def vae_scaling(vae: nn.Module) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of ``vae``'s config; shift 0.0 when it has none (SD's VAE)."""
    config = module_config(vae)
    if "scaling_factor" not in config:
        raise CacheError(f"{type(vae).__name__} has no config.scaling_factor; pass a diffusers AutoencoderKL")
    return float(config["scaling_factor"]), float(config.get("shift_factor") or 0.0)


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


@torch.no_grad()
def encode_images(
    vae: nn.Module, images: torch.Tensor, posterior: Posterior = "mean", seed: int = 0, first_index: int = 0
) -> torch.Tensor:
    """Latents of ``images`` ([B x C x H x W] in [-1, 1]) on the VAE's device, in its dtype.

    ``posterior="sample"`` draws sample i of the batch from a CPU generator seeded with
    ``seed * 2**32 + first_index + i`` (what ``latent_dist.sample(generator)`` draws for that image alone)."""
    device, dtype = _device_dtype(vae)
    scale, shift = vae_scaling(vae)
    dist = vae.encode(images.to(device=device, dtype=dtype)).latent_dist
    z = dist.mean
    if posterior == "sample":
        shape = (1, *z.shape[1:])
        noise = [
            torch.randn(
                shape, generator=torch.Generator().manual_seed(seed * _SEED_STRIDE + first_index + i), dtype=z.dtype
            )
            for i in range(z.shape[0])
        ]
        z = z + dist.std * torch.cat(noise).to(device)
    return (z - shift) * scale


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from latents: ``vae.decode(latents / scaling_factor + shift_factor)``, clamped."""
    device, dtype = _device_dtype(vae)
    scale, shift = vae_scaling(vae)
    return vae.decode(latents.to(device=device, dtype=dtype) / scale + shift).sample.clamp(-1.0, 1.0)


def _rows(images: Images, workers: int) -> Callable[[int, int], torch.Tensor]:
    """A reader of images [start, start + count) of a tensor, an ImageDataset or a map-style dataset
    (whose items are an image or a tuple starting with one)."""
    if isinstance(images, ImageDataset):
        images = images.images
    if isinstance(images, torch.Tensor):
        return lambda start, count: images[start : start + count]

    def read(start: int, count: int) -> torch.Tensor:
        loader = DataLoader(Subset(images, range(start, start + count)), batch_size=count, num_workers=workers)
        batch = next(iter(loader))
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    return read


def _content_id(rows: Callable[[int, int], torch.Tensor], n: int) -> str:
    """sha256 of every image (dtype, shape, bytes), read in chunks of a fixed size: the id must not
    depend on settings that do not change the latents, such as the batch size."""
    hasher = hashlib.sha256()
    for start in range(0, n, _HASH_CHUNK):
        hash_tensor(hasher, rows(start, min(_HASH_CHUNK, n - start)))
    return hasher.hexdigest()


@dataclass
class LatentCache:
    """A built latent cache, read whole into memory: tensors only, no VAE.

    latents: [N x c x h x w] (rows aligned with the dataset's samples); flipped: the mirrored
    images' latents, or None when the cache has no flips. ``key`` is what the cache was made from.
    """

    path: Path
    key: dict[str, Any]
    latents: torch.Tensor
    flipped: torch.Tensor | None
    scaling_factor: float
    shift_factor: float

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, indices: torch.Tensor | Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of ``indices``; with flips, each sample's mirrored latents when its coin is up.

        The coins are :func:`difflora.data.transforms.flip_coins` (one draw of B numbers, as
        ``ImageDataset.batch`` draws with hflip), so the generator advances as in pixel training."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        z = self.latents[idx]
        if self.flipped is None:
            return z
        coins = flip_coins(len(idx), generator).to(z.device).view(-1, *([1] * (z.ndim - 1)))
        return torch.where(coins, self.flipped[idx], z)


def _latent_cache(path: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LatentCache:
    try:
        scale, shift = float(manifest["scaling_factor"]), float(manifest["shift_factor"])
    except (KeyError, TypeError, ValueError):
        raise CacheError(
            f"{path}/manifest.json lacks scaling_factor or shift_factor; delete {path} to rebuild it"
        ) from None
    return LatentCache(path, manifest["key"], tensors["latents"], tensors.get("flipped"), scale, shift)


def open_latent_cache(path: str | Path, expect: dict[str, Any] | None = None) -> LatentCache:
    """Read the latent cache in ``path`` (no VAE needed); ``expect``: the key it must have."""
    path = Path(path)
    manifest, tensors = read_store(path, "latents", expect)
    return _latent_cache(path, manifest, tensors)


def _key(images: Images, n: int, shape: torch.Size, settings: LatentSettings, content_id: str, vae_id: str) -> dict:
    flips = settings.flips if settings.flips is not None else bool(getattr(images, "hflip", False))
    key = {"data": content_id, "num_images": n, "vae": vae_id, "resolution": list(shape[-2:]), "channels": shape[0]}
    key |= {k: v for k, v in asdict(settings).items() if k in ("posterior", "crop", "dtype")} | {"flips": flips}
    if settings.posterior == "sample":
        key["seed"] = settings.seed
    return key


def cache_latents(
    vae: ModuleOrLoader,
    images: Images,
    settings: LatentSettings = LatentSettings(),
    *,
    root: str | Path | None = None,
    path: str | Path | None = None,
    content_id: str | None = None,
    vae_id: str | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> LatentCache:
    """The latents of ``images`` (an ImageDataset, a tensor [N x C x H x W] or a map-style dataset,
    in [-1, 1]) under ``vae``, built once and cached; then read from the cache.

    The cache lives in ``root/latents-<key hash>`` (default root ``$DIFFLORA_CACHE/latents``), so
    other inputs make another cache; or in ``path`` exactly, where a cache of another key is
    refused (:class:`CacheError`, one line, nothing written). An unfinished build resumes.
    ``content_id`` (e.g. a hash of a folder's file index) and ``vae_id`` (e.g. a pipeline folder's
    fingerprint) stand in for hashing the images and the VAE's weights; with ``vae_id``, ``vae`` may
    be a function that loads the VAE, called only when something must be encoded."""
    rows = _rows(images, settings.workers)
    n = len(images)
    if n == 0:
        raise CacheError("no images to encode: the dataset is empty")
    if vae_id is None and not isinstance(vae, nn.Module):
        raise ValueError("cache_latents: pass vae_id with a VAE loader (the fingerprint is the VAE's otherwise)")
    get_vae = loaded_once(vae)
    content_id = content_id or _content_id(rows, n)
    key = _key(images, n, rows(0, 1).shape[1:], settings, content_id, vae_id or module_fingerprint(get_vae()))
    plan = StorePlan("latents", key, n, settings.shard_size)
    directory = Path(path) if path is not None else plan.directory(root)
    storage = getattr(torch, settings.dtype)

    def compute(start: int, count: int) -> dict[str, torch.Tensor]:
        out: dict[str, list[torch.Tensor]] = {"latents": [], "flipped": []}
        for s in range(start, start + count, settings.batch_size):
            x = rows(s, min(settings.batch_size, start + count - s))
            views = {"latents": x, "flipped": x.flip(-1)} if key["flips"] else {"latents": x}
            for name, view in views.items():
                z = encode_images(get_vae(), view, settings.posterior, settings.seed, s)
                out[name].append(z.to("cpu", storage))
        tensors = {name: torch.cat(parts) for name, parts in out.items() if parts}
        fix = "a float16 VAE can overflow: encode in float32 (vae.float())"
        check_finite(tensors, f"the VAE's latents of images {start}..{start + count - 1}", fix, CacheError)
        return tensors

    def scaling() -> dict[str, float]:
        scale, shift = vae_scaling(get_vae())
        return {"scaling_factor": scale, "shift_factor": shift}

    build_store(directory, plan, compute, scaling, log)
    return open_latent_cache(directory, key)
