"""Training commands: train, demo (train the digits preset and score it), pretrain (a shared base)."""

from __future__ import annotations

from pathlib import Path

from difflora.cli.configs import args_config, resolve_config_path
from difflora.cli.inputs import check_device
from difflora.cli.parser import CLIError
from difflora.config.schema import load_config
from difflora.eval.evaluate import EvalSettings, evaluate_run
from difflora.eval.settings import MIN_SAMPLES
from difflora.eval.store import STORE
from difflora.experiments.pretrain import pretrain
from difflora.train import train
from difflora.train.checkpoint import select_checkpoint
from difflora.train.footprint import check_memory


def train_command(args) -> int:
    cfg = args_config(args)
    check_device(cfg.train.device, "train.device")
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    checkpoint = None
    if args.checkpoint is not None:
        if not args.resume:
            raise CLIError("--checkpoint picks the checkpoint to resume from: add --resume")
        checkpoint = select_checkpoint(out, args.checkpoint)
    result = train(cfg, out, resume=args.resume, checkpoint=checkpoint, progress=not args.no_progress)
    if not result.get("main", True):
        return 0  # torchrun / accelerate launch: process 0 reports
    last = result["last"]
    acc = result["accounting"]
    print(
        f"trained {result['step']} steps into {out}: loss {last.get('loss', float('nan')):.4f}, "
        f"{acc['train_images_per_s']:.1f} images/s, peak memory {acc['peak_memory_mb']:.0f} MB"
    )
    if result["grid"]:
        print(f"samples: {result['grid']}")
    return 0


def demo_command(args) -> int:
    cfg = load_config(resolve_config_path("digits"), args.set or [])
    device = check_device(cfg.train.device, "train.device")
    out = Path(args.out)
    n = args.eval_samples
    if n < 0 or 0 < n < MIN_SAMPLES:
        raise CLIError(f"--eval-samples must be 0 (no evaluation) or at least {MIN_SAMPLES}, got {n}")
    # The evaluation's settings (and what it will hold) are checked against the config before training, not after it.
    settings = EvalSettings(num_samples=n) if n else None
    if settings is not None:
        s, _ = settings.sampling(cfg, out)
        check_memory(cfg, device, f"demo --eval-samples {n}", samples=n, guided=s.guidance != 1)
    print(
        f"difflora demo: training the digits preset ({cfg.train.steps} steps, batch {cfg.train.batch_size}) into {out}"
    )
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    acc = result["accounting"]
    print(f"done: loss {result['last'].get('loss', float('nan')):.4f}, {acc['train_images_per_s']:.0f} images/s")
    print(f"sample grid (one column per class, EMA weights): {result['grid']}")
    # Score what was trained: FD against the 359 held-out digits in the feature space of a small
    # classifier difflora trains on the train split (cached after the first demo, ~10 s).
    if settings is not None:
        print(f"evaluating {n} samples ({cfg.sample.sampler}, {cfg.sample.steps} steps) against the held-out digits")
        ev = evaluate_run(out, settings, progress=not args.no_progress)
        r = ev["results"][0]
        acc = f", class accuracy {r['class_accuracy']:.3f}" if "class_accuracy" in r else ""
        print(
            f"FD {r['fd']:.3f} (classifier feature space, not Inception FID), KID {r['kid_mean']:.4f}, "
            f"precision {r['precision']:.3f}, recall {r['recall']:.3f}{acc}; "
            f"feature net test accuracy {ev['feature_net']['test_accuracy']:.3f}; {out / STORE / ev['key'] / 'metrics.json'}"
        )
    print(f"more samples: difflora sample {out} --num 100 --steps 100 --guidance 2 --out {out}/guided.png")
    return 0


def pretrain_command(args) -> int:
    cfg = load_config(resolve_config_path(f"pretrain/{args.name}"), args.set or [])
    check_device(cfg.train.device, "train.device")
    path = pretrain(args.name, cfg, progress=not args.no_progress)
    print(path)
    return 0
