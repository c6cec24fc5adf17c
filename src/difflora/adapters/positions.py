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

    h_dest <- h_dest + scale * (sum_i w_i(c) [ up_i act(down_i h_source + down_bias_i) + bias_i ])

which is 004's adapter ``f_up(act(f_down(x)))`` times its scale factor, with ``f_down`` and
``f_up`` layers that have a bias (its reference code builds them as ``nn.Linear`` in transformer
blocks and ``3 x 3`` ``nn.Conv2d`` in ResBlocks). ``f`` is linear (``activation="identity"``: a
rank-``rank`` factorisation, full width when ``rank`` equals the channel count) or a bottleneck
MLP (relu, silu, gelu, sigmoid), routed per sample by the same router as every layer form (a bank
per task, per timestep basis, ...).

On [N x C x ...] blocks ``kernel`` picks the convolution of ``down`` and ``up``: ``"full"`` (the
default) is the block's own ``tap_kernel`` (3 in the U-Net's ResBlock: 004's 3 x 3 adapters; 1
where a block has none), ``"1x1"`` or an odd integer k is that k x k (stride 1, "same" padding).
Token blocks (channels last) are always per token.

``down`` [num_bases x rank x C_in k^d] and ``down_bias`` [num_bases x rank] are initialised as
``nn.Linear`` / ``nn.Conv`` initialise weight and bias (Kaiming-uniform, fan-in C_in k^d);
``up`` [num_bases x C_out x rank k^d] and ``bias`` [num_bases x C_out] are zero: a fresh adapter
changes no output (difflora's choice; ``up_init="linear"`` gives them the ``nn.Linear`` initialisation
too, as 004's reference code does, so a fresh adapter already changes the output). ``scale`` is a
fixed number (004's scale factor), not trained.

The adapter is a child module of its block, ``<block>.position_adapters.<name>``, so its parameter
paths are stable; it acts through forward hooks on the two taps (the source hook keeps the
activation, the destination hook adds the update), which ``copy.deepcopy`` rebinds to the copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflora.adapters.context import current, is_disabled
from difflora.adapters.forms import activation, as_batch
from difflora.adapters.router import Geometry, Route, add_rank_terms, per_channel, rank_term
from difflora.adapters.weightings import Weighting

__all__ = [
    "UP_INITS",
    "PositionAdapter",
    "add_position_adapter",
    "check_position_adapter",
    "fit_position_adapter",
    "has_taps",
    "position_adapters",
    "remove_position_adapter",
]


def has_taps(module: nn.Module) -> bool:
    """Whether ``module`` is a block with named taps (``TAPS``, ``tap_channels``, ``tap_layout``)."""
    return bool(getattr(module, "TAPS", None)) and hasattr(module, "tap_channels")


def _kernel_size(block: nn.Module, kernel: int | str) -> int:
    """The odd kernel size ``kernel`` means on ``block`` ("full": the block's ``tap_kernel``, default 1)."""
    if kernel == "full":
        return int(getattr(block, "tap_kernel", 1))
    k = 1 if kernel == "1x1" else kernel
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"position adapter kernel must be 'full', '1x1' or an odd size >= 1, got {kernel!r}")
    if k > 1 and block.tap_layout != "channels_first":
        raise ValueError(f"a {k}x{k} position adapter needs a block of feature maps; {type(block).__name__} has tokens")
    return k


# How ``up`` and its bias start: "zero" (a fresh adapter changes nothing) or "linear" (nn.Linear's init).
UP_INITS = ("zero", "linear")


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
        kernel: int | str = "full",
        up_init: str = "zero",
    ):
        super().__init__()
        if up_init not in UP_INITS:
            raise ValueError(f"PositionAdapter: up_init must be one of {', '.join(UP_INITS)}, got {up_init!r}")
        self.up_init = up_init
        if not has_taps(block):
            raise ValueError(
                f"{type(block).__name__} has no named taps; position adapters need difflora's blocks or diffusers' (nets/diffusers_taps.py)"
            )
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
        if not math.isfinite(scale):
            raise ValueError(f"PositionAdapter: scale must be a finite number, got {scale}")
        if not name.isidentifier() or not condition.isidentifier():
            raise ValueError(f"adapter name {name!r} and condition {condition!r} must be Python identifiers")
        activation(act)  # validates the name
        self.name, self.condition, self.source, self.dest = name, condition, source, dest
        self.rank, self.act_name, self.scale = int(rank), act, float(scale)
        self.kernel = _kernel_size(block, kernel)
        c_in, c_out = block.tap_channels[source], block.tap_channels[dest]
        if block.tap_layout != "channels_first":
            self.geometry = Geometry("linear", c_in, c_out)
        elif self.kernel == 1:
            self.geometry = Geometry("pointwise", c_in, c_out)
        else:
            k, pad = self.kernel, self.kernel // 2
            self.geometry = Geometry("conv", c_in, c_out, (k, k), (1, 1), (pad, pad), (1, 1))
        taps = self.kernel if self.geometry.kind == "conv" else 1
        nb = weighting.num_bases
        self.weighting = weighting
        # k x k factors are stored flat (C_in k k, rank k k), like the layer forms' conv factors.
        self.lora_down = nn.Parameter(torch.empty(nb, rank, c_in * taps * taps))
        self.down_bias = nn.Parameter(torch.empty(nb, rank))
        self.lora_up = nn.Parameter(torch.empty(nb, c_out, rank * taps * taps))
        self.bias = nn.Parameter(torch.empty(nb, c_out))
        self.reset_parameters()
        self._stash: torch.Tensor | None = None

    def attach(self, block: nn.Module) -> None:
        """Hook the adapter into ``block``'s taps (:func:`add_position_adapter` calls it)."""
        block.get_submodule(f"tap_{self.source}").register_forward_hook(self._read)
        block.get_submodule(f"tap_{self.dest}").register_forward_hook(self._write)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        fan_in = self.lora_down.shape[-1]
        for i in range(self.lora_down.shape[0]):
            nn.init.kaiming_uniform_(self.lora_down[i], a=math.sqrt(5))  # nn.Linear / nn.Conv's weight init
        nn.init.uniform_(self.down_bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))  # and their bias init
        if self.up_init == "linear":  # 004's reference: up is an nn.Linear / nn.Conv with its own init
            fan_up = self.lora_up.shape[-1]
            for i in range(self.lora_up.shape[0]):
                nn.init.kaiming_uniform_(self.lora_up[i], a=math.sqrt(5))
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_up), 1 / math.sqrt(fan_up))
        else:
            nn.init.zeros_(self.lora_up)
            nn.init.zeros_(self.bias)

    def route(self, n: int, device: torch.device) -> Route | None:
        return self.weighting(as_batch(current(self.condition), n, device, self.condition))

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
        if self.geometry.kind == "conv":
            return out + self._conv_f(route, h, s, dtype).to(out.dtype)
        term = rank_term(route, self.lora_down, self.lora_up, s, self._activation(route, dtype), dtype)
        return add_rank_terms(out, h, self.geometry, [term])

    def _activation(self, route: Route, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """``act(z + down_bias)`` on the router's rank-space activations: [N x L x R] (tokens) or
        [N x R x L] (channels first), R = K r (sparse; the routed entries' biases per sample) or
        num_bases r (dense; every entry's, shared)."""
        act = activation(self.act_name) or (lambda z: z)
        if route.sparse:
            b = route.gather(self.down_bias, dtype).flatten(1)  # (N, K r), rows in rank_term's (k, r) order
            b = b[:, None, :] if self.geometry.kind == "linear" else b[:, :, None]
        else:
            b = self.down_bias.to(dtype).reshape(-1)  # (num_bases r)
            b = b if self.geometry.kind == "linear" else b[:, None]
        return lambda z: act(z + b)

    def _conv_f(self, route: Route, h: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``sum_i w_i up_i * act(down_i * h + down_bias_i)`` with k x k convolutions (``*``), h [N x C_in x H x W]
        -> [N x C_out x H x W]; s [N x K] or [N x num_bases] (weights times scale). Sparse routes run
        one grouped convolution per factor with a group per sample (no per-sample loop)."""
        if h.dim() != 4:
            raise ValueError(f"position adapter {self.name!r}: a {self.kernel}x{self.kernel} kernel needs 2-d maps")
        n, c_in, hh, ww = h.shape
        k, r, pad = self.kernel, self.rank, self.kernel // 2
        c_out = self.lora_up.shape[1]
        act = activation(self.act_name) or (lambda z: z)
        x = h.to(dtype)
        if route.sparse:
            kk = route.index.shape[1]
            down = route.gather(self.lora_down, dtype).reshape(n * kk * r, c_in, k, k)
            z = F.conv2d(
                x.reshape(1, n * c_in, hh, ww), down, route.gather(self.down_bias, dtype).reshape(-1), 1, pad, 1, n
            )
            z = act(z).view(n, kk, r, hh, ww) * s[:, :, None, None, None]
            # up per sample: [N x C_out x (K r) x k x k], rows in the same (k, r) order as z's channels.
            up = route.gather(self.lora_up, dtype).view(n, kk, c_out, r, k, k).transpose(1, 2)
            out = F.conv2d(z.reshape(1, n * kk * r, hh, ww), up.reshape(n * c_out, kk * r, k, k), None, 1, pad, 1, n)
            return out.view(n, c_out, hh, ww)
        nb = self.lora_down.shape[0]
        down = self.lora_down.to(dtype).reshape(nb * r, c_in, k, k)
        z = act(F.conv2d(x, down, self.down_bias.to(dtype).reshape(-1), 1, pad))
        z = z * s.repeat_interleave(r, dim=1)[:, :, None, None]  # (N, num_bases r, H, W)
        up = self.lora_up.to(dtype).view(nb, c_out, r, k, k).transpose(0, 1).reshape(c_out, nb * r, k, k)
        return F.conv2d(z, up, None, 1, pad)

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
            "kernel": self.kernel,
        }

    def extra_repr(self) -> str:
        return (
            f"{self.source} -> {self.dest}, condition={self.condition!r}, rank={self.rank}, "
            f"activation={self.act_name}, scale={self.scale:g}, kernel={self.kernel}"
        )


def add_position_adapter(block: nn.Module, adapter: PositionAdapter) -> PositionAdapter:
    """Attach ``adapter`` (built for ``block``) as ``block.position_adapters[adapter.name]``."""
    check_position_adapter(block, adapter.name)
    fit_position_adapter(block, adapter)
    if not hasattr(block, "position_adapters"):
        block.position_adapters = nn.ModuleDict()
    adapter.attach(block)
    block.position_adapters[adapter.name] = adapter
    return adapter


def remove_position_adapter(block: nn.Module, name: str) -> PositionAdapter:
    """Detach position adapter ``name`` from ``block`` (its hooks and its module; the empty
    ``position_adapters`` container too), leaving the block's module tree as before it was added."""
    adapter = block.position_adapters[name]
    for tap in {adapter.source, adapter.dest}:
        hooks = block.get_submodule(f"tap_{tap}")._forward_hooks
        for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is adapter]:
            del hooks[key]
    del block.position_adapters[name]
    if not len(block.position_adapters):
        del block.position_adapters
    return adapter


def check_position_adapter(block: nn.Module, name: str) -> None:
    """Raise if ``block`` cannot take a position adapter called ``name`` (it has one of that name)."""
    if name in getattr(block, "position_adapters", {}):
        raise ValueError(f"this block already has a position adapter named {name!r}")


def fit_position_adapter(block: nn.Module, adapter: PositionAdapter) -> PositionAdapter:
    """``adapter`` moved to the device and floating type of ``block``'s parameters, in place (not attached)."""
    ref = next(block.parameters(), None)
    if ref is not None and ref.is_floating_point():
        adapter.to(device=ref.device, dtype=ref.dtype)
    return adapter


def position_adapters(model: nn.Module) -> list[tuple[str, PositionAdapter]]:
    """``(block path, adapter)`` for every position adapter in ``model`` (the root block's path is "")."""
    out = []
    for path, module in model.named_modules():
        if isinstance(module, PositionAdapter):
            block = path.rsplit(".position_adapters.", 1)[0] if ".position_adapters." in path else ""
            out.append((block, module))
    return out
