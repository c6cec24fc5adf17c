"""`difflora combine-tasks`: independently trained task runs on one base served by one combined run.

The reference is each source run itself: every task of the combined run must compute exactly what
its own run computed, task -1 the base, and a combined run must be usable wherever a multi-task run
is (sample, eval --task, train.init_from with frozen tasks)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
import torch

from difflora.cli.commands import main
from difflora.config.schema import load_config
from difflora.diffscaler.combine_tasks import CombineError, combine_task_runs
from difflora.eval.target import task_config
from difflora.train import CheckpointError, RunExistsError, latest_checkpoint, open_run, train
from difflora.train.run_lock import RunLocked
from helpers import tiny_config

QUIET = dict(progress=False, log=lambda _: None)
SHORT = ["train.steps=2", "train.ckpt_every=2", "sample.num=2", "sample.steps=2", "train.lr=0.02"]
ADAPT = ["train.train_base=false", "data.task_id=0"]


def _train(out: Path, *overrides: str) -> Path:
    train(tiny_config("tiny-unet", *SHORT, *overrides), out, **QUIET)
    return out


def _model(run: Path, weights: str = "ema"):
    """The run's model as sample and eval load it (the newest checkpoint, base included)."""
    return open_run(run, weights)[1]


def _inputs(n: int = 6):
    """Noisy 8x8 images, timesteps and labels (x, t, y), fixed by seed."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, torch.randint(100, (n,), generator=g), torch.randint(10, (n,), generator=g)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A plain base; Affiner runs on digits, on MNIST-5k and a two-task one, each from that base."""
    tmp = tmp_path_factory.mktemp("combine")
    base = _train(tmp / "base", "data.limit=40")
    on_base = [f"train.init_from={base}", *ADAPT]
    aff = "model.affiner={tasks: 1, latent: 4}"
    return {
        "tmp": tmp,
        "base": base,
        "digits": _train(tmp / "digits", aff, "data.limit=40", *on_base),
        "mnist": _train(tmp / "mnist", aff, "data.name=mnist-5k", "data.image_size=8", "data.limit=40", *on_base),
        "two": _train(
            tmp / "two",
            "model.affiner={tasks: 2, latent: 4}",
            "data.limit=40",
            "data.tasks=[{name: mnist-5k, limit: 30}]",
            "train.seed=1",
            *on_base,
        ),
    }


def test_every_combined_task_computes_what_its_own_run_computed(runs):
    out = combine_task_runs([runs["digits"], runs["two"], runs["mnist"]], runs["tmp"] / "combined", log=lambda _: None)
    x, t, y = _inputs()
    for weights in ("ema", "model"):
        combined = _model(out, weights)
        own = {name: _model(runs[name], weights) for name in ("digits", "two", "mnist")}
        own["base"] = _model(runs["base"])  # the adapted runs start from the base's EMA weights
        # task id in the combined run -> (source run, task id there), in the order the runs were given
        where = {0: ("digits", 0), 1: ("two", 0), 2: ("two", 1), 3: ("mnist", 0), -1: ("base", None)}
        with torch.no_grad():
            for task, (name, there) in where.items():
                got = combined(x, t, y, task=torch.full((6,), task))
                kw = {} if there is None else {"task": torch.full((6,), there)}
                assert torch.equal(got, own[name](x, t, y, **kw)), (weights, task)
            # One batch mixing every task: each row is its task's output.
            mix = torch.tensor([3, -1, 0, 2, 1, 0])
            mixed = combined(x, t, y, task=mix)
            for task in mix.unique().tolist():
                rows = mix == task
                torch.testing.assert_close(mixed[rows], combined(x[rows], t[rows], y[rows], task=mix[rows]))
    cfg = load_config(out / "config.json")
    assert cfg.model.affiner.tasks == 4
    assert [cfg.data.name, *[d.name for d in cfg.data.tasks]] == ["digits", "digits", "mnist-5k", "mnist-5k"]
    # eval --task K scores each task against its own dataset, drawn with its own task id.
    assert (task_config(cfg, 2).data.name, task_config(cfg, 2).data.task_id) == ("mnist-5k", 2)
    assert task_config(cfg, 3).data.name == "mnist-5k" and task_config(cfg, 1).data.name == "digits"
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert [m["tasks"] for m in state["combined_from"]] == [[0], [1, 2], [3]]
    assert (
        state["base"]["fingerprint"]
        == json.loads((latest_checkpoint(runs["digits"]) / "state.json").read_text())["base"]["fingerprint"]
    )


