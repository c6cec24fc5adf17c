"""One writer per run directory: an OS file lock on ``RUN_DIR/lock`` that dies with its process.

Every command that writes a run directory (``train``, ``train --resume``, ``distill``,
``pretrain``, the runs of a ``study``, ``combine-tasks``) holds :func:`run_lock` from before its
first write until it exits; a second writer is refused with one line naming the holder (pid,
host, command, start time). Readers (``sample``, ``eval``) take no lock and keep working.

The lock is ``flock`` (``msvcrt.locking`` on Windows) on an open file: the operating system drops
it when the holding process ends, however it ends, so a kill -9 never leaves a stale lock. The
file itself stays (deleting it on release would let a third process lock a new file while a
second one still waits on the old one); it holds the last holder's description, which is read
only while somebody holds the lock.

A refused process writes nothing: :func:`check_unlocked` only opens an existing lock file to test
it, and :func:`run_lock` creates the lock file only when it gets the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from difflora.errors import DiffloraError
from difflora.files.atomic import storage_errors

try:  # POSIX
    import fcntl
except ImportError:  # Windows: byte-range locks of the C runtime, also released when the process ends
    fcntl = None
    import msvcrt

__all__ = ["LOCK_FILE", "RunLocked", "check_unlocked", "run_lock", "updating"]

LOCK_FILE = "lock"
# Windows locks a byte range and refuses reads inside it: lock a byte far past the holder's text.
_WINDOWS_LOCK_OFFSET = 1 << 20
# Paths (resolved) this process holds: a writer that calls another (a study training its runs)
# re-enters the lock it holds instead of refusing itself.
_HELD: set[Path] = set()


class RunLocked(RuntimeError, DiffloraError):
    """Another process is writing this run directory."""


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock of ``fd`` without waiting; False when another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _holder(path: Path) -> str:
    """The holder's description as it wrote it into the lock file (it may not have written it yet)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} ({info['command']}), started {info['started']}"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return "another process (it has not described itself yet)"


def _refusal(run_dir: Path) -> RunLocked:
    return RunLocked(
        f"{run_dir} is being written by {_holder(run_dir / LOCK_FILE)}; wait for it to finish or stop it, "
        "then run again (sample and eval can read the run meanwhile)"
    )


def check_unlocked(run_dir: str | Path) -> None:
    """Raise :class:`RunLocked` naming the holder if another process writes ``run_dir``; writes nothing.

    A command calls it before it reads or builds anything, so a refused writer fails at once; the
    lock itself is taken by :func:`run_lock` before the first write.
    """
    path = Path(run_dir) / LOCK_FILE
    if Path(run_dir).resolve() in _HELD or not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY if fcntl is not None else os.O_RDWR)
    try:
        if not _try_lock(fd):
            raise _refusal(Path(run_dir))
        _unlock(fd)
    finally:
        os.close(fd)


def _describe() -> str:
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    name = program.parent.name if program.name == "__main__.py" else program.name  # python -m difflora: difflora
    command = " ".join([name, *sys.argv[1:]])
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": started})


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the write lock of ``run_dir`` (created with its parents if missing) inside the block.

    Raises :class:`RunLocked` naming the holder when another process holds it; re-entered when this
    process holds it already.
    """
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD:
        yield
        return
    check_unlocked(run_dir)  # refuse before creating anything
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            raise _refusal(run_dir)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        holder = _describe().encode()
        with storage_errors(run_dir / LOCK_FILE, len(holder)):
            os.write(fd, holder)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            _unlock(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def updating(directory: str | Path) -> Iterator[None]:
    """Wait for, then hold, a short exclusive lock on ``directory`` itself (not its run lock): for a
    read-modify-write of a small record in it by several processes. It creates no file, so it works
    in a directory this process cannot write. Windows cannot open a directory: there the block runs
    unguarded (the record is still replaced atomically)."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
