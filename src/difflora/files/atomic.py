"""Every file difflora writes: whole or not at all, and a full disk said in one line.

A file is written under a temporary name beside it (``NAME.tmp``) and renamed over ``NAME`` once
complete (:func:`atomic_write`), so a reader, a crash or a full disk never meets half a file under
the real name; the temporary file is removed when the write fails. The outputs of one command
that belong together (an evaluation's grids and its ``metrics.json``, a sample grid and its
``--save-tensor`` file, a study's report files) are written by :func:`write_together`: every file
under its temporary name first, the renames only once all of them are complete, so a failed write
leaves every earlier output as it was. A directory written as a whole (one PNG per sample, an
exported pipeline) is staged under a hidden name beside it and renamed into place once complete
(:func:`write_directory`); a non-empty one is replaced only when the caller says so.

A write the storage refuses (no space left, a disk quota, the file-size limit of ``ulimit -f``, a
read-only file system, no permission) raises :class:`WriteError`: an ``OSError`` (and a
:class:`~difflora.errors.DiffloraError`) whose one-line message names the file, how much it needed
and what was free (or the limit), and what to do. safetensors reports such failures as its own
``SafetensorError`` carrying the errno in its text ("(os error 28)"); they are translated alike.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from safetensors import SafetensorError

from difflora.errors import DiffloraError

__all__ = [
    "WriteError",
    "append_line",
    "atomic_write",
    "check_directory",
    "storage_errors",
    "write_bytes",
    "write_directory",
    "write_together",
]

# The storage's refusals: what each means for the user, who can act on it (other errno values are bugs
# or exotic failures and keep their own message).
_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file would exceed the file-size limit",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
_SAFETENSORS_ERRNO = re.compile(r"\(os error (\d+)\)")


class WriteError(OSError, DiffloraError):
    """A file could not be written because the storage refused it; the message says how much was needed."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without OSError's "[Errno 28]" prefix


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _free(path: Path) -> int | None:
    """Bytes free to this user where ``path`` would be written (None when that cannot be found)."""
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, SafetensorError):
        found = _SAFETENSORS_ERRNO.search(str(exc))
        return int(found.group(1)) if found else None
    return None


def _explain(path: Path, code: int, needed: int) -> str:
    reason = _REASONS[code]
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free(path)
        room = f", {_size(free)} free" if free is not None else ""
        return (
            f"cannot write {path}: {reason} ({_size(needed)} needed{room}); free some space and run the command again"
        )
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return (
            f"cannot write {path}: {reason} ({_size(needed)} needed, the limit is {_size(limit)}); "
            "raise it (`ulimit -f`) or write elsewhere, and run the command again"
        )
    return f"cannot write {path}: {reason}; write elsewhere or fix its permissions, and run the command again"


@contextmanager
def storage_errors(path: str | Path, needed: int) -> Iterator[None]:
    """Inside: a write the storage refuses becomes a :class:`WriteError` naming ``path`` and ``needed``
    bytes (an inner one is renamed to this, outer, name: a checkpoint is named, not its parts)."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        code = _errno(exc)
        if code not in _REASONS:
            raise
        raise WriteError(code, _explain(Path(path), code, needed)) from None


def _tmp(path: Path, shared: bool = False) -> Path:
    # In a directory several processes write at once (a feature-net cache shared by runs), each
    # writes its own temporary file; elsewhere one writer holds the directory (a run's lock) and a
    # temporary left by a killed one is simply overwritten.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp" if shared else f"{path.name}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], None], needed: int, *, shared: bool = False) -> Path:
    """``write(tmp)`` writes the file under a temporary name, then it is renamed to ``path``. Any
    failure removes the temporary; a refusal of the storage is a :class:`WriteError` naming ``path``
    and ``needed``, the size the write needs (an estimate is fine). ``shared``: other processes may
    write ``path`` at the same time (a temporary name of this process's own)."""
    path = Path(path)
    tmp = _tmp(path, shared)
    try:
        with storage_errors(path, needed):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes | str, *, shared: bool = False) -> Path:
    """``data`` (text as UTF-8) atomically to ``path`` (``shared``: see :func:`atomic_write`)."""
    raw = data.encode() if isinstance(data, str) else data
    return atomic_write(path, lambda tmp: tmp.write_bytes(raw), len(raw), shared=shared)


