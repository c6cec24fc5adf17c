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

Each level's *adjusted* (least-squares) mean, from the main-effects fit and averaged over the other
factors' levels, is printed and recorded (``adjusted_means``) beside the raw level means: where the
levels met the other factors unequally, only the adjusted means compare like with like.

What cannot be answered is refused, not printed: a metric with no variance (every F would be a
ratio of rounding errors), a design whose model matrix cannot separate the requested terms (a
factor fixed by another, or an interaction over missing cells: its sums of squares are not
defined), a main-effects model in which a factor is aliased with the interaction of two others (a
resolution-III fraction), and a model that leaves no residual variance. Every metric is analysed before any file
is written, and each file is replaced atomically: one command's outputs appear together or not at all.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from difflora.design_space.sweep import SweepError, read_results
from difflora.files.atomic import write_together
from difflora.files.images import agg_figure
from difflora.optional import require

__all__ = ["adjusted_means", "anova", "dominant_sentence", "factor_columns", "run_anova"]


def factor_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The factor columns of a results table: those before ``seed``; every row must have them."""
    if not rows:
        raise SweepError("the results table has no rows")
    columns = list(rows[0])
    if "seed" not in columns:
        raise SweepError("the results table has no 'seed' column: factors are the columns before it (difflora sweep)")
    factors = columns[: columns.index("seed")]
    _require_factors(rows, factors)
    return factors


def _require_factors(rows: Sequence[dict[str, Any]], factors: list[str]) -> None:
    for i, row in enumerate(rows, 1):
        missing = [f for f in factors if f not in row]
        if missing:
            raise SweepError(f"results row {i} has no value for factor {missing[0]!r} (factors: {', '.join(factors)})")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _frame(rows: Sequence[dict[str, Any]], metric: str, factors: list[str]):
    pd = require("pandas", "difflora anova", extra="anova")
    _require_factors(rows, factors)
    missing = [i for i, r in enumerate(rows) if not _is_number(r.get(metric))]
    if missing:
        have = sorted(k for k, v in rows[0].items() if _is_number(v))
        raise SweepError(
            f"metric {metric!r} is missing or not a finite number in {len(missing)} of {len(rows)} rows; "
            f"numeric columns: {have}"
        )
    frame = pd.DataFrame({f: [str(r[f]) for r in rows] for f in factors})
    frame[metric] = [float(r[metric]) for r in rows]
    y = frame[metric].to_numpy()
    # Equal up to rounding: sums of squares of 1e-30 would still give F and p values, of noise.
    if np.ptp(y) <= 8 * np.finfo(float).eps * np.abs(y).max():
        raise SweepError(
            f"ANOVA of {metric}: it takes one value ({y[0]:.6g}) in all {len(y)} rows: there is no variance to explain"
        )
    return frame


def _aliased(x: np.ndarray, columns: dict[str, slice]) -> dict[str, tuple[int, int]]:
    """Terms whose columns are not all outside the span of the other terms' columns: name -> (adds, df)."""
    rank = np.linalg.matrix_rank(x)
    if rank == x.shape[1]:
        return {}
    out = {}
    for name, cols in columns.items():
        adds = rank - np.linalg.matrix_rank(np.delete(x, np.arange(cols.start, cols.stop), axis=1))
        if name != "Intercept" and adds < cols.stop - cols.start:
            out[name] = (int(adds), cols.stop - cols.start)
    return out


def _model_matrix(frame, factors: list[str], interactions: bool) -> tuple[np.ndarray, dict[str, slice]]:
    """The OLS model's columns, built here (not read from the formula engine): an intercept, the
    treatment dummies of each factor and, with ``interactions``, the products of two factors' dummies."""
    dummies = {f: [(frame[f] == level).to_numpy(float) for level in list(dict.fromkeys(frame[f]))[1:]] for f in factors}
    blocks = {"Intercept": [np.ones(len(frame))], **dummies}
    if interactions:
        for i, a in enumerate(factors):
            for b in factors[i + 1 :]:
                blocks[f"{a}:{b}"] = [u * v for u in dummies[a] for v in dummies[b]]
    bounds = np.cumsum([0] + [len(cols) for cols in blocks.values()])
    slices = {name: slice(int(lo), int(hi)) for name, lo, hi in zip(blocks, bounds[:-1], bounds[1:], strict=True)}
    return np.stack([c for cols in blocks.values() for c in cols], axis=1), slices


