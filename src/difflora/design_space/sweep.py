"""Sweeps: a factorial design over named factors, every cell x seed trained and evaluated, one results table.

A sweep YAML (typed below; an unknown key is an error naming the valid ones)::

    name: design-space
    out: runs/design-space          # default output directory (--out overrides)
    base: {data: ..., model: {adapters: [{name: pa, form: position, ...}]}, ...}
    seeds: [0, 1]                          # train.seed of each run
    eval: {num_samples: 500, steps: 50}    # as a study's eval block (difflora.experiments.study.StudyEval)
    factors:                               # each factor: level name -> dotted overrides of base
      input:
        attn2_out: {model.adapters.0.source: attn2_out}
        ff_in: {model.adapters.0.source: ff_in}
      form:
        linear: {model.adapters.0.activation: identity}
        relu: {model.adapters.0.activation: relu}
      width: {key: model.adapters.0.rank, levels: [4, 16]}   # shorthand: one key, levels named by value
    design: full                           # or fractional, with generators:
    generators: {form: [input, width]}     # level(form) = (level(input) + level(width)) mod s
    skip_invalid: true                     # cells whose model cannot be built are skipped and listed

Overrides reach inside the adapter list by index (``model.adapters.0.source``). A *full* design
runs every combination of levels; a *fractional* one (a regular s-level fraction) runs every
combination of the basic factors and sets each generated factor's level index to the sum of its
generators' level indices modulo s, its number of levels (all s levels each: for s = 2 this is the
classic 2^(k-p) design, e.g. ``C = AB``; for s = 3 with two generators a Latin square), so each main
effect stays balanced and estimable with a fraction 1/s^p of the runs. A parent may have fewer
levels than s if another has exactly s (every generated level then appears equally often, but the
generated factor is only partly orthogonal to that parent: the ANOVA is type II, which allows it);
e.g. 5 input positions x 2 output positions with the form (5 levels) generated from both puts each
form at two (input, output) pairs: 10 cells instead of 50.

Every cell is an arm of a generated study (named ``factor.level+factor.level...``) run by the study
runner (``difflora.experiments.study``): runs go to ``<out>/<cell>/seed<k>/``, a finished run
(final checkpoint and metrics with these eval settings) is reused and a partial one resumed, so an
interrupted sweep continues where it stopped. ``<out>/results.csv`` and ``results.jsonl`` get one
row per run and guidance scale: every factor's level, the seed, the metrics, the parameter counts
and the training time.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from difflora.experiments.study import run_all
from difflora.experiments.study_spec import (
    Study,
    StudyArm,
    StudyError,
    StudyEval,
    arm_config,
    read_run_json,
    read_yaml_mapping,
)
from difflora.files.atomic import write_together
from difflora.model.build import build_model

__all__ = [
    "Cell",
    "Sweep",
    "SweepError",
    "load_sweep",
    "plan_sweep",
    "read_results",
    "run_sweep",
    "sweep_cells",
]

_LEVEL = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SweepError(StudyError):
    """A sweep YAML is invalid, or one of its cells cannot be run."""


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    out: str | None = None
    threads: int | None = Field(default=None, ge=1)
    base: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    eval: StudyEval = Field(default_factory=StudyEval)
    # factor -> {level name -> {dotted key: value}}, or the shorthand {key: dotted key, levels: [values]}.
    factors: dict[str, Any] = Field(min_length=1)
    design: Literal["full", "fractional"] = "full"
    generators: dict[str, list[str]] = Field(default_factory=dict)
    skip_invalid: bool = False

    @model_validator(mode="after")
    def _check(self) -> Sweep:
        self.factors = {name: _levels(name, spec) for name, spec in self.factors.items()}
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: duplicates in {self.seeds}")
        if (self.design == "fractional") != bool(self.generators):
            raise ValueError("generators: a fractional design needs generators, and only a fractional design has them")
        basic = [f for f in self.factors if f not in self.generators]
        for gen, parents in self.generators.items():
            unknown = [f for f in (gen, *parents) if f not in self.factors]
            if unknown:
                raise ValueError(f"generators: {unknown} are not factors; factors: {list(self.factors)}")
            if not parents or any(p not in basic for p in parents):
                raise ValueError(f"generators.{gen}: list one or more basic (not generated) factors, from {basic}")
            sizes = {f: len(self.factors[f]) for f in (gen, *parents)}
            s = sizes[gen]
            if max(sizes[p] for p in parents) != s:
                raise ValueError(
                    f"generators.{gen}: one parent needs as many levels as {gen} ({s}) and none more "
                    f"(so each level of {gen} appears equally often), got {sizes}"
                )
        return self


def _levels(name: str, spec: Any) -> dict[str, dict[str, Any]]:
    """A factor's {level name: {dotted key: value}} from either spelling (see the module docstring)."""
    if not name.isidentifier():
        raise ValueError(f"factors: factor name {name!r} must be an identifier (letters, digits, _)")
    if isinstance(spec, dict) and set(spec) == {"key", "levels"}:
        if not isinstance(spec["levels"], list) or not spec["levels"]:
            raise ValueError(f"factors.{name}.levels: a non-empty list of values")
        spec = {_level_name(v): {spec["key"]: v} for v in spec["levels"]}
    if not isinstance(spec, dict) or len(spec) < 2:
        raise ValueError(f"factors.{name}: at least two levels, each a mapping of dotted overrides (or key + levels)")
    for level, overrides in spec.items():
        if not re.match(_LEVEL, str(level)):
            raise ValueError(f"factors.{name}: level name {level!r} may hold letters, digits and _ . - only")
        if not isinstance(overrides, dict) or not overrides:
            raise ValueError(f"factors.{name}.{level}: a mapping of dotted config keys to values")
    return {str(k): dict(v) for k, v in spec.items()}


