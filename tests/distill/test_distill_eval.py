"""``difflora eval RUN --teacher``: the guided teacher held in a distilled run's files, scored with the
same metrics as the teacher run itself; the student's scales checked before sampling."""

import json
from pathlib import Path

import pytest

from difflora.cli.commands import main
from difflora.distill.objective import distill_config
from difflora.eval import FeatureTrainConfig
from difflora.eval.evaluate import EvalError, EvalSettings, evaluate_run
from difflora.eval.store import find_evaluation
from difflora.train import train

QUIET = {"progress": False, "log": lambda s: None}
TINY_FEATURES = FeatureTrainConfig(epochs=1, batch_size=64, max_steps=5, seed=0)
SCORES = ("fd", "kid_mean", "precision", "recall", "class_accuracy")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    teacher = root / "teacher"
    train(tiny_config("tiny-unet", "train.steps=4", "train.batch_size=8"), teacher, **QUIET)
    student = root / "student"
    over = ["train.steps=3", "train.batch_size=8", "train.ckpt_every=3", "train.lr=0.01"]
    train(distill_config(teacher, guidance=3.0, overrides=over), student, **QUIET)
    full = root / "full"
    train(distill_config(teacher, guidance=3.0, overrides=[*over, "train.train_base=true"]), full, **QUIET)
    return {"teacher": teacher, "student": student, "full": full, "cache": root / "cache"}


def _eval(run: Path, cache: Path, out: Path | None = None, **kw) -> dict:
    settings = EvalSettings(num_samples=10, steps=3, seed=2, bootstrap=5, **kw)
    return evaluate_run(run, settings, out=out, cache_dir=cache, feature_train=TINY_FEATURES)


def test_teacher_of_a_distilled_run_scores_as_the_teacher_run(runs):
    teacher = _eval(runs["teacher"], runs["cache"], guidance=[1, 3], out=runs["teacher"] / "e")
    from_student = _eval(runs["student"], runs["cache"], guidance=[1, 3], teacher=True)
    out = runs["student"] / "eval-teacher"
    assert json.loads((out / "metrics.json").read_text())["settings"]["teacher"] is True
    for a, b in zip(teacher["results"], from_student["results"], strict=True):
        assert a["guidance"] == b["guidance"] and (out / b["grid"]).is_file()
        for key in SCORES:
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
        assert b["sample_seconds_per_image"] == pytest.approx(b["sample_seconds"] / 10)
    # The student itself (LoRA on, trained) is another model: other scores at w = 3.
    student = _eval(runs["student"], runs["cache"])
    assert student["settings"]["guidance"] == [3.0] and not student["settings"]["teacher"]
    assert student["results"][0]["fd"] != from_student["results"][1]["fd"]
    acc = json.loads((runs["student"] / "accounting.json").read_text())
    assert [e["guidance"] for e in acc["teacher_sampling"]] == [1.0, 3.0]
    assert [e["guidance"] for e in acc["sampling"]] == [3.0]  # the student's record is its own


def test_teacher_needs_a_distilled_run_with_a_lora_and_students_their_scale(runs, tmp_path):
    with pytest.raises(EvalError, match="is not one"):
        _eval(runs["teacher"], runs["cache"], teacher=True, out=tmp_path / "a")
    with pytest.raises(EvalError, match="fully fine-tuned student.*evaluate its teacher run"):
        _eval(runs["full"], runs["cache"], teacher=True, out=tmp_path / "b")
    with pytest.raises(EvalError, match="distilled at guidance 3"):
        _eval(runs["student"], runs["cache"], guidance=[2], out=tmp_path / "c")
    with pytest.raises(EvalError, match="guidance fraction of 0.5 applies to classifier-free guidance"):
        _eval(runs["student"], runs["cache"], guidance_fraction=0.5, out=tmp_path / "d")
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_cli_eval_teacher(runs, capsys):
    # Selective guidance of the teacher at half the steps: the student's cost at 4 steps.
    args = ["eval", str(runs["student"]), "--teacher", "--guidance", "2", "--num-samples", "8", "--steps", "2"]
    args += ["--guidance-fraction", "0.5"]
    args += ["--cache-dir", str(runs["cache"]), "--feature-steps", "5", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "eval-teacher" in printed and (runs["student"] / "eval-teacher" / "samples_w2.png").is_file()
    saved = json.loads((runs["student"] / "eval-teacher" / "metrics.json").read_text())
    assert saved["settings"]["guidance_fraction"] == 0.5


def test_the_student_is_scored_fused_and_the_teacher_with_its_lora_off(runs, tmp_path, monkeypatch):
    # Evaluation samples the student as `difflora sample` does: its LoRA fused into W0 once for the
    # draw (no adapter work per step), so the measured speed is the one-pass student's.
    import difflora.eval.evaluate as ev
    from difflora.distill.student import has_student

    seen = []
    original = ev.generate

    def spy(model, cfg, settings, **kw):
        seen.append((has_student(model), kw["teacher"]))
        return original(model, cfg, settings, **kw)

    monkeypatch.setattr(ev, "generate", spy)  # where evaluate_run looks it up
    _eval(runs["student"], runs["cache"], out=tmp_path / "s")
    _eval(runs["student"], runs["cache"], guidance=[3], teacher=True, out=tmp_path / "t")
    assert seen == [(False, False), (True, True)]


def test_teacher_evaluations_at_two_guidance_fractions_both_survive(runs):
    # Issue 32: `eval --teacher --guidance-fraction 0.5` used to replace the teacher's earlier scores.
    full = _eval(runs["student"], runs["cache"], guidance=[2], teacher=True)
    half = _eval(runs["student"], runs["cache"], guidance=[2], teacher=True, guidance_fraction=0.5)
    assert full["key"] == "teacher-step3-ema-ddim3-w2-n10-seed2"
    assert half["key"] == "teacher-step3-ema-ddim3-w2-frac0p5-n10-seed2"
    for result in (full, half):
        kept = runs["student"] / "eval" / result["key"]
        assert json.loads((kept / "metrics.json").read_text()) == result and (kept / "samples_w2.png").is_file()
    assert json.loads((runs["student"] / "eval-teacher" / "metrics.json").read_text()) == half  # the newest
    at_full = lambda m: m["settings"]["guidance"] == [2.0] and m["settings"]["guidance_fraction"] == 1.0  # noqa: E731
    found = find_evaluation(runs["student"], at_full, teacher=True)
    assert found is not None and found.metrics == full
    assert find_evaluation(runs["student"], lambda m: m["settings"]["guidance"] == [2.0]) is None  # not the student's