def _check_separable(frame, factors: list[str], metric: str, interactions: bool) -> None:
    """Refuse a design whose model matrix cannot separate the terms: their sums of squares are undefined."""
    aliased = _aliased(*_model_matrix(frame, factors, interactions))
    if aliased:
        parts = ", ".join(f"{t} adds {a} of its {df} degrees of freedom" for t, (a, df) in aliased.items())
        fix = "drop --interactions or run" if interactions else "run"
        raise SweepError(
            f"ANOVA of {metric}: the design cannot separate the terms {', '.join(aliased)} ({parts}): "
            f"these rows vary them together; {fix} the missing factor combinations"
        )


def _check_resolution(frame, factors: list[str], metric: str) -> None:
    """Refuse a main-effects model in which a factor is a function of two other factors' cells: its
    effect is then the same columns as their interaction (a resolution-III fraction, e.g. form =
    (input + output) mod 5), which the model silently attributes to that factor."""
    x, cols = _model_matrix(frame, factors, interactions=False)
    aliased = []
    for f in factors:
        others = [g for g in factors if g != f]
        for i, a in enumerate(others):
            for b in others[i + 1 :]:
                cells, _ = _model_matrix(frame, [a, b], interactions=True)
                if np.linalg.matrix_rank(np.hstack([cells, x[:, cols[f]]])) == np.linalg.matrix_rank(cells):
                    aliased.append(f"{f} with the {a}:{b} interaction")
    if aliased:
        raise SweepError(
            f"ANOVA of {metric}: the design aliases main effects with interactions ({'; '.join(aliased)}: every "
            "cell of the two holds one level of the first), so those effects cannot be told from the "
            "interactions; run a design that crosses the factors (e.g. a full factorial of two at one level of "
            "the third, then the third against one of them: experiments/design-space/stage1.yaml, stage2.yaml)"
        )


def adjusted_means(rows: Sequence[dict[str, Any]], metric: str, factors: list[str]) -> dict[str, dict[str, float]]:
    """Least-squares (adjusted) means of ``metric`` per level of each factor from the main-effects
    model: the fitted value at that level averaged over every level of the other factors, equally
    weighted. Unlike raw level means they do not carry the other factors' effects when the levels
    met them unequally (a fraction, or missing cells)."""
    frame = _frame(rows, metric, factors)
    x, cols = _model_matrix(frame, factors, interactions=False)
    coef = np.linalg.lstsq(x, frame[metric].to_numpy(float), rcond=None)[0]
    effects = {f: np.concatenate([[0.0], coef[cols[f]]]) for f in factors}  # the first level is the reference
    out = {}
    for f in factors:
        rest = coef[0] + sum(float(effects[g].mean()) for g in factors if g != f)
        levels = list(dict.fromkeys(frame[f]))
        out[f] = {str(level): float(rest + effects[f][i]) for i, level in enumerate(levels)}
    return out


def anova(rows: Sequence[dict[str, Any]], metric: str, factors: list[str], interactions: bool = False) -> list[dict]:
    """Type II ANOVA of ``metric`` on ``factors``: one dict per term (and ``Residual``) with
    ``term, sum_sq, df, F, p, eta_sq, partial_eta_sq``; terms in formula order."""
    smf = require("statsmodels.formula.api", "difflora anova", extra="anova")
    anova_lm = require("statsmodels.stats.anova", "difflora anova", extra="anova").anova_lm
    frame = _frame(rows, metric, factors)
    # Columns renamed f0, f1, ... and y: a factor named like a formula function (C, Q, np) stays a column.
    code = {f: f"f{i}" for i, f in enumerate(factors)}
    data = frame.rename(columns={**code, metric: "y"})
    terms = {f"C({code[f]})": f for f in factors}
    if interactions:
        pairs = [(a, b) for i, a in enumerate(factors) for b in factors[i + 1 :]]
        terms.update({f"C({code[a]}):C({code[b]})": f"{a}:{b}" for a, b in pairs})
    _check_separable(frame, factors, metric, interactions)
    if not interactions:
        _check_resolution(frame, factors, metric)
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
    if ss_res <= 1e-12 * ss_total:
        raise SweepError(
            f"ANOVA of {metric}: the model leaves no residual variance (it fits every row exactly: the seeds "
            "changed nothing): F and p are undefined"
        )
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
                "eta_sq": ss / ss_total,
                "partial_eta_sq": None if resid else ss / (ss + ss_res),
            }
        )
    return out


