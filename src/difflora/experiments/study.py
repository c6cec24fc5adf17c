"""A study: several arms (configs) x several seeds, each trained and evaluated, summarised in a markdown report.

A study YAML (typed below; an unknown key is an error naming the valid ones)::

    name: study-timelora-digits          # report file name: <out>/<name>.md and images in <out>/<name>/
    out: runs/study-digits               # default output directory (--out overrides)
    base: {data: ..., model: ..., ...}   # a difflora config tree shared by every arm
    seeds: [0, 1, 2]                      # train.seed of each run
    eval: {num_samples: 500, steps: 50, sampler: ddim, guidance: [1, 2, 4], seed: 0}
    arms:
      - name: time-embed
        group: unconditional
        set: {model.num_classes: 0}      # dotted overrides of the base
      - name: timelora-linear
        set: {model.time_embed: false}
        adapters: [{name: time, condition: t, weighting: linear, num_values: 1000, num_bases: 11}]
    claims:                               # optional: statements the report checks on FD
      - text: TimeLoRA is competitive with the time embedding
        arm: timelora-linear
        baseline: time-embed
        relation: not_worse               # or better

Runs go to ``<out>/<arm>/seed<k>/`` (a normal run directory plus ``eval/metrics.json``). A run whose
final checkpoint and metrics (with the study's eval settings) exist is reused, one with an earlier
checkpoint is resumed, so an interrupted study continues where it stopped. Unconditional arms are
evaluated at guidance 1 only; class-conditional ones at every ``eval.guidance`` scale.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from difflora.config import Config, ConfigError, config_to_dict, parse_config

__all__ = [
    "Claim",
    "Study",
    "StudyArm",
    "StudyError",
    "StudyEval",
    "arm_config",
    "load_study",
    "run_study",
    "summarise",
    "write_report",
]


class StudyError(ValueError):
    """A study YAML is invalid, or an existing run does not belong to this study."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudyEval(_Strict):
    """How every run is evaluated (see ``difflora.eval.evaluate.evaluate_run``)."""

    num_samples: int = Field(default=500, ge=4)
    steps: int = Field(default=50, ge=1)
    sampler: Literal["ddpm", "ddim"] = "ddim"
    eta: float = Field(default=0.0, ge=0)
    # Classifier-free guidance scales of class-conditional arms (unconditional arms: 1 only).
    guidance: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    seed: int = 0
    weights: Literal["ema", "model"] = "ema"
    # Optimizer steps of the feature network if it must be trained (None: its default).
    feature_steps: int | None = Field(default=None, ge=1)


class StudyArm(_Strict):
    # A directory name: letters, digits and _ . - + only.
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    group: str = ""
    description: str = ""
    # Dotted overrides of the base config, e.g. {model.time_embed: false}.
    set: dict[str, Any] = Field(default_factory=dict)
    # Replaces the base's model.adapters when given (a list of AdapterConfig trees).
    adapters: list[dict[str, Any]] | None = None


class Claim(_Strict):
    """A statement about FD the report checks: ``arm`` is better than / not worse than ``baseline``."""

    text: str
    arm: str
    baseline: str
    relation: Literal["better", "not_worse"] = "better"


