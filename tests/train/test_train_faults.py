"""Faults around the training loop: Ctrl-C, unwritable directories, finished runs, damaged logs, divergence.

Each test first reproduces a fault the probe of issue 14 found, then checks that nothing on disk got worse.
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import difflora.train.loop as loop
from difflora.train import TrainingDiverged, latest_checkpoint, load_checkpoint, train
from difflora.train.objectives import DiffusionObjective

QUIET = {"progress": False, "log": lambda s: None}
# tiny-unet for these faults: short, with dropout and hflip (random draws a resume must replay).
FAULTS = ["train.steps=8", "train.ckpt_every=4", "train.log_every=3", "model.unet.dropout=0.2", "data.hflip=true"]


def _rows(run: Path) -> list[dict]:
    # images_per_s is a wall-clock measurement: the only field two identical runs may differ in.
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def _assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(latest_checkpoint(a)), load_checkpoint(latest_checkpoint(b))
    assert ca.step == cb.step
    for name in ("model", "ema", "rng"):
        sa, sb = getattr(ca, name), getattr(cb, name)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs"
    for idx, state in ca.optim["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(cb.optim["state"][idx][k])), f"optim {idx}.{k}"
    assert _rows(a) == _rows(b)


def _interrupt_at(monkeypatch, call: int, action) -> None:
    """Run ``action`` inside the objective of step ``call`` (1-based), after the step drew its batch,
    timesteps and noise: the moment the probe hit."""
    real = DiffusionObjective.__call__
    calls = {"n": 0}

    def patched(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            action()
        return out

    monkeypatch.setattr(DiffusionObjective, "__call__", patched)


def _raise():
    raise KeyboardInterrupt


def test_keyboard_interrupt_inside_a_step_resumes_bit_identical(tmp_path, monkeypatch, tiny_config):
    cfg = tiny_config("tiny-unet", *FAULTS)
    train(cfg, tmp_path / "straight", **QUIET)
    # Interrupted inside step 6 (5 completed, mid metrics window): the interrupt checkpoint is step 5
    # with the RNG as of the start of step 6, so step 6 is redone with the same draws.
    _interrupt_at(monkeypatch, 6, _raise)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", **QUIET)
    assert load_checkpoint(latest_checkpoint(tmp_path / "cut")).step == 5
    monkeypatch.undo()
    train(cfg, tmp_path / "cut", resume=True, **QUIET)
    _assert_same_run(tmp_path / "straight", tmp_path / "cut")


def test_ctrl_c_without_progress_finishes_the_step_and_checkpoints_it(tmp_path, monkeypatch, tiny_config):
    cfg = tiny_config("tiny-unet", *FAULTS)
    train(cfg, tmp_path / "straight", **QUIET)
    handler = signal.getsignal(signal.SIGINT)
    _interrupt_at(monkeypatch, 7, lambda: os.kill(os.getpid(), signal.SIGINT))
    messages = []
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, log=messages.append)
    # The step in progress completes; the checkpoint is at step 7, not at the progress bar's 0.
    assert load_checkpoint(latest_checkpoint(tmp_path / "cut")).step == 7
    assert any("checkpoint at step 7" in m for m in messages)
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's handler is gone again
    monkeypatch.undo()
    train(cfg, tmp_path / "cut", resume=True, **QUIET)
    _assert_same_run(tmp_path / "straight", tmp_path / "cut")


def test_unwritable_output_is_found_before_training(tmp_path, monkeypatch, tiny_config):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    steps = []
    monkeypatch.setattr(loop, "train_step", lambda *a: steps.append(a) or 0.0)
    with pytest.raises(PermissionError, match=f"cannot write the run directory {blocker / 'run'}: .* is a file"):
        train(tiny_config("tiny-unet", *FAULTS), blocker / "run", **QUIET)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    with pytest.raises(PermissionError, match="checkpoints: .* is a file"):
        train(tiny_config("tiny-unet", *FAULTS), tmp_path / "run", **QUIET)
    assert steps == []
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


def test_metrics_rows_never_outlive_the_newest_checkpoint(tmp_path, monkeypatch, tiny_config):
    real = loop.save_checkpoint
    saves = []

    def failing(*args, **kwargs):
        saves.append(args[1])
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", failing)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_config("tiny-unet", *FAULTS, "train.log_every=1"), tmp_path / "run", **QUIET)
    assert saves == [4, 8]
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4]


def test_resuming_a_finished_run_changes_nothing(tmp_path, tiny_config):
    cfg = tiny_config("tiny-unet", *FAULTS)
    train(cfg, tmp_path / "run", **QUIET)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    result = train(cfg, tmp_path / "run", resume=True, **QUIET)
    assert result["step"] == 8
    assert result["accounting"]["train_images_per_s"] > 0
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before


def test_lowering_train_steps_is_refused_and_changes_nothing(tmp_path, tiny_config):
    train(tiny_config("tiny-unet", *FAULTS), tmp_path / "run", **QUIET)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"train.steps=5 is below step 8 of the newest checkpoint"):
        train(tiny_config("tiny-unet", *FAULTS, "train.steps=5"), tmp_path / "run", resume=True, **QUIET)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before
    assert json.loads(after["config.json"]) == load_checkpoint(latest_checkpoint(tmp_path / "run")).state["config"]


def test_throughput_accumulates_over_resumed_segments(tmp_path, tiny_config):
    # A resumed segment of one step times nothing (its only step is the warm-up): the throughput
    # of the first segment must survive rather than become NaN.
    cfg = tiny_config("tiny-unet", *FAULTS, "train.steps=9")
    train(cfg, tmp_path / "run", stop_at=8, **QUIET)
    first = json.loads((tmp_path / "run" / "accounting.json").read_text())
    train(cfg, tmp_path / "run", resume=True, **QUIET)
    second = json.loads((tmp_path / "run" / "accounting.json").read_text())
    assert first["timed_steps"] == second["timed_steps"] == 7
    assert second["train_images_per_s"] == first["train_images_per_s"] > 0


@pytest.mark.parametrize("damage", [b"\x89PNG\r\n\x1a\n", b"[1, 2]", b'{"timed_steps": '])
def test_a_damaged_accounting_record_is_rebuilt_on_resume(tmp_path, damage, tiny_config):
    # accounting.json is a record the run rebuilds: binary, wrongly shaped or torn, resuming goes on
    # and writes a fresh one (the resumed segment's own throughput).
    cfg = tiny_config("tiny-unet", *FAULTS, "train.steps=9")
    train(cfg, tmp_path / "run", stop_at=8, **QUIET)
    (tmp_path / "run" / "accounting.json").write_bytes(damage)
    train(cfg, tmp_path / "run", resume=True, **QUIET)
    rebuilt = json.loads((tmp_path / "run" / "accounting.json").read_text())
    assert rebuilt["parameters"]["total"] > 0


def test_damaged_metrics_log_is_repaired_on_resume(tmp_path, tiny_config):
    cfg = tiny_config("tiny-unet", *FAULTS, "train.log_every=1")
    train(cfg, tmp_path / "run", stop_at=4, **QUIET)
    train(cfg, tmp_path / "whole", **QUIET)
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    # A blank line, and a row torn mid-write (as a crash leaves it).
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n" + lines[0][:17])
    messages = []
    train(cfg, tmp_path / "run", resume=True, progress=False, log=messages.append)
    assert any(f"{path}: dropped a torn last line" in m for m in messages)
    assert _rows(tmp_path / "run") == _rows(tmp_path / "whole")


def test_a_damaged_row_in_the_middle_is_an_error_naming_the_file(tmp_path, tiny_config):
    cfg = tiny_config("tiny-unet", *FAULTS, "train.log_every=1")
    train(cfg, tmp_path / "run", stop_at=4, **QUIET)
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{path} line 2 is not valid JSON"):
        train(cfg, tmp_path / "run", resume=True, **QUIET)


def test_divergence_message_fits_the_situation(tmp_path, tiny_config):
    # Clipping is on (1.0) and no checkpoint exists yet: the message must say both plainly.
    cfg = tiny_config(
        "tiny-unet", *FAULTS, "train.lr=1e30", "train.grad_clip=1.0", "train.ckpt_every=50", "train.steps=50"
    )
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, tmp_path / "run", **QUIET)
    msg = str(err.value)
    assert "no checkpoint was written yet" in msg
    assert "last good no checkpoint" not in msg
    assert "set train.grad_clip > 0" not in msg and "already clipped to norm 1" in msg
    cfg = tiny_config(
        "tiny-unet", *FAULTS, "train.lr=1e30", "train.grad_clip=0", "train.ckpt_every=1", "train.steps=50"
    )
    with pytest.raises(TrainingDiverged, match=r"kept the last good checkpoint step \d+ .* set train.grad_clip > 0"):
        train(cfg, tmp_path / "run2", **QUIET)


def test_config_json_follows_the_newest_checkpoint_when_steps_are_raised(tmp_path, monkeypatch, tiny_config):
    train(tiny_config("tiny-unet", *FAULTS), tmp_path / "run", **QUIET)
    _interrupt_at(monkeypatch, 1, _raise)  # inside step 9, before any new checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("tiny-unet", *FAULTS, "train.steps=12"), tmp_path / "run", resume=True, **QUIET)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved == load_checkpoint(latest_checkpoint(tmp_path / "run")).state["config"]
    assert saved["train"]["steps"] == 8
    monkeypatch.undo()
    train(tiny_config("tiny-unet", *FAULTS, "train.steps=12"), tmp_path / "run", resume=True, **QUIET)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 12


def test_unwritable_output_is_one_line_from_the_cli(tmp_path, capsys):
    from difflora.cli.commands import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "tiny-unet", "--out", str(blocker / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write the run directory {blocker / 'run'}: {blocker} is a file, not a directory"
