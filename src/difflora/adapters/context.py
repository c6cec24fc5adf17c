"""Per-sample conditions, set for the duration of one forward and read by the adapters inside it.

Backbones keep their plain ``net(x, t, y)`` signature: the wrapper around the whole forward
(:class:`difflora.model.DiffusionModel`) opens a :func:`conditions` block, and every adapter deep
inside the network reads the condition it declared with :func:`current`::

    with conditions(t=t, y=y):          # t, y: [N] tensors, one value per sample
        out = net(x, t_embed, y)        # adapters call current("t") / current("y")

The store is a :class:`contextvars.ContextVar`, so it is local to the thread (and asyncio task)
that runs the forward and is restored when the block exits, also on error. Blocks nest: an inner
block adds to or overrides the outer one's values.

A value is a tensor of one entry per sample ([N]), a 0-d tensor or a Python number (the whole
batch shares it), or ``None``: explicitly "no value for any sample" (``y=None``, the unconditional
batch of classifier-free guidance). Reading a condition nobody set is an error
(:class:`MissingConditionError`), never a silent default.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["ConditionValue", "MissingConditionError", "active", "conditions", "current"]

ConditionValue = torch.Tensor | int | float | None

# Default None rather than a shared mutable {} (each block sets a fresh mapping).
_CONDITIONS: contextvars.ContextVar[Mapping[str, ConditionValue] | None] = contextvars.ContextVar(
    "difflora_conditions", default=None
)


class MissingConditionError(LookupError):
    """An adapter read a condition that no enclosing :func:`conditions` block set."""


@contextlib.contextmanager
def conditions(**values: ConditionValue) -> Iterator[Mapping[str, ConditionValue]]:
    """Set per-sample conditions (``t=[N] tensor``, ``y=...``, ``task=...``) for the enclosed code.

    Yields the merged mapping in force inside the block (outer values plus these).
    """
    for name, value in values.items():
        if value is not None and not isinstance(value, torch.Tensor | int | float):
            raise TypeError(f"condition {name!r}: expected a tensor, a number or None, got {type(value).__name__}")
    merged = {**(_CONDITIONS.get() or {}), **values}
    token = _CONDITIONS.set(merged)
    try:
        yield merged
    finally:
        _CONDITIONS.reset(token)


def current(name: str) -> ConditionValue:
    """The value of condition ``name`` in force now; raises :class:`MissingConditionError` if unset."""
    values = _CONDITIONS.get() or {}
    if name not in values:
        have = ", ".join(sorted(values)) or "none"
        raise MissingConditionError(
            f"an adapter reads condition {name!r} but none is set (conditions set: {have}). Call the "
            f"network through difflora.model.DiffusionModel, which sets t and y, or wrap the call in "
            f"`with difflora.adapters.conditions({name}=...)`."
        )
    return values[name]


def active() -> dict[str, Any]:
    """A copy of all conditions in force now (for debugging and tests)."""
    return dict(_CONDITIONS.get() or {})