def dominant_sentence(table: list[dict], metric: str, alpha: float = 0.05) -> str:
    """The sentence naming the factor with the largest eta squared (main effects only).

    The largest effect need not be the significant one: a factor of many levels can explain more
    variance than a factor of two and still fail its F test (it spends more degrees of freedom), so a
    significant smaller effect is named beside it rather than hidden behind "no factor is significant".
    """
    mains = [r for r in table if r["term"] != "Residual" and ":" not in r["term"]]
    best = max(mains, key=lambda r: r["eta_sq"])

    def stats(r):
        return f"F = {r['F']:.2f}, p = {r['p']:.3g}, eta^2 = {r['eta_sq']:.2f}"

    share = f"it explains {100 * best['eta_sq']:.0f}% of the variance of {metric}"
    if best["p"] < alpha:
        return f"The dominant factor for {metric} is {best['term']} ({stats(best)}): {share}."
    significant = sorted((r for r in mains if r["p"] < alpha), key=lambda r: -r["eta_sq"])
    if significant:
        named = "; ".join(f"{r['term']} ({stats(r)})" for r in significant)
        return (
            f"The largest effect on {metric}, {best['term']} ({stats(best)}), is not significant at the "
            f"{alpha:g} level ({share}); significant: {named}."
        )
    return (
        f"No factor is significant for {metric} at the {alpha:g} level; the largest effect is "
        f"{best['term']} ({stats(best)}): {share}."
    )


