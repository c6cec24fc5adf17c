"""Metrics against independent references: closed-form Frechet distance (scipy sqrtm), a naive
numpy MMD^2 / Inception Score, naive k-NN precision/recall, and point sets with known answers."""

import numpy as np
import pytest
import scipy.linalg
import torch

from difflora.eval import InceptionFeatures
from difflora.eval.kernel import class_prior, kid_feature_scale, mmd2_unbiased, polynomial_kernel, stratified_subset
from difflora.eval.metrics import (
    class_accuracy,
    compute_metrics,
    frechet_distance,
    inception_score,
    kernel_distance,
    knn_radii,
    precision_recall,
)
from difflora.eval.uncertainty import resample

# float64 throughout: agreement with the references is limited by rounding only.
TOL = 1e-8


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a.T + shift + rng.normal(size=d)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)


def test_fd_of_a_set_with_itself_is_zero():
    x = _t(_gaussian(300, 16, 0))
    assert abs(frechet_distance(x, x)) < TOL


def test_fd_matches_closed_form_with_scipy_sqrtm():
    x, y = _gaussian(400, 6, 1), _gaussian(300, 6, 2, shift=0.5)
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert expected > 1.0  # the two sets really differ
    assert frechet_distance(_t(x), _t(y)) == pytest.approx(expected, rel=TOL)


def _naive_kid(x: np.ndarray, y: np.ndarray, xl=None, yl=None, px=None, py=None, xsrc=None, ysrc=None) -> float:
    """Stratified unbiased MMD^2 with the cubic kernel, pair by pair; an unlabelled set is one class, prior 1.
    ``xsrc`` / ``ysrc``: the sample each row copies (a bootstrap resample); pairs of copies of one are left out."""
    d = x.shape[1]
    xsrc = np.arange(len(x)) if xsrc is None else xsrc
    ysrc = np.arange(len(y)) if ysrc is None else ysrc
    xl = np.zeros(len(x), int) if xl is None else xl
    yl = np.zeros(len(y), int) if yl is None else yl
    px = np.ones(1) if px is None else px
    py = np.ones(1) if py is None else py

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    def term(a, al, pa, b, bl, pb, src):
        total = 0.0
        for c in range(len(pa)):
            for c2 in range(len(pb)):
                vals = [
                    k(a[i], b[j])
                    for i in range(len(a))
                    for j in range(len(b))
                    if al[i] == c and bl[j] == c2 and not (src is not None and src[i] == src[j])
                ]
                total += pa[c] * pb[c2] * np.mean(vals)
        return total

    return term(x, xl, px, x, xl, px, xsrc) + term(y, yl, py, y, yl, py, ysrc) - 2 * term(x, xl, px, y, yl, py, None)


def test_kid_matches_naive_unbiased_mmd2_with_unequal_sizes():
    x, y = _gaussian(40, 5, 3), _gaussian(27, 5, 4, shift=0.3)
    expected = _naive_kid(x, y)
    assert expected > 0.01  # the sets differ
    # Subsets as large as the sets: every subset is the whole set (reordered), so std is 0.
    mean, std = kernel_distance(_t(x), _t(y), subsets=3, subset_size=1000)
    assert mean == pytest.approx(expected, rel=TOL)
    assert std == pytest.approx(0.0, abs=TOL)
    # The scale multiplies the features before the kernel.
    assert kernel_distance(_t(x), _t(y), subsets=1, subset_size=1000, scale=0.5)[0] == pytest.approx(
        _naive_kid(0.5 * x, 0.5 * y), rel=TOL
    )


def test_stratified_kid_matches_naive_weighted_formula():
    rng = np.random.default_rng(20)
    x, y = _gaussian(30, 4, 21), _gaussian(23, 4, 22, shift=0.2)
    xl, yl = rng.permutation(np.arange(30) % 3), rng.permutation(np.arange(23) % 3)
    prior = np.bincount(xl) / 30
    expected = _naive_kid(x, y, xl, yl, prior, prior)
    got = kernel_distance(_t(x), _t(y), torch.from_numpy(xl), torch.from_numpy(yl), subsets=1, subset_size=1000)[0]
    assert got == pytest.approx(expected, rel=TOL)
    assert abs(expected - _naive_kid(x, y)) > 1e-4  # stratification changes the value
    # Fakes without labels (an unconditional model): one class with prior 1.
    got = kernel_distance(_t(x), _t(y), torch.from_numpy(xl), subsets=1, subset_size=1000)[0]
    assert got == pytest.approx(_naive_kid(x, y, xl, None, prior, None), rel=TOL)


