"""Experiments: studies that train and evaluate several configurations and write a report.

    from difflora.experiments import load_study, run_study
    run_study("experiments/timelora/digits.yaml")      # runs/<study>/<arm>/seed<k>/, report .md

See ``difflora.experiments.study_spec`` for the study YAML, ``study`` for running one, ``settings`` for
when a stored run or record counts as done, ``report`` for the report, its run records and its
figures (``REPORT_FIGURES``, which paper packages fill), ``verdicts`` for the statistics behind the claims, ``runs_table`` for ``difflora runs``
(one table of the runs under a directory).
"""

from difflora.experiments.report import write_report
from difflora.experiments.runs_table import runs_table
from difflora.experiments.study import run_study
from difflora.experiments.study_spec import Claim, Study, StudyArm, StudyError, StudyEval, arm_config, load_study
from difflora.experiments.verdicts import judge_claim

__all__ = [
    "Claim",
    "Study",
    "StudyArm",
    "StudyError",
    "StudyEval",
    "arm_config",
    "judge_claim",
    "load_study",
    "run_study",
    "runs_table",
    "write_report",
]
