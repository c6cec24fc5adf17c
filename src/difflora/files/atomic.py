"""Replacing a file atomically: a temporary file beside the target, renamed onto it when complete.

A reader (another process sharing a cache, or the next run after a crash) sees either no file or a
complete one under the target's name, never a half-written one: ``os.replace`` is atomic within a
filesystem, hence the temporary file in the target's own directory. A failure removes the
temporary file, so nothing is left behind either.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from difflora.files.tensorfile import new_file_mode

__all__ = ["atomic_path", "write_json_atomic"]


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path next to ``target`` (its directory is created), renamed onto ``target`` when
    the block succeeds and removed when it raises. The temporary name starts with "." and ends with
    ".tmp", so a directory listing that skips hidden files never sees it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, new_file_mode())  # mkstemp creates the file 0600; give it the mode open() would