class Study(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    out: str | None = None
    # torch threads for training and sampling (None: torch's default).
    threads: int | None = Field(default=None, ge=1)
    base: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    eval: StudyEval = Field(default_factory=StudyEval)
    arms: list[StudyArm] = Field(min_length=1)
    claims: list[Claim] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Study:
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arms: duplicate arm names {dup}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: duplicates in {self.seeds}")
        for c in self.claims:
            for which in (c.arm, c.baseline):
                if which not in names:
                    raise ValueError(f"claims: arm {which!r} of claim {c.text!r} is not an arm; arms: {names}")
        return self


def _explain(err: ValidationError, source: str) -> StudyError:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {e['msg']}, got {e.get('input')!r}")
    valid = "top level: " + ", ".join(Study.model_fields) + "; arms[]: " + ", ".join(StudyArm.model_fields)
    valid += "; eval: " + ", ".join(StudyEval.model_fields)
    return StudyError(f"invalid study {source}:\n  " + "\n  ".join(lines) + f"\n  (valid keys: {valid})")


def load_study(path: str | Path) -> Study:
    """Read and validate a study YAML, including every arm's config (so a bad key fails before training)."""
    p = Path(path)
    if not p.is_file():
        raise StudyError(f"study file {p} does not exist (e.g. experiments/timelora/digits.yaml)")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StudyError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise StudyError(f"{p}: a study is a mapping (name, base, seeds, eval, arms, ...)")
    try:
        study = Study.model_validate(tree)
    except ValidationError as err:
        raise _explain(err, str(p)) from None
    for arm in study.arms:
        arm_config(study, arm, study.seeds[0])
    return study


def arm_config(study: Study, arm: StudyArm, seed: int) -> Config:
    """The resolved difflora config of one run: base + the arm's adapters and overrides + train.seed."""
    tree = copy.deepcopy(study.base)
    if arm.adapters is not None:
        tree.setdefault("model", {})["adapters"] = copy.deepcopy(arm.adapters)
    overrides = [f"{k}={json.dumps(v)}" for k, v in arm.set.items()] + [f"train.seed={seed}"]
    try:
        return parse_config(tree, overrides)
    except ConfigError as exc:
        raise StudyError(f"arm {arm.name!r}: {exc}") from None


def _git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        rev = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def _guidance_for(study: Study, cfg: Config) -> list[float]:
    return [float(w) for w in study.eval.guidance] if cfg.model.num_classes else [1.0]


def _eval_settings(study: Study, cfg: Config) -> dict[str, Any]:
    e = study.eval
    return {
        "num_samples": e.num_samples,
        "steps": e.steps,
        "sampler": e.sampler,
        "eta": e.eta,
        "guidance": _guidance_for(study, cfg),
        "seed": e.seed,
    }


def _run_state(run_dir: Path, cfg: Config, settings: dict[str, Any]) -> str:
    """'done' (final checkpoint + matching metrics), 'trained', 'partial' or 'new'."""
    from difflora.train.checkpoint import find_checkpoints

    saved = run_dir / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != config_to_dict(cfg):
        raise StudyError(
            f"{run_dir} holds a run with another config than this study's arm; "
            "delete it or choose another --out (a study never overwrites a run it did not make)"
        )
    ckpts = find_checkpoints(run_dir)
    if not ckpts:
        return "new"
    if int(ckpts[-1].name.split("_")[-1]) < cfg.train.steps:
        return "partial"
    metrics = run_dir / "eval" / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        if {k: m["settings"].get(k) for k in settings} == settings and m["checkpoint_step"] == cfg.train.steps:
            return "done"
    return "trained"


def run_study(
    path: str | Path,
    *,
    out: str | Path | None = None,
    only: list[str] | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train and evaluate every (arm, seed) of a study not already done, then write the report; returns its path."""
    from difflora.eval.evaluate import evaluate_run
    from difflora.eval.features import FeatureTrainConfig
    from difflora.train import train

    study = load_study(path)
    out_dir = Path(out or study.out or Path("runs") / study.name)
    arms = study.arms
    if only:
        unknown = sorted(set(only) - {a.name for a in arms})
        if unknown:
            raise StudyError(f"--only: unknown arms {unknown}; arms: {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in only]
    if study.threads:
        torch.set_num_threads(study.threads)
    feature_train = FeatureTrainConfig(max_steps=study.eval.feature_steps) if study.eval.feature_steps else None
    runs = [(arm, seed) for arm in arms for seed in study.seeds]
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    bar = tqdm(runs, desc="study", unit="run", disable=not progress, dynamic_ncols=True)
    for arm, seed in bar:
        bar.set_postfix_str(f"{arm.name} seed {seed}")
        cfg = arm_config(study, arm, seed)
        run_dir = out_dir / arm.name / f"seed{seed}"
        settings = _eval_settings(study, cfg)
        state = _run_state(run_dir, cfg, settings)
        if state == "done":
            log(f"[{arm.name} seed {seed}] done already: reusing {run_dir}")
            continue
        t0 = time.perf_counter()
        if state in ("new", "partial"):
            train(cfg, run_dir, resume=state == "partial", progress=False, log=log)
        t1 = time.perf_counter()
        ev = evaluate_run(
            run_dir,
            num_samples=settings["num_samples"],
            steps=settings["steps"],
            sampler=settings["sampler"],
            eta=settings["eta"],
            guidance=settings["guidance"],
            seed=settings["seed"],
            weights=study.eval.weights,
            cache_dir=cache_dir,
            feature_train=feature_train,
        )
        fds = ", ".join(f"w={r['guidance']:g}: {r['fd']:.3f}" for r in ev["results"])
        log(
            f"[{arm.name} seed {seed}] train {t1 - t0:.0f} s, eval {time.perf_counter() - t1:.0f} s; FD {fds}",
        )
    bar.close()
    report = write_report(study, out_dir, command=command or _default_command(path, out), arms=arms)
    log(f"study {study.name}: {len(runs)} runs in {out_dir} ({time.time() - started:.0f} s this call); report {report}")
    return report


def _default_command(path: str | Path, out: str | Path | None) -> str:
    return f"difflora study {path}" + (f" --out {out}" if out else "")


# ----------------------------------------------------------------------------- summary and report


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    t = torch.tensor(vals, dtype=torch.float64)
    # Sample standard deviation over seeds (0 for a single seed).
    return float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0


def summarise(study: Study, out_dir: Path, arms: list[StudyArm] | None = None) -> list[dict[str, Any]]:
    """One row per (arm, guidance scale): metrics as (mean, std) over the seeds that have results."""
    rows = []
    for arm in arms or study.arms:
        per_seed = []
        for seed in study.seeds:
            run_dir = out_dir / arm.name / f"seed{seed}"
            mpath = run_dir / "eval" / "metrics.json"
            if not mpath.is_file():
                continue
            acc_path = run_dir / "accounting.json"
            per_seed.append((seed, json.loads(mpath.read_text()), json.loads(acc_path.read_text())))
        if not per_seed:
            continue
        acc0 = per_seed[0][2]
        params = acc0["parameters"]
        scales = [r["guidance"] for r in per_seed[0][1]["results"]]
        for i, w in enumerate(scales):
            entries = [m["results"][i] for _, m, _ in per_seed if i < len(m["results"])]
            row: dict[str, Any] = {
                "arm": arm.name,
                "group": arm.group,
                "guidance": w,
                "seeds": [s for s, _, _ in per_seed],
                "params_total": params["total"],
                "params_trainable": params["trainable"],
                "params_by_group": params["by_group"],
                "train_images_per_s": _mean_std([a["train_images_per_s"] for _, _, a in per_seed]),
                "sample_images_per_s": _mean_std([e["sample_images_per_s"] for e in entries]),
                "grid": str(Path(arm.name) / f"seed{per_seed[0][0]}" / "eval" / entries[0]["grid"]),
            }
            for key in ("fd", "kid_mean", "precision", "recall", "class_accuracy"):
                vals = [e.get(key) for e in entries]
                row[key] = _mean_std(vals) if any(v is not None for v in vals) else None
            rows.append(row)
    return rows


def _pm(ms: tuple[float, float] | None, digits: int = 2) -> str:
    if ms is None or not math.isfinite(ms[0]):
        return "-"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _best_row(rows: list[dict[str, Any]], arm: str) -> dict[str, Any] | None:
    cands = [r for r in rows if r["arm"] == arm and r["fd"] is not None]
    return min(cands, key=lambda r: r["fd"][0]) if cands else None


def _verdict(claim: Claim, rows: list[dict[str, Any]]) -> tuple[str, str]:
    a, b = _best_row(rows, claim.arm), _best_row(rows, claim.baseline)
    if a is None or b is None:
        return "not run", "one of the arms has no results"
    (ma, sa), (mb, sb) = a["fd"], b["fd"]
    # Two standard errors of the difference of the seed means: the noise band of the comparison.
    band = 2 * math.sqrt(sa**2 / len(a["seeds"]) + sb**2 / len(b["seeds"]))
    diff = ma - mb
    where = f"FD {ma:.2f} (w={a['guidance']:g}) vs {mb:.2f} (w={b['guidance']:g}), difference {diff:+.2f}, noise band ±{band:.2f}"
    if claim.relation == "better":
        verdict = "holds" if diff < -band else ("does not hold" if diff > band else "within noise (not shown)")
    else:
        verdict = "holds" if diff <= band else "does not hold"
    return verdict, where


def _copy(src: Path, dst: Path) -> str | None:
    if not src.is_file():
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst.name


def _weight_plots(
    study: Study, out_dir: Path, img_dir: Path, arms: list[StudyArm]
) -> tuple[list[tuple[str, str]], str]:
    """Trained-weighting heatmaps (000 Figure 3) of each trainable arm's first seed, if difflora.plots exists."""
    try:
        from difflora.plots import plot_weights
    except ImportError:
        return [], "difflora.plots is not available in this revision: no weight plots."
    plots, notes = [], []
    for arm in arms:
        cfg = arm_config(study, arm, study.seeds[0])
        if not any(a.weighting == "trainable" and a.condition == "t" for a in cfg.model.adapters):
            continue
        run_dir = out_dir / arm.name / f"seed{study.seeds[0]}"
        if not (run_dir / "checkpoints").is_dir():
            continue
        name = [a.name for a in cfg.model.adapters if a.weighting == "trainable" and a.condition == "t"][0]
        try:
            path, layer, _ = plot_weights(run_dir, None, str(img_dir / f"weights-{arm.name}.png"), "ema", name)
            plots.append((arm.name, f"{Path(path).name}|{layer}"))
        except Exception as exc:  # a plot is a figure, not a result: report the failure, keep the report
            notes.append(f"{arm.name}: {exc}")
    return plots, ("; ".join(notes) if notes else "")


def write_report(study: Study, out_dir: str | Path, *, command: str = "", arms: list[StudyArm] | None = None) -> Path:
    """Write ``<out>/<name>.md`` (table, grids, weight plots, claim checks) and ``<out>/<name>/`` images."""
    out_dir = Path(out_dir)
    arms = arms or study.arms
    rows = summarise(study, out_dir, arms)
    img_dir = out_dir / study.name
    img_dir.mkdir(parents=True, exist_ok=True)
    e = study.eval
    base = arm_config(study, arms[0], study.seeds[0])
    n_done = sum(len(seeds) for seeds in {r["arm"]: r["seeds"] for r in rows}.values())
    # Parameters relative to the first arm of the same group (its baseline, by the study's order).
    group_base: dict[str, int] = {}
    for r in rows:
        group_base.setdefault(r["group"], r["params_total"])
    lines = [f"# {study.name}", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [
        f"- command: `{command}`" if command else "- command: (library call)",
        f"- git revision: `{_git_revision()}`",
        f"- arms: {len(arms)}, seeds: {study.seeds}; runs with results: {n_done} of {len(arms) * len(study.seeds)}",
        f"- data: {base.data.name} at {base.model.image_size} px; backbone {base.model.arch}, "
        f"{base.train.steps} training steps at batch {base.train.batch_size} per run",
        f"- eval: {e.num_samples} samples per setting, {e.sampler} {e.steps} steps, EMA weights: {e.weights}, "
        f"guidance {e.guidance} for class-conditional arms, balanced labels; against the held-out test split",
        f"- torch threads: {torch.get_num_threads()}, python {sys.version.split()[0]}, torch {torch.__version__}",
        "",
        "FD is the Frechet distance in the feature space of a classifier difflora trains on the dataset's "
        "train split (not Inception FID; comparable only within this table). Mean ± sample std over seeds. "
        "Speeds (images/s) are measured during the study's own runs: on a machine shared with other work "
        "they carry its load, so compare them across arms with care.",
        "",
        "| group | arm | w | FD | KID x1e3 | precision | recall | class acc. | params (total / trainable) "
        "| vs group baseline | adapter params | train img/s | sample img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r["params_by_group"]
        kid = (r["kid_mean"][0] * 1e3, r["kid_mean"][1] * 1e3) if r["kid_mean"] else None
        lines.append(
            f"| {r['group']} | {r['arm']} | {r['guidance']:g} | {_pm(r['fd'])} | {_pm(kid)} | {_pm(r['precision'])} "
            f"| {_pm(r['recall'])} | {_pm(r['class_accuracy'])} | {r['params_total']:,} / {r['params_trainable']:,} "
            f"| {100 * r['params_total'] / group_base[r['group']]:.1f}% "
            f"| {g.get('lora', 0) + g.get('weighting', 0):,} | {_pm(r['train_images_per_s'], 0)} "
            f"| {_pm(r['sample_images_per_s'], 0)} |"
        )
    if study.claims:
        lines += ["", "## Claims checked on FD", ""]
        lines += [
            "Each arm at its best guidance scale; 'holds' for *better* needs the FD difference beyond two standard "
            "errors of the seed means; *not worse* holds unless the arm is worse by more than that.",
            "",
            "| claim | verdict | numbers |",
            "|---|---|---|",
        ]
        for c in study.claims:
            verdict, where = _verdict(c, rows)
            lines.append(
                f"| {c.text} ({c.arm} {c.relation.replace('_', ' ')} than {c.baseline}) | {verdict} | {where} |"
            )
    lines += ["", "## Samples", "", "First seed of each arm, the first 100 samples of its evaluation.", ""]
    for r in rows:
        name = f"samples-{r['arm']}-w{r['guidance']:g}.png"
        if _copy(out_dir / r["grid"], img_dir / name):
            lines += [
                f"**{r['arm']}**, guidance {r['guidance']:g}",
                "",
                f"![{r['arm']} w={r['guidance']:g}]({study.name}/{name})",
                "",
            ]
    plots, note = _weight_plots(study, out_dir, img_dir, arms)
    if plots or note:
        lines += ["## Trained TimeLoRA weights (000 Figure 3)", ""]
        for arm_name, spec in plots:
            fname, layer = spec.split("|", 1)
            lines += [f"**{arm_name}** ({layer})", "", f"![weights {arm_name}]({study.name}/{fname})", ""]
        if note:
            lines += [note, ""]
    path = out_dir / f"{study.name}.md"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / f"{study.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return path
