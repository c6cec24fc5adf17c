"""How far a score moves by chance: bootstrap intervals, and the level real data reaches (the noise floor).

Every sample-quality score here is an estimate from a few hundred images, and FD above all has a
bias that depends on the sample count (with 300 samples in 128 dimensions the bias dominates). Two
numbers put a score in context:

- **the noise floor** (``reference_level``): the score of *real* images drawn like the samples are
  (the same count; the same classes when the samples were generated for classes) from the floor
  pool, the half of the train split the feature network never saw, against the same reference set.
  It is what a perfect generator would score at this sample count; a model at its floor cannot be
  told from real data by this metric, and differences below the floor's spread are noise;
- **a bootstrap interval** (``bootstrap_intervals``): the percentile interval of the score over
  resamples with replacement of both sets (within each class for a class-stratified set), i.e. how
  much the score moves with the particular samples drawn.

Both depend on the sample count: scores, floors and intervals are comparable only at equal counts.
"""

from __future__ import annotations

import torch

from difflora.eval.kernel import class_prior, mmd2_unbiased, polynomial_kernel, rank_in_class
from difflora.eval.metrics import frechet_from_stats, kid_labels, knn_radii, mean_cov, metrics_from_features

__all__ = [
    "SCORES",
    "bootstrap_intervals",
    "check_pool",
    "draw_like",
    "interval_kind",
    "reference_level",
    "reported_interval",
    "resample",
]

# The scores that get a floor and an interval (class accuracy gets an interval too when defined).
SCORES = ("fd", "kid_mean", "precision", "recall")


def resample(labels: torch.Tensor | None, n: int, gen: torch.Generator) -> torch.Tensor:
    """Bootstrap indices [n] drawn with replacement; with labels [n], within each class (counts kept)."""
    if labels is None:
        return torch.randint(n, (n,), generator=gen)
    labels = labels.long().cpu()
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    cls = labels[order]
    pick = (torch.rand(n, generator=gen, dtype=torch.float64) * counts[cls]).long() + starts[cls]
    return order[pick]


# Nearest neighbours kept per point for resampled k-NN radii: a resample holds ~63% of the distinct
# points, so the k + 1 = 4 nearest members lie within the first 64 neighbours except with
# probability ~1e-23; a row where they do not is computed in full.
NEIGHBOURS = 64


class _Neighbours:
    """Each point's nearest neighbours in its own set, sorted, from the full distance matrix [N x N]:
    the k-NN radius of any subset of distinct points is then read off the list, not recomputed."""

    def __init__(self, d: torch.Tensor, keep: int = NEIGHBOURS) -> None:
        self.d = d
        self.dist, self.index = d.topk(min(keep, d.shape[0]), dim=1, largest=False, sorted=True)

    def radii(self, members: torch.Tensor, kk: int) -> torch.Tensor:
        """The distance [U] of each point of ``members`` (distinct indices, [U]) to its kk-th nearest
        member, itself included at distance 0 (as ``kthvalue(kk)`` of ``d[members][:, members]``)."""
        inside = torch.zeros(self.d.shape[0], dtype=torch.bool)
        inside[members] = True
        seen = inside[self.index[members]].cumsum(1)  # [U x keep]: members met so far, nearest first
        reached = seen >= kk
        out = self.dist[members].gather(1, reached.int().argmax(1, keepdim=True)).squeeze(1)
        short = ~reached[:, -1]  # fewer than kk members among the kept neighbours: compute in full
        if short.any():
            rows = members[short]
            out[short] = self.d[rows][:, members].kthvalue(kk, dim=1).values
        return out


def _pr_resampled(
    dxy: torch.Tensor,
    ix: torch.Tensor,
    iy: torch.Tensor,
    k: int,
    nx: _Neighbours,
    ny: _Neighbours,
) -> tuple[float, float]:
    """Precision and recall of a resample from the full distance matrices (neighbour lists ``nx``,
    ``ny`` of the real and fake sets, ``dxy`` [N x M] between them).

    The manifold of a resample is the union of k-NN balls of its *distinct* points (a copy at
    distance 0 would shrink every radius to 0); points count with their multiplicity.
    """
    ux, uy = ix.unique(), iy.unique()
    # A resample of a tiny set can hold k or fewer distinct points: use its farthest neighbour then.
    rx = nx.radii(ux, min(k + 1, len(ux)))
    ry = ny.radii(uy, min(k + 1, len(uy)))
    # Whether each original fake (real) point lies in the real (fake) manifold, counted per copy.
    fake_in = (dxy[ux] <= rx[:, None]).any(0)
    real_in = (dxy[:, uy] <= ry[None, :]).any(1)
    return float(fake_in[iy].double().mean()), float(real_in[ix].double().mean())


