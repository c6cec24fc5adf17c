"""Peak memory and checkpoint size: adapter training against full fine-tuning of the paper-scale CIFAR U-Net.

Both settings adapt the same trained base (``train.init_from``) of configs/paper/iddpm-cifar10.yaml
(52.5M parameters) with the real training loop at batch 2: the base is a checkpoint written by
difflora's own ``save_checkpoint`` from a freshly initialised model (its values do not matter for
memory), and the data are a few CIFAR-format records written here (the real files are not on this
machine). Settings:

* ``load base``: build the adapted model and stream the base into it, no training (the floor);
* ``adapter``: a rank-4 LoRA (two bases linearly interpolated over t) on every attention qkv and
  proj_out, base frozen (``train.train_base=false``);
* ``adapter m=10``: the same with 000's 11 bases;
* ``full fine-tuning``: no adapters, every weight trained.

Each setting runs in a fresh subprocess and reports its peak resident set size (``ru_maxrss``), so
no setting inherits another's allocations; the checkpoint size is the bytes of one checkpoint
directory (model, EMA, optimizer, RNG, state.json).

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py     # writes benchmarks/results/memory.json

``--device cuda`` trains on the GPU (``train.device``); the peak is then the CUDA allocator's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from devices import add_device_argument, machine, machine_line

from difflora.model.accounting import peak_memory_mb
from difflora.presets import CONFIGS_DIR

ROOT = Path(__file__).resolve().parents[1]
CONFIG = CONFIGS_DIR / "paper" / "iddpm-cifar10.yaml"


def _lora(num_bases: int) -> str:
    return (
        "model.adapters=[{name: lora, condition: t, weighting: linear, num_values: 4000, "
        f"num_bases: {num_bases}, rank: 4, targets: [qkv, proj_out]}}]"
    )


SETTINGS: dict[str, list[str]] = {
    "load base": [_lora(2), "train.train_base=false"],
    "adapter (r=4, 2 bases)": [_lora(2), "train.train_base=false"],
    "adapter (r=4, m=10)": [_lora(11), "train.train_base=false"],
    "full fine-tuning": ["train.train_base=true"],
}


def _config(work: Path, extra: list[str], device: torch.device):
    from difflora.config.schema import load_config

    common = [
        f"data.root={work / 'cifar'}",
        "train.batch_size=2",
        "train.steps=3",
        "train.ckpt_every=3",
        "train.log_every=1",
        "sample.num=2",
        "sample.steps=2",
        "sample.sampler=ddim",
        f"train.device={device}",
    ]
    return load_config(CONFIG, common + extra)


def _write_data(work: Path) -> None:
    import numpy as np

    from difflora.data.cifar import cifar_file_names

    rng = np.random.default_rng(0)
    (work / "cifar").mkdir(parents=True)
    for name in cifar_file_names("train"):
        records = np.concatenate([rng.integers(0, 10, (4, 1)), rng.integers(0, 256, (4, 3072))], axis=1)
        (work / "cifar" / name).write_bytes(records.astype(np.uint8).tobytes())


def _make_base(work: Path) -> None:
    from difflora.config.schema import config_to_dict
    from difflora.model.build import build_model
    from difflora.train.checkpoint import save_checkpoint

    cfg = _config(work, [], torch.device("cpu"))  # the base's values do not matter: written on the CPU
    torch.manual_seed(0)
    model = build_model(cfg)
    state = model.state_dict()
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(
        work / "base", 1, model=state, ema=state, optimizer=opt, rng={}, meta={"config": config_to_dict(cfg)}
    )


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def one(work: Path, setting: str, device: torch.device) -> dict:
    from difflora.model.accounting import parameter_counts
    from difflora.model.build import build_model
    from difflora.train import latest_checkpoint, load_base, train

    cfg = _config(work, SETTINGS[setting] + [f"train.init_from={work / 'base'}"], device)
    row: dict = {"setting": setting}
    t0 = time.perf_counter()
    if setting == "load base":
        model = build_model(cfg).to(device)
        load_base(model, work / "base")
        counts = parameter_counts(model)
    else:
        out = work / "runs" / str(list(SETTINGS).index(setting))
        result = train(cfg, out, progress=False, log=lambda s: None)
        counts = result["accounting"]["parameters"]
        ckpt = latest_checkpoint(out)
        row["checkpoint_mb"] = _dir_bytes(ckpt) / 2**20
        row["checkpoint_files_mb"] = {p.name: p.stat().st_size / 2**20 for p in sorted(ckpt.iterdir())}
        row["train_step_s"] = result["accounting"]["train_step_s"]
    row.update(
        seconds=time.perf_counter() - t0,
        params=counts["total"],
        trainable=counts["trainable"],
        peak_rss_mb=peak_memory_mb(device),
        threads=torch.get_num_threads(),
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2, metavar=("WORK", "SETTING"), help=argparse.SUPPRESS)
    ap.add_argument("--make-base", metavar="WORK", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    add_device_argument(ap)
    args = ap.parse_args()
    if args.make_base:
        _make_base(Path(args.make_base))
        return
    if args.one:
        print(json.dumps(one(Path(args.one[0]), args.one[1], args.device)))
        return
    info = machine(args.device)
    print(machine_line(info), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _write_data(work)
        subprocess.run([sys.executable, __file__, "--make-base", str(work)], check=True, env=env)
        base_mb = _dir_bytes(work / "base" / "checkpoints") / 2**20
        print(f"base checkpoint (model + EMA + empty optimizer): {base_mb:.1f} MB", flush=True)
        for setting in SETTINGS:
            r = subprocess.run(
                [sys.executable, __file__, "--one", str(work), setting, "--device", str(args.device)],
                capture_output=True,
                text=True,
                env=env,
            )
            if r.returncode:
                sys.exit(f"{setting} failed:\n{r.stderr}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            ckpt = f"checkpoint {row['checkpoint_mb']:8.2f} MB" if "checkpoint_mb" in row else " " * 22
            step = f"{row['train_step_s']:6.2f} s/step" if "train_step_s" in row else ""
            print(
                f"{setting:<24} params {row['params']:>11,}  trainable {row['trainable']:>11,}  "
                f"peak RSS {row['peak_rss_mb']:7.0f} MB  {ckpt}  {step}",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "base_checkpoint_mb": base_mb, "batch_size": 2, "python": sys.version.split()[0]}
    result["machine"] = info
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
