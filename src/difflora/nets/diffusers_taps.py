"""004's positions inside diffusers' blocks: named taps put in by hooks, diffusers' code unchanged.

difflora's own blocks call a parameter-free ``tap_<name>`` module at each named point of their
forward (``difflora.adapters.positions``). A diffusers block is not ours to edit, so
:func:`add_diffusers_taps` gives each supported block the same face from outside: ``tap_<name>``
children (:class:`Tap`, an ``nn.Identity``) that forward hooks on the block's own submodules run
the activation through, and the attributes position adapters read (``TAPS`` in forward order,
``TAP_PAIRS``, ``tap_channels``, ``tap_layout``, ``tap_kernel``). A position adapter then hooks
those taps exactly as in difflora's blocks and lives at ``<block>.position_adapters.<name>``.
The taps add no parameter and change no parameter name, and a tap nobody hooks returns its input
object itself, so a model with taps computes bit for bit what it computed without them.

:data:`DIFFUSERS_BLOCK_TAPS` maps a diffusers block class to where each tap sits: a submodule of
the block (``""``: the block itself) and whether the tap sees its input or its output. In
``BasicTransformerBlock`` (LDM's block, SD's)::

    x = x + attn1(norm1(x))       attn1_in: block input    attn1_out: attn1's output
    x = x + attn2(norm2(x), ctx)  attn2_in: norm2's input  context: attn2's encoder_hidden_states
                                  attn2_out: attn2's output
    x = x + ff(norm3(x))          ff_in: norm3's input     ff_out: ff's output
                                  out: block output

A residual-stream point that diffusers only holds in a local variable (``attn2_in``, ``ff_in``) is
read at the input of the norm that reads it. What an adapter writes there must reach the residual
sum too, which the hooks cannot reach: the tap *carries* the change ``x' - x`` to the output of
the sub-layer that follows (``attn2``, ``ff``), so the sum is ``sub(norm(x')) + (x' - x) + x``, the
stream's ``x'`` up to one rounding (exact when the change is zero).

Supported: ``BasicTransformerBlock`` with ``norm_type="layer_norm"``, a cross-attention
(``attn2``), no positional embedding and self-attention in ``attn1`` (SD 1.x / 2.x); feed-forward
chunking (``set_chunk_feed_forward``) is refused while a position adapter is attached.
``ResnetBlock2D`` without up- or downsampling (``in``, ``out``). Other blocks get no taps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from difflora.nets.transformer import TRANSFORMER_TAP_PAIRS

__all__ = ["DIFFUSERS_BLOCK_TAPS", "BlockTaps", "Site", "Tap", "add_diffusers_taps", "diffusers_block_taps"]


@dataclass(frozen=True)
class Site:
    """Where a tap sits in a diffusers block.

    ``module``: the block's submodule (``""``: the block); ``where``: its ``input`` or ``output``;
    for an input, the argument (``arg`` by keyword, ``position`` when passed positionally);
    ``carry``: for a residual-stream point read at a norm's input, the submodule whose output gets
    the change the tap made (see the module docstring).
    """

    module: str
    where: Literal["input", "output"]
    arg: str = ""
    position: int = 0
    carry: str | None = None


@dataclass(frozen=True)
class BlockTaps:
    """The taps of one diffusers block class: sites in forward order, pairs, layout, kernel, and two
    functions of a block instance: whether it has the forward the sites describe, and each tap's width."""

    sites: dict[str, Site]
    layout: Literal["channels_first", "channels_last"]
    pairs: tuple[tuple[str, str], ...] | None  # None: every pair with source at or before dest
    kernel: int
    supports: Callable[[nn.Module], bool]
    channels: Callable[[nn.Module], dict[str, int]]
    refuse: Callable[[nn.Module, tuple, dict[str, Any]], None] | None = None  # a pre-hook: what taps cannot follow


def _sd_transformer(block: nn.Module) -> bool:
    """LDM's block (SD 1.x / 2.x): pre-LayerNorm, self-attention, cross-attention, no positional embedding."""
    return (
        block.norm_type == "layer_norm"
        and block.attn2 is not None
        and block.pos_embed is None
        and not block.only_cross_attention
    )


