"""Multi-dataset runs (data.tasks): concatenation in task order, per-sample task ids, labels, errors.

References: each task's samples are those of loading that dataset alone (same split, limit and
size); the task ids and label offsets are written out by hand from the task sizes.
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from difflora.config.schema import ConfigError, DataConfig, load_config, parse_config
from difflora.data import load_dataset


def write_idx_mnist(root, n_train=7, n_test=3, side=6, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (
            ("images-idx3", rng.integers(0, 256, (n, side, side), dtype=np.uint8)),
            ("labels-idx1", rng.integers(0, 10, n, dtype=np.uint8)),
        ):
            header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))


def test_tasks_concatenate_in_order_with_task_ids(tmp_path):
    write_idx_mnist(tmp_path / "mnist")
    cfg = DataConfig(name="digits", limit=20, tasks=[{"name": "mnist", "root": str(tmp_path / "mnist")}])
    ds = load_dataset(cfg, "train")
    digits = load_dataset(DataConfig(name="digits", limit=20), "train")
    mnist = load_dataset(DataConfig(name="mnist", root=str(tmp_path / "mnist"), image_size=8), "train")
    assert len(ds) == 27 and ds.images.shape[1:] == (1, 8, 8)
    assert torch.equal(ds.images[:20], digits.images) and torch.equal(ds.images[20:], mnist.images)
    # shared labels: each dataset keeps its own
    assert torch.equal(ds.labels, torch.cat([digits.labels, mnist.labels]))
    assert ds.conditions["task"].tolist() == [0] * 20 + [1] * 7
    assert ds.class_names[3] == "3" and ds.num_classes == 10
    idx = torch.tensor([0, 19, 20, 26, 5])
    assert ds.batch_conditions(idx)["task"].tolist() == [0, 0, 1, 1, 0]
    x, y, cond = ds.batch_with_conditions(idx)
    assert torch.equal(x, ds.images[idx]) and torch.equal(y, ds.labels[idx]) and cond["task"].dtype == torch.int64
    # the test split concatenates the test splits: 359 digits + 3 written images
    test = load_dataset(cfg, "test")
    assert len(test) == 359 + 3 and test.conditions["task"][-3:].tolist() == [1, 1, 1]


def test_offset_labels_are_disjoint(tmp_path):
    cfg = DataConfig(name="digits", limit=10, tasks=[{"name": "digits", "limit": 5}], task_labels="offset")
    ds = load_dataset(cfg, "train")
    first = load_dataset(DataConfig(name="digits", limit=10), "train").labels
    second = load_dataset(DataConfig(name="digits", limit=5), "train").labels
    assert ds.labels.tolist() == first.tolist() + (second + 10).tolist()
    assert ds.num_classes == 20 and ds.class_names[0] == "0:digits:0" and ds.class_names[13] == "1:digits:3"


def test_single_dataset_has_no_conditions_and_draws_nothing():
    ds = load_dataset(DataConfig(name="digits", limit=8), "train")
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert ds.conditions == {} and ds.batch_conditions(torch.arange(4)) == {}
    assert torch.equal(g.get_state(), state)


def test_batch_conditions_draw_no_random_numbers():
    ds = load_dataset(DataConfig(name="digits", limit=8, hflip=True, tasks=[{"name": "digits", "limit": 8}]), "train")
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    idx = torch.randint(16, (6,), generator=a)
    torch.randint(16, (6,), generator=b)
    x1, _, c1 = ds.batch_with_conditions(idx, generator=a)
    x2, _ = ds.batch(idx, generator=b)
    assert torch.equal(x1, x2) and torch.equal(a.get_state(), b.get_state())
    assert c1["task"].tolist() == (idx >= 8).long().tolist()


def test_task_config_errors_name_the_key():
    with pytest.raises(
        ConfigError, match=r"data\.tasks\[0\]\.name: cifar10 has 3 channel\(s\) but task 0 \(digits\) has 1"
    ):
        parse_config({"data": {"tasks": [{"name": "cifar10"}]}})
    with pytest.raises(ConfigError, match=r"data\.tasks\.0\.name: input should be"):
        parse_config({"data": {"tasks": [{"name": "imagenet"}]}})
    with pytest.raises(ConfigError, match=r"data\.tasks\.0\.hflip: unknown key"):
        parse_config({"data": {"tasks": [{"name": "digits", "hflip": True}]}})
    cfg = load_config(None, ["data.tasks=[{name: digits, limit: 3}]"])
    assert cfg.data.tasks[0].limit == 3


def test_condition_names_of_a_dataset_are_checked():
    from difflora.data import ImageDataset

    with pytest.raises(ValueError, match="identifier other than t and y"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ["a"], conditions={"t": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"must be \[N\] with N = 2"):
        ImageDataset(
            torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ["a"], conditions={"task": torch.zeros(3)}
        )
