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

``difflora presets`` lists them with the first sentence of each file's leading comment
(:func:`preset_descriptions`) and ``difflora presets copy NAME`` copies one out to edit
(:func:`shipped_file`). A shipped study's committed records live in the source checkout the package
runs from (:data:`SOURCE_ROOT`), none when difflora is installed without one.

This module imports nothing from difflora: the config layer, the CLI and the study runner all
resolve names through it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CONFIGS_DIR",
    "EXPERIMENTS_DIR",
    "PRESETS_DIR",
    "SOURCE_ROOT",
    "config_presets",
    "experiment_presets",
    "is_shipped",
    "preset_descriptions",
    "resolve_config",
    "resolve_shipped",
    "shipped_file",
    "shipped_name",
]

PRESETS_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PRESETS_DIR / "configs"
EXPERIMENTS_DIR = PRESETS_DIR / "experiments"
_ROOTS = {"configs": CONFIGS_DIR, "experiments": EXPERIMENTS_DIR}


def _source_root() -> Path | None:
    # src/difflora/presets in a source checkout (an editable install or PYTHONPATH=src): the
    # repository root holds pyproject.toml. An installed wheel has no checkout around it.
    root = PRESETS_DIR.parents[2]
    return root if PRESETS_DIR.parents[1].name == "src" and (root / "pyproject.toml").is_file() else None


# The repository root difflora runs from, or None (an installed wheel): where the paths a shipped
# study names (its report_dir, with the committed run records) are found, whatever the current directory.
SOURCE_ROOT = _source_root()


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


def is_shipped(path: str | Path) -> bool:
    """Whether ``path`` (resolved: :func:`resolve_shipped`) is a file difflora ships."""
    return resolve_shipped(path).resolve().is_relative_to(PRESETS_DIR)


def shipped_name(path: str | Path) -> str | None:
    """The name a shipped file goes by on every machine (``experiments/distill/digits.yaml``); None if not shipped.

    The same preset can be typed as that name, as ``src/difflora/presets/experiments/...`` from a checkout
    or as an absolute path; whatever names it in a report must not depend on which.
    """
    resolved = resolve_shipped(path).resolve()
    for root_name, root in _ROOTS.items():
        if resolved.is_relative_to(root) and resolved.is_file():
            return "/".join((root_name, *resolved.relative_to(root).parts))
    return None


def _first_sentence(path: Path, limit: int = 110) -> str:
    """The first sentence of the file's leading ``#`` comment, at most ``limit`` characters."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = text.find(". ")
    text = text[: end + 1] if end >= 0 else text
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def preset_descriptions() -> dict[str, str]:
    """{name as the commands take it: a one-line description} of every shipped config and experiment.

    Configs by preset name (``digits``, ``pretrain/fmnist16-unet``), experiments by their
    repository-relative path (``experiments/timelora/digits.yaml``): a config and an experiment may
    share a stem (``distill/digits``).
    """
    found = {name: CONFIGS_DIR / f"{name}.yaml" for name in config_presets()}
    found |= {name: PRESETS_DIR / name for name in experiment_presets()}
    return {name: _first_sentence(path) for name, path in found.items()}


def shipped_file(name: str) -> Path | None:
    """The shipped file a name of :func:`preset_descriptions` (or a ``configs/...`` path) names; None if none.

    Only shipped files: a path on disk that happens to match is not a preset.
    """
    text = name.removesuffix(".yaml")
    for candidate in (PRESETS_DIR / f"{text}.yaml", CONFIGS_DIR / f"{text}.yaml"):
        if candidate.resolve().is_relative_to(PRESETS_DIR) and candidate.is_file():
            return candidate
    return None


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
