"""KID (Binkowski et al., "Demystifying MMD GANs", arXiv 1801.01401) in difflora's feature space.

KID is the unbiased estimate of the squared maximum mean discrepancy (MMD^2) between the real and
generated feature distributions under the cubic polynomial kernel ``k(x, y) = (x.y / D + 1)^3``,
averaged over random subsets drawn from *both* sets (mean and std over subsets are reported).

**Feature scale.** The kernel was designed for Inception pool3 features, where k(x, x) is about 2-3.
difflora's classifier features are SiLU activations with ||x||^2 / D about 5, which puts the cubic
term far outside that regime (k(x, x) ~ 200) and lets a few large features dominate. Features are
therefore multiplied by one scalar, fixed per feature network and computed on its own training
images (``kid_feature_scale``), so that the mean of k(x, x) there is 2: a single scalar keeps the
geometry (and precision/recall and the ranking by FD are unaffected), and a constant fixed at
training time keeps KID comparable between all runs scored by that network.

**Class-stratified sets.** The held-out split is stratified by class and class-conditional
evaluation requests balanced labels, so neither set is an i.i.d. draw: same-class pairs are rarer
than under i.i.d. sampling, and the plain U-statistic is biased by about -V_between (1/n + 1/m)
(V_between: the kernel-space variance between classes; 80% of the total in a classifier's feature
space). The estimator here is the stratified U-statistic: with class prior pi (the reference's class
frequencies) and per-set class labels,

    E_xx = sum_{c,c'} pi_c pi_c' mean_{i in c, j in c', i != j} k(x_i, x_j)

(and E_yy likewise, E_xy = sum pi_c pi_c' mean_{i in c, j in c'} k(x_i, y_j)); MMD^2 = E_xx + E_yy
- 2 E_xy. Within a class the samples are exchangeable draws of that class, so every block mean is
unbiased and so is the weighted sum. A set without labels (an unconditional model's samples) is one
class with prior 1, which gives back the ordinary unbiased MMD^2 of Binkowski et al.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "KERNEL_SELF",
    "class_prior",
    "kernel_distance",
    "kid_feature_scale",
    "mmd2_unbiased",
    "polynomial_kernel",
    "rank_in_class",
    "stratifiable",
    "stratified_subset",
]

# Target mean of k(x, x) on the feature network's training images: Inception's regime.
KERNEL_SELF = 2.0


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / D + 1)^3 between rows of x [N x D] and y [M x D]: [N x M]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid_feature_scale(features: torch.Tensor) -> float:
    """The scalar c with mean_i k(c f_i, c f_i) = KERNEL_SELF over features [N x D] (module docstring)."""
    f = features.detach().to(torch.float64)
    mean_sq = float(f.pow(2).sum(1).mean()) / f.shape[1]
    if not mean_sq > 0:
        raise ValueError("features are all zero: no kernel scale can be derived from them")
    return math.sqrt((KERNEL_SELF ** (1 / 3) - 1.0) / mean_sq)


def class_prior(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Class frequencies [C] (float64) of int labels [N] >= 0."""
    c = num_classes if num_classes is not None else int(labels.max()) + 1
    counts = torch.bincount(labels.long().cpu(), minlength=c).to(torch.float64)
    return counts / counts.sum()


# Fewest samples of every class for a set to be scored stratified: subsets of half the set then
# keep >= 2 per class, which the within-class U-statistic needs.
MIN_PER_CLASS = 4


def stratifiable(labels: torch.Tensor | None, num_classes: int) -> torch.Tensor | None:
    """``labels`` if every class in [0, num_classes) has MIN_PER_CLASS of them (and none is -1), else None.

    A set that fails this (a handful of class-conditional samples) is scored as an i.i.d. set.
    """
    if labels is None or (labels < 0).any():
        return None
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes)
    return labels if counts.numel() == num_classes and bool((counts >= MIN_PER_CLASS).all()) else None


