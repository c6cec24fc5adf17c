"""The ``difflora`` command line: thin wrappers over the library (see README.md for examples)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from difflora.cli.inputs import (
    CLIError,
    check_device,
    one_line,
    parse_conditions,
    run_config,
    sample_settings,
    spatial_inputs,
)
from difflora.config.schema import ConfigError, load_config

__all__ = ["CLIError", "main", "resolve_config_path"]


def resolve_config_path(name: str) -> Path:
    """A config path, or a preset name (``digits`` -> the shipped configs/digits.yaml): :mod:`difflora.presets`."""
    from difflora.presets import config_presets, resolve_config

    p = resolve_config(name)
    if p is None:
        raise CLIError(
            f"config {name!r} not found, neither as a file nor as a shipped preset; presets: {', '.join(config_presets())}"
        )
    return p


def _load(args) -> object:
    return load_config(resolve_config_path(args.config), args.set or [])


def _cmd_train(args) -> int:
    from difflora.train import train

    cfg = _load(args)
    check_device(cfg.train.device, "train.device")
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    checkpoint = None
    if args.checkpoint is not None:
        from difflora.train.checkpoint import select_checkpoint

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


def _cmd_distill(args) -> int:
    from difflora.distill.command import distill_out_dir, run_distill
    from difflora.distill.objective import distill_config

    cfg = distill_config(args.teacher_run, args.guidance, args.guidance_range, args.set or [])
    check_device(cfg.train.device, "train.device")
    out = distill_out_dir(args.teacher_run, args.out)
    print(run_distill(cfg, args.teacher_run, out, resume=args.resume, progress=not args.no_progress))
    return 0


def _open_run(run_dir: str, weights: str, checkpoint: str | None = None):
    from difflora.train.run_loader import open_run

    run_config(run_dir)  # a missing or damaged config.json: the CLI's one-line errors
    return open_run(run_dir, weights, checkpoint)


def _check_outputs(args) -> None:
    if not args.out.lower().endswith(".png"):
        raise CLIError(f"--out must name a .png file, got {args.out}")
    if Path(args.out).is_dir():
        raise CLIError(f"--out {args.out} is a directory; name a .png file")
    if args.save_tensor is not None and not args.save_tensor.endswith(".safetensors"):
        raise CLIError(f"--save-tensor must name a .safetensors file, got {args.save_tensor}")


def _cmd_sample(args) -> int:
    from difflora.distill.command import sampling_guidance, without_student
    from difflora.files.images import save_grid
    from difflora.sampling.generate import default_labels, generate

    _check_outputs(args)
    device = check_device(args.device, "--device")
    cfg, model, meta = _open_run(args.run_dir, args.weights, args.checkpoint)
    s = sample_settings(
        cfg,
        num=args.num,
        steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        guidance=args.guidance,
        guidance_fraction=args.guidance_fraction,
    )
    spatial = None
    if cfg.data.spatial is not None:  # spatial tasks: --condition task=K picks the condition images
        conditions, spatial = spatial_inputs(args.condition, args.num, cfg, args.condition_images)
    else:
        conditions = parse_conditions(args.condition, args.num, without_student(cfg))
    labels = default_labels(cfg, args.num, args.cls)
    if args.teacher and not cfg.distilled:
        raise CLIError(f"--teacher samples the guided teacher of a distilled run; {args.run_dir} is not one")
    if cfg.distilled:
        w = sampling_guidance(model, cfg, args.guidance, args.guidance_fraction, args.teacher)
        s = s.model_copy(update={"guidance": w})
    model.to(device)
    images = generate(
        model,
        cfg,
        s,
        labels=labels,
        conditions=conditions,
        spatial=spatial,
        seed=args.seed,
        device=device,
        progress=not args.no_progress,
        teacher=args.teacher,
    )
    nrow = cfg.model.num_classes if (labels is not None and args.cls is None) else None
    path = save_grid(images, args.out, nrow=nrow)
    if args.save_tensor:
        from difflora.files.tensorfile import save_tensors

        tmp = Path(args.save_tensor + ".tmp")
        tensors = {"images": images.contiguous(), **({"labels": labels} if labels is not None else {})}
        tensors |= {"spatial": spatial.contiguous()} if spatial is not None else {}
        save_tensors(tensors, tmp)
        os.replace(tmp, args.save_tensor)  # never a half-written file under the name asked for
    print(f"wrote {args.num} samples (step {meta['step']}, {args.weights} weights) to {path}")
    return 0


def _cmd_params(args) -> int:
    import torch

    from difflora.model.accounting import parameter_counts
    from difflora.model.build import build_model

    cfg = _load(args)
    with torch.device("meta"):  # count without allocating or initialising weights
        model = build_model(cfg)
    counts = parameter_counts(model)
    if cfg.model.affiner is not None:
        from difflora.diffscaler import affiner_counts

        counts["affiner"] = affiner_counts(model.net)
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
    task = counts["per_task"]
    print(
        f"{'stored per task':<28}{task['stored_per_task']:>14,}  (task entry {task['task_entry']:,} + shared trainable {task['shared_trainable']:,})"
    )
    if "affiner" in counts:
        aff = counts["affiner"]
        print(f"affiner per task ({aff['tasks']} tasks, {aff['layers']} layers):")
        for k, v in {**aff["per_task"], "total": aff["total_per_task"]}.items():
            print(f"  {k:<26}{v:>14,}")
    return 0


def _cmd_pretrain(args) -> int:
    from difflora.experiments.pretrain import pretrain

    cfg = load_config(resolve_config_path(f"pretrain/{args.name}"), args.set or [])
    check_device(cfg.train.device, "train.device")
    path = pretrain(args.name, cfg, progress=not args.no_progress)
    print(path)
    return 0


def _cmd_plot_weights(args) -> int:
    from difflora.timelora.plots import plot_weights

    if args.out is not None and not args.out.lower().endswith(".png"):
        raise CLIError(f"--out must name a .png file, got {args.out}")
    run_config(args.run_dir)
    path, layer, matrix = plot_weights(args.run_dir, args.layer, args.out, args.weights, args.adapter)
    print(f"wrote the composition weights of {layer} ({matrix.shape[0]} bases) to {path}")
    return 0


def _eval_feature_train(args):
    from difflora.eval.features import FeatureTrainConfig

    if args.feature_steps is None:
        return None
    if args.feature_steps < 1:
        raise CLIError(f"--feature-steps must be at least 1, got {args.feature_steps}")
    return FeatureTrainConfig(max_steps=args.feature_steps)


def _cmd_train_features(args) -> int:
    from difflora.config.schema import parse_config
    from difflora.eval.features import default_cache_dir, get_feature_net

    overrides = list(args.set or [])
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise CLIError(f"train-features takes only data.* overrides (e.g. data.image_size=16), got {', '.join(bad)}")
    cfg = parse_config({"data": {"name": args.dataset}}, overrides)
    cache = args.cache_dir or default_cache_dir()
    net = get_feature_net(
        cfg.data,
        cache,
        train=_eval_feature_train(args),
        device=check_device(args.device, "--device"),
        progress=not args.no_progress,
    )
    info = net.info
    print(
        f"feature network for {info.describe()}: test accuracy {info.test_accuracy:.4f} "
        f"({info.arch.feature_dim}-d features; cached in {cache})"
    )
    return 0


def _cmd_eval(args) -> int:
    from difflora.eval.evaluate import EvalSettings, default_eval_dir, evaluate_run
    from difflora.train.checkpoint import select_checkpoint

    device = check_device(args.device, "--device")
    cfg = run_config(args.run_dir)
    for w in args.guidance or []:
        sample_settings(cfg, guidance=w)
    sample_settings(cfg, steps=args.steps, eta=args.eta, guidance_fraction=args.guidance_fraction)
    # Picked (and a damaged newest one reported) here, before any feature net or sampling work.
    checkpoint = select_checkpoint(args.run_dir, args.checkpoint)
    settings = EvalSettings(
        num_samples=args.num_samples,
        steps=args.steps,
        sampler=args.sampler,
        eta=args.eta,
        guidance=args.guidance,
        guidance_fraction=args.guidance_fraction,
        seed=args.seed,
        weights=args.weights,
        checkpoint=checkpoint,
        teacher=args.teacher,
        task=args.task,
        against=args.against,
    )
    result = evaluate_run(
        args.run_dir,
        settings,
        out=args.out,
        feature_net=args.feature_net,
        cache_dir=args.cache_dir,
        feature_train=_eval_feature_train(args),
        device=device,
        progress=not args.no_progress,
        log=print,
    )
    out = Path(args.out) if args.out else default_eval_dir(args.run_dir, args.teacher, args.task, args.against)
    st = result["settings"]
    print(
        f"evaluated {args.run_dir} (step {result['checkpoint_step']}, {args.weights} weights): {st['num_samples']} samples, "
        f"{st['sampler']} {st['steps']} steps, vs {result['num_real']} held-out images of {result['dataset']}; feature net test accuracy "
        f"{result['feature_net']['test_accuracy']:.4f}"
    )
    print(f"metrics: {out / 'metrics.json'}; grids: {', '.join(str(out / e['grid']) for e in result['results'])}")
    return 0


def _cmd_study(args) -> int:
    from difflora.experiments.study import run_study

    report = run_study(
        args.study,
        out=args.out,
        progress=not args.no_progress,
        only=args.only,
        report_only=args.report_only,
        allow_dirty=args.allow_dirty,
        plan_only=args.plan,
    )
    if not args.plan:
        print(f"report: {report}")
    return 0


def _cmd_sweep(args) -> int:
    from difflora.design_space.sweep import run_sweep

    table = run_sweep(args.sweep, out=args.out, progress=not args.no_progress, plan_only=args.plan)
    if not args.plan:
        print(f"results: {table}")
    return 0


def _cmd_anova(args) -> int:
    from difflora.design_space.anova import run_anova

    lines = run_anova(
        args.results, args.metric or ["fd"], out=args.out, guidance=args.guidance, interactions=args.interactions
    )
    for line in lines:
        print(line)
    return 0


def _cmd_runs(args) -> int:
    from difflora.experiments.runs_table import csv_text, format_table, runs_table, write_csv

    columns, rows = runs_table(args.dir, sort=args.sort, log=lambda m: print(m, file=sys.stderr))
    print(csv_text(columns, rows), end="") if args.format == "csv" else print(format_table(columns, rows))
    if args.csv:
        print(f"csv: {write_csv(columns, rows, args.csv)}", file=sys.stderr)
    return 0


def _cmd_demo(args) -> int:
    from difflora.train import train

    cfg = load_config(resolve_config_path("digits"), args.set or [])
    check_device(cfg.train.device, "train.device")
    out = Path(args.out)
    print(
        f"difflora demo: training the digits preset ({cfg.train.steps} steps, batch {cfg.train.batch_size}) into {out}"
    )
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    acc = result["accounting"]
    print(f"done: loss {result['last'].get('loss', float('nan')):.4f}, {acc['train_images_per_s']:.0f} images/s")
    print(f"sample grid (one column per class, EMA weights): {result['grid']}")
    from difflora.eval.evaluate import EvalSettings, evaluate_run

    # Score what was trained: FD against the 359 held-out digits in the feature space of a small
    # classifier difflora trains on the train split (cached after the first demo, ~10 s).
    n = args.eval_samples
    if n > 0:
        print(f"evaluating {n} samples ({cfg.sample.sampler}, {cfg.sample.steps} steps) against the held-out digits")
        ev = evaluate_run(out, EvalSettings(num_samples=n), out=out / "eval", progress=not args.no_progress)
        r = ev["results"][0]
        acc = f", class accuracy {r['class_accuracy']:.3f}" if "class_accuracy" in r else ""
        print(
            f"FD {r['fd']:.3f} (classifier feature space, not Inception FID), KID {r['kid_mean']:.4f}, "
            f"precision {r['precision']:.3f}, recall {r['recall']:.3f}{acc}; "
            f"feature net test accuracy {ev['feature_net']['test_accuracy']:.3f}; {out / 'eval' / 'metrics.json'}"
        )
    print(f"more samples: difflora sample {out} --num 100 --steps 100 --guidance 2 --out {out}/guided.png")
    return 0


def _cmd_export_peft(args) -> int:
    from difflora.adapters.peft_format import export_peft

    cfg, model, _ = _open_run(args.run_dir, args.weights, args.checkpoint)
    # peft wraps the backbone: the diffusers model itself for model.arch=diffusers.
    root = model.net.model if cfg.model.arch == "diffusers" else model.net
    out = export_peft(root, args.out_dir, args.adapter)
    base = f"the diffusers {cfg.model.diffusers.class_name}" if cfg.model.arch == "diffusers" else "the run's net"
    print(f"wrote a peft LoRA to {out} (adapter_config.json, adapter_model.safetensors); load it onto {base}")
    return 0


def _cmd_combine_tasks(args) -> int:
    from difflora.diffscaler.combine_tasks import combine_task_runs

    out = combine_task_runs(args.runs, args.out)
    print(f"sample: difflora sample {out} --condition task=0; score: difflora eval {out} --task K")
    return 0


# Command name -> handler; the parser's grammar lives in difflora.cli.parser.
HANDLERS = {
    "train": _cmd_train,
    "sample": _cmd_sample,
    "distill": _cmd_distill,
    "params": _cmd_params,
    "pretrain": _cmd_pretrain,
    "plot_weights": _cmd_plot_weights,
    "train_features": _cmd_train_features,
    "eval": _cmd_eval,
    "study": _cmd_study,
    "sweep": _cmd_sweep,
    "anova": _cmd_anova,
    "runs": _cmd_runs,
    "demo": _cmd_demo,
    "export_peft": _cmd_export_peft,
    "combine_tasks": _cmd_combine_tasks,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``difflora`` parser (flags in ``difflora.cli.parser``), dispatching to the handlers above."""
    from difflora.cli.parser import build_parser as grammar

    return grammar(HANDLERS)


def _warn_line(message, category, filename, lineno, file=None, line=None) -> None:
    # A warning a user should act on (a skipped damaged checkpoint) is one line, like an error.
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from difflora.adapters.context import MissingConditionError
    from difflora.train.checkpoint import CheckpointError
    from difflora.train.loop import TrainingDiverged

    # Expected failures are one clear line, not a traceback: bad input (ValueError covers config,
    # data-format, adapter, eval and non-finite-sample errors), missing or unreadable files
    # (OSError), damaged checkpoints, divergence. Anything else is a bug and keeps its traceback.
    known = (CLIError, ConfigError, CheckpointError, TrainingDiverged, OSError, ValueError, MissingConditionError)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn_line
            args = build_parser().parse_args(argv)
            return args.fn(args)
    except KeyboardInterrupt:
        # Ctrl-C is the user's choice, not a crash: one line and the shell's code for SIGINT. Every
        # file difflora writes is replaced atomically, so nothing half-written is left behind.
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `difflora params ... | head`: the reader left; that is not an error worth a traceback.
        sys.stderr = open(os.devnull, "w")
        return 0
    except known as exc:
        if os.environ.get("DIFFLORA_DEBUG"):
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
