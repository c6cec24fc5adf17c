"""Spatial conditioning tasks (DiffScaler 002 section 3.4): condition images computed from clean images.

``data.spatial`` (:class:`~difflora.config.schema.SpatialConfig`) turns one dataset into several
image-to-image tasks, mixed in one dataset and one batch. Every clean image appears once per task,
paired with the condition image that task computes from it:

=========  ============================================================  ================
task       condition                                                      channels
=========  ============================================================  ================
edges      Sobel gradient magnitude / 8 in [0, 1] (a step from -1 to 1    C
           gives 1), or binary edges above ``edge_threshold``
lowres     block means at ``lowres`` x ``lowres`` (4 x 4), upsampled      C
           back to the image size by nearest neighbour
inpaint    the known region (the image outside a centred square hole of   C + 1
           side ``hole`` x size, zero inside it) and the mask (1 = known)
=========  ============================================================  ================

The condition image of a sample has one channel slot per task, in ``data.spatial.tasks`` order,
and only its own task's slot is filled (the others are zero): the condition channels of each
task meet their own input weights, so the tasks share no input parameters (which also tells the
ControlNet baseline, which has no task id, which task a sample belongs to). Condition ``spatial``
([N x C_s x H x W]) and condition ``task`` ([N], task id ``data.task_id + k`` for task k) are
per-sample conditions of the loaded :class:`~difflora.data.dataset.ImageDataset`; how the model
reads them is in ``docs/spatial-tasks.md``.

Everything is computed once when the dataset is loaded, batched over all images of a task (one
pass per task, no per-sample Python). Sobel borders replicate the edge pixel, which for a 3 x 3
kernel is ``scipy.ndimage.sobel``'s default ``mode="reflect"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflora.config.schema import DataConfig, SpatialConfig
from difflora.data.dataset import ImageDataset, Split, load_source

__all__ = [
    "block_means",
    "centre_mask",
    "edge_map",
    "grid_indices",
    "heldout_conditions",
    "load_spatial",
    "lowres_image",
    "slot",
    "sobel_magnitude",
    "spatial_conditions",
]

# Sobel kernel for the derivative along W (cross-correlation, as F.conv2d computes); its
# transpose differentiates along H. Numbers, not a tensor: a tensor made at import would land on
# whatever default device is active then (e.g. "meta" while `difflora params` builds a model).
_SOBEL_W = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude ``sqrt(g_h^2 + g_w^2)`` of [N x C x H x W] -> [N x C x H x W].

    Borders replicate the edge pixel (``scipy.ndimage.sobel(..., mode="reflect")`` for this kernel).
    """
    n, c, h, w = images.shape
    x = F.pad(images.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    sobel_w = torch.tensor(_SOBEL_W, dtype=images.dtype, device=images.device)
    kernel = torch.stack([sobel_w.T, sobel_w]).unsqueeze(1)  # (2, 1, 3, 3): d/dH, d/dW
    grad = F.conv2d(x, kernel)  # (N*C, 2, H, W)
    return grad.square().sum(1).sqrt().reshape(n, c, h, w)


def edge_map(images: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """Edges of images in [-1, 1], [N x C x H x W] -> [N x C x H x W] in [0, 1].

    The Sobel magnitude / 8 (a vertical step from -1 to 1 has magnitude 8), clamped to 1; with
    ``threshold``, binary: 1 where that value exceeds it (a Canny-like thresholded Sobel, without
    non-maximum suppression).
    """
    m = (sobel_magnitude(images) / 8.0).clamp_(max=1.0)
    return m if threshold is None else (m > threshold).to(images.dtype)


def block_means(images: torch.Tensor, side: int) -> torch.Tensor:
    """[N x C x H x W] -> [N x C x side x side]: the mean of each of side x side blocks (exact
    block means when ``side`` divides H and W; adaptive average pooling otherwise)."""
    return F.adaptive_avg_pool2d(images, side)


def lowres_image(images: torch.Tensor, side: int) -> torch.Tensor:
    """Block means at side x side, upsampled back to H x W by nearest neighbour: [N x C x H x W]."""
    return F.interpolate(block_means(images, side), size=images.shape[-2:], mode="nearest")


def centre_mask(size: int, hole: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """[size x size] float mask, 1 on the known region and 0 on the centred square hole of side
    ``max(1, round(hole * size))`` (starting at ``(size - side) // 2``)."""
    side = max(1, round(hole * size))
    start = (size - side) // 2
    mask = torch.ones(size, size, device=device)
    mask[start : start + side, start : start + side] = 0.0
    return mask


def _task_condition(task: str, images: torch.Tensor, cfg: SpatialConfig) -> torch.Tensor:
    """One task's condition for [n x C x H x W] images: [n x C x H x W], or [n x (C + 1) x H x W] (inpaint)."""
    if task == "edges":
        return edge_map(images, cfg.edge_threshold)
    if task == "lowres":
        return lowres_image(images, cfg.lowres)
    mask = centre_mask(images.shape[-1], cfg.hole, images.device).to(images.dtype)
    known = images * mask
    return torch.cat([known, mask.expand(images.shape[0], 1, *mask.shape)], dim=1)


def slot(cfg: SpatialConfig, task: str, image_channels: int) -> slice:
    """The channels of task ``task``'s condition within the condition image."""
    start = 0
    for name in cfg.tasks:
        width = image_channels + (name == "inpaint")
        if name == task:
            return slice(start, start + width)
        start += width
    raise ValueError(f"spatial task {task!r} is not one of data.spatial.tasks {cfg.tasks}")


def spatial_conditions(images: torch.Tensor, which: torch.Tensor, cfg: SpatialConfig) -> torch.Tensor:
    """Condition images for [N x C x H x W] clean images: [N x C_s x H x W], ``C_s = cfg.channels(C)``.

    ``which`` [N] int64 is each sample's position in ``cfg.tasks`` (-1: no task, an all-zero
    condition); only that task's channel slot is filled. One batched pass per task.
    """
    n, c, h, w = images.shape
    if which.shape != (n,):
        raise ValueError(f"which must be [N] with N = {n}, got {tuple(which.shape)}")
    out = images.new_zeros(n, cfg.channels(c), h, w)
    for k, task in enumerate(cfg.tasks):
        sel = (which == k).nonzero().squeeze(1)
        if len(sel):
            out[sel, slot(cfg, task, c)] = _task_condition(task, images[sel], cfg)
    return out


def load_spatial(cfg: DataConfig, split: Split) -> ImageDataset:
    """Split ``split`` of ``cfg.name`` once per spatial task: images and labels repeated per task
    (task 0's copy first), with conditions ``task`` [N] and ``spatial`` [N x C_s x H x W]."""
    assert cfg.spatial is not None
    plain = load_source(cfg.model_copy(update={"spatial": None, "task_id": None}), split)
    k, n = len(cfg.spatial.tasks), len(plain)
    which = torch.arange(k).repeat_interleave(n)
    images = plain.images.repeat(k, 1, 1, 1)
    conditions = {"task": which + (cfg.task_id or 0), "spatial": spatial_conditions(images, which, cfg.spatial)}
    return ImageDataset(
        images, plain.labels.repeat(k), plain.class_names, name=f"{plain.name}+spatial", conditions=conditions
    )


def heldout_conditions(
    cfg: DataConfig, task: torch.Tensor, images: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition images for sampling: (spatial [num x C_s x H x W], clean images [num x C x H x W]).

    ``task`` [num] holds task ids (``data.task_id + k``, or -1 for the untouched base: no condition).
    The clean images are ``images`` when given (e.g. a ``--condition-images`` file), else the
    held-out (test) split of ``cfg.name``, sample i taking test image i (cycling).
    """
    assert cfg.spatial is not None
    first, k = cfg.task_id or 0, len(cfg.spatial.tasks)
    valid = (task == -1) | ((task >= first) & (task < first + k))
    if not bool(valid.all()):
        raise ValueError(
            f"task ids {sorted(set(task[~valid].tolist()))} are not spatial tasks of this run; "
            f"choose among {first}..{first + k - 1} ({', '.join(cfg.spatial.tasks)}) or -1 (the base)"
        )
    if images is None:
        pool = load_source(cfg.model_copy(update={"spatial": None, "task_id": None}), "test").images
        images = pool[torch.arange(len(task)) % len(pool)]
    if images.ndim != 4 or len(images) != len(task):
        raise ValueError(f"condition images must be [{len(task)} x C x H x W], got {tuple(images.shape)}")
    which = torch.where(task == -1, task, task - first)
    return spatial_conditions(images, which, cfg.spatial), images


def grid_indices(task: torch.Tensor, num: int) -> torch.Tensor:
    """Indices of ``num`` samples for a grid over tasks: sample i takes the (i // K)-th sample
    (cycling) of the (i % K)-th distinct task id of ``task`` [N]. Returns int64 [num]."""
    values, counts = task.unique(return_counts=True)
    order = torch.argsort(task, stable=True)
    starts = counts.cumsum(0) - counts
    i = torch.arange(num)
    which = i % len(values)
    return order[starts[which] + (i // len(values)) % counts[which]]
