"""Sample-quality metrics in a feature space: Frechet distance, KID, precision/recall, class accuracy.

``compute_metrics`` embeds real and generated images once with a feature network (difflora's own
classifier from ``features.py``, or Inception-v3 from a local file) and computes every metric on
those features::

    net = get_feature_net(cfg.data)
    m = compute_metrics(real, fake, net, fake_labels=y, real_labels=real_y)
    # {"fd": ..., "kid_mean": ..., "kid_std": ..., "precision": ..., "recall": ..., "class_accuracy": ...}

The Frechet distance is computed here in float64 from symmetric eigendecompositions (checked
against scipy's ``sqrtm`` in the tests); KID is ``difflora.eval.kernel`` (Binkowski et al.'s
unbiased MMD^2, class-stratified, on rescaled features). Precision and recall are the k-NN manifold
estimates of Kynkaanniemi et al. 2019, batched with ``torch.cdist``. Every estimate here has a
sample-size dependent bias (FD most of all): scores are comparable only at equal sample counts, and
``difflora.eval.uncertainty`` gives the level real data reaches at the same count.

With difflora's feature network the Frechet distance is *not* FID: its numbers are comparable
between runs scored by the same feature network (same dataset, size, architecture and training
settings, i.e. the same cache file), never with published FIDs.
"""

from __future__ import annotations

import types
import warnings
from typing import Protocol

import torch
from torch import nn

from difflora.eval.features import InceptionFeatures
from difflora.eval.kernel import kernel_distance, stratifiable
from difflora.optional import require

__all__ = [
    "FeatureExtractor",
    "class_accuracy",
    "compute_metrics",
    "extract_features",
    "feature_kid_scale",
    "frechet_distance",
    "frechet_from_stats",
    "inception_score",
    "kernel_distance",
    "kid_labels",
    "knn_radii",
    "mean_cov",
    "metrics_from_features",
    "precision_recall",
]


class FeatureExtractor(Protocol):
    """What ``compute_metrics`` needs: FeatureNet and InceptionFeatures both provide it."""

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def check_input(self, x: torch.Tensor) -> None: ...


class _Identity(nn.Module):
    """Feature module for torchmetrics that passes precomputed features [N x D] through."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        # torchmetrics sizes its state from num_features instead of probing with a dummy image.
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchmetrics(name: str) -> types.ModuleType:
    """torchmetrics.image.<name>, imported on use (it is heavy and only the metrics need it)."""
    return require(f"torchmetrics.image.{name}", f"difflora's {name} metric", extra="inception")


def _as_features(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"{name}: expected features [N x D] with N >= 2, got shape {tuple(x.shape)}")
    # float64: covariance sums and the polynomial kernel lose digits in float32.
    return x.detach().to(torch.float64)


@torch.no_grad()
def extract_features(
    net: FeatureExtractor, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N x D] and logits [N x K] (float64, on CPU) of images [N x C x H x W] in [-1, 1].

    Images are clamped to [-1, 1] (real data lives there; a sampler's overshoot is not a feature),
    moved to the network's device batch by batch, and the network is run in eval mode.
    """
    net.check_input(images)
    module = net if isinstance(net, nn.Module) else None
    param = next(module.parameters(), None) if module is not None else None
    device = param.device if param is not None else images.device
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    feats, logits = [], []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(device=device, dtype=torch.float32).clamp(-1, 1)
            f, lg = net.features_and_logits(x)
            feats.append(f.to("cpu", torch.float64))
            logits.append(lg.to("cpu", torch.float64))
    finally:
        if module is not None:
            module.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def mean_cov(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D x D] (float64) of features [N x D]."""
    x = _as_features(features, "features")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def frechet_from_stats(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) from means [D] and covariances [D x D].

    Tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    which is symmetric positive semi-definite (same spectrum as S1 S2), so symmetric eigensolvers
    apply and rounding cannot produce the complex parts that sqrtm(S1 S2) does.
    """
    ev, vec = torch.linalg.eigh(s1)
    r1 = (vec * ev.clamp_min(0).sqrt()) @ vec.T
    mid = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to features [N x D] and [M x D] (unbiased covariances)."""
    real, fake = _as_features(real_features, "real_features"), _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]}")
    return frechet_from_stats(*mean_cov(real), *mean_cov(fake))


def _chunk_rows(n_cols: int, batch_size: int | None) -> int:
    # Bound each distance block to ~16M entries (128 MB in float64) unless told otherwise.
    return batch_size or max(1, (1 << 24) // max(1, n_cols))


def _kth_neighbour_radius(x: torch.Tensor, k: int, batch_size: int | None) -> torch.Tensor:
    """Distance [N] of each row of x [N x D] to its k-th nearest other row."""
    rows = _chunk_rows(x.shape[0], batch_size)
    # k + 1: the row itself is its own nearest neighbour at distance 0.
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(rows)])


def _inside_manifold(
    points: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, batch_size: int | None
) -> torch.Tensor:
    """Bool [N]: point i lies within radii[j] of some ref[j] (the union of k-NN balls)."""
    rows = _chunk_rows(ref.shape[0], batch_size)
    return torch.cat([(torch.cdist(c, ref) <= radii[None, :]).any(dim=1) for c in points.split(rows)])


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int | None = None) -> torch.Tensor:
    """Distance [N] of each row of features [N x D] to its k-th nearest other row: the radii of the
    set's manifold in :func:`precision_recall`, computed once when one real set meets many fakes."""
    return _kth_neighbour_radius(_as_features(features, "features"), k, batch_size)


