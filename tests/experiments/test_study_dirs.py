"""Issue 32 item 2: a study behaves the same from any directory. Its outputs go where --out and
--report-dir say (printed before any work), a shipped study finds its committed records wherever it
is run from, ``--set`` changes every arm (and a changed study never reuses another config's records
nor rewrites the shipped report), and ``difflora presets`` lists and copies the shipped files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from difflora.cli.commands import main
from difflora.config.schema import parse_config
from difflora.experiments import study as study_mod
from difflora.experiments import study_spec
from difflora.experiments.study import plan_runs, run_study
from difflora.experiments.study_spec import arm_config, load_study, study_dirs
from difflora.presets import EXPERIMENTS_DIR, PRESETS_DIR, SOURCE_ROOT

ROOT = Path(__file__).resolve().parents[2]
DIGITS = "experiments/timelora/digits.yaml"
TINY = {
    "name": "tiny-dirs",
    "report_dir": "docs",  # relative: next to the YAML, wherever the study is run from
    "seeds": [0],
    "eval": {"num_samples": 8, "steps": 2, "guidance": [1], "feature_steps": 3},
    "base": {
        "data": {"name": "digits"},
        "model": {
            "num_classes": 0,
            "unet": {"model_channels": 8, "num_res_blocks": 1, "attention_resolutions": [4], "channel_mult": [1, 2]},
        },
        "diffusion": {"steps": 20},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "ckpt_every": 2, "device": "cpu"},
        "sample": {"num": 2, "steps": 2},
    },
    "arms": [{"name": "plain"}],
}


@pytest.fixture(autouse=True)
def clean_tree(monkeypatch):
    monkeypatch.setattr(study_mod, "git_state", lambda ignore=None: ("c0ffee" * 6 + "c0ff", False))


def _plan(path: str | Path, **kw) -> list[str]:
    logs: list[str] = []
    run_study(path, plan_only=True, progress=False, log=logs.append, **kw)
    return logs


def test_a_shipped_study_plans_the_same_from_any_directory(tmp_path, monkeypatch):
    assert SOURCE_ROOT == ROOT  # the tests run from a checkout
    monkeypatch.chdir(ROOT)
    at_root = _plan(DIGITS)
    monkeypatch.chdir(tmp_path)
    elsewhere = _plan(DIGITS)
    assert elsewhere == at_root and at_root[-1] == "study study-timelora-digits: 42 runs: 42 recorded"
    assert not any(tmp_path.iterdir())  # --plan wrote nothing, no ./docs
    dirs = study_dirs(load_study(DIGITS), DIGITS)
    assert (dirs.out, dirs.report, dirs.committed) == (
        Path("runs/study-digits"),  # the YAML's out, relative to the current directory
        ROOT / "docs",
        ROOT / "docs" / "study-timelora-digits",
    )
    # Installed without a checkout: no committed records; the report goes next to the runs.
    monkeypatch.setattr(study_spec, "SOURCE_ROOT", None)
    dirs = study_dirs(load_study(DIGITS), DIGITS)
    assert dirs.committed is None and dirs.report == dirs.out


def test_a_shipped_study_names_the_same_command_however_it_is_typed(tmp_path, monkeypatch):
    # The report's "command" line is part of the bytes --report-only must reproduce: a shipped study
    # typed as its preset name, as its path in the checkout or as an absolute path is one command.
    monkeypatch.chdir(ROOT)
    typed = [
        "experiments/distill/digits.yaml",
        "src/difflora/presets/experiments/distill/digits.yaml",
        str(EXPERIMENTS_DIR / "distill" / "digits.yaml"),
    ]
    assert {study_mod._default_command(t, None, None, None) for t in typed} == {
        "difflora study experiments/distill/digits.yaml"
    }
    assert study_mod._default_command(typed[1], "runs/x", None, ["seeds=[0]"]) == (
        "difflora study experiments/distill/digits.yaml --out runs/x --set seeds=[0]"
    )
    # A user's own file, even a copy of a preset, keeps the path typed.
    own = tmp_path / "digits.yaml"
    own.write_text((EXPERIMENTS_DIR / "distill" / "digits.yaml").read_text())
    assert study_mod._default_command(own, None, None, None) == f"difflora study {own}"


def test_set_changes_every_arm_and_study_keys(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    sets = ["train.steps=20", "seeds=[0]", "eval.num_samples=50"]
    study = load_study(DIGITS, sets)
    assert study.seeds == [0] and study.eval.num_samples == 50
    plain = load_study(DIGITS)
    tree = yaml.safe_load((EXPERIMENTS_DIR / "timelora" / "digits.yaml").read_text())
    for arm, yaml_arm in zip(study.arms, tree["arms"], strict=True):
        # The reference: the YAML's arm, its own overrides, then the --set one, parsed from scratch.
        base = {
            **tree["base"],
            "model": {
                **tree["base"]["model"],
                **({"adapters": yaml_arm["adapters"]} if "adapters" in yaml_arm else {}),
            },
        }
        own = [f"{k}={json.dumps(v)}" for k, v in yaml_arm.get("set", {}).items()]
        expected = parse_config(base, [*own, "train.steps=20", "train.seed=0"])
        assert arm_config(study, arm, 0) == expected, arm.name
        assert arm_config(study, arm, 0).train.steps == 20 != arm_config(plain, arm, 0).train.steps
    # The YAML's own study-level set does the same.
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**tree, "set": {"train.steps": 20}, "seeds": [0]}))
    mine = load_study(tmp_path / "mine.yaml")
    assert [arm_config(mine, a, 0) for a in mine.arms] == [arm_config(study, a, 0) for a in study.arms]
    # Changed configs never take the shipped records; a variant runs apart from the study and writes
    # its report next to its runs, not over the shipped one.
    logs = _plan(DIGITS, overrides=sets)
    assert logs[-1] == "study study-timelora-digits: 14 runs: 14 train"
    dirs = study_dirs(study, DIGITS, overrides=sets)
    assert re.fullmatch(r"study-digits-set-[0-9a-f]{8}", dirs.out.name) and dirs.report == dirs.out
    assert dirs.out != study_dirs(study, DIGITS, overrides=sets[:2]).out
    # Only the seeds changed: the same configs, so their committed records still count.
    assert _plan(DIGITS, overrides=["seeds=[0]"])[-1] == "study study-timelora-digits: 14 runs: 14 recorded"


def test_relative_paths_of_a_users_study_and_the_cli_announces_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    path = home / "study.yaml"
    path.write_text(yaml.safe_dump(TINY))
    monkeypatch.chdir(work)
    assert main(["study", str(path), "--allow-dirty", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"study tiny-dirs: runs in {work / 'runs' / 'tiny-dirs'} (the default; --out DIR to change)"
    assert (
        out[1] == f"study tiny-dirs: report {home / 'docs' / 'tiny-dirs.md'} (the default; --report-dir DIR to change)"
    )
    assert out[2] == f"study tiny-dirs: committed records read from {home / 'docs' / 'tiny-dirs' / 'records'}"
    record = home / "docs" / "tiny-dirs" / "records" / "plain" / "seed0.json"
    assert record.is_file() and not (work / "docs").exists()
    # From another directory, with the runs gone: the committed record is found, nothing trains, and
    # a report written elsewhere (--report-dir) gets a copy of the record and its sample grid.
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    assert main(["study", str(path), "--report-dir", "mine", "--allow-dirty", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "recorded already" in text and "] train " not in text
    assert (other / "mine" / "tiny-dirs" / "records" / "plain" / "seed0.json").read_bytes() == record.read_bytes()
    assert (other / "mine" / "tiny-dirs" / "samples-plain-w1.png").is_file()
    assert "| plain |" in (other / "mine" / "tiny-dirs.md").read_text()
    # A changed config does not take the record: it would train.
    assert (
        plan_runs(load_study(path, ["train.lr=0.5"]), load_study(path).arms, Path("runs"), [record.parents[2]])[0][2]
        == "train"
    )


def test_presets_lists_and_copies_without_overwriting(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split()[0] for ln in lines[:-1]]
    shipped = sorted(p.relative_to(PRESETS_DIR).as_posix() for p in PRESETS_DIR.rglob("*.yaml"))
    assert sorted(n if n.startswith("experiments/") else f"configs/{n}.yaml" for n in names) == shipped
    assert any(ln.startswith("digits ") and "The demo: class-conditional IDDPM U-Net" in ln for ln in lines)
    assert main(["presets", "copy", DIGITS]) == 0
    assert (tmp_path / "digits.yaml").read_bytes() == (EXPERIMENTS_DIR / "timelora" / "digits.yaml").read_bytes()
    assert main(["presets", "copy", "distill/digits", "sub.yaml"]) == 0
    assert (tmp_path / "sub.yaml").read_bytes() == (PRESETS_DIR / "configs" / "distill" / "digits.yaml").read_bytes()
    capsys.readouterr()
    assert main(["presets", "copy", "digits"]) == 2  # ./digits.yaml exists (the study copied above)
    assert "exists; difflora never overwrites it" in capsys.readouterr().err
    assert (tmp_path / "digits.yaml").read_bytes() == (EXPERIMENTS_DIR / "timelora" / "digits.yaml").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.yaml", "sub.yaml"]  # no temporary left
