"""Spatial tasks' condition images (difflora.data.spatial) against naive references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from difflora.config.schema import ConfigError, DataConfig, SpatialConfig
from difflora.data import load_dataset
from difflora.data.spatial import (
    block_means,
    centre_mask,
    edge_map,
    grid_indices,
    heldout_conditions,
    lowres_image,
    slot,
    sobel_magnitude,
    spatial_conditions,
)

TOL = dict(rtol=1e-5, atol=1e-5)
ALL = SpatialConfig(tasks=["edges", "lowres", "inpaint"])


def test_sobel_magnitude_matches_scipy():
    images = torch.rand(3, 2, 9, 7) * 2 - 1
    ref = np.empty(images.shape, dtype=np.float64)
    for n in range(3):
        for c in range(2):
            a = images[n, c].double().numpy()
            ref[n, c] = np.hypot(ndimage.sobel(a, axis=0), ndimage.sobel(a, axis=1))
    torch.testing.assert_close(sobel_magnitude(images), torch.from_numpy(ref).float(), **TOL)


def test_edge_map_of_a_step_is_one_on_the_two_columns_beside_it():
    step = torch.full((1, 1, 4, 4), -1.0)
    step[..., 2:] = 1.0
    want = torch.tensor([0.0, 1.0, 1.0, 0.0]).expand(4, 4)
    torch.testing.assert_close(edge_map(step)[0, 0], want)
    half = step * 0.5  # magnitude 0.5: below a threshold of 0.6, above 0.4
    assert edge_map(half, 0.6).sum() == 0
    torch.testing.assert_close(edge_map(half, 0.4)[0, 0], want)


def test_block_means_and_lowres_by_hand():
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    # Blocks of 2x2: (0+1+4+5)/4 = 2.5, (2+3+6+7)/4 = 4.5, (8+9+12+13)/4 = 10.5, 12.5.
    torch.testing.assert_close(block_means(img, 2)[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    up = lowres_image(img, 2)[0, 0]
    torch.testing.assert_close(up[:2, :2], torch.full((2, 2), 2.5))
    torch.testing.assert_close(up[2:, 2:], torch.full((2, 2), 12.5))
    torch.testing.assert_close(lowres_image(img, 1)[0, 0], torch.full((4, 4), 7.5))


def test_centre_mask_by_hand():
    mask = centre_mask(8, 0.5)
    assert mask.sum() == 64 - 16
    assert mask[2:6, 2:6].sum() == 0 and mask[1].sum() == 8 and mask[:, 6].sum() == 8
    hole = 1 - centre_mask(5, 0.3)  # side round(1.5) = 2, starting at (5 - 2) // 2 = 1
    assert hole.sum() == 4 and hole[1:3, 1:3].sum() == 4


def test_condition_images_fill_only_their_task_slot():
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    which = torch.tensor([0, 1, 2, 2, 1, -1])
    cond = spatial_conditions(images, which, ALL)
    assert cond.shape == (6, 4, 8, 8)
    edges, low, inp = (slot(ALL, t, 1) for t in ALL.tasks)
    assert (edges, low, inp) == (slice(0, 1), slice(1, 2), slice(2, 4))
    torch.testing.assert_close(cond[0, edges], edge_map(images[:1])[0])
    torch.testing.assert_close(cond[[1, 4], low], lowres_image(images[[1, 4]], 4))
    mask = centre_mask(8, 0.5)
    torch.testing.assert_close(cond[[2, 3], 2], images[[2, 3], 0] * mask)
    torch.testing.assert_close(cond[[2, 3], 3], mask.expand(2, 8, 8))
    # Every other slot is zero, and task -1 (the base) has no condition at all.
    assert cond[0, 1:].abs().sum() == 0 and cond[1, [0, 2, 3]].abs().sum() == 0 and cond[2, :2].abs().sum() == 0
    assert cond[5].abs().sum() == 0


def test_a_spatial_dataset_repeats_each_image_once_per_task():
    data = DataConfig(name="digits", spatial={"tasks": ["edges", "inpaint"], "lowres": 2}, task_id=3)
    plain = load_dataset(DataConfig(name="digits"), "test")
    ds = load_dataset(data, "test")
    n = len(plain)
    assert len(ds) == 2 * n and ds.conditions["spatial"].shape == (2 * n, 3, 8, 8)
    assert ds.conditions["task"].tolist() == [3] * n + [4] * n
    torch.testing.assert_close(ds.images[n:], plain.images)
    torch.testing.assert_close(ds.conditions["spatial"][n:, 1], plain.images[:, 0] * centre_mask(8, 0.5))
    x, y, cond = ds.batch_with_conditions(torch.tensor([0, n]))
    assert cond["spatial"].shape == (2, 3, 8, 8) and cond["task"].tolist() == [3, 4]


def test_heldout_conditions_take_test_images_and_check_task_ids():
    data = DataConfig(name="digits", spatial={"tasks": ["lowres"], "lowres": 2})
    spatial, clean = heldout_conditions(data, torch.tensor([0, 0, -1]))
    test = load_dataset(DataConfig(name="digits"), "test").images
    torch.testing.assert_close(clean, test[:3])
    torch.testing.assert_close(spatial[:2], lowres_image(test[:2], 2))
    assert spatial[2].abs().sum() == 0
    with pytest.raises(ValueError, match=r"task ids \[1\] are not spatial tasks.*0\.\.0 \(lowres\)"):
        heldout_conditions(data, torch.tensor([1]))


def test_grid_indices_cycle_over_tasks_and_their_samples():
    task = torch.tensor([5, 7, 5, 7, 7])
    # Task 5 at indices 0, 2; task 7 at 1, 3, 4.
    assert grid_indices(task, 6).tolist() == [0, 1, 2, 3, 0, 4]


# Defaults but digits and a small U-Net; the test adds the spatial settings it checks.
SMALL = ["data.name=digits", "model.unet.model_channels=16", "model.unet.attention_resolutions=[4]"]


def test_config_fills_spatial_channels_and_checks_combinations(tiny_config):
    assert tiny_config({}, *SMALL, "data.spatial={tasks: [edges, lowres, inpaint]}").model.spatial_channels == 4
    assert tiny_config({}, *SMALL).model.spatial_channels == 0
    cases = {
        "data.spatial={tasks: [edges, edges]}": "at most once",
        "data.hflip=true": "remove data.tasks\nand data.hflip",
        "data.tasks=[{name: digits}]": "remove data.tasks",
        "model.arch=dit": "model.arch=unet",
        "data.spatial={tasks: [edges], lowres: 9}": "exceeds the image size",
        "model.affiner={tasks: 2}": "model.affiner.tasks=3",
        "model.spatial_channels=2": "leave it unset",
    }
    for override, message in cases.items():
        extra = [] if override.startswith("data.spatial") else ["data.spatial={tasks: [edges, lowres, inpaint]}"]
        with pytest.raises(ConfigError, match=message.split("\n")[0]):
            tiny_config({}, *SMALL, *extra, override)
