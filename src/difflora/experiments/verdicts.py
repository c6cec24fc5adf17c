"""Claim verdicts with real statistics: Welch's t-test over seeds, a non-inferiority test with a declared margin.

A claim compares one score (FD or KID, lower is better; or class accuracy, higher is better, in
"better" claims only) of an arm with a baseline's, each at its best guidance scale (best mean over
seeds), using the per-seed values:

- **better**: one-sided Welch's t-test (``scipy.stats.ttest_ind``, ``equal_var=False``,
  ``alternative="less"``) of arm < baseline. "holds" when p < alpha; "does not hold" when the
  opposite one-sided test is significant (the arm is worse); otherwise "within noise".
- **not worse**: non-inferiority with the claim's relative ``margin`` d: H0 is mean(arm) >=
  (1 + d) mean(baseline), tested by the same one-sided Welch test of the arm against the baseline's
  values times (1 + d) (their mean is (1 + d) mean(baseline), so the test is exact for the shifted
  hypothesis). "holds" when p < alpha; "does not hold" when the arm is significantly worse than the
  baseline itself; otherwise "within noise" (neither shown non-inferior nor shown worse).

With 3 seeds a Welch test has about 2-4 degrees of freedom: only large, consistent differences pass.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["judge_claim"]


def _welch(a: list[float], b: list[float], alternative: str) -> tuple[float, float, float]:
    """(t, p, Welch degrees of freedom) of scipy's one-sided Welch test of a vs b."""
    # scipy.stats takes seconds to import: only when a claim is judged, not whenever the paper
    # packages register (difflora.registry), which imports the report code this module is part of.
    from scipy import stats

    res = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
    return float(res.statistic), float(res.pvalue), float(getattr(res, "df", math.nan))


def _decide(out: dict[str, Any], arm: list[float], baseline: list[float], alpha: float) -> dict[str, Any]:
    """The verdict from the claim's test (``out["p"]``) and, when it fails, the test of arm > baseline."""
    if not math.isfinite(out["p"]):
        return out | {"verdict": "not testable", "test": out["test"] + ": no spread over seeds"}
    if out["p"] < alpha:
        return out | {"verdict": "holds"}
    worse = _welch(arm, baseline, "greater")[1]
    return out | {"verdict": "does not hold" if worse < alpha else "within noise"}


def judge_claim(
    relation: str,
    arm: list[float],
    baseline: list[float],
    alpha: float,
    margin: float | None,
    higher_is_better: bool = False,
) -> dict[str, Any]:
    """The verdict of ``arm`` (per-seed values, lower is better) against ``baseline``; see the module docstring.

    ``higher_is_better`` (a class accuracy; "better" claims only): the same tests of arm > baseline.
    Returns {"verdict", "test", "statistic", "p", "df", "alpha", "margin"}.
    """
    out: dict[str, Any] = {"alpha": alpha, "margin": margin, "statistic": math.nan, "p": math.nan, "df": math.nan}
    if len(arm) < 2 or len(baseline) < 2:
        return out | {"verdict": "not testable", "test": "needs at least 2 seeds per arm"}
    if higher_is_better and relation != "better":
        raise ValueError("a higher-is-better score takes 'better' claims only (margins are for lower-is-better scores)")
    decided = _judge(relation, arm, baseline, alpha, margin, higher_is_better, out)
    if len(set(baseline)) == 1 and math.isfinite(decided["p"]):
        # One evaluation copied to every seed (a fixed base scored with one sampling seed): the test
        # ignores the baseline's own evaluation noise. eval.seed: per_run scores it once per seed.
        decided["test"] += "; the baseline's values are one evaluation repeated: a one-sample test in effect"
    return decided


def _judge(
    relation: str,
    arm: list[float],
    baseline: list[float],
    alpha: float,
    margin: float | None,
    higher_is_better: bool,
    out: dict[str, Any],
) -> dict[str, Any]:
    """:func:`judge_claim` on at least 2 values per side."""
    if relation == "better":
        if higher_is_better:  # arm > baseline is -arm < -baseline
            arm, baseline = [-v for v in arm], [-v for v in baseline]
        t, p, df = _welch(arm, baseline, "less")
        test = "Welch t-test, one-sided (arm " + (">" if higher_is_better else "<") + " baseline)"
        out |= {"test": test, "statistic": t, "p": p, "df": df}
        decided = _decide(out, arm, baseline, alpha)
        # t of the scores as reported (arm minus baseline), not of their negatives.
        return decided | {"statistic": -t if higher_is_better else t}
    if margin is None:
        raise ValueError("a not_worse claim needs a margin")
    shifted = [(1.0 + margin) * v for v in baseline]
    t, p, df = _welch(arm, shifted, "less")
    out |= {
        "test": f"non-inferiority, Welch t-test one-sided (arm < (1 + {margin:g}) x baseline)",
        "statistic": t,
        "p": p,
        "df": df,
    }
    return _decide(out, arm, baseline, alpha)
