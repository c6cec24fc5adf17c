"""Soak test of interrupted work (not run in CI): kill train, distill, eval and study many times at
random points, rerun each (``--resume`` where the command has it), and compare the result with an
uninterrupted run file by file and tensor by tensor.

    OMP_NUM_THREADS=1 python scripts/soak_resume.py --points train=80,distill=50,eval=30,study=40
    OMP_NUM_THREADS=1 python scripts/soak_resume.py --points train=20 --signals KILL   # SIGKILL only

Each point starts the command, waits until it has made a random amount of progress (train and
distill: 1-15 more logged steps plus a random fraction of a step; eval and study, which log no
steps: a random 0.5-10 s after start, so the signal lands anywhere: in sampling, scoring, a
checkpoint or an output write), and sends a random signal of ``--signals``. After every point it
checks what the interrupted command left behind: an evaluation's outputs appear together (its
``metrics.json`` names only grids that exist) or not at all. After the points, each command is
finished by one last rerun and compared with its uninterrupted reference:

- train, distill: every tensor of the final checkpoint (model, EMA, optimizer, RNG state), bit for
  bit, and every metrics row (all keys but the timing ``images_per_s``);
- eval: ``metrics.json`` (all keys but timings) and every grid, byte for byte;
- study: every run's final checkpoint and every record's scores.

The script writes a JSON summary (``--result``; benchmarks/results/soak.json by default) and exits
1 if anything differs. The uninterrupted references depend only on the settings below: ones
finished earlier in ``--keep`` are reused. Both sides use the same thread count (set
OMP_NUM_THREADS), which float reductions depend on.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from difflora.train.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402

# tiny-unet with dropout and random flips, so that every random stream the loop checkpoints (data
# order, flips, timesteps, noise, label dropout, dropout) is exercised.
TRAIN = [
    "train.ckpt_every=5",
    "train.log_every=1",
    "train.batch_size=16",
    "model.unet.dropout=0.1",
    "data.hflip=true",
    "sample.num=4",
]
# The teacher of distill and the run eval scores: tiny-unet, class-conditional, briefly trained.
TEACHER = ["train.steps=40", "train.ckpt_every=40", "train.log_every=10", "sample.num=4"]
DISTILL = ["train.ckpt_every=5", "train.log_every=1", "train.batch_size=16", "sample.num=4"]
EVAL = ["--num-samples", "64", "--steps", "10", "--guidance", "1", "2", "--feature-steps", "30"]
STUDY = {
    "name": "soak-study",
    "seeds": [0, 1],
    "eval": {"num_samples": 16, "steps": 4, "guidance": [1, 2], "feature_steps": 30},
    "base": {
        "data": {"name": "digits"},
        "model": {
            "num_classes": 10,
            "time_embed": False,
            "class_embed": False,
            "unet": {
                "model_channels": 8,
                "num_res_blocks": 1,
                "attention_resolutions": [4],
                "channel_mult": [1, 2],
                "num_heads": 2,
            },
        },
        "diffusion": {"steps": 20},
        "train": {"steps": 30, "batch_size": 8, "log_every": 1, "ckpt_every": 3, "device": "cpu"},
        "sample": {"num": 2, "steps": 2},
    },
    "arms": [
        {
            "name": "tclora",
            "adapters": [
                {"name": "time", "condition": "t", "weighting": "linear", "num_values": 20, "num_bases": 3, "rank": 2},
                {"name": "cls", "condition": "y", "weighting": "index", "num_values": 10, "rank": 2},
            ],
        },
        {
            "name": "tclora-r4",
            "adapters": [
                {"name": "time", "condition": "t", "weighting": "linear", "num_values": 20, "num_bases": 3, "rank": 4},
                {"name": "cls", "condition": "y", "weighting": "index", "num_values": 10, "rank": 4},
            ],
        },
    ],
}


def is_timing(key: str) -> bool:
    """Wall-clock measurements, which differ between any two runs."""
    return "seconds" in key or key.endswith("_per_s") or key in ("elapsed_s", "wall_s", "time_s")


def difflora(*args: str) -> list[str]:
    return [sys.executable, "-m", "difflora", *args, "--no-progress"]


def settings(pairs: list[str]) -> list[str]:
    return [a for s in pairs for a in ("--set", s)]


def env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "DIFFLORA_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }


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
    ckpts = out / "checkpoints"
    return ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())


@dataclass
class Scenario:
    """One interruptible command: how to run it (``first``: nothing to resume yet) and compare it."""

    name: str
    command: Callable[[Path, bool], list[str]]
    compare: Callable[[Path, Path], list[str]]
    by_steps: bool  # signal after logged steps (train, distill) or after a random time (eval, study)
    leftovers: Callable[[Path], list[str]] = lambda out: []
    tag: str = ""  # names the uninterrupted reference: it is reused only with the same settings


# --- comparisons ---------------------------------------------------------------------------------
def compare_checkpoints(ref: Path, cut: Path) -> list[str]:
    """Every difference between the final checkpoints of two run directories ([] = identical)."""
    a, b = load_checkpoint(latest_checkpoint(ref)), load_checkpoint(latest_checkpoint(cut))
    diffs = [f"{cut}: final step {a.step} vs {b.step}"] if a.step != b.step else []
    optim = [{f"{i}.{k}": v for i, s in c.optim["state"].items() for k, v in s.items()} for c in (a, b)]
    for part, sa, sb in (("model", a.model, b.model), ("ema", a.ema, b.ema), ("optim", *optim), ("rng", a.rng, b.rng)):
        if sa.keys() != sb.keys():
            diffs.append(f"{cut} {part}: keys differ: {sorted(set(sa) ^ set(sb))[:5]}")
        for k in sorted(set(sa) & set(sb)):
            va, vb = torch.as_tensor(sa[k]), torch.as_tensor(sb[k])
            if va.shape != vb.shape or not torch.equal(va, vb):
                diffs.append(f"{cut} {part}.{k}: differs")
    return diffs


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not is_timing(k)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def compare_metrics_rows(ref: Path, cut: Path) -> list[str]:
    rows = [
        [without_timings(json.loads(ln)) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        for run in (ref, cut)
    ]
    if len(rows[0]) != len(rows[1]):
        return [f"{cut}/metrics.jsonl: {len(rows[0])} rows vs {len(rows[1])}"]
    bad = next((ra for ra, rb in zip(*rows, strict=True) if ra != rb), None)
    return [f"{cut}/metrics.jsonl: step {bad.get('step')} differs"] if bad else []


def compare_run(ref: Path, cut: Path) -> list[str]:
    return compare_checkpoints(ref, cut) + compare_metrics_rows(ref, cut)


def compare_eval(ref: Path, cut: Path) -> list[str]:
    a, b = (without_timings(json.loads((d / "metrics.json").read_text())) for d in (ref, cut))
    diffs = [] if a == b else [f"{cut}/metrics.json differs from the uninterrupted evaluation's"]
    for grid in sorted(p.name for p in ref.glob("*.png")):
        if not (cut / grid).is_file() or (cut / grid).read_bytes() != (ref / grid).read_bytes():
            diffs.append(f"{cut}/{grid}: missing or different")
    return diffs


def eval_leftovers(out: Path) -> list[str]:
    """An evaluation's outputs appear together: metrics.json names only grids that exist."""
    metrics = out / "metrics.json"
    if not metrics.is_file():
        return [f"{out}: grids without metrics.json"] if any(out.glob("*.png")) else []
    try:
        named = [e["grid"] for e in json.loads(metrics.read_text())["results"]]
    except (json.JSONDecodeError, KeyError):
        return [f"{metrics}: unreadable"]
    return [f"{out}: metrics.json names missing grid {g}" for g in named if not (out / g).is_file()]


