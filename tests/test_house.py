"""The shape of the package: the seams docs/design.md describes, checked on the source.

- paper packages (the ``difflora.papers`` entry points) sit above the shared code: no shared module
  imports one, and no paper imports another;
- no module imports another of difflora inside a function (the usual way to hide a cycle), and
  the module-level imports form no cycle;
- functions stay under ~80 lines and files under ~600.

(The layer order itself is checked against docs/design.md's table in test_docs_examples.py.)
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "difflora"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600


def _modules() -> dict[str, ast.Module]:
    """Dotted module name -> parsed source, for every file of the package."""
    out = {}
    for file in sorted(SRC.rglob("*.py")):
        parts = ("difflora", *file.relative_to(SRC).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(file.read_text(), filename=str(file))
    return out


def _imported(node: ast.AST) -> list[str]:
    """The difflora modules one import statement names."""
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module]
    elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        return []
    return [n for n in names if n == "difflora" or n.startswith("difflora.")]


def _top_level_imports(tree: ast.Module) -> list[str]:
    """difflora modules imported at module level (also under ``if``/``try`` at top level)."""
    found = []
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        found += _imported(node)
        stack += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
    return found


def _papers() -> set[str]:
    """The paper packages, from pyproject.toml's ``difflora.papers`` entry points."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    targets = project["entry-points"]["difflora.papers"].values()
    return {t.split(":")[0] for t in targets}


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_shared_code_imports_no_paper_and_papers_import_each_other_not():
    papers = _papers()
    assert {"difflora.timelora", "difflora.diffscaler", "difflora.distill", "difflora.design_space"} <= papers
    # Above the papers: the command line and the package's entry points, which assemble them.
    top = {"difflora.cli", "difflora.__main__"}
    wrong = []
    for module, tree in _modules().items():
        here = _package(module)
        if here in top:
            continue
        for there in {_package(m) for m in _top_level_imports(tree)}:
            if there in papers and there != here:
                kind = "paper" if here in papers else "shared module"
                wrong.append(f"{module} ({kind}) imports {there}")
    assert not wrong, "imports across the paper seams:\n" + "\n".join(sorted(wrong))


def test_no_difflora_import_inside_a_function():
    found = []
    for module, tree in _modules().items():
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    found += [f"{module}:{node.lineno} imports {m}" for m in _imported(node)]
    assert not found, "imports inside functions (move the code so the import can sit at the top):\n" + "\n".join(
        sorted(set(found))
    )


def test_module_imports_form_no_cycle():
    modules = _modules()
    graph = {m: {i for i in _top_level_imports(t) if i in modules and i != m} for m, t in modules.items()}
    # A package's __init__ importing its own submodules is the package's face, not a cycle.
    graph = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n) :] + [m, n]) if n in path else f"{m} -> {n}")
            elif n not in state:
                visit(n, [*path, m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_functions_and_files_stay_small():
    long = []
    for file in sorted(SRC.rglob("*.py")):
        text = file.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long.append(f"{file.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{file.relative_to(ROOT)}:{node.lineno} {node.name}: {size} lines")
    assert not long, "cut these at a seam:\n" + "\n".join(long)