def _onehot(labels: torch.Tensor | None, n: int, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class indicator [n x C], prior [C]) of a set; an unlabelled set is one class with prior 1."""
    if labels is None:
        return torch.ones(n, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    labels = labels.long().cpu()
    if labels.shape != (n,) or labels.min() < 0 or labels.max() >= prior.numel():
        raise ValueError(f"labels must be [N] = [{n}] class indices in [0, {prior.numel() - 1}]")
    return torch.nn.functional.one_hot(labels, prior.numel()).to(torch.float64), prior


def mmd2_unbiased(
    kxx: torch.Tensor,
    kyy: torch.Tensor,
    kxy: torch.Tensor,
    x_labels: torch.Tensor | None = None,
    y_labels: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    x_counts: torch.Tensor | None = None,
    y_counts: torch.Tensor | None = None,
) -> float:
    """Stratified unbiased MMD^2 from kernel blocks kxx [N x N], kyy [M x M], kxy [N x M] (module docstring).

    Labels [N] / [M] (None: the set is unlabelled, one class) index ``prior`` [C] (needed when any
    set has labels). ``x_counts`` / ``y_counts`` [N] / [M]: for a bootstrap resample, how many
    copies of each sample it holds (None: each once); pairs of copies of one sample are left out
    like i = j. The resample is scored from the original kernel blocks with the counts as weights,
    which is exact and costs one [N x N] x [N x C] product instead of gathering an [N x N] block.
    """
    n, m = kxx.shape[0], kyy.shape[0]
    cx = torch.ones(n, dtype=torch.float64) if x_counts is None else x_counts.to(torch.float64)
    cy = torch.ones(m, dtype=torch.float64) if y_counts is None else y_counts.to(torch.float64)
    if min(cx.sum(), cy.sum()) < 2:
        raise ValueError(f"unbiased MMD^2 needs at least 2 samples per set, got {int(cx.sum())} and {int(cy.sum())}")
    if prior is None:
        if x_labels is not None or y_labels is not None:
            raise ValueError("labelled sets need the class prior")
        prior = torch.ones(1, dtype=torch.float64)
    zx, px = _onehot(x_labels, n, prior)
    zy, py = _onehot(y_labels, m, prior)
    sx, nx = _pair_sums(kxx, zx, cx)
    sy, ny = _pair_sums(kyy, zy, cy)
    if (x_labels is not None or y_labels is not None) and not (_strata_filled(nx, px) and _strata_filled(ny, py)):
        # A class of the prior has no distinct pair in a set (a small class, or a bootstrap draw that
        # copied one sample of it): its block cannot be estimated, so the sets are scored as i.i.d.
        # draws instead (the plain unbiased MMD^2, biased by about -V_between (1/n + 1/m)).
        return mmd2_unbiased(kxx, kyy, kxy, x_counts=x_counts, y_counts=y_counts)
    wx, wy = zx * cx[:, None], zy * cy[:, None]
    sxy, nxy = wx.T @ kxy @ wy, wx.sum(0)[:, None] * wy.sum(0)[None, :]
    return float(_weighted(sx, nx, px, px) + _weighted(sy, ny, py, py) - 2 * _weighted(sxy, nxy, px, py))


def _pair_sums(k: torch.Tensor, z: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of k and counts [C x C] over the pairs of distinct samples of classes (c, c') of a set
    holding c_i copies of sample i: sum_{i != j} c_i c_j z_i z_j^T (k_ij and 1)."""
    w = z * c[:, None]
    same = z * (c * c)[:, None]  # the i = j terms: every pair of copies of one sample
    sums = w.T @ (k @ w) - same.T @ (z * k.diagonal()[:, None])
    total = w.sum(0)
    return sums, total[:, None] * total[None, :] - same.T @ z


def _strata_filled(counts: torch.Tensor, prior: torch.Tensor) -> bool:
    """Whether every class with prior mass has at least one counted pair (so also a sample) in the set."""
    return bool((counts.diagonal()[prior > 0] > 0).all())