def test_the_cli_combines_then_samples_a_mixed_batch_and_refuses_to_resume(runs, capsys):
    out = runs["tmp"] / "cli-combined"
    assert main(["combine-tasks", str(runs["digits"]), str(runs["mnist"]), "--out", str(out)]) == 0
    assert "1 = mnist-5k" in capsys.readouterr().out
    grid = runs["tmp"] / "mixed.png"
    args = ["sample", str(out), "--num", "4", "--steps", "2", "--condition", "task=0,1,-1,1", "--out", str(grid)]
    assert main(args) == 0 and grid.is_file()
    with pytest.raises(CheckpointError, match="combined run"):
        train(load_config(out / "config.json", ["train.steps=4"]), out, resume=True, **QUIET)


def test_a_combined_run_grows_by_one_task_in_the_sequential_regime(runs):
    combined = combine_task_runs([runs["digits"], runs["mnist"]], runs["tmp"] / "seq-combined", log=lambda _: None)
    third = _train(
        runs["tmp"] / "seq-third",
        "model.affiner={tasks: 3, latent: 4, frozen_tasks: 2}",
        "data.task_id=2",
        "data.limit=40",
        f"train.init_from={combined}",
        "train.train_base=false",
    )
    x, t, y = _inputs()
    grown, before = _model(third), _model(combined)
    with torch.no_grad():
        for task in (0, 1, -1):
            cond = torch.full((6,), task)
            assert torch.equal(grown(x, t, y, task=cond), before(x, t, y, task=cond))


def test_runs_that_cannot_share_one_model_are_refused_and_nothing_is_written(runs):
    tmp = runs["tmp"]
    aff = "model.affiner={tasks: 1, latent: 4}"
    on_base = [f"train.init_from={runs['base']}", *ADAPT, "data.limit=40"]
    other_base = _train(tmp / "base2", "data.limit=40", "train.seed=7")
    cases = {
        "stores every weight": runs["base"],
        "outside its task banks": _train(tmp / "bitfit", aff, "train.base_groups=[bias]", *on_base),
        "differ in model.affiner": _train(tmp / "wide", "model.affiner={tasks: 1, latent: 8}", *on_base),
        "every label dropped": _train(tmp / "label-free", aff, "train.label_dropout=1.0", *on_base),
        "only runs on one base": _train(
            tmp / "on-base2", aff, f"train.init_from={other_base}", *ADAPT, "data.limit=40"
        ),
        "no task banks": _train(
            tmp / "plain-lora", "model.adapters=[{name: lora, condition: t, weighting: shared}]", *on_base
        ),
    }
    for reason, run in cases.items():
        with pytest.raises(CombineError, match=reason):
            combine_task_runs([runs["digits"], run], tmp / "refused", log=lambda _: None)
    with pytest.raises(CombineError, match="at least two runs"):
        combine_task_runs([runs["digits"]], tmp / "refused")
    assert not (tmp / "refused").exists()
    assert not list(tmp.glob(".tmp-*"))
    (tmp / "taken").mkdir()
    with pytest.raises(RunExistsError, match="already exists"):
        combine_task_runs([runs["digits"], runs["mnist"]], tmp / "taken")


def test_a_second_combine_into_one_out_is_refused_and_the_combined_run_pins_its_base(runs):
    tmp = runs["tmp"]
    busy = tmp / ".tmp-busy"  # where another combine-tasks into --out busy is writing
    busy.mkdir()
    (busy / "lock").write_text(json.dumps({"pid": 7, "host": "h", "command": "difflora combine-tasks", "started": "x"}))
    (busy / "half-written").write_text("")
    fd = os.open(busy / "lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(RunLocked, match=r"is being written by pid 7 on h \(difflora combine-tasks\)"):
            combine_task_runs([runs["digits"], runs["mnist"]], tmp / "busy", log=lambda _: None)
    finally:
        os.close(fd)  # that process ends: its leftovers are cleared by the next combine-tasks
    out = combine_task_runs([runs["digits"], runs["mnist"]], tmp / "busy", log=lambda _: None)
    assert not busy.exists() and sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "lock"]
    record = json.loads((runs["base"] / "dependents.json").read_text())["dependents"]
    assert record[str(out.resolve())]["checkpoint"] == latest_checkpoint(runs["base"]).name