def _level_name(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


Cell = dict[str, str]  # factor -> level name, in the sweep's factor order


def sweep_cells(sweep: Sweep) -> list[Cell]:
    """The design's cells: every combination (full), or the basic factors' combinations with generated levels."""
    basic = [f for f in sweep.factors if f not in sweep.generators]
    names = {f: list(sweep.factors[f]) for f in sweep.factors}
    cells = []
    for combo in itertools.product(*(range(len(names[f])) for f in basic)):
        index = dict(zip(basic, combo, strict=True))
        for gen, parents in sweep.generators.items():
            index[gen] = sum(index[p] for p in parents) % len(names[gen])
        cells.append({f: names[f][index[f]] for f in sweep.factors})
    return cells


def cell_name(cell: Cell) -> str:
    """The cell's directory (and arm) name: ``factor.level+factor.level...``."""
    return "+".join(f"{f}.{level}" for f, level in cell.items())


def _set_path(tree: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    parts, node = dotted.split("."), tree
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise SweepError(f"{where}: {dotted}: '{p}' is not an index of a list of {len(node)} entries")
            if last:
                node[int(p)] = value
            node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            node = node.setdefault(p, {})
        else:
            raise SweepError(f"{where}: {dotted}: '{parts[i - 1]}' is a value, not a section")


def cell_arm(sweep: Sweep, cell: Cell) -> StudyArm:
    """The study arm of one cell: overrides under ``model.adapters`` resolve into the arm's adapter list."""
    adapters = copy.deepcopy(sweep.base.get("model", {}).get("adapters", []))
    sets: dict[str, Any] = {}
    touched = False
    for factor, level in cell.items():
        for key, value in sweep.factors[factor][level].items():
            if key.startswith("model.adapters."):
                _set_path({"model": {"adapters": adapters}}, key, value, f"factors.{factor}.{level}")
                touched = True
            else:
                sets[key] = value
    return StudyArm(name=cell_name(cell), set=sets, adapters=adapters if touched else None)


def _study(sweep: Sweep, arms: list[StudyArm]) -> Study:
    return Study(name=sweep.name, threads=sweep.threads, base=sweep.base, seeds=sweep.seeds, eval=sweep.eval, arms=arms)


def plan_sweep(sweep: Sweep) -> tuple[list[tuple[Cell, StudyArm]], list[tuple[Cell, str]]]:
    """(runnable cells with their arms, skipped cells with the reason); builds each model on the meta device."""

    runnable, skipped = [], []
    for cell in sweep_cells(sweep):
        arm = cell_arm(sweep, cell)
        try:
            cfg = arm_config(_study(sweep, [arm]), arm, sweep.seeds[0])
            with torch.device("meta"):  # checks the adapters fit the net without allocating weights
                build_model(cfg)
        except (StudyError, ValueError) as exc:
            if not sweep.skip_invalid:
                raise SweepError(f"cell {cell_name(cell)}: {exc} (skip_invalid: true skips such cells)") from None
            skipped.append((cell, str(exc).splitlines()[-1].strip()))
            continue
        runnable.append((cell, arm))
    if not runnable:
        raise SweepError(f"sweep {sweep.name}: no cell can be run ({len(skipped)} skipped)")
    return runnable, skipped


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep YAML (the cells' configs are checked by :func:`plan_sweep`)."""
    p = Path(path)
    example, keys = "experiments/design-space/sweep.yaml", "name, base, seeds, eval, factors, ..."
    tree = read_yaml_mapping(p, SweepError, "sweep", example, keys)
    try:
        return Sweep.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(x) for x in e["loc"])
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{key}: unknown key" if e["type"] == "extra_forbidden" else (f"{key}: {msg}" if key else msg))
        raise SweepError(
            f"invalid sweep {p}:\n  " + "\n  ".join(lines) + f"\n  (valid keys: {', '.join(Sweep.model_fields)})"
        ) from None


def run_sweep(
    path: str | Path,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    plan_only: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Train and evaluate every runnable cell x seed not done already; write the results table; returns its CSV path.

    ``plan_only``: list the cells (and the skipped ones) and run nothing.
    """
    sweep = load_sweep(path)
    out_dir = Path(out or sweep.out or Path("runs") / sweep.name)
    runnable, skipped = plan_sweep(sweep)
    n_all = len(runnable) + len(skipped)
    log(f"sweep {sweep.name}: {len(runnable)} of {n_all} cells x {len(sweep.seeds)} seeds ({sweep.design} design)")
    for cell, reason in skipped:
        log(f"  skipped {cell_name(cell)}: {reason}")
    if plan_only:
        for cell, _ in runnable:
            log(f"  {cell_name(cell)}")
        return out_dir / "results.csv"
    arms = [arm for _, arm in runnable]
    run_all(_study(sweep, arms), out_dir, arms, progress, cache_dir, log)
    rows = [row for cell, arm in runnable for seed in sweep.seeds for row in _rows(cell, arm, seed, out_dir)]
    path_csv = write_results(rows, list(sweep.factors), out_dir)
    log(f"sweep {sweep.name}: {len(rows)} rows in {path_csv} and {path_csv.with_suffix('.jsonl')}")
    return path_csv


_METRICS = ("fd", "kid_mean", "kid_std", "precision", "recall", "class_accuracy")


def _rows(cell: Cell, arm: StudyArm, seed: int, out_dir: Path) -> list[dict[str, Any]]:
    run_dir = out_dir / arm.name / f"seed{seed}"
    metrics = read_run_json(run_dir / "eval" / "metrics.json")
    accounting = read_run_json(run_dir / "accounting.json")
    params = accounting.get("parameters", {})
    rows = []
    for entry in metrics["results"]:
        row: dict[str, Any] = {**cell, "seed": seed, "guidance": entry["guidance"]}
        row.update({k: entry[k] for k in _METRICS if k in entry})
        row["params_total"] = params.get("total")
        row["params_trainable"] = params.get("trainable")
        row["train_seconds"] = accounting.get("timed_s")
        row["run_dir"] = str(run_dir)
        rows.append(row)
    return rows


def write_results(rows: list[dict[str, Any]], factors: list[str], out_dir: str | Path) -> Path:
    """``results.csv`` and ``results.jsonl`` in ``out_dir``: factors first, then seed, guidance, metrics, the rest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys([*factors, "seed", "guidance", *_METRICS, *(k for r in rows for k in r)]))
    columns = [c for c in columns if any(c in r for r in rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    jsonl = "".join(json.dumps(r) + "\n" for r in rows)
    write_together({out_dir / "results.csv": buf.getvalue(), out_dir / "results.jsonl": jsonl})
    return out_dir / "results.csv"


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results table (``.csv`` or ``.jsonl``); CSV numbers come back as floats where they parse."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"results table {p} does not exist (a sweep writes <out>/results.csv and results.jsonl)")
    if p.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise SweepError(f"{p}: not JSON lines ({exc})") from None
        bad = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
        if bad is not None:
            raise SweepError(f"{p}: row {bad} is not a JSON object of column: value")
        return rows
    if p.suffix != ".csv":
        raise SweepError(f"{p}: a results table is .csv or .jsonl")

    def value(text: str) -> Any:
        try:
            return float(text)
        except ValueError:
            return text

    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        for row in reader:
            # DictReader fills a short line with None and keeps a long line's extra cells under None.
            if None in row or None in row.values():
                columns = ", ".join(reader.fieldnames)
                raise SweepError(f"{p}: line {reader.line_num} does not have one cell per column ({columns})")
            rows.append({k: value(v) for k, v in row.items()})
        return rows