def test_bootstrap_copies_are_left_out_like_the_diagonal():
    # A resample holding each point once, in another order, gives the full-set value.
    x, y = _t(_gaussian(12, 3, 23)), _t(_gaussian(9, 3, 24, shift=0.4))
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    full = mmd2_unbiased(kxx, kyy, kxy)
    ix, iy = torch.randperm(12), torch.randperm(9)
    same = mmd2_unbiased(kxx, kyy, kxy, x_counts=torch.bincount(ix), y_counts=torch.bincount(iy))
    assert same == pytest.approx(full, rel=TOL)
    # With copies, pairs of copies are not counted: equal to the naive formula over distinct-source pairs.
    ix = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7, 8])
    got = mmd2_unbiased(kxx, kyy, kxy, x_counts=torch.bincount(ix, minlength=12))
    xs = x.numpy()[ix.numpy()]
    pairs = [((xs[i] @ xs[j]) / 3 + 1) ** 3 for i in range(12) for j in range(12) if ix[i] != ix[j]]
    yy = np.mean([((y[i] @ y[j]).item() / 3 + 1) ** 3 for i in range(9) for j in range(9) if i != j])
    xy = np.mean([((xs[i] @ y[j].numpy()) / 3 + 1) ** 3 for i in range(12) for j in range(9)])
    expected = np.mean(pairs) + yy - 2 * xy
    assert got == pytest.approx(expected, rel=TOL)


def test_a_stratified_resample_scored_from_counts_is_the_naive_formula_over_its_copies():
    x, y = _gaussian(30, 3, 41), _gaussian(20, 3, 42, shift=0.3)
    xl, yl = np.arange(30) % 3, np.arange(20) % 3
    prior = class_prior(torch.from_numpy(xl))
    g = torch.Generator().manual_seed(5)
    ix, iy = resample(torch.from_numpy(xl), 30, g), resample(torch.from_numpy(yl), 20, g)
    kxx, kyy, kxy = polynomial_kernel(_t(x), _t(x)), polynomial_kernel(_t(y), _t(y)), polynomial_kernel(_t(x), _t(y))
    got = mmd2_unbiased(
        kxx,
        kyy,
        kxy,
        torch.from_numpy(xl),
        torch.from_numpy(yl),
        prior,
        x_counts=torch.bincount(ix, minlength=30),
        y_counts=torch.bincount(iy, minlength=20),
    )
    a, b = ix.numpy(), iy.numpy()
    expected = _naive_kid(x[a], y[b], xl[a], yl[b], prior.numpy(), prior.numpy(), xsrc=a, ysrc=b)
    assert got == pytest.approx(expected, rel=TOL)


def test_a_class_without_distinct_pairs_falls_back_to_the_iid_estimator():
    # Class 1 of x holds two copies of one sample (a bootstrap draw): its within-class block has no
    # pair to estimate from, so the value is the unlabelled (i.i.d.) one instead of an error.
    x, y = _t(_gaussian(8, 3, 31)), _t(_gaussian(8, 3, 32, shift=0.4))
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xl, yl = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    prior = torch.tensor([0.5, 0.5], dtype=torch.float64)
    counts = torch.tensor([1, 1, 1, 1, 1, 1, 2, 0])  # sample 6 twice, sample 7 not at all
    got = mmd2_unbiased(kxx, kyy, kxy, xl, yl, prior, x_counts=counts)
    assert got == pytest.approx(mmd2_unbiased(kxx, kyy, kxy, x_counts=counts), rel=TOL)
    # With distinct samples the stratified estimate is used, and it differs.
    strat = mmd2_unbiased(kxx, kyy, kxy, xl, yl, prior)
    assert abs(strat - mmd2_unbiased(kxx, kyy, kxy)) > 1e-6


def test_kid_feature_scale_puts_the_kernel_at_two():
    f = _t(np.abs(_gaussian(50, 16, 25)) * 3)
    c = kid_feature_scale(f)
    # mean ||c f||^2 / D = 2^(1/3) - 1 exactly, i.e. k(x, x) = 2 at the mean squared norm.
    assert float((f * c).pow(2).sum(1).mean() / 16) == pytest.approx(2 ** (1 / 3) - 1, rel=TOL)


def test_kid_subsets_are_seeded_and_leave_global_rng_alone():
    x, y = _t(_gaussian(60, 4, 5)), _t(_gaussian(50, 4, 6, shift=0.2))
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = kernel_distance(x, y, subsets=5, subset_size=20, seed=7)
    after = torch.rand(3)
    b = kernel_distance(x, y, subsets=5, subset_size=20, seed=7)
    c = kernel_distance(x, y, subsets=5, subset_size=20, seed=8)
    assert a == b and a != c
    assert torch.equal(before, after)
    assert a[1] > 0  # proper subsets differ from one another


def test_stratified_subsets_keep_class_proportions():
    labels = torch.arange(100) % 4
    labels[:10] = 0  # class 0: 32 samples, others 22 or 23
    idx = stratified_subset(labels, 100, 50, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[idx], minlength=4)
    expected = torch.floor(torch.bincount(labels).double() / 2 + 0.5).long()
    assert torch.equal(counts, expected) and len(set(idx.tolist())) == len(idx)


