"""Commands that read configs and runs without training: params, runs, study."""

from __future__ import annotations

import json
import sys

import torch

from difflora.cli.configs import args_config
from difflora.cli.inputs import refuse_inapplicable
from difflora.diffscaler import affiner_counts
from difflora.experiments.runs_table import csv_text, format_table, plot_metric, runs_table, write_csv
from difflora.experiments.study import run_study
from difflora.model.accounting import parameter_counts
from difflora.model.build import build_model


def params_command(args) -> int:

    cfg = args_config(args)
    with torch.device("meta"):  # count without allocating or initialising weights
        model = build_model(cfg)
    counts = parameter_counts(model)
    if cfg.model.affiner is not None:
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


def runs_command(args) -> int:
    refuse_inapplicable({"--metric": (args.metric, None if args.plot else "it picks the score --plot draws")})
    columns, rows = runs_table(args.dir, sort=args.sort, log=lambda m: print(m, file=sys.stderr))
    # Drawn first: a bad --metric is refused before any output.
    plot = plot_metric(columns, rows, args.metric, args.plot) if args.plot else None
    print(csv_text(columns, rows), end="") if args.format == "csv" else print(format_table(columns, rows))
    if args.csv:
        print(f"csv: {write_csv(columns, rows, args.csv)}", file=sys.stderr)
    if plot is not None:
        print(f"plot: {plot}", file=sys.stderr)
    return 0


def study_command(args) -> int:
    plan = "--plan writes nothing" if args.plan else None
    refuse_inapplicable({"--report-only": (args.report_only, plan), "--allow-dirty": (args.allow_dirty, plan)})
    report = run_study(
        args.study,
        out=args.out,
        report_dir=args.report_dir,
        overrides=args.set,
        progress=not args.no_progress,
        only=args.only,
        report_only=args.report_only,
        allow_dirty=args.allow_dirty,
        plan_only=args.plan,
        announce=print,
    )
    if not args.plan:
        print(f"report: {report}")
    return 0
