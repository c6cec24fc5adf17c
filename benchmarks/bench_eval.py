"""Scoring cost at Fashion-MNIST's size: the bootstrap intervals and the noise floor, against the
direct way of computing them.

A Fashion-MNIST evaluation compares each set of 500 samples with the 10,000 held-out images in
a 128-dimensional feature space, and the bootstrap resamples both sets 100 times. The direct
way scores every resample by gathering its [N x N] kernel and distance blocks (10^8 entries
for the reference, several passes per draw) and the noise floor recomputes the reference's k-NN
radii for each of its 20 draws. difflora scores a resample from the original blocks with the
copy counts as weights (one [N x N] x [N x C] product), reads k-NN radii of a resample off
sorted neighbour lists computed once, and computes the reference's radii once per evaluation.

The direct way is written out here (``direct_*``) as the reference; the benchmark checks that
both give the same intervals (to 1e-9) before timing them. Features are synthetic (10 Gaussian
classes), which does not change the work. Per round, each way runs in turn in this process and
its CPU time (``time.process_time``, one thread) per draw is kept (the bootstrap's one-off set-up
apart); the ratio is that of the fastest rounds, and the spread is the range of the per-round ratios.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py        # writes benchmarks/results/eval.json

``--device cuda`` puts the features and every block on the GPU (the resample indices are drawn on
the CPU, as difflora draws them, and copied over); times are then wall seconds between
synchronisations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from devices import add_device_argument, clock, machine, machine_line

from difflora.eval.kernel import class_prior, mmd2_unbiased, polynomial_kernel
from difflora.eval.metrics import frechet_from_stats, knn_radii, mean_cov, precision_recall
from difflora.eval.uncertainty import _Neighbours, _pr_resampled, resample

ROOT = Path(__file__).resolve().parents[1]
N_REAL, N_FAKE, DIM, CLASSES, K = 10_000, 500, 128, 10, 3


def features(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=g, dtype=torch.float64) * 2
    real_l = torch.arange(N_REAL) % CLASSES
    fake_l = torch.arange(N_FAKE) % CLASSES
    real = centres[real_l] + torch.randn(N_REAL, DIM, generator=g, dtype=torch.float64)
    fake = centres[fake_l] + 1.1 * torch.randn(N_FAKE, DIM, generator=g, dtype=torch.float64) + 0.1
    return real / 8, fake / 8, real_l, fake_l


def _direct_mmd2(kxx, kyy, kxy, ix, iy, xl, yl, prior) -> float:
    """Stratified unbiased MMD^2 of a resample from its gathered blocks, pairs of copies left out."""
    zx = torch.nn.functional.one_hot(xl[ix], CLASSES).double()
    zy = torch.nn.functional.one_hot(yl[iy], CLASSES).double()
    px = (ix[:, None] != ix[None, :]).double()
    py = (iy[:, None] != iy[None, :]).double()
    w = prior[:, None] * prior[None, :]
    exx = (w * (zx.T @ (kxx[ix][:, ix] * px) @ zx) / (zx.T @ px @ zx)).sum()
    eyy = (w * (zy.T @ (kyy[iy][:, iy] * py) @ zy) / (zy.T @ py @ zy)).sum()
    exy = (w * (zx.T @ kxy[ix][:, iy] @ zy) / (zx.sum(0)[:, None] * zy.sum(0)[None, :])).sum()
    return float(exx + eyy - 2 * exy)


def _direct_pr(dxx, dyy, dxy, ix, iy) -> tuple[float, float]:
    ux, uy = ix.unique(), iy.unique()
    rx = dxx[ux][:, ux].kthvalue(K + 1, dim=1).values
    ry = dyy[uy][:, uy].kthvalue(K + 1, dim=1).values
    precision = (dxy[ux][:, iy] <= rx[:, None]).any(0).double().mean()
    recall = (dxy[ix][:, uy] <= ry[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def bootstrap(real, fake, real_l, fake_l, draws: int, direct: bool, seed: int = 0) -> tuple[list, float, float]:
    """(per-draw scores, CPU seconds of the set-up, CPU seconds per draw) of ``draws`` resamples,
    the direct way or difflora's."""
    device = real.device
    t0 = clock(device)
    prior = class_prior(real_l)
    kxx, kyy, kxy = polynomial_kernel(real, real), polynomial_kernel(fake, fake), polynomial_kernel(real, fake)
    dxx, dyy, dxy = torch.cdist(real, real), torch.cdist(fake, fake), torch.cdist(real, fake)
    if not direct:
        nx, ny = _Neighbours(dxx), _Neighbours(dyy)
    gen = torch.Generator().manual_seed(seed)
    t1 = clock(device)
    out = []
    for _ in range(draws):
        ix, iy = resample(real_l, N_REAL, gen).to(device), resample(fake_l, N_FAKE, gen).to(device)
        fd = frechet_from_stats(*mean_cov(real[ix]), *mean_cov(fake[iy]))
        if direct:
            kid = _direct_mmd2(kxx, kyy, kxy, ix, iy, real_l, fake_l, prior)
            pr = _direct_pr(dxx, dyy, dxy, ix, iy)
        else:
            cx, cy = torch.bincount(ix, minlength=N_REAL), torch.bincount(iy, minlength=N_FAKE)
            kid = mmd2_unbiased(kxx, kyy, kxy, real_l, fake_l, prior, x_counts=cx, y_counts=cy)
            pr = _pr_resampled(dxy, ix, iy, K, nx, ny)
        out.append((fd, kid, *pr))
    return out, t1 - t0, (clock(device) - t1) / draws


