"""Fault catalogue: issue 32's tools -- `difflora config` (resolve, --explain, --schema), the
trackers of train.trackers (wandb an optional extra), and where `difflora eval` keeps evaluations."""

from __future__ import annotations

import pytest
from faultkit import Fault, cases, check_fault, evaluate, train, write

TOOLS = [
    Fault(
        "config-explain-unknown-key",
        ("config", "--explain", "train.lrr"),
        r"train\.lrr: unknown key \(did you mean 'lr'\?\); the keys of train: steps, ",
    ),
    Fault(
        "config-explain-into-a-value",
        ("config", "--explain", "train.lr.x"),
        r"train\.lr is a value, not a section: explain train\.lr",
    ),
    Fault(
        "config-explain-index-past-the-list",
        ("config", "tiny-unet", "--explain", "model.adapters.3.rank"),
        r"model\.adapters\.3\.rank: the list has 0 entries in this config",
    ),
    Fault(
        "config-explain-in-an-unset-section",
        ("config", "tiny-unet", "--explain", "model.affiner.tasks"),
        r"model\.affiner\.tasks: model\.affiner is not set in this config \(explain model\.affiner\.tasks without CONFIG\)",
    ),
    Fault("config-nothing-asked", ("config",), r"give a CONFIG to resolve, --explain KEY or --schema"),
    Fault("config-set-without-config", ("config", "--set", "train.lr=1"), r"--set overrides a config: give the CONFIG"),
    Fault(
        "config-schema-with-config",
        ("config", "tiny-unet", "--schema"),
        r"--schema describes every config: give it without CONFIG and --explain",
    ),
    Fault(
        "config-bad-override",
        ("config", "tiny-unet", "--set", "train.lr=-1"),
        r"train\.lr: input should be greater than 0",
    ),
    Fault(
        "config-out-is-a-directory",
        ("config", "tiny-unet", "--out", "{tmp}"),
        r"is a directory",
    ),
    Fault(
        "trackers-unknown",
        train("train.trackers=[mlflow]"),
        r"train\.trackers\.0: input should be 'tensorboard' or 'wandb'",
    ),
    Fault(
        "trackers-wandb-not-installed",
        train("train.trackers=[wandb]"),
        r"train\.trackers=wandb needs wandb, which is not installed: pip install 'difflora\[wandb\]'",
        hidden=("wandb",),
    ),
    Fault(
        "eval-store-is-a-file",
        evaluate("--guidance", "2"),
        r"eval is a file, not a directory: move it away, or pass --out DIR$",
        damage=write("eval", "not a directory\n"),
    ),
]


@pytest.mark.parametrize("fault", cases(TOOLS))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
