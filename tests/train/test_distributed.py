"""Multi-process training (DDP on gloo CPU processes) against one process at the same global batch.

Two processes started by torch.multiprocessing each call ``train``: the run they write must be the
run one process writes (same metrics rows, same weights up to the order of float sums), written
once (process 0 only), and resuming under DDP must continue it. A torchrun subprocess runs the
command line as a user would (``torchrun -m difflora train``): one report, one set of files.
"""

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import difflora.train.loop as train_loop
from difflora.train import latest_checkpoint, load_checkpoint, train
from difflora.train.distributed import Dist, DistributedModel
from difflora.train.run_lock import RunLocked
from difflora.train.step import set_process_rng_state
from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[2]
QUIET = {"progress": False, "log": lambda s: None}
# Two processes sum a batch's gradient in two halves, then average: float32 rounding only.
TOL = 1e-4

# On tiny-tclora-unet: TimeLoRA + ClassLoRA on a frozen base, per-sample conditions (t, y), only
# adapters train. hflip and label dropout draw per-sample random numbers; batch 8 splits into 2 x 4 rows.
DDP = ["train.steps=4", "train.batch_size=8", "train.log_every=1", "train.ckpt_every=2", "train.train_base=false"]
DDP += ["data.hflip=true", "data.limit=64"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, report: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    # Joined here, once: train() uses a group that exists (and leaves it open) for both calls.
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen = {}

    def spy(st):
        seen["wrapped"] = isinstance(st.train_model, DistributedModel)
        seen["rows"] = [st.dist.rows(8).start, st.dist.rows(8).stop]

    first = train(tiny_config("tiny-tclora-unet", *DDP), out, stop_at=2, callback=spy, **QUIET)
    second = train(tiny_config("tiny-tclora-unet", *DDP), out, resume=True, **QUIET)
    if rank == 1:
        Path(report).write_text(json.dumps({"first": first["main"], "second": second["main"], **seen}))
    dist.destroy_process_group()


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(run)).model


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    train(tiny_config("tiny-tclora-unet", *DDP), tmp / "one", **QUIET)
    # Forked, not spawned: the children inherit the imports the reference run paid for (seconds).
    args = (2, _free_port(), str(tmp / "two"), str(tmp / "rank1.json"))
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="fork")
    return tmp


def test_two_processes_train_the_run_one_process_trains(runs):
    one, two = _rows(runs / "one"), _rows(runs / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # each row once: process 0 alone wrote
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "mse", "vb", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=TOL, abs=TOL), (a["step"], key)
    wa, wb = _final_weights(runs / "one"), _final_weights(runs / "two")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=TOL, atol=TOL)


def test_only_process_zero_writes_and_reports(runs):
    rank1 = json.loads((runs / "rank1.json").read_text())
    assert rank1["first"] is False and rank1["second"] is False  # rank 1 reports nothing
    assert rank1["wrapped"] is True
    assert rank1["rows"] == [4, 8]  # its own half of every batch
    steps = sorted(p.name for p in (runs / "two" / "checkpoints").iterdir())
    assert steps == ["step_0000002", "step_0000004"]  # resumed from step 2 under DDP


# Dropout draws from each process's global RNG: its state must come back on resume, per process.
# The base trains: dropout sits before a zero-initialised conv, which only a trained base moves.
DROPOUT = [*DDP, "model.unet.dropout=0.3", "train.train_base=true"]


def _dropout_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    train(tiny_config("tiny-tclora-unet", *DROPOUT), Path(out) / "whole", **QUIET)
    train(tiny_config("tiny-tclora-unet", *DROPOUT), Path(out) / "resumed", stop_at=2, **QUIET)
    # Re-seeded in between: a resume must restore every process's RNG, not rely on where it stands.
    torch.manual_seed(1234 + rank)
    train(tiny_config("tiny-tclora-unet", *DROPOUT), Path(out) / "resumed", resume=True, **QUIET)
    dist.destroy_process_group()


