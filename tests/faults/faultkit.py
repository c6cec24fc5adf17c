"""The fault catalogue's kit. The catalogue (tests/faults/test_faults_*.py) holds every bad input
a user can give through the CLI (and a few through the API), the one-line error it must produce,
and proof that nothing on disk got worse.

Each entry is a :class:`Fault`: how to provoke it (a damage applied to a copy of a tiny trained
run, then a command line or an API call), the expected error (a regex searched in the single
``error: ...`` line on stderr, or in the exception's message), and the check, done for every
entry, that the case's whole directory (the run copy and every path the command was pointed at)
holds exactly the same files and bytes afterwards: no half-written PNG, no empty eval/ directory,
no rewritten config.json. Entries with ``error=None`` are faults the CLI must survive: it succeeds
(exit 0), says what it did about the fault on a ``warning:`` line, and leaves the run unchanged.

One tiny run is trained once per session (conftest.py); every entry works on its own copy. CLI
entries run in-process through ``difflora.cli.commands.main``; only the signal entries start a process.

Not here: training-loop faults (interrupt/resume identity, unwritable output directories,
damaged metrics.jsonl: tests/test_train.py) and adapter-file loading (tests/test_adapters_*.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflora.cli.commands import main
from difflora.presets import CONFIGS_DIR

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = CONFIGS_DIR
TASK_ADAPTER = "model.adapters=[{name: task, condition: task, weighting: index, num_values: 3, rank: 2}]"

# ------------------------------------------------------------------------------------ damage kit

CK2, CK4 = "checkpoints/step_0000002", "checkpoints/step_0000004"


def truncate(rel: str, keep: int = 100) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        p = run / rel
        p.write_bytes(p.read_bytes()[:keep])

    return damage


def flip_byte(rel: str) -> Callable[[Path, Path], None]:
    """Flip one byte in the middle: same size, so only the hash can tell."""

    def damage(run: Path, tmp: Path) -> None:
        p = run / rel
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))

    return damage


def write(rel: str, text: str) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)

    return damage


def remove(rel: str) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        p = run / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return damage


def edit_json(rel: str, fn: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        p = run / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))

    return damage


def forge(ckpt: str, name: str, make: Callable[[dict], bytes | dict]) -> Callable[[Path, Path], None]:
    """Replace ``name``.safetensors and record its true size and hash: damage the hashes cannot see."""

    def damage(run: Path, tmp: Path) -> None:
        path = run / ckpt / f"{name}.safetensors"
        new = make(load_file(str(path)))
        if isinstance(new, dict):
            save_file(new, str(path))
        else:
            path.write_bytes(new)
        state = json.loads((run / ckpt / "state.json").read_text())
        data = path.read_bytes()
        state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (run / ckpt / "state.json").write_text(json.dumps(state))

    return damage


def both(*damages: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        for d in damages:
            d(run, tmp)

    return damage


def nan_weights(t: dict) -> dict:
    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in t.items()}


def wrong_shapes(t: dict) -> dict:
    return {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim else v for k, v in t.items()}


def mkdir(rel: str) -> Callable[[Path, Path], None]:
    return lambda run, tmp: (tmp / rel).mkdir(parents=True)


def idx_labels(rel: str) -> Callable[[Path, Path], None]:
    """A valid IDX label file of two labels, so that the images file is the one at fault."""
    return write_tmp(rel, bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 4]))


def write_tmp(rel: str, data: bytes) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)

    return damage


# What another writer wrote into a run's lock file (difflora.train.run_lock), and the open files by
# which this process holds such locks for a case (released after it by conftest.py).
HOLDER = {"pid": 4242, "host": "elsewhere", "command": "difflora train tiny-unet", "started": "2026-12-07 12:00:00 UTC"}
HELD_LOCKS: list[int] = []


def hold_lock(where: str) -> Callable[[Path, Path], None]:
    """Another process writes the run directory ``where`` ({run} and {tmp} are filled in): its lock
    is held through an open file of its own, which the command's own lock cannot share."""

    def damage(run: Path, tmp: Path) -> None:
        run_dir = Path(_fill((where,), run, tmp)[0])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "lock").write_text(json.dumps(HOLDER))
        fd = os.open(run_dir / "lock", os.O_RDONLY)
        HELD_LOCKS.append(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    return damage


def release_locks() -> None:
    while HELD_LOCKS:
        os.close(HELD_LOCKS.pop())


# ------------------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Fault:
    id: str
    argv: tuple[str, ...] = ()  # CLI arguments; {run} and {tmp} are filled in
    error: str | None = None  # regex for the single `error:` line; None: the command must succeed
    damage: Callable[[Path, Path], None] | None = None  # applied to (run copy, case dir) first
    run: str = "run"  # which fixture run is copied: "run" (trained) or "task" (task adapter)
    warning: str | None = None  # regex for a `warning:` line the command must print
    api: Callable[[Path, Path], object] | None = None  # instead of argv: a call that must raise
    exc: type[BaseException] = Exception
    open_in: str | None = None  # a fault still open in code another helper owns: expected to fail
    hidden: tuple[str, ...] = ()  # packages made absent (as if not installed) while the command runs
    fsize: int | None = None  # a file-size limit (bytes, `ulimit -f`) while the command runs


def cases(faults: list[Fault]) -> list:
    """pytest params of ``faults``; those still open are marked xfail with where they are open."""
    return [
        pytest.param(
            f, id=f.id, marks=[pytest.mark.xfail(reason=f"open in {f.open_in}", strict=False)] * bool(f.open_in)
        )
        for f in faults
    ]


def _with_defaults(defaults: dict[str, str], extra: tuple[str, ...]) -> tuple[str, ...]:
    """``extra`` after the defaults it does not give itself (a flag given twice is refused)."""
    given = {a.partition("=")[0] for a in extra}
    return tuple(a for flag, value in defaults.items() if flag not in given for a in (flag, value)) + extra


def sample(*extra: str) -> tuple[str, ...]:
    defaults = {"--out": "{tmp}/a.png", "--num": "2", "--steps": "2"}
    return ("sample", "{run}", *_with_defaults(defaults, extra), *(("--no-progress",) * ("--no-progress" not in extra)))


def evaluate(*extra: str) -> tuple[str, ...]:
    defaults = {"--num-samples": "4", "--steps": "2", "--cache-dir": "{tmp}/c"}
    return ("eval", "{run}", *_with_defaults(defaults, extra), "--no-progress")


def train(*sets: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    args = ["train", "tiny-unet", "--out", "{tmp}/new", "--no-progress", "--set", "train.steps=2", *extra]
    for s in sets:
        args += ["--set", s]
    return tuple(args)


def params(*sets: str) -> tuple[str, ...]:
    return ("params", "tiny-unet", *[a for s in sets for a in ("--set", s)])


# ------------------------------------------------------------------------------------ the check


@contextlib.contextmanager
def file_size_limit(limit: int | None) -> Iterator[None]:
    """Files this process writes may not grow past ``limit`` bytes (a full disk, as a write sees it:
    the write fails with EFBIG once SIGXFSZ, which would kill the process, is ignored)."""
    if limit is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256) and directory under ``root``: what 'nothing got worse' compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _fill(argv: tuple[str, ...], run: Path, tmp: Path) -> list[str]:
    return [a.replace("{run}", str(run)).replace("{tmp}", str(tmp)) for a in argv]


def check_fault(fault: Fault, runs: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    """Provoke ``fault`` on a copy of its run and check the error line and the files on disk."""
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFLORA_DEBUG", raising=False)
    for name in [m for m in sys.modules if m.split(".")[0] in fault.hidden] + list(fault.hidden):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as if it were not installed
    run = tmp_path / "run"
    shutil.copytree(runs[fault.run], run)
    if fault.damage is not None:
        fault.damage(run, tmp_path)
    before = snapshot(tmp_path)
    if fault.api is not None:
        with pytest.raises(fault.exc) as info, file_size_limit(fault.fsize):
            fault.api(run, tmp_path)
        assert re.search(fault.error, str(info.value)), str(info.value)
        assert snapshot(tmp_path) == before
        return
    with file_size_limit(fault.fsize):
        code = main(_fill(fault.argv, run, tmp_path))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    warned = [ln for ln in lines if ln.startswith("warning: ")]
    assert "Traceback" not in err
    if fault.warning is not None:
        assert any(re.search(fault.warning, ln) for ln in warned), err
    if fault.error is None:
        assert code == 0, err
        assert not errors
        after = snapshot(tmp_path)
        # A command that succeeds may add its outputs (a.png) but never changes the run.
        assert {k: v for k, v in after.items() if k.startswith("run")} == {
            k: v for k, v in before.items() if k.startswith("run")
        }
        return
    assert code == 2, err
    # The error is one line (the warnings that led to it may precede it): it names what and how.
    assert len(errors) == 1 and lines[-1] == errors[0] and len(lines) == 1 + len(warned), err
    assert re.search(fault.error, errors[0]), errors[0]
    assert snapshot(tmp_path) == before, "the failed command changed files on disk"
