"""Evaluation commands: eval (score a run), train-features (the feature network of a dataset)."""

from __future__ import annotations

from pathlib import Path

from difflora.cli.inputs import check_device, refuse_inapplicable, run_config, sample_settings
from difflora.cli.parser import CLIError
from difflora.config.schema import parse_config
from difflora.eval.evaluate import EvalSettings, default_eval_dir, evaluate_run
from difflora.eval.features import FeatureTrainConfig, default_cache_dir, get_feature_net
from difflora.eval.store import INDEX, STORE
from difflora.train.checkpoint import select_checkpoint


def _eval_feature_train(args):
    if args.feature_steps is None:
        return None
    if args.feature_steps < 1:
        raise CLIError(f"--feature-steps must be at least 1, got {args.feature_steps}")
    return FeatureTrainConfig(max_steps=args.feature_steps)


def train_features_command(args) -> int:
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


def eval_command(args) -> int:
    device = check_device(args.device, "--device")
    cfg = run_config(args.run_dir)
    for w in args.guidance or []:
        sample_settings(cfg, guidance=w)
    sample_settings(cfg, steps=args.steps, eta=args.eta, guidance_fraction=args.guidance_fraction)
    unguided = all(w == 1 for w in args.guidance or [cfg.sample.guidance]) and not cfg.distilled
    given_net = "--feature-net is given (no feature network is trained or cached)" if args.feature_net else None
    refuse_inapplicable(
        {
            "--guidance-fraction": (
                args.guidance_fraction,
                "every guidance scale is 1 (no guided steps)" if unguided else None,
            ),
            "--feature-steps": (args.feature_steps, given_net),
        }
    )
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
    # Without --out: kept under its key (difflora.eval.store), a copy as the newest of its kind.
    out = Path(args.out) if args.out else Path(args.run_dir) / STORE / result["key"]
    st = result["settings"]
    print(
        f"evaluated {args.run_dir} (step {result['checkpoint_step']}, {args.weights} weights): {st['num_samples']} samples, "
        f"{st['sampler']} {st['steps']} steps, vs {result['num_real']} held-out images of {result['dataset']}; feature net test accuracy "
        f"{result['feature_net']['test_accuracy']:.4f}"
    )
    print(f"metrics: {out / 'metrics.json'}; grids: {', '.join(str(out / e['grid']) for e in result['results'])}")
    if not args.out:
        newest = default_eval_dir(args.run_dir, args.teacher, args.task, args.against)
        print(f"every evaluation of the run: {Path(args.run_dir) / STORE / INDEX} (the newest of this kind: {newest})")
    return 0
