"""Whether a stored run or record counts as done: the eval settings a study scores a run with.

A run's ``eval/metrics.json`` and a committed record count for an arm only when they score the
arm's config (:func:`same_config`) with the study's eval settings (:func:`eval_settings`,
:func:`scored_with`). Both the study runner (``study.py``: what to skip, reuse or score) and the
report (``report.py``: which records match) ask; the answer lives here, below both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difflora.config.schema import Config, ConfigError, config_to_dict, parse_saved_config
from difflora.eval.evaluate import METRICS_VERSION
from difflora.eval.store import Evaluation, find_evaluation
from difflora.experiments.study_spec import Study, StudyArm, StudyEval, read_run_json
from difflora.sampling.student import student_of

__all__ = ["eval_seed", "eval_settings", "find_scored", "same_config", "scored_with"]


def _guidance_for(e: StudyEval, cfg: Config, teacher: bool) -> list[float]:
    """Unconditional: 1. Class-conditional (and a one-pass student's ``teacher``): every ``e.guidance``
    scale. A one-pass student: the scales it can sample (:meth:`~difflora.sampling.student.Student.scales`;
    003: a fixed-w student its own w, a guidance-scale LoRA the scales inside its range)."""
    if not cfg.model.num_classes:
        return [1.0]
    scales = [float(w) for w in e.guidance]
    student = student_of(cfg)
    return scales if student is None or teacher else student.scales(cfg, scales)


def eval_settings(study: Study, arm: StudyArm, cfg: Config) -> dict[str, Any]:
    """The eval settings a metrics.json of ``arm`` (run config ``cfg``) must have to count as done."""
    e = study.eval_of(arm)
    return {
        "num_samples": e.num_samples,
        "steps": e.steps,
        "sampler": e.sampler,
        "eta": e.eta,
        "guidance": _guidance_for(e, cfg, arm.teacher_of is not None),
        "guidance_fraction": e.guidance_fraction,
        "seed": eval_seed(e, cfg),
        "metrics_version": METRICS_VERSION,
    }


def eval_seed(e: StudyEval, cfg: Config) -> int:
    """The sampling seed of a run's evaluation: the run's training seed (``per_run``), else ``e.seed``."""
    return cfg.train.seed if e.seed == "per_run" else e.seed


# Settings a metrics.json written before they were recorded lacks, with the value every such run used.
_UNRECORDED = {"guidance_fraction": 1.0}


def scored_with(metrics: dict[str, Any], cfg: Config, settings: dict[str, Any]) -> bool:
    """Whether a metrics.json (read) scores the final checkpoint of a run of ``cfg`` with ``settings``."""
    recorded = {k: metrics["settings"].get(k, _UNRECORDED.get(k)) for k in settings}
    return recorded == settings and metrics["checkpoint_step"] == cfg.train.steps


def find_scored(run_dir: Path, cfg: Config, settings: dict[str, Any], teacher: bool = False) -> Evaluation | None:
    """The evaluation of ``run_dir`` that scores the final checkpoint of a run of ``cfg`` with ``settings``
    (``teacher``: its guided teacher): its own ``eval/metrics.json`` first, then those kept by their
    settings (:func:`~difflora.eval.store.evaluations`); None if none does. A damaged metrics.json is a
    StudyError naming it."""
    match = lambda m: scored_with(m, cfg, settings)  # noqa: E731
    return find_evaluation(run_dir, match, teacher=teacher, read=read_run_json)


def same_config(saved: dict[str, Any], cfg: Config) -> bool:
    """Whether a run's recorded config is ``cfg``. The record is read with today's defaults, so a run
    made before a config key existed counts as having that key's default (which is what it ran with);
    a record today's schema rejects (a removed key) is another config."""
    try:
        return config_to_dict(parse_saved_config(saved)) == config_to_dict(cfg)
    except ConfigError:
        return False
