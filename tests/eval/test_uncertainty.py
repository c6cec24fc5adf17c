"""Noise floors and bootstrap intervals; KID of real against real is 0 within noise on real digits
features, for random and for class-balanced draws, where the plain (unstratified) estimator is biased."""

import numpy as np
import pytest
import torch

from difflora.config.schema import DataConfig
from difflora.data import load_dataset
from difflora.eval import FeatureTrainConfig, extract_features, get_feature_net
from difflora.eval.features import floor_pool, split_train
from difflora.eval.kernel import class_prior, kernel_distance
from difflora.eval.metrics import precision_recall
from difflora.eval.uncertainty import (
    _Neighbours,
    _pr_resampled,
    bootstrap_intervals,
    check_pool,
    draw_like,
    reference_level,
    resample,
)

TOL = 1e-8
DIGITS = DataConfig(name="digits")
TINY = FeatureTrainConfig(epochs=2, batch_size=64, seed=0)


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    net = get_feature_net(DIGITS, cache_dir=tmp_path_factory.mktemp("fn"), train=TINY, progress=False)
    test = load_dataset(DIGITS, "test")
    pool_images, pool_labels = floor_pool(DIGITS)
    ref_f, _ = extract_features(net, test.images)
    pool_f, pool_logits = extract_features(net, pool_images)
    return net, ref_f, test.labels, pool_f, pool_labels, pool_logits


def test_floor_pool_is_the_half_the_feature_net_never_saw():
    labels = load_dataset(DIGITS, "train").labels
    own, pool = split_train(labels)
    assert len(set(own.tolist()) & set(pool.tolist())) == 0 and len(own) + len(pool) == len(labels)
    # Half of every class on each side (up to rounding).
    assert (torch.bincount(labels[own]) - torch.bincount(labels[pool])).abs().max() <= 1


def test_real_vs_real_kid_is_zero_within_noise(feats):
    net, ref_f, ref_labels, pool_f, pool_labels, _ = feats
    scale, n, draws = net.info.kid_scale, 300, 20
    balanced = torch.arange(n) % 10
    gen = torch.Generator().manual_seed(0)
    strat, plain, rand = [], [], []
    for _ in range(draws):
        idx = draw_like(pool_labels, n, balanced, gen)
        kw = dict(subsets=1, subset_size=1000, scale=scale)  # the full-set estimate of each draw
        strat.append(kernel_distance(ref_f, pool_f[idx], ref_labels, pool_labels[idx], **kw)[0])
        plain.append(kernel_distance(ref_f, pool_f[idx], **kw)[0])
        iid = torch.multinomial(class_prior(pool_labels), n, replacement=True, generator=gen)
        rand.append(kernel_distance(ref_f, pool_f[draw_like(pool_labels, n, iid, gen)], ref_labels, **kw)[0])
    strat, plain, rand = np.array(strat), np.array(plain), np.array(rand)
    # The plain estimator on class-balanced sets is biased low by several draw-to-draw deviations...
    assert plain.mean() < -3 * plain.std()
    # ...the stratified one is within one draw's noise of 0, for balanced and for random draws.
    assert abs(strat.mean()) < strat.std()
    assert abs(rand.mean()) < rand.std()


def test_noise_floor_checks_the_pool_and_is_reproducible(feats):
    net, ref_f, ref_labels, pool_f, pool_labels, pool_logits = feats
    with pytest.raises(ValueError, match=r"floor pool \(half the train split\) has 721"):
        check_pool(pool_labels, 722, None)
    with pytest.raises(ValueError, match="of class 0"):
        check_pool(pool_labels, 300, torch.zeros(300, dtype=torch.long))
    kw = dict(ref_labels=ref_labels, pool_logits=pool_logits, kid_scale=net.info.kid_scale, draws=3)
    labels = torch.arange(100) % 10
    a = reference_level(ref_f, pool_f, pool_labels, 100, labels=labels, **kw)
    assert a == reference_level(ref_f, pool_f, pool_labels, 100, labels=labels, **kw)
    assert set(a) == {"fd", "kid_mean", "precision", "recall", "class_accuracy"}
    for v in a.values():
        assert v["lo"] <= v["mean"] <= v["hi"] and v["std"] >= 0
    u = reference_level(ref_f, pool_f, pool_labels, 100, **kw)
    assert "class_accuracy" not in u and u["fd"]["mean"] > 0


