"""The study runner: a tiny study (2 arms x 2 seeds) trains, evaluates and reports; a second call reuses
every finished run; a bad key or a bad arm override is a clear error; the claim verdicts follow the
noise band."""

import math
from pathlib import Path

import pytest
import yaml

from difflora.cli import main
from difflora.experiments.study import Claim, StudyError, _verdict, load_study, run_study

ROOT = Path(__file__).resolve().parents[1]

TINY_STUDY = {
    "name": "tiny-study",
    "seeds": [0, 1],
    "eval": {"num_samples": 8, "steps": 2, "guidance": [1, 2], "feature_steps": 3},
    "base": {
        "data": {"name": "digits"},
        "model": {
            "num_classes": 0,
            "unet": {
                "model_channels": 8,
                "num_res_blocks": 1,
                "attention_resolutions": [4],
                "channel_mult": [1, 2],
                "num_heads": 2,
            },
        },
        "diffusion": {"steps": 20},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "ckpt_every": 2, "device": "cpu"},
        "sample": {"num": 2, "steps": 2},
    },
    "arms": [
        {"name": "time-embed", "group": "unconditional"},
        {
            "name": "tclora",
            "group": "class-conditional",
            "set": {"model.num_classes": 10, "model.time_embed": False, "model.class_embed": False},
            "adapters": [
                {"name": "time", "condition": "t", "weighting": "linear", "num_values": 20, "num_bases": 3, "rank": 2},
                {"name": "cls", "condition": "y", "weighting": "index", "num_values": 10, "rank": 2},
            ],
        },
    ],
    "claims": [{"text": "LoRA wins", "arm": "tclora", "baseline": "time-embed", "relation": "better"}],
}


def _write(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_tiny_study_reports_and_reuses_finished_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path, TINY_STUDY)
    out = tmp_path / "out"
    logs: list[str] = []
    report = run_study(path, out=out, progress=False, log=logs.append)
    text = report.read_text()
    # One row per unconditional arm, one per guidance scale of the class-conditional arm.
    rows = [ln for ln in text.splitlines() if ln.startswith("| unconditional") or ln.startswith("| class-cond")]
    assert len(rows) == 3
    assert "| time-embed | 1 |" in text and "| tclora | 1 |" in text and "| tclora | 2 |" in text
    assert "git revision" in text and f"difflora study {path}" in text
    assert "LoRA wins" in text
    assert (out / "tiny-study" / "samples-tclora-w2.png").is_file()
    ckpts = sorted(out.glob("*/seed*/checkpoints/*/model.safetensors"))
    assert len(ckpts) == 4
    mtimes = [c.stat().st_mtime_ns for c in ckpts]
    metrics = sorted(out.glob("*/seed*/eval/metrics.json"))
    m_mtimes = [m.stat().st_mtime_ns for m in metrics]

    logs.clear()
    run_study(path, out=out, progress=False, log=logs.append)
    assert sum("done already" in ln for ln in logs) == 4
    assert [c.stat().st_mtime_ns for c in ckpts] == mtimes
    assert [m.stat().st_mtime_ns for m in metrics] == m_mtimes


def test_a_changed_arm_does_not_reuse_another_config(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    tree = {**TINY_STUDY, "arms": TINY_STUDY["arms"][:1], "seeds": [0], "claims": []}
    run_study(_write(tmp_path, tree), out=tmp_path / "out", progress=False, log=lambda _m: None)
    tree["base"] = {**tree["base"], "train": {**tree["base"]["train"], "lr": 0.5}}
    with pytest.raises(StudyError, match="another config"):
        run_study(_write(tmp_path, tree), out=tmp_path / "out", progress=False, log=lambda _m: None)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sedes": [0]}, "sedes: unknown key"),
        ({"arms": [{"name": "a", "sett": {}}]}, "arms.0.sett: unknown key"),
        ({"eval": {"num_samples": 2}}, "eval.num_samples"),
        ({"arms": [{"name": "a", "set": {"train.lrr": 1.0}}]}, "(?s)arm 'a'.*train.lrr: unknown key"),
        ({"arms": [{"name": "a"}, {"name": "a"}]}, "duplicate arm names"),
        ({"claims": [{"text": "x", "arm": "nope", "baseline": "time-embed"}]}, "'nope' .* is not an arm"),
    ],
)
def test_bad_study_yaml_is_a_clear_error(tmp_path, change, message):
    with pytest.raises(StudyError, match=message):
        load_study(_write(tmp_path, {**TINY_STUDY, "claims": [], **change}))


def test_cli_reports_a_bad_study_in_one_line(tmp_path, capsys):
    assert main(["study", str(_write(tmp_path, {**TINY_STUDY, "sedes": [0]}))]) == 2
    assert "sedes: unknown key" in capsys.readouterr().err


def _row(arm: str, fd: tuple[float, float], n: int = 3, w: float = 1.0) -> dict:
    return {"arm": arm, "fd": fd, "seeds": list(range(n)), "guidance": w}


def test_claim_verdicts_use_two_standard_errors():
    # Band = 2 sqrt(3^2/3 + 3^2/3) = 2 sqrt(6) = 4.899.
    band = 2 * math.sqrt(6)
    better = Claim(text="", arm="a", baseline="b", relation="better")
    not_worse = Claim(text="", arm="a", baseline="b", relation="not_worse")
    base = _row("b", (20.0, 3.0))
    assert _verdict(better, [_row("a", (20.0 - band - 0.01, 3.0)), base])[0] == "holds"
    assert _verdict(better, [_row("a", (20.0 - band + 0.01, 3.0)), base])[0].startswith("within noise")
    assert _verdict(better, [_row("a", (20.0 + band + 0.01, 3.0)), base])[0] == "does not hold"
    assert _verdict(not_worse, [_row("a", (20.0 + band - 0.01, 3.0)), base])[0] == "holds"
    assert _verdict(not_worse, [_row("a", (20.0 + band + 0.01, 3.0)), base])[0] == "does not hold"
    # An arm with several guidance scales is judged at its best one.
    rows = [_row("a", (30.0, 0.0), w=1.0), _row("a", (10.0, 0.0), w=4.0), _row("b", (20.0, 0.0))]
    assert _verdict(better, rows) == ("holds", _verdict(better, rows)[1]) and "w=4" in _verdict(better, rows)[1]


@pytest.mark.parametrize("name", ["digits", "fashion-mnist"])
def test_committed_timelora_studies_are_valid(name):
    # load_study resolves every arm's config too, so a bad key or adapter in a committed study fails here.
    study = load_study(ROOT / "experiments" / "timelora" / f"{name}.yaml")
    assert len(study.seeds) >= 3
    groups = {a.group for a in study.arms}
    assert groups == {"unconditional", "class-conditional"} and len(study.arms) == 10
    assert study.eval.guidance == [1.0, 2.0, 4.0]
