"""``difflora runs``: the table of two real tiny runs (one evaluated) against their own record files."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from difflora.cli.commands import main
from difflora.eval import FeatureTrainConfig
from difflora.eval.evaluate import EvalSettings, evaluate_run
from difflora.experiments.runs_table import csv_text, format_table, runs_table
from difflora.train import train

SHORT = ["train.steps=2", "train.ckpt_every=2", "train.log_every=1", "sample.num=2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_config) -> Path:
    """runs/a (lr 1e-3, seed 0) and runs/study/arm/seed1 (lr 5e-4, seed 1, evaluated at w = 1 and 2)."""
    root = tmp_path_factory.mktemp("runs")
    quiet = lambda _m: None  # noqa: E731
    train(tiny_config("tiny-unet", *SHORT), root / "a", progress=False, log=quiet)
    b = root / "study" / "arm" / "seed1"
    cfg = tiny_config("tiny-unet", *SHORT, "train.lr=5e-4", "train.seed=1")
    train(cfg, b, progress=False, log=quiet)
    tiny_features = FeatureTrainConfig(epochs=1, batch_size=64, max_steps=3, seed=0)
    evaluate_run(
        b,
        EvalSettings(num_samples=8, steps=2, guidance=[1, 2], bootstrap=0, floor_draws=2),
        cache_dir=tmp_path_factory.mktemp("cache"),
        feature_train=tiny_features,
    )
    return root


def _last_loss(run: Path) -> float:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["loss"]


def test_rows_hold_each_runs_records_and_only_the_differing_config_keys(root):
    columns, rows = runs_table(root)
    assert [r["run"] for r in rows] == ["a", "study/arm/seed1"]
    assert columns[-2:] == ["train.lr", "train.seed"]  # the two overrides, nothing else differs
    a, b = rows
    assert (a["train.lr"], a["train.seed"], b["train.lr"], b["train.seed"]) == (1e-3, 0, 5e-4, 1)
    run_b = root / "study" / "arm" / "seed1"
    assert a["loss"] == _last_loss(root / "a") and b["loss"] == _last_loss(run_b)
    assert a["step"] == b["step"] == 2
    results = json.loads((run_b / "eval" / "metrics.json").read_text())["results"]
    assert [b["fd@w1"], b["fd@w2"], b["kid@w1"], b["kid@w2"]] == [
        results[0]["fd"],
        results[1]["fd"],
        results[0]["kid_mean"],
        results[1]["kid_mean"],
    ]
    assert a.get("fd@w1") is None and "sample img/s" in b and a.get("sample img/s") is None  # a was not evaluated
    accounting = json.loads((root / "a" / "accounting.json").read_text())
    assert a["train img/s"] == accounting["train_images_per_s"]
    assert a["trainable"] == accounting["parameters"]["trainable"]


def test_terminal_table_csv_and_sort_through_the_cli(root, tmp_path, capsys):
    assert main(["runs", str(root), "--sort", "fd@w2", "--csv", str(tmp_path / "runs.csv")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "step", "loss"] and set(lines[1]) <= {"-", " "}
    assert lines[2].startswith("study/arm/seed1") and lines[3].startswith("a ")  # evaluated first, missing last
    assert " - " in lines[3]  # no FD for the run that was not evaluated
    parsed = list(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))
    columns, rows = runs_table(root, sort="fd@w2")
    assert list(parsed[0]) == columns
    assert [float(p["loss"]) for p in parsed] == [r["loss"] for r in rows]  # full precision
    assert parsed[1]["fd@w2"] == ""
    assert main(["runs", str(root), "--format", "csv"]) == 0
    assert capsys.readouterr().out == csv_text(*runs_table(root))


def test_a_run_recorded_before_a_key_existed_lists_it_as_missing(root, tmp_path):
    shutil.copytree(root / "a", tmp_path / "old")
    shutil.copytree(root / "a", tmp_path / "new")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["train"]["ema_decay"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    columns, rows = runs_table(tmp_path)
    assert columns[-1] == "train.ema_decay" and rows[1]["train.ema_decay"] is None
    assert format_table(columns, rows).splitlines()[3].rstrip().endswith("-")


def test_bad_input_is_one_line(root, tmp_path, capsys):
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["runs", str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert main(["runs", str(root), "--sort", "nope"]) == 2
    assert "not a column" in capsys.readouterr().err
    shutil.copytree(root / "a", tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert main(["runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json is not valid JSON" in err and len(err.splitlines()) == 1


def test_a_multi_task_run_gets_one_row_per_task_it_was_scored_on(root, tmp_path):
    copy = tmp_path / "runs"
    shutil.copytree(root, copy)
    for task, fd in ((1, 12.5), (0, 7.25)):  # written out of order: rows follow the task ids
        record = {"results": [{"guidance": 0.0, "fd": fd, "kid_mean": fd / 1000, "sample_images_per_s": 3.0}]}
        (copy / "a" / f"eval-task{task}").mkdir()
        (copy / "a" / f"eval-task{task}" / "metrics.json").write_text(json.dumps(record))
    (copy / "a" / "eval-taskx").mkdir()  # not a task evaluation: ignored
    columns, rows = runs_table(copy)
    assert [r["run"] for r in rows] == ["a", "a (task 0)", "a (task 1)", "study/arm/seed1"]
    a, t0, t1 = rows[:3]
    assert (t0["fd@w0"], t1["fd@w0"], t1["kid@w0"], t1["sample img/s"]) == (7.25, 12.5, 0.0125, 3.0)
    assert a.get("fd@w0") is None and "fd@w0" in columns  # named by its scale (issue 32)
    for t in (t0, t1):  # the run's training columns and config, repeated
        assert (t["loss"], t["step"], t["train.lr"], t["trainable"]) == (
            a["loss"],
            a["step"],
            a["train.lr"],
            a["trainable"],
        )


def _metrics(scores: dict[str, float], w: float, ci: dict[str, list[float]], **settings) -> dict:
    """A metrics.json as ``difflora eval`` writes it (one scale), with the settings that name its columns."""
    entry = {"guidance": w, **scores, "ci": ci, "sample_images_per_s": 2.0}
    base = {"num_samples": 8, "steps": 2, "guidance_fraction": 1.0}
    return {"settings": base | settings, "results": [entry]}


def _mixed(root: Path, tmp_path: Path) -> Path:
    """The two runs plus a distilled student (scored at its w = 3, its teacher with selective
    guidance) and a TimeLoRA run scored with 5 sampling steps instead of 2."""
    copy = tmp_path / "mixed"
    shutil.copytree(root, copy)
    student, timelora = copy / "student", copy / "timelora"
    for run, adapters in (
        (student, [{"name": "distill", "form": "lowrank", "condition": "distill", "rank": 8}]),
        (timelora, [{"name": "time", "form": "lowrank", "condition": "t", "rank": 4}]),
    ):
        shutil.copytree(root / "a", run)
        config = json.loads((run / "config.json").read_text())
        config["model"]["adapters"] = adapters
        (run / "config.json").write_text(json.dumps(config))
    scores = {"fd": 10.0, "kid_mean": 0.01, "class_accuracy": 0.5}
    ci = {"fd": [12.0, 20.0], "kid_mean": [0.005, 0.02], "class_accuracy": [0.4, 0.6]}
    for path, record in (
        (student / "eval", _metrics(scores, 3.0, ci)),
        (student / "eval-teacher", _metrics(scores | {"fd": 9.0}, 3.0, ci, guidance_fraction=0.5)),
        (timelora / "eval", _metrics(scores | {"fd": 11.0}, 1.0, ci, steps=5)),
    ):
        path.mkdir()
        (path / "metrics.json").write_text(json.dumps(record))
    return copy


def test_mixed_runs_name_every_score_by_its_settings(root, tmp_path):
    columns, rows = runs_table(_mixed(root, tmp_path), sort="fd@w3,2st")
    assert [r["run"] for r in rows] == ["student", "a", "study/arm/seed1", "timelora"]
    student, a, study, timelora = rows
    # The evaluations differ in steps (2 and 5), so every score column names its steps; one scale is @w too.
    results = json.loads((root / "study" / "arm" / "seed1" / "eval" / "metrics.json").read_text())["results"]
    assert (study["fd@w1,2st"], study["fd@w2,2st"]) == (results[0]["fd"], results[1]["fd"])
    assert timelora["fd@w1,5st"] == 11.0 and timelora.get("fd@w1,2st") is None
    assert (student["fd@w3,2st"], student["acc@w3,2st"], student["teacher.fd@w3,f0.5,2st"]) == (10.0, 0.5, 9.0)
    assert student["teacher.acc@w3,f0.5,2st"] == 0.5 and student["teacher.kid@w3,f0.5,2st"] == 0.01
    assert columns.index("acc@w3,2st") < columns.index("teacher.fd@w3,f0.5,2st")  # the run's, then its teacher's
    # Adapters as name:form:condition:rank, only the keys that differ.
    assert (student["model.adapters"], timelora["model.adapters"], a["model.adapters"]) == (
        "distill:lowrank:distill:8",
        "time:lowrank:t:4",
        "none",
    )
    assert "train.steps" not in columns
    # A column named without its trailing settings, when that names one column.
    assert [r["run"] for r in runs_table(_mixed(root, tmp_path / "again"), sort="fd@w2")[1]][0] == "study/arm/seed1"
    with pytest.raises(ValueError, match=r"--sort 'fd@w1' names several columns \(fd@w1,2st, fd@w1,5st\)"):
        runs_table(_mixed(root, tmp_path / "twice"), sort="fd@w1")
    # The intervals the reports print: FD basic, 2 x 10 - [20, 12] = [0, 8]; the others percentile.
    assert student["_ci"]["fd@w3,2st"] == ((0.0, 8.0), "basic")
    assert student["_ci"]["acc@w3,2st"] == ((0.4, 0.6), "percentile")


def test_a_wide_table_prints_as_blocks_that_each_start_with_the_run(root, tmp_path):
    columns, rows = runs_table(_mixed(root, tmp_path))
    text = format_table(columns, rows, width=100)
    blocks = text.split("\n\n")
    assert len(blocks) > 1 and all(len(line) <= 100 for line in text.splitlines())
    assert all(b.splitlines()[0].startswith("run ") and len(b.splitlines()) == 2 + len(rows) for b in blocks)
    headers = [b.splitlines()[0] for b in blocks]
    for c in columns[1:]:  # every column in exactly one block
        assert sum(bool(re.search(rf"(?<!\S){re.escape(c)}(?!\S)", h)) for h in headers) == 1, c


def test_plot_draws_a_score_across_runs_and_names_a_missing_matplotlib(root, tmp_path, capsys, monkeypatch):
    mixed = _mixed(root, tmp_path)
    out = tmp_path / "fd.png"
    assert main(["runs", str(mixed), "--plot", str(out), "--metric", "teacher.fd@w3,f0.5,2st"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["runs", str(mixed), "--metric", "fd@w1,2st"]) == 2
    assert "--metric does not apply" in capsys.readouterr().err
    assert main(["runs", str(mixed), "--plot", str(out), "--metric", "loss"]) == 2
    err = capsys.readouterr()
    assert "not a score column" in err.err and err.out == ""  # refused before the table is printed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert main(["runs", str(mixed), "--plot", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'difflora[plots]'" in err[0] and not (tmp_path / "none.png").exists()
