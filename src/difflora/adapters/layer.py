"""``ConditionalLayer``: a wrapper around a dense layer that adds per-sample conditional branches.

For a base layer ``y = W x + b`` the wrapper holds any number of named branches (see
``forms.py``: low-rank, low-rank with activation, weight scale, bias shift), each a bank with a
weighting and the condition it reads::

    y = (1 + a(c)) ⊙ (W x) + b + sum_lowrank scaling B(c) A(c) x + sum_act s W_up act(W_down x) + b(c)

computed for a whole batch at once, with a different condition per sample, through the router
(``router.py``): sparse weightings gather the entries each sample uses, dense ones apply the whole
bank once and mix per sample. No weight matrix is ever built per sample. The layer never looks at
a branch's form: it asks each branch for its term, its changes of W and b and whether it can be
merged (:class:`~difflora.adapters.forms.Branch`), so a new form needs no change here.

Supported bases: ``nn.Linear`` (inputs [N x ... x d_in]), ``nn.Conv1d`` / ``nn.Conv2d`` /
``nn.Conv3d`` with ``groups=1`` and zero padding (inputs [N x C x ...]). For a k x k convolution
``A_i`` is a k x k convolution with the base's stride, padding and dilation and ``B_i`` a 1x1
convolution; ``lora_A`` is stored flattened as [num_bases x r x (C k k)], the layout of the base
weight's fan-in, so ``B_i A_i`` reshapes directly to the base weight's shape.

The wrapper holds the base layer as ``base_layer`` (it never subclasses it); the branches live in
``adapters`` (an ``nn.ModuleDict``), so parameter names read ``<path>.base_layer.weight``,
``<path>.adapters.<name>.lora_A``, ``<path>.adapters.<name>.scale``, ...,
``<path>.adapters.<name>.weighting.table``.

State changes are explicit: :meth:`ConditionalLayer.merge` writes the mergeable updates into the
base weight (low-rank, weight scale: ``W' = (1 + a) ⊙ W + sum B A``) and bias (shift: ``b' = b + b(c)``)
for given condition values (used when every sample shares the value, e.g. the timestep of a
sampler step), and :meth:`ConditionalLayer.unmerge` restores the exact original weight and bias
from saved copies (bit for bit, no float drift over thousands of cycles). Merging refuses a
non-mergeable form (``lowrank_act``), a shift on a base without bias (there is no bias to write
into; keep it per sample), and a low-rank or weight-scale merge while a weight-scale branch stays
per sample (the scale would then multiply the merged update too). A branch merged at its
weighting's "no update" value (``-1``, ``NaN``: ``Weighting.is_null``) changes nothing whatever its
form, so it is never refused, and a layer whose merged branches are all there keeps its original
weight and bias bit for bit. So a merged layer computes what the per-sample path computes, or the
merge is refused. ``.train()`` / ``.eval()`` change
nothing. Merging is an inference tool: a merged adapter ignores its condition and gets no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difflora.adapters.context import ConditionValue, is_disabled
from difflora.adapters.forms import Branch, MergedUpdate, make_branch
from difflora.adapters.router import Geometry, LayerTerms, per_row
from difflora.adapters.weightings import Weighting

__all__ = ["ConditionalLayer", "SUPPORTED_LAYERS"]

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class ConditionalLayer(nn.Module):
    """Wrap ``base_layer`` (Linear / Conv1d-3d) with per-sample conditional branches of any form.

    ``ConditionalLayer(base, weighting=LinearWeighting(11, 0, 4000), condition="t", rank=4)`` wraps
    with one low-rank adapter named ``name``; more are added with :meth:`add_adapter` (TimeLoRA
    and ClassLoRA on the same projection, or DiffScaler's scale, shift and activation branches,
    are several adapters of one wrapper).

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
        form: str = "lowrank",
        activation: str | None = None,
    ):
        super().__init__()
        if isinstance(base_layer, ConditionalLayer):
            raise TypeError("base_layer is already a ConditionalLayer; add adapters to it with add_adapter")
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise TypeError(
                f"ConditionalLayer wraps nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(base_layer).__name__}"
            )
        if not isinstance(base_layer, nn.Linear):
            if base_layer.groups != 1:
                raise ValueError(
                    f"ConditionalLayer: grouped convolutions (groups={base_layer.groups}) are not supported"
                )
            if base_layer.padding_mode != "zeros":
                raise ValueError(
                    f"ConditionalLayer: padding_mode={base_layer.padding_mode!r} is not supported (zeros only)"
                )
        self.geometry = Geometry.of_layer(base_layer)
        self.kind = "linear" if self.geometry.kind == "linear" else "conv"
        self.in_features, self.out_features = self.geometry.in_features, self.geometry.out_features
        self.fan_in = self.geometry.fan_in
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        # Adapter name -> the condition value merged into the base weight / bias.
        self.merged: dict[str, Any] = {}
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.register_buffer("_unmerged_bias", None, persistent=False)
        if weighting is not None:
            self.add_adapter(name, weighting, condition, rank, alpha, form=form, activation=activation)

    # --- the base layer's attributes, for code that reads them through the wrapper -------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def add_adapter(
        self,
        name: str,
        weighting: Weighting,
        condition: str,
        rank: int = 4,
        alpha: float | None = None,
        form: str = "lowrank",
        activation: str | None = None,
        kernel: str = "full",
    ) -> Branch:
        """Add branch ``name`` of ``form`` reading ``condition``; returns it (see ``forms.py``)."""
        branch = make_branch(form, weighting, condition, self.geometry, rank, alpha, activation, kernel)
        return self.add_branch(name, branch)

    def add_branch(self, name: str, branch: Branch) -> Branch:
        """Add an already built branch (its shapes must fit this layer)."""
        self.check_branch(name)
        self.adapters[name] = self.fit(branch)
        return branch

    def check_branch(self, name: str) -> None:
        """Raise if a branch called ``name`` cannot be added (what :meth:`add_branch` checks first)."""
        if not name.isidentifier():
            raise ValueError(f"adapter name {name!r} must be a Python identifier (it is part of parameter names)")
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        if self.merged:
            raise RuntimeError("unmerge the layer's adapters before adding one")

    def fit(self, branch: Branch) -> Branch:
        """``branch`` moved to the base weight's device and floating type, in place (not added)."""
        w = self.base_layer.weight
        return branch.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)

    # --- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        n, dtype = x.shape[0], x.dtype
        terms = LayerTerms()
        for name, branch in self.adapters.items():
            if is_disabled(name):
                if name in self.merged:
                    raise RuntimeError(f"adapter {name!r} is merged into the weights: unmerge it before disabling it")
                continue
            if name in self.merged:
                continue
            route = branch.current_route(n, x.device)
            if route is not None:
                branch.add_term(terms, route, dtype)
        return terms.apply(out, x, self.geometry, self.base_layer.bias)

    # --- delta weights, merge, unmerge ---------------------------------------------------------
    def _original(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unmerged base weight and bias."""
        w = self._unmerged_weight if self._unmerged_weight is not None else self.base_layer.weight
        b = self._unmerged_bias if self._unmerged_bias is not None else self.base_layer.bias
        return w, b

    def get_delta_weight(self, **values: ConditionValue) -> torch.Tensor:
        """Sum of the weight updates of the branches whose condition is given, shaped like the base weight.

        ``layer.get_delta_weight(t=500, y=3)``: one value per condition, shared by all samples.
        Low-rank branches give ``scaling B A``, weight scales ``a ⊙ W`` (rows of the unmerged W).
        """
        weight = self._original()[0]
        delta = torch.zeros_like(weight)
        for _, branch in self._named_branches_reading(values):
            change = branch.delta_weight(values[branch.condition], weight)
            if change is not None:
                delta = delta + change.to(delta.dtype)
        return delta

    def get_delta_bias(self, **values: ConditionValue) -> torch.Tensor:
        """Sum of the bias shifts of the branches whose condition is given: [d_out]."""
        delta = self.base_layer.weight.new_zeros(self.out_features)
        for _, branch in self._named_branches_reading(values):
            change = branch.delta_bias(values[branch.condition])
            if change is not None:
                delta = delta + change.to(delta.dtype)
        return delta

    @torch.no_grad()
    def merge(self, **values: ConditionValue) -> None:
        """Write the updates of the branches reading the given conditions into the base weight and bias.

        ``layer.merge(t=500)`` merges every branch that reads ``t`` at t = 500; others stay
        per-sample. Merging again with another value replaces the merged value. The original
        weight and bias are kept and restored exactly by :meth:`unmerge`.
        """
        problem = self.merge_problem(**values)
        if problem:
            raise ValueError(problem)
        branches = dict(self._named_branches_reading(values))
        if not branches:
            return
        self.merged = {**self.merged, **{n: _scalar(values[b.condition]) for n, b in branches.items()}}
        self._write_merged()

    def merge_problem(self, **values: ConditionValue) -> str | None:
        """Why :meth:`merge` with these values would be refused (a one-line message), or None."""
        branches = dict(self._named_branches_reading(values))
        has_bias = self.base_layer.bias is not None
        for condition in {b.condition for b in branches.values()}:
            value = values[condition]
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                return f"merge: condition {condition!r} needs one value shared by all samples"
        # A branch at its "no update" value changes nothing, whatever its form: merging it is
        # exact (the merge_and_unload of the base model), so it is never a problem.
        at = {**self.merged, **{n: _scalar(values[b.condition]) for n, b in branches.items()}}
        for name, branch in branches.items():
            problem = None if branch.weighting.is_null(at[name]) else branch.merge_problem(name, has_bias)
            if problem:
                return problem
        # A weight scale left per sample multiplies the output of the base weight, and a merged
        # weight then holds the merged branches' changes: a merged low-rank update would be scaled
        # too, and a merged scale would multiply it ((1 + a1)(1 + a2) instead of 1 + a1 + a2).
        # Only bias shifts may be merged beside it (the per-sample scale leaves the bias out).
        merged = set(self.merged) | set(branches)
        live_scale = [n for n, b in self.adapters.items() if b.scales_weight and n not in merged]
        in_weight = [
            n
            for n in merged
            if (self.adapters[n].adds_to_weight or self.adapters[n].scales_weight)
            and not self.adapters[n].weighting.is_null(at[n])
        ]
        if live_scale and in_weight:
            return (
                f"merging adapter {in_weight[0]!r} into the weight while the weight scale {live_scale[0]!r} stays "
                f"per sample would scale the merged update too; merge the scale's condition "
                f"{self.adapters[live_scale[0]].condition!r} as well, or merge nothing"
            )
        return None

    @torch.no_grad()
    def unmerge(self, *conditions: str) -> None:
        """Undo :meth:`merge` for the branches reading ``conditions`` (all merged branches if none)."""
        for name in list(self.merged):
            if not conditions or self.adapters[name].condition in conditions:
                del self.merged[name]
        self._write_merged()

    def _write_merged(self) -> None:
        base = self.base_layer
        if self.merged and self._unmerged_weight is None:
            self._unmerged_weight = base.weight.detach().clone()
            self._unmerged_bias = base.bias.detach().clone() if base.bias is not None else None
        if self._unmerged_weight is None:
            return
        weight, bias = self._unmerged_weight, self._unmerged_bias
        live = {n: v for n, v in self.merged.items() if not self.adapters[n].weighting.is_null(v)}
        if not live:  # nothing merged, or only at "no update": the original, bit for bit
            base.weight.copy_(weight)
            if bias is not None:
                base.bias.copy_(bias)
            if not self.merged:
                self._unmerged_weight = self._unmerged_bias = None
            return
        # Accumulate in at least float32 (half-precision weights would lose small updates).
        dtype = torch.promote_types(weight.dtype, torch.float32)
        values = {self.adapters[n].condition: v for n, v in live.items()}
        w = weight.to(dtype)
        update = MergedUpdate(
            factor=torch.ones(self.out_features, dtype=dtype, device=w.device),
            delta=torch.zeros_like(w),
            shift=torch.zeros(self.out_features, dtype=dtype, device=w.device),
        )
        for name, branch in self.adapters.items():
            if name in live:
                branch.merge_into(update, values[branch.condition])
        base.weight.copy_((per_row(update.factor, w) * w + update.delta).to(base.weight.dtype))
        if bias is not None:
            base.bias.copy_((bias.to(dtype) + update.shift).to(bias.dtype))

    def _named_branches_reading(self, values: dict[str, Any]) -> list[tuple[str, Branch]]:
        return [(name, branch) for name, branch in self.adapters.items() if branch.condition in values]

    def has_nonmergeable(self) -> bool:
        """Whether any branch cannot be merged (``lowrank_act``)."""
        return any(not b.mergeable for b in self.adapters.values())

    # --- description ----------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """The base layer's structure (type and shapes; no values): adapter files check it on load."""
        base = self.base_layer
        fp: dict[str, Any] = {
            "type": type(base).__name__,
            "weight_shape": list(base.weight.shape),
            "bias": base.bias is not None,
        }
        if not isinstance(base, nn.Linear):
            fp.update(
                stride=list(base.stride),
                padding=base.padding if isinstance(base.padding, str) else list(base.padding),
                dilation=list(base.dilation),
            )
        return fp

    def extra_repr(self) -> str:
        merged = f", merged={self.merged}" if self.merged else ""
        return f"kind={self.kind}, in={self.in_features}, out={self.out_features}{merged}"


def _scalar(value: ConditionValue) -> Any:
    """One merge value shared by all samples (checked by :meth:`ConditionalLayer.merge_problem`), as a Python number."""
    return value.item() if isinstance(value, torch.Tensor) else value
