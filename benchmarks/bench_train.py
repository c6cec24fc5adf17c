"""Training throughput (images/s) and peak memory of the presets, measured side by side in one run.

Each preset runs in its own subprocess so that its peak resident memory is its own. A step is what
the training loop does: q-sample, forward, loss, backward, AdamW, EMA; batches are random tensors of
the dataset's shape (the paper's CIFAR-10 files are not on this machine), so this measures the model,
not the data pipeline.

    python benchmarks/bench_train.py            # all presets; writes benchmarks/results/train.json
    ... --device cuda --precision bf16           # on a GPU (wall seconds between synchronisations)

``--precision`` is ``train.precision`` (fp32, bf16, fp16 without its loss scaling, auto: bf16 where
the hardware computes it natively).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from devices import add_device_argument, machine, machine_line, wall

ROOT = Path(__file__).resolve().parents[1]
PRESETS = [  # (config, batch size, timed steps)
    ("tiny-unet", 16, 30),
    ("tiny-dit", 16, 30),
    ("digits", 64, 10),
    ("paper/iddpm-cifar10", 8, 3),
]


def one(config: str, batch: int, steps: int, device: torch.device, precision: str) -> dict:
    from difflora.cli.commands import resolve_config_path
    from difflora.config.schema import load_config
    from difflora.model.accounting import parameter_counts, peak_memory_mb
    from difflora.model.build import build_diffusion, build_model
    from difflora.train.ema import EMA
    from difflora.train.precision import autocast, resolve_precision

    torch.manual_seed(0)
    cfg = load_config(resolve_config_path(config))
    model = build_model(cfg).to(device)
    diffusion = build_diffusion(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    ema = EMA(model, cfg.train.ema_decay)
    m = cfg.model
    x = torch.randn(batch, m.in_channels, m.image_size, m.image_size, device=device)
    kwargs = {"y": torch.randint(m.num_classes, (batch,), device=device)} if m.num_classes else {}

    def step():
        t = torch.randint(diffusion.num_timesteps, (batch,), device=device)
        with autocast(precision, device):
            loss = diffusion.training_losses(model, x, t, kwargs)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)

    step()  # warm-up: allocation, first-touch
    t0 = wall(device)
    for _ in range(steps):
        step()
    dt = (wall(device) - t0) / steps
    return {
        "config": config,
        "params": parameter_counts(model)["total"],
        "batch": batch,
        "step_s": dt,
        "images_per_s": batch / dt,
        "peak_memory_mb": peak_memory_mb(device),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "precision": resolve_precision(precision, device),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=3, metavar=("CONFIG", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default="fp32")
    add_device_argument(ap)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]), args.device, args.precision)))
        return
    info = machine(args.device)
    print(machine_line(info), flush=True)
    rows = []
    for config, batch, steps in PRESETS:
        on = ["--device", str(args.device), "--precision", args.precision]
        r = subprocess.run(
            [sys.executable, __file__, "--one", config, str(batch), str(steps), *on],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(
            f"{row['config']:<22} params {row['params']:>12,}  batch {row['batch']:>4}  "
            f"{row['images_per_s']:>9.1f} images/s  {row['step_s'] * 1000:>8.1f} ms/step  peak {row['peak_memory_mb']:>7.0f} MB",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "python": sys.version.split()[0], "machine": info}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
