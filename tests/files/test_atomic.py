"""difflora.files.atomic: every write whole or not at all; a full disk, a quota, the file-size limit
or a read-only file system is one line naming the file and the space (issue 28, class 6).

The full disk is simulated two ways: a low-level write that raises ENOSPC (monkeypatched, after
writing part of the data, as a real full disk does), and a real file-size limit (RLIMIT_FSIZE with
SIGXFSZ ignored: the kernel then fails the write with EFBIG) in a subprocess."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from difflora.errors import DiffloraError
from difflora.files import atomic
from difflora.files.atomic import WriteError, append_line, atomic_write, storage_errors, write_bytes, write_together
from difflora.files.tensorfile import save_tensors

ROOT = Path(__file__).resolve().parents[2]


def _full_after(monkeypatch, room: int) -> None:
    """Path.write_bytes writes ``room`` bytes, then fails as a full disk does."""

    def write_bytes(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(data[:room])
        if len(data) > room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_full_disk_is_one_line_naming_the_file_needed_and_free(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    _full_after(monkeypatch, 10)
    with pytest.raises(WriteError) as info:
        write_bytes(path, b"x" * 3000)
    msg = str(info.value)
    assert re.fullmatch(
        rf"cannot write {re.escape(str(path))}: no space left on the device \(2\.9 KB needed, "
        r"([\d.]+) (bytes|KB|MB|GB) free\); free some space and run the command again",
        msg,
    ), msg
    # The free space is the file system's own figure (os.statvfs: an independent reference).
    free, unit = re.search(r"([\d.]+) (bytes|KB|MB|GB) free", msg).groups()
    st = os.statvfs(tmp_path)
    scale = {"bytes": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[unit]
    assert float(free) * scale == pytest.approx(st.f_bavail * st.f_frsize, rel=0.05)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, DiffloraError)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_sizes_are_said_in_units():
    assert [atomic._size(n) for n in (0, 1023, 1024, 5 * 1024**2, 3 * 1024**3, 2048 * 1024**3)] == [
        "0 bytes",
        "1023 bytes",
        "1.0 KB",
        "5.0 MB",
        "3.0 GB",
        "2048.0 GB",
    ]


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (errno.EDQUOT, "the disk quota is exhausted (10 bytes needed"),
        (errno.EROFS, "the file system is read-only; write elsewhere"),
        (errno.EACCES, "permission denied; write elsewhere or fix its permissions"),
    ],
)
def test_other_refusals_of_the_storage(tmp_path, code, said):
    with pytest.raises(WriteError, match=re.escape(f"cannot write {tmp_path / 'f'}: {said}")):
        with storage_errors(tmp_path / "f", 10):
            raise OSError(code, os.strerror(code))


def test_other_errors_keep_their_own_type(tmp_path):
    with pytest.raises(FileNotFoundError):
        with storage_errors(tmp_path / "f", 10):
            raise FileNotFoundError(errno.ENOENT, "gone")
    with pytest.raises(SafetensorError, match="header too large"):
        with storage_errors(tmp_path / "f", 10):
            raise SafetensorError("header too large")


def test_safetensors_refusals_are_translated(tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError('... (os error 28)'): the same one line."""

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"part")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("difflora.files.tensorfile.save_file", full)
    path = tmp_path / "w.safetensors"
    with pytest.raises(WriteError, match=rf"cannot write {path}: no space left on the device \(4\.1 KB needed"):
        save_tensors({"a": torch.zeros(1024)}, path)  # 4096 bytes of data + its header
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, broken, 10)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_together_renames_nothing_when_one_write_fails(tmp_path, monkeypatch):
    grid, scores = tmp_path / "grid.png", tmp_path / "metrics.json"
    grid.write_bytes(b"old grid")
    scores.write_bytes(b"old scores")
    _full_after(monkeypatch, 100)  # the grid (50 bytes) fits, the scores (500) do not
    with pytest.raises(WriteError, match=r"metrics\.json: no space left on the device \(550 bytes needed"):
        write_together({grid: b"g" * 50, scores: b"s" * 500})
    assert grid.read_bytes() == b"old grid" and scores.read_bytes() == b"old scores"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "metrics.json"]


def test_append_line_cuts_a_torn_line_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')

    class Full:
        """A file whose storage takes 5 bytes of the next write, then is full."""

        def __init__(self, f):
            self.f = f

        def seek(self, *a):
            return self.f.seek(*a)

        def fileno(self):
            return self.f.fileno()

        def write(self, data):
            if self.f.tell() > 12:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(bytes(data[:5]))

    with open(path, "ab", buffering=0) as f:
        with pytest.raises(WriteError, match=r"metrics\.jsonl: no space left on the device \(12 bytes needed"):
            append_line(Full(f), path, '{"step": 2}\n')
        append_line(f, path, '{"step": 3}\n')
    assert path.read_text() == '{"step": 1}\n{"step": 3}\n'


_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from difflora.cli.commands import main
sys.exit(main(sys.argv[2:]))
"""


def _limited(limit: int, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", _LIMITED, str(limit), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_train_under_a_real_file_size_limit_is_one_line(tmp_path):
    """A real limit (the kernel's EFBIG, inside safetensors' own writer): one line, exit 2, no .tmp."""
    out = tmp_path / "run"
    args = ("train", "tiny-unet", "--out", str(out), "--no-progress", "--set", "train.steps=2")
    proc = _limited(20000, *args, "--set", "data.name=digits")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot write {out / 'checkpoints' / 'step_0000002'}: the file would exceed")
    assert "the limit is 19.5 KB); raise it (`ulimit -f`)" in line
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not (out / "checkpoints" / "step_0000002").exists()


def test_a_shared_file_gets_a_temporary_of_this_process(tmp_path):
    """Two processes saving the same file of a shared cache never write into one temporary file."""
    seen = []
    atomic_write(tmp_path / "fn.json", lambda tmp: seen.append(tmp.name) or tmp.write_text("{}"), 2, shared=True)
    atomic_write(tmp_path / "run.json", lambda tmp: seen.append(tmp.name) or tmp.write_text("{}"), 2)
    assert seen == [f".fn.json.{os.getpid()}.tmp", "run.json.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fn.json", "run.json"]
