"""Training: the loop, checkpoints and EMA."""

from difflora.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_weights
from difflora.train.ema import EMA
from difflora.train.loop import RunExistsError, TrainingDiverged, load_run_config, resolve_device, train

__all__ = [
    "EMA",
    "CheckpointError",
    "RunExistsError",
    "TrainingDiverged",
    "latest_checkpoint",
    "load_checkpoint",
    "load_run_config",
    "load_weights",
    "resolve_device",
    "train",
]