def write_new(path: str | Path, data: bytes | str) -> Path:
    """``data`` to ``path``, a file that must not exist yet: written under a temporary name, then
    hard-linked to ``path``, which fails (FileExistsError) rather than replace a file made meanwhile."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = _tmp(path, shared=True)
    try:
        with storage_errors(path, len(raw)):
            tmp.write_bytes(raw)
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_together(files: dict[Path, str | bytes]) -> None:
    """Write the outputs of one command: every file under a temporary name first, then the renames.

    A failed write (a full disk) removes the temporary files and leaves every earlier output as it
    was; never a half-written file under a real name, nor a new file next to an old one's partner."""
    raws = {Path(p): d.encode() if isinstance(d, str) else d for p, d in files.items()}
    tmps = {path: _tmp(path) for path in raws}
    try:
        for path, raw in raws.items():
            with storage_errors(path, sum(len(r) for r in raws.values())):
                tmps[path].write_bytes(raw)
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    for path, tmp in tmps.items():
        os.replace(tmp, path)


def check_directory(directory: str | Path, what: str, overwrite: bool = False) -> None:
    """Raise (an OSError) if :func:`write_directory` would refuse ``directory``: a file, or a non-empty
    directory without ``overwrite``. ``what`` names the contents (``the images``). Callers check before
    the work that makes the contents."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; name a directory for {what}")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} is not empty; choose another directory or pass --overwrite")


def _beside(directory: Path, suffix: str) -> Path:
    """A hidden unused name next to ``directory`` (same filesystem: renames between them are atomic)."""
    return directory.parent / f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.{suffix}"


def _swap_in(stage: Path, directory: Path) -> None:
    """Rename ``stage`` onto ``directory``; a non-empty one is moved aside first and removed after."""
    if not directory.is_dir() or not any(directory.iterdir()):
        os.replace(stage, directory)  # onto nothing or an empty directory: one atomic rename
        return
    old = _beside(directory, "old")
    os.replace(directory, old)
    try:
        os.replace(stage, directory)
    except BaseException:
        os.replace(old, directory)  # the old contents stay where they were
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_directory(
    directory: str | Path, write: Callable[[Path], None], needed: int, what: str, overwrite: bool = False
) -> Path:
    """``write(stage)`` fills a hidden staging directory beside ``directory``, which is then renamed onto
    it: all or nothing. An existing non-empty ``directory`` is refused (:func:`check_directory`) unless
    ``overwrite``; it is then replaced as a whole, never mixed with new files. A refusal of the storage
    is a :class:`WriteError` naming ``directory`` and ``needed`` bytes; any failure removes the stage."""
    directory = Path(directory)
    check_directory(directory, what, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    stage = _beside(directory, "tmp")
    stage.mkdir()  # mkdir, not mkdtemp (0700): the directory gets the mode the umask gives
    try:
        with storage_errors(directory, needed):
            write(stage)
        _swap_in(stage, directory)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return directory


def append_line(f: IO[bytes], path: Path, line: str) -> None:
    """Append ``line`` to the log ``f``, opened unbuffered (``open(path, "ab", buffering=0)``), whole
    or not at all: a refused write cuts the file back to where it was, so no torn line is left."""
    raw = memoryview(line.encode())
    end = f.seek(0, os.SEEK_END)
    try:
        with storage_errors(path, len(raw)):
            while raw:  # an unbuffered write may take part of the bytes (the last blocks of a disk)
                raw = raw[f.write(raw) :]
    except BaseException:
        os.ftruncate(f.fileno(), end)
        raise