def test_two_processes_with_dropout_resume_bit_identically(tmp_path):
    mp.start_processes(_dropout_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    whole, resumed = (load_checkpoint(latest_checkpoint(tmp_path / run)) for run in ("whole", "resumed"))
    assert whole.step == resumed.step == 4
    assert {"rank1/torch"} <= resumed.rng.keys()  # process 1's own RNG state, next to process 0's
    for part in ("model", "ema"):
        a, b = getattr(whole, part), getattr(resumed, part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    losses = [
        [{k: r[k] for k in ("step", "loss", "mse", "vb")} for r in _rows(tmp_path / run)]
        for run in ("whole", "resumed")
    ]
    assert losses[0] == losses[1]
    # One process resumes the same checkpoint (process 0's states are the plain keys, as before).
    train(tiny_config("tiny-tclora-unet", *DROPOUT, "train.steps=6"), tmp_path / "resumed", resume=True, **QUIET)
    assert load_checkpoint(latest_checkpoint(tmp_path / "resumed")).step == 6


def test_each_process_restores_its_own_rng_state_or_reseeds_without_one():
    mine, theirs = torch.Generator().manual_seed(1).get_state(), torch.Generator().manual_seed(2).get_state()
    stored = {"loop": mine, "torch": mine, "rank1/torch": theirs}
    with torch.random.fork_rng(devices=[]):
        assert set_process_rng_state(Dist(rank=1, world_size=2), stored)
        assert torch.equal(torch.get_rng_state(), theirs)
    # A checkpoint from before the per-process states, or from another number of processes: the
    # caller re-seeds each process as it always did.
    assert not set_process_rng_state(Dist(rank=1, world_size=2), {"loop": mine, "torch": mine})
    assert not set_process_rng_state(Dist(rank=1, world_size=3), stored)


def test_rows_split_a_batch_into_disjoint_shares():
    shares = [Dist(rank=r, world_size=4).rows(12) for r in range(4)]
    covered = torch.cat([torch.arange(12)[s] for s in shares])
    assert covered.tolist() == list(range(12))
    with pytest.raises(ValueError, match="cannot be shared by 4 processes"):
        Dist(rank=0, world_size=4).rows(10)


def test_a_global_batch_that_does_not_split_is_refused_before_training(tmp_path, monkeypatch):
    from difflora.train.step import check_batch_split

    with pytest.raises(
        ValueError, match=r"multiple of train.grad_accum=3 x 2 process\(es\) = 6; use train.batch_size=6 or 12"
    ):
        check_batch_split(8, 3, 2)
    with pytest.raises(ValueError, match="grad_accum=3"):
        train(tiny_config("tiny-tclora-unet", *DDP, "train.grad_accum=3"), tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists()


# The launchers start fresh Python processes that import torch and the whole library: minutes on
# this shared 2-core machine, so they run on request (DIFFLORA_TEST_LAUNCHERS=1), e.g. in CI.
LAUNCHERS = pytest.mark.skipif(
    os.environ.get("DIFFLORA_TEST_LAUNCHERS") != "1", reason="set DIFFLORA_TEST_LAUNCHERS=1 to run the launchers"
)
BIN = Path(sys.executable).parent


def _launch(cmd: list[str], out: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    sets = ["train.steps=2", "train.batch_size=4", "train.log_every=1", "train.ckpt_every=2"]
    args = ["-m", "difflora", "train", "tiny-unet", "--out", str(out), "--no-progress"]
    args += [a for kv in sets for a in ("--set", kv)]
    return subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=900)


def _one_run_written(done: subprocess.CompletedProcess, out: Path) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 2 steps") == 1  # one report, not one per process
    assert [r["step"] for r in _rows(out)] == [1, 2]  # each row once
    assert json.loads((out / "accounting.json").read_text())["processes"] == 2


@pytest.mark.slow
@LAUNCHERS
def test_torchrun_command_line_writes_one_run(tmp_path):
    done = _launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], tmp_path / "run")
    _one_run_written(done, tmp_path / "run")


@pytest.mark.slow
@LAUNCHERS
def test_accelerate_launch_writes_one_run(tmp_path):
    # --multi_gpu is accelerate's torchrun path; on a CPU-only machine difflora joins it with gloo.
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    done = _launch(
        cmd + ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"], tmp_path / "run"
    )
    _one_run_written(done, tmp_path / "run")


def _refused_worker(rank: int, world: int, port: int, out: str, report: str, late: bool) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    if late:  # the holder took the lock after this launch's first look: process 0 is refused inside the group
        train_loop.check_unlocked = lambda out: None
    try:
        train(tiny_config("tiny-unet", "train.steps=1", "train.batch_size=4"), out, **QUIET)
        outcome = "trained"
    except RunLocked as exc:
        outcome = str(exc)
    Path(f"{report}.{rank}").write_text(outcome)


@pytest.mark.parametrize("late", [False, True], ids=["refused-at-first-look", "refused-inside-the-group"])
def test_when_process_zero_is_refused_the_lock_every_process_leaves_with_the_refusal(tmp_path, late):
    out = tmp_path / "run"
    out.mkdir()
    (out / "lock").write_text(json.dumps({"pid": 1, "host": "h", "command": "difflora train", "started": "now"}))
    fd = os.open(out / "lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer holds the run
    try:
        args = (2, _free_port(), str(out), str(tmp_path / "outcome"), late)
        mp.start_processes(_refused_worker, args=args, nprocs=2, join=True, start_method="fork")
    finally:
        os.close(fd)
    outcomes = [(tmp_path / f"outcome.{r}").read_text() for r in (0, 1)]
    assert all("being written by pid 1 on h" in o or "process 0 was refused the lock" in o for o in outcomes), outcomes
    assert "being written by pid 1 on h" in outcomes[0]
    assert sorted(p.name for p in out.iterdir()) == ["lock"]  # nothing written
