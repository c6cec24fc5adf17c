"""The claims section of a study report: each claim's verdict with what it compared.

A verdict (:mod:`difflora.experiments.verdicts`) is read together with what was compared: each arm's
scores, trainable parameters, training steps, training seeds and evaluation (sampling) seeds, all
taken from the run records, and the claim's declared ``context`` (what the test cannot hold, e.g.
the quality of the two bases when comparing how well they adapt).
"""

from __future__ import annotations

import math
from typing import Any

from difflora.experiments.study_spec import HIGHER_IS_BETTER, Claim, Study
from difflora.experiments.verdicts import judge_claim

__all__ = ["ALL_TASKS", "claim_verdict", "claims_section", "pm"]

# The row of a spatial arm (data.spatial) that averages its tasks (the one claims compare).
ALL_TASKS = "all tasks"


def pm(ms: tuple[float, float] | None, digits: int = 2, scale: float = 1.0) -> str:
    """``mean ± std`` of a (mean, std) pair, '-' for None."""
    if ms is None:
        return "-"
    return f"{ms[0] * scale:.{digits}f} ± {ms[1] * scale:.{digits}f}"


def _best(rows: list[dict[str, Any]], arm: str, metric: str) -> dict[str, Any] | None:
    # A spatial arm is compared on the mean over its tasks, not on its best task.
    cands = [r for r in rows if r["arm"] == arm and r[metric] is not None and r.get("task") in (None, ALL_TASKS)]
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0
    return min(cands, key=lambda r: sign * r[metric][0]) if cands else None


def _at_scale(rows: list[dict[str, Any]], arm: str, metric: str, guidance: float | None) -> dict[str, Any] | None:
    """The row of ``arm`` at guidance ``guidance``, or (None) its best row."""
    if guidance is None:
        return _best(rows, arm, metric)
    return next((r for r in rows if r["arm"] == arm and r["guidance"] == guidance and r[metric] is not None), None)


def claim_verdict(claim: Claim, rows: list[dict[str, Any]], alpha: float) -> dict[str, Any]:
    """The verdict of a claim (``verdicts.judge_claim``) with the rows it compared: each at the claim's
    guidance scale, or at its best scale."""
    a, b = (_at_scale(rows, name, claim.metric, claim.guidance) for name in (claim.arm, claim.baseline))
    if a is None or b is None:
        at = f" at guidance {claim.guidance:g}" if claim.guidance is not None else ""
        missing = [name for name, row in ((claim.arm, a), (claim.baseline, b)) if row is None]
        test = f"no results{at} for {', '.join(missing)}: run the study to fill them"
        return {"verdict": "not run", "test": test, "a": a, "b": b}
    va = [v for v in a["values"][claim.metric] if v is not None]
    vb = [v for v in b["values"][claim.metric] if v is not None]
    higher = claim.metric in HIGHER_IS_BETTER
    return judge_claim(claim.relation, va, vb, alpha, claim.margin, higher) | {"a": a, "b": b}


def _compared(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, str]:
    """(trainable parameters, steps and seeds) of the two rows a claim compared, arm / baseline."""
    params = f"{a['parameters']['trainable']:,} / {b['parameters']['trainable']:,}"

    def runs(r: dict[str, Any]) -> str:
        seeds = ",".join(str(s) for s in r["seeds"])
        return f"{r['steps']} steps, seeds {seeds}, eval seeds {','.join(str(s) for s in r['eval_seeds'])}"

    return params, f"{runs(a)} / {runs(b)}"


def claims_section(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """The report's "Claims" section: one row per claim of ``study`` (``rows``: the report's summary rows)."""
    lines = [
        "## Claims",
        "",
        "Each arm at the claim's guidance scale, or (none given) at its best scale (best mean); the per-seed scores of the two arms are compared "
        f"with scipy's Welch t-test at alpha = {study.alpha:g}. *better*: one-sided test arm < baseline "
        "(arm > baseline for class accuracy, where higher is better). "
        "*not worse*: non-inferiority, one-sided test arm < (1 + margin) x baseline, margin declared in the "
        "study YAML. A verdict is *does not hold* when the arm is significantly worse than the baseline, "
        "*within noise* when neither test is significant. Trainable parameters, training steps, training "
        "seeds and evaluation (sampling) seeds are the arm's / the baseline's, from their records; a claim's "
        "context is what the test does not hold, declared with the claim.",
        "",
        "| claim | verdict | scores (mean ± std over seeds) | trainable params | runs | test | t (df) | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in study.claims:
        v = claim_verdict(c, rows, study.alpha)
        rel = c.relation.replace("_", " ") + (f" (margin {100 * c.margin:g}%)" if c.relation == "not_worse" else "")
        what = f"{c.text} ({c.arm} {rel} than {c.baseline}, {c.metric})"
        context = f"; context: {c.context.strip()}" if c.context.strip() else ""
        if v["a"] is None or v["b"] is None:
            lines.append(f"| {what} | {v['verdict']}{context} | - | - | - | {v['test']} | - | - |")
            continue
        scale = 1e3 if c.metric == "kid_mean" else 1.0
        nums = (
            f"{pm(v['a'][c.metric], 2, scale)} (w={v['a']['guidance']:g}) vs "
            f"{pm(v['b'][c.metric], 2, scale)} (w={v['b']['guidance']:g})"
        )
        params, runs = _compared(v["a"], v["b"])
        # A claim with no test (fewer than two seeds, or no spread) has no statistic: a dash, not "nan".
        tested = math.isfinite(v["p"])
        stat = f"{v['statistic']:.2f} ({v['df']:.1f})" if tested else "-"
        p = f"{v['p']:.3g}" if tested else "-"
        lines.append(f"| {what} | **{v['verdict']}**{context} | {nums} | {params} | {runs} | {v['test']} | {stat} | {p} |")
    return lines
