"""Small building blocks shared by the U-Net and DiT backbones.

Everything here is plain PyTorch and knows nothing about diffusion: a sinusoidal embedding of a
scalar per sample, an initialiser that zeroes a module, a float32 GroupNorm, the attention product
every network computes with, and the null-label handling both networks share (``y == -1`` means
"no class conditioning for this sample").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BaseExtension",
    "GroupNorm32",
    "count_parameters",
    "dot_product_attention",
    "group_norm",
    "masked_label_embedding",
    "timestep_embedding",
    "zero_module",
]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in improved-diffusion and DiT.

    :param t: [N] tensor of timesteps (any real dtype).
    :param dim: output width; an odd width gets one trailing zero column.
    :return: [N x dim] float32 tensor, ``[cos(t f_0), ..., cos(t f_{h-1}), sin(t f_0), ...]`` with
        ``f_i = max_period ** (-i / h)``, ``h = dim // 2``.
    """
    half = dim // 2
    # Frequencies in float32 on t's device; the product is taken in float32 too so that t = 999
    # keeps its precision even when the network itself runs in half precision.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [N x heads x T x d], k and v [N x heads x S x d] -> [N x heads x T x d].

    The same product by the kernel measured fastest for the device and dtype (docs/speed.md):

    * on a GPU, ``scaled_dot_product_attention`` (its fused kernels);
    * on a CPU in bf16, written out with the softmax in float32 (improved-diffusion's math): the
      CPU's SDPA kernels in bf16 took 1.3x to 3x as long on the U-Net's, DiT's and cross-attention's
      shapes;
    * on a CPU otherwise, ``scaled_dot_product_attention`` on contiguous inputs: its CPU flash kernel
      takes them only (a strided view, as the U-Net's head split, falls back to the slower math path).
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v)
    if q.dtype == torch.bfloat16:
        weight = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.softmax(weight.float(), dim=-1).to(weight.dtype) @ v
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it (the residual branch starts as identity)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class BaseExtension(nn.Module):
    """A module a base network's checkpoint does not have (the spatial condition input, a ControlNet
    branch): it starts with zero effect, and adapter code treats its parameters as the adapters'
    own (trained when the base is frozen, new when ``train.init_from`` loads a base, stored with the
    adapters in a run's checkpoints)."""


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (improved-diffusion's fp16 habit)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5) -> GroupNorm32:
    """improved-diffusion's ``normalization``: 32 groups.

    When ``channels`` is not a multiple of 32 (tiny test nets with 16 or 24 channels) the number of
    groups falls back to ``gcd(32, channels)``. The parameter count (2 * channels) is the same
    either way, and every paper configuration uses multiples of 32, so those are unchanged.
    ``eps``: torch's default; LDM's spatial transformer uses 1e-6.
    """
    if channels % groups:
        groups = math.gcd(groups, channels)
    return GroupNorm32(groups, channels, eps=eps)


def masked_label_embedding(table: nn.Embedding, y: torch.Tensor) -> torch.Tensor:
    """Embed class labels where the null label (-1) embeds to a zero vector.

    Used by the U-Net, whose class embedding has one row per class and no null row (the
    unconditional branch adds no class embedding). Batched: no Python loop over samples.

    :param table: embedding with one row per class, [num_classes x D].
    :param y: [N] int64 labels in {-1, 0, ..., num_classes - 1}.
    :return: [N x D] embeddings, rows with ``y == -1`` exactly zero.
    """
    keep = y >= 0
    emb = table(torch.where(keep, y, torch.zeros_like(y)))
    return emb * keep[:, None].to(emb.dtype)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
