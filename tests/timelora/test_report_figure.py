"""000's weight heatmaps reach study reports through the shared report-figure registry.

The shared report code names no paper: ``difflora.timelora.register`` adds the figure to
``REPORT_FIGURES``, and the report shows the heatmaps it finds next to it.
"""

from difflora.experiments.report import REPORT_FIGURES, draw_figures
from difflora.experiments.study_spec import load_study
from difflora.timelora.figures import WEIGHT_HEATMAPS


def test_timelora_registers_its_weight_heatmaps_as_a_report_figure():
    assert REPORT_FIGURES["timelora.weights"] is WEIGHT_HEATMAPS


def test_the_section_shows_the_heatmaps_found_and_nothing_without_them(tmp_path):
    study = load_study("experiments/timelora/digits.yaml")
    first, second = study.arms[0].name, study.arms[1].name
    assert WEIGHT_HEATMAPS.section(study, tmp_path, study.arms) == []
    (tmp_path / f"weights-{second}.png").write_bytes(b"")
    lines = WEIGHT_HEATMAPS.section(study, tmp_path, study.arms)
    assert lines[0] == "## Trained TimeLoRA weights (000 Figure 3)"
    assert f"![weights {second}]({study.name}/weights-{second}.png)" in lines
    assert not any(first in line for line in lines)


def test_drawing_without_runs_draws_nothing_and_fails_nothing(tmp_path):
    study = load_study("experiments/timelora/digits.yaml")
    assert draw_figures(study, tmp_path / "runs", tmp_path / "img", study.arms) == []
    assert not (tmp_path / "img").exists()
