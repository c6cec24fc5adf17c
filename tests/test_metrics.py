"""Metrics against independent references: closed-form Frechet distance (scipy sqrtm), a naive
numpy MMD^2 / Inception Score, naive k-NN precision/recall, and point sets with known answers."""

import numpy as np
import pytest
import scipy.linalg
import torch

from difflora.eval import InceptionFeatures
from difflora.eval.metrics import (
    class_accuracy,
    compute_metrics,
    frechet_distance,
    inception_score,
    kernel_distance,
    precision_recall,
)

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


def _naive_kid(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_naive_unbiased_mmd2_with_cubic_kernel():
    x, y = _gaussian(40, 5, 3), _gaussian(40, 5, 4, shift=0.3)
    expected = _naive_kid(x, y)
    # subset_size >= both sizes: every subset is the whole set (reordered), so std is 0.
    mean, std = kernel_distance(_t(x), _t(y), subsets=3, subset_size=1000)
    assert mean == pytest.approx(expected, rel=TOL)
    assert std == pytest.approx(0.0, abs=TOL)


def test_kid_subsets_are_seeded_and_leave_global_rng_alone():
    x, y = _t(_gaussian(60, 4, 5)), _t(_gaussian(60, 4, 6, shift=0.2))
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
