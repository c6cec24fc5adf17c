"""DiT masked training (DiffScaler, 002 section 4.2): peak memory and step time, masked vs unmasked.

One training step of the Affiner-adapted DiT (base frozen, ``model.affiner`` with 002's d = 64)
through the real objective (``train.objective: diffusion``, hybrid loss) at ``train.mask_ratio``
0 and 0.5: forward, backward and an AdamW update of the Affiner's parameters, on random 32 x 32
RGB images. Model: a DiT of 4 blocks, hidden 256, 4 heads, patch 2 (256 patch tokens at 32 px), batch 8.

Each (setting, repeat) runs in a fresh subprocess, alternating the settings, so no setting inherits
another's allocations or a warmer cache. Per run: the fastest of ``--steps`` timed steps (after one
warm-up step) in CPU time of the process (``time.process_time``: one thread, so it is the step's
work, robust to the other jobs of a loaded machine) next to its wall time, and the peak resident set size (``ru_maxrss``) minus the resident size after the
model was built (the memory the training step itself needs: activations, gradients, optimizer).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_masked.py   # writes benchmarks/results/masked.json

``--device cuda``: the step on the GPU, its time in wall seconds between synchronisations (both
columns), its memory the CUDA allocator's peak minus what it held after the model was built.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from devices import add_device_argument, clock, machine, machine_line, wall

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"unmasked": 0.0, "masked 0.5": 0.5}
BATCH = 8


def _rss_mb(device: torch.device) -> float:
    # Current resident set size (Linux: /proc), for the baseline after building the model; on CUDA
    # the allocator's current memory.
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(ratio: float, steps: int, device: torch.device) -> dict:
    from difflora.config.schema import parse_config
    from difflora.model.accounting import peak_memory_mb
    from difflora.model.build import build_diffusion, build_model
    from difflora.train.objectives import Batch, build_objective

    cfg = parse_config(
        {
            "data": {"name": "cifar10", "task_id": 0},
            "model": {
                "arch": "dit",
                "num_classes": 10,
                "dit": {"depth": 4, "hidden_size": 256, "num_heads": 4, "patch_size": 2},
                "affiner": {"tasks": 1},
            },
            "train": {"train_base": False, "mask_ratio": ratio, "device": "cpu"},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    objective = build_objective(cfg, build_diffusion(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(BATCH, 3, 32, 32, generator=g) * 2 - 1, torch.randint(10, (BATCH,), generator=g)
    batch = Batch(x.to(device), {"y": y.to(device), "task": torch.zeros(BATCH, dtype=torch.long, device=device)})
    built = _rss_mb(device)
    times, walls = [], []
    for i in range(steps + 1):
        t0, w0 = clock(device), wall(device)
        loss = objective(model, batch, g, device)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step pays for allocation
            times.append(clock(device) - t0)
            walls.append(wall(device) - w0)
    peak = peak_memory_mb(device)
    return {
        "step_s": min(times),
        "wall_s": min(walls),
        "peak_rss_mb": peak,
        "step_rss_mb": peak - built,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "masked.json"))
    add_device_argument(ap)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.steps, args.device)))
        return
    info = machine(args.device)
    print(machine_line(info), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, ratio in SETTINGS.items():  # alternated: each repeat runs every setting once
            cmd = [
                sys.executable,
                __file__,
                "--one",
                str(ratio),
                "--steps",
                str(args.steps),
                "--device",
                str(args.device),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode:
                sys.exit(f"{name} failed:\n{r.stderr}")
            runs[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
    rows = []
    for name, rs in runs.items():
        step = [r["step_s"] for r in rs]
        mem = [r["step_rss_mb"] for r in rs]
        rows.append(
            {
                "setting": name,
                "mask_ratio": SETTINGS[name],
                "step_s_min": min(step),
                "step_s_max": max(step),
                "step_s_median": statistics.median(step),
                "step_rss_mb_median": statistics.median(mem),
                "step_rss_mb_range": [min(mem), max(mem)],
                "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in rs),
                "runs": rs,
            }
        )
        print(
            f"{name:<12} step {min(step):6.3f} s CPU (fastest; runs {min(step):.3f}..{max(step):.3f})  "
            f"step memory {statistics.median(mem):7.1f} MB (runs {min(mem):.1f}..{max(mem):.1f})  "
            f"peak RSS {rows[-1]['peak_rss_mb_median']:7.1f} MB",
            flush=True,
        )
    base, masked = rows
    ratio = {
        "time": masked["step_s_min"] / base["step_s_min"],
        "memory": masked["step_rss_mb_median"] / base["step_rss_mb_median"],
    }
    print(f"masked / unmasked: step time x{ratio['time']:.2f}, step memory x{ratio['memory']:.2f}")
    result = {
        "model": "DiT depth 4, hidden 256, 4 heads, patch 2; 32x32x3; Affiner d=64 (base frozen), hybrid loss, AdamW",
        "batch_size": BATCH,
        "steps_per_run": args.steps,
        "repeats": args.repeats,
        "threads": rows[0]["runs"][0]["threads"],
        "note": "run with nice -n 5 and OMP_NUM_THREADS=1 on a loaded 2-core machine (other jobs running)",
        "rows": rows,
        "masked_over_unmasked": ratio,
        "python": sys.version.split()[0],
        "machine": info,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
