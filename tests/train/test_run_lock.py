"""One writer per run directory (difflora.train.run_lock): a second writer is refused with one line
naming the holder and changes no file, a killed holder leaves no lock, readers keep working."""

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import difflora.train.loop as loop
from difflora.cli.commands import main
from difflora.train import train
from difflora.train.checkpoint import find_checkpoints
from difflora.train.run_lock import LOCK_FILE, RunLocked, check_unlocked, run_lock

QUIET = {"progress": False, "log": lambda s: None}
ROOT = Path(__file__).resolve().parents[2]
# A process that holds a run directory's lock until it is killed, as a training process does.
HOLDER = (
    "import sys, time\n"
    "from difflora.train.run_lock import run_lock\n"
    "with run_lock(sys.argv[1]):\n"
    "    print('holding', flush=True)\n"
    "    time.sleep(600)\n"
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def holder():
    """``hold(run_dir)`` starts a process holding the lock of ``run_dir``; every one is killed after the test."""
    procs = []

    def hold(run_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=_env()
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "holding"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config) -> Path:
    run = tmp_path_factory.mktemp("lock") / "run"
    train(tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2", "sample.num=2"), run, **QUIET)
    return run


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_a_second_training_process_is_refused_naming_the_holder_and_changes_no_file(trained, holder):
    proc = holder(trained)
    before = _files(trained)
    argv = ["train", "tiny-unet", "--out", str(trained), "--resume", "--no-progress", "--set", "train.steps=4"]
    second = subprocess.run(
        [sys.executable, "-m", "difflora", *argv], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert lines[0].startswith(f"error: {trained} is being written by pid {proc.pid} on ")
    assert "(-c " in lines[0] and "started 20" in lines[0]  # the holder's command and start time
    assert _files(trained) == before


def test_every_writer_is_refused_in_process_too(trained, holder, tmp_path, tiny_config):
    holder(trained)
    before = _files(trained)
    cfg = tiny_config("tiny-unet", "train.steps=4", "train.ckpt_every=2", "sample.num=2")
    with pytest.raises(RunLocked, match="is being written by pid"):
        train(cfg, trained, resume=True, **QUIET)
    with pytest.raises(RunLocked, match="is being written by pid"):  # not "already holds a run"
        train(cfg, trained, **QUIET)
    fresh = tmp_path / "fresh"
    holder(fresh)
    with pytest.raises(RunLocked):
        train(cfg, fresh, **QUIET)
    assert _files(trained) == before and os.listdir(fresh) == [LOCK_FILE]


def test_a_killed_holder_leaves_no_lock(trained, holder):
    proc = holder(trained)
    with pytest.raises(RunLocked):
        check_unlocked(trained)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    check_unlocked(trained)
    with run_lock(trained):
        with run_lock(trained):  # re-entered by the process that holds it
            pass
    assert (trained / LOCK_FILE).is_file()  # the file stays, the lock does not


def test_sample_and_eval_read_a_run_while_it_is_written(trained, holder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    holder(trained)
    png = tmp_path / "a.png"
    assert main(["sample", str(trained), "--out", str(png), "--num", "2", "--steps", "2", "--no-progress"]) == 0
    assert png.is_file()
    argv = ["eval", str(trained), "--num-samples", "40", "--steps", "2", "--feature-steps", "3", "--no-progress"]
    assert main([*argv, "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "ev")]) == 0, capsys.readouterr()


def test_a_run_another_writer_finished_while_a_command_prepared_is_not_overwritten(tmp_path, tiny_config, monkeypatch):
    cfg = tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2", "sample.num=2")
    run, prepare = tmp_path / "run", loop._prepare

    def racing(*args, **kwargs):
        st = prepare(*args, **kwargs)
        monkeypatch.setattr(loop, "_prepare", prepare)
        train(cfg, run, **QUIET)  # another writer trains the whole run between the first look and the lock
        return st

    monkeypatch.setattr(loop, "_prepare", racing)
    with pytest.raises(RunLocked, match="wrote a checkpoint of .* while this command was preparing"):
        train(cfg, run, **QUIET)
    assert [p.name for p in find_checkpoints(run)] == ["step_0000002"]
    assert (run / "metrics.jsonl").read_text().count("\n") == 1  # its row, not emptied by the refused start
