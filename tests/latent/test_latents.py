"""The latent cache against diffusers' own encode/decode: the mean (or a seeded draw) of the
posterior times scaling_factor, decoding inverts it, and the cache is keyed, never stale, resumable."""

from __future__ import annotations

import pytest
import torch

import difflora.latent.latents as latents_module
from difflora.data.dataset import ImageDataset
from difflora.latent import (
    CacheError,
    LatentSettings,
    cache_latents,
    decode_latents,
    module_fingerprint,
    open_latent_cache,
)
from tiny_latent import tiny_images, tiny_vae

pytest.importorskip("diffusers")
# The cache encodes in batches of 3 and the reference in one batch of 10: a few float32 ulps apart.
ATOL = 1e-5


def _dataset(n: int = 10, size: int = 16, hflip: bool = False) -> ImageDataset:
    return ImageDataset(tiny_images(n, size), torch.zeros(n, dtype=torch.long), ["x"], name="tiny", hflip=hflip)


SMALL = LatentSettings(batch_size=3, shard_size=4)


@pytest.mark.parametrize("shift", [None, 0.25])
def test_latents_are_the_posterior_mean_shifted_and_scaled(tmp_path, shift):
    vae, ds = tiny_vae(shift_factor=shift, scaling_factor=1.5), _dataset()
    cache = cache_latents(vae, ds, SMALL, root=tmp_path)
    with torch.no_grad():
        mean = vae.encode(ds.images).latent_dist.mean
    reference = (mean - (shift or 0.0)) * vae.config.scaling_factor
    assert cache.latents.shape == (10, 4, 8, 8) and cache.flipped is None
    torch.testing.assert_close(cache.latents, reference, atol=ATOL, rtol=0)
    assert (cache.scaling_factor, cache.shift_factor) == (1.5, shift or 0.0)


def test_sampled_latents_are_latent_dist_sample_at_each_images_seed(tmp_path):
    vae, ds = tiny_vae(), _dataset()
    cache = cache_latents(
        vae, ds, LatentSettings(posterior="sample", seed=3, batch_size=3, shard_size=4), root=tmp_path
    )
    with torch.no_grad():
        reference = torch.cat(
            [
                vae.encode(ds.images[i : i + 1]).latent_dist.sample(torch.Generator().manual_seed(3 * 2**32 + i))
                for i in range(10)
            ]
        )
    torch.testing.assert_close(cache.latents, reference * 0.18215, atol=ATOL, rtol=0)
    mean = cache_latents(vae, ds, SMALL, root=tmp_path)
    assert mean.path != cache.path and not torch.allclose(mean.latents, cache.latents, atol=1e-3)


@pytest.mark.parametrize("shift", [None, -0.5])
def test_decode_inverts_the_scaling_and_clamps(shift):
    vae = tiny_vae(shift_factor=shift, scaling_factor=2.0)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = vae.decode(z / 2.0 + (shift or 0.0)).sample.clamp(-1, 1)
    images = decode_latents(vae, z)
    assert images.shape == (3, 3, 16, 16) and float(images.abs().max()) <= 1.0
    torch.testing.assert_close(images, reference, atol=0, rtol=0)


def test_flips_cache_the_mirrored_images_latents_and_draw_the_datasets_coins(tmp_path):
    vae, ds = tiny_vae(), _dataset(hflip=True)
    cache = cache_latents(vae, ds, SMALL, root=tmp_path)
    with torch.no_grad():
        mirrored = vae.encode(ds.images.flip(-1)).latent_dist.mean * 0.18215
    torch.testing.assert_close(cache.flipped, mirrored, atol=ATOL, rtol=0)
    # Mirroring a latent is not mirroring the image: a VAE's kernels are not mirror-symmetric.
    assert (cache.latents.flip(-1) - cache.flipped).abs().max() > 1e-3
    idx = torch.tensor([0, 3, 5, 7, 9, 1])
    g_pixels, g_latents = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x, _ = ds.batch(idx, g_pixels)
    z = cache.batch(idx, g_latents)
    flipped_rows = (x == ds.images[idx].flip(-1)).flatten(1).all(1) & ~(x == ds.images[idx]).flatten(1).all(1)
    assert flipped_rows.any() and (~flipped_rows).any()
    torch.testing.assert_close(z, torch.where(flipped_rows.view(-1, 1, 1, 1), cache.flipped[idx], cache.latents[idx]))
    assert torch.equal(g_pixels.get_state(), g_latents.get_state())


