"""Checkpoints other runs stand on: recorded in the base run, spared by checkpoint retention.

A run that adapts a base (``train.init_from``: an adapter run, a distilled student, a run of a
study arm, a combined run) stores only its trainable tensors and reads every other weight from the
base checkpoint it started from. If retention deleted that checkpoint (the base resumed with more
steps, a distillation teacher resumed, ``difflora pretrain NAME`` run again), the dependent run
could never be loaded again. So the dependent records itself in the base run's
``dependents.json``::

    {"format": 1, "dependents": {"/abs/path/of/the/adapter/run": {"checkpoint": "step_0000400", "step": 400}}}

and retention (:func:`~difflora.train.checkpoint.save_checkpoint`) never deletes a checkpoint
named there while the dependent run directory exists (delete the dependent run, and the next
checkpoint of the base releases it). A ``dependents.json`` that cannot be read makes retention
delete nothing, with a warning naming the file.

A base directory that cannot be written (a shared read-only cache) cannot record the dependency;
nobody can extend that base while it is read-only either, so the dependent run starts with a
warning that says what to keep if the base is ever made writable and extended.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from pathlib import Path
from typing import Any

from difflora.errors import DiffloraError
from difflora.files.atomic import write_bytes
from difflora.files.jsonfile import read_json_file
from difflora.train.run_lock import updating

__all__ = ["DEPENDENTS_FILE", "DependentsError", "UnrecordedDependency", "pinned_checkpoints", "record_dependent"]

DEPENDENTS_FILE = "dependents.json"
FORMAT_VERSION = 1


class DependentsError(ValueError, DiffloraError):
    """A base run's ``dependents.json`` cannot be read."""


class UnrecordedDependency(UserWarning):
    """A run was started from a base whose directory cannot be written: its checkpoint is not pinned."""


def _read(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``{dependent run: {"checkpoint", "step"}}`` of ``run_dir`` (empty when it has no record)."""
    path = run_dir / DEPENDENTS_FILE
    if not path.exists():
        return {}
    fix = f"it lists the runs started from checkpoints of {run_dir}; restore it, or delete it if no run depends on them"
    tree = read_json_file(path, fix=fix, error=DependentsError, expect=dict)
    found = tree.get("dependents")
    if tree.get("format") != FORMAT_VERSION or not isinstance(found, dict):
        raise DependentsError(f"{path} is not a dependents record (format {FORMAT_VERSION}); {fix}")
    if not all(isinstance(v, dict) and isinstance(v.get("checkpoint"), str) for v in found.values()):
        raise DependentsError(f"{path} has an entry without a checkpoint name; {fix}")
    return found


def pinned_checkpoints(run_dir: str | Path) -> dict[str, list[str]]:
    """``{checkpoint directory name: [dependent runs]}`` of the checkpoints of ``run_dir`` that runs
    which still exist were started from; raises :class:`DependentsError` when the record is unreadable."""
    pins: dict[str, list[str]] = {}
    for run, entry in _read(Path(run_dir)).items():
        if Path(run).is_dir():
            pins.setdefault(entry["checkpoint"], []).append(run)
    return pins


def base_run_of(ckpt: Path) -> Path | None:
    """The run directory whose retention could delete checkpoint ``ckpt`` (None: a loose checkpoint)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def record_dependent(base_ckpt: str | Path, run_dir: str | Path) -> None:
    """Record in the base run of ``base_ckpt`` that ``run_dir`` was started from it (nothing to do
    for a checkpoint outside a run directory: no retention reaches it).

    A base directory that cannot be written gives an :class:`UnrecordedDependency` warning. An
    unreadable record is a :class:`DependentsError` (never overwritten: it may pin other runs' checkpoints).
    """
    ckpt = Path(base_ckpt).resolve()
    base = base_run_of(ckpt)
    if base is None:
        return
    run = str(Path(run_dir).resolve())
    entry = {"checkpoint": ckpt.name, "step": int(ckpt.name.removeprefix("step_"))}
    path = base / DEPENDENTS_FILE
    try:
        with updating(base):  # two runs starting from one base at once must not lose each other's entry
            record = _read(base)
            if record.get(run) == entry:
                return
            _write(path, record | {run: entry})
        # The base's retention may have run between this run reading the checkpoint and the record landing.
        if not ckpt.is_dir():
            raise DependentsError(
                f"{ckpt} was deleted by the retention of {base} while this run was starting from it; start this "
                "run again"
            )
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        warnings.warn(
            f"cannot record in {path} that {run} was started from {ckpt.name} ({os.strerror(exc.errno)}); "
            f"if {base} is ever made writable and trained further, keep {ckpt} (copy it) or this run cannot load",
            UnrecordedDependency,
            stacklevel=2,
        )


def _write(path: Path, record: dict[str, dict[str, Any]]) -> None:
    """Replace ``path`` atomically (written under the run's ``updating`` lock, so one writer at a time)."""
    write_bytes(path, json.dumps({"format": FORMAT_VERSION, "dependents": record}, indent=1))
