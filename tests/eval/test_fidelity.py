"""Condition-fidelity scores of spatial tasks (difflora.eval.fidelity) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflora.config.schema import DataConfig, SpatialConfig
from difflora.data.spatial import centre_mask, sobel_magnitude
from difflora.eval.fidelity import (
    edge_correlation,
    edge_f1,
    known_region_mse,
    lowres_psnr,
    psnr,
    spatial_requests,
    task_fidelity,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def _step(column: int) -> torch.Tensor:
    """A 4x4 image, -1 left of ``column`` and 1 from it on: Sobel edges on columns column-1 and column."""
    img = torch.full((1, 1, 4, 4), -1.0)
    img[..., column:] = 1.0
    return img


def test_edge_f1_by_hand():
    clean = _step(2)  # edges on columns 1, 2 (8 pixels)
    shifted = _step(1)  # edges on columns 0, 1: 4 of its 8 pixels agree
    flat = torch.zeros(1, 1, 4, 4)
    assert edge_f1(clean, clean).item() == 1.0
    assert edge_f1(shifted, clean).item() == pytest.approx(2 * 4 / (8 + 8))
    assert edge_f1(flat, clean).item() == 0.0
    assert edge_f1(flat, flat).item() == 1.0  # nothing to draw, nothing drawn
    both = edge_f1(torch.cat([clean, shifted]), torch.cat([clean, clean]))
    assert both.tolist() == pytest.approx([1.0, 0.5])


def test_edge_correlation_is_pearson_of_the_sobel_magnitudes():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 6, 6, generator=g), torch.rand(2, 1, 6, 6, generator=g)
    want = [np.corrcoef(sobel_magnitude(a)[i].flatten(), sobel_magnitude(b)[i].flatten())[0, 1] for i in range(2)]
    torch.testing.assert_close(edge_correlation(a, b), torch.tensor(want, dtype=torch.float32), **TOL)
    assert edge_correlation(torch.zeros(1, 1, 4, 4), _step(2)).item() == 0.0


def test_lowres_psnr_by_hand():
    clean = torch.zeros(1, 1, 8, 8)
    sample = clean + 0.2  # every 4x4 block mean off by 0.2: MSE 0.04, PSNR 10 log10(4 / 0.04) = 20 dB
    assert lowres_psnr(sample, clean, 2).item() == pytest.approx(20.0, rel=1e-5)
    # Detail inside the blocks that keeps their means does not count.
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2 * 2.0 - 1.0
    assert lowres_psnr(checker.expand(1, 1, 8, 8), clean, 2).item() == 100.0  # identical means: the cap
    assert psnr(torch.tensor(1.0)).item() == pytest.approx(10 * math.log10(4))


def test_known_region_error_ignores_the_hole():
    clean = torch.zeros(2, 1, 8, 8)
    mask = centre_mask(8, 0.5)
    sample = clean + 0.5 + 3.0 * (1 - mask)  # off by 0.5 on the known region, by 3.5 in the hole
    torch.testing.assert_close(known_region_mse(sample, clean, mask), torch.tensor([0.25, 0.25]))


def test_task_fidelity_keys_and_values():
    cfg = SpatialConfig(tasks=["edges", "lowres", "inpaint"], lowres=2)
    clean = _step(2).expand(1, 1, 4, 4)
    assert task_fidelity("edges", clean, clean, cfg) == {"edge_f1": 1.0, "edge_corr": pytest.approx(1.0)}
    assert task_fidelity("lowres", clean + 0.2, clean, cfg)["lowres_psnr"] == pytest.approx(20.0, rel=1e-5)
    inp = task_fidelity("inpaint", clean + 0.5, clean, cfg)
    assert inp["known_mse"] == pytest.approx(0.25) and inp["known_psnr"] == pytest.approx(10 * math.log10(16))


def test_spatial_requests_condition_every_task_on_the_same_heldout_images():
    data = DataConfig(name="digits", spatial={"tasks": ["edges", "inpaint"]}, task_id=1)
    reqs = spatial_requests(data, 12)
    assert [(r.task, r.task_id) for r in reqs] == [("edges", 1), ("inpaint", 2)]
    assert torch.equal(reqs[0].clean, reqs[1].clean) and reqs[1].spatial.shape == (12, 3, 8, 8)
    assert spatial_requests(DataConfig(name="digits"), 12) == []
