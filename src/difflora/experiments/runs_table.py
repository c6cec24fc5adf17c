"""``difflora runs [DIR]``: one table of the runs under a directory, to compare them at a glance.

Every directory under DIR that holds a ``config.json`` is a run (study and sweep outputs nest them
as ``<arm>/seed<k>/``; the search does not descend into a run). Each run gives one row, and a
multi-task run one more row per task scored with ``difflora eval --task K`` (``eval-taskK/``),
named ``RUN (task K)``, with that task's scores beside the run's training columns:

    run            its path relative to DIR
    step           the last logged step (of ``train.steps``)
    loss           the last logged training loss (``metrics.jsonl``)
    fd, kid, acc   FD, KID and class accuracy of the run's evaluation (``eval/``), one column per
                   setting, always named by it: ``fd@w2`` (guidance 2), ``fd@w2,f0.5`` (selective
                   guidance on half the steps), and ``,20st`` / ``,n500`` when the listed evaluations
                   differ in sampling steps / sample count (scores at other settings are other columns)
    teacher.*      the same of the guided teacher of a distilled run (``difflora eval --teacher``)
    train img/s    training throughput (``accounting.json``; else the mean of the logged rows)
    sample img/s   sampling throughput of the evaluation
    trainable      trainable parameters
    <config keys>  only the dotted config keys whose values differ between the runs; the adapters
                   as ``name:form:condition:rank`` each

Each score keeps its 95% bootstrap interval (the one the reports print,
:func:`difflora.eval.uncertainty.reported_interval`), which :func:`plot_metric` draws. The config
differences are taken from the JSON each run recorded (not re-validated), so runs of older versions
whose configs lack a key still list: the missing key shows as "-". The table reads in a terminal
(:func:`format_table`: columns wrapped into blocks of at most :data:`WIDTH` characters, each
repeating the run) and as CSV (:func:`write_csv`, :func:`csv_text`).
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

from difflora.eval.target import default_eval_dir
from difflora.eval.uncertainty import interval_kind, reported_interval
from difflora.files.atomic import write_bytes
from difflora.files.images import agg_figure
from difflora.files.jsonfile import read_json_file
from difflora.train.run_dir import read_metrics

__all__ = [
    "WIDTH",
    "collect_runs",
    "csv_text",
    "find_runs",
    "format_table",
    "plot_metric",
    "run_row",
    "runs_table",
    "write_csv",
]

# Columns measured from a run's records, in the order they are shown (config keys follow).
MEASURED = ("run", "step", "loss", "train img/s", "sample img/s", "trainable")
_DIGITS = {"loss": 4, "fd": 3, "kid": 4, "acc": 3, "train img/s": 1, "sample img/s": 1}
# The scores of an evaluation shown per setting: (column stem, key in a result entry).
_SCORES = (("fd", "fd"), ("kid", "kid_mean"), ("acc", "class_accuracy"))
# Settings every listed evaluation may share, named in a column only when they do not (column tag, settings key).
_VARYING = (("st", "steps"), ("n", "num_samples"))
# The terminal table's width: wider tables are printed as blocks of columns, each repeating the run.
WIDTH = 160
# Where a row keeps each score column's interval (not a column).
_CI = "_ci"


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


def _adapters(value: Any) -> Any:
    """A config's adapter list as ``name:form:condition:rank`` entries (comma-separated; "none": no adapter)."""
    if not isinstance(value, list) or not all(isinstance(a, dict) for a in value):
        return value
    parts = [":".join(str(a.get(k, "?")) for k in ("name", "form", "condition", "rank")) for a in value]
    return ",".join(parts) or "none"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping; lists stay whole (shown as compact JSON), adapters summarised."""
    if not isinstance(tree, dict):
        return {prefix: _adapters(tree) if prefix == "model.adapters" else tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return read_json_file(path, fix="repair or delete it to list this run", expect=dict)


def _scores(record: dict[str, Any] | None, prefix: str = "") -> list[dict[str, Any]]:
    """Each score of an evaluation's ``metrics.json`` with its settings and reported interval."""
    settings = (record or {}).get("settings") or {}
    found = []
    for r in (record or {}).get("results") or []:
        for stem, key in _SCORES:
            if key not in r:
                continue
            ci = (r.get("ci") or {}).get(key)
            found.append(
                {
                    "stem": prefix + stem,
                    "guidance": r.get("guidance", 1.0),
                    "fraction": settings.get("guidance_fraction", 1.0),
                    **{k: settings.get(k) for _, k in _VARYING},
                    "value": r[key],
                    "ci": reported_interval(key, r[key], ci) if ci else None,
                    "kind": interval_kind(key),
                }
            )
    return found


