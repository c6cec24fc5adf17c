"""``load_dataset``: the dataset a ``data`` config describes, from one source or built from several.

One dataset (:func:`~difflora.data.dataset.load_source`), several datasets as tasks
(``data.tasks``, :func:`~difflora.data.tasks.load_tasks`), or one dataset paired with condition
images per spatial task (``data.spatial``, :func:`~difflora.data.spatial.load_spatial`). The
builders read their sources through ``load_source``, so the dependencies point one way: this
module, then the builders, then ``dataset.py``.
"""

from __future__ import annotations

from difflora.config.schema import DataConfig
from difflora.data.dataset import ImageDataset, Split, load_source
from difflora.data.spatial import load_spatial
from difflora.data.tasks import load_tasks

__all__ = ["load_dataset"]


def load_dataset(cfg: DataConfig, split: Split) -> ImageDataset:
    """Load one split (``"train"`` or ``"test"``) of the dataset ``cfg`` describes.

    The train split is cut to its first ``cfg.limit`` examples when ``cfg.limit > 0`` (the test split
    never is); images are resized once to ``cfg.image_size`` when it is set. Raises
    :class:`~difflora.data.source.DatasetNotFoundError` (files missing: the message says where it
    looked and how to get them) or :class:`~difflora.data.source.DatasetFormatError` (a file is
    corrupt). With ``cfg.tasks``, the datasets of every task are concatenated; with ``cfg.spatial``,
    every image appears once per spatial task with its condition image.
    """
    if cfg.tasks:
        return load_tasks(cfg, split)
    if cfg.spatial is not None:
        return load_spatial(cfg, split)
    return load_source(cfg, split)