def precision_recall(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    k: int = 3,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    real_radii: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of features [N x D] vs [M x D].

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour in the same set. Precision: the fraction of fake points inside
    the real manifold (are samples realistic?). Recall: the fraction of real points inside the fake
    manifold (is the data covered?). ``batch_size`` rows of distances are computed at a time, on
    ``device`` (default: the features' device); the work is O((N + M)^2 D), the costliest metric,
    and O(N^2 D) of it is the real radii, which ``real_radii`` (:func:`knn_radii` of the real set
    with this k) passes in when they are known.
    """
    real, fake = _as_features(real_features, "real_features"), _as_features(fake_features, "fake_features")
    if device is not None:
        real, fake = real.to(device), fake.to(device)
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k={k} needs 1 <= k < min(#real, #fake) = {min(real.shape[0], fake.shape[0])}")
    if real_radii is not None and real_radii.shape != (real.shape[0],):
        raise ValueError(f"real_radii must be [N] = [{real.shape[0]}], got {list(real_radii.shape)}")
    r_real = _kth_neighbour_radius(real, k, batch_size) if real_radii is None else real_radii.to(real)
    r_fake = _kth_neighbour_radius(fake, k, batch_size)
    precision = _inside_manifold(fake, real, r_real, batch_size).double().mean()
    recall = _inside_manifold(real, fake, r_fake, batch_size).double().mean()
    return float(precision), float(recall)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Fraction of samples [N] whose argmax class (logits [N x K]) is the requested label.

    Samples with the null label -1 (unconditional) requested no class and are left out; None when
    no sample has a class.
    """
    labels = labels.to(logits.device).long()
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} for {logits.shape[0]} samples")
    if (labels >= logits.shape[1]).any() or (labels < -1).any():
        raise ValueError(
            f"labels must lie in [-1, {logits.shape[1] - 1}] (the classifier has {logits.shape[1]} classes)"
        )
    keep = labels >= 0
    if not keep.any():
        return None
    return float((logits[keep].argmax(dim=1) == labels[keep]).double().mean())


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) exp E_x KL(p(y|x) || p(y)) from logits [N x K].

    torchmetrics' InceptionScore; it shuffles with torch's global generator, so under ``seed`` in
    a forked RNG state.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = _torchmetrics("inception").InceptionScore(feature=_Identity(logits.shape[1]), splits=splits)
    metric.update(logits.detach().to(torch.float64))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # One split: torch warns that its std has no degrees of freedom; the spread is 0 then.
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), (float(std) if splits > 1 else 0.0)