def compare_study(ref: Path, cut: Path) -> list[str]:
    diffs = []
    for run in sorted(p.parent for p in (ref / "out").glob("*/seed*/config.json")):
        diffs += compare_run(run, cut / "out" / run.relative_to(ref / "out"))
    for record in sorted((ref / "docs").rglob("records/*/seed*.json")):
        other = cut / "docs" / record.relative_to(ref / "docs")
        a = without_timings(json.loads(record.read_text()))
        if not other.is_file() or without_timings(json.loads(other.read_text())) != a:
            diffs.append(f"{other}: missing or different scores")
    return diffs


# --- the scenarios -------------------------------------------------------------------------------
def scenarios(work: Path, counts: dict[str, int]) -> dict[str, Scenario]:
    teacher = work / "teacher"
    # Enough steps that the last point still lands in training: a point advances 1-15 steps
    # and loses what followed the last checkpoint.
    steps = {name: max(50, 10 * counts.get(name, 0)) for name in ("train", "distill")}
    study_steps = max(30, 3 * counts.get("study", 0))  # 4 runs: the study lasts about as many points

    def study(out: Path, first: bool) -> list[str]:
        spec = {**STUDY, "report_dir": str(out / "docs")}
        spec["base"] = {**STUDY["base"], "train": {**STUDY["base"]["train"], "steps": study_steps}}
        out.mkdir(parents=True, exist_ok=True)
        (out / "study.yaml").write_text(yaml.safe_dump(spec))
        return difflora("study", str(out / "study.yaml"), "--out", str(out / "out"))

    return {
        "train": Scenario(
            "train",
            lambda out, first: (
                difflora("train", "tiny-unet", "--out", str(out), *settings([*TRAIN, f"train.steps={steps['train']}"]))
                + ([] if first else ["--resume"])
            ),
            compare_run,
            by_steps=True,
            tag=f"-{steps['train']}",
        ),
        "distill": Scenario(
            "distill",
            lambda out, first: (
                difflora(
                    "distill",
                    str(teacher),
                    "--guidance",
                    "2",
                    "--out",
                    str(out),
                    *settings([*DISTILL, f"train.steps={steps['distill']}"]),
                )
                + ([] if first else ["--resume"])
            ),
            compare_run,
            by_steps=True,
            tag=f"-{steps['distill']}",
        ),
        "eval": Scenario(
            "eval",
            lambda out, first: difflora("eval", str(teacher), "--out", str(out), *EVAL),
            compare_eval,
            by_steps=False,
            leftovers=eval_leftovers,
        ),
        "study": Scenario("study", study, compare_study, by_steps=False, tag=f"-{study_steps}"),
    }


