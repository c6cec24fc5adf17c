"""The papers' own commands: distill (003), combine-tasks (002), sweep and anova (004), plot-weights (000).

The logic lives in each paper's package; these handlers parse and print."""

from __future__ import annotations

from difflora.cli.inputs import check_device, run_config
from difflora.cli.parser import CLIError
from difflora.design_space.anova import run_anova
from difflora.design_space.sweep import run_sweep
from difflora.diffscaler.combine_tasks import combine_task_runs
from difflora.distill.command import distill_out_dir, run_distill
from difflora.distill.objective import distill_config
from difflora.timelora.plots import plot_weights


def distill_command(args) -> int:
    cfg = distill_config(args.teacher_run, args.guidance, args.guidance_range, args.set or [])
    check_device(cfg.train.device, "train.device")
    out = distill_out_dir(args.teacher_run, args.out)
    print(run_distill(cfg, args.teacher_run, out, resume=args.resume, progress=not args.no_progress))
    return 0


def combine_tasks_command(args) -> int:
    out = combine_task_runs(args.runs, args.out)
    print(f"sample: difflora sample {out} --condition task=0; score: difflora eval {out} --task K")
    return 0


def sweep_command(args) -> int:
    table = run_sweep(args.sweep, out=args.out, progress=not args.no_progress, plan_only=args.plan)
    if not args.plan:
        print(f"results: {table}")
    return 0


def anova_command(args) -> int:
    lines = run_anova(
        args.results, args.metric or ["fd"], out=args.out, guidance=args.guidance, interactions=args.interactions
    )
    for line in lines:
        print(line)
    return 0


def plot_weights_command(args) -> int:
    if args.out is not None and not args.out.lower().endswith(".png"):
        raise CLIError(f"--out must name a .png file, got {args.out}")
    run_config(args.run_dir)
    path, layer, matrix = plot_weights(args.run_dir, args.layer, args.out, args.weights, args.adapter)
    print(f"wrote the composition weights of {layer} ({matrix.shape[0]} bases) to {path}")
    return 0