def metrics_from_features(
    real_f: torch.Tensor,
    fake_f: torch.Tensor,
    *,
    real_labels: torch.Tensor | None = None,
    fake_labels: torch.Tensor | None = None,
    fake_logits: torch.Tensor | None = None,
    kid_scale: float = 1.0,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    real_radii: torch.Tensor | None = None,
) -> dict[str, float]:
    """FD, KID (mean, std), precision, recall and class accuracy of features [M x D] vs real [N x D].

    ``fake_labels`` [M] are the classes the samples were generated for (-1 = none). KID is stratified
    by class when ``real_labels`` are given and, for the fakes, when every fake has a class (see
    ``difflora.eval.kernel``); class accuracy needs ``fake_logits`` [M x K] and ``fake_labels``.
    ``real_radii``: the real set's k-NN radii when known (see :func:`precision_recall`).
    """
    real_labels, kid_fake_labels = kid_labels(real_labels, fake_labels)
    kid_mean, kid_std = kernel_distance(
        real_f,
        fake_f,
        real_labels,
        kid_fake_labels,
        subsets=kid_subsets,
        subset_size=kid_subset_size,
        scale=kid_scale,
        seed=seed,
    )
    precision, recall = precision_recall(real_f, fake_f, k, device=device, real_radii=real_radii)
    out = {
        "fd": frechet_distance(real_f, fake_f),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }
    if fake_labels is not None and fake_logits is not None:
        acc = class_accuracy(fake_logits, fake_labels)
        if acc is not None:
            out["class_accuracy"] = acc
    return out


def kid_labels(
    real_labels: torch.Tensor | None, fake_labels: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The labels KID stratifies by: each set's labels when it has enough of every class, else None.

    Fakes are stratified only together with the reals (the prior is the real set's class frequencies).
    """
    if real_labels is None:
        return None, None
    c = int(real_labels.max()) + 1
    real = stratifiable(real_labels, c)
    return real, stratifiable(fake_labels, c) if real is not None else None


def compute_metrics(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    feature_net: FeatureExtractor,
    fake_labels: torch.Tensor | None = None,
    *,
    real_labels: torch.Tensor | None = None,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """All quality metrics of generated images vs real images, both [N x C x H x W] in [-1, 1].

    Returns {"fd", "kid_mean", "kid_std", "precision", "recall"}, plus "class_accuracy" when
    ``fake_labels`` [M] (the classes the samples were generated for; -1 = unconditional) are given
    and at least one is a class, plus "is_mean", "is_std" when ``feature_net`` is Inception (an
    InceptionFeatures from ``load_inception``). ``real_labels`` [N] make KID class-stratified. KID
    uses the feature network's kernel scale (``info.kid_scale``; 1 for Inception). The feature
    network must have been trained for the images' size and channels (FeatureNetMismatchError
    otherwise).
    """

    if fake_labels is not None and isinstance(feature_net, InceptionFeatures):
        raise ValueError("fake_labels index the dataset's classes; Inception's classes are ImageNet's")
    real_f, _ = extract_features(feature_net, real_images, batch_size)
    fake_f, fake_logits = extract_features(feature_net, fake_images, batch_size)
    # The k-NN distances are the costly part: compute them where the network lives (a GPU if any).
    param = next(feature_net.parameters(), None) if isinstance(feature_net, nn.Module) else None
    out = metrics_from_features(
        real_f,
        fake_f,
        real_labels=real_labels,
        fake_labels=fake_labels,
        fake_logits=fake_logits,
        kid_scale=feature_kid_scale(feature_net),
        k=k,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        seed=seed,
        device=param.device if param is not None else None,
    )
    if isinstance(feature_net, InceptionFeatures):
        out["is_mean"], out["is_std"] = inception_score(fake_logits, seed=seed)
    return out


def feature_kid_scale(net: FeatureExtractor) -> float:
    """The KID feature scale of a feature network: its recorded ``info.kid_scale``, else 1 (Inception)."""
    info = getattr(net, "info", None)
    return float(getattr(info, "kid_scale", None) or 1.0)
