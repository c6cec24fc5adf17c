"""Where the paper packages plug into the shared code.

The shared code (model building, training, sampling, evaluation, studies) never names a paper.
Where a paper adds something (an objective, a step of model expansion, a sampling or evaluation
hook), the shared code declares a :class:`Registry` and looks entries up by name; each paper
package fills the registries in one function, ``register()``, which its ``pyproject.toml`` entry
point names::

    [project.entry-points."difflora.papers"]
    distill = "difflora.distill:register"

The first lookup in any registry calls every installed paper's ``register()`` once
(:func:`load_papers`), so a registry is complete whether the caller came through the CLI, a
study or plain Python, and ``import difflora`` stays light. A fifth paper is one new package with
a ``register()`` and one entry-point line; a third-party package can add one the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

__all__ = ["PAPER_ENTRY_POINTS", "Registry", "load_papers", "loaded_papers"]

T = TypeVar("T")

# The entry-point group every paper package registers itself under.
PAPER_ENTRY_POINTS = "difflora.papers"

_loaded: list[str] | None = None


def load_papers() -> list[str]:
    """Call every installed paper's ``register()`` once; returns the papers' entry-point names."""
    global _loaded
    if _loaded is None:
        found = sorted(entry_points(group=PAPER_ENTRY_POINTS), key=lambda e: e.name)
        if not found:
            # A source tree on sys.path that was never installed: without its papers a config's
            # model.affiner or train.objective=distill would be ignored or refused, so say why now.
            raise RuntimeError(
                "difflora's paper packages are not registered (no 'difflora.papers' entry points): "
                "install difflora (pip install -e .) rather than putting src/ on the path"
            )
        _loaded = []  # set first: a register() that looks something up must not recurse
        for ep in found:
            register: Callable[[], None] = ep.load()
            register()
            _loaded.append(ep.name)
    return list(_loaded)


def loaded_papers() -> list[str]:
    """The papers whose ``register()`` has run (loading them if nothing has looked anything up yet)."""
    return load_papers()


class Registry(Generic[T]):
    """Named entries of one extension point, in registration order.

    ``what`` names the extension point in errors (e.g. ``"train.objective"``). Lookups load the
    installed papers first; registering a name twice is an error (two papers must not silently
    replace each other's entry).
    """

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.what}: {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        load_papers()
        try:
            return self._entries[name]
        except KeyError:
            choices = ", ".join(self._entries) or "none (is difflora installed? pip install -e .)"
            raise ValueError(f"{self.what}={name!r} is not registered; choices: {choices}") from None

    def __contains__(self, name: object) -> bool:
        load_papers()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        load_papers()
        return iter(list(self._entries))

    def items(self) -> list[tuple[str, T]]:
        load_papers()
        return list(self._entries.items())

    def values(self) -> list[T]:
        load_papers()
        return list(self._entries.values())
