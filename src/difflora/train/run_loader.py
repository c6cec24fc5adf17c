"""Opening a trained run: its config and the model holding one checkpoint's weights.

:func:`open_run` is the one way to load a run for sampling, evaluation, export and plots
(``difflora.open_run``)::

    cfg, model, meta = open_run("runs/digits")            # newest intact checkpoint, EMA weights
    cfg, model, meta = open_run("runs/digits", "model", checkpoint=1000)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflora.config.schema import Config
from difflora.model.build import build_model
from difflora.train.checkpoint import CheckpointError, load_weights, select_checkpoint
from difflora.train.run_dir import load_run_config

__all__ = ["misfit", "open_run"]


def misfit(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``own`` ('' if nothing),
    in one line: torch's own message lists every key over many lines."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape, e.g. {k}: {list(state[k].shape)} vs {list(own[k].shape)}")
    return "; ".join(parts)


def open_run(
    run_dir: str | Path, weights: str = "ema", checkpoint: str | int | Path | None = None
) -> tuple[Config, nn.Module, dict[str, Any]]:
    """(config, model in eval mode, the checkpoint's state.json) of a run directory.

    ``weights``: ``ema`` or ``model``; ``checkpoint``: None for the newest intact one, a step or a
    checkpoint directory (:func:`~difflora.train.checkpoint.select_checkpoint`). Raises
    FileNotFoundError when ``run_dir`` is not a run, :class:`CheckpointError` when it holds no
    usable checkpoint or the weights do not fit the run's config.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = select_checkpoint(run_dir, checkpoint)
    state, meta = load_weights(ckpt, weights)
    model = build_model(cfg)
    problem = misfit(model.state_dict(), state)
    if problem:
        raise CheckpointError(
            f"the weights in {ckpt} do not fit the model of {run_dir / 'config.json'} ({problem}); "
            "the checkpoint belongs to another config"
        )
    model.load_state_dict(state)
    model.eval()
    return cfg, model, meta
