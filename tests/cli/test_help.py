"""Every command's --help: each argument has a help text and each default is stated; --version."""

from __future__ import annotations

import argparse
import contextlib
import io
import re

import pytest

import difflora
from difflora.cli.commands import build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(found) == 1
    return dict(found[0].choices)


def _help(parser: argparse.ArgumentParser) -> str:
    # A wide terminal: each option's help on one line, so it can be matched whole.
    formatter = parser.formatter_class(prog=parser.prog, width=1000, max_help_position=1000)
    for group in parser._action_groups:
        formatter.add_arguments(group._group_actions)
    return formatter.format_help()


def test_every_argument_of_every_command_has_a_help_text():
    commands = _subparsers()
    assert {"train", "sample", "eval", "demo", "study", "export"} <= set(commands)
    missing = [
        f"{name} {'/'.join(a.option_strings) or a.dest}"
        for name, sub in commands.items()
        for a in sub._actions
        if not (a.help or "").strip()
    ]
    assert not missing, f"arguments without a help text: {missing}"


def test_every_default_is_shown():
    unstated = []
    for name, sub in _subparsers().items():
        text = _help(sub)
        for a in sub._actions:
            if not a.option_strings or a.default is None or a.default is False or a.default == argparse.SUPPRESS:
                continue
            line = next(ln for ln in text.splitlines() if ln.strip().startswith(", ".join(a.option_strings)))
            if f"(default: {a.default})" not in line and "default" not in a.help:
                unstated.append(f"{name} {a.option_strings[0]}")
    assert not unstated, f"defaults not shown in --help: {unstated}"


@pytest.mark.parametrize(
    ("command", "option", "shown"),
    [
        ("sample", "--num", "(default: 64)"),
        ("sample", "--seed", "(default: 0)"),
        ("sample", "--weights", "(default: ema)"),
        ("sample", "--device", "(default: auto)"),
        ("eval", "--num-samples", "(default: 1000)"),
        ("eval", "--seed", "(default: 0)"),
        ("demo", "--out", "(default: runs/demo)"),
        ("demo", "--eval-samples", "(default: 500)"),
    ],
)
def test_the_defaults_the_issue_named_are_in_the_help(command, option, shown):
    line = next(ln for ln in _help(_subparsers()[command]).splitlines() if ln.strip().startswith(option))
    assert line.rstrip().endswith(shown)


def test_a_flag_that_is_off_and_a_default_the_text_states_are_not_repeated():
    text = _help(_subparsers()["sample"])
    assert "(default: False)" not in text and "(default: None)" not in text
    assert len(re.findall("default", next(ln for ln in text.splitlines() if "--steps" in ln))) == 1


def test_version_prints_the_package_version():
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert out.getvalue() == f"difflora {difflora.__version__}\n"
