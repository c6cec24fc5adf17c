"""Multi-dataset runs: several datasets concatenated, each sample carrying its task index.

``data.tasks`` lists more datasets after the run's own (``data.name`` is task 0, ``data.tasks[k]``
is task k + 1), the setting of DiffScaler (one Affiner parameter set per task, chosen per
sample) and of multi-task adapters::

    data:
      name: digits
      image_size: 16
      tasks:
        - {name: fashion-mnist, limit: 5000}

Every task's images are resized to the run's image size (``data.image_size``, else task 0's
native size) and must have task 0's number of channels (the config checks it). The loaded
:class:`~difflora.data.dataset.ImageDataset` holds all samples in task order and the condition
``task`` (int64 [N]); ``ds.batch_conditions(idx)`` gives ``{"task": [B]}`` for a batch, which the
model receives as a keyword argument and adapters reading condition ``task`` route on.

Labels (``data.task_labels``): ``shared`` keeps each dataset's labels, so one class embedding
serves every task and class names are joined per label (``"0|T-shirt/top"``); ``offset`` gives
task k the labels after those of tasks 0..k-1 (``"1:fashion-mnist:Trouser"`` is label 11 after
digits' ten).
"""

from __future__ import annotations

import torch

from difflora.config.schema import DataConfig
from difflora.data.dataset import ImageDataset, Split, load_source

__all__ = ["load_tasks", "task_configs"]


def task_configs(cfg: DataConfig) -> list[DataConfig]:
    """One single-dataset config per task (task 0 first), each at the run's image size."""
    size, _ = cfg.resolved_shape()
    first = cfg.model_copy(update={"tasks": [], "task_id": None})
    rest = [
        DataConfig(
            name=t.name,
            root=t.root,
            limit=t.limit,
            image_size=size,
            hflip=cfg.hflip,
            channels=t.channels,
            index_cache=cfg.index_cache if t.name == "image-folder" else None,
        )
        for t in cfg.tasks
    ]
    return [first, *rest]


def _labels_and_names(parts: list[ImageDataset], mode: str) -> tuple[torch.Tensor, list[str]]:
    if mode == "offset":
        offsets = torch.tensor([0] + [p.num_classes for p in parts[:-1]]).cumsum(0)
        labels = torch.cat([p.labels + int(o) for p, o in zip(parts, offsets, strict=True)])
        names = [f"{k}:{p.name}:{n}" for k, p in enumerate(parts) for n in p.class_names]
        return labels, names
    width = max(p.num_classes for p in parts)
    names = []
    for i in range(width):
        # dict.fromkeys: one entry per distinct name, in task order ("0" for every digit-like task).
        names.append("|".join(dict.fromkeys(p.class_names[i] for p in parts if i < p.num_classes)))
    return torch.cat([p.labels for p in parts]), names


def load_tasks(cfg: DataConfig, split: Split) -> ImageDataset:
    """Load split ``split`` of every task of ``cfg`` and concatenate them (task 0 first).

    Returns an ImageDataset with ``conditions["task"]`` int64 [N] (the task index of each sample)
    and labels as ``cfg.task_labels`` says. ``data.limit`` applies to task 0, ``tasks[k].limit``
    to task k + 1 (train split only, as for one dataset).
    """
    parts = [load_source(c, split) for c in task_configs(cfg)]
    shapes = {tuple(p.images.shape[1:]) for p in parts}
    # The config checks channels and every task is resized to one size, so this cannot differ.
    assert len(shapes) == 1, f"tasks loaded with different image shapes {shapes}"
    labels, names = _labels_and_names(parts, cfg.task_labels)
    first = cfg.task_id or 0  # data.task_id numbers data.name's task; the others follow it
    task = torch.cat([torch.full((len(p),), first + k, dtype=torch.long) for k, p in enumerate(parts)])
    return ImageDataset(
        torch.cat([p.images for p in parts]),
        labels,
        names,
        name="+".join(p.name for p in parts),
        hflip=cfg.hflip,
        conditions={"task": task},
    )
