"""Fault catalogue, issue 32 items 2 and 3: bad ``difflora study --set`` overrides, ``difflora
presets`` misuse (an unknown preset, a copy that would overwrite), and ``difflora runs --plot``
that cannot draw (nothing scored, an unknown score, matplotlib missing)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from faultkit import Fault, cases, check_fault, write_tmp

STUDY = b"name: s\nbase: {data: {name: digits}}\narms: [{name: a}]\n"
STUDY_ARGS = ("study", "{tmp}/s.yaml", "--plan")
# A run directory holding a scored evaluation (the fields `difflora runs` reads).
SCORED = {
    "settings": {"num_samples": 8, "steps": 2, "guidance_fraction": 1.0},
    "results": [{"guidance": 1.0, "fd": 5.0, "kid_mean": 0.01, "ci": {"fd": [6.0, 9.0]}}],
}


def scored_run(run: Path, tmp: Path) -> None:
    (tmp / "r" / "eval").mkdir(parents=True)
    (tmp / "r" / "config.json").write_text("{}")
    (tmp / "r" / "eval" / "metrics.json").write_text(json.dumps(SCORED))


def study_with(*extra: str) -> dict[str, tuple[str, ...] | Callable[[Path, Path], None]]:
    """The argv and damage of a ``difflora study --plan`` of a one-arm study with ``extra`` flags."""
    return {"argv": (*STUDY_ARGS, *extra), "damage": write_tmp("s.yaml", STUDY)}


FAULTS = [
    Fault(
        "study-set-train-seed",
        **study_with("--set", "train.seed=3"),
        error=r"--set train\.seed: each run's seed is one of the study's seeds; give --set seeds=",
    ),
    Fault("study-set-out", **study_with("--set", "out=x"), error=r"--set out: give --out instead"),
    Fault("study-set-report-dir", **study_with("--set", "report_dir=x"), error=r"give --report-dir instead"),
    Fault(
        "study-set-unknown-section",
        **study_with("--set", "trian.steps=3"),
        error=r"--set trian\.steps: not a config key \(sections data, model, .*\) nor a study key",
    ),
    Fault("study-set-no-value", **study_with("--set", "train.steps"), error=r"--set: override 'train\.steps' is not"),
    Fault("study-set-bad-config-key", **study_with("--set", "train.stpes=3"), error=r"arm 'a': .*stpes"),
    Fault("study-set-bad-study-value", **study_with("--set", "seeds=[0, 0]"), error=r"seeds: duplicates"),
    Fault("presets-copy-unknown", ("presets", "copy", "nope"), error=r"'nope' is not a shipped preset"),
    Fault("presets-copy-no-name", ("presets", "copy"), error=r"name a preset"),
    Fault("presets-list-extra", ("presets", "list", "digits"), error=r"to copy one: difflora presets copy NAME"),
    Fault(
        "presets-copy-over-a-file",
        ("presets", "copy", "digits", "{tmp}/mine.yaml"),
        error=r"mine\.yaml exists; difflora never overwrites it",
        damage=write_tmp("mine.yaml", b"my edits\n"),
    ),
    Fault(
        "presets-copy-missing-dir",
        ("presets", "copy", "digits", "{tmp}/no/such/x.yaml"),
        error=r"the directory .*no/such does not exist",
    ),
    Fault("runs-metric-without-plot", ("runs", "{run}", "--metric", "fd@w1"), error=r"--metric does not apply here"),
    Fault(
        "runs-plot-nothing-scored",
        ("runs", "{run}", "--plot", "{tmp}/p.png"),
        error=r"--plot: no run under this directory was evaluated",
    ),
    Fault(
        "runs-plot-unknown-score",
        ("runs", "{tmp}/r", "--plot", "{tmp}/p.png", "--metric", "loss"),
        error=r"--metric 'loss': not a score column of this table; scores: fd@w1, kid@w1",
        damage=scored_run,
    ),
    Fault(
        "runs-plot-missing-dir",
        ("runs", "{tmp}/r", "--plot", "{tmp}/no/p.png"),
        error=r"--plot .*p\.png: the directory .*no does not exist",
        damage=scored_run,
    ),
    Fault(
        "runs-plot-without-matplotlib",
        ("runs", "{tmp}/r", "--plot", "{tmp}/p.png"),
        error=r"difflora runs --plot needs matplotlib, which is not installed: pip install 'difflora\[plots\]'",
        damage=scored_run,
        hidden=("matplotlib",),
    ),
]


@pytest.mark.parametrize("fault", cases(FAULTS))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
