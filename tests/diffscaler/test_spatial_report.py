"""The study report of spatial arms: one row per task, a row averaging the tasks (claims), fidelity."""

from __future__ import annotations

import json

import pytest

from difflora.experiments.report import ALL_TASKS, summarise, write_report
from difflora.experiments.study_spec import load_study
from difflora.presets import EXPERIMENTS_DIR

TASKS = ("edges", "lowres", "inpaint")


def _record(arm: str, seed: int, fds: tuple[float, float, float]) -> dict:
    fidelity = {"edges": {"edge_f1": 0.5 + seed / 10}, "lowres": {"lowres_psnr": 20.0}, "inpaint": {"known_mse": 0.1}}
    results = [
        {"guidance": 1.0, "task": t, "fd": fd, "kid_mean": 0.0, "precision": 0.5, "recall": 0.5, "ci": {}}
        | {"sample_images_per_s": 10.0, "fidelity": fidelity[t], "grid": f"samples_w1_{t}.png"}
        for t, fd in zip(TASKS, fds, strict=True)
    ]
    floor = {k: {"mean": 0.0, "std": 0.0} for k in ("fd", "kid_mean", "precision", "recall")}
    return {
        "arm": arm,
        "seed": seed,
        "eval": {"results": results, "noise_floor": floor, "settings": {"labels": None}},
        "parameters": {"total": 10, "trainable": 5, "by_group": {"adapters": 5}},
        "train_images_per_s": 100.0,
    }


def test_spatial_rows_average_tasks_per_seed_and_list_fidelity(tmp_path):
    study = load_study(EXPERIMENTS_DIR / "diffscaler" / "spatial.yaml")
    arms = [a for a in study.arms if a.name in ("affiner-concat", "controlnet")]
    # affiner: task FDs (1, 2, 3) and (3, 4, 5) -> per-seed means 2 and 4; controlnet 6 and 7.
    seeds = {"affiner-concat": [(1.0, 2.0, 3.0), (3.0, 4.0, 5.0)], "controlnet": [(5.0, 6.0, 7.0), (6.0, 7.0, 8.0)]}
    records = {a: [_record(a, s, fds) for s, fds in enumerate(v)] for a, v in seeds.items()}
    rows = summarise(study, records, arms)
    assert [(r["arm"], r.get("task")) for r in rows[:4]] == [
        ("affiner-concat", "edges"),
        ("affiner-concat", "lowres"),
        ("affiner-concat", "inpaint"),
        ("affiner-concat", ALL_TASKS),
    ]
    mean = rows[3]
    assert mean["values"]["fd"] == [2.0, 4.0] and mean["fd"][0] == pytest.approx(3.0)
    assert mean["fd"][1] == pytest.approx(2**0.5)  # sample std of (2, 4)
    assert rows[0]["fidelity"]["edge_f1"] == pytest.approx((0.55, 0.1 / 2**0.5))  # seeds: 0.5, 0.6
    img = tmp_path / study.name / "records"
    for arm, recs in records.items():
        for rec in recs:
            path = img / arm / f"seed{rec['seed']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rec))
    text = write_report(study, tmp_path, arms, command="difflora study", dirty=False).read_text()
    assert "| affiner-concat [lowres] | 1 | - | 20.000 ± 0.000 | - |" in text
    assert "| spatial | affiner-concat [all tasks] | 1000 | 1 | 3.00 ± 1.41 |" in text
    # The claim compares the task means (3 vs 6.5), not the best task (1 vs 5).
    assert "3.00" in text.split("## Claims")[1]


def test_the_study_log_line_names_each_spatial_task():
    from difflora.experiments.study import fd_summary

    spatial = _record("affiner-concat", 0, (7.2334, 25.9411, 23.5631))["eval"]["results"]
    assert fd_summary(spatial) == "edges w=1: 7.233, lowres w=1: 25.941, inpaint w=1: 23.563"
    assert fd_summary([{"guidance": 0.0, "fd": 40.786}, {"guidance": 2.0, "fd": 12.0}]) == "w=0: 40.786, w=2: 12.000"