def floor_pr(real, fakes: list[torch.Tensor], once: bool) -> tuple[list, float]:
    """Precision/recall of several real draws against the reference: radii per draw, or once."""
    t0 = clock(real.device)
    radii = knn_radii(real, K) if once else None
    out = [precision_recall(real, f, K, real_radii=radii) for f in fakes]
    return out, (clock(real.device) - t0) / len(fakes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draws", type=int, default=4, help="bootstrap draws per way and round")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval.json"))
    add_device_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = machine(args.device)
    print(machine_line(info), flush=True)
    real, fake, real_l, fake_l = (v.to(args.device) for v in features(0))
    fakes = [real[torch.randperm(N_REAL, generator=torch.Generator().manual_seed(i))[:N_FAKE]] for i in range(4)]

    got = bootstrap(real, fake, real_l, fake_l, 2, direct=False)[0]
    want = bootstrap(real, fake, real_l, fake_l, 2, direct=True)[0]
    worst = max(
        abs(a - b) / max(abs(b), 1e-12) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)
    )
    assert worst < 1e-9, f"the two ways disagree: relative difference {worst:.2e}"
    assert floor_pr(real, fakes[:1], True)[0] == floor_pr(real, fakes[:1], False)[0]

    rounds = {k: [] for k in ("bootstrap direct", "bootstrap difflora", "floor radii per draw", "floor radii once")}
    setup = {"bootstrap direct": [], "bootstrap difflora": []}
    for r in range(args.rounds):
        for way in ("direct", "difflora"):
            _, set_up, per_draw = bootstrap(real, fake, real_l, fake_l, args.draws, direct=way == "direct")
            setup[f"bootstrap {way}"].append(set_up)
            rounds[f"bootstrap {way}"].append(per_draw)
        rounds["floor radii per draw"].append(floor_pr(real, fakes, once=False)[1])
        rounds["floor radii once"].append(floor_pr(real, fakes, once=True)[1])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rounds.items()), flush=True)
    pairs = {
        "bootstrap": ("bootstrap direct", "bootstrap difflora"),
        "floor": ("floor radii per draw", "floor radii once"),
    }
    result = {
        "sizes": {"real": N_REAL, "fake": N_FAKE, "dim": DIM, "classes": CLASSES, "k": K},
        "rounds": rounds,
        "bootstrap_setup_s": setup,
        "machine": info,
    }
    print(f"\n{N_REAL} real x {N_FAKE} fake features of {DIM} dims, CPU s per draw (fastest of {args.rounds} rounds)")
    print("| part | direct | difflora | speed-up | spread of per-round ratios |\n|---|---|---|---|---|")
    for name, (slow, fast) in pairs.items():
        ratio = min(rounds[slow]) / min(rounds[fast])
        per_round = [a / b for a, b in zip(rounds[slow], rounds[fast], strict=True)]
        result[name] = {
            "direct_s": min(rounds[slow]),
            "difflora_s": min(rounds[fast]),
            "speedup": ratio,
            "per_round": per_round,
        }
        print(
            f"| {name} | {min(rounds[slow]):.2f} s | {min(rounds[fast]):.3f} s | {ratio:.1f}x | "
            f"{min(per_round):.1f}-{max(per_round):.1f}x |"
        )
    full = {w: min(setup[f"bootstrap {w}"]) + 100 * min(rounds[f"bootstrap {w}"]) for w in ("direct", "difflora")}
    result["bootstrap_100_draws_s"] = full
    print(
        f"\nset-up of the bootstrap (kernels, distances; difflora also the neighbour lists): direct "
        f"{min(setup['bootstrap direct']):.2f} s, difflora {min(setup['bootstrap difflora']):.2f} s; one "
        f"evaluation's 100 draws: direct {full['direct']:.0f} s, difflora {full['difflora']:.0f} s "
        f"({full['direct'] / full['difflora']:.1f}x)"
    )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