def _evaluations(run_dir: Path) -> tuple[list[dict[str, Any]], float | None]:
    """(the scores of the run's evaluation and of its teacher's, the evaluation's sampling speed)."""
    record = _read_json(default_eval_dir(run_dir) / "metrics.json")
    teacher = _read_json(default_eval_dir(run_dir, teacher=True) / "metrics.json")
    return _scores(record) + _scores(teacher, "teacher."), _sample_speed(record)


def _sample_speed(record: dict[str, Any] | None) -> float | None:
    """The sampling speed of an evaluation (its first scale's), or None."""
    return (((record or {}).get("results") or [{}])[0]).get("sample_images_per_s")


def _label(score: dict[str, Any], varying: set[str]) -> str:
    """The column of a score: its stem and guidance scale, then the settings that tell it apart."""
    label = f"{score['stem']}@w{score['guidance']:g}"
    if score["fraction"] not in (None, 1.0):
        label += f",f{score['fraction']:g}"
    shown = [(tag, score[key]) for tag, key in _VARYING if key in varying and score[key] is not None]
    tags = [f"{value}{tag}" if tag == "st" else f"{tag}{value}" for tag, value in shown]
    return ",".join([label, *tags])


def _task_evals(run_dir: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(K, record)`` of each ``eval-taskK/metrics.json`` of a multi-task run (``difflora eval --task K``)."""
    found = []
    for path in run_dir.glob("eval-task*/metrics.json"):
        task = path.parent.name.removeprefix("eval-task")
        if task.isdigit() and (record := _read_json(path)) is not None:
            found.append((int(task), record))
    return sorted(found, key=lambda item: item[0])


def run_row(run_dir: Path, log: Callable[[str], None] = print) -> tuple[dict[str, Any], dict[str, Any]]:
    """(measured columns, flattened config) of one run directory; its scores are under ``"scores"``
    (see :func:`_scores`), made columns by :func:`runs_table`."""
    config = _read_json(run_dir / "config.json") or {}
    rows = read_metrics(run_dir / "metrics.jsonl", log)
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), int | float)]
    accounting = _read_json(run_dir / "accounting.json") or {}
    speed = accounting.get("train_images_per_s")
    if not isinstance(speed, int | float) or math.isnan(speed):
        logged = [r["images_per_s"] for r in rows if isinstance(r.get("images_per_s"), int | float)]
        speed = sum(logged) / len(logged) if logged else None
    scores, sample_speed = _evaluations(run_dir)
    row: dict[str, Any] = {
        "step": rows[-1]["step"] if rows else None,
        "loss": losses[-1] if losses else None,
        "train img/s": speed,
        "sample img/s": sample_speed,
        "trainable": (accounting.get("parameters") or {}).get("trainable"),
        "scores": scores,
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
    A row also holds each score column's 95% interval under ``"_ci"`` (not a column).
    """
    root = Path(root)
    runs = collect_runs(root, log)
    if not runs:
        raise FileNotFoundError(f"no runs under {root} (a run directory holds config.json)")
    diff = _differing([config for _, _, config in runs])
    rows: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for run_dir, measured, config in runs:
        name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
        trained = {"run": name, **{k: v for k, v in measured.items() if k != "scores"}}
        rows.append((trained | {k: config.get(k) for k in diff}, measured["scores"]))
        for task, record in _task_evals(run_dir):
            task_row = trained | {"run": f"{name} (task {task})", "sample img/s": _sample_speed(record)}
            rows.append((task_row | {k: config.get(k) for k in diff}, _scores(record)))
    table = _score_columns(rows)
    evals = sorted({k for r in table for k in r[_CI]}, key=_metric_order)
    columns = ["run", "step", "loss", *evals, *MEASURED[3:], *diff]
    columns = [c for c in columns if c == "run" or c in diff or any(r.get(c) is not None for r in table)]
    if sort is not None:
        key = _column(sort, "--sort", columns, ("a column", "columns"))
        table.sort(key=lambda r: (r.get(key) is None, _sort_key(r.get(key))))
    return columns, table


def _column(name: str, flag: str, choices: list[str], what: tuple[str, str]) -> str:
    """The column of ``choices`` that ``name`` names: itself, or the one column it names without its
    trailing settings (``fd@w2`` for ``fd@w2,20st`` when the table holds no other ``fd@w2,...``).
    ``what``: (what a choice is, what the list of them is called) for the error."""
    if name in choices:
        return name
    found = [c for c in choices if c.startswith(f"{name},")]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{flag} {name!r} names several columns ({', '.join(found)}); give one of them")
    raise ValueError(f"{flag} {name!r}: not {what[0]} of this table; {what[1]}: {', '.join(choices)}")


def _score_columns(rows: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Each row with its scores as columns named by their settings (:func:`_label`), intervals under ``"_ci"``."""
    every = [s for _, scores in rows for s in scores]
    varying = {key for _, key in _VARYING if len({s[key] for s in every} - {None}) > 1}
    out = []
    for row, scores in rows:
        row = row | {_CI: {}}
        for score in scores:
            label = _label(score, varying)
            row[label] = score["value"]
            row[_CI][label] = (score["ci"], score["kind"])
        out.append(row)
    return out


def _metric_order(name: str) -> tuple[bool, int, float, tuple[tuple[str, float], ...]]:
    """Run's scores before the teacher's, then by score, guidance scale and the other settings (by
    value: ``5st`` before ``10st``)."""
    metric, _, rest = name.partition("@w")
    scale, _, tags = rest.partition(",")
    stem = metric.removeprefix("teacher.")
    settings = tuple((t.strip("0123456789."), float(t.strip("fnst"))) for t in tags.split(",") if t)
    return metric != stem, [s for s, _ in _SCORES].index(stem), float(scale), settings


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int | float) else (1, json.dumps(value, default=str))


def _cell(column: str, value: Any) -> str:
    """A value as the terminal shows it: rounded numbers, compact JSON for lists, "-" when absent."""
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        digits = _DIGITS.get(column.partition("@")[0].removeprefix("teacher."))
        if digits is None:  # a config value: as written (2e-4, 0.999)
            return f"{value:g}"
        return f"{value:.{digits}f}" if abs(value) >= 10 ** (-digits) or value == 0 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}" if column == "trainable" else str(value)
    return json.dumps(value, separators=(",", ":"), default=str)


def format_table(columns: list[str], rows: list[dict[str, Any]], width: int = WIDTH) -> str:
    """The table as aligned text: text columns left-aligned, numbers right-aligned. A table wider
    than ``width`` is printed as blocks of columns (each starting with the run) that fit in it."""
    cells = {c: [_cell(c, r.get(c)) for r in rows] for c in columns}
    widths = {c: max([len(c)] + [len(v) for v in cells[c]]) for c in columns}
    numeric = {c: all(isinstance(r.get(c), int | float) or r.get(c) is None for r in rows) for c in columns}

    def line(block: list[str], values: list[str]) -> str:
        parts = [v.rjust(widths[c]) if numeric[c] else v.ljust(widths[c]) for c, v in zip(block, values, strict=True)]
        return "  ".join(parts).rstrip()

    blocks: list[list[str]] = [columns[:1]]
    for c in columns[1:]:
        if len(blocks[-1]) > 1 and sum(widths[b] + 2 for b in blocks[-1]) + widths[c] > width:
            blocks.append(columns[:1])
        blocks[-1].append(c)
    text = []
    for block in blocks:
        text += [line(block, block), line(block, ["-" * widths[c] for c in block])]
        text += [line(block, [cells[c][i] for c in block]) for i in range(len(rows))]
        text.append("")
    return "\n".join(text[:-1])


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


def plot_metric(columns: list[str], rows: list[dict[str, Any]], metric: str | None, path: str | Path) -> Path:
    """One PNG of score column ``metric`` across the runs (in the table's order) with each run's 95%
    bootstrap interval (the one reports print); ``metric`` None: the first FD column. Needs matplotlib
    (the ``plots`` extra: a one-line error without it)."""
    scored = [c for c in columns if any(c in r[_CI] for r in rows)]
    if not scored:
        raise ValueError("--plot: no run under this directory was evaluated (difflora eval RUN scores one)")
    if metric is None:
        metric = next((c for c in scored if c.startswith("fd@")), scored[0])
    metric = _column(metric, "--metric", scored, ("a score column", "scores"))
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--plot {path}: the directory {path.parent} does not exist")
    shown = [r for r in rows if r.get(metric) is not None]
    fig = agg_figure((7.0, 1.2 + 0.35 * len(shown)), "difflora runs --plot")
    ax = fig.add_subplot()
    kinds = set()
    for i, r in enumerate(shown):
        ci, kind = r[_CI][metric]
        if ci is not None:
            kinds.add(kind)
            ax.plot(ci, [i, i], color="tab:blue", linewidth=2)
        ax.plot([r[metric]], [i], "o", color="black")
    ax.set_yticks(range(len(shown)), [r["run"] for r in shown], fontsize=8)
    ax.invert_yaxis()  # the table's first row on top
    intervals = f"95% {' / '.join(sorted(kinds))} bootstrap interval" if kinds else "no interval recorded"
    ax.set_xlabel(f"{metric} (dot: estimate; line: {intervals})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return write_bytes(path, buf.getvalue())
