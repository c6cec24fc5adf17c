"""LDM-style transformer blocks with cross-attention to a context (``model.attention: cross``).

Latent Diffusion / Stable Diffusion condition their U-Net through *spatial transformers*: at each
attention site, GroupNorm, a 1x1 conv into tokens, transformer blocks, a zero-initialised 1x1 conv
back, and a residual. Each transformer block is (Rombach et al., ``BasicTransformerBlock``)::

    x = x + attn1(norm1(x))                 # self-attention over the T tokens
    x = x + attn2(norm2(x), context)        # cross-attention: queries from x, keys/values from context [N x L x D_ctx]
    x = x + ff(norm3(x))                    # feed-forward with GEGLU: W_out (a * gelu(g)), [a, g] = W_in x

The DiT variant keeps DiT's adaLN-Zero: the three norms have no affine parameters and the time
vector c [N x D] gives a shift, scale and gate per sub-layer (9 D numbers, zero-initialised, so
every block starts as the identity); the class enters through the context only.

The context comes from :class:`ContextEmbedder` (``tokens`` learned vectors per class label, and a
learned null context for ``y == -1``: the unconditional branch of classifier-free guidance) or
from the caller (``net(x, t, y, context=...)``).

Taps (position adapters, 004's positions; the names of ``difflora.adapters.positions``), in
forward order, all [N x T x D] except ``context`` [N x L x D_ctx]:

    attn1_in (block input, 004's SA_in)  attn1_out (self-attention's output, SA_out)
    attn2_in (after the first residual, CA_in)  context (CA_c)  attn2_out (CA_out)
    ff_in (after the second residual, FFN_in)  ff_out (FFN_out)  out (block output, Trans_out)

004 writes an adapter's output into the residual stream, where adding at SA_out equals adding at
CA_in (addition commutes), so the output positions are attn1_in, attn2_in, context, ff_in and
out, and an output lies at or after its input: :data:`TRANSFORMER_TAP_PAIRS` lists the 17 valid
(input, output) pairs of this block (with the ResBlock's in->in, in->out, out->out: 004's 20).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from difflora.nets.layers import dot_product_attention, group_norm, zero_module

__all__ = [
    "TRANSFORMER_TAP_PAIRS",
    "ContextEmbedder",
    "CrossAttention",
    "FeedForward",
    "SpatialTransformer",
    "TransformerBlock",
]

# 004's valid (input, output) positions inside one transformer block (see the module docstring).
TRANSFORMER_TAP_PAIRS: tuple[tuple[str, str], ...] = (
    *(("attn1_in", d) for d in ("attn1_in", "attn2_in", "ff_in", "out")),
    *(("attn1_out", d) for d in ("attn2_in", "ff_in", "out")),
    ("context", "context"),
    *(("attn2_in", d) for d in ("attn2_in", "ff_in", "out")),
    *(("attn2_out", d) for d in ("ff_in", "out")),
    ("ff_in", "ff_in"),
    ("ff_in", "out"),
    ("ff_out", "out"),
    ("out", "out"),
)


class CrossAttention(nn.Module):
    """Multi-head attention of x [N x T x D] over a context [N x L x D_ctx] (itself when None).

    ``to_q`` (D -> D), ``to_k`` and ``to_v`` (D_ctx -> D) have no bias, ``to_out`` (D -> D) has one,
    as LDM's CrossAttention; heads split the D channels into ``heads`` groups of D / heads.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention: {dim} channels are not divisible by num_heads={heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """:param x: [N x T x D]. :param context: [N x L x D_ctx] or None. :return: [N x T x D]."""
        ctx = x if context is None else context
        n, t, d = x.shape
        h = self.heads

        def heads(z: torch.Tensor) -> torch.Tensor:  # (N, S, D) -> (N, heads, S, D/heads)
            return z.reshape(n, z.shape[1], h, d // h).transpose(1, 2)

        out = dot_product_attention(heads(self.to_q(x)), heads(self.to_k(ctx)), heads(self.to_v(ctx)))
        return self.to_out(out.transpose(1, 2).reshape(n, t, d))


class FeedForward(nn.Module):
    """GEGLU feed-forward on [N x T x D]: ``out(a * gelu(g))`` with ``[a, g] = proj(x)`` (D -> 2 inner)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention over a context, GEGLU feed-forward, each pre-norm and residual.

    ``cond_dim`` None: LDM's block (affine LayerNorms). ``cond_dim`` set: DiT's adaLN-Zero, where
    ``adaLN_modulation(c)`` gives (shift, scale, gate) for each of the three sub-layers. Taps and
    valid adapter pairs: see the module docstring.
    """

    TAPS = ("attn1_in", "attn1_out", "attn2_in", "context", "attn2_out", "ff_in", "ff_out", "out")
    TAP_PAIRS = TRANSFORMER_TAP_PAIRS
    tap_layout = "channels_last"

    def __init__(self, dim: int, heads: int, context_dim: int, inner: int, cond_dim: int | None = None) -> None:
        super().__init__()
        adaln = cond_dim is not None
        self.norm1, self.norm2, self.norm3 = (
            nn.LayerNorm(dim, elementwise_affine=not adaln, eps=1e-6 if adaln else 1e-5) for _ in range(3)
        )
        self.attn1 = CrossAttention(dim, heads)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.ff = FeedForward(dim, inner)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 9 * dim)) if adaln else None
        for tap in self.TAPS:
            setattr(self, f"tap_{tap}", nn.Identity())
        self.tap_channels = {**dict.fromkeys(self.TAPS, dim), "context": context_dim}

    def forward(self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """:param x: [N x T x D]. :param context: [N x L x D_ctx]. :param c: [N x cond_dim] (adaLN only).
        :return: [N x T x D]."""
        if self.adaLN_modulation is None:
            mods = [(None, None, None)] * 3
        else:
            m = self.adaLN_modulation(c).unsqueeze(1).chunk(9, dim=-1)  # each (N, 1, D)
            mods = [m[0:3], m[3:6], m[6:9]]

        def pre(norm: nn.LayerNorm, h: torch.Tensor, mod) -> torch.Tensor:
            shift, scale, _ = mod
            return norm(h) if shift is None else norm(h) * (1 + scale) + shift

        def gated(h: torch.Tensor, mod) -> torch.Tensor:
            return h if mod[2] is None else mod[2] * h

        x = self.tap_attn1_in(x)
        a = self.tap_attn1_out(self.attn1(pre(self.norm1, x, mods[0])))
        x = self.tap_attn2_in(x + gated(a, mods[0]))
        context = self.tap_context(context)
        a = self.tap_attn2_out(self.attn2(pre(self.norm2, x, mods[1]), context))
        x = self.tap_ff_in(x + gated(a, mods[1]))
        f = self.tap_ff_out(self.ff(pre(self.norm3, x, mods[2])))
        return self.tap_out(x + gated(f, mods[2]))


class SpatialTransformer(nn.Module):
    """LDM's spatial transformer for the U-Net: [N x C x H x W] -> tokens -> ``depth`` blocks -> back, residual.

    ``norm`` (GroupNorm, eps 1e-6), ``proj_in`` (1x1 conv), ``transformer_blocks``, ``proj_out``
    (zero-initialised 1x1 conv, so a fresh block is the identity). Position adapters target the
    blocks inside (``...transformer_blocks.0``).
    """

    def __init__(self, channels: int, heads: int, context_dim: int, ff_mult: float, depth: int = 1) -> None:
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        inner = int(channels * ff_mult)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim, inner) for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """:param x: [N x C x H x W]. :param context: [N x L x D_ctx]. :return: [N x C x H x W]."""
        n, c, hgt, wid = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (N, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(n, c, hgt, wid)
        return x + self.proj_out(h)


class ContextEmbedder(nn.Module):
    """Class labels -> context tokens: ``tokens`` learned D-vectors per class, and a learned null context.

    ``embedding`` has ``num_classes + 1`` rows of ``tokens * dim`` numbers; row ``num_classes`` is
    the null context, used where ``y == -1`` (and for every row when ``y`` is None), so an
    unconditional net (``num_classes == 0``) attends to one learned context.
    """

    def __init__(self, num_classes: int, tokens: int, dim: int) -> None:
        super().__init__()
        self.num_classes, self.tokens, self.dim = num_classes, tokens, dim
        self.embedding = nn.Embedding(num_classes + 1, tokens * dim)

    def null(self, n: int) -> torch.Tensor:
        """The null context repeated for n samples, [N x L x D]."""
        return self.embedding.weight[self.num_classes].view(1, self.tokens, self.dim).expand(n, -1, -1)

    def forward(self, y: torch.Tensor | None, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """The context [N x L x D] of a batch of n samples.

        :param y: [N] labels (-1 = null) or None (all null, unless ``context`` is given).
        :param context: a caller's context [N x L x D] used for every row, except rows with
            ``y == -1``, which get the null context (so classifier-free guidance works with it).
        """
        device = self.embedding.weight.device
        if context is None:
            labels = torch.full((n,), self.num_classes, device=device) if y is None else y.to(device)
            labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
            return self.embedding(labels).view(n, self.tokens, self.dim)
        if context.ndim != 3 or context.shape[0] != n or context.shape[2] != self.dim:
            raise ValueError(
                f"context must be [N x L x {self.dim}] with N = {n} (model.context.dim = {self.dim}), "
                f"got {list(context.shape)}"
            )
        if y is None or not bool((y < 0).any()):
            return context
        if context.shape[1] != self.tokens:
            raise ValueError(
                f"rows with y = -1 get the null context of {self.tokens} token(s), but the context given has "
                f"{context.shape[1]}; pass y >= 0 for every row or a context of {self.tokens} token(s)"
            )
        null = (y < 0).to(device)[:, None, None]
        return torch.where(null, self.null(n).to(context.dtype), context)
