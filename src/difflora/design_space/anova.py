"""ANOVA of a sweep's results table (004's analysis): which design factor moves the metric?

For each metric, an ordinary least-squares model with every factor as a categorical term (and, on
request, every two-factor interaction) is fitted with statsmodels, and ``anova_lm(typ=2)`` gives
each term's sum of squares, degrees of freedom, F statistic and p value. Type II sums of squares
test each main effect after the other main effects, which stays meaningful when the design is not
balanced (004's design space has cells that do not exist: an output position before its input).

Effect sizes, per term:

    eta^2          = SS_term / SS_total           (SS_total = sum over rows of (y - mean y)^2)
    partial eta^2  = SS_term / (SS_term + SS_residual)

The *dominant factor* is the factor with the largest eta^2; the sentence names it, with its F, p
and the share of the variance it explains, and says whether it is significant at ``alpha``.

Factors are the table's columns before ``seed`` (``difflora sweep`` writes them first); factors with
one level in the table are left out (they explain nothing). Runs evaluated at several guidance
scales give one row per scale: pick one with ``guidance``. Outputs, in ``out``:
``anova_<metric>.csv`` (the table), ``anova.json`` (tables, sentences and each level's mean), ``main_effects_<metric>.png``
(mean and standard error per level, one panel per factor) and ``interaction_<metric>.png`` (the two
factors with the largest effects: one line per level of the second).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from difflora.design_space.sweep import SweepError, read_results

__all__ = ["anova", "dominant_sentence", "factor_columns", "run_anova"]


def factor_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The factor columns of a results table: those before ``seed``."""
    if not rows:
        raise SweepError("the results table has no rows")
    columns = list(rows[0])
    if "seed" not in columns:
        raise SweepError("the results table has no 'seed' column: factors are the columns before it (difflora sweep)")
    return columns[: columns.index("seed")]


def _frame(rows: Sequence[dict[str, Any]], metric: str, factors: list[str]):
    import pandas as pd

    missing = [i for i, r in enumerate(rows) if not isinstance(r.get(metric), int | float) or math.isnan(r[metric])]
    if missing:
        have = sorted(k for k, v in rows[0].items() if isinstance(v, int | float))
        raise SweepError(
            f"metric {metric!r} is missing or not a number in {len(missing)} of {len(rows)} rows; numeric columns: {have}"
        )
    frame = pd.DataFrame({f: [str(r[f]) for r in rows] for f in factors})
    frame[metric] = [float(r[metric]) for r in rows]
    return frame


def anova(rows: Sequence[dict[str, Any]], metric: str, factors: list[str], interactions: bool = False) -> list[dict]:
    """Type II ANOVA of ``metric`` on ``factors``: one dict per term (and ``Residual``) with
    ``term, sum_sq, df, F, p, eta_sq, partial_eta_sq``; terms in formula order."""
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    frame = _frame(rows, metric, factors)
    # Columns renamed f0, f1, ... and y: a factor named like a formula function (C, Q, np) stays a column.
    code = {f: f"f{i}" for i, f in enumerate(factors)}
    data = frame.rename(columns={**code, metric: "y"})
    terms = {f"C({code[f]})": f for f in factors}
    if interactions:
        pairs = [(a, b) for i, a in enumerate(factors) for b in factors[i + 1 :]]
        terms.update({f"C({code[a]}):C({code[b]})": f"{a}:{b}" for a, b in pairs})
    fit = smf.ols("y ~ " + " + ".join(terms), data=data).fit()
    if fit.df_resid < 1:
        raise SweepError(
            f"ANOVA of {metric}: no residual degrees of freedom ({len(frame)} rows for {int(fit.df_model) + 1} "
            "parameters); add seeds (replicates) or drop --interactions"
        )
    table = anova_lm(fit, typ=2)
    y = frame[metric].to_numpy()
    ss_total = float(((y - y.mean()) ** 2).sum())
    ss_res = float(table.loc["Residual", "sum_sq"])
    out = []
    for name, r in table.iterrows():
        ss = float(r["sum_sq"])
        resid = name == "Residual"
        out.append(
            {
                "term": "Residual" if resid else terms[name],
                "sum_sq": ss,
                "df": float(r["df"]),
                "F": None if resid else float(r["F"]),
                "p": None if resid else float(r["PR(>F)"]),
                "eta_sq": ss / ss_total if ss_total > 0 else float("nan"),
                "partial_eta_sq": None if resid else ss / (ss + ss_res),
            }
        )
    return out


def dominant_sentence(table: list[dict], metric: str, alpha: float = 0.05) -> str:
    """The sentence naming the factor with the largest eta squared (main effects only)."""
    mains = [r for r in table if r["term"] != "Residual" and ":" not in r["term"]]
    best = max(mains, key=lambda r: r["eta_sq"])
    stats = f"F = {best['F']:.2f}, p = {best['p']:.3g}, eta^2 = {best['eta_sq']:.2f}"
    share = f"it explains {100 * best['eta_sq']:.0f}% of the variance of {metric}"
    if best["p"] < alpha:
        return f"The dominant factor for {metric} is {best['term']} ({stats}): {share}."
    return (
        f"No factor is significant for {metric} at the {alpha:g} level; the largest effect is "
        f"{best['term']} ({stats}): {share}."
    )


