"""What a CONFIG argument means: a YAML file, or the name of a shipped preset (:mod:`difflora.presets`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from difflora.cli.parser import CLIError
from difflora.config.schema import Config, load_config
from difflora.presets import config_presets, resolve_config

__all__ = ["args_config", "resolve_config_path"]


def resolve_config_path(name: str) -> Path:
    """A config path, or a preset name (``digits`` -> the shipped configs/digits.yaml)."""
    p = resolve_config(name)
    if p is None and Path(name).is_dir():
        saved = Path(name) / "config.json"
        hint = f"a run directory: its config is {saved}" if saved.is_file() else "a directory"
        raise CLIError(f"config {name} is {hint}; give a YAML config file or a preset name")
    if p is None:
        raise CLIError(
            f"config {name!r} not found, neither as a file nor as a shipped preset; presets: {', '.join(config_presets())}"
        )
    return p


def args_config(args: argparse.Namespace) -> Config:
    """The config a command's CONFIG argument names, with its ``--set`` overrides."""
    return load_config(resolve_config_path(args.config), args.set or [])
