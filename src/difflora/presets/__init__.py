"""The configs and experiments difflora ships: package data, found from any directory.

The files live inside the package so that a plain (non-editable) ``pip install`` carries them::

    difflora/presets/configs/NAME.yaml          training presets: digits, tiny-unet, pretrain/fmnist16-unet, ...
    difflora/presets/experiments/.../NAME.yaml  study and sweep YAMLs: timelora/digits, ...

The README names them by their repository-relative paths (``configs/digits.yaml``,
``experiments/timelora/digits.yaml``) and by preset name (``digits``). Resolution, in order:

1. a path that exists on disk is used as it is (a user's own file always wins);
2. a relative path starting with ``configs/`` or ``experiments/`` that does not exist on disk
   names the shipped copy (so the README's commands work in any directory);
3. for configs only, a bare preset name with or without ``.yaml`` (``digits``,
   ``pretrain/fmnist16-unet``) names ``configs/NAME.yaml``.

This module imports nothing from difflora: the config layer, the CLI and the study runner all
resolve names through it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CONFIGS_DIR",
    "EXPERIMENTS_DIR",
    "PRESETS_DIR",
    "config_presets",
    "experiment_presets",
    "resolve_config",
    "resolve_shipped",
]

PRESETS_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PRESETS_DIR / "configs"
EXPERIMENTS_DIR = PRESETS_DIR / "experiments"
_ROOTS = {"configs": CONFIGS_DIR, "experiments": EXPERIMENTS_DIR}


def _names(root: Path) -> list[str]:
    return sorted(q.relative_to(root).with_suffix("").as_posix() for q in root.rglob("*.yaml"))


def config_presets() -> list[str]:
    """Every shipped config preset name, e.g. ``["digits", "distill/digits", "paper/iddpm-cifar10", ...]``."""
    return _names(CONFIGS_DIR)


def experiment_presets() -> list[str]:
    """Every shipped study or sweep, as the repository-relative path the README uses (``experiments/...yaml``)."""
    return [f"experiments/{n}.yaml" for n in _names(EXPERIMENTS_DIR)]


def resolve_shipped(path: str | Path) -> Path:
    """``path`` if it exists; else the shipped copy of a ``configs/...`` or ``experiments/...`` path.

    Anything else (or a shipped name that does not exist either) comes back unchanged, so the
    caller's "does not exist" error names the path the user typed.
    """
    p = Path(path)
    if p.exists() or p.is_absolute() or len(p.parts) < 2 or p.parts[0] not in _ROOTS:
        return p
    shipped = _ROOTS[p.parts[0]].joinpath(*p.parts[1:])
    return shipped if shipped.is_file() else p


def resolve_config(name: str | Path) -> Path | None:
    """The config file ``name`` names (a path, a ``configs/...`` path, or a preset name); None if none.

    >>> resolve_config("digits") == CONFIGS_DIR / "digits.yaml"
    True
    >>> resolve_config("configs/pretrain/fmnist16-unet.yaml") == CONFIGS_DIR / "pretrain" / "fmnist16-unet.yaml"
    True
    >>> resolve_config("no-such-preset") is None
    True
    """
    p = resolve_shipped(name)
    if p.is_file():
        return p
    text = str(name)
    if p.is_absolute() or text.startswith(("/", ".")):
        return None
    for candidate in (CONFIGS_DIR / text, CONFIGS_DIR / f"{text}.yaml"):
        if candidate.is_file():
            return candidate
    return None