def test_precision_recall_identical_sets():
    x = _t(_gaussian(100, 8, 7))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_clusters():
    x = _t(_gaussian(100, 8, 8))
    assert precision_recall(x, x + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
    # Four tight clusters far apart; the fake set is exactly the real points of two of them:
    # every fake lies on a real point (precision 1), the real points of the two covered clusters
    # lie on fake points and the others are far from every fake (recall 1/2).
    rng = np.random.default_rng(9)
    centres = np.eye(4, 8) * 100.0
    real = np.concatenate([c + 0.1 * rng.normal(size=(50, 8)) for c in centres])
    fake = real[:100]
    assert precision_recall(_t(real), _t(fake), k=3) == (1.0, 0.5)


def _naive_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(a):
        out = []
        for i in range(len(a)):
            d = sorted(np.linalg.norm(a[i] - a[j]) for j in range(len(a)) if j != i)
            out.append(d[k - 1])
        return out

    def inside(points, ref, r):
        return np.mean([any(np.linalg.norm(p - ref[j]) <= r[j] for j in range(len(ref))) for p in points])

    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_matches_naive_knn_with_chunking():
    rng = np.random.default_rng(10)
    real, fake = rng.normal(size=(60, 3)), 0.6 * rng.normal(size=(50, 3)) + 0.8
    expected = _naive_precision_recall(real, fake, k=5)
    got = precision_recall(_t(real), _t(fake), k=5, batch_size=7)  # 7 rows: chunks with a remainder
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # not a trivial case
    assert got == pytest.approx(expected, abs=TOL)
    # The real radii computed once and passed in give the same scores; radii of another k do not.
    assert precision_recall(_t(real), _t(fake), k=5, real_radii=knn_radii(_t(real), 5)) == got
    assert precision_recall(_t(real), _t(fake), k=5, real_radii=knn_radii(_t(real), 1)) != got
    with pytest.raises(ValueError, match=r"real_radii must be \[N\] = \[60\], got \[50\]"):
        precision_recall(_t(real), _t(fake), real_radii=knn_radii(_t(fake)))


def test_class_accuracy_ignores_null_label():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 2, -1])
    assert class_accuracy(logits, labels) == pytest.approx(2 / 3, abs=TOL)
    assert class_accuracy(logits, torch.full((4,), -1)) is None
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        class_accuracy(logits, torch.tensor([0, 1, 3, 0]))


def test_inception_score_matches_naive_formula():
    logits = _t(np.random.default_rng(12).normal(size=(50, 7)) * 2)
    p = torch.softmax(logits, 1).numpy()
    py = p.mean(0)
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), axis=1)))
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(expected, rel=TOL)
    assert std == 0.0  # one split has no spread


class _FlattenNet(torch.nn.Module):
    """A 'feature network' whose features are the pixels and whose logits are the first 3 pixels."""

    def check_input(self, x: torch.Tensor) -> None:
        assert x.shape[1:] == (1, 2, 2)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = x.flatten(1)
        return f, f[:, :3]


def test_compute_metrics_equals_the_metrics_on_the_features():
    g = torch.Generator().manual_seed(13)
    real = torch.rand(64, 1, 2, 2, generator=g) * 2 - 1
    fake = (torch.rand(48, 1, 2, 2, generator=g) * 2 - 1) * 0.5
    labels = torch.randint(-1, 3, (48,), generator=g)
    m = compute_metrics(real, fake, _FlattenNet(), fake_labels=labels, kid_subsets=4, kid_subset_size=16)
    rf, ff = real.flatten(1).double(), fake.flatten(1).double()
    kid = kernel_distance(rf, ff, subsets=4, subset_size=16)
    expected = {
        "fd": frechet_distance(rf, ff),
        "kid_mean": kid[0],
        "kid_std": kid[1],
        "precision": precision_recall(rf, ff, k=3)[0],
        "recall": precision_recall(rf, ff, k=3)[1],
        "class_accuracy": class_accuracy(ff[:, :3], labels),
    }
    assert m.keys() == expected.keys()
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=TOL), key
    assert "class_accuracy" not in compute_metrics(real, fake, _FlattenNet(), kid_subsets=2, kid_subset_size=8)


class _RecordingExtractor(torch.nn.Module):
    """Stands in for torch-fidelity's Inception: records its input, returns mean-colour 'features'."""

    def forward(self, u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen = u8
        f = u8.double().mean(dim=(2, 3))
        return f, f * 0.01


def test_inception_wrapper_quantises_to_uint8_rgb_and_adds_inception_score():
    ext = _RecordingExtractor()
    net = InceptionFeatures(ext)
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    net.features(x)
    assert ext.seen.dtype == torch.uint8 and ext.seen.shape == (1, 3, 2, 2)
    # [-1, 1] -> [0, 255], out-of-range values clamped, grey repeated to RGB.
    assert ext.seen[0, :, 0, 0].tolist() == [0, 0, 0] and ext.seen[0, 1].flatten().tolist() == [0, 128, 255, 255]
    g = torch.Generator().manual_seed(14)
    real, fake = torch.rand(20, 3, 4, 4, generator=g) * 2 - 1, torch.rand(20, 3, 4, 4, generator=g) * 2 - 1
    m = compute_metrics(real, fake, net, kid_subsets=2, kid_subset_size=10)
    assert {"fd", "kid_mean", "is_mean", "is_std"} <= m.keys() and m["is_mean"] >= 1.0
    with pytest.raises(ValueError, match="ImageNet"):
        compute_metrics(real, fake, net, fake_labels=torch.zeros(20, dtype=torch.long))
