"""Where a run's evaluations are kept: one directory per setting, so no evaluation overwrites another.

``difflora eval`` (``evaluate_run`` without ``out``) writes::

    RUN_DIR/eval/<key>/metrics.json, samples_w*.png   every evaluation, under a key made of its settings
    RUN_DIR/eval/index.json                           one entry per evaluation of the run: key, directory,
                                                      settings, FD per scale
    RUN_DIR/eval/metrics.json, samples_w*.png         a copy of the newest plain evaluation (what readers
                                                      written before keys read), and likewise of the newest
    RUN_DIR/eval-teacher/, eval-taskK/, eval-vs-NAME/ of each other kind (--teacher, --task K, --against NAME)

The key (:func:`eval_key`) names what changes the scores: teacher, task, against, checkpoint step,
weights, sampler and steps, eta, the guidance scales, the guidance fraction, the sample count and
the seed, e.g. ``teacher-step2000-ema-ddim50-w1_2_4-frac0p5-n1000-seed0``. A re-evaluation at the
same setting replaces its own directory (and the grids its earlier metrics.json listed), nothing
else. A kind directory's own metrics.json without a key (a run evaluated before keys existed, a
study's evaluation, an ``--out`` directory) is an evaluation of its own: it is never replaced by a
copy, and :func:`evaluations` lists it, so every reader finds old runs as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difflora.files.atomic import write_together
from difflora.train.run_dir import read_json

__all__ = ["INDEX", "STORE", "Evaluation", "eval_key", "evaluations", "find_evaluation", "write_evaluation"]

STORE = "eval"  # RUN_DIR/eval/<key>/
INDEX = "index.json"
# The kind directories default_eval_dir names (eval, eval-teacher, eval-task1, eval-teacher-vs-mnist, ...).
_KIND_DIR = re.compile(r"eval(?P<teacher>-teacher)?(?:-task(?P<task>\d+))?(?:-vs-(?P<against>.+))?")
_MAX_KEY = 120  # a directory name; a long list of scales is cut and made unique by a hash


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a run: the directory holding its ``metrics.json`` and grids, and what it scored.
    ``key`` is None for a kind directory's own evaluation (no key: written before keys, by a study or to ``--out``)."""

    path: Path
    metrics: dict[str, Any]
    teacher: bool
    task: int | None
    against: str | None
    key: str | None

    def is_kind(self, teacher: bool = False, task: int | None = None, against: str | None = None) -> bool:
        """Whether this scores the kind asked for (the guided teacher, task K, against a dataset)."""
        return (self.teacher, self.task, self.against) == (teacher, task, against)


def _num(x: float) -> str:
    return f"{x:g}".replace(".", "p")


def eval_key(result: dict[str, Any]) -> str:
    """The key of an evaluation record (``metrics.json`` as evaluate_run writes it, with ``request``)."""
    s, r = result["settings"], result["request"]
    parts = ["teacher"] if r["teacher"] else []
    parts += [f"task{r['task']}"] if r["task"] is not None else []
    parts += [f"vs-{r['against']}"] if r["against"] is not None else []
    parts += [f"step{result['checkpoint_step']}", result["weights"], f"{s['sampler']}{s['steps']}"]
    parts += [f"eta{_num(s['eta'])}"] if s["eta"] else []
    parts += ["w" + "_".join(_num(w) for w in s["guidance"])]
    parts += [f"frac{_num(s['guidance_fraction'])}"] if s["guidance_fraction"] != 1 else []
    key = "-".join(parts + [f"n{s['num_samples']}", f"seed{s['seed']}"])
    if len(key) > _MAX_KEY:
        key = f"{key[: _MAX_KEY - 13]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return key


def _kind_evaluation(path: Path, metrics: dict[str, Any]) -> Evaluation | None:
    """A kind directory's own metrics.json as an evaluation (None: not a kind directory)."""
    m = _KIND_DIR.fullmatch(path.name)
    if m is None:
        return None
    # A study's teacher arm writes its teacher's scores into eval/: the record says which it is.
    settings = metrics.get("settings")
    teacher = bool((settings if isinstance(settings, dict) else {}).get("teacher", m["teacher"] is not None))
    task = int(m["task"]) if m["task"] is not None else None
    return Evaluation(path, metrics, teacher, task, m["against"], None)


def _kept_evaluation(path: Path, metrics: dict[str, Any]) -> Evaluation | None:
    """A keyed directory's metrics.json as an evaluation (None: not one evaluate_run keyed)."""
    r = metrics.get("request")
    if metrics.get("key") != path.name or not isinstance(r, dict):
        return None
    return Evaluation(path, metrics, bool(r.get("teacher")), r.get("task"), r.get("against"), path.name)


