"""The trackers of train.trackers (issue 32, item 8), read back: TensorBoard holds every metrics row
as scalars, every sample grid the run wrote (its own pixels), the resolved config as text, and the
scores of a kept evaluation; wandb (an optional extra) runs offline in RUN_DIR/wandb."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from difflora.eval.evaluate import EvalSettings, evaluate_run
from difflora.eval.features import FeatureTrainConfig
from difflora.train import train

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="tensorboard reads the event files back"
).EventAccumulator
TINY_FEATURES = FeatureTrainConfig(epochs=1, batch_size=64, max_steps=5, seed=0)
LOGGED = ["train.steps=2", "train.ckpt_every=2", "train.log_every=1", "train.sample_every=1", "sample.num=4"]


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _rgb(png: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as im:
        return np.asarray(im.convert("RGB"))


def test_tensorboard_holds_scalars_grids_config_and_the_scores_of_an_evaluation(tmp_path, tiny_config):
    run = tmp_path / "run"
    train(tiny_config("tiny-unet", *LOGGED, "sample.steps=2"), run, progress=False, log=lambda _m: None)
    acc = _events(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in [k for k in rows[0] if k != "step"]:  # loss, mse, vb, grad_norm, lr, images_per_s
        got = [(e.step, e.value) for e in acc.Scalars(f"train/{key}")]
        assert got == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    grids = acc.Images("samples/grid")
    assert [g.step for g in grids] == [1, 2]  # the periodic grid of step 1 and the final one
    for g in grids:
        assert np.array_equal(_rgb(g.encoded_image_string), _rgb(run / "samples" / f"step_{g.step:07d}.png"))
    (text,) = acc.Tensors("config/text_summary")
    written = textwrap.dedent(text.tensor_proto.string_val[0].decode())
    assert text.step == 0 and yaml.safe_load(written) == json.loads((run / "config.json").read_text())

    settings = EvalSettings(num_samples=20, steps=2, guidance=[1], seed=1, bootstrap=0, floor_draws=2)
    result = evaluate_run(run, settings, cache_dir=tmp_path / "c", feature_train=TINY_FEATURES)
    acc = _events(run)
    entry, key = result["results"][0], result["key"]
    for metric in ("fd", "kid_mean", "precision", "recall", "class_accuracy"):
        got = [(e.step, e.value) for e in acc.Scalars(f"eval/{key}/{metric}@w1")]
        assert got == [(2, pytest.approx(entry[metric], rel=1e-6, abs=1e-9))], metric
    (image,) = acc.Images(f"eval/{key}/samples@w1")
    assert np.array_equal(_rgb(image.encoded_image_string), _rgb(run / "eval" / key / "samples_w1.png"))
    # An evaluation written to --out elsewhere leaves the run's log alone.
    evaluate_run(run, settings, out=tmp_path / "elsewhere", cache_dir=tmp_path / "c", feature_train=TINY_FEATURES)
    assert len(_events(run).Scalars(f"eval/{key}/fd@w1")) == 1


def test_no_trackers_writes_no_log(tmp_path, tiny_config):
    run = tmp_path / "run"
    train(tiny_config("tiny-unet", "train.steps=1", "train.trackers=[]"), run, progress=False, log=lambda _m: None)
    assert not (run / "tb").exists() and (run / "metrics.jsonl").read_text()


def test_wandb_runs_offline_in_the_run_directory(tmp_path, tiny_config):
    pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'difflora[wandb]')")
    run = tmp_path / "run"
    cfg = tiny_config("tiny-unet", *LOGGED, "sample.steps=2", "train.trackers=[wandb]")
    train(cfg, run, progress=False, log=lambda _m: None)
    assert not (run / "tb").exists()
    (offline,) = (run / "wandb").glob("offline-run-*")  # offline: nothing was sent anywhere
    record = next(offline.glob("run-*.wandb")).read_bytes()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # every scalar of every row, and the resolved config, in the run's record
        for key in [k for k in row if k != "step"]:
            assert f"train/{key}".encode() in record and json.dumps(row[key]).encode() in record, key
    assert b"keep_checkpoints" in record and b"trackers" in record
    media = sorted(offline.glob("files/media/images/samples/grid_*.png"))
    assert [p.name.split("_")[1] for p in media] == ["1", "2"]
    for step, png in zip((1, 2), media, strict=True):
        assert np.array_equal(_rgb(png), _rgb(run / "samples" / f"step_{step:07d}.png"))