def test_draw_like_gives_distinct_images_with_the_requested_classes():
    pool = torch.arange(200) % 7
    want = torch.tensor([0, 0, 3, 5, 5, 5])
    idx = draw_like(pool, 6, want, torch.Generator().manual_seed(1))
    assert len(set(idx.tolist())) == 6
    assert sorted(pool[idx].tolist()) == sorted(want.tolist())


def test_resample_keeps_class_counts():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    idx = resample(labels, 9, torch.Generator().manual_seed(2))
    assert torch.equal(torch.bincount(labels[idx]), torch.bincount(labels))


def test_resampled_precision_recall_without_copies_is_the_plain_one():
    g = torch.Generator().manual_seed(3)
    real, fake = (
        torch.randn(40, 3, generator=g, dtype=torch.float64),
        torch.randn(30, 3, generator=g, dtype=torch.float64) + 0.5,
    )
    nx, ny = _Neighbours(torch.cdist(real, real)), _Neighbours(torch.cdist(fake, fake))
    got = _pr_resampled(
        torch.cdist(real, fake), torch.randperm(40, generator=g), torch.randperm(30, generator=g), 3, nx, ny
    )
    assert got == pytest.approx(precision_recall(real, fake, k=3), abs=TOL)


def _naive_pr_resampled(real, fake, ix, iy, k):
    """Precision and recall of a resample, gathered copy by copy: radii over its distinct points."""
    ux, uy = ix.unique(), iy.unique()
    rx = torch.cdist(real[ux], real[ux]).kthvalue(min(k + 1, len(ux)), dim=1).values
    ry = torch.cdist(fake[uy], fake[uy]).kthvalue(min(k + 1, len(uy)), dim=1).values
    precision = (torch.cdist(real[ux], fake[iy]) <= rx[:, None]).any(0).double().mean()
    recall = (torch.cdist(real[ix], fake[uy]) <= ry[None, :]).any(1).double().mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("keep", [64, 2])  # 2: every radius falls back to the full row
def test_resampled_precision_recall_with_copies_is_the_naive_one(keep):
    g = torch.Generator().manual_seed(6)
    real = torch.randn(60, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(50, 3, generator=g, dtype=torch.float64) + 0.3
    nx, ny = _Neighbours(torch.cdist(real, real), keep), _Neighbours(torch.cdist(fake, fake), keep)
    for _ in range(5):
        ix, iy = torch.randint(60, (60,), generator=g), torch.randint(50, (50,), generator=g)
        got = _pr_resampled(torch.cdist(real, fake), ix, iy, 3, nx, ny)
        assert got == pytest.approx(_naive_pr_resampled(real, fake, ix, iy, 3), abs=TOL)


def test_bootstrap_intervals_bracket_the_estimate_and_are_seeded(feats):
    net, ref_f, ref_labels, pool_f, pool_labels, pool_logits = feats
    labels = torch.arange(100) % 10
    idx = draw_like(pool_labels, 100, labels, torch.Generator().manual_seed(4))
    kw = dict(
        real_labels=ref_labels,
        fake_labels=pool_labels[idx],
        fake_logits=pool_logits[idx],
        kid_scale=net.info.kid_scale,
        draws=40,
    )
    ci = bootstrap_intervals(ref_f, pool_f[idx], seed=0, **kw)
    assert ci == bootstrap_intervals(ref_f, pool_f[idx], seed=0, **kw)
    assert ci != bootstrap_intervals(ref_f, pool_f[idx], seed=1, **kw)
    assert set(ci) == {"fd", "kid_mean", "precision", "recall", "class_accuracy"}
    p, r = precision_recall(ref_f, pool_f[idx])
    assert ci["precision"][0] <= p <= ci["precision"][1] and ci["recall"][0] <= r <= ci["recall"][1]
    assert all(lo < hi for lo, hi in ci.values())