def _level_stats(frame, factor: str, metric: str):
    g = frame.groupby(factor, sort=False)[metric]
    means, sems, counts = g.mean(), g.std(ddof=1), g.count()
    return list(means.index), means.to_numpy(), np.nan_to_num((sems / np.sqrt(counts)).to_numpy())


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def main_effects_png(frame, factors: list[str], metric: str) -> bytes:
    """One panel per factor: the metric's mean (and standard error) at each level, the grand mean dashed."""
    fig = agg_figure((3.2 * len(factors), 3.4), "difflora anova's effect plots")
    axes = fig.subplots(1, len(factors), sharey=True, squeeze=False)[0]
    for ax, factor in zip(axes, factors, strict=True):
        levels, means, sems = _level_stats(frame, factor, metric)
        x = np.arange(len(levels))
        ax.errorbar(x, means, yerr=sems, marker="o", capsize=3)
        ax.axhline(frame[metric].mean(), color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(x, levels, rotation=45, ha="right", fontsize=7)
        ax.set_title(factor, fontsize=9)
    axes[0].set_ylabel(f"mean {metric} (± s.e.)")
    return _png(fig)


def interaction_png(frame, a: str, b: str, metric: str) -> bytes:
    """Mean metric over the levels of ``a``, one line per level of ``b`` (parallel lines: no interaction)."""
    fig = agg_figure((5.5, 3.8), "difflora anova's effect plots")
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
    return _png(fig)


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


def _adjusted_lines(adjusted: dict[str, dict[str, float]], metric: str) -> list[str]:
    """One line per factor: its levels' least-squares means (:func:`adjusted_means`), best first."""
    best_first = metric in ("class_accuracy", "precision", "recall")
    lines = [f"adjusted (least-squares) means of {metric}, each level averaged over the other factors' levels:"]
    for f, means in adjusted.items():
        ranked = sorted(means.items(), key=lambda kv: -kv[1] if best_first else kv[1])
        lines.append(f"  {f}: " + ", ".join(f"{level} {value:.4g}" for level, value in ranked))
    return lines


def _scale(row: dict[str, Any], i: int) -> float:
    value = row["guidance"]
    if not _is_number(value):
        raise SweepError(f"results row {i}: guidance is {value!r}, not a finite number")
    return float(value)


def _rows_at(rows: list[dict[str, Any]], guidance: float | None) -> list[dict[str, Any]]:
    """The rows at one guidance scale: ``guidance``, or the table's only one."""
    scales = {i: _scale(r, i) for i, r in enumerate(rows, 1) if "guidance" in r}
    levels = sorted(set(scales.values()))
    if guidance is not None:
        rows = [r for i, r in enumerate(rows, 1) if scales.get(i) == guidance]
        if not rows:
            raise SweepError(f"no rows at guidance {guidance:g}; the table has {levels}")
    elif len(levels) > 1:
        raise SweepError(f"the table holds guidance scales {levels}: pick one with --guidance")
    return rows


def _analyse(rows: list[dict[str, Any]], metric: str, varied: list[str], interactions: bool, alpha: float):
    """One metric's table, record and plots (name -> PNG bytes); nothing is written."""
    table = anova(rows, metric, varied, interactions)
    frame = _frame(rows, metric, varied)
    plots = {f"main_effects_{metric}.png": main_effects_png(frame, varied, metric)}
    mains = sorted((r for r in table if r["term"] in varied), key=lambda r: -r["eta_sq"])
    if len(mains) >= 2:
        plots[f"interaction_{metric}.png"] = interaction_png(frame, mains[0]["term"], mains[1]["term"], metric)
    keys = ("term", "sum_sq", "df", "F", "p", "eta_sq", "partial_eta_sq")
    csv_lines = [",".join(keys)] + [",".join("" if r[k] is None else str(r[k]) for k in keys) for r in table]
    means = {f: dict(zip(*_level_stats(frame, f, metric)[:2], strict=True)) for f in varied}
    record = {
        "table": table,
        "sentence": dominant_sentence(table, metric, alpha),
        "rows": len(rows),
        "level_means": {f: {str(k): float(v) for k, v in m.items()} for f, m in means.items()},
        "adjusted_means": adjusted_means(rows, metric, varied),
    }
    return record, {f"anova_{metric}.csv": "\n".join(csv_lines) + "\n", **plots}


def run_anova(
    results: str | Path,
    metrics: Sequence[str] = ("fd",),
    *,
    out: str | Path | None = None,
    guidance: float | None = None,
    interactions: bool = False,
    alpha: float = 0.05,
) -> list[str]:
    """ANOVA of each metric of a results table; writes tables, plots and ``anova.json``; returns printable lines.

    Every metric is analysed before the first file is written: a metric that fails leaves no output."""
    rows = read_results(results)
    factors = factor_columns(rows)
    rows = _rows_at(rows, guidance)
    varied = [f for f in factors if len({str(r[f]) for r in rows}) > 1]
    if not varied:
        raise SweepError(f"no factor takes two levels in these rows (factors: {factors})")
    out_dir = Path(out) if out is not None else Path(results).parent / "anova"
    lines, files = [], {}
    record = {"results": str(results), "guidance": guidance, "factors": varied, "metrics": {}}
    for metric in metrics:
        record["metrics"][metric], outputs = _analyse(rows, metric, varied, interactions, alpha)
        files.update(outputs)
        plots = ", ".join(str(out_dir / name) for name in outputs if name.endswith(".png"))
        table = record["metrics"][metric]["table"]
        adjusted = record["metrics"][metric]["adjusted_means"]
        lines += [*_format(table, metric), record["metrics"][metric]["sentence"], *_adjusted_lines(adjusted, metric)]
        lines += [f"plots: {plots}", ""]
    files["anova.json"] = json.dumps(record, indent=2) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_together({out_dir / name: data for name, data in files.items()})
    lines.append(f"tables: {out_dir}/anova_<metric>.csv, {out_dir / 'anova.json'}")
    return lines
