"""Dotted ``--set`` overrides (``train.lr=2e-4``, ``model.adapters.0.rank=8``) applied to a config tree.

Part of the bottom layer with :mod:`difflora.config.schema`, which applies them before validation.
"""

from __future__ import annotations

from typing import Any

import yaml

from difflora.config.base import ConfigError

__all__ = ["apply_override", "parse_override", "yaml_problem"]


def apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in ``tree``; a number after a list (``model.adapters.0.rank``) is an index into it."""
    parts = dotted.split(".")
    node: Any = tree
    for i, p in enumerate(parts):
        where = ".".join(parts[:i])
        if isinstance(node, list):
            if not (p.isdigit() and int(p) < len(node)):
                have = f"a list of {len(node)} entries (index 0..{len(node) - 1})" if node else "an empty list"
                raise ConfigError(f"{dotted}: {where} is {have}; give the whole list instead: {where}=[...]")
            p = int(p)
        elif not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{parts[i - 1]}' is a value, not a section ({where} = {node!r})")
        if i == len(parts) - 1:
            node[p] = value
        elif isinstance(node, dict):
            node = node.setdefault(p, [] if parts[i + 1].isdigit() else {})
        else:
            node = node[p]


def yaml_problem(exc: yaml.YAMLError) -> str:
    # PyYAML's str() spans several lines with a drawing of the text; the problem and its place suffice.
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{getattr(exc, 'problem', None) or exc}"


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=2e-4"`` -> ``("train.lr", 0.0002)``; values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.lr=2e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {yaml_problem(exc)}") from None
    # YAML reads "1e-4" as a string (no dot); a number is what the user meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return key, value
