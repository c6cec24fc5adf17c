"""Study arms that start from another arm's runs (``train.init_from: arm:NAME``): resolved per seed,
trained after their dependency (also under ``--only``), reused on a second call; distilled students
evaluated at the scales they can sample; claims at one guidance scale; unknown arms and cycles refused."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_study import TINY_STUDY

from difflora.experiments import study as study_mod
from difflora.experiments.claims_table import claims_section
from difflora.experiments.report import claim_verdict
from difflora.experiments.study import eval_settings, run_study
from difflora.experiments.study_spec import Claim, StudyError, arm_config, load_study, run_order
from difflora.presets import EXPERIMENTS_DIR

TINY = {
    "name": "tiny-distill",
    "seeds": [0, 1],
    "eval": {"num_samples": 8, "steps": 2, "guidance": [1, 2, 3], "feature_steps": 3},
    # The tiny backbone of test_study, class-conditional (the teacher of distilled students).
    "base": {**TINY_STUDY["base"], "model": {**TINY_STUDY["base"]["model"], "num_classes": 10}},
    "arms": [
        {"name": "teacher", "group": "teacher"},
        {
            "name": "student-w2",
            "group": "students",
            "set": {
                "train.objective": "distill",
                "train.train_base": False,
                "train.init_from": "arm:teacher",
                "distill.guidance": 2,
                "distill.rank": 2,
            },
        },
        {
            "name": "student-range",
            "group": "students",
            "set": {
                "train.objective": "distill",
                "train.train_base": False,
                "train.init_from": "arm:teacher",
                "distill.guidance_range": [1.5, 5],
                "distill.guidance": 3,
                "distill.rank": 2,
            },
        },
        {"name": "teacher-of-w2", "group": "teacher", "teacher_of": "student-w2"},
    ],
    "claims": [
        {
            "text": "student keeps the teacher's quality at w=2",
            "arm": "student-w2",
            "baseline": "teacher",
            "relation": "not_worse",
            "margin": 0.2,
            "guidance": 2,
        }
    ],
}


@pytest.fixture(autouse=True)
def clean_tree(monkeypatch):
    monkeypatch.setattr(study_mod, "git_state", lambda ignore=None: ("c0ffee" * 6 + "c0ff", False))


def _write(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_init_from_arm_resolves_per_seed_and_orders_dependencies_first(tmp_path):
    study = load_study(_write(tmp_path, TINY))
    teacher, w2, rng, teacher_of = study.arms
    assert [a.name for a in run_order(study, [teacher_of])] == ["teacher", "student-w2", "teacher-of-w2"]
    assert [a.name for a in run_order(study, [rng, w2])] == ["teacher", "student-range", "student-w2"]
    assert [a.name for a in run_order(study, [teacher])] == ["teacher"]
    cfg = arm_config(study, w2, 1, tmp_path / "out")
    assert cfg.train.init_from == str(tmp_path / "out" / "teacher" / "seed1")
    assert arm_config(study, teacher, 1, tmp_path / "out").train.init_from is None
    # Without --out: the study's own output directory (runs/<name> when the YAML sets none).
    assert arm_config(study, w2, 0).train.init_from == str(Path("runs") / "tiny-distill" / "teacher" / "seed0")
    # Eval scales: the teacher at every scale, a fixed-w student at its w, the range student inside its range.
    scales = [eval_settings(study, a, arm_config(study, a, 0))["guidance"] for a in study.arms]
    assert scales == [[1.0, 2.0, 3.0], [2.0], [2.0, 3.0], [1.0, 2.0, 3.0]]


def test_only_a_student_trains_its_teacher_first_and_a_second_call_reuses_both(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    tree = {**TINY, "seeds": [0], "report_dir": str(tmp_path / "docs")}
    path, out = _write(tmp_path, tree), tmp_path / "out"
    logs: list[str] = []
    report = run_study(path, out=out, only=["teacher-of-w2"], progress=False, log=logs.append)
    assert any("[teacher] runs too" in line for line in logs)
    trained = [line.split("]")[0][1:] for line in logs if "] train " in line]
    assert trained == ["teacher seed 0", "student-w2 seed 0", "teacher-of-w2 seed 0"]
    assert not (out / "teacher-of-w2" / "seed0" / "checkpoints").exists()  # scores, never trains
    # The teacher held in the student's files scores exactly as the teacher arm's own run.
    fds = [
        [r["fd"] for r in json.loads((out / a / "seed0" / "eval" / "metrics.json").read_text())["results"]]
        for a in ("teacher", "teacher-of-w2")
    ]
    assert fds[0] == pytest.approx(fds[1], rel=1e-6) and len(fds[0]) == 3
    cfg = json.loads((out / "student-w2" / "seed0" / "config.json").read_text())
    assert cfg["train"]["init_from"] == str(out / "teacher" / "seed0")
    metrics = json.loads((out / "student-w2" / "seed0" / "eval" / "metrics.json").read_text())
    assert metrics["settings"]["guidance"] == [2.0] and not metrics["settings"]["teacher"]
    text = report.read_text()
    assert "| student-w2 | 2 | 2 |" in text and "| teacher-of-w2 | - | 3 |" in text
    logs.clear()
    run_study(path, out=out, only=["teacher-of-w2"], progress=False, log=logs.append)
    assert sum("done already" in line for line in logs) == 3


def test_a_recorded_run_still_trains_when_an_arm_that_starts_from_it_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    tree = {**TINY, "seeds": [0], "report_dir": str(tmp_path / "docs"), "claims": []}
    path, out = _write(tmp_path, tree), tmp_path / "out"
    records = tmp_path / "docs" / "tiny-distill" / "records"
    run_study(path, out=out, only=["teacher-of-w2"], progress=False, log=lambda _m: None)
    assert {p.parent.name for p in records.glob("*/seed0.json")} == {"teacher", "student-w2", "teacher-of-w2"}
    # The student's record names the base it adapted by the fingerprint its checkpoint stored when it
    # loaded the teacher (no machine path); the teacher, trained from scratch, has none.
    student = json.loads((records / "student-w2" / "seed0.json").read_text())
    state = json.loads(next((out / "student-w2" / "seed0" / "checkpoints").glob("step_*/state.json")).read_text())
    assert student["base"] == {k: state["base"][k] for k in ("fingerprint", "step", "weights")}
    assert len(student["base"]["fingerprint"]) == 64 and "base" not in json.loads(
        (records / "teacher" / "seed0.json").read_text()
    )
    # A fresh clone with every record: nothing runs, not even the teacher the others start from.
    shutil.rmtree(out)
    logs: list[str] = []
    run_study(path, out=out, only=["teacher-of-w2"], progress=False, log=logs.append)
    assert sum("recorded already" in line for line in logs) == 3 and not any(out.iterdir())
    # The scores of the teacher held in the student lost: the student and the teacher it starts
    # from train again (both recorded), since that evaluation needs their files.
    (records / "teacher-of-w2" / "seed0.json").unlink()
    logs.clear()
    run_study(path, out=out, only=["teacher-of-w2"], progress=False, log=logs.append)
    trained = [line.split("]")[0][1:] for line in logs if "] train " in line]
    assert trained == ["teacher seed 0", "student-w2 seed 0", "teacher-of-w2 seed 0"]
    assert not any("recorded already" in line for line in logs)


def test_a_teacher_shared_by_every_seed_is_scored_once(tmp_path, monkeypatch):
    # Students of every seed start from one fixed base: the teacher held in their files is the same
    # model, so seed 1 copies seed 0's scores instead of drawing the same samples again.
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "out" / "teacher" / "seed0"
    tree = {**TINY, "report_dir": str(tmp_path / "docs"), "claims": []}
    run_study(_write(tmp_path, {**tree, "seeds": [0]}), out=tmp_path / "out", only=["teacher"], progress=False)
    student = {**TINY["arms"][1], "set": {**TINY["arms"][1]["set"], "train.init_from": str(base)}}
    tree["arms"] = [student, {"name": "teacher-of-w2", "group": "teacher", "teacher_of": "student-w2"}]
    logs: list[str] = []
    run_study(_write(tmp_path, tree), out=tmp_path / "shared", progress=False, log=logs.append)
    assert [line.split("]")[0][1:] for line in logs if "] train " in line] == [
        "student-w2 seed 0",
        "student-w2 seed 1",
        "teacher-of-w2 seed 0",
    ]
    assert any(line.startswith("[teacher-of-w2 seed 1] the same teacher as") for line in logs)
    runs = [tmp_path / "shared" / "teacher-of-w2" / f"seed{k}" for k in (0, 1)]
    for name in ("eval/metrics.json", "accounting.json"):
        assert (runs[1] / name).read_text() == (runs[0] / name).read_text()
    assert not (runs[1] / "eval.partial").exists()
    # Seed-dependent teachers (arm:NAME) are scored per seed: the first test's study evaluates both.
    study = load_study(_write(tmp_path, TINY))
    settings = eval_settings(study, study.arms[3], arm_config(study, study.arms[3], 1))
    assert study_mod._shared_teacher_eval(study, study.arms[3], 1, tmp_path / "out", settings) is None


def test_an_arm_with_its_own_eval_scores_selective_guidance_at_the_students_cost(tmp_path, monkeypatch):
    # The guided teacher at other steps with CFG on half of them (selective guidance): an arm's
    # own eval settings, recorded, named in the report, and a rerun reuses every run.
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    selective = {"name": "selective", "group": "teacher", "teacher_of": "student-w2"}
    selective["eval"] = {"steps": 4, "guidance": [2], "guidance_fraction": 0.5}
    tree = {**TINY, "seeds": [0], "report_dir": str(tmp_path / "docs"), "arms": [*TINY["arms"][:2], selective]}
    path, out = _write(tmp_path, tree), tmp_path / "out"
    report = run_study(path, out=out, progress=False, log=lambda _m: None)
    settings = json.loads((out / "selective" / "seed0" / "eval" / "metrics.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance"], settings["guidance_fraction"]) == (4, [2.0], 0.5)
    assert (settings["teacher"], settings["num_samples"]) == (True, 8)
    assert "- eval of `selective`: steps 4, guidance [2.0], guidance fraction 0.5" in report.read_text()
    # A metrics.json written before the fraction was recorded ran at 1 and still counts as done.
    mpath = out / "teacher" / "seed0" / "eval" / "metrics.json"
    m = json.loads(mpath.read_text())
    del m["settings"]["guidance_fraction"]
    mpath.write_text(json.dumps(m))
    logs: list[str] = []
    run_study(path, out=out, progress=False, log=logs.append)
    assert sum("done already" in line for line in logs) == 3


def _row(arm: str, w: float, fds: list[float]) -> dict:
    mean = sum(fds) / len(fds)
    return {"arm": arm, "guidance": w, "fd": (mean, 0.0), "values": {"fd": fds}}


def test_a_claim_with_a_guidance_compares_both_arms_at_that_scale():
    rows = [
        _row("teacher", 1.0, [1.0, 1.1, 0.9]),  # the teacher's best scale
        _row("teacher", 2.0, [5.0, 5.2, 4.8]),
        _row("student", 2.0, [5.1, 5.0, 4.9]),
    ]
    at2 = Claim(text="c", arm="student", baseline="teacher", relation="not_worse", margin=0.2, guidance=2.0)
    v = claim_verdict(at2, rows, 0.05)
    assert v["b"]["guidance"] == 2.0 and v["verdict"] == "holds"
    best = claim_verdict(at2.model_copy(update={"guidance": None}), rows, 0.05)
    assert best["b"]["guidance"] == 1.0 and best["verdict"] == "does not hold"
    missing = claim_verdict(at2.model_copy(update={"guidance": 4.0}), rows, 0.05)
    assert missing["verdict"] == "not run" and "guidance 4" in missing["test"]


def test_a_class_accuracy_claim_takes_each_arms_highest_accuracy():
    def row(arm: str, w: float, accs: list[float]) -> dict:
        return {"arm": arm, "guidance": w, "class_accuracy": (sum(accs) / 3, 0.0), "values": {"class_accuracy": accs}}

    rows = [row("teacher", 1.0, [0.80, 0.81, 0.79]), row("teacher", 3.0, [0.97, 0.98, 0.975])]
    rows.append(row("student", 3.0, [0.90, 0.91, 0.905]))
    claim = Claim(text="c", arm="student", baseline="teacher", relation="better", metric="class_accuracy")
    v = claim_verdict(claim, rows, 0.05)
    assert v["b"]["guidance"] == 3.0 and v["verdict"] == "does not hold"


@pytest.mark.parametrize(
    "arms, message",
    [
        (
            [{"name": "a", "set": {"train.init_from": "arm:nope"}}],
            r"'a' starts from arm 'nope' \(arm:nope\), which is not an arm",
        ),
        ([{"name": "a", "set": {"train.init_from": "arm:a"}}], r"cycle: a -> a"),
        ([{"name": "a"}, {"name": "t", "teacher_of": "a"}], r"teacher_of needs an arm of LoRA-distilled students"),
        ([{"name": "a"}, {"name": "t", "teacher_of": "a", "set": {"train.lr": 1}}], r"it takes no set or adapters"),
        (
            [
                {
                    "name": "s",
                    "set": TINY["arms"][1]["set"] | {"train.init_from": "x"},
                    "eval": {"guidance_fraction": 0.5},
                }
            ],
            r"arm 's': eval.guidance_fraction applies to classifier-free guidance, which a distilled student does not",
        ),
        (
            [{"name": "u", "set": {"model.num_classes": 0}, "eval": {"guidance_fraction": 0.5}}],
            r"which an unconditional model does not do",
        ),
        ([{"name": "a", "eval": {"guidance_fraction": 2}}], r"less than or equal to 1"),
        (
            [{"name": "a", "set": {"train.init_from": "arm:b"}}, {"name": "b", "set": {"train.init_from": "arm:a"}}],
            r"cycle: a -> b -> a",
        ),
    ],
)
def test_unknown_or_cyclic_dependencies_are_clear_errors(tmp_path, arms, message):
    with pytest.raises(StudyError, match=message):
        load_study(_write(tmp_path, {**TINY, "arms": arms, "claims": []}))


@pytest.mark.parametrize("name", ["digits", "fashion-mnist"])
def test_committed_distillation_studies_are_valid(name):
    # load_study resolves every arm's config, so a bad key in a committed study fails here.
    study = load_study(EXPERIMENTS_DIR / "distill" / f"{name}.yaml")
    assert len(study.seeds) >= 3 and {1.5, 2, 3, 4} <= set(study.eval.guidance)
    assert [a.name for a in study.arms][0] == "teacher"
    students = [a for a in study.arms if a.teacher_of is None and a.name != "teacher"]
    cfgs = {a.name: arm_config(study, a, 0) for a in students}
    # One student per w, the full fine-tune at w = 3, and (issue 31) the attention-only LoRA at w = 3.
    assert sorted(c.distill.guidance for c in cfgs.values() if c.distill.guidance_range is None) == [1.5, 2, 3, 3, 3, 4]
    assert [n for n, c in cfgs.items() if c.distill.targets] == ["lora-w3-attn"]
    assert sum(c.train.train_base for c in cfgs.values()) == 1  # the full fine-tune with a teacher copy
    assert [c.distill.guidance_range for c in cfgs.values() if c.distill.guidance_range] == [(1.0, 5.0)]
    # The guided teacher at the students' cost: steps + guided steps = the students' passes of N (+1).
    priced = [a for a in study.arms if a.eval is not None]
    for e in (study.eval_of(a) for a in priced):
        assert e.steps + round(e.guidance_fraction * e.steps) in (study.eval.steps, study.eval.steps + 1)
    assert len(priced) == 3 and all(a.teacher_of == "lora-w3" for a in priced)


def test_the_claims_table_prints_a_dash_for_a_claim_with_no_test(tmp_path):
    # One seed in an arm: "not testable", and no statistic or p-value to print ("nan" was printed).
    study = load_study(_write(tmp_path, TINY))
    claim = Claim(text="c", arm="student-w2", baseline="teacher", relation="better")
    study = study.model_copy(update={"claims": [claim]})

    def row(arm: str, fds: list[float]) -> dict:
        seeds = list(range(len(fds)))
        record = {"arm": arm, "guidance": 2.0, "fd": (sum(fds) / len(fds), 0.0), "values": {"fd": fds}}
        return record | {"parameters": {"trainable": 10}, "steps": 5, "seeds": seeds, "eval_seeds": seeds}

    one_seed = claims_section(study, [row("teacher", [3.0, 3.2]), row("student-w2", [2.0])])[-1]
    assert "**not testable**" in one_seed and one_seed.endswith("needs at least 2 seeds per arm | - | - |")
    tested = claims_section(study, [row("teacher", [3.0, 3.2]), row("student-w2", [2.0, 2.1])])[-1]
    assert "**holds**" in tested and "nan" not in tested and tested.split(" | ")[-1].rstrip(" |") != "-"
