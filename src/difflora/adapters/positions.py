"""Position adapters (004): read the activation at one named tap of a block, add ``scale * f(h)`` at another.

A *tap* is a parameter-free ``nn.Identity`` inside a block, at a named point of its forward; a
block that has taps lists them in forward order as ``TAPS`` (attribute ``tap_<name>``), their
widths in ``tap_channels`` and their layout in ``tap_layout`` (``"channels_first"``: [N x C x ...],
the U-Net's; ``"channels_last"``: [N x ... x C], DiT's tokens). difflora's blocks have them:

* U-Net ``ResBlock`` and ``AttentionBlock``: ``in`` (the block's input), ``out`` (its output, after the residual sum);
* ``DiTBlock``: ``in``, ``attn_in`` (the modulated, normalised input of attention), ``attn_out``
  (attention's output, before the gate), ``mlp_in``, ``mlp_out`` (likewise) and ``out``.

A position adapter between ``source`` and ``dest`` (``source`` at or before ``dest`` in ``TAPS``)
computes, per sample with condition c,

    h_dest <- h_dest + scale * (sum_i w_i(c) [ up_i act(down_i h_source) + bias_i ])

``f`` is linear (``activation="identity"``: a rank-``rank`` factorisation, full width when
``rank`` equals the channel count) or a bottleneck MLP (relu, silu, gelu, sigmoid), routed per
sample by the same router as every layer form (a bank per task, per timestep basis, ...).
``down`` [num_bases x rank x C_in] is initialised as ``nn.Linear``'s weight (Kaiming-uniform),
``up`` [num_bases x C_out x rank] and ``bias`` [num_bases x C_out] are zero: a fresh adapter
changes no output. ``scale`` is a fixed number (004's scale factor), not trained.

The adapter is a child module of its block, ``<block>.position_adapters.<name>``, so its parameter
paths are stable; it acts through forward hooks on the two taps (the source hook keeps the
activation, the destination hook adds the update), which ``copy.deepcopy`` rebinds to the copy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from difflora.adapters.context import current, is_disabled
from difflora.adapters.forms import activation, as_batch
from difflora.adapters.router import Geometry, Route, add_rank_terms, per_channel, rank_term
from difflora.adapters.weightings import Weighting

__all__ = ["PositionAdapter", "add_position_adapter", "has_taps", "position_adapters"]


def has_taps(module: nn.Module) -> bool:
    """Whether ``module`` is a block with named taps (``TAPS``, ``tap_channels``, ``tap_layout``)."""
    return bool(getattr(module, "TAPS", None)) and hasattr(module, "tap_channels")


class PositionAdapter(nn.Module):
    """``h_dest += scale * f(h_source)`` between two taps of one block, conditional on ``condition``."""

    def __init__(
        self,
        block: nn.Module,
        name: str,
        weighting: Weighting,
        condition: str,
        source: str,
        dest: str,
        rank: int = 4,
        act: str = "identity",
        scale: float = 1.0,
    ):
        super().__init__()
        if not has_taps(block):
            raise ValueError(f"{type(block).__name__} has no named taps; position adapters need difflora's blocks")
        taps = list(block.TAPS)
        for role, tap in (("source", source), ("dest", dest)):
            if tap not in taps:
                raise ValueError(
                    f"{role} tap {tap!r} is not a tap of {type(block).__name__}; its taps: {', '.join(taps)}"
                )
        pairs = getattr(block, "TAP_PAIRS", None)  # blocks that list their valid pairs (004's design space)
        if pairs is not None and (source, dest) not in pairs:
            raise ValueError(
                f"({source}, {dest}) is not a valid (source, dest) pair of {type(block).__name__}; "
                f"valid pairs: {', '.join(f'{s}->{d}' for s, d in pairs)}"
            )
        if taps.index(source) > taps.index(dest):
            raise ValueError(
                f"source tap {source!r} comes after dest tap {dest!r} in {type(block).__name__}'s forward "
                f"(order: {', '.join(taps)}); an adapter reads earlier and writes later"
            )
        if rank < 1:
            raise ValueError(f"PositionAdapter: rank (bottleneck width) must be >= 1, got {rank}")
        if not name.isidentifier() or not condition.isidentifier():
            raise ValueError(f"adapter name {name!r} and condition {condition!r} must be Python identifiers")
        activation(act)  # validates the name
        self.name, self.condition, self.source, self.dest = name, condition, source, dest
        self.rank, self.act_name, self.scale = int(rank), act, float(scale)
        kind = "pointwise" if block.tap_layout == "channels_first" else "linear"
        self.geometry = Geometry(kind, block.tap_channels[source], block.tap_channels[dest])
        nb = weighting.num_bases
        self.weighting = weighting
        self.lora_down = nn.Parameter(torch.empty(nb, rank, self.geometry.in_features))
        self.lora_up = nn.Parameter(torch.empty(nb, self.geometry.out_features, rank))
        self.bias = nn.Parameter(torch.empty(nb, self.geometry.out_features))
        self.reset_parameters()
        self._stash: torch.Tensor | None = None

    def attach(self, block: nn.Module) -> None:
        """Hook the adapter into ``block``'s taps (:func:`add_position_adapter` calls it)."""
        block.get_submodule(f"tap_{self.source}").register_forward_hook(self._read)
        block.get_submodule(f"tap_{self.dest}").register_forward_hook(self._write)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for i in range(self.lora_down.shape[0]):
            nn.init.kaiming_uniform_(self.lora_down[i], a=math.sqrt(5))  # nn.Linear's weight init
        nn.init.zeros_(self.lora_up)
        nn.init.zeros_(self.bias)

    def route(self, n: int, device: torch.device) -> Route | None:
        mix = self.weighting(as_batch(current(self.condition), n, device, self.condition))
        return None if mix is None else Route.of(mix)

    def _read(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.source != self.dest:
            self._stash = output

    def _write(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        h, self._stash = (output if self.source == self.dest else self._stash), None
        if h is None:
            raise RuntimeError(
                f"position adapter {self.name!r}: dest tap {self.dest!r} ran before source tap {self.source!r}"
            )
        if is_disabled(self.name):
            return output
        return self.apply(h, output)

    def apply(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``out + scale f(h)`` for the batch: h [N x C_in x ...] or [N x ... x C_in], out likewise with C_out."""
        route = self.route(h.shape[0], h.device)
        if route is None:
            return out
        dtype = h.dtype
        bias = route.vectors(self.bias, dtype) * self.scale
        # A new tensor (never the tap's input in place: the block may still use it, e.g. a residual).
        out = out + per_channel(bias, out, self.geometry).to(out.dtype)
        s = route.slot_scales(self.scale, dtype)
        term = rank_term(route, self.lora_down, self.lora_up, s, activation(self.act_name), dtype)
        return add_rank_terms(out, h, self.geometry, [term])

    def spec(self) -> dict[str, Any]:
        """JSON-able description (adapter files store it)."""
        return {
            "form": "position",
            "condition": self.condition,
            "weighting": self.weighting.spec(),
            "source": self.source,
            "dest": self.dest,
            "rank": self.rank,
            "activation": self.act_name,
            "scale": self.scale,
        }

    def extra_repr(self) -> str:
        return (
            f"{self.source} -> {self.dest}, condition={self.condition!r}, rank={self.rank}, "
            f"activation={self.act_name}, scale={self.scale:g}"
        )


def add_position_adapter(block: nn.Module, adapter: PositionAdapter) -> PositionAdapter:
    """Attach ``adapter`` (built for ``block``) as ``block.position_adapters[adapter.name]``."""
    if not hasattr(block, "position_adapters"):
        block.position_adapters = nn.ModuleDict()
    if adapter.name in block.position_adapters:
        raise ValueError(f"this block already has a position adapter named {adapter.name!r}")
    adapter.attach(block)
    ref = next(block.parameters(), None)
    if ref is not None and ref.is_floating_point():
        adapter.to(device=ref.device, dtype=ref.dtype)
    block.position_adapters[adapter.name] = adapter
    return adapter


def position_adapters(model: nn.Module) -> list[tuple[str, PositionAdapter]]:
    """``(block path, adapter)`` for every position adapter in ``model`` (the root block's path is "")."""
    out = []
    for path, module in model.named_modules():
        if isinstance(module, PositionAdapter):
            block = path.rsplit(".position_adapters.", 1)[0] if ".position_adapters." in path else ""
            out.append((block, module))
    return out
