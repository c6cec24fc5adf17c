"""An image folder streamed from disk: index building, loader images/s, and the training step beside it.

Generates a folder of ``--files`` JPEG images (default 100,000, 96 x 72, ten class subfolders, the
bytes of 1,000 distinct images; kept in ``--dir`` and reused), then measures:

- building its index: cold (every file's header opened), warm (the cached index: list and stat
  only), and after ``--touch`` files changed (those opened again);
- the loader (``difflora.data.stream.StreamBatches``: decode, resize, centre crop, flip) in images/s
  at ``--size``, for 0, 1 and 2 worker processes;
- the training step of a U-Net at the same size and channels, in images/s (the loop's step: q-sample,
  forward, loss, backward, AdamW, EMA), on random tensors: what the loader must keep up with.

    python benchmarks/bench_folder.py                  # writes benchmarks/results/folder.json

The files were just written, so they sit in the page cache: the numbers are decode-bound, not
disk-bound (a cold disk adds its read time to the first epoch). ``--device cuda`` runs the training
step on the GPU (wall seconds up to a synchronisation); the loader decodes on the host either way.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from devices import add_device_argument, machine, machine_line, wall
from PIL import Image

from difflora.config.schema import load_config
from difflora.data import index_folder, open_batches
from difflora.model.build import build_diffusion, build_model
from difflora.train.ema import EMA

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, files: int, distinct: int = 1000, seed: int = 0) -> float:
    """``files`` JPEGs in ten class folders, their bytes cycling through ``distinct`` smooth random
    images (encoding 100,000 would take longer than the benchmark); returns seconds (0 when reused)."""
    if root.is_dir() and sum(len(os.listdir(root / d)) for d in os.listdir(root)) == files:
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(distinct):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # upsampled: an image with structure
        buf = io.BytesIO()
        Image.fromarray(low).resize((96, 72), Image.BICUBIC).save(buf, "JPEG", quality=90)
        encoded.append(buf.getvalue())
    for i in range(files):
        d = root / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(encoded[i % distinct])
    return time.perf_counter() - t0


def time_index(cfg, root: Path, touch: int) -> dict:
    out = {}
    t0 = time.perf_counter()
    index = index_folder(cfg, "train")
    out["cold_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index_folder(cfg, "train")
    out["warm_s"] = time.perf_counter() - t0
    for path in index.files[:touch]:
        os.utime(path)
    t0 = time.perf_counter()
    index_folder(cfg, "train")
    out[f"after_touching_{touch}_s"] = time.perf_counter() - t0
    out["train_samples"] = len(index)
    return out


def time_loader(cfg, batch: int, batches: int) -> float:
    source = open_batches(cfg, seed=0, batch_size=batch, rows=range(batch))
    source.draw(0, torch.Generator())  # workers started, first batches in flight
    t0 = time.perf_counter()
    for step in range(1, batches + 1):
        source.draw(step, torch.Generator())
    dt = time.perf_counter() - t0
    source.close()
    return batch * batches / dt


def time_step(preset: str, size: int, batch: int, steps: int, device: torch.device) -> float:
    torch.manual_seed(0)
    cfg = load_config(preset, ["data.name=cifar10", f"data.image_size={size}", "model.in_channels=3"])
    model, diffusion = build_model(cfg).to(device), build_diffusion(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    ema = EMA(model, cfg.train.ema_decay)
    x = torch.randn(batch, 3, size, size, device=device)
    kwargs = {"y": torch.randint(cfg.model.num_classes, (batch,), device=device)} if cfg.model.num_classes else {}

    def step():
        t = torch.randint(diffusion.num_timesteps, (batch,), device=device)
        loss = diffusion.training_losses(model, x, t, kwargs)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)

    step()
    t0 = wall(device)
    for _ in range(steps):
        step()
    return batch * steps / (wall(device) - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/difflora-bench-folder"))
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--touch", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "folder.json")
    add_device_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine_line(machine(args.device)), flush=True)
    folder = args.dir / f"files{args.files}"
    made = make_folder(folder, args.files)
    os.environ.setdefault("DIFFLORA_CACHE", str(args.dir / "cache"))
    for stale in (args.dir / "cache" / "image-folders").glob("*.json"):
        stale.unlink()  # a cold first build
    base = ["data.name=image-folder", f"data.root={folder}", f"data.image_size={args.size}", "model.in_channels=3"]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": 1} | machine(args.device),
        "folder": {"files": args.files, "source_size": [96, 72], "format": "jpeg", "generated_s": made},
        "index": time_index(load_config("tiny-unet", base).data, folder, args.touch),
        "loader_images_per_s": {},
        "step_images_per_s": {},
        "size": args.size,
        "batch": args.batch,
    }
    for workers in (0, 1, 2):
        cfg = load_config("tiny-unet", [*base, f"data.workers={workers}", "data.hflip=true"]).data
        result["loader_images_per_s"][f"workers={workers}"] = time_loader(cfg, args.batch, args.batches)
    for preset in ("tiny-unet", "digits"):
        result["step_images_per_s"][preset] = time_step(preset, args.size, args.batch, 5, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