def _level_stats(frame, factor: str, metric: str):
    g = frame.groupby(factor, sort=False)[metric]
    means, sems, counts = g.mean(), g.std(ddof=1), g.count()
    return list(means.index), means.to_numpy(), np.nan_to_num((sems / np.sqrt(counts)).to_numpy())


def plot_main_effects(frame, factors: list[str], metric: str, path: Path) -> Path:
    """One panel per factor: the metric's mean (and standard error) at each level, the grand mean dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(factors), 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(factors), sharey=True, squeeze=False)[0]
    for ax, factor in zip(axes, factors, strict=True):
        levels, means, sems = _level_stats(frame, factor, metric)
        x = np.arange(len(levels))
        ax.errorbar(x, means, yerr=sems, marker="o", capsize=3)
        ax.axhline(frame[metric].mean(), color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(x, levels, rotation=45, ha="right", fontsize=7)
        ax.set_title(factor, fontsize=9)
    axes[0].set_ylabel(f"mean {metric} (± s.e.)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_interaction(frame, a: str, b: str, metric: str, path: Path) -> Path:
    """Mean metric over the levels of ``a``, one line per level of ``b`` (parallel lines: no interaction)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    levels_a = list(dict.fromkeys(frame[a]))
    means = frame.groupby([b, a], sort=False)[metric].mean()
    for level_b in dict.fromkeys(frame[b]):
        xs = [i for i, la in enumerate(levels_a) if (level_b, la) in means.index]
        ax.plot(xs, [means[(level_b, levels_a[i])] for i in xs], marker="o", label=f"{b} = {level_b}")
    ax.set_xticks(range(len(levels_a)), levels_a, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel(a)
    ax.set_ylabel(f"mean {metric}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _format(table: list[dict], metric: str) -> list[str]:
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = [
        f"ANOVA (type II) of {metric}:",
        f"{'term':<24}{'SS':>12}{'df':>6}{'F':>10}{'p':>11}{'eta^2':>8}{'part.':>8}",
    ]
    for r in table:
        lines.append(
            f"{r['term']:<24}{r['sum_sq']:>12.4g}{r['df']:>6.0f}{num(r['F'], '.3f'):>10}{num(r['p'], '.3g'):>11}"
            f"{r['eta_sq']:>8.3f}{num(r['partial_eta_sq'], '.3f'):>8}"
        )
    return lines


def run_anova(
    results: str | Path,
    metrics: Sequence[str] = ("fd",),
    *,
    out: str | Path | None = None,
    guidance: float | None = None,
    interactions: bool = False,
    alpha: float = 0.05,
) -> list[str]:
    """ANOVA of each metric of a results table; writes tables, plots and ``anova.json``; returns printable lines."""
    rows = read_results(results)
    factors = factor_columns(rows)
    scales = sorted({float(r["guidance"]) for r in rows if "guidance" in r})
    if guidance is not None:
        rows = [r for r in rows if float(r.get("guidance", float("nan"))) == guidance]
        if not rows:
            raise SweepError(f"no rows at guidance {guidance:g}; the table has {scales}")
    elif len(scales) > 1:
        raise SweepError(f"the table holds guidance scales {scales}: pick one with --guidance")
    varied = [f for f in factors if len({str(r[f]) for r in rows}) > 1]
    if not varied:
        raise SweepError(f"no factor takes two levels in these rows (factors: {factors})")
    out_dir = Path(out) if out is not None else Path(results).parent / "anova"
    out_dir.mkdir(parents=True, exist_ok=True)
    lines, record = [], {"results": str(results), "guidance": guidance, "factors": varied, "metrics": {}}
    for metric in metrics:
        table = anova(rows, metric, varied, interactions)
        sentence = dominant_sentence(table, metric, alpha)
        frame = _frame(rows, metric, varied)
        plots = [plot_main_effects(frame, varied, metric, out_dir / f"main_effects_{metric}.png")]
        mains = sorted((r for r in table if r["term"] in varied), key=lambda r: -r["eta_sq"])
        if len(mains) >= 2:
            a, b = mains[0]["term"], mains[1]["term"]
            plots.append(plot_interaction(frame, a, b, metric, out_dir / f"interaction_{metric}.png"))
        csv_lines = ["term,sum_sq,df,F,p,eta_sq,partial_eta_sq"] + [
            ",".join(
                "" if r[k] is None else str(r[k])
                for k in ("term", "sum_sq", "df", "F", "p", "eta_sq", "partial_eta_sq")
            )
            for r in table
        ]
        (out_dir / f"anova_{metric}.csv").write_text("\n".join(csv_lines) + "\n")
        means = {f: dict(zip(*_level_stats(frame, f, metric)[:2], strict=True)) for f in varied}
        record["metrics"][metric] = {
            "table": table,
            "sentence": sentence,
            "rows": len(rows),
            "level_means": {f: {str(k): float(v) for k, v in m.items()} for f, m in means.items()},
        }
        lines += [*_format(table, metric), sentence, f"plots: {', '.join(str(p) for p in plots)}", ""]
    (out_dir / "anova.json").write_text(json.dumps(record, indent=2) + "\n")
    lines.append(f"tables: {out_dir}/anova_<metric>.csv, {out_dir / 'anova.json'}")
    return lines
