"""The ``data`` section: which dataset (or image folder), at which size and channels, with which
extra tasks and spatial conditions. Imported and re-exported by ``difflora.config.schema``; like it,
this imports nothing of difflora but the config base."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from difflora.config.base import StrictModel, hold_fixed

__all__ = ["DATASET_SHAPES", "DataConfig", "DatasetName", "SpatialConfig", "TaskDataConfig", "resolve_channels"]


# Native (image_size, channels) of each dataset; None where the files decide (image folders).
DATASET_SHAPES: dict[str, tuple[int | None, int]] = {
    "digits": (8, 1),
    "mnist": (28, 1),
    "fashion-mnist": (28, 1),
    "mnist-5k": (28, 1),
    "cifar10": (32, 3),
    "image-folder": (None, 3),
}

DatasetName = Literal["digits", "mnist", "fashion-mnist", "mnist-5k", "cifar10", "image-folder"]


class TaskDataConfig(StrictModel):
    """One more dataset of a multi-dataset run (``data.tasks``); its samples carry its task index."""

    name: DatasetName
    """The dataset of this task."""
    root: str | None = None
    """Directory holding its files (unset: the dataset's default location)."""
    # First N training examples of this dataset (0 = all).
    limit: int = Field(default=0, ge=0)
    """Use only its first N training examples (0: all)."""
    channels: Literal[1, 3] | None = None  # as data.channels
    """An image folder's channels: 1 (grayscale) or 3 (RGB), as data.channels."""


SpatialTask = Literal["edges", "lowres", "inpaint"]


class SpatialConfig(StrictModel):
    """Spatial conditioning tasks (DiffScaler 002 section 3.4, ``difflora.data.spatial``): each clean
    image appears once per task, paired with the condition image the task computes from it."""

    # Task k of this list has task id data.task_id + k (0 + k when unset).
    tasks: list[SpatialTask] = Field(min_length=1)
    """The spatial tasks (edges, lowres, inpaint); task k gets task id data.task_id + k."""
    # lowres: the side of the block-mean image the condition shows (upsampled to the model size).
    lowres: int = Field(default=4, ge=1)
    """lowres: the side of the block-mean image the condition shows."""
    # inpaint: the side of the masked (unknown) centre square, as a fraction of the image side.
    hole: float = Field(default=0.5, gt=0, lt=1)
    """inpaint: the side of the masked centre square as a fraction of the image side."""
    # edges: None keeps the Sobel magnitude (in [0, 1]); a number gives binary edges above it.
    edge_threshold: float | None = Field(default=None, gt=0, lt=1)
    """edges: binary edges above this Sobel magnitude (unset: the magnitude itself)."""

    @model_validator(mode="after")
    def _check(self) -> SpatialConfig:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"data.spatial.tasks: give each task at most once, got {self.tasks}")
        return self

    def channels(self, image_channels: int) -> int:
        """Channels of the condition image: one slot per task (edges and lowres: C, inpaint: C + 1 for the mask)."""
        return sum(image_channels + (t == "inpaint") for t in self.tasks)


