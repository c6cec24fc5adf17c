"""000 Figure 3 in study reports: the trained composition weights of each trainable-TimeLoRA arm.

Registered as a report figure (:data:`difflora.experiments.report.REPORT_FIGURES`) by
:func:`difflora.timelora.register`: the study draws the heatmap of each such arm's first seed
(:func:`difflora.timelora.plots.plot_weights`, EMA weights, the default layer) as
``weights-<arm>.png`` next to the report, and the report shows the ones it finds.
"""

from __future__ import annotations

from pathlib import Path

from difflora.experiments.study_spec import Study, StudyArm, arm_config
from difflora.timelora.plots import plot_weights

__all__ = ["WEIGHT_HEATMAPS", "WeightHeatmaps"]


class WeightHeatmaps:
    """The report figure of 000's trainable TimeLoRA weightings (``weighting: trainable`` on ``t``)."""

    def draw(self, study: Study, out_dir: Path, img_dir: Path, arms: list[StudyArm]) -> list[str]:
        """Draw the heatmap of each trainable-TimeLoRA arm's first seed; returns failures."""
        notes = []
        for arm in arms:
            cfg = arm_config(study, arm, study.seeds[0])
            names = [a.name for a in cfg.model.adapters if a.weighting == "trainable" and a.condition == "t"]
            run_dir = out_dir / arm.name / f"seed{study.seeds[0]}"
            if not names or not (run_dir / "checkpoints").is_dir():
                continue
            try:
                plot_weights(run_dir, None, str(img_dir / f"weights-{arm.name}.png"), "ema", names[0])
            except Exception as exc:  # a plot is a figure, not a result: report the failure, keep the report
                notes.append(f"weight plot of {arm.name}: {exc}")
        return notes

    def section(self, study: Study, img_dir: Path, arms: list[StudyArm]) -> list[str]:
        """The report's section showing the heatmaps drawn (none: no section)."""
        plots = [a.name for a in arms if (img_dir / f"weights-{a.name}.png").is_file()]
        if not plots:
            return []
        lines = ["## Trained TimeLoRA weights (000 Figure 3)", "", "First seed, EMA weights, middle block qkv.", ""]
        for name in plots:
            lines += [f"**{name}**", "", f"![weights {name}]({study.name}/weights-{name}.png)", ""]
        return lines


# The one instance registered (registering the same entry again is not an error, a new one would be).
WEIGHT_HEATMAPS = WeightHeatmaps()
