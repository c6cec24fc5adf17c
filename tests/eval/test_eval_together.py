"""The outputs of one evaluation (grids and metrics.json) and of one `sample` (grid and --save-tensor)
appear together or not at all (issue 28, class 15): a failure or an interrupt inside the write
leaves the earlier outputs byte for byte, never a grid without its scores or new grids next to old
scores; a later evaluation with fewer guidance scales leaves no grid its metrics.json does not list."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from difflora.cli.commands import main
from difflora.eval.evaluate import EvalSettings, evaluate_run
from difflora.eval.features import FeatureTrainConfig
from difflora.files.atomic import WriteError
from difflora.train import train

ROOT = Path(__file__).resolve().parents[2]
TINY_FEATURES = FeatureTrainConfig(epochs=1, batch_size=64, max_steps=5, seed=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    train(tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2"), out, progress=False, log=lambda _m: None)
    return out


def _eval(run_dir: Path, out: Path, guidance: list[float]) -> dict:
    settings = EvalSettings(num_samples=20, steps=2, guidance=guidance, seed=1, bootstrap=0, floor_draws=2)
    return evaluate_run(
        run_dir, settings, out=out, cache_dir=run_dir.parent / "c", feature_train=TINY_FEATURES, log=lambda _m: None
    )


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _fail_on(monkeypatch, name: str, exc: BaseException) -> None:
    """Writing the file ``name`` fails with ``exc`` (after its first bytes: a real failure is partial)."""
    real = Path.write_bytes

    def write_bytes(self: Path, data: bytes) -> int:
        if self.name.startswith(name):
            real(self, data[:10])
            raise exc
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize(
    "exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "interrupt"]
)
def test_a_failed_write_of_the_scores_keeps_the_earlier_evaluation(run_dir, tmp_path, monkeypatch, exc):
    out = tmp_path / "eval"
    _eval(run_dir, out, [1])
    before = _files(out)
    _fail_on(monkeypatch, "metrics.json", exc)  # the grids are written, then the scores fail
    with pytest.raises(WriteError if isinstance(exc, OSError) else KeyboardInterrupt):
        _eval(run_dir, out, [1, 2])
    assert _files(out) == before  # neither the new grid samples_w2.png nor a new samples_w1.png


def test_grids_the_new_scores_do_not_list_are_removed(run_dir, tmp_path):
    out = tmp_path / "eval"
    _eval(run_dir, out, [1, 2])
    assert sorted(_files(out)) == ["metrics.json", "samples_w1.png", "samples_w2.png"]
    result = _eval(run_dir, out, [2])
    assert sorted(_files(out)) == ["metrics.json", "samples_w2.png"]
    assert [r["grid"] for r in json.loads((out / "metrics.json").read_text())["results"]] == ["samples_w2.png"]
    assert [r["grid"] for r in result["results"]] == ["samples_w2.png"]


def test_sample_writes_its_grid_and_tensors_together(run_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "a.png").write_bytes(b"old grid")
    _fail_on(monkeypatch, "a.safetensors", OSError(errno.ENOSPC, "No space left on device"))
    argv = ["sample", str(run_dir), "--out", str(tmp_path / "a.png"), "--num", "2", "--steps", "2", "--no-progress"]
    assert main([*argv, "--save-tensor", str(tmp_path / "a.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {tmp_path / 'a.safetensors'}: no space left on the device (")
    assert _files(tmp_path) == {"a.png": b"old grid"}  # the new grid was not put in place without its tensors


_KILLED_BEFORE_THE_RENAMES = """
import os, pathlib, sys, time
marker = pathlib.Path(sys.argv[1])
real = os.replace


def replace(src, dst):
    if str(src).endswith(".png.tmp"):  # every output is complete under its temporary name: stop here
        marker.touch()
        time.sleep(120)
    return real(src, dst)


os.replace = replace
from difflora.cli.commands import main
sys.exit(main(sys.argv[2:]))
"""


def test_an_evaluation_killed_in_its_write_window_leaves_the_earlier_one(run_dir, tmp_path):
    """kill -9 once every new output is written under its temporary name, before the renames: the
    earlier grids and scores are all there, byte for byte; the next evaluation leaves no temporary."""
    out = tmp_path / "eval"
    _eval(run_dir, out, [1])
    before = _files(out)
    marker = tmp_path / "writing"
    argv = ["eval", str(run_dir), "--out", str(out), "--num-samples", "20", "--steps", "2", "--guidance", "1", "2"]
    argv += ["--cache-dir", str(run_dir.parent / "c"), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BEFORE_THE_RENAMES, str(marker), *argv], env=env)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the evaluation never reached its renames"
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    assert {k: v for k, v in _files(out).items() if not k.endswith(".tmp")} == before
    _eval(run_dir, out, [1, 2])
    assert sorted(_files(out)) == ["metrics.json", "samples_w1.png", "samples_w2.png"]
