"""The ``difflora`` command line: a parser, one-line errors, and thin handlers over the library."""

from difflora.cli.commands import CLIError, main, resolve_config_path

__all__ = ["CLIError", "main", "resolve_config_path"]
