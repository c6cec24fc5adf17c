"""The ``difflora`` command: parse, dispatch to the command's handler, turn expected failures into
one line.

Handlers live in modules by what they do (``training``, ``sampling``, ``evaluation``,
``inspection``, and ``papers`` for the papers' own commands) and are imported only when their
command runs (:data:`HANDLERS`), so ``difflora --help`` and a mistyped flag answer without
loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from difflora.cli.configs import resolve_config_path
from difflora.cli.parser import CLIError, one_line
from difflora.cli.parser import build_parser as grammar
from difflora.errors import DiffloraError, describe_os_error

__all__ = ["HANDLERS", "CLIError", "build_parser", "main", "resolve_config_path"]

# Command name -> "module:function". The parser's grammar lives in difflora.cli.parser.
HANDLERS = {
    "train": "difflora.cli.training:train_command",
    "demo": "difflora.cli.training:demo_command",
    "pretrain": "difflora.cli.training:pretrain_command",
    "sample": "difflora.cli.sampling:sample_command",
    "export": "difflora.cli.sampling:export_command",
    "export_peft": "difflora.cli.sampling:export_peft_command",
    "eval": "difflora.cli.evaluation:eval_command",
    "train_features": "difflora.cli.evaluation:train_features_command",
    "params": "difflora.cli.inspection:params_command",
    "config": "difflora.cli.configs:config_command",
    "runs": "difflora.cli.inspection:runs_command",
    "study": "difflora.cli.inspection:study_command",
    "presets": "difflora.cli.configs:presets_command",
    "distill": "difflora.cli.papers:distill_command",
    "combine_tasks": "difflora.cli.papers:combine_tasks_command",
    "sweep": "difflora.cli.papers:sweep_command",
    "anova": "difflora.cli.papers:anova_command",
    "plot_weights": "difflora.cli.papers:plot_weights_command",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``difflora`` parser (flags in ``difflora.cli.parser``); ``args.fn`` names the handler."""
    return grammar(HANDLERS)


def _run(args: argparse.Namespace) -> int:
    module, _, function = args.fn.partition(":")
    # pip's lazy-command pattern: the handler's module (and torch) loads only for the command run.
    return getattr(importlib.import_module(module), function)(args)


def _warn_line(message, category, filename, lineno, file=None, line=None) -> None:
    # A warning a user should act on (a skipped damaged checkpoint) is one line, like an error.
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # Expected failures are one clear line, not a traceback: difflora's own user-facing errors
    # (DiffloraError: damaged checkpoints, divergence, missing conditions, bad flags), bad input
    # (ValueError covers config, data-format, adapter, eval and non-finite-sample errors), and
    # missing or unreadable files (OSError). Anything else is a bug and keeps its traceback.
    known = (DiffloraError, OSError, ValueError)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn_line
            return _run(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        # Ctrl-C is the user's choice, not a crash: one line and the shell's code for SIGINT. Every
        # file difflora writes is replaced atomically, so nothing half-written is left behind.
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `difflora params ... | head`: the reader left; that is not an error worth a traceback.
        sys.stderr = open(os.devnull, "w")
        return 0
    except known as exc:
        if os.environ.get("DIFFLORA_DEBUG"):
            raise
        message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
