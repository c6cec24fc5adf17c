"""``difflora runs``: the table of two real tiny runs (one evaluated) against their own record files."""

from __future__ import annotations

import csv
import io
import json
import shutil
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
    assert (t0["fd"], t1["fd"], t1["kid"], t1["sample img/s"]) == (7.25, 12.5, 0.0125, 3.0)
    assert a.get("fd") is None and "fd" in columns
    for t in (t0, t1):  # the run's training columns and config, repeated
        assert (t["loss"], t["step"], t["train.lr"], t["trainable"]) == (
            a["loss"],
            a["step"],
            a["train.lr"],
            a["trainable"],
        )
