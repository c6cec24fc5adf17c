"""``difflora runs [DIR]``: one table of the runs under a directory, to compare them at a glance.

Every directory under DIR that holds a ``config.json`` is a run (study and sweep outputs nest them
as ``<arm>/seed<k>/``; the search does not descend into a run). Each run gives one row, and a
multi-task run one more row per task scored with ``difflora eval --task K`` (``eval-taskK/``),
named ``RUN (task K)``, with that task's scores beside the run's training columns:

    run            its path relative to DIR
    step           the last logged step (of ``train.steps``)
    loss           the last logged training loss (``metrics.jsonl``)
    fd, kid        from ``eval/metrics.json`` when the run was evaluated (``fd``, ``kid_mean``): one
                   column per guidance scale when a run was scored at several (``fd@w2``)
    train img/s    training throughput (``accounting.json``; else the mean of the logged rows)
    sample img/s   sampling throughput of the evaluation
    trainable      trainable parameters
    <config keys>  only the dotted config keys whose values differ between the runs

The config differences are taken from the JSON each run recorded (not re-validated), so runs of
older versions whose configs lack a key still list: the missing key shows as "-". The table reads
in a terminal (:func:`format_table`) and as CSV (:func:`write_csv`, :func:`csv_text`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from difflora.files.atomic import write_bytes
from difflora.files.jsonfile import read_json_file
from difflora.train.run_dir import read_metrics

__all__ = ["collect_runs", "csv_text", "find_runs", "format_table", "run_row", "runs_table", "write_csv"]

# Columns measured from a run's records, in the order they are shown (config keys follow).
MEASURED = ("run", "step", "loss", "train img/s", "sample img/s", "trainable")
_DIGITS = {"loss": 4, "fd": 3, "kid": 4, "train img/s": 1, "sample img/s": 1}


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory (one holding ``config.json``) at or under ``root``, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a directory (difflora runs DIR lists the runs under DIR; default runs/)"
        )
    found = []
    for here, dirs, files in os.walk(root):
        if "config.json" in files:
            found.append(Path(here))
            dirs.clear()  # a run's subdirectories (checkpoints, eval, samples) hold no runs
        dirs.sort()
    return sorted(found)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping; lists stay whole (shown as compact JSON)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return read_json_file(path, fix="repair or delete it to list this run", expect=dict)


def _eval_columns(record: dict[str, Any] | None) -> dict[str, Any]:
    """FD and KID per guidance scale (plain ``fd`` when the run was scored at one scale)."""
    results = (record or {}).get("results") or []
    row: dict[str, Any] = {}
    for r in results:
        suffix = "" if len(results) == 1 else f"@w{r.get('guidance', 1.0):g}"
        for column, key in (("fd", "fd"), ("kid", "kid_mean")):
            if key in r:
                row[column + suffix] = r[key]
    if results and "sample_images_per_s" in results[0]:
        row["sample img/s"] = results[0]["sample_images_per_s"]
    return row


def _task_evals(run_dir: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(K, record)`` of each ``eval-taskK/metrics.json`` of a multi-task run (``difflora eval --task K``)."""
    found = []
    for path in run_dir.glob("eval-task*/metrics.json"):
        task = path.parent.name.removeprefix("eval-task")
        if task.isdigit() and (record := _read_json(path)) is not None:
            found.append((int(task), record))
    return sorted(found, key=lambda item: item[0])


def run_row(run_dir: Path, log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Any]]:
    """(measured columns, flattened config) of one run directory."""
    config = _read_json(run_dir / "config.json") or {}
    rows = read_metrics(run_dir / "metrics.jsonl", log)
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), int | float)]
    accounting = _read_json(run_dir / "accounting.json") or {}
    speed = accounting.get("train_images_per_s")
    if not isinstance(speed, int | float) or math.isnan(speed):
        logged = [r["images_per_s"] for r in rows if isinstance(r.get("images_per_s"), int | float)]
        speed = sum(logged) / len(logged) if logged else None
    row: dict[str, Any] = {
        "step": rows[-1]["step"] if rows else None,
        "loss": losses[-1] if losses else None,
        "train img/s": speed,
        "trainable": (accounting.get("parameters") or {}).get("trainable"),
        **_eval_columns(_read_json(run_dir / "eval" / "metrics.json")),
    }
    return row, _flatten(config)


