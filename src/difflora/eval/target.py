"""What an evaluation scores against: the dataset and task its samples are drawn and scored with
(a multi-task run's ``--task K``, another dataset with ``--against``), where it is written, and
the error a request that cannot be served raises."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from difflora.config.schema import DATASET_SHAPES, Config, DatasetName

__all__ = ["EvalError", "against_config", "default_eval_dir", "scored_config", "task_config"]


class EvalError(ValueError):
    """A bad evaluation request (no run, no checkpoint, bad settings); the message says what to do."""


def default_eval_dir(
    run_dir: str | Path, teacher: bool = False, task: int | None = None, against: str | None = None
) -> Path:
    """Where an evaluation is written unless ``out`` says otherwise."""
    name = "eval-teacher" if teacher else "eval"
    name = name if task is None else f"{name}-task{task}"
    return Path(run_dir) / (name if against is None else f"{name}-vs-{against}")


def scored_config(cfg: Config, task: int | None, against: str | None) -> Config:
    """The config an evaluation samples and scores with: ``task`` or ``against`` applied."""
    return task_config(cfg, task) if against is None else against_config(cfg, against, task)


def task_config(cfg: Config, task: int | None) -> Config:
    """``cfg`` with data.name replaced by task ``task``'s dataset: the split its samples are scored
    against and the task id they are drawn with (``data_conditions``). None: the run's own task,
    data.name's, scored against data.name alone (not every task's split: its samples are all
    drawn as data.name's task). Offset class labels keep every task's split under None: the
    balanced labels then span every task's classes."""
    d = cfg.data
    offset_classes = d.task_labels == "offset" and cfg.model.num_classes and cfg.train.label_dropout < 1
    if task is None:
        if not d.tasks or offset_classes:
            return cfg
        task = d.task_id or 0
    if d.spatial is not None:
        raise EvalError("--task: a run with spatial tasks scores every one of them already (one entry each)")
    if d.task_id is None and not d.tasks:
        raise EvalError("--task: this run has no task condition (data.task_id, data.tasks); evaluate it without --task")
    first = d.task_id or 0
    known = {first: None} | {first + k + 1: t for k, t in enumerate(d.tasks)}
    if task not in known:
        raise EvalError(
            f"--task {task}: the run's config names the datasets of tasks {sorted(known)} only (data.name is task "
            f"{first}); a task trained in another run is scored from that run's directory"
        )
    if offset_classes:
        raise EvalError(
            "--task: this run numbers each task's classes after the previous tasks' (data.task_labels: offset), "
            "and eval's balanced labels span every class; score a run with shared labels or trained label-free"
        )
    t = known[task]
    if t is None:  # data.name's own task: its split alone
        return cfg.model_copy(update={"data": d.model_copy(update={"tasks": [], "task_id": first})})
    # data.tasks are resized to the run's image size (data.image_size may be unset: data.name's own).
    update = {"name": t.name, "root": t.root, "limit": t.limit, "task_id": task, "tasks": []}
    data = d.model_copy(update=update | {"image_size": cfg.model.image_size})
    return cfg.model_copy(update={"data": data})


def against_config(cfg: Config, against: str, task: int | None) -> Config:
    """``cfg`` scored against dataset ``against``: its held-out split at the run's image size, with the
    run's own task condition, sampled unconditionally (the null label alone, as for a run trained with
    every label dropped: the run's classes are not ``against``'s, so there is no class accuracy)."""
    if task is not None:
        raise EvalError(f"--against {against} with --task {task}: --task already names the dataset; pass one of them")
    if cfg.data.spatial is not None:
        raise EvalError(
            "--against: a run with spatial tasks samples from condition images of its own dataset; evaluate it without --against"
        )
    if cfg.model.num_classes and cfg.train.label_dropout <= 0:
        raise EvalError(
            "--against samples unconditionally (the null label), and this run never trained the null label "
            "(train.label_dropout 0); evaluate it without --against"
        )
    names = get_args(DatasetName)
    if against not in names:
        raise EvalError(f"--against {against}: not a dataset; choose one of {', '.join(names)}")
    if against == "image-folder":
        raise EvalError("--against image-folder: a folder has no held-out split to name here; use a named dataset")
    channels = DATASET_SHAPES[against][1]
    if channels != cfg.model.in_channels:
        raise EvalError(
            f"--against {against}: its images have {channels} channel(s), the run's model {cfg.model.in_channels}"
        )
    d = cfg.data
    task_id = d.task_id if d.task_id is not None else (0 if d.tasks else None)  # keep the run's own task
    update = {"name": against, "root": None, "limit": 0, "tasks": [], "task_id": task_id}
    data = d.model_copy(update=update | {"image_size": cfg.model.image_size})
    train_cfg = cfg.train.model_copy(update={"label_dropout": 1.0})  # default_labels: unconditional
    return cfg.model_copy(update={"data": data, "train": train_cfg})
