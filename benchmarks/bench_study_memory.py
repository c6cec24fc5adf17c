"""Peak training memory of every arm of a study, each in a fresh process.

A study runs all its arms in one process, so the peak resident set size its runs record only grows
from run to run and says nothing about an arm. This benchmark trains each arm of a study YAML
(default: ``experiments/diffscaler/datasets.yaml``) for a few steps with the study's batch size, in
a subprocess of its own, and reports that process's peak RSS (``ru_maxrss``) next to the floor of
its backbone: a process that builds the same adapted model and loads the base, without training.
Peak minus floor is what training the arm costs (activations kept for backward, gradients, AdamW
state); the floor holds Python, torch, the data and the model.

The base is the cached one (``difflora pretrain NAME``) when it exists; otherwise a stand-in with
the base preset's config and freshly initialised weights, saved here (memory does not depend on
the values). No grids are sampled and no evaluation runs.

    OMP_NUM_THREADS=1 python benchmarks/bench_study_memory.py            # writes benchmarks/results/study_memory.json
    python benchmarks/bench_study_memory.py --arms unet-mnist5k-full unet-mnist5k-affiner --steps 3
    ... --device cuda                     # train on the GPU (train.device); peaks are the CUDA allocator's
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from devices import add_device_argument, machine, machine_line

from difflora.model.accounting import peak_memory_mb

ROOT = Path(__file__).resolve().parents[1]
STUDY = "experiments/diffscaler/datasets.yaml"


def _config(study_path: str, arm_name: str, work: Path, steps: int, device: torch.device):
    """The arm's config (seed 0) with its base resolved (cached or a stand-in) and a short run."""
    from difflora.experiments.study_spec import arm_config, load_study
    from difflora.train.base import pretrained_run_dir

    study = load_study(study_path)
    arm = next(a for a in study.arms if a.name == arm_name)
    cfg = arm_config(study, arm, 0, work / "study")
    init = cfg.train.init_from
    if init is not None and init.startswith("pretrained:"):
        name = init.split(":", 1)[1]
        if not (pretrained_run_dir(name) / "checkpoints").is_dir():
            init = str(_stand_in(name, work))
    over = {"init_from": init, "steps": steps, "ckpt_every": steps, "log_every": 1, "sample_every": 0}
    over["device"] = str(device)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=over)})


def _stand_in(name: str, work: Path) -> Path:
    """A run directory holding one checkpoint of the base preset ``name`` at initialisation."""
    from difflora.config.schema import config_to_dict, load_config
    from difflora.model.build import build_model
    from difflora.presets import CONFIGS_DIR
    from difflora.train.checkpoint import save_checkpoint

    out = work / "stand-in" / name
    if out.is_dir():
        return out
    cfg = load_config(CONFIGS_DIR / "pretrain" / f"{name}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    state = model.state_dict()
    opt = torch.optim.AdamW(model.parameters())
    meta = {"config": config_to_dict(cfg)}
    save_checkpoint(out, cfg.train.steps, model=state, ema=state, optimizer=opt, rng={}, meta=meta)
    return out


def one(study_path: str, arm: str, work: Path, steps: int, floor: bool, device: torch.device) -> dict:
    """Train (or, for the floor, only build and load) one arm in this process; its peak RSS (on CUDA
    the allocator's peak)."""
    from difflora.model.build import build_model
    from difflora.train import load_base, train

    cfg = _config(study_path, arm, work, steps, device)
    row: dict = {"arm": arm, "arch": cfg.model.arch, "batch": cfg.train.batch_size, "floor": floor}
    if floor:
        from difflora.data import load_dataset

        load_dataset(cfg.data, "train")  # the data the training process holds too
        model = build_model(cfg).to(device)
        load_base(model, cfg.train.init_from)
    else:
        result = train(cfg, work / "runs" / arm, progress=False, log=lambda s: None)
        acc = result["accounting"]
        row.update(trainable=acc["parameters"]["trainable"], train_step_s=acc["train_step_s"])
    row.update(peak_rss_mb=peak_memory_mb(device), threads=torch.get_num_threads())
    return row


def _run(args: list[str], env: dict[str, str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    from difflora.experiments.study_spec import arm_config, load_study

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", nargs="?", default=STUDY)
    ap.add_argument("--arms", nargs="*", help="arms to measure (default: all)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per arm (default 3)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "study_memory.json"))
    ap.add_argument("--one", nargs=3, metavar=("WORK", "ARM", "FLOOR"), help=argparse.SUPPRESS)
    add_device_argument(ap)
    args = ap.parse_args()
    if args.one:
        work, arm, floor = args.one
        print(json.dumps(one(args.study, arm, Path(work), args.steps, floor == "1", args.device)))
        return
    info = machine(args.device)
    print(machine_line(info), flush=True)
    on = ["--device", str(args.device), "--steps", str(args.steps)]
    study = load_study(args.study)
    arms = [a for a in study.arms if not args.arms or a.name in args.arms]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows, floors = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for a in arms:
            arm = a.name
            row = _run([*on, "--one", tmp, arm, "0", args.study], env)
            cfg = arm_config(study, a, 0)
            key = (cfg.model.arch, cfg.data.name)  # one floor per backbone and dataset
            if key not in floors:
                floors[key] = _run([*on, "--one", tmp, arm, "1", args.study], env)
            row["floor_mb"] = floors[key]["peak_rss_mb"]
            row["training_mb"] = row["peak_rss_mb"] - row["floor_mb"]
            rows.append(row)
            print(
                f"{arm:<32} trainable {row['trainable']:>10,}  peak RSS {row['peak_rss_mb']:6.0f} MB  "
                f"floor {row['floor_mb']:6.0f} MB  training {row['training_mb']:6.0f} MB  "
                f"{row['train_step_s']:5.2f} s/step",
                flush=True,
            )
    result = {"study": str(args.study), "steps": args.steps, "rows": rows, "python": sys.version.split()[0]}
    result["machine"] = info
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
