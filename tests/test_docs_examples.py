"""The docs are tested: their examples run, their commands parse, and their claims about the code hold.

- every fenced ``python`` block of README.md and docs/*.md runs (in an empty directory, so the
  examples must work outside the repository, as for a user of the installed package);
- every ``difflora ...`` line of their ``bash`` blocks that is an example (not a synopsis with
  ``[options]``, ``a|b`` or CAPITAL placeholders) parses with the real command-line parser, and the
  ``difflora params`` examples run, printing the count their comment states;
- the layer table of docs/design.md matches every ``difflora`` import in the source;
- the docs name no file outside the repository, and docs/index.md lists every page.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from difflora.cli.commands import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _blocks(language: str) -> list[tuple[str, str]]:
    """(``file:line``, code) of every fenced block in ``language``."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == language:
                found.append((f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}", m.group(2)))
    return found


def _command_lines() -> list[tuple[str, list[str], str]]:
    """(where, argv after ``difflora``, the line's trailing comment) of every example command line."""
    lines = []
    for where, code in _blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            command, _, comment = line.partition(" # ")
            if not command.startswith("difflora "):
                continue
            tokens = shlex.split(command)[1:]
            synopsis = any(
                t.startswith("[") or "|" in t or "..." in t or re.fullmatch(r"[A-Z][A-Z0-9_]*(\.yaml)?", t)
                for t in tokens
            )
            if not synopsis:
                lines.append((where, tokens, comment.strip()))
    return lines


PYTHON = _blocks("python")
COMMANDS = _command_lines()


def test_the_docs_have_examples_to_test():
    assert len(PYTHON) >= 1 and len(COMMANDS) >= 20  # a fence regex that matched nothing would pass the rest


@pytest.mark.parametrize("where,code", PYTHON, ids=[w for w, _ in PYTHON])
def test_python_examples_run_from_an_empty_directory(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__doc_example__"})


def test_command_examples_parse():
    parser = build_parser()
    for where, argv, _ in COMMANDS:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{where}: `difflora {shlex.join(argv)}` does not parse: {err.getvalue().strip()}")


def test_params_examples_print_the_documented_counts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checked = 0
    for where, argv, comment in COMMANDS:
        if argv[0] != "params":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0, where
        counts = re.findall(r"\d{1,3}(?:,\d{3})+", comment)
        for count in counts:
            assert count in out.getvalue(), f"{where}: `difflora {shlex.join(argv)}` does not print {count}"
            checked += 1
    assert checked >= 1


def _layers() -> dict[str, int]:
    """Module -> layer number, from the table in docs/design.md's "The layers of the code"."""
    section = (ROOT / "docs" / "design.md").read_text().split("## The layers of the code")[1].split("\n## ")[0]
    layers = {}
    for number, modules in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, re.M):
        for name in re.findall(r"`([\w.]+)`", modules):
            layers[name] = int(number)
    return layers


def test_imports_point_down_the_layers_of_design_md():
    layers = _layers()
    assert {"cli", "experiments", "train", "adapters", "config"} <= set(layers)
    src = ROOT / "src" / "difflora"
    upward = []
    for file in sorted(src.rglob("*.py")):
        parts = file.relative_to(src).with_suffix("").parts
        here = parts[0] if parts[0] != "__init__" or len(parts) > 1 else "__init__"
        assert here in layers, f"{file.relative_to(ROOT)}: module {here!r} is missing from docs/design.md's layer table"
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("difflora."):
                there = node.module.split(".")[1]
                assert there in layers, f"{file.relative_to(ROOT)} imports {node.module}, not in the layer table"
                if layers[there] < layers[here]:
                    upward.append(f"{file.relative_to(ROOT)} ({here}, layer {layers[here]}) imports {node.module}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_docs_name_no_file_outside_the_repository_and_the_index_lists_every_page():
    for doc in DOCS:
        text = doc.read_text()
        assert "../shared" not in text and "/work/" not in text, doc
        assert not re.search(r"\]\(\.\./(?!README\.md)", text), f"{doc}: a link leaves the repository"
    index = (ROOT / "docs" / "index.md").read_text()
    pages = [d.name for d in DOCS if d.parent.name == "docs" and d.name != "index.md"]
    assert pages and all(f"]({page})" in index for page in pages), "docs/index.md must list every page"


def test_study_examples_load_from_an_empty_directory(tmp_path, monkeypatch):
    from difflora.experiments.study_spec import load_study

    monkeypatch.chdir(tmp_path)
    studies = {argv[1] for _, argv, _ in COMMANDS if argv[0] == "study"}
    assert studies
    for path in studies:
        assert load_study(path).arms  # the shipped copy of a repository-relative path, every arm's config valid
