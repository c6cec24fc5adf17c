"""The trackers a run logs to besides ``metrics.jsonl`` (``train.trackers``): TensorBoard, wandb offline.

Process 0 of a training opens them (:class:`Trackers`) and logs, at each step's number:

    scalars   train/<key> of every metrics row (loss, its terms, lr, images_per_s)
    images    samples/grid: every sample grid the run writes (samples/step_*.png), the PNG's own pixels
    text      config: the resolved config (config.json) as YAML, once per training segment

``tensorboard`` writes ``RUN_DIR/tb``; ``wandb`` (the ``wandb`` extra) runs offline in
``RUN_DIR/wandb``, never over the network (``wandb sync`` uploads it later if one wants).
``difflora eval`` adds its scores and grids to a run that has a TensorBoard log
(:func:`log_evaluation`, tags ``eval/<key>/...``, at the checkpoint's step).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from difflora.config.schema import Config, config_to_dict
from difflora.optional import require

__all__ = ["Trackers", "check_trackers", "log_evaluation"]


def _pixels(path: Path) -> np.ndarray:
    """A PNG as an H x W x 3 uint8 array (grayscale grids repeated over the three channels)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _config_text(cfg: Config) -> str:
    # TensorBoard's text plugin renders markdown: an indented block keeps the YAML as written.
    return "\n".join("    " + line for line in yaml.safe_dump(config_to_dict(cfg), sort_keys=False).splitlines())


def check_trackers(cfg: Config) -> None:
    """Raise MissingDependencyError (one line naming the extra) when a tracker's package is missing:
    asked before a run directory is touched."""
    if "wandb" in cfg.train.trackers:
        require("wandb", "train.trackers=wandb", extra="wandb")


class _TensorBoard:
    """``RUN_DIR/tb``; the resolved config as the text ``config`` at the segment's first step."""

    def __init__(self, out: Path, cfg: Config, step: int):
        # Heavy import (tensorboard, protobuf): only when a run logs.
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events a crash left past its checkpoint.
        self.writer = SummaryWriter(str(out / "tb"), purge_step=step)
        self.writer.add_text("config", _config_text(cfg), step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.writer.add_image(tag, _pixels(path), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """An offline wandb run; the resolved config is the wandb run's config."""

    def __init__(self, out: Path, cfg: Config):
        # Offline whatever the environment says, and no error reports sent: nothing leaves the machine.
        os.environ["WANDB_MODE"] = "offline"
        os.environ["WANDB_ERROR_REPORTING"] = "false"
        wandb = require("wandb", "train.trackers=wandb", extra="wandb")
        self.wandb = wandb
        settings = wandb.Settings(mode="offline", silent=True, console="off", disable_git=True, x_disable_stats=True)
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        # One id per run directory: the segments of a resumed run are one run when synced.
        run_id = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(
            dir=str(out),
            project="difflora",
            name=out.name,
            id=run_id,
            resume="allow",
            config=config_to_dict(cfg),
            settings=settings,
        )

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()
        # finish() returns before wandb's service process has written the whole record; teardown
        # waits for it, so the record is complete when train() returns.
        self.wandb.teardown()


class Trackers:
    """The trackers ``train.trackers`` names, opened for a run in ``out`` about to train from ``step``
    (process 0), the resolved config logged; a context manager that closes them."""

    def __init__(self, out: Path, cfg: Config, step: int):
        self.backends: list[Any] = []
        try:
            for name in dict.fromkeys(cfg.train.trackers):  # a tracker named twice logs once
                self.backends.append(_TensorBoard(out, cfg, step) if name == "tensorboard" else _Wandb(out, cfg))
        except BaseException:
            self.close()
            raise

    def scalars(self, row: dict[str, Any], step: int) -> None:
        """A metrics row under ``train/<key>`` (its ``step`` is the step itself)."""
        values = {f"train/{k}": float(v) for k, v in row.items() if k != "step"}
        for b in self.backends:
            b.scalars(values, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """The PNG at ``path`` (a sample grid) as image ``tag``."""
        for b in self.backends:
            b.image(tag, path, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_evaluation(run_dir: Path, name: str, result: dict[str, Any], grids: dict[str, Path]) -> bool:
    """An evaluation's scores and grids into the run's TensorBoard log, at the checkpoint's step, under
    ``eval/<name>/`` (``name``: its key); False (nothing written) when the run has no TensorBoard log."""
    if not (run_dir / "tb").is_dir():
        return False
    from torch.utils.tensorboard import SummaryWriter  # heavy import: only when there is a log

    step = int(result["checkpoint_step"])
    with SummaryWriter(str(run_dir / "tb")) as writer:
        for entry in result["results"]:
            at = f"w{entry['guidance']:g}" + (f"_{entry['task']}" if "task" in entry else "")
            for metric in ("fd", "kid_mean", "precision", "recall", "class_accuracy"):
                if metric in entry:
                    writer.add_scalar(f"eval/{name}/{metric}@{at}", entry[metric], step)
            if entry["grid"] in grids:
                writer.add_image(f"eval/{name}/samples@{at}", _pixels(grids[entry["grid"]]), step, dataformats="HWC")
    return True
