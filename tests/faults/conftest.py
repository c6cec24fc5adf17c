"""One tiny trained run and one untrained task-adapter run per session, copied by every fault entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faultkit import TASK_ADAPTER, release_locks

from difflora.config.schema import config_to_dict
from difflora.model.build import build_model
from difflora.train.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_config) -> dict[str, Path]:
    """A trained tiny run (checkpoints at steps 2 and 4) and an untrained run with a task adapter."""
    from difflora.train import train

    root = tmp_path_factory.mktemp("faults")
    cfg = tiny_config("tiny-unet", "train.steps=4", "train.ckpt_every=2", "sample.num=2")
    train(cfg, root / "run", progress=False, log=lambda s: None)
    # The task run is written directly: its checkpoint is a freshly built adapted model.
    tcfg = tiny_config("tiny-unet", TASK_ADAPTER, "sample.num=2")
    model = build_model(tcfg)
    state = model.state_dict()
    opt = torch.optim.AdamW(model.parameters())
    meta = {"config": config_to_dict(tcfg), "ema_updates": 0}
    rng = {"loop": torch.Generator().get_state(), "torch": torch.get_rng_state()}
    save_checkpoint(root / "task", 1, model=state, ema=state, optimizer=opt, rng=rng, meta=meta)
    (root / "task" / "config.json").write_text(json.dumps(config_to_dict(tcfg)))
    return {"run": root / "run", "task": root / "task"}


@pytest.fixture(autouse=True)
def _release_held_locks():
    """Locks a case's damage holds (faultkit.hold_lock) end with the case."""
    yield
    release_locks()
