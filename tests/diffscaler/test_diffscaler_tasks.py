"""One model, many tasks (002 section 3.3): task -1 is the base, mixed batches, sequential growth, task files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from difflora.adapters import AdapterLoadError, adapter_parameters, load_adapters, save_adapters
from difflora.cli.commands import main
from difflora.diffscaler import add_tasks, export_task, import_task, num_tasks, remove_task
from difflora.model.build import build_model
from difflora.train import train
from helpers import FROZEN_TASK0, TINY_ARCH, tiny_config

ROOT = Path(__file__).resolve().parents[2]
TOL = dict(rtol=0, atol=1e-5)


def _model(arch: str = "unet", affiner: dict | None = None, seed: int = 0) -> nn.Module:
    cfg = tiny_config(FROZEN_TASK0, TINY_ARCH[arch], {"model.affiner": affiner})
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # a trained base and trained task entries (fresh ones change nothing)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _plain_copy(adapted: nn.Module, arch: str = "unet") -> nn.Module:
    plain = _model(arch, None)
    state = adapted.state_dict()
    own = {k.replace(".base_layer", ""): v for k, v in state.items() if ".adapters." not in k}
    plain.load_state_dict(own)
    return plain


def _inputs(n: int = 8, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 1, 8, 8, generator=g),
        torch.randint(50, (n,), generator=g),
        torch.randint(10, (n,), generator=g),
    )


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_task_minus_one_rows_are_the_base_model_bit_for_bit(arch):
    model = _model(arch, {"tasks": 3})
    plain = _plain_copy(model, arch)
    x, t, y = _inputs()
    task = torch.tensor([-1, 0, -1, 1, 2, -1, 0, -1])
    with torch.no_grad():
        mixed, base = model(x, t, y, task=task), plain(x, t, y)
        everyone = model(x, t, y, task=torch.full((8,), -1))
    assert torch.equal(everyone, base)
    rows = task < 0
    assert torch.equal(mixed[rows], base[rows])
    assert not torch.allclose(mixed[~rows], base[~rows])  # the task rows are adapted


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_a_mixed_task_batch_equals_per_task_batches(arch):
    model = _model(arch, {"tasks": 3})
    x, t, y = _inputs()
    task = torch.tensor([2, 0, 1, 1, -1, 0, 2, 0])
    with torch.no_grad():
        mixed = model(x, t, y, task=task)
        for k in (-1, 0, 1, 2):
            rows = task == k
            alone = model(x[rows], t[rows], y[rows], task=task[rows])
            torch.testing.assert_close(mixed[rows], alone, **TOL)


def test_adding_a_task_keeps_the_old_tasks_bit_identical_under_adamw_with_weight_decay():
    model = _model("unet", {"tasks": 2})
    x, t, y = _inputs()
    old = torch.tensor([0, 1, -1, 0, 1, -1, 0, 1])
    with torch.no_grad():
        before = model(x, t, y, task=old)
    assert add_tasks(model.net) == 2 and num_tasks(model.net) == 3
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(
        ".adapters." in n and "_frozen" not in n for n, p in model.named_parameters() if p.requires_grad
    )
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.5)
    for step in range(3):  # mixed batches: the old tasks' rows are in the loss too
        task = torch.tensor([2, 0, 1, 2, 2, 1, 0, 2])
        loss = model(x, t + step, y, task=task).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(x, t, y, task=old)
        new = model(x, t, y, task=torch.full((8,), 2))
        base = model(x, t, y, task=torch.full((8,), -1))
    assert torch.equal(after, before)
    assert not torch.allclose(new, base)  # task 2 trained away from "no change"


def test_a_bank_with_frozen_entries_round_trips_through_an_adapter_file(tmp_path):
    model = _model("unet", {"tasks": 2})
    add_tasks(model.net)
    with torch.no_grad():
        for p in adapter_parameters(model.net):
            p.add_(torch.randn_like(p) * 0.1)
    save_adapters(model.net, tmp_path / "all")
    fresh = _plain_copy(model)
    load_adapters(fresh.net, tmp_path / "all")
    x, t, y = _inputs()
    task = torch.tensor([0, 1, 2, -1, 2, 1, 0, 2])
    with torch.no_grad():
        assert torch.equal(fresh(x, t, y, task=task), model(x, t, y, task=task))
    assert num_tasks(fresh.net) == 3
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if "_frozen" in n)


def test_export_remove_and_import_a_task(tmp_path):
    model = _model("unet", {"tasks": 3})
    x, t, y = _inputs()
    with torch.no_grad():
        want = model(x, t, y, task=torch.full((8,), 1))
        keep2 = model(x, t, y, task=torch.full((8,), 2))
    export_task(model.net, 1, tmp_path / "task1")
    remove_task(model.net, 1)
    assert num_tasks(model.net) == 2
    with torch.no_grad():  # task 2 is now task 1
        assert torch.equal(model(x, t, y, task=torch.full((8,), 1)), keep2)
    assert import_task(model.net, tmp_path / "task1") == 2
    with torch.no_grad():
        assert torch.equal(model(x, t, y, task=torch.full((8,), 2)), want)
    # In place of an existing task, too; and only onto the base it was exported from.
    assert import_task(model.net, tmp_path / "task1", task=0) == 0
    with torch.no_grad():
        assert torch.equal(model(x, t, y, task=torch.full((8,), 0)), want)
    other = _model("unet", {"tasks": 2}, seed=5)
    with pytest.raises(AdapterLoadError, match="fingerprint"):
        import_task(other.net, tmp_path / "task1")
    assert num_tasks(other.net) == 2  # unchanged on error


def test_frozen_tasks_cannot_be_overwritten_or_removed_out_of_range():
    model = _model("unet", {"tasks": 2})
    add_tasks(model.net)
    with pytest.raises(ValueError, match="0..2"):
        remove_task(model.net, 3)
    remove_task(model.net, 0)  # a frozen task can be removed: the others keep their values
    assert num_tasks(model.net) == 2


def test_parallel_run_then_sample_one_task_and_a_mixed_batch(tmp_path, capsys):
    base_cfg = tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2", "sample.num=2")
    train(base_cfg, tmp_path / "base", progress=False, log=lambda _: None)
    cfg = tiny_config(
        "tiny-unet",
        "data.tasks=[{name: digits, limit: 50}]",
        "model.affiner={tasks: 2, latent: 4}",
        f"train.init_from={tmp_path / 'base'}",
        "train.train_base=false",
        "train.steps=2",
        "train.ckpt_every=2",
        "sample.num=2",
        "sample.steps=2",
    )
    train(cfg, tmp_path / "multi", progress=False, log=lambda _: None)
    run = str(tmp_path / "multi")
    common = ["--num", "4", "--steps", "2", "--no-progress", "--save-tensor"]
    for name, cond in (("one", "task=1"), ("mixed", "task=0,1,-1,1")):
        code = main(
            [
                "sample",
                run,
                *common,
                str(tmp_path / f"{name}.safetensors"),
                "--condition",
                cond,
                "--out",
                str(tmp_path / f"{name}.png"),
            ]
        )
        assert code == 0
    assert (
        main(["sample", run, "--num", "2", "--steps", "2", "--condition", "task=2", "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert "task" in capsys.readouterr().err
