"""The feature network: learns digits on a tiny budget, caches atomically, round-trips exactly,
and refuses to score a dataset or image size it was not trained for."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from difflora.config.schema import DataConfig, TaskDataConfig
from difflora.data import load_dataset
from difflora.eval import (
    FeatureNetMismatchError,
    FeatureTrainConfig,
    compute_metrics,
    default_cache_dir,
    get_feature_net,
    load_feature_net,
    load_inception,
    save_feature_net,
)
from difflora.eval import features as F

# A few seconds of training on 1,438 digits: 2 epochs of 23 batches.
TINY = FeatureTrainConfig(epochs=2, batch_size=64, seed=0)
DIGITS = DataConfig(name="digits")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def net(cache):
    return get_feature_net(DIGITS, cache_dir=cache, train=TINY, progress=False)


def test_kid_scale_is_recorded_and_puts_the_kernel_at_two(net):
    # On the feature net's own training images (its half of the train split) mean k(x, x) = 2.
    own, _ = F.split_train(load_dataset(DIGITS, "train").labels)
    with torch.no_grad():
        f = net.features(load_dataset(DIGITS, "train").images[own]).double() * net.info.kid_scale
    assert float(f.pow(2).sum(1).mean() / f.shape[1]) == pytest.approx(2 ** (1 / 3) - 1, rel=1e-5)


def test_tiny_budget_beats_chance_on_digits(net):
    # Chance is 0.1; 2 epochs reach ~0.95 (0.8 leaves room for other seeds / BLAS builds).
    assert net.info.test_accuracy > 0.8
    test = load_dataset(DIGITS, "test")
    with torch.no_grad():
        acc = (net.logits(test.images).argmax(1) == test.labels).double().mean().item()
    assert acc == net.info.test_accuracy
    assert net.features(test.images[:5]).shape == (5, 128)


def test_cache_files_and_second_call_loads_without_training(net, cache, monkeypatch):
    stem = cache / F.feature_net_key(DIGITS, (32, 64, 128), 128, 2, TINY)
    assert stem.name.startswith("digits-8px-")
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["dataset"] == "digits" and meta["image_size"] == 8 and meta["in_channels"] == 1
    assert meta["num_classes"] == 10 and meta["test_accuracy"] == net.info.test_accuracy
    assert meta["data_fingerprint"] == F.data_fingerprint(DIGITS)
    assert not list(cache.glob(".*tmp"))  # temp files were renamed, none left behind

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(F, "train_feature_net", no_training)
    # limit and hflip do not change the evaluator: same cache entry.
    again = get_feature_net(DIGITS.model_copy(update={"limit": 100, "hflip": True}), cache_dir=cache, train=TINY)
    x = load_dataset(DIGITS, "test").images[:32]
    assert torch.equal(again.features(x), net.features(x))


def test_save_load_round_trip_gives_identical_features(net, tmp_path):
    save_feature_net(net, tmp_path / "fn")
    loaded = load_feature_net(tmp_path / "fn.safetensors", expect=DIGITS)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(loaded.features(x), net.features(x))
    assert torch.equal(loaded.logits(x), net.logits(x))
    assert loaded.info == net.info


def test_training_is_seeded():
    tr, te = load_dataset(DIGITS, "train"), load_dataset(DIGITS, "test")

    def train(seed: int):
        cfg = FeatureTrainConfig(epochs=1, max_steps=5, seed=seed)
        # A small network: only determinism matters here.
        return F.train_feature_net(
            tr.images, tr.labels, te.images, te.labels, 10, train=cfg, widths=(8, 16), feature_dim=16, progress=False
        )

    a, b, other = train(3), train(3), train(4)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(other.head.weight, a.head.weight)


def test_wrong_dataset_or_size_is_rejected_naming_both(net, tmp_path):
    save_feature_net(net, tmp_path / "fn")
    with pytest.raises(FeatureNetMismatchError, match=r"'digits' at 8x8.*'fashion-mnist' at 28"):
        load_feature_net(tmp_path / "fn", expect=DataConfig(name="fashion-mnist"))
    with pytest.raises(FeatureNetMismatchError, match=r"'digits' at 8x8.*'digits' at 16"):
        load_feature_net(tmp_path / "fn", expect=DataConfig(name="digits", image_size=16))
    big = torch.zeros(4, 1, 16, 16)
    with pytest.raises(FeatureNetMismatchError, match=r"'digits' at 8x8.*\(4, 1, 16, 16\)"):
        compute_metrics(big, big, net)


def test_mismatched_weights_and_missing_cache_are_errors(net, tmp_path):
    save_feature_net(net, tmp_path / "fn")
    meta = json.loads((tmp_path / "fn.json").read_text())
    meta["weights_sha256"] = "0" * 64
    (tmp_path / "fn.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256"):
        load_feature_net(tmp_path / "fn")
    with pytest.raises(FileNotFoundError, match="no cached feature network for 'digits'"):
        get_feature_net(DIGITS, cache_dir=tmp_path / "empty", train_if_missing=False)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "features"
    monkeypatch.delenv("DIFFLORA_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "difflora" / "features"
    key = lambda cfg: F.feature_net_key(cfg, (32, 64, 128), 128, 2, TINY)  # noqa: E731
    assert key(DIGITS) != key(DIGITS.model_copy(update={"image_size": 16}))
    assert key(DIGITS) != F.feature_net_key(DIGITS, (32, 64, 128), 128, 2, FeatureTrainConfig(seed=1))
    # A multi-dataset config (the union of its tasks' splits) is other data than data.name alone: a
    # network trained on the union must not be cached, or found, under data.name's key.
    union = DIGITS.model_copy(update={"tasks": [TaskDataConfig(name="mnist-5k")], "image_size": 8})
    alone = DIGITS.model_copy(update={"image_size": 8})
    assert key(union) != key(alone) and key(union).startswith("digits+mnist-5k-8px-")
    assert F.data_fingerprint(union) != F.data_fingerprint(alone)
    assert F.data_fingerprint(union) != F.data_fingerprint(union.model_copy(update={"task_labels": "offset"}))
    # A single dataset's fingerprint is what it always was, so cached networks stay valid.
    size, channels = DIGITS.resolved_shape()
    old = {"name": "digits", "root": None, "image_size": size, "channels": channels}
    text = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert F.data_fingerprint(DIGITS) == hashlib.sha256(text.encode()).hexdigest()
    # The key covers the format version: networks of version 1 (trained on the whole train split) are not reused.
    current = key(DIGITS)
    monkeypatch.setattr(F, "FORMAT_VERSION", 1)
    assert key(DIGITS) != current


def test_metrics_on_real_digits_rank_noise_below_data(net):
    # Sanity in the learned feature space: held-out digits are far closer to the floor pool (train
    # digits the network never saw) than uniform noise is, and the classifier recognises them.
    pool_images, pool_labels = F.floor_pool(DIGITS)
    test = load_dataset(DIGITS, "test")
    noise = torch.rand(test.images.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    kw = dict(real_labels=pool_labels, kid_subsets=10, kid_subset_size=200)
    good = compute_metrics(pool_images, test.images, net, fake_labels=test.labels, **kw)
    bad = compute_metrics(pool_images, noise, net, **kw)
    assert good["fd"] * 10 < bad["fd"]
    # KID of real vs real is 0 up to its spread over subsets (it can be negative); noise is far above.
    assert abs(good["kid_mean"]) < 3 * good["kid_std"]
    assert bad["kid_mean"] > 5 * (abs(good["kid_mean"]) + good["kid_std"])
    # Noise precision is 0.2-0.4 here (a 2-epoch classifier maps some noise near digits; seen
    # across thread counts), far below the held-out digits' ~0.9.
    assert good["precision"] > 0.8 and bad["precision"] < 0.6
    assert good["class_accuracy"] == net.info.test_accuracy


class _NotATensor:
    pass


def test_load_inception_reads_tensors_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="Inception weights"):
        load_inception(tmp_path / "missing.pth")
    # A pickle holding an arbitrary object is refused before anything else happens.
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2), "payload": _NotATensor()}, evil)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_inception(evil)
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        ok = tmp_path / "inception.pth"
        torch.save({"fc.weight": torch.zeros(2)}, ok)
        with pytest.raises(ImportError, match="pip install torch-fidelity"):
            load_inception(ok)