def _differing(configs: list[dict[str, Any]]) -> list[str]:
    """The config keys whose values are not the same in every run (a missing key is a value)."""
    keys = sorted({k for c in configs for k in c})
    missing = object()
    return [k for k in keys if len({json.dumps(c.get(k, missing), default=str) for c in configs}) > 1]


def collect_runs(root: str | Path, log: Callable[[str], None] = print) -> list[tuple[Path, dict, dict]]:
    """(run directory, measured columns, flattened config) of every run under ``root``."""
    root = Path(root)
    return [(d, *run_row(d, log)) for d in find_runs(root)]


def runs_table(
    root: str | Path, sort: str | None = None, log: Callable[[str], None] = print
) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the runs under ``root``: measured columns, then the differing config keys.

    ``sort``: a column to sort by (ascending; rows without a value last). Default: by run path.
    """
    root = Path(root)
    runs = collect_runs(root, log)
    if not runs:
        raise FileNotFoundError(f"no runs under {root} (a run directory holds config.json)")
    diff = _differing([config for _, _, config in runs])
    rows = []
    for run_dir, measured, config in runs:
        name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
        rows.append({"run": name, **measured, **{k: config.get(k) for k in diff}})
        trained = {k: v for k, v in rows[-1].items() if not k.startswith(("fd", "kid", "sample img/s"))}
        for task, record in _task_evals(run_dir):
            rows.append(trained | {"run": f"{name} (task {task})", **_eval_columns(record)})
    evals = sorted({k for r in rows for k in r if k.startswith(("fd", "kid"))}, key=_metric_order)
    columns = ["run", "step", "loss", *evals, *MEASURED[3:], *diff]
    columns = [c for c in columns if c == "run" or c in diff or any(r.get(c) is not None for r in rows)]
    if sort is not None:
        if sort not in columns:
            raise ValueError(f"--sort {sort!r}: not a column of this table; columns: {', '.join(columns)}")
        rows.sort(key=lambda r: (r.get(sort) is None, _sort_key(r.get(sort))))
    return columns, rows


def _metric_order(name: str) -> tuple[str, float]:
    metric, _, scale = name.partition("@w")
    return metric, float(scale) if scale else 0.0


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int | float) else (1, json.dumps(value, default=str))


def _cell(column: str, value: Any) -> str:
    """A value as the terminal shows it: rounded numbers, compact JSON for lists, "-" when absent."""
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        digits = _DIGITS.get(column.partition("@")[0])
        if digits is None:  # a config value: as written (2e-4, 0.999)
            return f"{value:g}"
        return f"{value:.{digits}f}" if abs(value) >= 10 ** (-digits) or value == 0 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}" if column == "trainable" else str(value)
    return json.dumps(value, separators=(",", ":"), default=str)


def format_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """The table as aligned text: text columns left-aligned, numbers right-aligned."""
    cells = [[_cell(c, r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) for c in columns]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """The table as CSV: full-precision numbers, lists as JSON, empty cells where a run has no value."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        values = [r.get(c) for c in columns]
        writer.writerow(["" if v is None else json.dumps(v) if isinstance(v, list | dict) else v for v in values])
    return buf.getvalue()


def write_csv(columns: list[str], rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the CSV atomically (a temp file renamed over ``path``: never a half-written table)."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise FileNotFoundError(f"--csv {path}: the directory {path.parent} does not exist")
    return write_bytes(path, csv_text(columns, rows))
