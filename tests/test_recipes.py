"""The README's five-minute recipes run as written, at a tinier size.

Each recipe of the README's "Five minutes per paper" is a ``bash`` block of ``difflora`` command
lines. This test parses them from the README, so a README change that breaks a recipe fails here,
and runs every line through the real command-line entry point in an empty directory, after
``difflora demo`` (what ``make demo`` runs) has written ``runs/demo``. Only sizes change: training
steps, batch, sampling steps and evaluation samples are overridden (``--set`` keys the recipe
gives are replaced, not repeated); every other flag and value is the README's.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest

from difflora.cli.commands import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Five minutes per paper"
FENCE = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)

# What makes a run tiny: a few steps of a small batch, and a grid of a few images at 2 steps.
TINY_SET = {
    "train.steps": "2",
    "train.batch_size": "8",
    "train.ckpt_every": "2",
    "train.log_every": "1",
    "train.warmup_steps": "0",
    "sample.num": "4",
    "sample.steps": "2",
}
# Evaluations: enough samples for every class of the digits in both sets (KID is class-stratified).
TINY_FLAGS = {"eval": {"--num-samples": "40", "--steps": "2"}, "sample": {"--steps": "2"}}


def recipes() -> dict[str, list[list[str]]]:
    """Paper short name -> the argv (after ``difflora``) of each command line of its recipe."""
    readme = (ROOT / "README.md").read_text()
    assert SECTION in readme, f"README.md has no section {SECTION!r}"
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    found = {}
    for part in section.split("\n### ")[1:]:
        name = part.split(":", 1)[0].strip()
        block = FENCE.search(part)
        assert block, f"README recipe {name} has no bash block"
        lines = [line.strip() for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]
        assert all(line.startswith("difflora ") for line in lines), f"recipe {name}: every line is a difflora command"
        found[name] = [shlex.split(line)[1:] for line in lines]
    return found


RECIPES = recipes()


def test_the_readme_has_a_recipe_per_paper():
    assert sorted(RECIPES) == ["000", "002", "003", "004"]
    for name, commands in RECIPES.items():
        assert any(c[0] == "eval" for c in commands), f"recipe {name} ends without a printed metric"
        assert any(c[0] == "sample" for c in commands), f"recipe {name} writes no sample grid"


def test_make_demo_is_the_demo_the_recipes_adapt():
    # 002 and 003 adapt runs/demo: what `make demo` (difflora demo, default --out runs/demo) writes.
    assert "\t$(BIN)/difflora demo\n" in (ROOT / "Makefile").read_text()
    assert build_parser().parse_args(["demo"]).out == "runs/demo"


def tiny(argv: list[str]) -> list[str]:
    """``argv`` with its sizes made tiny: TINY_SET for commands that train, TINY_FLAGS otherwise."""
    command, rest = argv[0], list(argv[1:])
    flags = TINY_FLAGS.get(command, {})
    out, sets, i = [command], {}, 0
    while i < len(rest):
        token = rest[i]
        if token == "--set":
            key, _, value = rest[i + 1].partition("=")
            sets[key] = value
            i += 2
        elif token in flags:
            i += 2  # replaced below
        else:
            out.append(token)
            i += 1
    if command in ("train", "distill", "demo"):
        sets.update(TINY_SET)
    for key, value in sets.items():
        out += ["--set", f"{key}={value}"]
    for flag, value in flags.items():
        out += [flag, value]
    return [*out, "--no-progress"]


def run(argv: list[str]) -> str:
    """Run one command line; its standard output (the test fails on a non-zero exit)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    assert code == 0, f"`difflora {shlex.join(argv)}` exited with {code}:\n{out.getvalue()}"
    return out.getvalue()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """``runs/demo`` as ``make demo`` writes it, tiny (no evaluation: the recipes score their own runs)."""
    home = tmp_path_factory.mktemp("demo")
    with contextlib.chdir(home):
        run(tiny(["demo", "--eval-samples", "0"]))
    return home / "runs" / "demo"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_as_written_at_a_tiny_size(name, demo_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo_run, tmp_path / "runs" / "demo")
    printed = ""
    for argv in RECIPES[name]:
        printed += run(tiny(argv))
        if argv[0] == "sample":
            grid = argv[argv.index("--out") + 1]
            assert (tmp_path / grid).is_file(), f"recipe {name}: `difflora {shlex.join(argv)}` wrote no {grid}"
    assert re.search(r"\bFD\b", printed), f"recipe {name} printed no FD:\n{printed}"