def test_the_cache_is_reused_as_is_and_rebuilt_for_another_vae_or_resolution(tmp_path):
    vae, ds = tiny_vae(), _dataset()
    logs: list[str] = []
    first = cache_latents(vae, ds, SMALL, root=tmp_path, log=logs.append)
    assert sum("written" in s for s in logs) == 3
    files = {p: p.stat().st_mtime_ns for p in first.path.iterdir()}
    logs.clear()
    again = cache_latents(vae, ds, SMALL, root=tmp_path, log=logs.append)
    assert again.path == first.path and not logs and torch.equal(again.latents, first.latents)
    other_batches = LatentSettings(batch_size=5, shard_size=4, workers=1)  # none of them changes the latents
    assert cache_latents(vae, ds, other_batches, root=tmp_path, log=logs.append).path == first.path and not logs
    assert {p: p.stat().st_mtime_ns for p in first.path.iterdir()} == files

    with torch.no_grad():
        next(vae.parameters()).view(-1)[0] += 1e-3  # one weight perturbed
    other = cache_latents(vae, ds, SMALL, root=tmp_path, log=logs.append)
    assert other.path != first.path and other.key["vae"] != first.key["vae"] and logs
    assert other.key["vae"] == module_fingerprint(vae)
    bigger = cache_latents(vae, _dataset(size=24), SMALL, root=tmp_path)
    assert bigger.path not in (first.path, other.path) and bigger.latents.shape[-1] == 12
    assert bigger.key["resolution"] == [24, 24]
    assert {p: p.stat().st_mtime_ns for p in first.path.iterdir()} == files  # the old cache untouched


def test_an_explicit_path_of_another_vae_is_refused_in_one_line(tmp_path):
    ds = _dataset()
    cache_latents(tiny_vae(0), ds, SMALL, path=tmp_path / "c")
    with pytest.raises(CacheError, match=r"made for another key \(vae: \w+ there, \w+ here\)") as info:
        cache_latents(tiny_vae(1), ds, SMALL, path=tmp_path / "c")
    assert "\n" not in str(info.value)
    with pytest.raises(CacheError, match=r"another key \(resolution: \[16, 16\] there, \[24, 24\] here"):
        cache_latents(
            tiny_vae(0),
            _dataset(size=24),
            SMALL,
            path=tmp_path / "c",
            content_id=open_latent_cache(tmp_path / "c").key["data"],
        )


def test_an_interrupted_build_resumes_from_the_last_complete_shard(tmp_path, monkeypatch):
    vae, ds = tiny_vae(), _dataset()
    whole = cache_latents(vae, ds, SMALL, root=tmp_path / "whole")
    encode = latents_module.encode_images
    calls: list[int] = []

    def interrupted(vae, x, posterior, seed, first):
        calls.append(first)
        if first >= 8:  # the third shard, rows 8..9
            raise KeyboardInterrupt
        return encode(vae, x, posterior, seed, first)

    monkeypatch.setattr(latents_module, "encode_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache_latents(vae, ds, SMALL, root=tmp_path / "part")
    (directory,) = (tmp_path / "part").glob("latents-*")
    assert sorted(p.name for p in directory.iterdir()) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    with pytest.raises(CacheError, match="is an unfinished build"):
        open_latent_cache(directory)
    monkeypatch.setattr(latents_module, "encode_images", lambda *a: calls.append(a[-1]) or encode(*a))
    calls.clear()
    logs: list[str] = []
    resumed = cache_latents(vae, ds, SMALL, root=tmp_path / "part", log=logs.append)
    assert calls == [8] and any("resuming after 2 of 3" in s for s in logs)
    assert torch.equal(resumed.latents, whole.latents)


def test_a_built_cache_is_read_without_loading_the_vae(tmp_path):
    vae, ds = tiny_vae(), _dataset()
    built = cache_latents(vae, ds, SMALL, root=tmp_path, vae_id="folder-fingerprint")

    def must_not_load():
        raise AssertionError("the VAE was loaded although the cache exists")

    again = cache_latents(must_not_load, ds, SMALL, root=tmp_path, vae_id="folder-fingerprint")
    assert torch.equal(again.latents, built.latents)
    read = open_latent_cache(built.path)
    assert torch.equal(read.latents, built.latents) and read.key == built.key


def test_a_map_style_dataset_gives_the_same_latents(tmp_path):
    vae, ds = tiny_vae(), _dataset()

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int):
            return ds.images[i], 0

    from_files = cache_latents(vae, Files(), SMALL, root=tmp_path / "a", content_id="index-sha")
    from_memory = cache_latents(vae, ds, SMALL, root=tmp_path / "b")
    assert from_files.key["data"] == "index-sha"
    assert torch.equal(from_files.latents, from_memory.latents)


def test_float16_storage_halves_the_cache(tmp_path):
    vae, ds = tiny_vae(), _dataset()
    full = cache_latents(vae, ds, SMALL, root=tmp_path)
    half = cache_latents(vae, ds, LatentSettings(batch_size=3, shard_size=4, dtype="float16"), root=tmp_path)
    assert half.path != full.path and half.latents.dtype == torch.float16
    torch.testing.assert_close(half.latents.float(), full.latents, atol=2e-3, rtol=1e-3)


def test_a_vae_giving_nan_latents_is_refused_before_anything_is_written(tmp_path):
    vae = tiny_vae()
    with torch.no_grad():
        vae.encoder.conv_in.bias.fill_(float("nan"))
    with pytest.raises(
        CacheError, match=r"the VAE's latents of images 0\.\.3: tensor 'latents' holds \d+ NaN .*float32"
    ):
        cache_latents(vae, _dataset(), SMALL, path=tmp_path / "c")
    assert not (tmp_path / "c").exists()
