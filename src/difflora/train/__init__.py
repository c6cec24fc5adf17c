"""Training: the loop, its objectives, checkpoints, EMA, and adapting a trained model (init_from)."""

from difflora.train.base import load_base
from difflora.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    select_checkpoint,
)
from difflora.train.ema import EMA
from difflora.train.loop import TrainingDiverged, TrainState, resolve_device, train
from difflora.train.objectives import OBJECTIVES, Batch, DiffusionObjective, Objective, build_objective
from difflora.train.run_dir import RunDirNotWritable, RunExistsError, load_run_config
from difflora.train.run_loader import open_run

__all__ = [
    "EMA",
    "OBJECTIVES",
    "Batch",
    "CheckpointError",
    "DiffusionObjective",
    "Objective",
    "RunDirNotWritable",
    "RunExistsError",
    "TrainState",
    "TrainingDiverged",
    "build_objective",
    "latest_checkpoint",
    "load_base",
    "load_checkpoint",
    "load_run_config",
    "load_weights",
    "open_run",
    "resolve_device",
    "select_checkpoint",
    "train",
]
