"""The package as a user installs it: presets resolve from the package data, and a built wheel works.

The wheel test builds difflora's wheel from a copy of the source (offline: no build isolation, the
running interpreter's setuptools), installs it with ``--no-deps`` into a fresh virtual environment
and runs the installed ``difflora`` script from an empty directory. The fresh environment gets
difflora only from the wheel; its dependencies (torch, pydantic, ...) come from the running
environment's site-packages through a ``.pth`` line, which adds that directory to ``sys.path``
without running its own ``.pth`` files, so an editable install of difflora there stays inert.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

import difflora
from difflora.cli.commands import main
from difflora.config.schema import ConfigError, load_config
from difflora.experiments.study_spec import StudyError, load_study
from difflora.presets import CONFIGS_DIR, EXPERIMENTS_DIR, config_presets, experiment_presets, resolve_config

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_project_version():
    project = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{difflora.__version__}"' in project


def test_presets_live_only_in_the_package():
    # A config or study added at the repository root would work from a checkout and be missing from
    # the wheel (a merge can leave one there: git moves new files into renamed directories only).
    for name in ("configs", "experiments"):
        stray = sorted(str(p.relative_to(ROOT)) for p in (ROOT / name).rglob("*.yaml"))
        assert not stray, f"move {stray} under src/difflora/presets/{name}/ (git mv): they would not ship"

    # Scripts outside the package reach presets through difflora.presets, never the old root paths
    # (a benchmark reading ROOT / "configs" broke silently when the presets moved).
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        text = script.read_text()
        for name in ("configs", "experiments"):
            assert f'ROOT / "{name}"' not in text, f"{script.name}: use difflora.presets' {name.upper()}_DIR"


def test_preset_names_and_repository_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ or experiments/ here
    shipped = yaml.safe_load((CONFIGS_DIR / "pretrain" / "fmnist16-unet.yaml").read_text())
    by_name = load_config("pretrain/fmnist16-unet")
    by_path = load_config("configs/pretrain/fmnist16-unet.yaml")
    assert by_name == by_path
    assert by_name.model.unet.model_channels == shipped["model"]["unet"]["model_channels"]
    assert resolve_config("digits") == CONFIGS_DIR / "digits.yaml"
    study = load_study("experiments/timelora/digits.yaml")
    assert study.name == yaml.safe_load((EXPERIMENTS_DIR / "timelora" / "digits.yaml").read_text())["name"]
    assert "digits" in config_presets() and "experiments/timelora/digits.yaml" in experiment_presets()


def test_a_file_on_disk_wins_over_the_shipped_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "digits.yaml").write_text("train: {steps: 7}\n")
    assert load_config("configs/digits.yaml").train.steps == 7
    assert load_config("digits").train.steps != 7  # a bare name is always the shipped preset


def test_unknown_names_are_one_line_errors_listing_the_presets(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"configs/nope.yaml does not exist.*presets: .*digits"):
        load_config("configs/nope.yaml")
    with pytest.raises(StudyError, match=r"does not exist.*shipped: .*experiments/timelora/digits.yaml"):
        load_study("experiments/nope.yaml")
    assert main(["params", "nope"]) != 0
    err = capsys.readouterr().err.strip()
    assert "not found" in err and "tiny-unet" in err and len(err.splitlines()) == 1


def _build_wheel(dest: Path) -> Path:
    """Build from a copy of the sources, so the checkout gets no build/ or egg-info directories."""
    src = dest / "src-copy"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-v",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        dest,
        src,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    # -v shows the backend's output: no deprecation warning (the licence as a TOML table was one).
    log = out.stdout + out.stderr
    assert "deprecat" not in log.lower() and "BuildBackendWarning" not in log, log
    (wheel,) = dest.glob("difflora-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_installs_and_runs_from_an_empty_directory(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for preset in ("digits", "pretrain/fmnist16-unet"):
        assert f"difflora/presets/configs/{preset}.yaml" in names
    assert "difflora/presets/experiments/timelora/digits.yaml" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel]
    out = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = lambda *cmd: subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    probe = (
        "import difflora; from difflora.presets import resolve_config;"
        "from difflora.experiments.study_spec import load_study;"
        "print(difflora.__version__); print(resolve_config('digits'));"
        "print(load_study('experiments/timelora/digits.yaml').name)"
    )
    where = run(python, "-c", probe)
    assert where.returncode == 0, where.stderr
    version, preset, study = where.stdout.split()
    assert version == difflora.__version__ and Path(preset).is_relative_to(venv)  # the wheel's data, not the source
    assert study == "study-timelora-digits"  # a study YAML by its repository-relative path
    params = run(venv / "bin" / "difflora", "params", "digits")
    print(params.stdout)
    assert params.returncode == 0, params.stderr
    assert params.stdout == main_params_output()


def main_params_output() -> str:
    """``difflora params digits`` run in this process from the source tree: the reference output."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["params", "digits"]) == 0
    return buf.getvalue()
