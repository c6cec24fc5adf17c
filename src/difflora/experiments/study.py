"""Running a study: every (arm, seed) trained and evaluated, then the markdown report.

The study YAML is read and checked by :mod:`difflora.experiments.study_spec`. Runs go to ``<out>/<arm>/seed<k>/`` (a normal run directory plus ``eval/metrics.json``). A run whose
final checkpoint and metrics (with the study's eval settings) exist is reused, one with an earlier
checkpoint is resumed, so an interrupted study continues where it stopped; a run with nothing on
this machine whose committed record (``difflora.experiments.report``) scores its config is skipped,
so a fresh clone continues from the records. Unconditional arms are
evaluated at guidance 1 only; class-conditional ones at every ``eval.guidance`` scale; one-pass
students (:mod:`difflora.sampling.student`; 003's) at the scales they can sample.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difflora import __version__
from difflora.config.schema import Config
from difflora.eval.evaluate import EvalSettings, evaluate_run, merge_accounting
from difflora.eval.features import FeatureTrainConfig
from difflora.experiments.report import (
    CODE_FILE,
    copy_records,
    draw_figures,
    matching_record,
    sync_records,
    write_report,
)
from difflora.experiments.settings import eval_settings, find_scored, same_config
from difflora.experiments.study_spec import (
    Study,
    StudyArm,
    StudyDirs,
    StudyError,
    arm_config,
    arm_dependency,
    load_study,
    read_run_json,
    run_order,
    study_dirs,
)
from difflora.files.atomic import storage_errors, write_bytes
from difflora.presets import shipped_name
from difflora.train import resolve_device, train
from difflora.train.checkpoint import find_checkpoints
from difflora.train.footprint import check_memory, training_batch

__all__ = ["git_state", "run_all", "run_study"]


def git_state(ignore: list[Path] | None = None, root: Path | None = None) -> tuple[str, bool]:
    """(newest commit that changed difflora's code or study configs, whether the checkout has uncommitted changes).

    A study stamps every run it scores with this state, and its record carries it (the report names
    the records' revisions, not the code's that writes the report). Untracked files count (a new
    source file changes the code), except paths under ``ignore`` (the report's own outputs). Not a
    git checkout: ("difflora <version> (not a git checkout)", False), since an installed release is
    itself a fixed revision. ``root``: another checkout (tests).
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
        return f"difflora {__version__} (not a git checkout)", False
    top = Path(
        subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True).stdout.strip()
    )
    skip = [p.resolve() for p in ignore or []]
    changed = [top / entry[3:] for entry in status.split("\0") if len(entry) > 3]
    dirty = any(not any(c.resolve().is_relative_to(s) for s in skip) for c in changed)
    return rev, dirty


def _run_state(run_dir: Path, cfg: Config, settings: dict[str, Any]) -> str:
    """'done' (final checkpoint + matching metrics), 'score' (final checkpoint), 'resume' (an earlier
    checkpoint) or 'train' (none)."""

    saved = run_dir / "config.json"
    if saved.is_file() and not same_config(read_run_json(saved), cfg):
        raise StudyError(
            f"{run_dir} holds a run with another config than this study's arm; "
            "delete it or choose another --out (a study never overwrites a run it did not make)"
        )
    ckpts = find_checkpoints(run_dir)
    if not ckpts:
        return "train"
    if int(ckpts[-1].name.split("_")[-1]) < cfg.train.steps:
        return "resume"
    return "done" if _evaluated(run_dir, cfg, settings) else "score"


def _evaluated(run_dir: Path, cfg: Config, settings: dict[str, Any], teacher: bool = False) -> bool:
    """Whether an evaluation of ``run_dir`` (its ``eval/metrics.json``, or one kept by its settings:
    :mod:`difflora.eval.store`) scores the final checkpoint (``teacher``: the guided teacher) with ``settings``."""
    return find_scored(run_dir, cfg, settings, teacher) is not None


def _teacher_accounting(student_dir: Path, run_dir: Path) -> None:
    """A ``teacher_of`` arm's accounting.json: the teacher's parameters (the student's minus its adapters)."""

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
    ``pretrained:NAME``, not ``arm:NAME``) hold the same teacher, and with one eval seed for every
    run (``eval.seed`` a number) every seed would draw and score the same samples again. None otherwise."""
    if study.eval.seed == "per_run":  # each seed samples the teacher with its own seed: nothing to share
        return None
    student = next(a for a in study.arms if a.name == arm.teacher_of)
    inits = {arm_config(study, student, s, out_dir).train.init_from for s in study.seeds}
    if len(inits) != 1 or None in inits:
        return None
    for earlier in study.seeds[: study.seeds.index(seed)]:
        cfg = arm_config(study, arm, earlier, out_dir)
        run_dir = out_dir / arm.name / f"seed{earlier}"
        if _evaluated(run_dir, cfg, settings, teacher=True):
            return run_dir
    return None


def _reuse_teacher_eval(source: Path, run_dir: Path) -> None:
    """Copy ``source``'s eval directory and accounting into ``run_dir`` (complete or not at all)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "eval.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    needed = sum(p.stat().st_size for p in (source / "eval").rglob("*") if p.is_file())
    try:
        with storage_errors(run_dir / "eval", needed):
            shutil.copytree(source / "eval", tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_bytes(run_dir / "accounting.json", (source / "accounting.json").read_bytes())
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
    plan_only: bool = False,
    overrides: list[str] | None = None,
    report_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    announce: Callable[[str], None] | None = None,
) -> Path:
    """Train and evaluate every (arm, seed) of a study not already done, then write the report; returns its path.

    The git tree must be clean (else StudyError before any work) unless ``allow_dirty``, which marks
    the report NOT REPRODUCIBLE (and the records of the runs it makes as made from uncommitted code).
    ``report_only`` trains and evaluates nothing: it rewrites the report from the stored run records
    (``difflora.experiments.report``), e.g. on a fresh clone.
    ``plan_only`` logs what each run would do (:func:`plan_runs`) and writes nothing.
    ``overrides``: ``--set KEY=VALUE`` texts (:func:`~difflora.experiments.study_spec.load_study`);
    ``out`` and ``report_dir``: see :func:`~difflora.experiments.study_spec.study_dirs`; ``announce``
    (the CLI: print) is told where they and the committed records are before any work.
    """
    study = load_study(path, overrides)
    dirs = study_dirs(study, path, out, report_dir, overrides)
    arms = _only_arms(study, only)
    img_dir = dirs.report / study.name
    if announce is not None:
        _announce_dirs(study, dirs, out, report_dir, announce)
    sources = [d for d in dict.fromkeys([img_dir, dirs.committed]) if d is not None]
    if plan_only:
        _log_plan(study, plan_runs(study, arms, dirs.out, sources), log)
        return dirs.report / f"{study.name}.md"
    revision, dirty = git_state(ignore=[dirs.report / f"{study.name}.md", img_dir])
    if dirty and not allow_dirty:
        raise StudyError(
            "the git checkout of difflora has uncommitted changes (git status), so no commit would hold the code "
            "behind this report: commit them, or pass --allow-dirty to mark the report NOT REPRODUCIBLE"
        )
    started = time.time()
    if not report_only:
        code = {"revision": revision, "dirty": dirty}
        run_all(study, dirs.out, arms, progress, cache_dir, log, records_dir=sources, code=code)
    if dirs.committed is not None and dirs.committed != img_dir:
        n = copy_records(
            study,
            dirs.committed,
            img_dir,
            _recorded_runs(study, run_order(study, study.arms), dirs.out, [dirs.committed]),
        )
        if n:
            log(f"study {study.name}: {n} committed records copied from {dirs.committed} to {img_dir / 'records'}")
    if dirs.out.is_dir():
        n = sync_records(study, dirs.out, img_dir, study.arms)
        log(f"study {study.name}: {n} finished runs recorded in {img_dir / 'records'}")
        for note in draw_figures(study, dirs.out, img_dir, study.arms):
            log(f"figure failed: {note}")
    cmd = command or _default_command(path, out, report_dir, overrides)
    report = write_report(study, dirs.report, study.arms, command=cmd, dirty=dirty)
    log(f"study {study.name}: report {report} ({time.time() - started:.0f} s this call)")
    return report


