"""Per-sample conditions, set for the duration of one forward and read by the adapters inside it.

Backbones keep their plain ``net(x, t, y)`` signature: the wrapper around the whole forward
(:class:`difflora.model.build.DiffusionModel`) opens a :func:`conditions` block, and every adapter deep
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

The same store holds the adapters switched off by :func:`adapters_disabled` (peft's
``disable_adapter``): a disabled adapter adds nothing, for the whole batch, inside the block.

``torch.compile``. The compiler cannot read a context variable (a graph break at every adapter), so
the store keeps a plain mirror of what is in force, which compiled code reads and sets instead:
every block sets both (a compiled region traces the mirror only). A whole model compiles into one
graph (``fullgraph=True``) and a compiled network also sees blocks opened around it. Eager code
reads the context variable, so it stays local to its thread; compiled code reads the values of the
block entered last, so threads that run compiled adapters at the same time must not open
different blocks.

Activation checkpointing. ``torch.utils.checkpoint`` recomputes a segment's forward during the
backward pass, after every ``with`` block has exited; a context variable is not restored for the
recompute, so adapters would see no conditions (or stale ones). :func:`checkpoint` captures the
conditions and disabled adapters in force at the forward and re-enters them for the recompute::

    with conditions(t=t):
        h = difflora.adapters.checkpoint(block, h, emb)   # not torch.utils.checkpoint.checkpoint
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.utils.checkpoint

from difflora.errors import DiffloraError

__all__ = [
    "ALL_ADAPTERS",
    "ConditionValue",
    "MissingConditionError",
    "active",
    "adapters_disabled",
    "checkpoint",
    "conditions",
    "current",
    "is_disabled",
]

ConditionValue = torch.Tensor | int | float | None

# Default None rather than a shared mutable {} (each block sets a fresh mapping).
_CONDITIONS: contextvars.ContextVar[Mapping[str, ConditionValue] | None] = contextvars.ContextVar(
    "difflora_conditions", default=None
)


# Names of the adapters switched off now; ALL_ADAPTERS switches off every adapter.
ALL_ADAPTERS = "*"
_DISABLED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("difflora_disabled", default=frozenset())


class _Mirror:
    """What is in force now, as plain attributes: ``torch.compile`` traces these (module docstring)."""

    conditions: Mapping[str, ConditionValue] | None = None
    disabled: frozenset[str] = frozenset()


_MIRROR = _Mirror()
State = tuple[Mapping[str, ConditionValue] | None, frozenset[str]]


def _state() -> State:
    """(conditions, disabled adapters) in force now: the mirror when compiling, else the context variables."""
    if torch.compiler.is_compiling():
        return _MIRROR.conditions, _MIRROR.disabled
    return _CONDITIONS.get(), _DISABLED.get()


@contextlib.contextmanager
def _in_force(state: State) -> Iterator[None]:
    """Put ``state`` in force for the enclosed code and restore what was before on exit (also on error)."""
    before = (_MIRROR.conditions, _MIRROR.disabled)
    _MIRROR.conditions, _MIRROR.disabled = state
    if torch.compiler.is_compiling():
        tokens = None
    else:
        tokens = (_CONDITIONS.set(state[0]), _DISABLED.set(state[1]))
    try:
        yield
    finally:
        if tokens is not None:
            _DISABLED.reset(tokens[1])
            _CONDITIONS.reset(tokens[0])
        _MIRROR.conditions, _MIRROR.disabled = before


class MissingConditionError(LookupError, DiffloraError):
    """An adapter read a condition that no enclosing :func:`conditions` block set."""


@contextlib.contextmanager
def conditions(**values: ConditionValue) -> Iterator[Mapping[str, ConditionValue]]:
    """Set per-sample conditions (``t=[N] tensor``, ``y=...``, ``task=...``) for the enclosed code.

    Yields the merged mapping in force inside the block (outer values plus these).
    """
    for name, value in values.items():
        if value is not None and not isinstance(value, torch.Tensor | int | float):
            raise TypeError(f"condition {name!r}: expected a tensor, a number or None, got {type(value).__name__}")
    outer, disabled = _state()
    merged = {**(outer or {}), **values}
    with _in_force((merged, disabled)):
        yield merged


def current(name: str) -> ConditionValue:
    """The value of condition ``name`` in force now; raises :class:`MissingConditionError` if unset."""
    values = _state()[0] or {}
    if name not in values:
        have = ", ".join(sorted(values)) or "none"
        raise MissingConditionError(
            f"an adapter reads condition {name!r} but none is set (conditions set: {have}). Call the "
            f"network through difflora.model.build.DiffusionModel, which sets t and y, or wrap the call in "
            f"`with difflora.adapters.conditions({name}=...)`."
        )
    return values[name]


def active() -> dict[str, Any]:
    """A copy of all conditions in force now (for debugging and tests)."""
    return dict(_state()[0] or {})


@contextlib.contextmanager
def adapters_disabled(*names: str) -> Iterator[None]:
    """Inside the block the adapters ``names`` (every adapter if none is named) add nothing.

    Covers every form and position adapters; merged adapters cannot be disabled (their update is
    in the weights): the layer raises and asks to unmerge. Blocks nest and add to each other.
    """
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"adapters_disabled: adapter names are strings, got {type(name).__name__}")
    values, off = _state()
    with _in_force((values, off | frozenset(names or (ALL_ADAPTERS,)))):
        yield


def is_disabled(name: str) -> bool:
    """Whether adapter ``name`` is switched off by an enclosing :func:`adapters_disabled` block."""
    off = _state()[1]
    return bool(off) and (name in off or ALL_ADAPTERS in off)


def checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)`` that adapters survive.

    The conditions and disabled adapters in force now are captured and re-entered for the
    recompute in backward, so the recomputed activations (and hence the gradients) equal those
    of the forward. ``kwargs`` go to ``fn``.
    """
    captured = _state()

    def run(*inner: Any) -> Any:
        with _in_force(captured):
            return fn(*inner, **kwargs)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)
