"""ANOVA of a results table against hand computations on synthetic tables whose effects are known.

References: for a balanced additive design the sums of squares are the classical
``SS_A = sum_l n_l (mean_l - grand)^2`` computed here with numpy; for an unbalanced design the
type II sum of squares of a factor is the increase of the residual sum of squares when it is
dropped from the main-effects model (least squares on dummy codes with numpy); a one-way F
statistic is scipy's ``f_oneway``.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy import stats

from difflora.cli.commands import main
from difflora.design_space.anova import anova, dominant_sentence, run_anova
from difflora.design_space.sweep import SweepError, write_results

TOL = 1e-9
EFFECT_A = {"a0": 0.0, "a1": 2.0, "a2": 4.0}  # strong
EFFECT_B = {"b0": 0.0, "b1": 0.6}  # weak
# factor C has no effect


def synthetic(seeds: int = 4, drop=(), noise: float = 0.5) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for a, b, c in itertools.product(EFFECT_A, EFFECT_B, ("c0", "c1")):
        if (a, b) in drop:
            continue
        for s in range(seeds):
            y = 10 + EFFECT_A[a] + EFFECT_B[b] + noise * rng.standard_normal()
            rows.append({"A": a, "B": b, "C": c, "seed": s, "guidance": 1.0, "fd": y, "class_accuracy": 1 / y})
    return rows


def by_term(table):
    return {r["term"]: r for r in table}


def test_balanced_sums_of_squares_effect_sizes_and_dominant_factor():
    rows = synthetic()
    table = by_term(anova(rows, "fd", ["A", "B", "C"]))
    y = np.array([r["fd"] for r in rows])
    grand = y.mean()
    ss = {}
    for f in "ABC":
        levels = sorted({r[f] for r in rows})
        ss[f] = sum(
            len(v) * (np.mean(v) - grand) ** 2 for v in ([r["fd"] for r in rows if r[f] == lv] for lv in levels)
        )
    ss_total = ((y - grand) ** 2).sum()
    ss_res = ss_total - sum(ss.values())
    df_res = len(rows) - 1 - (2 + 1 + 1)
    for f, df in (("A", 2), ("B", 1), ("C", 1)):
        assert table[f]["sum_sq"] == pytest.approx(ss[f], abs=TOL)
        assert table[f]["F"] == pytest.approx((ss[f] / df) / (ss_res / df_res), rel=TOL)
        assert table[f]["p"] == pytest.approx(stats.f.sf(table[f]["F"], df, df_res), rel=1e-6)
        assert table[f]["eta_sq"] == pytest.approx(ss[f] / ss_total, abs=TOL)
        assert table[f]["partial_eta_sq"] == pytest.approx(ss[f] / (ss[f] + ss_res), abs=TOL)
    assert table["Residual"]["sum_sq"] == pytest.approx(ss_res, abs=TOL)
    # The known effects: A dominates, B is real but small, C is noise.
    assert table["A"]["eta_sq"] > 0.8 and table["A"]["p"] < 1e-10
    assert table["B"]["p"] < 0.05 and table["C"]["p"] > 0.05
    sentence = dominant_sentence(list(table.values()), "fd")
    assert sentence.startswith("The dominant factor for fd is A (F = ")
    assert f"{100 * table['A']['eta_sq']:.0f}% of the variance" in sentence


def test_sentence_names_a_significant_factor_behind_a_larger_insignificant_one():
    # Stage 1 of the redesigned 004 study: input (4 df) explained 28% of class accuracy at p = 0.23,
    # output (1 df) 23% at p = 0.041. The sentence must not say that no factor is significant.
    table = [
        {"term": "input", "F": 1.671, "p": 0.232, "eta_sq": 0.280},
        {"term": "output", "F": 5.488, "p": 0.0412, "eta_sq": 0.230},
        {"term": "input:output", "F": 0.427, "p": 0.786, "eta_sq": 0.072},
        {"term": "Residual", "F": None, "p": None, "eta_sq": 0.419},
    ]
    sentence = dominant_sentence(table, "class_accuracy")
    assert not sentence.startswith("No factor")
    assert "input (F = 1.67, p = 0.232, eta^2 = 0.28), is not significant" in sentence
    assert sentence.endswith("significant: output (F = 5.49, p = 0.0412, eta^2 = 0.23).")
    table[1]["p"] = 0.06
    assert dominant_sentence(table, "class_accuracy").startswith("No factor is significant")


def test_one_way_f_equals_scipy():
    rows = synthetic()
    table = by_term(anova(rows, "fd", ["A"]))
    groups = [[r["fd"] for r in rows if r["A"] == lv] for lv in EFFECT_A]
    ref = stats.f_oneway(*groups)
    assert table["A"]["F"] == pytest.approx(ref.statistic, rel=TOL)
    assert table["A"]["p"] == pytest.approx(ref.pvalue, rel=1e-6)


def dummy_rss(rows, factors) -> float:
    cols = [np.ones(len(rows))]
    for f in factors:
        levels = sorted({r[f] for r in rows})
        cols += [np.array([r[f] == lv for r in rows], dtype=float) for lv in levels[1:]]
    x, y = np.stack(cols, 1), np.array([r["fd"] for r in rows])
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    return float(((y - x @ beta) ** 2).sum())


def test_unbalanced_type_ii_is_the_drop_one_increase():
    # Cells missing as in 004's space (an output before its input does not exist).
    rows = synthetic(seeds=3, drop=[("a0", "b1"), ("a2", "b0")])
    table = by_term(anova(rows, "fd", ["A", "B", "C"]))
    full = dummy_rss(rows, "ABC")
    for f in "ABC":
        others = [g for g in "ABC" if g != f]
        assert table[f]["sum_sq"] == pytest.approx(dummy_rss(rows, others) - full, abs=1e-8)
    assert table["Residual"]["sum_sq"] == pytest.approx(full, abs=1e-8)


def test_interactions_need_replicates_and_are_reported():
    rows = synthetic(seeds=2)
    table = by_term(anova(rows, "fd", ["A", "B"], interactions=True))
    assert "A:B" in table and table["A:B"]["df"] == 2
    with pytest.raises(SweepError, match="no residual degrees of freedom"):
        # One row per (A, B) cell: the saturated model leaves nothing to estimate the noise.
        anova([r for r in synthetic(seeds=1) if r["C"] == "c0"], "fd", ["A", "B"], interactions=True)


def test_run_anova_writes_tables_plots_and_cli(tmp_path, capsys):
    csv_path = write_results(synthetic(), ["A", "B", "C"], tmp_path)
    lines = run_anova(csv_path, ["fd", "class_accuracy"])
    out = tmp_path / "anova"
    for name in ("main_effects_fd.png", "interaction_fd.png", "main_effects_class_accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "anova.json").read_text())
    assert record["metrics"]["fd"]["sentence"].startswith("The dominant factor for fd is A")
    a1 = [r["fd"] for r in synthetic() if r["A"] == "a1"]
    assert record["metrics"]["fd"]["level_means"]["A"]["a1"] == pytest.approx(np.mean(a1), abs=TOL)
    assert any(line.startswith("The dominant factor for class_accuracy is A") for line in lines)
    assert (out / "anova_fd.csv").read_text().splitlines()[0] == "term,sum_sq,df,F,p,eta_sq,partial_eta_sq"
    # Same table from the JSONL twin.
    jsonl = run_anova(csv_path.with_suffix(".jsonl"), ["fd"], out=tmp_path / "j")
    assert jsonl[:5] == lines[:5]
    assert main(["anova", str(csv_path), "--metric", "fd", "--out", str(tmp_path / "cli")]) == 0
    assert "The dominant factor for fd is A" in capsys.readouterr().out


def test_bad_tables_are_one_line_errors(tmp_path, capsys):
    rows = synthetic()
    two = rows + [{**r, "guidance": 2.0} for r in rows]
    path = write_results(two, ["A", "B", "C"], tmp_path / "g")
    with pytest.raises(SweepError, match=r"guidance scales \[1.0, 2.0\]: pick one with --guidance"):
        run_anova(path, ["fd"])
    assert run_anova(path, ["fd"], guidance=2.0)[0].startswith("ANOVA (type II) of fd")
    assert main(["anova", str(path), "--metric", "kid_mean"]) == 2
    assert "guidance scales" in capsys.readouterr().err
    with pytest.raises(SweepError, match="metric 'kid_mean' is missing"):
        run_anova(path, ["kid_mean"], guidance=1.0)
    with pytest.raises(SweepError, match="does not exist"):
        run_anova(tmp_path / "none.csv")


def interaction_rss(rows, a: str, b: str) -> float:
    """Residual sum of squares of the two-way model with interaction: the cell means (numpy)."""
    y = np.array([r["fd"] for r in rows])
    cells = [(r[a], r[b]) for r in rows]
    fitted = np.array([np.mean([v for v, c in zip(y, cells, strict=True) if c == cell]) for cell in cells])
    return float(((y - fitted) ** 2).sum())


def test_interaction_sum_of_squares_is_the_cell_means_increase():
    # A real interaction: B's effect depends on A. Type II SS of A:B = RSS(A + B) - RSS(cells).
    rows = synthetic(seeds=3)
    for r in rows:
        r["fd"] += 1.5 * (r["A"] == "a2") * (r["B"] == "b1")
    table = by_term(anova(rows, "fd", ["A", "B"], interactions=True))
    full = interaction_rss(rows, "A", "B")
    assert table["A:B"]["sum_sq"] == pytest.approx(dummy_rss(rows, "AB") - full, abs=1e-8)
    assert table["Residual"]["sum_sq"] == pytest.approx(full, abs=1e-8)
    assert table["Residual"]["df"] == len(rows) - 6
    for f in "AB":
        assert table[f]["sum_sq"] == pytest.approx(dummy_rss(rows, "AB".replace(f, "")) - dummy_rss(rows, "AB"))


def test_statistics_that_cannot_be_computed_are_refused():
    rows = synthetic()
    with pytest.raises(SweepError, match=r"ANOVA of fd: it takes one value \(3\) in all 48 rows: there is no variance"):
        anova([{**r, "fd": 3.0} for r in rows], "fd", ["A", "B", "C"])
    # B is fixed by A (b1 only with a2): main effects alone cannot be separated.
    nested = [{**r, "B": "b1" if r["A"] == "a2" else "b0"} for r in rows]
    with pytest.raises(SweepError, match=r"cannot separate the terms A, B \(A adds 1 of its 2 .*B adds 0 of its 1"):
        anova(nested, "fd", ["A", "B", "C"])
    # Missing cells: the main effects are separable (test above), their interaction is not.
    holes = synthetic(seeds=3, drop=[("a0", "b1"), ("a2", "b0")])
    with pytest.raises(SweepError, match=r"cannot separate the terms .*A:B adds 0 of its 2.*drop --interactions"):
        anova(holes, "fd", ["A", "B", "C"], interactions=True)
    # Seeds that changed nothing in an additive design: the residual is rounding noise.
    exact = [{**r, "fd": 10 + EFFECT_A[r["A"]] + EFFECT_B[r["B"]]} for r in rows]
    with pytest.raises(SweepError, match="leaves no residual variance"):
        anova(exact, "fd", ["A", "B", "C"])
    with pytest.raises(SweepError, match=r"metric 'fd' is missing or not a finite number in 1 of 48 rows"):
        anova([{**rows[0], "fd": float("inf")}, *rows[1:]], "fd", ["A", "B", "C"])


def test_bad_rows_are_named(tmp_path):
    rows = synthetic()
    jsonl = tmp_path / "r.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[4] = json.dumps({k: v for k, v in rows[4].items() if k != "B"})
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(SweepError, match=r"results row 5 has no value for factor 'B' \(factors: A, B, C\)"):
        run_anova(jsonl)
    jsonl.write_text("\n".join([*lines[:4], json.dumps({**rows[4], "guidance": None})]) + "\n")
    with pytest.raises(SweepError, match=r"results row 5: guidance is None, not a finite number"):
        run_anova(jsonl)
    jsonl.write_text(json.dumps(rows[0]) + "\n[1, 2]\n")
    with pytest.raises(SweepError, match=r"row 2 is not a JSON object"):
        run_anova(jsonl)
    path = write_results(rows, ["A", "B", "C"], tmp_path)
    text = path.read_text().splitlines()
    path.write_text("\n".join([*text[:3], "a1,b0", *text[3:]]) + "\n")
    with pytest.raises(SweepError, match=r"line 4 does not have one cell per column \(A, B, C, seed"):
        run_anova(path)
    assert not (tmp_path / "anova").exists()


def test_outputs_appear_together_or_not_at_all(tmp_path):
    path = write_results(synthetic(), ["A", "B", "C"], tmp_path)
    run_anova(path, ["fd"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "anova").iterdir()}
    # The second metric is missing: the first one's files are not rewritten, none is added.
    with pytest.raises(SweepError, match="metric 'kid_mean' is missing"):
        run_anova(path, ["class_accuracy", "kid_mean"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "anova").iterdir()} == before
    assert not (tmp_path / "anova2").exists()
    with pytest.raises(SweepError, match="metric 'kid_mean' is missing"):
        run_anova(path, ["fd", "kid_mean"], out=tmp_path / "anova2")
    assert not (tmp_path / "anova2").exists()
    # A write that fails (here: a directory in the way of anova.json's temporary file, as a full disk
    # would fail it) removes the temporary files written before it and replaces no earlier output.
    (tmp_path / "anova" / "anova.json.tmp").mkdir()
    with pytest.raises(IsADirectoryError):
        run_anova(path, ["fd", "class_accuracy"])
    (tmp_path / "anova" / "anova.json.tmp").rmdir()
    assert {p.name: p.read_bytes() for p in (tmp_path / "anova").iterdir()} == before
