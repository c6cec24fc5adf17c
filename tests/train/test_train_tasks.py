"""The training loop hands the data's per-sample conditions (data.tasks) to the model."""

from __future__ import annotations

from pathlib import Path

import torch

from difflora.train import latest_checkpoint, load_checkpoint, train
from difflora.train.loop import _grid_conditions

ROOT = Path(__file__).resolve().parents[2]
TASK_ADAPTER = (
    "model.adapters=[{name: task, condition: task, weighting: index, num_values: 2, form: shift, targets: [out.2]}]"
)


def test_a_multi_task_run_trains_its_task_adapter_from_the_data(tmp_path, tiny_config):
    cfg = tiny_config(
        "tiny-unet",
        "data.tasks=[{name: digits}]",
        TASK_ADAPTER,
        "train.steps=3",
        "train.lr=0.05",
        "train.train_base=false",
        "train.ckpt_every=3",
        "sample.num=4",
        "sample.steps=2",
    )
    result = train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert result["step"] == 3
    model = load_checkpoint(latest_checkpoint(tmp_path / "run")).model
    shift = [v for k, v in model.items() if k.endswith("adapters.task.shift")]
    assert len(shift) == 1
    # Both tasks were drawn, so both rows of the bank moved away from their zero initialisation.
    assert (shift[0].abs().sum(dim=1) > 0).all()


def test_grid_conditions_cycle_through_every_task():
    class Data:
        conditions = {"task": torch.tensor([2, 0, 0, 1, 2])}

    assert _grid_conditions(Data(), 7)["task"].tolist() == [0, 1, 2, 0, 1, 2, 0]