def _weighted(sums: torch.Tensor, counts: torch.Tensor, pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """sum_{c,c'} pa_c pb_c' sums / counts over the class pairs with prior mass."""
    w = pa[:, None] * pb[None, :]
    keep = w > 0
    if (counts[keep] == 0).any():
        raise ValueError("KID: a class of the prior has fewer than 2 samples in a set (or none in one)")
    return (w[keep] * sums[keep] / counts[keep]).sum()


def stratified_subset(labels: torch.Tensor | None, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Indices [~size] of a random subset of n samples without replacement.

    With labels [n], each class c keeps round(size n_c / n) samples (at least 2 when it has 2), so
    the subset has the set's class proportions and every class of the set stays in it.
    """
    keys = torch.rand(n, generator=gen, dtype=torch.float64)
    if labels is None:
        return keys.argsort()[:size]
    labels = labels.long().cpu()
    counts = torch.bincount(labels)
    quota = torch.floor(counts.double() * size / n + 0.5).long().clamp(min=2).minimum(counts)
    return torch.nonzero(rank_in_class(labels, keys) < quota[labels]).flatten()


def rank_in_class(labels: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Rank [N] of each sample within its class (int labels [N] >= 0) in the order of ``keys`` [N] in [0, 1)."""
    order = torch.argsort(labels.double() * 2 + keys)  # by (label, key)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(labels.shape[0], dtype=torch.long)
    rank[order] = torch.arange(labels.shape[0]) - starts[labels[order]]
    return rank


def kernel_distance(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    real_labels: torch.Tensor | None = None,
    fake_labels: torch.Tensor | None = None,
    *,
    subsets: int = 100,
    subset_size: int | None = None,
    scale: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over ``subsets``) between features [N x D] and [M x D], each multiplied by ``scale``.

    Each subset draws ``subset_size`` samples from each set without replacement (stratified by
    class for a labelled set; capped at the set's size, so the two sizes may differ, which the
    unbiased estimator allows). Default: min(1000, half the set), so subsets differ and their spread
    means something; subsets as large as the sets give the full-set estimate, std 0. With ``real_labels`` the
    prior is the real set's class frequencies and the estimator is stratified (module docstring);
    ``fake_labels`` (classes the samples were generated for) need ``real_labels``. Seeded by a
    private generator: the caller's random stream is untouched.
    """
    real = real_features.detach().to("cpu", torch.float64) * scale
    fake = fake_features.detach().to("cpu", torch.float64) * scale
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected features [N x D] and [M x D], got {tuple(real.shape)} and {tuple(fake.shape)}")
    if fake_labels is not None and real_labels is None:
        raise ValueError("fake_labels need real_labels: the class prior is the real set's class frequencies")
    n, m = real.shape[0], fake.shape[0]
    size_x = min(1000, n // 2) if subset_size is None else min(subset_size, n)
    size_y = min(1000, m // 2) if subset_size is None else min(subset_size, m)
    if min(size_x, size_y) < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples per set; sets of {n} and {m}")
    prior = class_prior(real_labels) if real_labels is not None else None
    if fake_labels is not None and int(fake_labels.max()) >= prior.numel():
        prior = torch.cat([prior, prior.new_zeros(int(fake_labels.max()) + 1 - prior.numel())])
    kxx, kyy, kxy = polynomial_kernel(real, real), polynomial_kernel(fake, fake), polynomial_kernel(real, fake)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        i = stratified_subset(real_labels, n, size_x, gen)
        j = stratified_subset(fake_labels, m, size_y, gen)
        xl = real_labels[i] if real_labels is not None else None
        yl = fake_labels[j] if fake_labels is not None else None
        values.append(mmd2_unbiased(kxx[i][:, i], kyy[j][:, j], kxy[i][:, j], xl, yl, prior))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if subsets > 1 else 0.0
