"""The sweep runner: designs (full, fractional with generators), cells that 004's space excludes are
skipped with the reason, every run lands in one table with its factor levels, a second call reuses
finished runs, and bad sweeps are clear errors."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import yaml

from difflora.cli.commands import main
from difflora.design_space.sweep import (
    Sweep,
    SweepError,
    cell_arm,
    load_sweep,
    plan_sweep,
    read_results,
    run_sweep,
    sweep_cells,
)

ADAPTER = {
    "name": "pa",
    "form": "position",
    "source": "attn2_out",
    "dest": "ff_in",
    "rank": 2,
    "condition": "y",
    "weighting": "index",
    "num_values": 10,
    "targets": ["re:.*transformer_blocks\\.\\d+"],
}
TINY = {
    "name": "tiny-sweep",
    "seeds": [0],
    "eval": {"num_samples": 8, "steps": 2, "guidance": [1], "feature_steps": 3},
    "base": {
        "data": {"name": "digits"},
        "model": {
            "num_classes": 10,
            "attention": "cross",
            "context": {"dim": 8},
            "unet": {"model_channels": 8, "num_res_blocks": 1, "attention_resolutions": [4], "channel_mult": [1, 2]},
            "adapters": [ADAPTER],
        },
        "diffusion": {"steps": 20},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "ckpt_every": 2, "device": "cpu"},
        "sample": {"num": 2, "steps": 2},
    },
    "factors": {
        "input": {
            "attn2_out": {"model.adapters.0.source": "attn2_out"},
            "ff_out": {"model.adapters.0.source": "ff_out"},
        },
        "output": {"attn2_in": {"model.adapters.0.dest": "attn2_in"}, "out": {"model.adapters.0.dest": "out"}},
    },
    "skip_invalid": True,
}


def _write(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(tree, sort_keys=False))  # level order is the design's order
    return p


def test_tiny_sweep_table_skips_invalid_cells_and_reuses_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path, TINY)
    logs: list[str] = []
    table = run_sweep(path, out=tmp_path / "out", progress=False, log=logs.append)
    # attn2_out -> attn2_in and ff_out -> attn2_in write before they read: not among 004's pairs.
    skipped = [line for line in logs if line.strip().startswith("skipped")]
    assert len(skipped) == 2 and all("output.attn2_in" in line and "valid pairs" in line for line in skipped)
    rows = read_results(table)
    assert [(r["input"], r["output"]) for r in rows] == [("attn2_out", "out"), ("ff_out", "out")]
    assert list(rows[0])[:4] == ["input", "output", "seed", "guidance"]
    for r in rows:
        assert r["fd"] > 0 and 0 <= r["class_accuracy"] <= 1 and r["params_trainable"] > 0
        assert Path(r["run_dir"]).parent.name == f"input.{r['input']}+output.{r['output']}"
    assert read_results(table.with_suffix(".jsonl"))[0]["input"] == "attn2_out"
    # Each run really has the adapter its cell names.
    cfg = yaml.safe_load((Path(rows[1]["run_dir"]) / "config.json").read_text())
    assert (cfg["model"]["adapters"][0]["source"], cfg["model"]["adapters"][0]["dest"]) == ("ff_out", "out")
    again: list[str] = []
    assert run_sweep(path, out=tmp_path / "out", progress=False, log=again.append) == table
    assert sum("done already" in line for line in again) == 2
    assert read_results(table) == rows


def test_fractional_design_is_the_regular_fraction():
    tree = {
        **TINY,
        "factors": {
            f: {"key": f"train.{k}", "levels": v}
            for f, k, v in [("A", "lr", [1e-3, 2e-3]), ("B", "batch_size", [2, 4]), ("C", "seed", [0, 1])]
        },
        "design": "fractional",
        "generators": {"C": ["A", "B"]},
    }
    cells = sweep_cells(Sweep.model_validate(tree))
    # 2^(3-1) with C = A + B (mod 2), the classic C = AB.
    index = {"A": ["0.001", "0.002"], "B": ["2", "4"], "C": ["0", "1"]}
    got = [tuple(index[f].index(c[f]) for f in "ABC") for c in cells]
    assert got == [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)]
    # 3 factors of 3 levels, C = A + B (mod 3): a Latin square, every pair of factors balanced.
    three = {
        f: {"key": f"train.{k}", "levels": [1, 2, 3]}
        for f, k in [("A", "steps"), ("B", "batch_size"), ("C", "log_every")]
    }
    cells = sweep_cells(Sweep.model_validate({**tree, "factors": three}))
    assert len(cells) == 9
    for f, g in itertools.combinations("ABC", 2):
        assert Counter((c[f], c[g]) for c in cells) == Counter({p: 1 for p in itertools.product("123", repeat=2)})
    full = sweep_cells(Sweep.model_validate({**tree, "factors": three, "design": "full", "generators": {}}))
    assert len(full) == 27
    # A 3-level generator over parents of 3 and 2 levels: each generated level equally often (twice),
    # every (B, C) pair once: 6 cells, C = A + B (mod 3).
    mixed = {**three, "B": {"key": "train.batch_size", "levels": [1, 2]}}
    cells = sweep_cells(Sweep.model_validate({**tree, "factors": mixed}))
    got = [tuple(int(c[f]) - 1 for f in "ABC") for c in cells]
    assert got == [(a, b, (a + b) % 3) for a in range(3) for b in range(2)]
    assert Counter(c["C"] for c in cells) == Counter({"1": 2, "2": 2, "3": 2})


def test_cell_overrides_reach_the_adapter_list_and_the_rest():
    sweep = Sweep.model_validate(
        {**TINY, "factors": {**TINY["factors"], "lr": {"key": "train.lr", "levels": [0.01, 0.1]}}}
    )
    arm = cell_arm(sweep, {"input": "ff_out", "output": "out", "lr": "0.1"})
    assert arm.name == "input.ff_out+output.out+lr.0.1"
    assert arm.set == {"train.lr": 0.1}
    assert arm.adapters == [{**ADAPTER, "source": "ff_out", "dest": "out"}]
    runnable, skipped = plan_sweep(sweep)
    assert len(runnable) == 4 and len(skipped) == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"factorz": {}}, "factorz: unknown key"),
        ({"design": "fractional"}, "a fractional design needs generators"),
        ({"factors": {"a": {"x": {"train.lr": 1}}}}, "factors.a: at least two levels"),
        (
            {
                "factors": {
                    "a": {"key": "train.lr", "levels": [1, 2]},
                    "b": {"key": "train.steps", "levels": [1, 2, 3]},
                },
                "design": "fractional",
                "generators": {"b": ["a"]},
            },
            "one parent needs as many levels as b",
        ),
        ({"factors": {"a": {"x y": {"train.lr": 1}, "z": {"train.lr": 2}}}}, "level name 'x y'"),
    ],
)
def test_bad_sweeps_name_the_problem(tmp_path, change, message):
    with pytest.raises(SweepError, match=message):
        load_sweep(_write(tmp_path, {**TINY, **change}))


def test_invalid_cells_are_an_error_unless_skipped(tmp_path):
    with pytest.raises(SweepError, match=r"cell input.attn2_out\+output.attn2_in: .*valid pairs.*skip_invalid"):
        plan_sweep(load_sweep(_write(tmp_path, {**TINY, "skip_invalid": False})))
    bad = {**TINY, "factors": {"x": {"a": {"model.adapters.3.rank": 2}, "b": {"model.adapters.0.rank": 3}}}}
    with pytest.raises(SweepError, match=r"model.adapters.3.rank: '3' is not an index of a list of 1"):
        plan_sweep(load_sweep(_write(tmp_path, bad)))


def test_cli_plan_lists_cells(tmp_path, capsys):
    assert main(["sweep", str(_write(tmp_path, TINY)), "--plan", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "2 of 4 cells x 1 seeds (full design)" in text and "input.ff_out+output.out" in text
    assert not (tmp_path / "o").exists()
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
