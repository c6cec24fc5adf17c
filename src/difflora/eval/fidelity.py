"""Condition fidelity of spatial tasks: does a sample agree with the condition image it was drawn from?

For a run with ``data.spatial`` (``difflora.data.spatial``), ``difflora eval`` samples every
spatial task with condition images computed from held-out images (sample i from test image i) and
scores, next to FD and the other set metrics, how well each sample follows its condition. Each
score compares the sample with the clean image its condition was computed from, through the same
operator the condition applies (so it measures agreement with the condition, not with the clean
image's other details):

=========  =====================  ==============================================================
task       score                  definition (per sample, then the mean over samples)
=========  =====================  ==============================================================
edges      ``edge_f1``            F1 of the binary edge maps (``edge_map`` above the threshold:
                                  ``data.spatial.edge_threshold``, else :data:`EDGE_THRESHOLD`):
                                  ``2 |S & C| / (|S| + |C|)``, 1 when both are empty
edges      ``edge_corr``          Pearson correlation of the Sobel magnitudes (0 when one is flat)
lowres     ``lowres_psnr``        PSNR in dB of the sample's ``lowres`` x ``lowres`` block means
                                  against the condition's, peak-to-peak 2 (images in [-1, 1]):
                                  ``10 log10(4 / MSE)``, capped at :data:`PSNR_CAP`
inpaint    ``known_mse``          mean squared error on the known region (outside the hole)
inpaint    ``known_psnr``         the same error as PSNR in dB (capped)
=========  =====================  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difflora.config.schema import DataConfig, SpatialConfig
from difflora.data.spatial import block_means, centre_mask, edge_map, heldout_conditions, sobel_magnitude

__all__ = [
    "EDGE_THRESHOLD",
    "PSNR_CAP",
    "SpatialRequest",
    "edge_correlation",
    "edge_f1",
    "known_region_mse",
    "lowres_psnr",
    "psnr",
    "spatial_requests",
    "task_fidelity",
]

# Binary edges for F1 when the run's edges are not thresholded: a Sobel magnitude / 8 above 0.25
# (a step of a quarter of the [-1, 1] range across one pixel).
EDGE_THRESHOLD = 0.25
# PSNR of identical images is infinite; scores are capped so that means stay finite.
PSNR_CAP = 100.0


def psnr(mse: torch.Tensor, peak_to_peak: float = 2.0) -> torch.Tensor:
    """``10 log10(peak_to_peak^2 / mse)`` in dB, elementwise, capped at :data:`PSNR_CAP`."""
    return (10.0 * torch.log10(peak_to_peak**2 / mse)).clamp(max=PSNR_CAP)


def edge_f1(samples: torch.Tensor, clean: torch.Tensor, threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """Per-sample F1 [N] of the binary edges of ``samples`` against those of ``clean`` (both [N x C x H x W])."""
    s = edge_map(samples, threshold).flatten(1)
    c = edge_map(clean, threshold).flatten(1)
    total = s.sum(1) + c.sum(1)
    f1 = 2.0 * (s * c).sum(1) / total.clamp(min=1.0)
    return torch.where(total == 0, torch.ones_like(f1), f1)


def edge_correlation(samples: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson correlation [N] of the Sobel magnitudes (0 where either map is constant)."""
    s = sobel_magnitude(samples).flatten(1)
    c = sobel_magnitude(clean).flatten(1)
    s = s - s.mean(1, keepdim=True)
    c = c - c.mean(1, keepdim=True)
    norm = s.norm(dim=1) * c.norm(dim=1)
    return torch.where(norm > 0, (s * c).sum(1) / norm.clamp(min=1e-30), torch.zeros_like(norm))


def lowres_psnr(samples: torch.Tensor, clean: torch.Tensor, side: int) -> torch.Tensor:
    """Per-sample PSNR [N] (dB) of the side x side block means of ``samples`` against ``clean``'s."""
    mse = (block_means(samples, side) - block_means(clean, side)).square().flatten(1).mean(1)
    return psnr(mse)


def known_region_mse(samples: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE [N] over the pixels where ``mask`` [H x W] is 1 (every channel)."""
    err = (samples - clean).square() * mask
    return err.flatten(1).sum(1) / (mask.sum() * samples.shape[1])


def task_fidelity(task: str, samples: torch.Tensor, clean: torch.Tensor, cfg: SpatialConfig) -> dict[str, float]:
    """The mean scores of one spatial task (module docstring) for samples drawn from the conditions
    of ``clean`` ([N x C x H x W] each, in [-1, 1])."""
    samples, clean = samples.float(), clean.float()
    if task == "edges":
        threshold = cfg.edge_threshold or EDGE_THRESHOLD
        return {
            "edge_f1": float(edge_f1(samples, clean, threshold).mean()),
            "edge_corr": float(edge_correlation(samples, clean).mean()),
        }
    if task == "lowres":
        return {"lowres_psnr": float(lowres_psnr(samples, clean, cfg.lowres).mean())}
    if task == "inpaint":
        mse = known_region_mse(samples, clean, centre_mask(samples.shape[-1], cfg.hole))
        return {"known_mse": float(mse.mean()), "known_psnr": float(psnr(mse).mean())}
    raise ValueError(f"unknown spatial task {task!r}; choose edges, lowres or inpaint")


@dataclass
class SpatialRequest:
    """One spatial task to sample for evaluation: its name, task id, condition images
    [num x C_s x H x W] and the clean held-out images [num x C x H x W] they come from."""

    task: str
    task_id: int
    spatial: torch.Tensor
    clean: torch.Tensor


def spatial_requests(data: DataConfig, num: int) -> list[SpatialRequest]:
    """One request per spatial task of ``data`` (none without ``data.spatial``), each conditioned on
    the first ``num`` held-out images (the same images for every task)."""
    if data.spatial is None:
        return []
    out, first, clean = [], data.task_id or 0, None
    for k, name in enumerate(data.spatial.tasks):
        task = torch.full((num,), first + k, dtype=torch.long)
        spatial, clean = heldout_conditions(data, task, clean)  # the split is read once
        out.append(SpatialRequest(name, first + k, spatial, clean))
    return out
