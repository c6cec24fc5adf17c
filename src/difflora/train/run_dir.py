"""The run directory: its files, and the rules that keep them consistent with its checkpoints.

A run directory holds everything a run produced::

    config.json      the resolved config (every default filled in)
    metrics.jsonl    one JSON object per logged step
    accounting.json  parameters, peak memory, step time, images/s
    tb/              TensorBoard scalars
    samples/         PNG sample grids (EMA weights)
    checkpoints/     see difflora.train.checkpoint
    lock             held by the one process writing the run (difflora.train.run_lock)
    dependents.json  the runs started from its checkpoints, if any (difflora.train.dependents)

Invariants (what resuming relies on): ``metrics.jsonl`` never holds a row past the newest checkpoint
once the run has exited (rows written after it are dropped on exit, or on resume after a crash);
resuming never makes a record worse (a finished run is left untouched, throughput is accumulated
over the segments of a run, never overwritten by a segment that timed nothing).
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from difflora.config.schema import Config, parse_saved_config
from difflora.files.atomic import write_bytes
from difflora.files.jsonfile import read_json_file
from difflora.train.checkpoint import find_checkpoints
from difflora.train.run_lock import RunLocked, run_lock

__all__ = [
    "RunDirNotWritable",
    "RunExistsError",
    "check_unchanged",
    "check_writable",
    "load_run_config",
    "lock_run",
    "merge_accounting_segment",
    "read_metrics",
    "truncate_metrics",
    "write_json",
]


class RunExistsError(FileExistsError):
    """The output directory already holds a run and resuming was not asked for."""


class RunDirNotWritable(PermissionError, ValueError):
    """The run directory cannot be written. A ValueError too: bad input, reported as one line."""


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (:func:`~difflora.files.atomic.write_bytes`)."""
    write_bytes(path, json.dumps(obj, indent=2))


# How to repair a damaged config.json (every error about one says it).
RESTORE_CONFIG = "each checkpoint's state.json holds the run's config (key 'config') to restore it from"


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config saved in a run directory."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():  # FileNotFoundError, not the ValueError of a damaged file
        raise FileNotFoundError(f"{run_dir} is not a difflora run directory: {path} is missing")
    # expect=dict: parse_config would read a config.json holding null as the default config.
    return parse_saved_config(read_json_file(path, fix=RESTORE_CONFIG, expect=dict))


def check_writable(out: Path) -> None:
    """Raise :class:`RunDirNotWritable` naming the directory unless ``out`` and ``out/checkpoints`` can be written.

    Checked before any work starts, so that an unwritable ``--out`` costs no training steps. A
    directory that does not exist yet is checked at its nearest existing ancestor (where it would be
    created). The check writes and removes a temporary file: permission bits alone do not tell
    (root, read-only mounts, ACLs).
    """
    for target in (out, out / "checkpoints"):
        probe = target
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise RunDirNotWritable(f"cannot write the run directory {target}: {probe} is a file, not a directory")
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as exc:
            raise RunDirNotWritable(
                f"cannot write the run directory {target}: {probe} is not writable ({exc.strerror}); "
                "choose another --out or fix its permissions"
            ) from None


def read_metrics(path: Path, log=print) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``, repairing what a crash can leave behind.

    Blank lines are skipped. A torn last line (the process died while writing it) is dropped with
    a message. Any other line that is not a JSON object with a ``step`` is an error naming the file
    and the line: a damaged log is not silently shortened.
    """
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    rows = []
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last:
                log(
                    f"{path}: dropped a torn last line (line {i + 1}, {len(line)} characters): the run stopped mid-write"
                )
                continue
            raise ValueError(f"{path} line {i + 1} is not valid JSON ({exc}); delete or fix that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path} line {i + 1} is not a metrics row (a JSON object with an integer step)")
        rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int, log=print) -> list[dict[str, Any]]:
    """Keep only the rows of ``metrics.jsonl`` up to ``step`` (the newest checkpoint); returns them."""
    if not path.is_file():
        return []
    rows = [r for r in read_metrics(path, log) if r["step"] <= step]
    write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def merge_accounting_segment(previous: dict[str, Any] | None, segment: dict[str, Any]) -> dict[str, Any]:
    """Accounting of a run after one more training segment (a start or a resume).

    ``segment`` holds this segment's ``timed_steps`` and ``timed_s`` (seconds of the timed steps)
    and its peak memory. Step time is averaged over every timed step of the run; a segment that
    timed nothing keeps the previous numbers instead of writing NaN.
    """
    merged = dict(segment)
    prev = previous or {}
    steps = segment["timed_steps"] + int(prev.get("timed_steps", 0))
    seconds = segment["timed_s"] + float(prev.get("timed_s", 0.0))
    merged["timed_steps"], merged["timed_s"] = steps, seconds
    merged["peak_memory_mb"] = max(segment["peak_memory_mb"], float(prev.get("peak_memory_mb", 0.0)))
    step_s = seconds / steps if steps else math.nan
    merged["train_step_s"] = step_s
    merged["train_images_per_s"] = segment["batch_size"] / step_s if steps else math.nan
    return merged


def read_json(path: Path) -> dict[str, Any] | None:
    """``path`` as JSON, or None when it is missing or unreadable (a record that can be rebuilt):
    also when it is not UTF-8 text or holds something other than a JSON object."""
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return tree if isinstance(tree, dict) else None


def lock_run(held: contextlib.ExitStack, out: Path, newest: list[Path]) -> RunLocked | None:
    """Take the lock of ``out`` into ``held`` (process 0); the refusal, if any, is returned so that
    every process can be told before it is raised."""
    try:
        held.enter_context(run_lock(out))
        check_unchanged(out, newest)
    except RunLocked as exc:
        return exc
    return None


def check_unchanged(out: Path, newest: list[Path]) -> None:
    """Refuse when another writer finished a checkpoint of ``out`` between this command's first look
    (``newest``) and its lock: what it read or built would overwrite newer work."""
    if find_checkpoints(out)[-1:] != newest:
        raise RunLocked(f"another process wrote a checkpoint of {out} while this command was preparing; run it again")
