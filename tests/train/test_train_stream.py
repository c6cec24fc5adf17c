"""Training on an image folder streamed from disk: exact resume whatever the workers, DDP shards.

The reference of a resumed run is the same run trained without interruption: weights, EMA and
metrics rows must be bit-identical, with the loader in the training process (workers 0), in two
worker processes, and when the workers change across the interruption. Under DDP, two gloo
processes (each reading its own rows) must train the run one process trains.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from difflora.train import latest_checkpoint, load_checkpoint, train
from helpers import tiny_config

QUIET = {"progress": False, "log": lambda s: None}
# Two processes sum a batch's gradient in two halves, then average: float32 rounding only.
TOL = 1e-4
STREAM = ["data.name=image-folder", "data.image_size=8", "model.in_channels=3", "model.num_classes=2"]
STREAM += ["data.hflip=true", "train.steps=6", "train.ckpt_every=2", "train.log_every=1", "sample.num=2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two classes of 11 random non-square RGB images (cropped and resized to 8 x 8)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for i in range(11):
            Image.fromarray(rng.integers(0, 256, (10, 13, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))


def _config(folder: Path, workers: int, *extra: str, preset: str = "tiny-unet"):
    return tiny_config(preset, *STREAM, f"data.root={folder}", f"data.workers={workers}", *extra)


# Under DDP, adapters on a frozen base (as tests/train/test_distributed.py): Adam turns the float
# rounding of a gradient summed in two halves into steps of size lr on a base weight near zero.
ADAPTERS = {"preset": "tiny-tclora-unet"}
FROZEN = ("train.train_base=false", "model.num_classes=10")  # ClassLoRA: one entry per class of the preset


def _same_runs(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(latest_checkpoint(a)), load_checkpoint(latest_checkpoint(b))
    assert ca.step == cb.step
    assert ca.state["data"] == cb.state["data"]
    for part in ("model", "ema"):
        sa, sb = getattr(ca, part), getattr(cb, part)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (a, b)]
    drop = lambda r: {k: v for k, v in r.items() if k != "images_per_s"}  # noqa: E731
    assert [drop(r) for r in rows[0]] == [drop(r) for r in rows[1]]


@pytest.fixture(scope="module")
def straight(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("DIFFLORA_CACHE", str(out.parent / "cache"))
        train(_config(folder, 0), out, **QUIET)
    return out


@pytest.mark.parametrize("before,after", [(0, 0), (2, 2), (0, 2)])
def test_resume_is_bit_identical_whatever_the_workers(folder, straight, tmp_path, before, after):
    train(_config(folder, before), tmp_path / "cut", stop_at=3, **QUIET)
    state = load_checkpoint(latest_checkpoint(tmp_path / "cut")).state["data"]
    assert state["position"] == 3 * 16 and state["samples"] == 20  # stopped after step 3: 48 samples read
    train(_config(folder, after), tmp_path / "cut", resume=True, **QUIET)
    _same_runs(straight, tmp_path / "cut")


def test_workers_do_not_change_the_run(folder, straight, tmp_path):
    train(_config(folder, 2), tmp_path / "run", **QUIET)
    _same_runs(straight, tmp_path / "run")


def test_resume_refuses_a_folder_whose_samples_changed(folder, tmp_path):
    moved = tmp_path / "folder"
    shutil.copytree(folder, moved)
    train(_config(moved, 0), tmp_path / "run", stop_at=2, **QUIET)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(moved / "cat" / "new.png")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(
        ValueError, match=r"image folder .* changed since this run's checkpoint at step 2 \(20 samples then, 21 now"
    ):
        train(_config(moved, 0), tmp_path / "run", resume=True, **QUIET)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before  # refused before writing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    train(_config(Path(folder), 0, *FROZEN, **ADAPTERS), out, stop_at=2, **QUIET)
    train(_config(Path(folder), 0, *FROZEN, **ADAPTERS), out, resume=True, **QUIET)
    dist.destroy_process_group()


def test_two_processes_each_reading_their_rows_train_the_run_one_process_trains(folder, tmp_path):
    straight = tmp_path / "one"
    train(_config(folder, 0, *FROZEN, **ADAPTERS), straight, **QUIET)
    args = (2, _free_port(), str(folder), str(tmp_path / "two"))
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="fork")
    one = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "mse", "vb"):
            assert b[key] == pytest.approx(a[key], rel=TOL, abs=TOL), (a["step"], key)
    wa, wb = (load_checkpoint(latest_checkpoint(r)).model for r in (straight, tmp_path / "two"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=TOL, atol=TOL)
