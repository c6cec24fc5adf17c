"""``ConditionalLoRA``: a wrapper around a dense layer that adds a per-sample conditional low-rank update.

For a base layer ``y = W x + b`` and each adapter ``a`` of the wrapper (a bank of rank-r factors
``A_i`` [r x F], ``B_i`` [d_out x r], a weighting and the name of the condition it reads)::

    y = W x + b + sum_a scaling_a * sum_i w_i(c_a) B_i A_i x        c_a = the sample's condition

computed for a whole batch at once, with a different condition per sample and without ever
building a weight matrix per sample:

* sparse weightings (index, linear) gather only the K (1 or 2) factors each sample uses and apply
  them with two batched matmuls in rank space, ``h = A_g x`` [N x L x K r] then ``B_g h``;
* dense weightings (trainable) apply the whole bank once, shared by the batch (``h = A x``
  [N x L x m r]), scale ``h`` by each sample's weights, then apply ``B``.

Supported bases: ``nn.Linear`` (inputs [N x ... x d_in]), ``nn.Conv1d`` / ``nn.Conv2d`` /
``nn.Conv3d`` with ``groups=1`` and zero padding (inputs [N x C x ...]). For a k x k convolution
``A_i`` is a k x k convolution with the base's stride, padding and dilation and ``B_i`` a 1x1
convolution; ``lora_A`` is stored flattened as [num_bases x r x (C k k)], the layout of the base
weight's fan-in, so ``B_i A_i`` reshapes directly to the base weight's shape.

The wrapper holds the base layer as ``base_layer`` (it never subclasses it); the adapters live in
``adapters`` (an ``nn.ModuleDict`` of :class:`LoRABank`), so parameter names read
``<path>.base_layer.weight``, ``<path>.adapters.<name>.lora_A``, ``<path>.adapters.<name>.lora_B``
and ``<path>.adapters.<name>.weighting.table``.

State changes are explicit: :meth:`ConditionalLoRA.merge` writes ``W + delta`` into the base
weight for given condition values (used when every sample shares the value, e.g. the timestep of
a sampler step) and :meth:`ConditionalLoRA.unmerge` restores the exact original weight from a
saved copy (no float drift over thousands of merge/unmerge cycles). ``.train()`` / ``.eval()``
change nothing. Merging is an inference tool: a merged adapter ignores its condition and gets no
gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflora.adapters.context import ConditionValue, current
from difflora.adapters.weightings import Mix, Weighting

__all__ = ["ConditionalLoRA", "LoRABank", "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRABank(nn.Module):
    """One conditional adapter of a layer: ``num_bases`` rank-``rank`` LoRAs and a weighting.

    ``lora_A`` [num_bases x rank x fan_in] ~ N(0, 1/rank) (000 C.1; variance 1/r),
    ``lora_B`` [num_bases x d_out x rank] = 0, so a fresh adapter changes nothing.
    ``scaling = alpha / rank`` (peft's convention; ``alpha=None`` means ``alpha = rank``, scaling 1,
    which is 000's un-scaled ``W + B A``).
    """

    def __init__(
        self,
        weighting: Weighting,
        condition: str,
        fan_in: int,
        d_out: int,
        rank: int = 4,
        alpha: float | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRABank: rank must be >= 1, got {rank}")
        self.weighting = weighting
        self.condition = condition
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.scaling = self.alpha / self.rank
        self.lora_A = nn.Parameter(torch.empty(weighting.num_bases, rank, fan_in))
        self.lora_B = nn.Parameter(torch.empty(weighting.num_bases, d_out, rank))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.lora_A, 0.0, 1.0 / math.sqrt(self.rank))
        nn.init.zeros_(self.lora_B)

    def mix(self, values: ConditionValue, n: int, device: torch.device) -> Mix | None:
        """This adapter's mixing weights for a batch of ``n`` samples (None: no update)."""
        return self.weighting(_as_batch(values, n, device, self.condition))

    def delta_weight(self, value: ConditionValue) -> torch.Tensor:
        """``scaling * sum_i w_i(value) B_i A_i`` for one shared value: [d_out x fan_in]."""
        mix = self.mix(value, 1, self.lora_A.device)
        if mix is None:
            return self.lora_B.new_zeros(self.lora_B.shape[1], self.lora_A.shape[2])
        w = mix.dense(self.weighting.num_bases)[0].to(self.lora_A.dtype) * self.scaling
        return torch.einsum("b,bor,brf->of", w, self.lora_B, self.lora_A)

    def spec(self) -> dict[str, Any]:
        """JSON-able description (adapter files store it to rebuild the bank)."""
        return {"condition": self.condition, "rank": self.rank, "alpha": self.alpha, "weighting": self.weighting.spec()}

    def extra_repr(self) -> str:
        return f"condition={self.condition!r}, rank={self.rank}, scaling={self.scaling:g}"


def _as_batch(value: ConditionValue, n: int, device: torch.device, name: str) -> torch.Tensor | None:
    """A condition value as an [n] tensor on ``device`` (numbers and 0-d / [1] tensors broadcast)."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        return torch.full((n,), value, device=device)
    if value.dim() == 0 or value.shape == (1,):
        return value.reshape(1).expand(n).to(device)
    if value.dim() != 1 or value.shape[0] != n:
        raise ValueError(
            f"condition {name!r} has shape {tuple(value.shape)} but the layer's input holds {n} samples; "
            f"give one value per sample ([{n}]) or one for all"
        )
    return value.to(device)


class ConditionalLoRA(nn.Module):
    """Wrap ``base_layer`` (Linear / Conv1d-3d) with per-sample conditional low-rank adapters.

    ``ConditionalLoRA(base, weighting=LinearWeighting(11, 0, 4000), condition="t", rank=4)`` wraps
    with one adapter named ``name``; more are added with :meth:`add_adapter` (TimeLoRA and
    ClassLoRA on the same projection are two adapters of one wrapper).

    ``forward(x)``: x is [N x ... x d_in] (Linear) or [N x C x ...] (Conv); the first dimension
    must be the batch whose per-sample conditions are set (:func:`difflora.adapters.conditions`).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        weighting: Weighting | None = None,
        condition: str = "t",
        rank: int = 4,
        alpha: float | None = None,
        name: str = "default",
    ):
        super().__init__()
        if isinstance(base_layer, ConditionalLoRA):
            raise TypeError("base_layer is already a ConditionalLoRA; add adapters to it with add_adapter")
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise TypeError(
                f"ConditionalLoRA wraps nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(base_layer).__name__}"
            )
        if isinstance(base_layer, nn.Linear):
            self.kind = "linear"
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.fan_in = base_layer.in_features
        else:
            if base_layer.groups != 1:
                raise ValueError(
                    f"ConditionalLoRA: grouped convolutions (groups={base_layer.groups}) are not supported"
                )
            if base_layer.padding_mode != "zeros":
                raise ValueError(
                    f"ConditionalLoRA: padding_mode={base_layer.padding_mode!r} is not supported (zeros only)"
                )
            self.kind = "conv"
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
            self.fan_in = base_layer.in_channels * math.prod(base_layer.kernel_size)
            # 1x1, stride 1, no padding: a per-position matmul, no convolution needed.
            self.pointwise = (
                all(k == 1 for k in base_layer.kernel_size)
                and all(s == 1 for s in base_layer.stride)
                and (base_layer.padding == "valid" or all(p == 0 for p in base_layer.padding))
            )
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        # Adapter name -> the condition value merged into the base weight.
        self.merged: dict[str, Any] = {}
        self.register_buffer("_unmerged_weight", None, persistent=False)
        if weighting is not None:
            self.add_adapter(name, weighting, condition, rank, alpha)

    # --- the base layer's attributes, for code that reads them through the wrapper -------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(
        self, name: str, weighting: Weighting, condition: str, rank: int = 4, alpha: float | None = None
    ) -> LoRABank:
        """Add an adapter ``name`` reading ``condition``; returns its :class:`LoRABank`."""
        if not name.isidentifier():
            raise ValueError(f"adapter name {name!r} must be a Python identifier (it is part of parameter names)")
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        if self.merged:
            raise RuntimeError("unmerge the layer's adapters before adding one")
        w = self.base_layer.weight
        bank = LoRABank(weighting, condition, self.fan_in, self.out_features, rank, alpha)
        self.adapters[name] = bank.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)
        return bank

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        n = x.shape[0]
        gathered_a, gathered_bt, scales = [], [], []
        for name, bank in self.adapters.items():
            if name in self.merged:
                continue
            mix = bank.mix(current(bank.condition), n, x.device)
            if mix is None:
                continue
            scale = (mix.weight * bank.scaling).to(x.dtype)
            if mix.index is not None:
                # Sparse: gather the K factors each sample uses. index_select (backward: index_add)
                # rather than advanced indexing, whose CPU backward is a slow accumulate-put.
                k = mix.index.shape[1]
                nb, r = bank.lora_A.shape[:2]
                flat = mix.index.reshape(-1)
                a = bank.lora_A.reshape(nb, -1).index_select(0, flat).to(x.dtype)  # (N K, r F)
                # B transposed per gathered factor, (N, K r, d_out): rows in the same (k, r) order as
                # a's, so that one bmm with a transposed operand applies all K factors at once.
                bt = bank.lora_B.index_select(0, flat).to(x.dtype).transpose(1, 2)  # (N K, r, d_out)
                gathered_a.append(a.view(n, k * r, self.fan_in))
                gathered_bt.append(bt.reshape(n, k * r, self.out_features))
                # The weights scale rank space (N x K r numbers), not the gathered B (N x d_out x K r).
                scales.append(scale.repeat_interleave(r, dim=1))
            else:
                out = self._add_dense_delta(out, x, bank, scale)
        if gathered_a:
            # All sparse adapters of the layer (e.g. TimeLoRA + ClassLoRA) in one pair of bmm's.
            a = gathered_a[0] if len(gathered_a) == 1 else torch.cat(gathered_a, dim=1)
            bt = gathered_bt[0] if len(gathered_bt) == 1 else torch.cat(gathered_bt, dim=1)
            s = scales[0] if len(scales) == 1 else torch.cat(scales, dim=1)
            out = self._add_sparse_delta(out, x, a, bt, s)
        return out

    @staticmethod
    def _add_into(out: torch.Tensor, shape: tuple[int, ...], b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        """``out + b1 @ b2`` (batched; ``out`` seen as ``shape``), into ``out`` itself when possible.

        In place saves a full copy of the output, the largest tensor here; it is safe because
        Linear / Conv backward does not read the layer's output. Only when ``out`` already has the
        3-d shape: in place on a *view* would make autograd copy the whole tensor back (CopySlices).
        """
        if out.is_contiguous() and out.view(shape).shape == out.shape:
            return out.baddbmm_(b1, b2)
        return torch.baddbmm(out.reshape(shape), b1, b2).reshape(out.shape)

    def _add_sparse_delta(
        self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, s: torch.Tensor
    ) -> torch.Tensor:
        """``out + B_g (s * (A_g x))`` per sample; ``a`` [N x R x F], ``bt`` [N x R x d_out], ``s`` [N x R]."""
        n = x.shape[0]
        if self.kind == "linear":
            x3 = x.reshape(n, -1, self.in_features)  # (N, L, F)
            h = torch.bmm(x3, a.transpose(1, 2)) * s[:, None, :]  # (N, L, R)
            return self._add_into(out, (n, -1, self.out_features), h, bt)
        if self.pointwise:
            x3 = x.reshape(n, self.in_features, -1)  # (N, C, L)
            h = torch.bmm(a, x3)  # (N, R, L)
        else:
            # k x k: one grouped convolution with a different A per sample (group = sample).
            base = self.base_layer
            weight = a.reshape(n * a.shape[1], self.in_features, *base.kernel_size)
            conv = _CONV_FN[len(base.kernel_size)]
            x1 = x.reshape(1, n * self.in_features, *x.shape[2:])
            h = conv(x1, weight, None, base.stride, base.padding, base.dilation, n).reshape(
                n, a.shape[1], -1
            )  # (N, R, L')
        return self._add_into(out, (n, self.out_features, -1), bt.transpose(1, 2), h * s[:, :, None])

    def _add_dense_delta(self, out: torch.Tensor, x: torch.Tensor, bank: LoRABank, scale: torch.Tensor) -> torch.Tensor:
        """``out +`` all bases applied once (shared), mixed per sample in rank space. ``scale`` [N x num_bases]."""
        n = x.shape[0]
        nb, r = bank.lora_A.shape[:2]
        a = bank.lora_A.to(x.dtype).reshape(nb * r, self.fan_in)  # (B r, F)
        b = bank.lora_B.to(x.dtype).permute(1, 0, 2).reshape(self.out_features, nb * r)  # (d_out, B r)
        s = scale.repeat_interleave(r, dim=1)  # (N, B r)
        if self.kind == "linear":
            x3 = x.reshape(n, -1, self.in_features)
            h = torch.matmul(x3, a.t()) * s[:, None, :]  # (N, L, B r)
            # B is shared by the batch: one GEMM over all N L tokens, added into out.
            return self._add_into(out, (1, -1, self.out_features), h.reshape(1, -1, nb * r), b.t()[None])
        if self.pointwise:
            x3 = x.reshape(n, self.in_features, -1)
            h = torch.matmul(a, x3) * s[:, :, None]  # (N, B r, L)
            return self._add_into(out, (n, self.out_features, -1), b.expand(n, -1, -1), h)
        base = self.base_layer
        conv = _CONV_FN[len(base.kernel_size)]
        h = conv(
            x, a.reshape(nb * r, self.in_features, *base.kernel_size), None, base.stride, base.padding, base.dilation
        )
        h = h.reshape(n, nb * r, -1) * s[:, :, None]
        return self._add_into(out, (n, self.out_features, -1), b.expand(n, -1, -1), h)

    # --- delta weights, merge, unmerge ---------------------------------------------------------
    def get_delta_weight(self, **values: ConditionValue) -> torch.Tensor:
        """Sum of the updates of the adapters whose condition is given, shaped like the base weight.

        ``layer.get_delta_weight(t=500, y=3)``: one value per condition, shared by all samples.
        """
        delta = torch.zeros_like(self.base_layer.weight)
        for bank in self._banks_reading(values):
            delta = delta + bank.delta_weight(values[bank.condition]).reshape(delta.shape).to(delta.dtype)
        return delta

    @torch.no_grad()
    def merge(self, **values: ConditionValue) -> None:
        """Write ``W + delta`` into the base weight for the adapters reading the given conditions.

        ``layer.merge(t=500)`` merges every adapter that reads ``t`` at t = 500; others stay
        per-sample. Merging again with another value replaces the merged value. The original
        weight is kept and restored exactly by :meth:`unmerge`.
        """
        banks = dict(self._named_banks_reading(values))
        if not banks:
            return
        for name, bank in banks.items():
            value = values[bank.condition]
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"merge: condition {bank.condition!r} needs one value shared by all samples")
                value = value.item()
            self.merged[name] = value
        self._write_merged_weight()

    @torch.no_grad()
    def unmerge(self, *conditions: str) -> None:
        """Undo :meth:`merge` for the adapters reading ``conditions`` (all merged adapters if none)."""
        for name in list(self.merged):
            if not conditions or self.adapters[name].condition in conditions:
                del self.merged[name]
        self._write_merged_weight()

    def _write_merged_weight(self) -> None:
        weight = self.base_layer.weight
        if self.merged and self._unmerged_weight is None:
            self._unmerged_weight = weight.detach().clone()
        if self._unmerged_weight is None:
            return
        original = self._unmerged_weight
        if not self.merged:
            weight.copy_(original)
            self._unmerged_weight = None
            return
        # Accumulate in at least float32 (half-precision weights would lose small updates).
        dtype = torch.promote_types(original.dtype, torch.float32)
        delta = torch.zeros(original.shape, dtype=dtype, device=original.device)
        for name, value in self.merged.items():
            delta += self.adapters[name].delta_weight(value).reshape(delta.shape).to(dtype)
        weight.copy_((original.to(dtype) + delta).to(weight.dtype))

    def _named_banks_reading(self, values: dict[str, Any]) -> list[tuple[str, LoRABank]]:
        return [(name, bank) for name, bank in self.adapters.items() if bank.condition in values]

    def _banks_reading(self, values: dict[str, Any]) -> list[LoRABank]:
        return [bank for _, bank in self._named_banks_reading(values)]

    # --- description ----------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """The base layer's structure (type and shapes; no values): adapter files check it on load."""
        base = self.base_layer
        fp: dict[str, Any] = {
            "type": type(base).__name__,
            "weight_shape": list(base.weight.shape),
            "bias": base.bias is not None,
        }
        if self.kind == "conv":
            fp.update(
                stride=list(base.stride),
                padding=base.padding if isinstance(base.padding, str) else list(base.padding),
                dilation=list(base.dilation),
            )
        return fp

    def extra_repr(self) -> str:
        merged = f", merged={self.merged}" if self.merged else ""
        return f"kind={self.kind}, in={self.in_features}, out={self.out_features}{merged}"