def bootstrap_intervals(
    real_f: torch.Tensor,
    fake_f: torch.Tensor,
    *,
    real_labels: torch.Tensor | None = None,
    fake_labels: torch.Tensor | None = None,
    fake_logits: torch.Tensor | None = None,
    kid_scale: float = 1.0,
    k: int = 3,
    draws: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Percentile bootstrap interval [lo, hi] at ``level`` of each score of fake [M x D] vs real [N x D].

    Both sets are resampled with replacement (within classes when labelled, as the sets were
    drawn). KID's interval is that of the full-set stratified MMD^2 with pairs of copies of one
    sample left out; class accuracy's (with ``fake_labels`` and ``fake_logits``) is over the fakes.
    """
    real = real_f.detach().to("cpu", torch.float64)
    fake = fake_f.detach().to("cpu", torch.float64)
    n, m = real.shape[0], fake.shape[0]
    real_labels, ylab = kid_labels(real_labels, fake_labels)
    prior = class_prior(real_labels) if real_labels is not None else None
    xs, ys = real * kid_scale, fake * kid_scale
    kxx, kyy, kxy = polynomial_kernel(xs, xs), polynomial_kernel(ys, ys), polynomial_kernel(xs, ys)
    nx, ny, dxy = _Neighbours(torch.cdist(real, real)), _Neighbours(torch.cdist(fake, fake)), torch.cdist(real, fake)
    correct = None
    if fake_labels is not None and fake_logits is not None and (fake_labels >= 0).any():
        keep = fake_labels >= 0
        correct = torch.where(keep, fake_logits.argmax(1).cpu() == fake_labels.cpu(), False).double()
        n_keep = keep.double()
    gen = torch.Generator().manual_seed(seed)
    values: dict[str, list[float]] = {s: [] for s in SCORES}
    if correct is not None:
        values["class_accuracy"] = []
    for _ in range(draws):
        ix = resample(real_labels, n, gen)
        iy = resample(ylab, m, gen)
        values["fd"].append(frechet_from_stats(*mean_cov(real[ix]), *mean_cov(fake[iy])))
        cx, cy = torch.bincount(ix, minlength=n), torch.bincount(iy, minlength=m)
        values["kid_mean"].append(mmd2_unbiased(kxx, kyy, kxy, real_labels, ylab, prior, x_counts=cx, y_counts=cy))
        p, r = _pr_resampled(dxy, ix, iy, k, nx, ny)
        values["precision"].append(p)
        values["recall"].append(r)
        if correct is not None:
            values["class_accuracy"].append(float(correct[iy].sum() / n_keep[iy].sum().clamp_min(1)))
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return {key: torch.quantile(torch.tensor(v, dtype=torch.float64), q).tolist() for key, v in values.items()}


def interval_kind(key: str) -> str:
    """The kind of 95% interval :func:`reported_interval` gives for score ``key``: "basic" or "percentile"."""
    return "basic" if key == "fd" else "percentile"


def reported_interval(key: str, estimate: float, percentile: list[float] | tuple[float, float]) -> tuple[float, float]:
    """The interval reports and the CLI print for score ``key`` from its stored percentile interval.

    A resample with replacement holds copies, which act like fewer samples and raise FD's
    count-dependent bias, so FD's percentile interval sits above the estimate (it can exclude it).
    FD gets the basic (reflected) interval ``[2 FD - hi, 2 FD - lo]``, which removes that shift; the
    other scores keep their percentile interval. Both are linear in their inputs, so the interval of
    seed means is the mean of the seeds' intervals.
    """
    lo, hi = percentile
    if interval_kind(key) == "basic":
        return 2 * estimate - hi, 2 * estimate - lo
    return lo, hi


def check_pool(pool_labels: torch.Tensor, num: int, labels: torch.Tensor | None) -> None:
    """Raise ValueError unless the floor pool can give ``num`` real images drawn like the samples."""
    p = pool_labels.shape[0]
    if num > p:
        raise ValueError(
            f"the noise floor needs {num} real images the feature network never saw, but the floor pool "
            f"(half the train split) has {p}: use --num-samples {p} or less"
        )
    if labels is not None:
        need = torch.bincount(labels.long().cpu(), minlength=int(pool_labels.max()) + 1)
        have = torch.bincount(pool_labels.long().cpu(), minlength=need.numel())
        short = (need > have[: need.numel()]).nonzero().flatten().tolist()
        if short:
            c = short[0]
            raise ValueError(
                f"the noise floor needs {int(need[c])} real images of class {c} the feature network never saw, "
                f"the floor pool has {int(have[c])}: use fewer --num-samples"
            )


def draw_like(pool_labels: torch.Tensor, num: int, labels: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Indices of ``num`` distinct pool images: random, or with the class counts of ``labels`` [num]."""
    p = pool_labels.shape[0]
    keys = torch.rand(p, generator=gen, dtype=torch.float64)
    if labels is None:
        return keys.argsort()[:num]
    pool = pool_labels.long().cpu()
    need = torch.bincount(labels.long().cpu(), minlength=int(pool.max()) + 1)
    # In a random order, keep the first need[c] pool images of class c.
    return torch.nonzero(rank_in_class(pool, keys) < need[pool]).flatten()


def _iid_labels(prior: torch.Tensor, pool_labels: torch.Tensor, num: int, gen: torch.Generator) -> torch.Tensor:
    """``num`` labels drawn i.i.d. from ``prior``, redrawn while a class asks more than the pool holds."""
    have = torch.bincount(pool_labels.long().cpu(), minlength=prior.numel())
    for _ in range(1000):
        want = torch.multinomial(prior, num, replacement=True, generator=gen)
        if (torch.bincount(want, minlength=prior.numel()) <= have).all():
            return want
    raise ValueError(f"{num} samples leave too little headroom in the floor pool of {len(pool_labels)}: use fewer")


def reference_level(
    ref_f: torch.Tensor,
    pool_f: torch.Tensor,
    pool_labels: torch.Tensor,
    num: int,
    *,
    ref_labels: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pool_logits: torch.Tensor | None = None,
    kid_scale: float = 1.0,
    k: int = 3,
    draws: int = 20,
    level: float = 0.95,
    seed: int = 0,
    ref_radii: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """The noise floor: each score of ``draws`` real sets of ``num`` pool images [P x D] vs the reference.

    A set is drawn like the samples: ``labels`` [num] (the classes requested) give the class counts,
    and the set is then scored as a class-conditional sample of those classes; None draws at random
    and scores it as an unconditional sample. Returns {score: {"mean", "std", "lo", "hi"}} with the
    percentile range at ``level`` over the draws, plus class accuracy (the classifier on real
    images: the ceiling of a generator's) when ``labels`` and ``pool_logits`` are given.
    ``ref_radii``: the reference's k-NN radii (``knn_radii(ref_f, k)``), computed here when None;
    every draw meets the same reference, so they are computed once, not once per draw.
    """
    check_pool(pool_labels, num, labels)
    ref_radii = knn_radii(ref_f, k) if ref_radii is None else ref_radii
    gen = torch.Generator().manual_seed(seed)
    rows = []
    prior = class_prior(pool_labels)
    for d in range(draws):
        # Unconditional: the classes are drawn the way the data draws them (i.i.d. from the prior),
        # since a random subset of the stratified pool has less class variance than i.i.d. data
        # and would bias the floor of KID low.
        want = labels if labels is not None else _iid_labels(prior, pool_labels, num, gen)
        idx = draw_like(pool_labels, num, want, gen)
        drawn = pool_labels[idx] if labels is not None else None
        rows.append(
            metrics_from_features(
                ref_f,
                pool_f[idx],
                real_labels=ref_labels,
                fake_labels=drawn,
                fake_logits=pool_logits[idx] if pool_logits is not None else None,
                kid_scale=kid_scale,
                k=k,
                # 20 subsets: the spread that matters here is between draws, not within one.
                kid_subsets=20,
                seed=seed + d,
                real_radii=ref_radii,
            )
        )
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out = {}
    for key in [s for s in (*SCORES, "class_accuracy") if s in rows[0]]:
        v = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        lo, hi = torch.quantile(v, q).tolist()
        out[key] = {"mean": float(v.mean()), "std": float(v.std()), "lo": lo, "hi": hi}
    return out