def _refuse_chunking(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Pre-hook: chunked feed-forward runs ``ff`` once per chunk, which the ``ff`` taps cannot follow."""
    if getattr(block, "_chunk_size", None) is not None and len(getattr(block, "position_adapters", ())):
        raise ValueError(
            "a BasicTransformerBlock with position adapters cannot chunk its feed-forward: "
            "call set_chunk_feed_forward(None) on it (or disable_forward_chunking() on the model)"
        )


_TRANSFORMER_SITES = {
    "attn1_in": Site("", "input", "hidden_states"),
    "attn1_out": Site("attn1", "output"),
    "attn2_in": Site("norm2", "input", "input", carry="attn2"),
    "context": Site("attn2", "input", "encoder_hidden_states", position=1),
    "attn2_out": Site("attn2", "output"),
    "ff_in": Site("norm3", "input", "input", carry="ff"),
    "ff_out": Site("ff", "output"),
    "out": Site("", "output"),
}
_TRANSFORMER = BlockTaps(
    sites=_TRANSFORMER_SITES,
    layout="channels_last",
    pairs=TRANSFORMER_TAP_PAIRS,  # 004's 17 transformer pairs, as in difflora's TransformerBlock
    kernel=1,
    supports=_sd_transformer,
    channels=lambda b: {
        **dict.fromkeys(_TRANSFORMER_SITES, b.norm1.normalized_shape[0]),
        "context": b.attn2.to_k.in_features,
    },
    refuse=_refuse_chunking,
)
_RESNET = BlockTaps(
    sites={"in": Site("", "input", "input_tensor"), "out": Site("", "output")},
    layout="channels_first",
    pairs=None,
    kernel=3,  # 004's ResBlock adapters are 3 x 3 convolutions, as in difflora's ResBlock
    supports=lambda b: b.upsample is None and b.downsample is None,  # in and out alike in size
    channels=lambda b: {"in": b.in_channels, "out": b.out_channels},
)

# diffusers block class name -> its taps. A new block is one entry.
DIFFUSERS_BLOCK_TAPS: dict[str, BlockTaps] = {"BasicTransformerBlock": _TRANSFORMER, "ResnetBlock2D": _RESNET}


class Tap(nn.Identity):
    """A named point of a diffusers block: hooks on the block's submodules pass the activation
    through it, and position adapters hook it. ``carry`` holds the change made at a residual
    point until the next sub-layer's output takes it."""

    def __init__(self, site: Site) -> None:
        super().__init__()
        self.site = site
        self._carry: torch.Tensor | None = None

    def on_input(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Forward pre-hook (with kwargs) of the site's module: its input through the tap."""
        name, pos = self.site.arg, self.site.position
        if name in kwargs:
            value = kwargs[name]
        elif len(args) > pos:
            value = args[pos]
        else:
            return None
        new = value if value is None else self(value)
        if self.site.carry is not None:
            self._carry = None if new is value else new - value
        if new is value:
            return None
        if name in kwargs:
            return args, {**kwargs, name: new}
        return (*args[:pos], new, *args[pos + 1 :]), kwargs

    def on_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the site's module: its output through the tap."""
        return self(output)

    def take_carry(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook of the carrying sub-layer: add the change the tap made to the stream."""
        carry, self._carry = self._carry, None
        return None if carry is None else output + carry


def diffusers_block_taps(block: nn.Module) -> BlockTaps | None:
    """The tap table of ``block`` if it is a supported diffusers block (exact class), else None."""
    taps = DIFFUSERS_BLOCK_TAPS.get(type(block).__name__)
    if taps is None or not type(block).__module__.startswith("diffusers."):
        return None
    return taps if taps.supports(block) else None


def _install(block: nn.Module, taps: BlockTaps) -> None:
    """Give ``block`` its taps: the attributes, the ``tap_<name>`` children and the hooks."""
    block.TAPS = tuple(taps.sites)
    block.TAP_PAIRS = taps.pairs
    block.tap_layout = taps.layout
    block.tap_kernel = taps.kernel
    block.tap_channels = taps.channels(block)
    if taps.refuse is not None:
        block.register_forward_pre_hook(taps.refuse, with_kwargs=True)
    made = []
    for name, site in taps.sites.items():
        tap = Tap(site)
        setattr(block, f"tap_{name}", tap)
        module = block.get_submodule(site.module)
        if site.where == "input":
            module.register_forward_pre_hook(tap.on_input, with_kwargs=True)
        else:
            module.register_forward_hook(tap.on_output)
        made.append(tap)
    # After every sub-layer's own output tap: the sub-layer's output is what its tap shows.
    for tap in made:
        if tap.site.carry is not None:
            block.get_submodule(tap.site.carry).register_forward_hook(tap.take_carry)


def add_diffusers_taps(model: nn.Module) -> list[str]:
    """Put taps on every supported diffusers block inside ``model`` (once); returns their paths.

    ``add_diffusers_taps(unet)`` makes ``inject_position_adapter(unet, ..., ["re:.*transformer_blocks\\.\\d+"],
    "attn2_out", "ff_in")`` work on a diffusers ``UNet2DConditionModel``; :class:`DiffusersNet` calls it.
    """
    found = [(p, m, diffusers_block_taps(m)) for p, m in model.named_modules()]  # listed before adding children
    for _, module, taps in found:
        if taps is not None and not hasattr(module, "TAPS"):
            _install(module, taps)
    return [p for p, _, taps in found if taps is not None]
