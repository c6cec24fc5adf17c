"""Activation checkpointing of a backbone's blocks (``model.checkpoint_blocks``).

A checkpointed block keeps only its inputs during the forward and recomputes its activations in
backward: memory falls from one set of activations per block to one per network, for about one
more forward of compute. The blocks are the U-Net's input, middle and output blocks and the DiT's
transformer blocks (:func:`checkpointable_blocks`).

The recompute happens after the model wrapper's ``conditions`` block has exited, so a plain
``torch.utils.checkpoint`` would let adapters read no (or stale) per-sample conditions;
:func:`difflora.adapters.checkpoint` captures the conditions and disabled adapters at the forward
and re-enters them for the recompute. The RNG state is restored for it too (dropout masks match).

The blocks are checkpointed with :func:`difflora.adapters.checkpoint_modules`: each block's
``forward`` is replaced on the instance, not wrapped in a new module, so parameter names, state
dicts and checkpoints stay exactly those of the model without checkpointing.
"""

from __future__ import annotations

from torch import nn

from difflora.adapters import checkpoint_modules

__all__ = ["block_paths", "checkpoint_blocks"]

# Attributes of a backbone that hold its blocks (U-Net: nets/unet.py; DiT: nets/dit.py), in forward order.
_BLOCK_LISTS = ("input_blocks", "output_blocks", "blocks")
_SINGLE_BLOCKS = ("middle_block",)


def block_paths(model: nn.Module) -> list[str]:
    """Module paths of the blocks of ``model`` (a DiffusionModel or a bare difflora backbone)."""
    prefix, inner = ("net.", model.net) if isinstance(getattr(model, "net", None), nn.Module) else ("", model)
    paths = []
    for name in ("input_blocks", *_SINGLE_BLOCKS, "output_blocks", "blocks"):
        part = getattr(inner, name, None)
        if name in _BLOCK_LISTS and isinstance(part, nn.ModuleList):
            paths.extend(f"{prefix}{name}.{i}" for i in range(len(part)))
        elif name in _SINGLE_BLOCKS and isinstance(part, nn.Module):
            paths.append(f"{prefix}{name}")
    return paths


def checkpoint_blocks(model: nn.Module) -> list[str]:
    """Checkpoint every block of ``model`` (see the module docstring); returns their paths.

    Raises ValueError when the model has no blocks difflora knows (a backbone it did not build).
    """
    paths = block_paths(model)
    if not paths:
        raise ValueError(
            "model.checkpoint_blocks=true but the model has no U-Net or DiT blocks to checkpoint; "
            "set model.checkpoint_blocks=false"
        )
    return checkpoint_modules(model, paths)