def _only_arms(study: Study, only: list[str] | None) -> list[StudyArm]:
    """The arms ``--only`` names (all when None); an unknown name is a StudyError listing the arms."""
    if not only:
        return study.arms
    unknown = sorted(set(only) - {a.name for a in study.arms})
    if unknown:
        raise StudyError(f"--only: unknown arms {unknown}; arms: {[a.name for a in study.arms]}")
    return [a for a in study.arms if a.name in only]


def _announce_dirs(
    study: Study, dirs: StudyDirs, out: str | Path | None, report_dir: str | Path | None, log: Callable[[str], None]
) -> None:
    """Where the runs, the report and the committed records are, before any work (absolute paths)."""
    how = "--out" if out else "the default; --out DIR to change"
    log(f"study {study.name}: runs in {dirs.out.resolve()} ({how})")
    how = "--report-dir" if report_dir else "the default; --report-dir DIR to change"
    log(f"study {study.name}: report {(dirs.report / f'{study.name}.md').resolve()} ({how})")
    if dirs.committed is not None:
        log(f"study {study.name}: committed records read from {dirs.committed.resolve() / 'records'}")


def run_all(
    study: Study,
    out_dir: Path,
    arms: list[StudyArm],
    progress: bool,
    cache_dir: str | Path | None,
    log: Callable[[str], None],
    records_dir: list[Path] | None = None,
    code: dict[str, Any] | None = None,
) -> None:
    """Train and evaluate every (arm, seed) of ``arms`` (and the arms they start from) not done yet.

    ``records_dir``: reports' image directories; a run with nothing on this machine whose record
    there scores this config (``matching_record``) is skipped, so a fresh clone continues a study
    from its committed records instead of rerunning it. ``code``: the state of the code doing the
    work (``{"revision", "dirty"}``, :func:`git_state`), stamped into each run it scores
    (``eval/code.json``), from where the run's record takes it.
    """
    if study.threads:
        torch.set_num_threads(study.threads)
    feature_train = FeatureTrainConfig(max_steps=study.eval.feature_steps) if study.eval.feature_steps else None
    ordered = run_order(study, arms)
    for extra in ordered:
        if all(a.name != extra.name for a in arms):
            log(f"[{extra.name}] runs too: other arms start from its runs (train.init_from: arm:{extra.name})")
    runs = plan_runs(study, arms, out_dir, records_dir)
    _check_memory(study, runs, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(runs, desc="study", unit="run", disable=not progress, dynamic_ncols=True)
    spent: list[float] = []  # wall time of each run trained or evaluated in this call, for the estimate
    for i, (arm, seed, state, detail) in enumerate(bar):
        bar.set_postfix_str(f"{arm.name} seed {seed}")
        cfg = arm_config(study, arm, seed, out_dir)
        run_dir = out_dir / arm.name / f"seed{seed}"
        teacher = arm.teacher_of is not None
        settings = eval_settings(study, arm, cfg)
        if state == "recorded":
            log(
                f"[{arm.name} seed {seed}] recorded already ({detail}); its run is not on this "
                "machine: skipped (delete the record to run it again)"
            )
            continue
        if state == "done":
            log(f"[{arm.name} seed {seed}] done already: reusing {run_dir}")
            continue
        source = out_dir / str(arm.teacher_of) / f"seed{seed}" if teacher else run_dir
        shared = _shared_teacher_eval(study, arm, seed, out_dir, settings) if teacher else None
        if shared is not None:
            _reuse_teacher_eval(shared, run_dir)
            log(f"[{arm.name} seed {seed}] the same teacher as {shared} (one base for every seed): its scores copied")
            continue
        t0 = time.perf_counter()
        if state in ("train", "resume"):
            train(cfg, run_dir, resume=state == "resume", progress=False, log=log)
        t1 = time.perf_counter()
        ev = _score(study, source, run_dir, teacher, settings, cache_dir, feature_train)
        if code is not None:
            write_bytes(run_dir / "eval" / CODE_FILE, json.dumps(code) + "\n")
        fds = fd_summary(ev["results"])
        floor = ev["noise_floor"]["fd"]
        spent.append(time.perf_counter() - t0)
        # An upper bound: runs still ahead that are done already take no time.
        left = sum(spent) / len(spent) * (len(runs) - i - 1) / 60
        log(
            f"[{arm.name} seed {seed}] train {t1 - t0:.0f} s, eval {time.perf_counter() - t1:.0f} s; FD {fds} "
            f"(real data at {settings['num_samples']} samples: {floor['mean']:.3f} ± {floor['std']:.3f}); "
            f"{i + 1} of {len(runs)} runs, at most ~{left:.0f} min left at this pace"
        )
    bar.close()


def _check_memory(study: Study, runs: list[tuple[StudyArm, int, str, str]], out_dir: Path) -> None:
    """Every arm that will train or be scored fits in memory: checked for all of them before the first trains."""
    work = [(arm, seed, state) for arm, seed, state, _ in runs if state in ("train", "resume", "score")]
    checked: set[str] = set()
    for arm, seed, _ in work:  # the seeds of an arm share its footprint: one check per arm
        if arm.name in checked:
            continue
        checked.add(arm.name)
        cfg = arm_config(study, arm, seed, out_dir)
        settings = eval_settings(study, arm, cfg)
        trains = any(a.name == arm.name and state != "score" for a, _, state in work)
        check_memory(
            cfg,
            resolve_device(cfg.train.device),
            f"study arm {arm.name}",
            train_batch=training_batch(cfg) if trains else 0,
            samples=max(settings["num_samples"], cfg.sample.num),
            guided=any(w != 1 for w in settings["guidance"]),
        )


# What run_all does with a run, by the state plan_runs finds it in.
PLAN_ACTIONS = {
    "recorded": "skip: its committed record scores this config",
    "done": "reuse: trained and scored",
    "score": "score: trained, not scored with these settings",
    "resume": "resume: its newest checkpoint is before the last step",
    "train": "train and score",
}


def plan_runs(
    study: Study, arms: list[StudyArm], out_dir: Path, records_dir: list[Path] | None = None
) -> list[tuple[StudyArm, int, str, str]]:
    """(arm, seed, state, detail) for every run of ``arms`` and the arms they start from, in the order
    ``run_all`` takes them; the state is a key of :data:`PLAN_ACTIONS`, the detail the record's path
    for a recorded run. Reads the run directories and records only: it trains and writes nothing."""
    ordered = run_order(study, arms)
    recorded = _recorded_runs(study, ordered, out_dir, records_dir or [])
    plan = []
    for arm in ordered:
        for seed in study.seeds:
            if (arm.name, seed) in recorded:
                plan.append((arm, seed, "recorded", str(recorded[arm.name, seed])))
                continue
            cfg = arm_config(study, arm, seed, out_dir)
            run_dir = out_dir / arm.name / f"seed{seed}"
            settings = eval_settings(study, arm, cfg)
            if arm.teacher_of is None:  # the settings fit this arm's run: found before any arm trains
                _eval_request(study, settings, teacher=False).sampling(cfg, run_dir)
            if arm.teacher_of is not None:  # scores the teacher in its students' runs, trains nothing
                state = "done" if _evaluated(run_dir, cfg, settings, teacher=True) else "score"
            else:
                state = _run_state(run_dir, cfg, settings)
            plan.append((arm, seed, state, ""))
    return plan


def _log_plan(study: Study, plan: list[tuple[StudyArm, int, str, str]], log: Callable[[str], None]) -> None:
    """One line per run (what it would do), then how many runs take each action."""
    for arm, seed, state, detail in plan:
        log(f"  [{arm.name} seed {seed}] {PLAN_ACTIONS[state]}" + (f" ({detail})" if detail else ""))
    counts = {state: sum(p[2] == state for p in plan) for state in PLAN_ACTIONS}
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    log(f"study {study.name}: {len(plan)} runs: {summary}")


def _score(
    study: Study,
    source: Path,
    run_dir: Path,
    teacher: bool,
    settings: dict[str, Any],
    cache_dir: str | Path | None,
    feature_train: FeatureTrainConfig | None,
) -> dict[str, Any]:
    """Evaluate the run in ``source`` with the study's ``settings`` into ``run_dir/eval`` (a
    ``teacher_of`` arm: the teacher held in its student's run, with the teacher's accounting)."""

    ev = evaluate_run(
        source,
        _eval_request(study, settings, teacher),
        out=run_dir / "eval",
        update_accounting=not teacher,
        cache_dir=cache_dir,
        feature_train=feature_train,
    )
    if teacher:
        _teacher_accounting(source, run_dir)
    return ev


def _eval_request(study: Study, settings: dict[str, Any], teacher: bool) -> EvalSettings:
    """The evaluation a run's ``settings`` (:func:`eval_settings`) ask for."""
    sampling = {k: v for k, v in settings.items() if k != "metrics_version"}
    return EvalSettings(**sampling, weights=study.eval.weights, teacher=teacher)


def _recorded_runs(
    study: Study, ordered: list[StudyArm], out_dir: Path, records_dirs: list[Path]
) -> dict[tuple[str, int], Path]:
    """{(arm, seed): its record} for the runs ``run_all`` may skip: no run directory on this machine,
    a record (the first found in ``records_dirs``) that scores this config, the record of the run it
    starts from matching too (a changed dependency is another run), and no run of this call that
    starts from it (the arms that depend on it, for that seed, are skipped too). Dependencies come
    before their dependents in ``ordered``; one pass from the end decides each run after everything
    that needs it."""
    found: dict[tuple[str, int], Path] = {}
    for arm in ordered:
        dep = arm_dependency(study, arm)
        for seed in study.seeds:
            if dep is not None and (dep, seed) not in found:
                continue
            cfg = arm_config(study, arm, seed, out_dir)
            record = next((r for d in records_dirs if (r := matching_record(study, d, arm, seed, cfg))), None)
            if record is not None:
                found[arm.name, seed] = record
    skip: dict[tuple[str, int], Path] = {}
    for arm in reversed(ordered):
        dependents = [a.name for a in ordered if arm_dependency(study, a) == arm.name]
        for seed in study.seeds:
            if (out_dir / arm.name / f"seed{seed}").exists() or any((d, seed) not in skip for d in dependents):
                continue
            if (arm.name, seed) in found:
                skip[arm.name, seed] = found[arm.name, seed]
    return skip


def fd_summary(results: list[dict]) -> str:
    """The FD of each result entry for a log line: ``w=0: 40.786``, one per scale; spatial runs score
    each task at each scale, so the task is named (``edges w=1: 7.233, lowres w=1: 25.941``)."""
    return ", ".join(f"{r['task'] + ' ' if 'task' in r else ''}w={r['guidance']:g}: {r['fd']:.3f}" for r in results)


def _default_command(
    path: str | Path, out: str | Path | None, report_dir: str | Path | None, overrides: list[str] | None
) -> str:
    # A shipped study is named as its preset whatever path was typed, so that --report-only regenerates
    # the report byte for byte however it is called.
    flags = [f"--out {out}"] * bool(out) + [f"--report-dir {report_dir}"] * bool(report_dir)
    return " ".join([f"difflora study {shipped_name(path) or path}", *flags, *(f"--set {o}" for o in overrides or [])])
