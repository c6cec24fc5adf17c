"""DiffScaler from configs and `difflora train`: the sequential regime (task N+1 added to a trained
multi-task run through train.init_from) and incremental classes (model.new_classes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from difflora.cli.commands import main
from difflora.config.schema import load_config
from difflora.model.build import build_model
from difflora.train import latest_checkpoint, load_base, load_weights, train

QUIET = dict(progress=False, log=lambda _: None)
SHORT = ["train.steps=2", "train.ckpt_every=2", "sample.num=2", "sample.steps=2", "train.lr=0.02"]


def _cli_train(out: Path, *overrides: str) -> None:
    args = ["train", "tiny-unet", "--out", str(out), "--no-progress"]
    for o in [*SHORT, *overrides]:
        args += ["--set", o]
    assert main(args) == 0


def _run_model(run: Path):
    """The EMA model of a run, as sampling loads it."""
    cfg = load_config(run / "config.json")
    state, _ = load_weights(latest_checkpoint(run), "ema")
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.eval()


def _inputs(n: int = 6):
    g = torch.Generator().manual_seed(5)
    return (
        torch.randn(n, 1, 8, 8, generator=g),
        torch.randint(100, (n,), generator=g),
        torch.randint(10, (n,), generator=g),
    )


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory):
    """A plain base, then a 2-task Affiner run on it (the parallel regime)."""
    tmp = tmp_path_factory.mktemp("seq")
    _cli_train(tmp / "base")
    aff = "model.affiner={tasks: 2, latent: 4}"
    _cli_train(
        tmp / "two",
        aff,
        "data.tasks=[{name: digits, limit: 40}]",
        f"train.init_from={tmp / 'base'}",
        "train.train_base=false",
    )
    return tmp


def test_task_n_plus_1_trains_through_init_from_and_tasks_0_to_n_stay_bit_identical(two_task_run):
    tmp = two_task_run
    third = tmp / "three"
    _cli_train(
        third,
        "model.affiner={tasks: 3, latent: 4, frozen_tasks: 2}",
        "data.task_id=2",
        "data.limit=40",
        f"train.init_from={tmp / 'two'}",
        "train.train_base=false",
    )
    two, three = _run_model(tmp / "two"), _run_model(third)
    # The stored banks: tasks 0 and 1 are the two-task run's, bit for bit; task 2 trained.
    s2, s3 = two.state_dict(), three.state_dict()
    banks = [k for k in s2 if ".adapters.affiner_" in k]
    assert banks
    for k in banks:
        assert torch.equal(s3[k + "_frozen"], s2[k])
        assert s3[k].shape[0] == 1
    assert any(s3[k].abs().sum() > 0 for k in banks if k.endswith(("shift", "scale")))
    x, t, y = _inputs()
    with torch.no_grad():
        for task in (0, 1, -1):
            cond = torch.full((6,), task)
            assert torch.equal(three(x, t, y, task=cond), two(x, t, y, task=cond))
        assert not torch.equal(three(x, t, y, task=torch.full((6,), 2)), three(x, t, y, task=torch.full((6,), -1)))
    # The new run records the plain base (it stores the old tasks itself) and where they came from.
    record = json.loads((latest_checkpoint(third) / "state.json").read_text())["base"]
    assert Path(record["path"]).parent.parent == (tmp / "base").resolve()
    assert Path(record["adapters_from"]).parent.parent == (tmp / "two").resolve()
    # Resuming re-reads the plain base and restores the stored frozen entries.
    cfg = load_config(third / "config.json", ["train.steps=3"])
    train(cfg, third, resume=True, **QUIET)
    assert torch.equal(_run_model(third).state_dict()[banks[0] + "_frozen"], s2[banks[0]])


def test_frozen_tasks_need_the_run_that_trained_them(two_task_run, tiny_config):
    tmp = two_task_run
    common = ["data.task_id=2", "train.train_base=false", *SHORT]
    cfg = tiny_config(
        "tiny-unet", "model.affiner={tasks: 3, frozen_tasks: 2, latent: 4}", f"train.init_from={tmp / 'base'}", *common
    )
    with pytest.raises(ValueError, match="frozen task entries"):
        train(cfg, tmp / "x1", **QUIET)
    cfg = tiny_config(
        "tiny-unet", "model.affiner={tasks: 4, frozen_tasks: 3, latent: 4}", f"train.init_from={tmp / 'two'}", *common
    )
    with pytest.raises(ValueError, match="frozen_tasks equal its number of tasks"):
        train(cfg, tmp / "x2", **QUIET)
    cfg = tiny_config("tiny-unet", "model.affiner={tasks: 3, latent: 4}", f"train.init_from={tmp / 'two'}", *common)
    with pytest.raises(ValueError, match="is itself an adapter run"):
        train(cfg, tmp / "x3", **QUIET)
    with pytest.raises(ValueError, match="train.train_base=false"):
        build_model(tiny_config("tiny-unet", "model.affiner={tasks: 3, frozen_tasks: 2}", "data.task_id=2"))
    with pytest.raises(ValueError, match="leaves no task to train"):
        tiny_config("tiny-unet", "model.affiner={tasks: 2, frozen_tasks: 2}", "data.task_id=0")


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_new_classes_from_config_sample_as_the_unconditional_base_at_step_0(tmp_path, arch, tiny_config):
    preset = f"tiny-{arch}"
    train(tiny_config(preset, *SHORT), tmp_path / "base", **QUIET)
    base = _run_model(tmp_path / "base")
    # Fashion-MNIST-free stand-in for new data: the same digits offset to labels 10..19 (task 1).
    cfg = tiny_config(
        preset,
        "model.num_classes=20",
        "model.new_classes=10",
        "data.tasks=[{name: digits, limit: 30}]",
        "data.task_labels=offset",
        "data.limit=30",
        f"train.init_from={tmp_path / 'base'}",
        *SHORT,
    )
    # Step 0: the base loaded into the grown model.
    seen = {}
    train(cfg, tmp_path / "grown", stop_at=1, callback=lambda st: seen.setdefault("model", st.model), **QUIET)
    grown = build_model(cfg)
    load_base(grown, tmp_path / "base")
    grown.eval()
    x, t, y = _inputs()
    with torch.no_grad():
        uncond = base(x, t, torch.full((6,), -1))
        assert torch.equal(grown(x, t, y), base(x, t, y))  # the old classes: the base, bit for bit
        for new in (10, 15, 19):
            assert torch.equal(grown(x, t, torch.full((6,), new)), uncond)
    # Training moved the new rows only; the old table stayed the base's.
    state = seen["model"].state_dict()
    table = "net.label_emb" if arch == "unet" else "net.y_embedder.embedding_table"
    assert torch.equal(state[f"{table}.weight"], base.state_dict()[f"{table}.weight"])
    assert state[f"{table}.new_rows"].abs().sum() > 0
    with pytest.raises(ValueError, match="must be below model.num_classes"):
        build_model(tiny_config(preset, "model.new_classes=10"))