def evaluations(run_dir: str | Path, read: Callable[[Path], dict[str, Any] | None] = read_json) -> list[Evaluation]:
    """Every evaluation of ``run_dir``: the kind directories' own (sorted by name) first, then the
    keyed ones (sorted by key). A kind directory's copy of a keyed evaluation is not listed twice.
    ``read`` reads a metrics.json (default: a damaged one is skipped; a study's reader raises)."""
    run_dir = Path(run_dir)
    kept = []
    for path in sorted((run_dir / STORE).glob("*/metrics.json")):
        metrics = read(path)
        found = _kept_evaluation(path.parent, metrics) if metrics is not None else None
        kept += [found] if found is not None else []
    keys = {e.key for e in kept}
    own = []
    for path in sorted(run_dir.glob("eval*/metrics.json")):
        metrics = read(path)
        found = _kind_evaluation(path.parent, metrics) if metrics is not None else None
        if found is not None and metrics.get("key") not in keys:
            own.append(found)
    return own + kept


def find_evaluation(
    run_dir: str | Path,
    match: Callable[[dict[str, Any]], bool],
    *,
    teacher: bool = False,
    task: int | None = None,
    against: str | None = None,
    read: Callable[[Path], dict[str, Any] | None] = read_json,
) -> Evaluation | None:
    """The first evaluation of ``run_dir`` (in :func:`evaluations`' order) of the kind asked for whose
    metrics.json ``match`` accepts, e.g. ``lambda m: scored_with(m, cfg, settings)``; None if none does."""
    for e in evaluations(run_dir, read):
        if e.is_kind(teacher, task, against) and match(e.metrics):
            return e
    return None


def _grids_listed(out_dir: Path, metrics: dict[str, Any] | None) -> set[Path]:
    """The grid files a metrics.json lists (none when it is missing or damaged; names only, no path)."""
    results = (metrics or {}).get("results")
    if not isinstance(results, list):
        return set()
    return {out_dir / Path(e["grid"]).name for e in results if isinstance(e, dict) and isinstance(e.get("grid"), str)}


def _files(out_dir: Path, result: dict[str, Any], grids: dict[str, bytes]) -> dict[Path, str | bytes]:
    return {out_dir / name: png for name, png in grids.items()} | {
        out_dir / "metrics.json": json.dumps(result, indent=2)
    }


def _index_entry(run_dir: Path, e: Evaluation) -> dict[str, Any]:
    s = e.metrics.get("settings")
    s = s if isinstance(s, dict) else {}
    entry = {"key": e.key, "path": e.path.relative_to(run_dir).as_posix(), "teacher": e.teacher, "task": e.task}
    entry |= {"against": e.against, "checkpoint_step": e.metrics.get("checkpoint_step")}
    entry |= {k: s.get(k) for k in ("sampler", "steps", "eta", "guidance", "guidance_fraction", "num_samples", "seed")}
    results = e.metrics.get("results")
    return entry | {"fd": [r.get("fd") for r in results if isinstance(r, dict)] if isinstance(results, list) else []}


def _copy_allowed(kind_dir: Path) -> bool:
    """Whether the newest evaluation may be copied into ``kind_dir``: not over an evaluation of its own
    (a study's, or one written before keys), which only a re-evaluation into that directory replaces."""
    own = read_json(kind_dir / "metrics.json")
    return own is None or "key" in own


def write_evaluation(
    out_dir: Path, result: dict[str, Any], grids: dict[str, bytes], run_dir: Path | None = None
) -> Path:
    """Write an evaluation (``result``, its grids by file name); returns the directory of its metrics.json.

    Without ``run_dir``: into ``out_dir`` alone (an ``--out`` directory, a study's ``eval/``). With it,
    ``result`` holds ``request`` and is kept under its key (:func:`eval_key`), copied as the newest of
    its kind into ``out_dir`` (its kind directory, unless that holds an evaluation of its own), and
    the run's index rewritten, all in one :func:`~difflora.files.atomic.write_together`. Then the grids
    an earlier metrics.json of the same directory listed and this one does not are removed: never new
    grids next to old scores."""
    dirs = [out_dir]
    if run_dir is not None:
        result["key"] = eval_key(result)
        # The copy first: a refused write names the file where earlier readers (and errors) look.
        dirs = ([out_dir] if _copy_allowed(out_dir) else []) + [run_dir / STORE / result["key"]]
    earlier = {d: _grids_listed(d, read_json(d / "metrics.json")) for d in dirs}
    made = [d for d in {*dirs, *([run_dir / STORE] if run_dir is not None else [])} if not d.exists()]
    files: dict[Path, str | bytes] = {}
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        files |= _files(d, result, grids)
    if run_dir is not None:
        r = result["request"]
        mine = Evaluation(dirs[-1], result, r["teacher"], r["task"], r["against"], result["key"])
        listed = [e for e in evaluations(run_dir) if e.key != mine.key] + [mine]
        listed.sort(key=lambda e: (e.key is not None, e.key or e.path.name))  # as evaluations() lists them
        index = {"evaluations": [_index_entry(run_dir, e) for e in listed]}
        files[run_dir / STORE / INDEX] = json.dumps(index, indent=2) + "\n"
    try:
        write_together(files)
    except BaseException:  # a refused write leaves no empty directory behind either
        for d in sorted(made, key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    for old in earlier.values():
        for path in old - set(files):
            path.unlink(missing_ok=True)
    return dirs[-1]
