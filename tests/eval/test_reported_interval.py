"""Issue 32 item 5: the CLI prints the interval the reports print, and names it. The reference is
the basic bootstrap interval's definition, [2 x estimate - upper quantile, 2 x estimate - lower
quantile], worked out by hand on the issue's own example."""

from __future__ import annotations

import math

import numpy as np

from difflora.eval.evaluate import _fmt_floor
from difflora.eval.uncertainty import interval_kind, reported_interval
from difflora.experiments.report import _ci_table

FLOOR = {k: {"mean": 1.0, "std": 0.1} for k in ("fd", "kid_mean", "precision", "recall")}


def test_the_issues_example_now_prints_an_interval_around_the_estimate():
    # Issue 32: "FD 4.558 [4.704, 8.481]" (the percentile interval, above the estimate).
    metrics = {"fd": 4.558, "kid_mean": 0.002, "precision": 0.5, "recall": 0.4}
    ci = {"fd": [4.704, 8.481], "kid_mean": [0.001, 0.003], "precision": [0.45, 0.55], "recall": [0.3, 0.5]}
    line = _fmt_floor(metrics, FLOOR, ci)
    # 2 x 4.558 - 8.481 = 0.635, 2 x 4.558 - 4.704 = 4.412
    assert line.startswith("FD 4.558 [0.635, 4.412] (basic 95% bootstrap; real data: 1.000 ± 0.100)")
    assert "KID 0.00200 [0.00100, 0.00300] (percentile 95% bootstrap;" in line
    assert "precision 0.500 [0.450, 0.550] (percentile 95% bootstrap;" in line


def test_report_and_cli_show_the_same_interval():
    fd, lo, hi = 7.0, 7.5, 11.0
    row = {"arm": "a", "guidance": 2.0, "fd": (fd, 0.0), "ci": {"fd": [(lo, 0.0), (hi, 0.0)]}}
    metrics = {"fd": fd, "kid_mean": 0.0, "precision": 0.0, "recall": 0.0}
    line = _fmt_floor(metrics, FLOOR, {"fd": [lo, hi]})
    assert _ci_table([row])[-1].split(" | ")[2] == "[3.00, 6.50]" and line.startswith("FD 7.000 [3.000, 6.500]")
    assert interval_kind("fd") == "basic" and {interval_kind(k) for k in ("kid_mean", "class_accuracy")} == {
        "percentile"
    }


def test_the_basic_interval_removes_a_shift_of_the_bootstrap_distribution():
    # A statistic whose resamples sit at estimate + bias + noise (the copies' bias of FD): the
    # percentile interval misses the estimate, the basic one is centred on estimate - bias, i.e. it
    # corrects the shift, as the definition says.
    rng = np.random.default_rng(0)
    estimate, bias = 5.0, 2.0
    draws = estimate + bias + rng.normal(0.0, 0.5, 100_000)
    q_lo, q_hi = np.quantile(draws, [0.025, 0.975])
    assert q_lo > estimate  # the percentile interval excludes the estimate
    lo, hi = reported_interval("fd", estimate, [q_lo, q_hi])
    assert math.isclose((lo + hi) / 2, estimate - bias, abs_tol=0.02)
    assert math.isclose(hi - lo, q_hi - q_lo, rel_tol=1e-12)
    assert reported_interval("recall", 0.3, [0.2, 0.6]) == (0.2, 0.6)