class DataConfig(StrictModel):
    name: DatasetName = "digits"
    """The training dataset."""
    # Directory holding the files; None means the dataset's default location (see data/).
    root: str | None = None
    """Directory holding the dataset's files (unset: its default location)."""
    # Resize to this side length (bilinear, antialiased); None keeps the native size.
    image_size: int | None = Field(default=None, ge=4, le=1024)
    """Resize images to this side length (unset: the native size)."""
    hflip: bool = False
    """Flip training images horizontally at random."""
    # Restrict training to the first N examples (0 = all); handy for quick experiments.
    limit: int = Field(default=0, ge=0)
    """Train on the first N examples only (0: all)."""
    # Multi-dataset training: more datasets, tasks 1..K (the dataset above is task 0). Every sample
    # carries its task index as the per-sample condition ``task``; images are resized to the run's
    # image size and must have its number of channels.
    tasks: list[TaskDataConfig] = Field(default_factory=list)
    """More datasets trained together, tasks 1..K (data.name is task 0); each sample carries its task."""
    # Class labels of a multi-dataset run: "shared" keeps each dataset's own labels (class 3 of
    # every task is label 3: one class embedding serves all tasks, as when adapting a base model);
    # "offset" numbers the classes of task k after those of tasks 0..k-1 (disjoint labels).
    task_labels: Literal["shared", "offset"] = "shared"
    """Class labels across tasks: shared (each dataset's own) or offset (disjoint, numbered after the previous tasks')."""
    # The task id of data.name's samples (data.tasks[k] then get task_id + k + 1). None: 0 with
    # data.tasks, and no task condition for a single dataset. Set it to adapt to one dataset as a
    # task of a multi-task model (DiffScaler: model.affiner), e.g. the new task of the sequential regime.
    task_id: int | None = Field(default=None, ge=0)
    """The task id of data.name's samples (unset: 0 with data.tasks, none for a single dataset)."""
    # Spatial conditioning (edge map / low-res / masked centre -> image), one task id per spatial task.
    spatial: SpatialConfig | None = None
    """Spatial conditioning tasks (edge map, low-res, masked centre -> image)."""
    # An image folder read as 1 (grayscale) or 3 (RGB, default) channels; other datasets: their own.
    channels: Literal[1, 3] | None = None
    """An image folder read as 1 (grayscale) or 3 (RGB) channels."""
    # Decoding processes of a streamed image folder (difflora.data.stream); None: min(4, CPUs/process - 1).
    workers: int | None = Field(default=None, ge=0)
    """Decoding processes of a streamed image folder (unset: min(4, CPUs per process - 1))."""
    # Folder of image-folder indexes (difflora.data.folder_index); None: $DIFFLORA_CACHE/image-folders.
    index_cache: str | None = None
    """Folder of image-folder indexes (unset: $DIFFLORA_CACHE/image-folders)."""

    def resolved_shape(self) -> tuple[int | None, int]:
        return (self.image_size or DATASET_SHAPES[self.name][0]), resolve_channels(self, "data")

    @property
    def streams(self) -> bool:
        """Whether training reads this data from disk batch by batch (one image folder), not from memory."""
        return self.name == "image-folder" and not self.tasks and self.spatial is None

    @model_validator(mode="after")
    def _check_tasks(self) -> DataConfig:
        size, channels = self.resolved_shape()
        for k, task in enumerate(self.tasks, start=1):
            c = resolve_channels(task, f"data.tasks[{k - 1}]")
            if c != channels:
                fix = {task.name: f"data.tasks[{k - 1}].channels={channels}", self.name: f"data.channels={c}"}
                fix = f" (an image folder reads as either: set {fix['image-folder']})" if "image-folder" in fix else ""
                raise ValueError(
                    f"data.tasks[{k - 1}].name: {task.name} has {c} channel(s) but task 0 ({self.name}) has "
                    f"{channels}; every task of a run needs the same number of channels{fix}"
                )
            if size is None:
                raise ValueError("data.image_size: required with data.tasks when data.name=image-folder")
        if self.spatial is not None and (self.tasks or self.hflip):
            raise ValueError(
                "data.spatial: spatial tasks pair each image with its own condition image; remove data.tasks "
                "and data.hflip (a flip would no longer match its condition)"
            )
        if self.spatial is not None and size is not None and size < self.spatial.lowres:
            raise ValueError(f"data.spatial.lowres ({self.spatial.lowres}) exceeds the image size ({size})")
        if not self.streams:  # only one image folder streams; no folder, no index
            hold_fixed(self, "data", {"workers": None}, "a run that does not stream one image folder")
        if "image-folder" not in {self.name, *(t.name for t in self.tasks)}:
            hold_fixed(self, "data", {"index_cache": None}, "a run without an image folder")
        return self


def resolve_channels(data: DataConfig | TaskDataConfig, where: str) -> int:
    """The channels ``data`` is read with: a folder's ``channels`` (3 when unset), else the dataset's own."""
    native = DATASET_SHAPES[data.name][1]
    fixed = {"channels": native} if data.name != "image-folder" or data.channels is None else {}
    hold_fixed(data, where, fixed, f"{where}.name={data.name} ({native} channel(s))")
    return data.channels
