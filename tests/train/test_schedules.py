"""Learning-rate schedules (train.lr_schedule, train.warmup_steps) and checkpoint retention
(train.keep_checkpoints, train.keep_every), against closed forms and the files a run leaves."""

import json
import math
from pathlib import Path

import pytest
import torch

from difflora.config.schema import TrainConfig
from difflora.train import latest_checkpoint, load_checkpoint, train
from difflora.train.checkpoint import RetentionWarning, find_checkpoints
from difflora.train.dependents import record_dependent
from difflora.train.step import scheduled_lr

QUIET = {"progress": False, "log": lambda s: None}


def _cfg(schedule: str, steps: int = 110, warmup: int = 10) -> TrainConfig:
    return TrainConfig(lr=1e-3, steps=steps, warmup_steps=warmup, lr_schedule=schedule)


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        # Warm-up: step s runs at lr (s+1)/10 whatever the schedule.
        ("constant", 0, 1e-4),
        ("linear", 4, 5e-4),
        ("cosine", 9, 1e-3),
        # After the warm-up, progress p = (s - 10) / 100.
        ("constant", 60, 1e-3),
        ("linear", 10, 1e-3),
        ("linear", 35, 7.5e-4),  # p = 1/4
        ("linear", 60, 5e-4),  # p = 1/2
        ("linear", 109, 1e-5),  # the last step: p = 99/100
        ("cosine", 10, 1e-3),
        ("cosine", 35, 1e-3 * (2 + math.sqrt(2)) / 4),  # (1 + cos(pi/4)) / 2
        ("cosine", 60, 5e-4),  # (1 + cos(pi/2)) / 2
        ("cosine", 85, 1e-3 * (2 - math.sqrt(2)) / 4),  # (1 + cos(3 pi/4)) / 2
    ],
)
def test_each_schedule_matches_its_closed_form(schedule, step, expected):
    assert scheduled_lr(_cfg(schedule), step) == pytest.approx(expected, rel=1e-12)


def test_the_constant_default_gives_the_rates_of_before_bit_for_bit():
    assert TrainConfig().lr_schedule == "constant"
    for warmup in (0, 1, 7):
        cfg = _cfg("constant", steps=50, warmup=warmup)
        for s in range(50):
            before = cfg.lr * min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            assert scheduled_lr(cfg, s) == before  # exact: the rate of the code before schedules


def test_a_schedule_without_warmup_starts_at_lr_and_decays_monotonically():
    rates = [scheduled_lr(_cfg("cosine", steps=20, warmup=0), s) for s in range(20)]
    assert rates[0] == 1e-3 and all(a > b > 0 for a, b in zip(rates, rates[1:], strict=False))


def test_a_run_logs_and_applies_the_scheduled_rate(tmp_path, tiny_config):
    cfg = tiny_config(
        "tiny-unet", "train.steps=6", "train.warmup_steps=2", "train.lr_schedule=linear", "train.log_every=1"
    )
    train(cfg, tmp_path / "run", **QUIET)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lr = cfg.train.lr
    # Steps 0..5: warm-up 1/2, 1; then p = 0, 1/4, 2/4, 3/4 (the logged step is the count of steps done).
    expected = [lr / 2, lr, lr, lr * 3 / 4, lr / 2, lr / 4]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
    groups = load_checkpoint(latest_checkpoint(tmp_path / "run")).state["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(lr / 4, rel=1e-12)  # the last step's rate, stored for resume


def test_resume_across_the_warmup_boundary_is_bit_identical(tmp_path, tiny_config):
    cfg = tiny_config(
        "tiny-unet",
        "train.steps=10",
        "train.ckpt_every=3",
        "train.warmup_steps=4",
        "train.lr_schedule=cosine",
        "model.unet.dropout=0.2",
    )
    train(cfg, tmp_path / "straight", **QUIET)
    train(cfg, tmp_path / "cut", stop_at=3, **QUIET)  # inside the warm-up; the resume crosses step 4
    assert load_checkpoint(latest_checkpoint(tmp_path / "cut")).step == 3
    train(cfg, tmp_path / "cut", resume=True, **QUIET)
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut"))
    assert a.step == b.step == 10
    for name in ("model", "ema"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs after resume"


def test_a_decaying_schedule_refuses_a_resume_that_changes_its_length(tmp_path, tiny_config):
    over = ["train.ckpt_every=2", "train.lr_schedule=linear"]
    train(tiny_config("tiny-unet", "train.steps=2", *over), tmp_path / "run", **QUIET)
    with pytest.raises(ValueError, match=r"train.steps 2 -> 4: train.lr_schedule=linear decays .*train.steps=2"):
        train(tiny_config("tiny-unet", "train.steps=4", *over), tmp_path / "run", resume=True, **QUIET)


def _steps(run: Path) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in find_checkpoints(run)]


def test_retention_keeps_the_newest_and_every_kth(tmp_path, tiny_config):
    over = ["train.steps=10", "train.ckpt_every=1", "sample.num=2"]
    train(tiny_config("tiny-unet", *over, "train.keep_checkpoints=3", "train.keep_every=4"), tmp_path / "a", **QUIET)
    assert _steps(tmp_path / "a") == [4, 8, 9, 10]
    train(tiny_config("tiny-unet", *over, "train.keep_checkpoints=0"), tmp_path / "all", **QUIET)
    assert _steps(tmp_path / "all") == list(range(1, 11))
    train(tiny_config("tiny-unet", *over, "train.keep_checkpoints=1"), tmp_path / "one", **QUIET)
    assert _steps(tmp_path / "one") == [10]


def test_retention_settings_change_on_resume_and_a_pinned_checkpoint_survives(tmp_path, tiny_config):
    over = ["train.ckpt_every=1", "sample.num=2"]
    run = tmp_path / "run"
    train(tiny_config("tiny-unet", "train.steps=3", *over, "train.keep_checkpoints=0"), run, **QUIET)
    dependent = tmp_path / "dependent"
    dependent.mkdir()
    record_dependent(run / "checkpoints" / "step_0000001", dependent)  # another run stands on step 1
    cfg = tiny_config("tiny-unet", "train.steps=6", *over, "train.keep_checkpoints=1", "train.keep_every=3")
    with pytest.warns(RetentionWarning, match=r"kept \S+step_0000001: other runs were started from it"):
        train(cfg, run, resume=True, **QUIET)
    assert _steps(run) == [1, 3, 6]
