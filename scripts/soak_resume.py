"""Soak test of interrupted training (not run in CI): kill a tiny run many times, resume it each
time, and compare the result with an uninterrupted run tensor by tensor.

    OMP_NUM_THREADS=1 python scripts/soak_resume.py --cycles 20                  # SIGKILL and SIGINT
    OMP_NUM_THREADS=1 python scripts/soak_resume.py --cycles 20 --signals KILL   # SIGKILL only

Each cycle starts ``difflora train`` (``--resume`` once a checkpoint exists), waits until the run
has logged 1-15 more steps (at random) and a random fraction of a step more, and sends a random
signal of ``--signals``. After the cycles the run is finished with ``--resume``. The script then compares
the final checkpoint with the uninterrupted one (every tensor of model, EMA, optimizer and RNG
state, bit for bit) and every metrics row (all keys but the timing ``images_per_s``), prints a
report, and exits 1 if anything differs.

The config is tiny-unet with dropout and random flips, so that every random stream the loop
checkpoints (data order, flips, timesteps, noise, label dropout, dropout) is exercised. Both runs
use the same thread count (set OMP_NUM_THREADS), which float reductions depend on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from difflora.train.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402

SETTINGS = [
    "train.steps=200",
    "train.ckpt_every=5",
    "train.log_every=1",
    "train.batch_size=16",
    "model.unet.dropout=0.1",
    "data.hflip=true",
    "sample.num=4",
]


def command(out: Path, resume: bool, progress: bool) -> list[str]:
    args = [sys.executable, "-m", "difflora", "train", "tiny-unet", "--out", str(out)]
    for s in SETTINGS:
        args += ["--set", s]
    return args + (["--resume"] if resume else []) + ([] if progress else ["--no-progress"])


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except (json.JSONDecodeError, KeyError):
        return 0  # a line being written right now


def has_checkpoint(out: Path) -> bool:
    return (out / "checkpoints").is_dir() and any(p.name.startswith("step_") for p in (out / "checkpoints").iterdir())


def cycle(out: Path, sig: signal.Signals, rng: random.Random, progress: bool) -> dict:
    """One start-train-signal cycle; returns what happened."""
    before = logged_steps(out)
    proc = subprocess.Popen(
        command(out, has_checkpoint(out), progress),
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Signal once the run has logged a random number (1-15) of steps past where this cycle began
    # (after any resume), plus a random fraction of a step: the signal lands anywhere in a step,
    # including inside a checkpoint write, and the run still makes progress from cycle to cycle.
    target = before + rng.randint(1, 15)
    deadline = time.monotonic() + 300
    started = time.time()
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and time.monotonic() < deadline:
        fresh = metrics.is_file() and metrics.stat().st_mtime >= started
        if fresh and logged_steps(out) >= target:
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    at = logged_steps(out)
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    tail = err.strip().splitlines()[-1] if err.strip() else ""
    return {"signal": sig.name, "from": before, "logged_at_signal": at, "code": proc.returncode, "last_line": tail}


def compare(ref: Path, cut: Path) -> list[str]:
    """Every difference between the final checkpoints and metrics of two runs ([] = identical)."""
    a, b = load_checkpoint(latest_checkpoint(ref)), load_checkpoint(latest_checkpoint(cut))
    diffs = []
    if a.step != b.step:
        diffs.append(f"final step {a.step} vs {b.step}")
    optim_a = {f"{i}.{k}": v for i, s in a.optim["state"].items() for k, v in s.items()}
    optim_b = {f"{i}.{k}": v for i, s in b.optim["state"].items() for k, v in s.items()}
    count = 0
    for part, sa, sb in (
        ("model", a.model, b.model),
        ("ema", a.ema, b.ema),
        ("optim", optim_a, optim_b),
        ("rng", a.rng, b.rng),
    ):
        if sa.keys() != sb.keys():
            diffs.append(f"{part}: keys differ: {sorted(set(sa) ^ set(sb))[:5]}")
        for k in sorted(set(sa) & set(sb)):
            count += 1
            va, vb = torch.as_tensor(sa[k]), torch.as_tensor(sb[k])
            if va.shape != vb.shape or not torch.equal(va, vb):
                delta = (va.double() - vb.double()).abs().max().item() if va.shape == vb.shape else "shape"
                diffs.append(f"{part}.{k}: differs (max |diff| {delta})")
    rows = []
    for run in (ref, cut):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        rows.append([{k: v for k, v in json.loads(ln).items() if k != "images_per_s"} for ln in lines if ln.strip()])
    if len(rows[0]) != len(rows[1]):
        diffs.append(f"metrics.jsonl: {len(rows[0])} rows vs {len(rows[1])}")
    for ra, rb in zip(*rows, strict=False):
        if ra != rb:
            diffs.append(f"metrics step {ra.get('step')}: {ra} vs {rb}")
            break
    print(f"compared {count} tensors and {min(len(r) for r in rows)} metrics rows")
    return diffs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--signals", default="KILL,INT", help="comma list of KILL, INT, TERM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="run training with --no-progress")
    p.add_argument("--keep", default=None, help="directory to keep the two runs in (default: a temp dir)")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen in a log file
    rng = random.Random(args.seed)
    sigs = [signal.Signals[f"SIG{s.strip().upper()}"] for s in args.signals.split(",")]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="difflora-soak-"))
    ref, cut = work / "straight", work / f"interrupted-{'-'.join(s.name[3:] for s in sigs)}"
    shutil.rmtree(cut, ignore_errors=True)
    progress = not args.no_progress
    # The uninterrupted run depends only on SETTINGS: one finished earlier in --keep is reused.
    if not (ref / "accounting.json").is_file():
        shutil.rmtree(ref, ignore_errors=True)
        t0 = time.monotonic()
        subprocess.run(
            command(ref, False, progress),
            env=env(),
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        print(f"uninterrupted run: {time.monotonic() - t0:.0f} s")
    for i in range(args.cycles):
        r = cycle(cut, rng.choice(sigs), rng, progress)
        print(
            f"cycle {i + 1:2d}: SIG{r['signal'][3:]:4s} from step {r['from']:3d}, logged {r['logged_at_signal']:3d} "
            f"at the signal, exit {r['code']}: {r['last_line'][-90:]}"
        )
    done = subprocess.run(
        command(cut, has_checkpoint(cut), progress), env=env(), cwd=ROOT, capture_output=True, text=True
    )
    print(f"final --resume: exit {done.returncode}")
    diffs = compare(ref, cut)
    if diffs:
        print(f"DIFFERENT: {len(diffs)} differences")
        for d in diffs[:20]:
            print("  " + d)
        return 1
    print("IDENTICAL: model, EMA, optimizer and RNG state and every metrics row match the uninterrupted run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
