"""Checkpoints other runs were started from survive retention (difflora.train.dependents): extending
a base, resuming a distillation teacher or pretraining a shared base again keeps the step every
adapter run reads its frozen weights from."""

import errno
import json
import shutil
from pathlib import Path

import pytest

import difflora
import difflora.train.dependents as dependents
from difflora.cli.commands import main
from difflora.train import train
from difflora.train.checkpoint import RetentionWarning, find_checkpoints
from difflora.train.dependents import DEPENDENTS_FILE, DependentsError, UnrecordedDependency, record_dependent

QUIET = {"progress": False, "log": lambda s: None}
LORA = "model.adapters=[{name: lora, condition: t, weighting: linear, num_values: 100, num_bases: 2, rank: 2}]"
BASE = ["train.steps=4", "train.ckpt_every=2", "sample.num=2"]


def _base(root: Path, tiny_config) -> Path:
    run = root / "base"
    train(tiny_config("tiny-unet", *BASE), run, **QUIET)
    return run


def _adapt(base: Path, run: Path, tiny_config) -> Path:
    cfg = tiny_config("tiny-unet", *BASE, LORA, "train.train_base=false", f"train.init_from={base}")
    train(cfg, run, **QUIET)
    return run


def _extend(base: Path, tiny_config, steps: int = 8) -> None:
    train(tiny_config("tiny-unet", *BASE, f"train.steps={steps}"), base, resume=True, **QUIET)


def _steps(run: Path) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in find_checkpoints(run)]


def test_extending_a_base_keeps_the_checkpoint_an_adapter_run_was_started_from(tmp_path, tiny_config):
    base = _base(tmp_path, tiny_config)
    adapted = _adapt(base, tmp_path / "adapted", tiny_config)
    record = json.loads((base / DEPENDENTS_FILE).read_text())
    assert record["dependents"] == {str(adapted.resolve()): {"checkpoint": "step_0000004", "step": 4}}
    with pytest.warns(RetentionWarning, match=r"kept \S+step_0000004: other runs were started from it \(.*adapted\)"):
        _extend(base, tiny_config)
    assert _steps(base) == [4, 6, 8]  # retention keeps two, and the one the adapter run stands on
    _, _, state = difflora.open_run(adapted)
    assert state["base"]["path"].endswith("step_0000004")
    png = tmp_path / "a.png"
    assert main(["sample", str(adapted), "--out", str(png), "--num", "2", "--steps", "2", "--no-progress"]) == 0
    assert png.is_file()
    # Once the dependent run is gone, the next checkpoint of the base lets the step go.
    for path in sorted(adapted.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    adapted.rmdir()
    _extend(base, tiny_config, steps=10)
    assert _steps(base) == [8, 10]


def test_a_base_that_cannot_be_written_warns_and_the_run_still_trains(tmp_path, tiny_config, monkeypatch):
    base = _base(tmp_path, tiny_config)

    def read_only(path, record):
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(dependents, "_write", read_only)
    with pytest.warns(UnrecordedDependency, match=r"cannot record in \S+dependents.json .* keep \S+step_0000004"):
        adapted = _adapt(base, tmp_path / "adapted", tiny_config)
    assert find_checkpoints(adapted) and not (base / DEPENDENTS_FILE).exists()


def test_an_unreadable_record_keeps_every_checkpoint_and_is_never_overwritten(tmp_path, tiny_config):
    base = _base(tmp_path, tiny_config)
    (base / DEPENDENTS_FILE).write_text("{not json")
    with pytest.raises(DependentsError, match=r"dependents.json is not valid JSON"):
        _adapt(base, tmp_path / "adapted", tiny_config)
    assert not (tmp_path / "adapted").exists() and (base / DEPENDENTS_FILE).read_text() == "{not json"
    with pytest.warns(RetentionWarning, match=r"kept every old checkpoint of \S+: \S+dependents.json is not valid"):
        _extend(base, tiny_config)
    assert _steps(base) == [2, 4, 6, 8]


def test_a_base_checkpoint_deleted_while_a_run_starts_from_it_is_an_error(tmp_path, tiny_config):
    base = _base(tmp_path, tiny_config)
    gone = base / "checkpoints" / "step_0000002"
    shutil.rmtree(gone)  # the base's retention ran between the run reading it and the record landing
    with pytest.raises(DependentsError, match=r"step_0000002 was deleted by the retention of \S+base while"):
        record_dependent(gone, tmp_path / "adapted")
