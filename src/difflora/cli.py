"""The ``difflora`` command line: thin wrappers over the library (see README.md for examples)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from difflora.config import ConfigError, load_config

__all__ = ["main", "resolve_config_path"]

_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class CLIError(Exception):
    """A bad command-line input: printed as `error: ...` with exit code 2."""


def configs_dir() -> Path:
    return Path(os.environ.get("DIFFLORA_CONFIGS", _REPO_CONFIGS))


def resolve_config_path(name: str) -> Path:
    """A config path, or a preset name under configs/ (``digits`` -> configs/digits.yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    for candidate in (configs_dir() / name, configs_dir() / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    presets = sorted(str(q.relative_to(configs_dir()).with_suffix("")) for q in configs_dir().rglob("*.yaml"))
    raise CLIError(
        f"config {name!r} not found, neither as a file nor as a preset in {configs_dir()}; presets: {', '.join(presets)}"
    )


def _load(args) -> object:
    return load_config(resolve_config_path(args.config), args.set or [])


def _cmd_train(args) -> int:
    from difflora.train import train

    cfg = _load(args)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    last = result["last"]
    acc = result["accounting"]
    print(
        f"trained {result['step']} steps into {out}: loss {last.get('loss', float('nan')):.4f}, "
        f"{acc['train_images_per_s']:.1f} images/s, peak memory {acc['peak_memory_mb']:.0f} MB"
    )
    if result["grid"]:
        print(f"samples: {result['grid']}")
    return 0


def _load_run_model(run_dir: str, weights: str):
    from difflora.model import build_model
    from difflora.train import latest_checkpoint, load_run_config, load_weights

    cfg = load_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    state, meta = load_weights(ckpt, weights)
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CLIError(f"the weights in {ckpt} do not fit the model of {run_dir}/config.json: {exc}") from None
    model.eval()
    return cfg, model, meta


def _cmd_sample(args) -> int:
    from difflora.generate import default_labels, generate
    from difflora.imaging import save_grid
    from difflora.train import resolve_device

    if args.num < 1:
        raise CLIError(f"--num must be at least 1, got {args.num}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    if not args.out.lower().endswith(".png"):
        raise CLIError(f"--out must name a .png file, got {args.out}")
    cfg, model, meta = _load_run_model(args.run_dir, args.weights)
    labels = default_labels(args.num, cfg.model.num_classes, args.cls)
    device = resolve_device(args.device)
    model.to(device)
    images = generate(
        model,
        cfg,
        args.num,
        steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        guidance=args.guidance,
        labels=labels,
        seed=args.seed,
        device=device,
        progress=not args.no_progress,
    )
    nrow = cfg.model.num_classes if (labels is not None and args.cls is None) else None
    path = save_grid(images, args.out, nrow=nrow)
    if args.save_tensor:
        from safetensors.torch import save_file

        save_file(
            {"images": images.contiguous(), **({"labels": labels} if labels is not None else {})}, args.save_tensor
        )
    print(f"wrote {args.num} samples (step {meta['step']}, {args.weights} weights) to {path}")
    return 0


def _cmd_params(args) -> int:
    import torch

    from difflora.accounting import count_parameters
    from difflora.model import build_model

    cfg = _load(args)
    with torch.device("meta"):  # count without allocating or initialising weights
        model = build_model(cfg)
    counts = count_parameters(model)
    if args.json:
        print(json.dumps(counts, indent=2))
        return 0
    print(f"{'total':<28}{counts['total']:>14,}")
    print(f"{'trainable':<28}{counts['trainable']:>14,}")
    print("by group:")
    for k, v in counts["by_group"].items():
        print(f"  {k:<26}{v:>14,}")
    print("by module:")
    for k, v in counts["by_module"].items():
        print(f"  {k:<26}{v:>14,}")
    return 0


def _cmd_plot_weights(args) -> int:
    from difflora.plots import plot_weights

    if args.out is not None and not args.out.lower().endswith(".png"):
        raise CLIError(f"--out must name a .png file, got {args.out}")
    path, layer, matrix = plot_weights(args.run_dir, args.layer, args.out, args.weights, args.adapter)
    print(f"wrote the composition weights of {layer} ({matrix.shape[0]} bases) to {path}")
    return 0


def _cmd_demo(args) -> int:
    from difflora.train import train

    cfg = load_config(resolve_config_path("digits"), args.set or [])
    out = Path(args.out)
    print(
        f"difflora demo: training the digits preset ({cfg.train.steps} steps, batch {cfg.train.batch_size}) into {out}"
    )
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    acc = result["accounting"]
    print(f"done: loss {result['last'].get('loss', float('nan')):.4f}, {acc['train_images_per_s']:.0f} images/s")
    print(f"sample grid (one column per class, EMA weights): {result['grid']}")
    print(f"more samples: difflora sample {out} --num 100 --steps 100 --guidance 2 --out {out}/guided.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="difflora", description="Low-rank conditioning, adaptation and distillation of diffusion models."
    )
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", help="a YAML config or a preset name under configs/ (e.g. digits, tiny-unet)")
        sp.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set train.lr=2e-4 (repeatable)",
        )

    t = sub.add_parser("train", help="train a model from a config")
    with_config(t)
    t.add_argument("--out", help="run directory (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=_cmd_train)

    s = sub.add_parser("sample", help="draw a sample grid from a trained run")
    s.add_argument("run_dir")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sample.steps)")
    s.add_argument("--sampler", choices=["ddpm", "ddim"], default=None)
    s.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    s.add_argument("--class", dest="cls", type=int, default=None, help="sample only this class")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--weights", choices=["ema", "model"], default="ema")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True, help="output PNG")
    s.add_argument("--save-tensor", metavar="FILE.safetensors", help="also save the raw samples")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=_cmd_sample)

    pr = sub.add_parser("params", help="count a config's parameters (total, trainable, by group and module)")
    with_config(pr)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(fn=_cmd_params)

    pw = sub.add_parser("plot-weights", help="heatmap of a run's trained TimeLoRA composition weights (000 Figure 3)")
    pw.add_argument("run_dir")
    pw.add_argument(
        "--layer",
        default=None,
        help="a wrapped layer's path or suffix, or 'all' to average every layer "
        "(default: middle_block.1.qkv in the U-Net, the median block's attn.qkv in a DiT)",
    )
    pw.add_argument("--adapter", default=None, help="adapter name (default: the run's only trainable one)")
    pw.add_argument("--weights", choices=["ema", "model"], default="ema")
    pw.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/weights.png)")
    pw.set_defaults(fn=_cmd_plot_weights)

    d = sub.add_parser("demo", help="train the digits preset on the embedded data and write a sample grid")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.add_argument("--resume", action="store_true")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from difflora.train.checkpoint import CheckpointError
    from difflora.train.loop import TrainingDiverged

    known = (CLIError, ConfigError, CheckpointError, TrainingDiverged, FileNotFoundError, FileExistsError, ValueError)
    try:
        return args.fn(args)
    except known as exc:
        if os.environ.get("DIFFLORA_DEBUG"):
            raise
        # Expected failures (bad input, missing files, divergence) are one clear line, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `difflora params ... | head`: the reader left; that is not an error worth a traceback.
        sys.stderr = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
