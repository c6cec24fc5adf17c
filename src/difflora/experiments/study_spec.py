"""A study's YAML, read and checked: several arms (configs) x several seeds, each trained and
evaluated (``difflora.experiments.study``), summarised in a markdown report.

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
        margin: 0.1                       # not_worse: the arm may be up to 10% worse
        # metric: fd (default), kid_mean, or class_accuracy (higher is better; better claims only)

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

Every arm's config can be changed at once, e.g. a quick version of a study, with a study-level
``set`` (dotted overrides applied after each arm's own ``set``) or ``difflora study STUDY --set
KEY=VALUE``: a KEY in a config section (data, model, diffusion, train, sample, distill) goes to
every arm; any other KEY is a study key (``seeds=[0]``, ``eval.num_samples=100``)::

    difflora study experiments/timelora/digits.yaml --set train.steps=20 --set seeds=[0] --out runs/quick

Paths: ``out`` (and ``--out``) is relative to the current directory, like every run directory. A
relative ``report_dir`` (where the committed run records live) is relative to the study's home:
the YAML's own directory, or for a shipped study the source checkout difflora runs from
(:data:`difflora.presets.SOURCE_ROOT`), so a shipped study finds its committed records from any
directory (:func:`study_dirs`).

An arm can be evaluated with its own settings (``eval`` in the arm: steps, guidance,
guidance_fraction), e.g. ``teacher_of`` a student, the guided teacher with selective guidance at
the student's cost::

      - name: selective-f0.5
        teacher_of: student-w3
        eval: {steps: 17, guidance_fraction: 0.5, guidance: [3]}
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from difflora.config.base import GuidanceScale
from difflora.config.overrides import apply_override, parse_override
from difflora.config.schema import Config, ConfigError, parse_config
from difflora.diffusion.respace import space_timesteps
from difflora.files.jsonfile import read_json_file
from difflora.presets import SOURCE_ROOT, experiment_presets, is_shipped, resolve_shipped
from difflora.sampling.student import student_of

__all__ = [
    "ARM_PREFIX",
    "ArmEval",
    "HIGHER_IS_BETTER",
    "Claim",
    "Study",
    "StudyArm",
    "StudyDirs",
    "StudyError",
    "StudyEval",
    "arm_config",
    "arm_dependency",
    "load_study",
    "read_run_json",
    "read_yaml_mapping",
    "run_order",
    "study_dirs",
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
    guidance: list[GuidanceScale] = Field(default_factory=lambda: [1.0], min_length=1)
    # Sampling seed of the evaluations: "per_run" (each run samples with its own training seed, so the
    # spread over seeds holds the evaluation's noise too; what a new study should use), or one seed
    # for every run (the spread is then training noise only). The default 0 keeps the YAMLs and
    # records written before "per_run" existed meaning what they meant.
    seed: int | Literal["per_run"] = 0
    weights: Literal["ema", "model"] = "ema"
    # Optimizer steps of the feature network if it must be trained (None: its default).
    feature_steps: int | None = Field(default=None, ge=1)
    # Selective guidance: classifier-free guidance on the first (noisiest) fraction of the steps
    # only, the conditional model alone on the rest (1: every step).
    guidance_fraction: float = Field(default=1.0, ge=0, le=1)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> Any:
        ok = value == "per_run" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
        if not ok:
            raise ValueError(
                f"eval.seed: a sampling seed (an integer >= 0) or per_run (each run's own seed), got {value!r}"
            )
        return value


class ArmEval(_Strict):
    """One arm's changes to the study's ``eval`` (unset: the study's value). E.g. the guided teacher
    at a distilled student's cost: fewer steps, CFG on a fraction of them (selective guidance)."""

    steps: int | None = Field(default=None, ge=1)
    guidance: list[GuidanceScale] | None = Field(default=None, min_length=1)
    guidance_fraction: float | None = Field(default=None, ge=0, le=1)


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
    eval: ArmEval | None = None


# Scores of which higher is better (the others: FD, KID).
HIGHER_IS_BETTER = frozenset({"class_accuracy"})


class Claim(_Strict):
    """A statement the report tests (``verdicts.py``): ``arm`` is better than / not worse than ``baseline``."""

    text: str
    arm: str
    baseline: str
    relation: Literal["better", "not_worse"] = "better"
    # The score compared: FD or KID (lower is better) or class accuracy (higher is better; "better"
    # claims only, since a relative margin of an accuracy near 1 means little).
    metric: Literal["fd", "kid_mean", "class_accuracy"] = "fd"
    # not_worse only, and required there: the non-inferiority margin as a fraction of the baseline's
    # mean (0.1: the arm may be up to 10% worse).
    margin: float | None = Field(default=None, gt=0)
    # Compare both arms at this guidance scale (e.g. a distilled student and its teacher at the
    # student's w); None: each arm at its best scale.
    guidance: GuidanceScale | None = None
    # What the report prints beside the verdict because the test cannot hold it (e.g. the quality of
    # the two bases when comparing how well they adapt).
    context: str = ""

    @model_validator(mode="after")
    def _margin(self) -> Claim:
        if self.relation == "not_worse" and self.margin is None:
            raise ValueError(f"claim {self.text!r}: a not_worse claim needs a margin (e.g. margin: 0.1 for 10%)")
        if self.relation == "better" and self.margin is not None:
            raise ValueError(f"claim {self.text!r}: margin applies to not_worse claims only")
        if self.metric in HIGHER_IS_BETTER and self.relation != "better":
            raise ValueError(f"claim {self.text!r}: a claim on {self.metric} (higher is better) is a 'better' claim")
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
    # Dotted overrides of every arm's config, applied after the arm's own set (--set KEY=VALUE adds here).
    set: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    eval: StudyEval = Field(default_factory=StudyEval)
    arms: list[StudyArm] = Field(min_length=1)
    claims: list[Claim] = Field(default_factory=list)

    def eval_of(self, arm: StudyArm) -> StudyEval:
        """The eval settings of ``arm``: the study's, with the arm's own ``eval`` values over them."""
        if arm.eval is None:
            return self.eval
        return self.eval.model_copy(update=arm.eval.model_dump(exclude_none=True))

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
    given = [d for d in (study.set, arm.set) if "train.init_from" in d]
    if given:
        value = given[0]["train.init_from"]
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


class StudyDirs(BaseModel):
    """Where a study's runs go (``out``), where its report is written (``report``: ``<report>/<name>.md``
    and images and records in ``<report>/<name>/``), and where its committed records are read
    (``committed``: a report's image directory, or None)."""

    out: Path
    report: Path
    committed: Path | None


def _committed_dir(study: Study, path: str | Path) -> Path | None:
    """The image directory of the YAML's ``report_dir`` resolved at the study's home (module docstring), or None."""
    if study.report_dir is None:
        return None
    given = Path(study.report_dir)
    if not given.is_absolute():
        resolved = resolve_shipped(path)
        home = SOURCE_ROOT if is_shipped(resolved) else resolved.resolve().parent
        if home is None:  # a shipped study of an installed wheel: no checkout, no committed records
            return None
        given = home / given
    return given / study.name


def study_dirs(
    study: Study,
    path: str | Path,
    out: str | Path | None = None,
    report_dir: str | Path | None = None,
    overrides: list[str] | None = None,
) -> StudyDirs:
    """The directories of the study read from ``path`` (:class:`StudyDirs`).

    The runs go to ``out`` (--out); else, for a study changed by ``overrides`` (--set), to the default
    output directory plus ``-set-`` and a digest of the overrides, so a variant never meets the runs
    of the study or of another variant; else to the default (:func:`study_out_dir`). The report goes
    to ``report_dir`` (--report-dir); else a changed study's next to its runs (a variant never
    rewrites the shipped report); else to the YAML's ``report_dir`` at the study's home; else next to
    the runs.
    """
    out_dir = study_out_dir(study, out)
    if overrides and out is None:
        digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
        out_dir = out_dir.with_name(f"{out_dir.name}-set-{digest}")
    committed = _committed_dir(study, path)
    if report_dir is not None:
        report = Path(report_dir)
    elif committed is not None and not overrides:
        report = committed.parent
    else:
        report = out_dir
    return StudyDirs(out=out_dir, report=report, committed=committed)


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
    valid += "; eval: " + ", ".join(StudyEval.model_fields) + "; arms[].eval: " + ", ".join(ArmEval.model_fields)
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


def _apply_overrides(tree: dict[str, Any], overrides: list[str]) -> None:
    """``--set KEY=VALUE`` on a study: a config key (``train.steps``) into the study's ``set`` (every
    arm), any other key into the study itself (``seeds=[0]``, ``eval.num_samples=100``)."""
    sections = list(Config.model_fields)
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            raise StudyError(f"--set: {exc}") from None
        top = key.split(".")[0]
        if key == "train.seed":
            raise StudyError("--set train.seed: each run's seed is one of the study's seeds; give --set seeds=[0, 1]")
        if top in ("out", "report_dir"):
            raise StudyError(f"--set {key}: give --{top.replace('_', '-')} instead")
        if top not in sections and top not in Study.model_fields:
            raise StudyError(
                f"--set {key}: not a config key (sections {', '.join(sections)}: every arm) nor a study key "
                f"({', '.join(k for k in Study.model_fields if k not in ('out', 'report_dir'))})"
            )
        target = tree.setdefault("set", {}) if top in sections else tree
        if not isinstance(target, dict):
            raise StudyError(f"--set {key}: the study's set is not a mapping of dotted keys")
        if top in sections:
            target[key] = value
            continue
        try:
            apply_override(target, key, value)
        except ConfigError as exc:
            raise StudyError(f"--set: {exc}") from None


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read and validate a study YAML, including every arm's config (so a bad key fails before training).

    ``overrides``: ``--set KEY=VALUE`` texts (see the module docstring), applied before validation.
    """
    p = Path(path)
    tree = read_yaml_mapping(
        p, StudyError, "study", "experiments/timelora/digits.yaml", "name, base, seeds, eval, arms, ..."
    )
    _apply_overrides(tree, list(overrides or []))
    try:
        study = Study.model_validate(tree)
    except ValidationError as err:
        raise _explain(err, str(p)) from None
    for arm in study.arms:
        cfg = arm_config(study, arm, study.seeds[0])
        student = student_of(cfg)
        if arm.teacher_of is not None and (student is None or student.teacher_problem(cfg) is not None):
            raise StudyError(
                f"arm {arm.name!r}: teacher_of needs an arm of LoRA-distilled students (train.objective: distill, "
                f"train.train_base: false), and {arm.teacher_of!r} is not one"
            )
        if study.eval_of(arm).guidance_fraction != 1.0 and (cfg.model.num_classes == 0 or _student(arm, cfg)):
            raise StudyError(
                f"arm {arm.name!r}: eval.guidance_fraction applies to classifier-free guidance, which "
                + ("an unconditional model" if cfg.model.num_classes == 0 else "a distilled student")
                + " does not do (a teacher_of arm scores a student's guided teacher)"
            )
        _check_sampling_steps(study, arm, cfg)
    return study


def _check_sampling_steps(study: Study, arm: StudyArm, cfg: Config) -> None:
    """Refuse an eval step count the arm's diffusion cannot take, at load time rather than after training."""
    ev = study.eval_of(arm)
    total = cfg.diffusion.steps
    try:
        if ev.steps > total:
            raise ValueError(f"{ev.steps} steps exceed the {total} of diffusion.steps")
        if ev.sampler == "ddim":
            space_timesteps(total, f"ddim{ev.steps}", cfg.diffusion.steps_offset)
    except ValueError as exc:
        raise StudyError(
            f"arm {arm.name!r}: eval.steps = {ev.steps} cannot be sampled ({exc}); DDIM takes every k-th of the "
            f"{total} steps, so pick a count len(range(0, {total}, k)) reaches"
        ) from None


def _student(arm: StudyArm, cfg: Config) -> bool:
    """Whether ``arm``'s runs are scored as one-pass students (no guidance; :mod:`difflora.sampling.student`)."""
    return student_of(cfg) is not None and arm.teacher_of is None


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
    given = [*arm.set.items(), *study.set.items()]  # the study's set after the arm's
    overrides = [f"{k}={json.dumps(v)}" for k, v in given] + [f"train.seed={seed}"]
    dep = arm_dependency(study, arm)
    if dep is not None:
        overrides.append(f"train.init_from={json.dumps(str(study_out_dir(study, out) / dep / f'seed{seed}'))}")
    try:
        return parse_config(tree, overrides)
    except ConfigError as exc:
        raise StudyError(f"arm {arm.name!r}: {exc}") from None