def prepare(work: Path, cache: Path) -> None:
    """The teacher run distill and eval use (trained once, kept in --keep)."""
    teacher = work / "teacher"
    if not (teacher / "accounting.json").is_file():
        shutil.rmtree(teacher, ignore_errors=True)
        cmd = difflora("train", "tiny-unet", "--out", str(teacher), *settings(TEACHER))
        subprocess.run(cmd, env=env(cache), cwd=ROOT, check=True, capture_output=True)


def finished(scn: Scenario, out: Path) -> bool:
    """Whether a reference run finished (so that --keep can reuse it)."""
    marker = {"train": "accounting.json", "distill": "accounting.json", "eval": "metrics.json"}.get(scn.name)
    return (out / marker).is_file() if marker else (out / "docs" / "soak-study.md").is_file()


def point(scn: Scenario, out: Path, sig: signal.Signals, rng: random.Random, cache: Path) -> dict:
    """One start-wait-signal cycle; returns what happened."""
    first = not (has_checkpoint(out) if scn.by_steps else out.exists())
    before = logged_steps(out)
    started = time.time()
    proc = subprocess.Popen(
        scn.command(out, first), env=env(cache), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if scn.by_steps:
        # A random number (1-15) of steps past where this point began (after any resume), plus a
        # random fraction of a step: the signal lands anywhere in a step, checkpoint writes included.
        target, deadline = before + rng.randint(1, 15), time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and time.monotonic() < deadline:
            if metrics.is_file() and metrics.stat().st_mtime >= started and logged_steps(out) >= target:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
    else:
        deadline = time.monotonic() + rng.uniform(0.5, 10.0)
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    signalled = proc.poll() is None
    if signalled:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    tail = err.strip().splitlines()[-1] if err.strip() else ""
    return {
        "signal": sig.name if signalled else None,
        "from": before,
        "at": logged_steps(out),
        "code": proc.returncode,
        "last_line": tail[-120:],
        "leftovers": scn.leftovers(out),
    }


def soak(scn: Scenario, count: int, work: Path, sigs, rng: random.Random, cache: Path) -> dict:
    ref, cut = work / f"{scn.name}-straight{scn.tag}", work / f"{scn.name}-interrupted"
    shutil.rmtree(cut, ignore_errors=True)
    if not finished(scn, ref):
        shutil.rmtree(ref, ignore_errors=True)
        t0 = time.monotonic()
        subprocess.run(scn.command(ref, True), env=env(cache), cwd=ROOT, check=True, capture_output=True)
        print(f"{scn.name}: uninterrupted run {time.monotonic() - t0:.0f} s")
    points = []
    for i in range(count):
        r = point(scn, cut, rng.choice(sigs), rng, cache)
        points.append(r)
        what = f"SIG{r['signal'][3:]:4s}" if r["signal"] else "ended   "
        print(
            f"{scn.name} {i + 1:3d}: {what} from {r['from']:3d} at {r['at']:3d}, exit {r['code']}: {r['last_line'][-80:]}"
        )
        for problem in r["leftovers"]:
            print(f"  LEFTOVER: {problem}")
    done = subprocess.run(scn.command(cut, False), env=env(cache), cwd=ROOT, capture_output=True, text=True)
    diffs = ([f"final rerun exit {done.returncode}: {done.stderr.strip()[-200:]}"] if done.returncode else []) + (
        scn.compare(ref, cut) if done.returncode == 0 else []
    )
    bad_points = [p for p in points if p["leftovers"] or (p["signal"] is None and p["code"] != 0)]
    print(f"{scn.name}: {len(points)} points, final rerun exit {done.returncode}, {len(diffs)} differences")
    for d in diffs[:10]:
        print("  " + d)
    return {
        "points": len(points),
        "signalled": sum(p["signal"] is not None for p in points),
        "signals": {
            s: sum(p["signal"] == s for p in points) for s in sorted({p["signal"] for p in points if p["signal"]})
        },
        "bad_points": bad_points,
        "differences": diffs,
        "identical": not diffs and not bad_points,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", default="train=80,distill=50,eval=30,study=40", help="scenario=count,...")
    p.add_argument("--signals", default="KILL,INT", help="comma list of KILL, INT, TERM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="directory to keep the runs in (default: a temp dir)")
    p.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen in a log file
    # A command started in the background of a non-interactive shell inherits SIGINT ignored, and so
    # would every command this script starts: Ctrl-C would only reach those that install a handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = random.Random(args.seed)
    sigs = [signal.Signals[f"SIG{s.strip().upper()}"] for s in args.signals.split(",")]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="difflora-soak-"))
    cache = work / "cache"
    work.mkdir(parents=True, exist_ok=True)
    counts = {name: int(n) for name, n in (item.split("=") for item in args.points.split(","))}
    table = scenarios(work, counts)
    unknown = sorted(set(counts) - set(table))
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {sorted(table)}")
    prepare(work, cache)
    t0 = time.monotonic()
    results = {name: soak(table[name], n, work, sigs, rng, cache) for name, n in counts.items()}
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    summary = {
        "revision": revision,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
        "signals": [s.name for s in sigs],
        "seed": args.seed,
        "minutes": round((time.monotonic() - t0) / 60, 1),
        "total_points": sum(r["points"] for r in results.values()),
        "all_identical": all(r["identical"] for r in results.values()),
        "scenarios": results,
    }
    Path(args.result).write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{'IDENTICAL' if summary['all_identical'] else 'DIFFERENT'}: {summary['total_points']} points; {args.result}"
    )
    return 0 if summary["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
