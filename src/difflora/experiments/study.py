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
evaluated at guidance 1 only; class-conditional ones at every ``eval.guidance`` scale; distilled
students (``train.objective: distill``) at the scales they can sample: a fixed-w student at its w,
a guidance-scale LoRA at the ``eval.guidance`` scales inside its range.

An arm can start from another arm's runs (adaptation, distillation): ``train.init_from: arm:NAME``
(in the arm's ``set`` or in the base) is the run of arm NAME with the same seed,
``<out>/NAME/seed<k>``. Such dependencies are trained first (also when ``--only`` leaves them out);
an unknown arm or a cycle is an error before any work::

    arms:
      - name: teacher
        set: {model.num_classes: 10}
      - name: student-w3
        set: {model.num_classes: 10, train.objective: distill, train.train_base: false,
              train.init_from: "arm:teacher", distill.guidance: 3}
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from difflora.config import Config, ConfigError, config_to_dict, parse_config
from difflora.eval.evaluate import METRICS_VERSION
from difflora.jsonfile import read_json_file
from difflora.presets import experiment_presets, resolve_shipped

__all__ = [
    "ARM_PREFIX",
    "Claim",
    "Study",
    "StudyArm",
    "StudyError",
    "StudyEval",
    "arm_config",
    "arm_dependency",
    "eval_settings",
    "git_state",
    "load_study",
    "run_order",
    "run_study",
    "study_out_dir",
]


def read_run_json(path: Path) -> dict[str, Any]:
    """A JSON object a study's run wrote (config.json, accounting.json, eval/metrics.json); a damaged
    one is a :class:`StudyError` that names it and says how to rebuild it."""
    return read_json_file(
        path, fix="delete that run directory to make the study run it again", error=StudyError, expect=dict
    )


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
    # Trains nothing: scores the guided teacher held in the run of arm NAME (a LoRA-distilled
    # student) of the same seed, at every eval.guidance scale (``difflora eval RUN --teacher``).
    teacher_of: str | None = None


class Claim(_Strict):
    """A statement the report tests (``verdicts.py``): ``arm`` is better than / not worse than ``baseline``."""

    text: str
    arm: str
    baseline: str
    relation: Literal["better", "not_worse"] = "better"
    # The score compared (lower is better for both).
    metric: Literal["fd", "kid_mean"] = "fd"
    # not_worse only, and required there: the non-inferiority margin as a fraction of the baseline's
    # mean (0.1: the arm may be up to 10% worse).
    margin: float | None = Field(default=None, gt=0)
    # Compare both arms at this guidance scale (e.g. a distilled student and its teacher at the
    # student's w); None: each arm at its best scale.
    guidance: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _margin(self) -> Claim:
        if self.relation == "not_worse" and self.margin is None:
            raise ValueError(f"claim {self.text!r}: a not_worse claim needs a margin (e.g. margin: 0.1 for 10%)")
        if self.relation == "better" and self.margin is not None:
            raise ValueError(f"claim {self.text!r}: margin applies to not_worse claims only")
        return self


class Study(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    out: str | None = None
    # Where the report goes: <report_dir>/<name>.md, images and run records in <report_dir>/<name>/
    # (default: the output directory). A repository path (docs) lets the records be committed.
    report_dir: str | None = None
    # Significance level of the claims' tests.
    alpha: float = Field(default=0.05, gt=0, lt=1)
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
        for a in self.arms:
            if a.teacher_of is not None and (a.set or a.adapters is not None):
                raise ValueError(
                    f"arms: arm {a.name!r} scores the teacher of {a.teacher_of!r}: it takes no set or adapters"
                )
        _check_dependencies(self)
        return self


# ``train.init_from: arm:NAME``: the run of arm NAME with the same seed (see the module docstring).
ARM_PREFIX = "arm:"


def arm_dependency(study: Study, arm: StudyArm) -> str | None:
    """The arm whose runs ``arm`` starts from (``train.init_from: arm:NAME`` in its ``set`` or the base,
    or ``teacher_of``), or None."""
    if arm.teacher_of is not None:
        return arm.teacher_of
    if "train.init_from" in arm.set:
        value = arm.set["train.init_from"]
    else:
        train = study.base.get("train")
        value = train.get("init_from") if isinstance(train, dict) else None
    if isinstance(value, str) and value.startswith(ARM_PREFIX):
        return value[len(ARM_PREFIX) :]
    return None


def _check_dependencies(study: Study) -> None:
    """Every ``arm:NAME`` names an arm, and no arm depends on itself through a chain (a cycle)."""
    names = [a.name for a in study.arms]
    deps = {a.name: arm_dependency(study, a) for a in study.arms}
    for name, dep in deps.items():
        if dep is not None and dep not in deps:
            raise ValueError(
                f"arms: arm {name!r} starts from arm {dep!r} (arm:{dep}), which is not an arm; arms: {names}"
            )
    for name in names:
        chain, dep = [name], deps[name]
        # One init_from per arm: the dependencies of an arm form a chain, a cycle repeats a name.
        while dep is not None:
            if dep in chain:
                raise ValueError(f"arms: the arms' train.init_from form a cycle: {' -> '.join([*chain, dep])}")
            chain.append(dep)
            dep = deps[dep]


def run_order(study: Study, arms: list[StudyArm]) -> list[StudyArm]:
    """``arms`` plus the arms they start from (transitively), every dependency before its dependents."""
    by_name = {a.name: a for a in study.arms}
    order: list[StudyArm] = []

    def visit(arm: StudyArm) -> None:
        if any(a.name == arm.name for a in order):
            return
        dep = arm_dependency(study, arm)
        if dep is not None:
            visit(by_name[dep])
        order.append(arm)

    for arm in arms:
        visit(arm)
    return order


def study_out_dir(study: Study, out: str | Path | None = None) -> Path:
    """The output directory of a study: ``out`` (--out), else the YAML's ``out``, else runs/<name>."""
    return Path(out or study.out or Path("runs") / study.name)


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


def read_yaml_mapping(path: str | Path, error: type[Exception], kind: str, example: str, keys: str) -> dict:
    """The mapping a study or sweep YAML holds; ``error`` names the file and the problem otherwise.

    ``kind`` ("study", "sweep") and ``example`` (a path) and ``keys`` (its main keys) word the errors.
    An ``experiments/...`` path not on disk names the shipped copy (:mod:`difflora.presets`).
    """
    p = resolve_shipped(path)
    if not p.is_file():
        shipped = ", ".join(experiment_presets())
        raise error(f"{kind} file {p} does not exist (e.g. {example}; shipped: {shipped})")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise error(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise error(f"{p}: a {kind} is a mapping ({keys})")
    return tree


def load_study(path: str | Path) -> Study:
    """Read and validate a study YAML, including every arm's config (so a bad key fails before training)."""
    p = Path(path)
    tree = read_yaml_mapping(
        p, StudyError, "study", "experiments/timelora/digits.yaml", "name, base, seeds, eval, arms, ..."
    )
    try:
        study = Study.model_validate(tree)
    except ValidationError as err:
        raise _explain(err, str(p)) from None
    for arm in study.arms:
        cfg = arm_config(study, arm, study.seeds[0])
        if arm.teacher_of is not None and (cfg.train.objective != "distill" or cfg.train.train_base):
            raise StudyError(
                f"arm {arm.name!r}: teacher_of needs an arm of LoRA-distilled students (train.objective: distill, "
                f"train.train_base: false), and {arm.teacher_of!r} is not one"
            )
    return study


def arm_config(study: Study, arm: StudyArm, seed: int, out: str | Path | None = None) -> Config:
    """The resolved difflora config of one run: base + the arm's adapters and overrides + train.seed.

    ``train.init_from: arm:NAME`` becomes ``<out>/NAME/seed<seed>`` (``out``: see :func:`study_out_dir`).
    A ``teacher_of`` arm has the config of the students it scores the teacher of.
    """
    if arm.teacher_of is not None:
        return arm_config(study, next(a for a in study.arms if a.name == arm.teacher_of), seed, out)
    tree = copy.deepcopy(study.base)
    if arm.adapters is not None:
        tree.setdefault("model", {})["adapters"] = copy.deepcopy(arm.adapters)
    overrides = [f"{k}={json.dumps(v)}" for k, v in arm.set.items()] + [f"train.seed={seed}"]
    dep = arm_dependency(study, arm)
    if dep is not None:
        overrides.append(f"train.init_from={json.dumps(str(study_out_dir(study, out) / dep / f'seed{seed}'))}")
    try:
        return parse_config(tree, overrides)
    except ConfigError as exc:
        raise StudyError(f"arm {arm.name!r}: {exc}") from None


def git_state(ignore: list[Path] | None = None, root: Path | None = None) -> tuple[str, bool]:
    """(newest commit that changed difflora's code or study configs, whether the checkout has uncommitted changes).

    Untracked files count (a new source file changes the code), except paths under ``ignore`` (the
    report's own outputs). Not a git checkout: ("difflora <version> (not a git checkout)", False),
    since an installed release is itself a fixed revision. ``root``: another checkout (tests).
    """
    root = root or Path(__file__).resolve().parents[3]
    try:
        # The newest commit that changed the code (src/, which holds the study configs too), not
        # HEAD: a commit that only adds a report must not change the revision the report names.
        rev = subprocess.run(
            ["git", "log", "-1", "--format=%H", "HEAD", "--", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "-z"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        from difflora import __version__

        return f"difflora {__version__} (not a git checkout)", False
    top = Path(
        subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True).stdout.strip()
    )
    skip = [p.resolve() for p in ignore or []]
    changed = [top / entry[3:] for entry in status.split("\0") if len(entry) > 3]
    dirty = any(not any(c.resolve().is_relative_to(s) for s in skip) for c in changed)
    return rev, dirty


def _guidance_for(study: Study, cfg: Config, teacher: bool) -> list[float]:
    """Unconditional: 1. Class-conditional (and a distilled run's ``teacher``): every eval.guidance
    scale. A distilled student: its own w (fixed-w), or the eval.guidance scales inside its range
    (guidance-scale LoRA; none: its default w)."""
    if not cfg.model.num_classes:
        return [1.0]
    scales = [float(w) for w in study.eval.guidance]
    if cfg.train.objective != "distill" or teacher:
        return scales
    d = cfg.distill
    if d.guidance_range is None:
        return [float(d.guidance)]
    low, high = d.guidance_range
    return [w for w in scales if low <= w <= high] or [float(d.guidance)]


def eval_settings(study: Study, cfg: Config, teacher: bool = False) -> dict[str, Any]:
    """The eval settings a run's metrics.json must have to count as done for this study
    (``teacher``: of a ``teacher_of`` arm)."""
    e = study.eval
    return {
        "num_samples": e.num_samples,
        "steps": e.steps,
        "sampler": e.sampler,
        "eta": e.eta,
        "guidance": _guidance_for(study, cfg, teacher),
        "seed": e.seed,
        "metrics_version": METRICS_VERSION,
    }


def _same_config(saved: dict[str, Any], cfg: Config) -> bool:
    """Whether a run's recorded config is ``cfg``. The record is read with today's defaults, so a run
    made before a config key existed counts as having that key's default (which is what it ran with);
    a record today's schema rejects (a removed key) is another config."""
    try:
        return config_to_dict(parse_config(saved)) == config_to_dict(cfg)
    except ConfigError:
        return False


def _run_state(run_dir: Path, cfg: Config, settings: dict[str, Any]) -> str:
    """'done' (final checkpoint + matching metrics), 'trained', 'partial' or 'new'."""
    from difflora.train.checkpoint import find_checkpoints

    saved = run_dir / "config.json"
    if saved.is_file() and not _same_config(read_run_json(saved), cfg):
        raise StudyError(
            f"{run_dir} holds a run with another config than this study's arm; "
            "delete it or choose another --out (a study never overwrites a run it did not make)"
        )
    ckpts = find_checkpoints(run_dir)
    if not ckpts:
        return "new"
    if int(ckpts[-1].name.split("_")[-1]) < cfg.train.steps:
        return "partial"
    return "done" if _evaluated(run_dir, cfg, settings) else "trained"


def _evaluated(run_dir: Path, cfg: Config, settings: dict[str, Any]) -> bool:
    """Whether ``run_dir/eval/metrics.json`` scores the final checkpoint with ``settings``."""
    metrics = run_dir / "eval" / "metrics.json"
    if not metrics.is_file():
        return False
    m = read_run_json(metrics)
    return {k: m["settings"].get(k) for k in settings} == settings and m["checkpoint_step"] == cfg.train.steps


def _teacher_accounting(student_dir: Path, run_dir: Path) -> None:
    """A ``teacher_of`` arm's accounting.json: the teacher's parameters (the student's minus its adapters)."""
    from difflora.eval.evaluate import merge_accounting

    params = read_run_json(student_dir / "accounting.json")["parameters"]
    groups = {k: v for k, v in params["by_group"].items() if k not in ("adapters", "weighting")}
    total = params["total"] - params["by_group"].get("adapters", 0) - params["by_group"].get("weighting", 0)
    merge_accounting(
        run_dir, {"parameters": {"total": total, "trainable": 0, "by_group": groups}, "train_images_per_s": None}
    )


def _shared_teacher_eval(
    study: Study, arm: StudyArm, seed: int, out_dir: Path, settings: dict[str, Any]
) -> Path | None:
    """An earlier seed's finished evaluation of the same teacher, when the teacher does not depend on
    the seed: students that all start from one fixed base (``train.init_from`` a path or
    ``pretrained:NAME``, not ``arm:NAME``) hold the same teacher, and the eval seed is the study's,
    so every seed would draw and score the same samples again. None otherwise."""
    student = next(a for a in study.arms if a.name == arm.teacher_of)
    inits = {arm_config(study, student, s, out_dir).train.init_from for s in study.seeds}
    if len(inits) != 1 or None in inits:
        return None
    for earlier in study.seeds[: study.seeds.index(seed)]:
        cfg = arm_config(study, arm, earlier, out_dir)
        run_dir = out_dir / arm.name / f"seed{earlier}"
        if _evaluated(run_dir, cfg, settings):
            return run_dir
    return None


def _reuse_teacher_eval(source: Path, run_dir: Path) -> None:
    """Copy ``source``'s eval directory and accounting into ``run_dir`` (complete or not at all)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "eval.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source / "eval", tmp)
    shutil.copy2(source / "accounting.json", run_dir / "accounting.json")
    tmp.rename(run_dir / "eval")


def run_study(
    path: str | Path,
    *,
    out: str | Path | None = None,
    only: list[str] | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    command: str | None = None,
    report_only: bool = False,
    allow_dirty: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Train and evaluate every (arm, seed) of a study not already done, then write the report; returns its path.

    The git tree must be clean (else StudyError before any work) unless ``allow_dirty``, which marks
    the report NOT REPRODUCIBLE. ``report_only`` trains and evaluates nothing: it rewrites the report
    from the stored run records (``difflora.experiments.report``), e.g. on a fresh clone.
    """
    from difflora.experiments.report import sync_records, weight_plots, write_report

    study = load_study(path)
    out_dir = study_out_dir(study, out)
    report_dir = Path(study.report_dir) if study.report_dir else out_dir
    arms = study.arms
    if only:
        unknown = sorted(set(only) - {a.name for a in arms})
        if unknown:
            raise StudyError(f"--only: unknown arms {unknown}; arms: {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in only]
    revision, dirty = git_state(ignore=[report_dir / f"{study.name}.md", report_dir / study.name])
    if dirty and not allow_dirty:
        raise StudyError(
            "the git checkout of difflora has uncommitted changes (git status), so no commit would hold the code "
            "behind this report: commit them, or pass --allow-dirty to mark the report NOT REPRODUCIBLE"
        )
    started = time.time()
    if not report_only:
        run_all(study, out_dir, arms, progress, cache_dir, log)
    img_dir = report_dir / study.name
    if out_dir.is_dir():
        n = sync_records(study, out_dir, img_dir, study.arms)
        log(f"study {study.name}: {n} finished runs recorded in {img_dir / 'runs'}")
        for note in weight_plots(study, out_dir, img_dir, study.arms):
            log(f"weight plot failed: {note}")
    cmd = command or _default_command(path, out)
    report = write_report(study, report_dir, study.arms, command=cmd, revision=revision, dirty=dirty)
    log(f"study {study.name}: report {report} ({time.time() - started:.0f} s this call)")
    return report


def run_all(
    study: Study,
    out_dir: Path,
    arms: list[StudyArm],
    progress: bool,
    cache_dir: str | Path | None,
    log: Callable[[str], None],
) -> None:
    from difflora.eval.evaluate import evaluate_run
    from difflora.eval.features import FeatureTrainConfig
    from difflora.train import train

    if study.threads:
        torch.set_num_threads(study.threads)
    feature_train = FeatureTrainConfig(max_steps=study.eval.feature_steps) if study.eval.feature_steps else None
    ordered = run_order(study, arms)
    for extra in ordered:
        if all(a.name != extra.name for a in arms):
            log(f"[{extra.name}] runs too: other arms start from its runs (train.init_from: arm:{extra.name})")
    runs = [(arm, seed) for arm in ordered for seed in study.seeds]
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(runs, desc="study", unit="run", disable=not progress, dynamic_ncols=True)
    for arm, seed in bar:
        bar.set_postfix_str(f"{arm.name} seed {seed}")
        cfg = arm_config(study, arm, seed, out_dir)
        run_dir = out_dir / arm.name / f"seed{seed}"
        teacher = arm.teacher_of is not None
        settings = eval_settings(study, cfg, teacher)
        if teacher:
            source = out_dir / str(arm.teacher_of) / f"seed{seed}"
            state = "done" if _evaluated(run_dir, cfg, settings) else "trained"
        else:
            source, state = run_dir, _run_state(run_dir, cfg, settings)
        if state == "done":
            log(f"[{arm.name} seed {seed}] done already: reusing {run_dir}")
            continue
        shared = _shared_teacher_eval(study, arm, seed, out_dir, settings) if teacher else None
        if shared is not None:
            _reuse_teacher_eval(shared, run_dir)
            log(f"[{arm.name} seed {seed}] the same teacher as {shared} (one base for every seed): its scores copied")
            continue
        t0 = time.perf_counter()
        if state in ("new", "partial"):
            train(cfg, run_dir, resume=state == "partial", progress=False, log=log)
        t1 = time.perf_counter()
        ev = evaluate_run(
            source,
            out=run_dir / "eval",
            teacher=teacher,
            update_accounting=not teacher,
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
        if teacher:
            _teacher_accounting(source, run_dir)
        fds = ", ".join(f"w={r['guidance']:g}: {r['fd']:.3f}" for r in ev["results"])
        floor = ev["noise_floor"]["fd"]
        log(
            f"[{arm.name} seed {seed}] train {t1 - t0:.0f} s, eval {time.perf_counter() - t1:.0f} s; FD {fds} "
            f"(real data at {settings['num_samples']} samples: {floor['mean']:.3f} ± {floor['std']:.3f})"
        )
    bar.close()


def _default_command(path: str | Path, out: str | Path | None) -> str:
    return f"difflora study {path}" + (f" --out {out}" if out else "")
