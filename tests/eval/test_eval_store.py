"""Evaluations never overwrite each other (issue 32, item 4): each is kept under a key made of its
settings (RUN_DIR/eval/<key>/), listed in RUN_DIR/eval/index.json, the newest copied into its kind
directory; a re-evaluation at the same setting replaces its own directory alone, and leaves no grid
its scores do not list. A run evaluated before keys existed keeps its eval/metrics.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from difflora.cli.commands import main
from difflora.eval.evaluate import EvalSettings, evaluate_run
from difflora.eval.features import FeatureTrainConfig
from difflora.eval.store import eval_key, evaluations, find_evaluation
from difflora.train import train

TINY_FEATURES = FeatureTrainConfig(epochs=1, batch_size=64, max_steps=5, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    train(tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2"), out, progress=False, log=lambda _m: None)
    return out


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(trained, copy)
    return copy


def _eval(run_dir: Path, out: Path | None = None, **kw) -> dict:
    settings = EvalSettings(**{"num_samples": 20, "steps": 2, "seed": 1, "bootstrap": 0, "floor_draws": 2} | kw)
    cache = run_dir.parent / "c"
    return evaluate_run(run_dir, settings, out=out, cache_dir=cache, feature_train=TINY_FEATURES, log=lambda _m: None)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_two_settings_both_survive_and_a_re_eval_replaces_only_its_own(run_dir):
    a = _eval(run_dir, guidance=[1, 2])
    b = _eval(run_dir, guidance=[2], guidance_fraction=0.5)
    assert a["key"] == "step2-ema-ddim2-w1_2-n20-seed1"  # the run's sampler, the steps asked for
    assert b["key"] == "step2-ema-ddim2-w2-frac0p5-n20-seed1"
    store = run_dir / "eval"
    assert sorted(_files(store / a["key"])) == ["metrics.json", "samples_w1.png", "samples_w2.png"]
    assert sorted(_files(store / b["key"])) == ["metrics.json", "samples_w2.png"]
    assert json.loads((store / a["key"] / "metrics.json").read_text()) == a
    # The newest is copied into eval/, with no grid of the earlier evaluation left beside it.
    assert sorted(_files(store)) == ["index.json", "metrics.json", "samples_w2.png"]
    assert json.loads((store / "metrics.json").read_text()) == b
    index = json.loads((store / "index.json").read_text())["evaluations"]
    assert [(e["key"], e["path"], e["guidance"], e["guidance_fraction"]) for e in index] == [
        (a["key"], f"eval/{a['key']}", [1.0, 2.0], 1.0),
        (b["key"], f"eval/{b['key']}", [2.0], 0.5),
    ]
    assert [e["fd"] for e in index] == [[r["fd"] for r in a["results"]], [r["fd"] for r in b["results"]]]
    # Again at a's setting (more bootstrap draws: intervals, same key): a's directory alone changes.
    kept_b = _files(store / b["key"])
    again = _eval(run_dir, guidance=[1, 2], bootstrap=5)
    assert again["key"] == a["key"] and again["results"][0]["ci"] and not a["results"][0]["ci"]
    assert json.loads((store / a["key"] / "metrics.json").read_text()) == again
    assert _files(store / b["key"]) == kept_b
    assert sorted(_files(store)) == ["index.json", "metrics.json", "samples_w1.png", "samples_w2.png"]
    assert [e.key for e in evaluations(run_dir)] == [a["key"], b["key"]]


def test_the_key_names_every_setting_that_changes_the_scores(run_dir):
    base = _eval(run_dir, guidance=[2])
    record = {k: v for k, v in base.items() if k != "key"}
    changes = {
        "checkpoint_step": 1,
        "weights": "model",
        "request": {"teacher": True, "task": 1, "against": "mnist"},
    }
    keys = {eval_key(record)} | {eval_key(record | {k: v}) for k, v in changes.items()}
    for k, v in {"steps": 3, "sampler": "ddpm", "eta": 0.5, "guidance": [2.5], "guidance_fraction": 0.3}.items():
        keys.add(eval_key(record | {"settings": record["settings"] | {k: v}}))
    for k, v in {"num_samples": 21, "seed": 2}.items():
        keys.add(eval_key(record | {"settings": record["settings"] | {k: v}}))
    assert len(keys) == 1 + len(changes) + 7
    assert eval_key(record | {"request": {"teacher": True, "task": 1, "against": "mnist"}}).startswith(
        "teacher-task1-vs-mnist-step2-"
    )
    many = eval_key(record | {"settings": record["settings"] | {"guidance": [i / 7 for i in range(40)]}})
    assert len(many) == 120  # a long list of scales: cut, with a hash of the whole key


def test_an_evaluation_written_before_keys_still_loads_and_is_never_replaced(run_dir):
    old = _eval(run_dir, out=run_dir / "eval", guidance=[1])  # an --out / a study's / an older run's layout
    assert "key" not in old and not (run_dir / "eval" / "index.json").exists()
    before = _files(run_dir / "eval")
    new = _eval(run_dir, guidance=[2])
    assert _files(run_dir / "eval") | {"index.json": b""} == before | {"index.json": b""}
    found = evaluations(run_dir)
    assert [(e.key, e.path.name) for e in found] == [(None, "eval"), (new["key"], new["key"])]
    assert find_evaluation(run_dir, lambda m: m["settings"]["guidance"] == [1.0]).metrics == old
    assert find_evaluation(run_dir, lambda m: m["settings"]["guidance"] == [2.0]).metrics == new
    assert find_evaluation(run_dir, lambda m: True, teacher=True) is None
    index = json.loads((run_dir / "eval" / "index.json").read_text())["evaluations"]
    assert [(e["key"], e["path"]) for e in index] == [(None, "eval"), (new["key"], f"eval/{new['key']}")]


def test_the_cli_says_where_the_evaluation_is_kept(run_dir, capsys):
    args = ["eval", str(run_dir), "--num-samples", "20", "--steps", "2", "--guidance", "2", "--no-progress"]
    assert main(args + ["--cache-dir", str(run_dir.parent / "c"), "--feature-steps", "5"]) == 0
    out = capsys.readouterr().out
    key = "step2-ema-ddim2-w2-n20-seed0"
    assert f"metrics: {run_dir / 'eval' / key / 'metrics.json'}" in out
    assert f"every evaluation of the run: {run_dir / 'eval' / 'index.json'}" in out
    assert (run_dir / "eval" / key / "samples_w2.png").is_file()
