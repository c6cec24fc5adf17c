"""The router: apply a bank of adapter entries to a batch, each sample with its own mixture.

Every form (low-rank, low-rank with activation, weight scale, bias shift, position adapters) asks
the router for its parameters routed to the batch; the router never builds a weight per sample
and never loops over samples or bank entries in Python. A :class:`Route` is what a weighting
returns for one batch, a mixture over the bank:

* **sparse** (index, linear weightings): each sample uses K (1 or 2) entries, ``index`` [N x K],
  ``weight`` [N x K]. The router *gathers* those K entries per sample (``index_select``, whose
  backward is an ``index_add``, rather than advanced indexing, whose CPU backward is a slow
  accumulate-put).
* **dense** (trainable weighting): ``weight`` [N x num_bases]. The router applies every entry once,
  shared by the batch, and *mixes* per sample.

Two kinds of routed parameters cover every form:

* per-channel vectors (weight scale ``a``, bias shift ``b``, a position adapter's output bias):
  :meth:`Route.vectors` gives ``sum_i w_i(c_n) v_i`` as [N x d];
* rank-space factor pairs ``up act(down x)`` (low-rank, low-rank with activation, position
  adapters' f): :func:`rank_term` routes a bank and :func:`add_rank_terms` applies the terms of a
  layer: ``h = down x`` (in rank space, [N x L x K r] or [N x (num_bases r) x L]), ``act(h)``, the
  per-sample weights scale rank space (N x K r numbers, not the gathered up factors), then
  ``out += up h`` added into the output. The linear-weighting interpolation is over branches,
  ``sum_k w_k s_k up_k act(down_k x)``, which equals ``B A x`` mixing for the identity activation.

A wrapped layer collects what its live branches add in one :class:`LayerTerms` (each form adds
its own term, ``forms.py``) and applies them in one fixed order: scales, rank terms, shifts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Geometry",
    "LayerTerms",
    "RankTerm",
    "Route",
    "SparseLowRank",
    "add_rank_terms",
    "per_channel",
    "per_row",
    "rank_term",
]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class Geometry:
    """Layout of a branch's input and output.

    ``kind``: ``"linear"`` (features last, [N x ... x F]), ``"pointwise"`` (channels first,
    [N x C x ...], a per-position matmul) or ``"conv"`` (a k x k convolution with the base's stride,
    padding and dilation; the down factor reads the base's receptive field).
    """

    kind: str
    in_features: int
    out_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()

    @property
    def fan_in(self) -> int:
        """Width of a down factor's rows: F, or C k k for a k x k convolution."""
        return self.in_features * (math.prod(self.kernel_size) if self.kind == "conv" else 1)

    @classmethod
    def of_layer(cls, base: nn.Module) -> Geometry:
        """The geometry of an ``nn.Linear`` or a zero-padded, ungrouped ``nn.Conv1d/2d/3d``."""
        if isinstance(base, nn.Linear):
            return cls("linear", base.in_features, base.out_features)
        pointwise = (
            all(k == 1 for k in base.kernel_size)
            and all(s == 1 for s in base.stride)
            and (base.padding == "valid" or all(p == 0 for p in base.padding))
        )
        if pointwise:
            return cls("pointwise", base.in_channels, base.out_channels, tuple(base.kernel_size))
        return cls(
            "conv",
            base.in_channels,
            base.out_channels,
            tuple(base.kernel_size),
            tuple(base.stride),
            base.padding if isinstance(base.padding, str) else tuple(base.padding),
            tuple(base.dilation),
        )

    def centre_tap(self) -> Geometry:
        """A 1x1 branch on this layer's output grid: for a k x k convolution (odd k), a strided 1x1
        convolution that reads the centre of each receptive field (DiffScaler's "1x1 convolutions");
        other layouts are returned unchanged. Even kernels (no centre) and padding below the
        centre offset (the centre would fall outside the input) are errors."""
        if self.kind != "conv":
            return self
        k, d = self.kernel_size, self.dilation
        if any(size % 2 == 0 for size in k):
            raise ValueError(f"a 1x1 branch needs an odd kernel (a centre tap), got kernel {k}; use kernel 'full'")
        if isinstance(self.padding, str):
            pad = (
                tuple(di * (ki - 1) // 2 for ki, di in zip(k, d, strict=True))
                if self.padding == "same"
                else (0,) * len(k)
            )
        else:
            pad = self.padding
        offset = tuple(p - di * (ki - 1) // 2 for p, ki, di in zip(pad, k, d, strict=True))
        if any(o < 0 for o in offset):
            raise ValueError(
                f"a 1x1 branch needs padding >= the centre offset of kernel {k}, got {pad}; use kernel 'full'"
            )
        ones = (1,) * len(k)
        if all(s == 1 for s in self.stride) and not any(offset):
            return Geometry("pointwise", self.in_features, self.out_features, ones)
        return Geometry("conv", self.in_features, self.out_features, ones, self.stride, offset, ones)


def per_channel(vec: torch.Tensor, out: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """A per-sample, per-output-channel [N x d] tensor viewed to broadcast over ``out``."""
    ones = [1] * (out.dim() - 2)
    if geometry.kind == "linear":
        return vec.view(vec.shape[0], *ones, vec.shape[1])
    return vec.view(vec.shape[0], vec.shape[1], *ones)


def per_row(vec: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A [d_out] vector viewed to scale the rows (output channels) of a weight [d_out x ...]."""
    return vec.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))


@dataclass
class Route:
    """A batch's mixing weights over a bank of ``num_bases`` entries, as a weighting returns them.

    Sparse: ``index`` [N x K] (int64) and ``weight`` [N x K]. Dense: ``index`` is None and ``weight``
    is [N x num_bases].
    """

    weight: torch.Tensor
    index: torch.Tensor | None = None

    def dense(self, num_bases: int) -> torch.Tensor:
        """The same weights as an [N x num_bases] matrix (for merges, tests and inspection)."""
        if self.index is None:
            return self.weight
        out = self.weight.new_zeros(self.weight.shape[0], num_bases)
        return out.scatter_add(1, self.index, self.weight)

    @property
    def sparse(self) -> bool:
        return self.index is not None

    def gather(self, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The K entries each sample uses: ``table`` [num_bases x ...] -> [N x K x ...] (sparse only)."""
        n, k = self.index.shape
        flat = table.reshape(table.shape[0], -1).index_select(0, self.index.reshape(-1)).to(dtype)
        return flat.view(n, k, *table.shape[1:])

    def vectors(self, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``sum_i w_i(c_n) table_i`` per sample: ``table`` [num_bases x d] -> [N x d]."""
        w = self.weight.to(dtype)
        if self.index is None:
            return w @ table.to(dtype)
        return torch.bmm(w[:, None, :], self.gather(table, dtype))[:, 0]

    def slot_scales(self, scalars: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
        """Per-sample weight of each used entry times its scalar: [N x K] (sparse) or [N x num_bases]."""
        w = self.weight.to(dtype)
        if isinstance(scalars, torch.Tensor):
            scalars = scalars.to(dtype)
            return w * (scalars[self.index] if self.index is not None else scalars[None])
        return w * scalars


@dataclass
class RankTerm:
    """One routed rank-space branch: ``out += up (s * act(down x))``.

    Sparse: ``down`` [N x R x F] and ``up_t`` [N x R x d_out] gathered per sample (R = K r, rows in
    (k, r) order). Dense: ``down`` [R x F] and ``up_t`` [R x d_out] shared (R = num_bases r).
    ``s`` [N x R] scales rank space. ``act`` None is the identity. ``geometry``: the branch's own
    input layout when it differs from the layer's (a 1x1 branch on a k x k convolution).
    """

    down: torch.Tensor
    up_t: torch.Tensor
    s: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor] | None
    sparse: bool
    geometry: Geometry | None = None


def rank_term(
    route: Route,
    down: torch.Tensor,
    up: torch.Tensor,
    slot_scale: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] | None,
    dtype: torch.dtype,
) -> RankTerm:
    """Route a bank of factor pairs: ``down`` [num_bases x r x F], ``up`` [num_bases x d_out x r],
    ``slot_scale`` [N x K] or [N x num_bases] (from :meth:`Route.slot_scales`)."""
    nb, r, fan_in = down.shape
    d_out = up.shape[1]
    s = slot_scale.repeat_interleave(r, dim=1)  # (N, R): the weights scale rank space
    if route.sparse:
        n, k = route.index.shape
        a = route.gather(down, dtype).view(n, k * r, fan_in)
        # up transposed per entry, (N, K r, d_out): rows in the same (k, r) order as a's, so that one
        # bmm with a transposed operand applies all K entries at once. The bank is transposed before
        # the gather (num_bases entries), not the gathered copy (N K entries).
        bt = route.gather(up.transpose(1, 2), dtype).view(n, k * r, d_out)
        return RankTerm(a, bt, s, act, True)
    a = down.to(dtype).reshape(nb * r, fan_in)
    bt = up.to(dtype).permute(0, 2, 1).reshape(nb * r, d_out)
    return RankTerm(a, bt, s, act, False)


def add_rank_terms(out: torch.Tensor, x: torch.Tensor, geometry: Geometry, terms: list[RankTerm]) -> torch.Tensor:
    """``out + sum_terms up (s * act(down x))``; sparse identity terms share one pair of bmm's."""
    fusable = [t.sparse and t.act is None and t.geometry is None for t in terms]
    fused = [t for t, ok in zip(terms, fusable, strict=True) if ok]
    rest = [t for t, ok in zip(terms, fusable, strict=True) if not ok]
    if len(fused) > 1:
        # All sparse linear branches of a layer (e.g. TimeLoRA + ClassLoRA) in one pair of bmm's.
        down = torch.cat([t.down for t in fused], dim=1)
        up_t = torch.cat([t.up_t for t in fused], dim=1)
        fused = [RankTerm(down, up_t, torch.cat([t.s for t in fused], dim=1), None, True)]
    for term in fused + rest:
        out = _add_term(out, x, term.geometry or geometry, term)
    return out


@dataclass
class LayerTerms:
    """What the live branches of one wrapped layer add to its output ``out = W x + b``, per sample.

    ``scales`` [N x d_out] multiply ``W x`` (not the bias), ``ranks`` add ``up (s * act(down x))``,
    ``shifts`` [N x d_out] add to the result; :meth:`apply` applies them in that order.
    """

    scales: list[torch.Tensor] = field(default_factory=list)
    ranks: list[RankTerm] = field(default_factory=list)
    shifts: list[torch.Tensor] = field(default_factory=list)

    def apply(self, out: torch.Tensor, x: torch.Tensor, geometry: Geometry, bias: torch.Tensor | None) -> torch.Tensor:
        """``out`` (the base output for input ``x``; ``bias`` the base's) with every term added."""
        if self.scales:
            out = _scale_rows(out, sum(self.scales), geometry, bias)
        if self.ranks:
            out = add_rank_terms(out, x, geometry, self.ranks)
        if self.shifts:
            out = out + per_channel(sum(self.shifts), out, geometry).to(out.dtype)
        return out


def _scale_rows(out: torch.Tensor, a: torch.Tensor, geometry: Geometry, bias: torch.Tensor | None) -> torch.Tensor:
    """``(1 + a) (W x) + b = (1 + a) out - a b`` for ``out = W x + b``: the scale multiplies W x only.

    ``a`` [N x d_out]. Outside autocast and compilation, :class:`RowScale` computes it with one pass
    over the output and two over its gradient; otherwise the same formula in plain ops.
    """
    a = a.to(out.dtype)
    if _plain_dtype_path(out, a, bias):
        n, d = a.shape
        tokens_last = geometry.kind == "linear"
        out3 = out.reshape(n, -1, d) if tokens_last else out.reshape(n, d, -1)
        return RowScale.apply(out3, a, bias, tokens_last).view(out.shape)
    a_ = per_channel(a, out, geometry)
    if bias is None:
        return out * (1 + a_)
    return torch.addcmul(-a_ * per_channel(bias[None], out, geometry).to(out.dtype), out, 1 + a_)


class RowScale(torch.autograd.Function):
    """``(1 + a_n) ⊙ out_n - a_n ⊙ b`` per sample n and output channel: a weight scale on a base output.

    ``out`` [N x D x L] (channels first) or [N x L x D] (``tokens_last``), ``a`` [N x D], ``b``
    [D] or None. Autograd's own backward of the same ``addcmul`` copies ``out`` once more (``out *
    value``) and reduces the broadcast gradients in separate passes; here the output gradient is
    read by one product (``g (1 + a)``) and one row-wise dot product (``sum_L g out``), and the bias
    term by one sum.
    """

    @staticmethod
    def forward(ctx, out, a, bias, tokens_last: bool):  # type: ignore[override]
        a3 = a[:, None, :] if tokens_last else a[:, :, None]
        if bias is None:
            y = out * (1 + a3)
        else:
            b3 = bias[None, None, :] if tokens_last else bias[None, :, None]
            y = torch.addcmul(-a3 * b3, out, 1 + a3)
        ctx.save_for_backward(out, a, bias)
        ctx.tokens_last = tokens_last
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        out, a, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        tokens_last = ctx.tokens_last
        a3 = a[:, None, :] if tokens_last else a[:, :, None]
        g_out = g * (1 + a3) if need[0] else None
        g_a = g_b = None
        if need[1] or need[2]:
            g_sum = g.sum(1 if tokens_last else 2) if bias is not None else None  # (N, D)
            if need[1]:
                g_a = _row_dot(g, out, tokens_last)
                if g_sum is not None:
                    g_a = g_a - g_sum * bias[None]
            if need[2] and bias is not None:
                g_b = -(g_sum * a).sum(0)
        return g_out, g_a, g_b, None


def _row_dot(g: torch.Tensor, out: torch.Tensor, tokens_last: bool) -> torch.Tensor:
    """``sum_L g ⊙ out`` per sample and channel: [N x D]. Channels first, a batch of 1 x L by L x 1
    products reads both tensors once and writes no temporary of their size."""
    if tokens_last or not (g.is_contiguous() and out.is_contiguous()):
        return (g * out).sum(1 if tokens_last else 2)
    n, d, length = g.shape
    return torch.bmm(g.view(n * d, 1, length), out.view(n * d, length, 1)).view(n, d)


def _add_into(out: torch.Tensor, shape: tuple[int, ...], b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``out + b1 @ b2`` (batched; ``out`` seen as ``shape``), into ``out`` itself when possible.

    In place saves a full copy of the output, the largest tensor here; it is safe because
    Linear / Conv backward does not read the layer's output. Only when ``out`` already has the
    3-d shape: in place on a *view* would make autograd copy the whole tensor back (CopySlices).
    """
    b1, b2 = b1.to(out.dtype), b2.to(out.dtype)  # autocast leaves in-place ops to us
    if out.is_contiguous() and out.view(shape).shape == out.shape:
        return out.baddbmm_(b1, b2)
    return torch.baddbmm(out.reshape(shape), b1, b2).reshape(out.shape)


def _activate(h: torch.Tensor, term: RankTerm) -> torch.Tensor:
    return h if term.act is None else term.act(h)


class SparseLowRank(torch.autograd.Function):
    """``out + up_n (s_n * (down_n x_n))`` per sample n, added into ``out``: the sparse identity term
    of a pointwise or token layer in one forward pass over ``out`` and one backward pass over its gradient.

    ``out`` [N x D x L] and ``x`` [N x F x L] (channels first) or [N x L x D] and [N x L x F]
    (``tokens_last``); ``down`` [N x R x F], ``up_t`` [N x R x D] (the up factors transposed), ``s``
    [N x R]. ``out`` is changed in place when ``inplace`` (safe: a Linear / Conv backward does not
    read its output), else a new tensor is returned. Autograd's own backward of the same ops reads
    the output gradient in a shape whose batched product runs far below the machine's speed
    (``g h^T``, [D x R] per sample) and copies the transposed factors; here every product is taken
    in the shape with the rank as rows, and only the rank-space activations ``h`` are saved.
    """

    @staticmethod
    def forward(ctx, out, x, down, up_t, s, tokens_last: bool, inplace: bool):  # type: ignore[override]
        if tokens_last:
            h = torch.bmm(x, down.transpose(1, 2))  # (N, L, R)
            a, b = h * s[:, None, :], up_t
        else:
            h = torch.bmm(down, x)  # (N, R, L)
            a, b = up_t.transpose(1, 2), h * s[:, :, None]
        if inplace:
            ctx.mark_dirty(out)
            result = out.baddbmm_(a, b)
        else:
            result = torch.baddbmm(out, a, b)
        ctx.save_for_backward(x, down, up_t, s, h)
        ctx.tokens_last = tokens_last
        return result

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, down, up_t, s, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        # Rank-space tensors as (N, R, L), the inputs and the output gradient as (N, L, F) / (N, L, D).
        if ctx.tokens_last:  # g (N, L, D)
            gh = torch.bmm(up_t, g.transpose(1, 2))  # (N, R, L)
            h, s, x_t, g_t = h.transpose(1, 2), s[:, :, None], x, g
        else:  # g (N, D, L)
            gh = torch.bmm(up_t, g)
            s, x_t, g_t = s[:, :, None], x.transpose(1, 2), g.transpose(1, 2)
        ghs = gh * s
        g_x = None
        if need[1]:  # (N, L, F) or (N, F, L)
            g_x = torch.bmm(ghs.transpose(1, 2), down) if ctx.tokens_last else torch.bmm(down.transpose(1, 2), ghs)
        g_down = torch.bmm(ghs, x_t) if need[2] else None  # (N, R, F)
        g_up = torch.bmm(h * s, g_t) if need[3] else None  # (N, R, D)
        g_s = (gh * h).sum(2) if need[4] else None  # (N, R)
        return (g if need[0] else None), g_x, g_down, g_up, g_s, None, None


def _plain_dtype_path(*tensors: torch.Tensor | None) -> bool:
    """Whether a hand-written kernel here may run: outside autocast and compilation (the compiler
    fuses the plain ops itself), every tensor given of one floating type."""
    first = tensors[0]
    if torch.compiler.is_compiling():
        return False
    device = first.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return False
    return all(t is None or t.dtype == first.dtype for t in tensors)


def _fusable(out: torch.Tensor, x: torch.Tensor, g: Geometry, term: RankTerm) -> bool:
    """Whether :class:`SparseLowRank` computes ``term``: a sparse identity term of a pointwise or token
    layer, one floating type throughout, outside autocast and compilation."""
    if not term.sparse or term.act is not None or g.kind == "conv":
        return False
    return _plain_dtype_path(out, x, term.down, term.up_t, term.s)


def _add_term(out: torch.Tensor, x: torch.Tensor, g: Geometry, term: RankTerm) -> torch.Tensor:
    n = x.shape[0]
    d, s = term.down, term.s.to(x.dtype)
    r = d.shape[-2]
    if _fusable(out, x, g, term):
        tokens_last = g.kind == "linear"
        shape = (n, -1, g.out_features) if tokens_last else (n, g.out_features, -1)
        x3 = x.reshape(n, -1, g.in_features) if tokens_last else x.reshape(n, g.in_features, -1)
        inplace = out.is_contiguous() and out.view(shape).shape == out.shape
        out3 = out if inplace else out.reshape(shape)
        return SparseLowRank.apply(out3, x3, d, term.up_t, s, tokens_last, inplace).view(out.shape)
    if g.kind == "linear":
        x3 = x.reshape(n, -1, g.in_features)  # (N, L, F)
        if term.sparse:
            h = _activate(torch.bmm(x3, d.transpose(1, 2)), term) * s[:, None, :]  # (N, L, R)
            return _add_into(out, (n, -1, g.out_features), h, term.up_t)
        h = _activate(torch.matmul(x3, d.t()), term) * s[:, None, :]  # (N, L, R)
        # up is shared by the batch: one GEMM over all N L tokens, added into out.
        return _add_into(out, (1, -1, g.out_features), h.reshape(1, -1, r), term.up_t[None])
    if g.kind == "pointwise":
        x3 = x.reshape(n, g.in_features, -1)  # (N, C, L)
        h = torch.bmm(d, x3) if term.sparse else torch.matmul(d, x3)  # (N, R, L)
    else:
        conv = _CONV_FN[len(g.kernel_size)]
        if term.sparse:
            # k x k: one grouped convolution with a different down factor per sample (group = sample).
            weight = d.reshape(n * r, g.in_features, *g.kernel_size)
            x1 = x.reshape(1, n * g.in_features, *x.shape[2:])
            h = conv(x1, weight, None, g.stride, g.padding, g.dilation, n).reshape(n, r, -1)  # (N, R, L')
        else:
            h = conv(x, d.reshape(r, g.in_features, *g.kernel_size), None, g.stride, g.padding, g.dilation)
            h = h.reshape(n, r, -1)
    h = _activate(h, term) * s[:, :, None]
    up = term.up_t.transpose(-1, -2)  # (N, d_out, R) or (d_out, R)
    return _add_into(out, (n, g.out_features, -1), up if term.sparse else up.expand(n, -1, -1), h)
