"""What a CONFIG argument means (a YAML file, or the name of a shipped preset, :mod:`difflora.presets`);
``difflora config`` (a config resolved, a key explained, the JSON schema); and ``difflora presets``,
which lists the shipped configs and studies and copies one out to edit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from difflora.cli.parser import CLIError
from difflora.config.explain import explain_key, json_schema, resolved_yaml
from difflora.config.schema import Config, load_config
from difflora.files.atomic import write_bytes, write_new
from difflora.presets import config_presets, preset_descriptions, resolve_config, shipped_file

__all__ = ["args_config", "config_command", "presets_command", "resolve_config_path"]


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


def presets_command(args: argparse.Namespace) -> int:
    """``difflora presets``: every shipped preset with one line; ``presets copy NAME [DEST]`` copies one."""
    if args.action == "list":
        if args.name or args.dest:
            raise CLIError("difflora presets lists the presets; to copy one: difflora presets copy NAME [DEST]")
        described = preset_descriptions()
        width = max(map(len, described))
        for name, text in described.items():
            print(f"{name:<{width}}  {text}")
        print("copy one to edit: difflora presets copy NAME [DEST]")
        return 0
    if not args.name:
        raise CLIError("difflora presets copy NAME [DEST]: name a preset (difflora presets lists them)")
    source = shipped_file(args.name)
    if source is None:
        raise CLIError(f"{args.name!r} is not a shipped preset; difflora presets lists them")
    dest = Path(args.dest) if args.dest else Path(source.name)
    if dest.is_dir():
        dest = dest / source.name
    if not dest.parent.is_dir():
        raise CLIError(f"cannot copy to {dest}: the directory {dest.parent} does not exist")
    try:
        write_new(dest, source.read_bytes())
    except FileExistsError:
        raise CLIError(f"{dest} exists; difflora never overwrites it: give another DEST or delete it") from None
    print(f"copied {args.name} to {dest}")
    return 0


def config_command(args: argparse.Namespace) -> int:
    """``difflora config``: CONFIG resolved as YAML (every key, ``# default:`` where a value differs),
    ``--explain KEY`` (with CONFIG: its value there too) or ``--schema``; ``--out FILE`` writes it instead."""
    if args.schema and (args.explain is not None or args.config is not None):
        raise CLIError("--schema describes every config: give it without CONFIG and --explain")
    if args.config is None and args.set:
        raise CLIError("--set overrides a config: give the CONFIG it applies to")
    if args.schema:
        text = json.dumps(json_schema(), indent=2) + "\n"
    elif args.explain is not None:
        text = explain_key(args.explain, args_config(args) if args.config is not None else None) + "\n"
    elif args.config is not None:
        text = resolved_yaml(args_config(args))
    else:
        raise CLIError("give a CONFIG to resolve, --explain KEY or --schema (difflora config --help)")
    if args.out:
        print(f"wrote {write_bytes(args.out, text)}")
    else:
        print(text, end="")
    return 0
