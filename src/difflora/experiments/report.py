"""A study's markdown report, generated from small per-run records so it can be regenerated exactly.

Each finished run contributes a record, ``<report>/<name>/records/<arm>/seed<k>.json``: its evaluation
(``eval/metrics.json``: scores, bootstrap intervals, noise floor) and its parameter counts and
speeds, and the git revision of the code that scored it. The records are small and meant to be
committed next to the report; the report is a pure function of the study YAML and the records (it
names the revisions they were made at, not the revision writing it), so ``difflora study STUDY
--report-only`` rewrites the same file on a fresh clone (without the runs) and at any later
revision. Text after the line ``<!-- end of generated report -->`` in an existing report is kept:
the place for a reading of the results written by hand.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from difflora.config.schema import Config
from difflora.eval.uncertainty import reported_interval
from difflora.experiments.claims_table import ALL_TASKS, claim_verdict, claims_section, pm
from difflora.experiments.settings import eval_settings, find_scored, same_config, scored_with
from difflora.experiments.study_spec import (
    Study,
    StudyArm,
    StudyError,
    arm_config,
    arm_dependency,
    read_run_json,
)
from difflora.files.atomic import write_bytes
from difflora.files.jsonfile import read_json_file
from difflora.registry import Registry


class ReportFigure(Protocol):
    """A figure a paper adds to study reports, e.g. 000's trained TimeLoRA weights.

    ``draw`` makes its images from the runs in ``out_dir`` into the report's image directory and
    returns one note per failure (a figure is not a result: a failure is reported, the report is
    still written); ``section`` returns the report's markdown lines showing the images found in
    ``img_dir`` (none: no lines), so ``--report-only`` shows them without the runs.
    """

    def draw(self, study: Study, out_dir: Path, img_dir: Path, arms: list[StudyArm]) -> list[str]: ...

    def section(self, study: Study, img_dir: Path, arms: list[StudyArm]) -> list[str]: ...


# The figures of study reports, in registration order (after the samples); a paper package adds
# its own in its register() (difflora.registry).
REPORT_FIGURES: Registry[ReportFigure] = Registry("experiments.report_figure")

# A record is a copy of a run's scores, so a damaged one is rebuilt from the run.
REBUILD_RECORD = "delete it: `difflora study STUDY --report-only` writes it again from the run"

__all__ = [
    "CODE_FILE",
    "END_MARKER",
    "REPORT_FIGURES",
    "claim_verdict",
    "ReportFigure",
    "copy_records",
    "draw_figures",
    "load_records",
    "matching_record",
    "record_path",
    "split_stale",
    "summarise",
    "sync_records",
    "write_report",
]

END_MARKER = "<!-- end of generated report -->"
# The state of the code that scored a run ({"revision", "dirty"}), stamped by the study in the run's
# eval directory; its record takes it from there.
CODE_FILE = "code.json"
_SCORES = ("fd", "kid_mean", "precision", "recall", "class_accuracy")


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def record_path(img_dir: Path, arm: str, seed: int) -> Path:
    """Where the record of (``arm``, ``seed``) lives under a report's image directory."""
    return img_dir / "records" / arm / f"seed{seed}.json"


def matching_record(study: Study, img_dir: Path, arm: StudyArm, seed: int, cfg: Config) -> Path | None:
    """The record of (``arm``, ``seed``) if it scores a run of config ``cfg`` with the study's eval
    settings, else None. A record written before records held their run's config never matches:
    nothing would show it is this config's."""
    path = record_path(img_dir, arm.name, seed)
    if not path.is_file():
        return None
    record = read_json_file(path, fix=REBUILD_RECORD, error=StudyError, expect=dict)
    saved = record.get("config")
    if isinstance(saved, dict) and arm_dependency(study, arm) is not None and isinstance(saved.get("train"), dict):
        # Where the run it started from lay (the study's output directory then) does not change the
        # config; which run it was does, and the caller checks that run's record too.
        saved = {**saved, "train": {**saved["train"], "init_from": cfg.train.init_from}}
    if not isinstance(saved, dict) or not same_config(saved, cfg):
        return None
    return path if scored_with(record["eval"], cfg, eval_settings(study, arm, cfg)) else None


def sync_records(study: Study, out_dir: Path, img_dir: Path, arms: list[StudyArm]) -> int:
    """Write the record of every finished run of ``out_dir`` (metrics with the study's eval settings); returns how many."""
    written = 0
    for arm in arms:
        for seed in study.seeds:
            run_dir = out_dir / arm.name / f"seed{seed}"
            apath = run_dir / "accounting.json"
            cfg = arm_config(study, arm, seed)
            found = find_scored(run_dir, cfg, eval_settings(study, arm, cfg), arm.teacher_of is not None)
            if found is None or not apath.is_file():
                continue
            # The run's own config (a teacher_of arm's: its students'), so a fresh clone can tell
            # which config a record scores (matching_record) without the run.
            trained = out_dir / arm.teacher_of / f"seed{seed}" if arm.teacher_of else run_dir
            m = found.metrics
            acc = read_run_json(apath)
            # Machine-specific paths and settings stay out of a record meant for the repository.
            m = {k: v for k, v in m.items() if k not in ("run_dir", "device", "threads")}
            m["feature_net"] = {k: v for k, v in m["feature_net"].items() if k != "source"}
            record = {
                "arm": arm.name,
                "seed": seed,
                "eval": m,
                "parameters": acc["parameters"],
                "train_images_per_s": acc["train_images_per_s"],
            }
            if (trained / "config.json").is_file():
                record["config"] = read_run_json(trained / "config.json")
            base = _base_of(trained, m.get("checkpoint_step"))
            if base is not None:
                record["base"] = base
            path = record_path(img_dir, arm.name, seed)
            code = _run_code(found.path, path, m)
            if code is not None:
                record["code"] = code
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(path, _dump(record))
            if seed == study.seeds[0]:
                for r in m["results"]:
                    _copy(found.path / r["grid"], img_dir / _grid_name(arm.name, r))
            written += 1
    return written


def copy_records(study: Study, src: Path, dst: Path, runs: dict[tuple[str, int], Path]) -> int:
    """Copy the records of ``runs`` ({(arm, seed): record}, e.g. committed ones a study skipped) and
    the first seed's sample grids from the image directory ``src`` to ``dst``, so a report written
    elsewhere shows every run it reuses; returns how many records were copied."""
    for (arm, seed), path in runs.items():
        target = record_path(dst, arm, seed)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(target, path.read_bytes())
        if seed == study.seeds[0]:
            record = read_json_file(path, fix=REBUILD_RECORD, error=StudyError, expect=dict)
            for r in record["eval"]["results"]:
                _copy(src / _grid_name(arm, r), dst / _grid_name(arm, r))
    return len(runs)


def _grid_name(arm: str, entry: dict[str, Any]) -> str:
    """The report's file name of the sample grid of a result entry (or a summary row) of ``arm``."""
    task = f"-{entry['task']}" if entry.get("task") else ""  # one grid per spatial task
    return f"samples-{arm}-w{entry['guidance']:g}{task}.png"


def _base_of(run_dir: Path, step: int | None) -> dict[str, Any] | None:
    """What the scored checkpoint of ``run_dir`` adapted: the base's fingerprint, step and weights (its
    checkpoint's ``base`` record without the machine's paths), or None for a run trained from scratch.
    A record keeps it so that one can tell, later and elsewhere, whether a base trained again is the same."""
    if step is None:
        return None
    state = run_dir / "checkpoints" / f"step_{int(step):07d}" / "state.json"
    if not state.is_file():
        return None
    base = read_run_json(state).get("base")
    if not isinstance(base, dict) or "fingerprint" not in base:
        return None
    return {k: base[k] for k in ("fingerprint", "step", "weights", "format") if k in base}


def _run_code(eval_dir: Path, path: Path, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The state of the code that scored the evaluation in ``eval_dir``: its stamp (:data:`CODE_FILE`), or for a run
    scored before runs were stamped, the one its record at ``path`` holds if that record has the same
    scores (a backfilled record keeps its revision); None when nothing says which code it was."""
    stamp = eval_dir / CODE_FILE
    if stamp.is_file():
        return read_run_json(stamp)
    if not path.is_file():
        return None
    old = read_json_file(path, fix=REBUILD_RECORD, error=StudyError, expect=dict)
    return old.get("code") if old.get("eval") == metrics else None


def load_records(study: Study, img_dir: Path, arms: list[StudyArm]) -> dict[str, list[dict[str, Any]]]:
    """Records by arm name (seeds in the study's order); arms without records are left out."""
    out: dict[str, list[dict[str, Any]]] = {}
    for arm in arms:
        recs = []
        for seed in study.seeds:
            path = record_path(img_dir, arm.name, seed)
            if path.is_file():
                recs.append(read_json_file(path, fix=REBUILD_RECORD, error=StudyError, expect=dict))
        if recs:
            out[arm.name] = recs
    return out


def split_stale(
    study: Study, records: dict[str, list[dict[str, Any]]], arms: list[StudyArm]
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """(the records that score their arm's config with the study's eval settings, ``arm seedK`` of the
    others). A record written before records held their config is checked on the eval settings it holds."""
    kept: dict[str, list[dict[str, Any]]] = {}
    stale: list[str] = []
    for arm in arms:
        for rec in records.get(arm.name, []):
            cfg = arm_config(study, arm, rec["seed"])
            saved = rec.get("config")
            settings = eval_settings(study, arm, cfg)
            if not isinstance(saved, dict):  # an older record: what it recorded of its settings must match
                ev = rec["eval"]
                scored = {
                    "settings": settings | ev["settings"],
                    "checkpoint_step": ev.get("checkpoint_step", cfg.train.steps),
                }
                ok = scored_with(scored, cfg, settings)
            else:
                ok = same_config(saved, _same_start(study, arm, cfg, saved)) and scored_with(rec["eval"], cfg, settings)
            if ok:
                kept.setdefault(arm.name, []).append(rec)
            else:
                stale.append(f"{arm.name} seed{rec['seed']}")
    return kept, stale


def _same_start(study: Study, arm: StudyArm, cfg: Config, saved: dict[str, Any]) -> Config:
    """``cfg`` with the record's ``train.init_from`` when the arm starts from another arm's run
    (``arm:NAME``), whose path depends on the machine's output directory, not on the config."""
    train = saved.get("train")
    if arm_dependency(study, arm) is None or not isinstance(train, dict):
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": train.get("init_from")})})


def _mean_std(values: list[float | None]) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    mean = math.fsum(vals) / len(vals)
    var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return mean, math.sqrt(var)


def summarise(study: Study, records: dict[str, list[dict[str, Any]]], arms: list[StudyArm]) -> list[dict[str, Any]]:
    """One row per (arm, guidance scale): each score's per-seed values, mean and sample std over seeds."""
    rows = []
    for arm in arms:
        recs = records.get(arm.name)
        if not recs:
            continue
        for i, w in enumerate(r["guidance"] for r in recs[0]["eval"]["results"]):
            entries = [rec["eval"]["results"][i] for rec in recs]
            row: dict[str, Any] = {
                "arm": arm.name,
                "group": arm.group,
                "guidance": w,
                "seeds": [rec["seed"] for rec in recs],
                # Records written before the eval seed was recorded ('-') used the study's eval.seed of then.
                "eval_seeds": [rec["eval"]["settings"].get("seed", "-") for rec in recs],
                # A teacher_of arm trains nothing (its teacher is another arm's base).
                "steps": "-" if arm.teacher_of else arm_config(study, arm, study.seeds[0]).train.steps,
                "parameters": recs[0]["parameters"],
                "train_images_per_s": _mean_std([rec["train_images_per_s"] for rec in recs]),
                "sample_images_per_s": _mean_std([e["sample_images_per_s"] for e in entries]),
                "floor": recs[0]["eval"]["noise_floor"],
                "labels": recs[0]["eval"]["settings"]["labels"],
                "values": {k: [e.get(k) for e in entries] for k in _SCORES},
                # Mean bootstrap 95% interval over seeds: how far one run's score moves with its samples.
                "ci": {k: [_mean_std([e["ci"][k][j] for e in entries]) for j in (0, 1)] for k in entries[0]["ci"]},
            }
            for key in _SCORES:
                row[key] = _mean_std(row["values"][key])
            rows.append(row | _task_fields(entries))
        rows += _all_tasks_rows(rows[len(rows) - len(recs[0]["eval"]["results"]) :])
    return rows


def _task_fields(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A spatial task's row (``data.spatial``): its name and condition-fidelity scores over seeds."""
    if "task" not in entries[0]:
        return {}
    fid = {k: _mean_std([e["fidelity"][k] for e in entries]) for k in entries[0]["fidelity"]}
    return {"task": entries[0]["task"], "fidelity": fid}


def _all_tasks_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per guidance scale, the mean over an arm's spatial tasks of each seed's scores: the row claims compare."""
    out = []
    for w in dict.fromkeys(r["guidance"] for r in rows if r.get("task")):
        tasks = [r for r in rows if r.get("task") and r["guidance"] == w]
        values = {
            k: [_mean_std([t["values"][k][i] for t in tasks]) for i in range(len(tasks[0]["seeds"]))] for k in _SCORES
        }
        values = {k: [v[0] if v else None for v in vs] for k, vs in values.items()}
        row = tasks[0] | {"task": ALL_TASKS, "values": values, "fidelity": {}, "ci": {}}
        out.append(row | {k: _mean_std(values[k]) for k in _SCORES})
    return out


def _label(row: dict[str, Any]) -> str:
    return f"{row['arm']} [{row['task']}]" if row.get("task") else row["arm"]


def _floor_cell(floor: dict[str, dict[str, float]], key: str, digits: int, scale: float = 1.0) -> str:
    if key not in floor:
        return "-"
    f = floor[key]
    return f"{f['mean'] * scale:.{digits}f} ± {f['std'] * scale:.{digits}f}"


def _arm_evals(arms: list[StudyArm]) -> list[str]:
    """One line per arm evaluated with its own settings (``arms[].eval``)."""
    lines = []
    for arm in arms:
        if arm.eval is None:
            continue
        own = arm.eval.model_dump(exclude_none=True)
        parts = [f"{k.replace('_', ' ')} {v}" for k, v in own.items()]
        lines.append(f"- eval of `{arm.name}`: " + ", ".join(parts) + " (its own settings; the rest as above)")
    return lines


def _code_label(record: dict[str, Any]) -> str:
    code = record.get("code")
    if code is None:
        return "not recorded (a record written before records held it)"
    return f"`{code['revision']}`" + (" with uncommitted changes" if code["dirty"] else "")


def _revision_line(records: dict[str, list[dict[str, Any]]]) -> str:
    """The revision the runs were made at (their records'), or each revision with its number of runs."""
    counts = Counter(_code_label(rec) for recs in records.values() for rec in recs)
    if not counts:
        return "- git revision of the report: none (no run recorded yet)"
    if len(counts) == 1:
        return f"- git revision of the report: {next(iter(counts))}"
    runs = {label: f"{n} run" + ("s" if n > 1 else "") for label, n in counts.items()}
    return "- git revisions of the runs: " + ", ".join(f"{label} ({n})" for label, n in runs.items())


def _header(
    study: Study, rows: list[dict[str, Any]], arms: list[StudyArm], command: str, revision: str, stale: list[str]
) -> list[str]:
    """The report's title, description and settings; ``revision``: its line naming the runs' revisions;
    ``stale``: the records left out (:func:`load_records`)."""
    e = study.eval
    n_done = sum(len(r["seeds"]) for r in {r["arm"]: r for r in rows}.values())
    lines = [f"# {study.name}", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [
        f"- command: `{command}` (add `--report-only` to regenerate this file from the stored runs)",
        revision,
        f"- arms: {len(arms)}, seeds: {study.seeds}; runs with results: {n_done} of {len(arms) * len(study.seeds)}",
        *_missing(study, rows, arms, stale),
        f"- data and backbone: {_setups(study, arms)}; training steps per arm in the table",
        f"- eval: {e.num_samples} samples per setting, {e.sampler} {e.steps} steps, {e.weights} weights, guidance "
        f"{e.guidance} for class-conditional arms (balanced labels; a distilled student at its own w, a "
        "guidance-scale LoRA at the scales in its range; unconditional samples for arms trained with every "
        "label dropped); against the held-out test split; sampling seed "
        + ("the run's own seed (eval.seed: per_run)" if e.seed == "per_run" else f"{e.seed} for every run"),
        *_arm_evals(arms),
        f"- statistics: mean ± sample std over seeds; claims at level alpha = {study.alpha:g}",
        "",
        f"**Scores are comparable only at equal sample counts** (here {e.num_samples} samples against the "
        "held-out split): every estimate, FD most of all, has a bias that depends on the count. Each group "
        "starts with the *noise floor*: the same scores for real images the feature network never saw "
        f"({e.num_samples} drawn like the samples: i.i.d. classes for unconditional arms, the same balanced "
        "classes for class-conditional ones; mean ± std over draws). A perfect generator scores at the floor. "
        "FD is the Frechet distance in the feature space of a classifier difflora trains on its half of the "
        "train split (not Inception FID). KID is the class-stratified unbiased MMD^2 with the cubic kernel on "
        "rescaled features (`difflora.eval.kernel`), x 1e3. Speeds (images/s) were measured during the study's "
        "runs on a machine shared with other work.",
        "",
    ]
    return lines


def _missing(study: Study, rows: list[dict[str, Any]], arms: list[StudyArm], stale: list[str]) -> list[str]:
    """Lines naming the arms with fewer results than seeds and the records left out as another config's."""
    done = {r["arm"]: len(r["seeds"]) for r in rows}
    short = [f"{a.name} ({done.get(a.name, 0)})" for a in arms if done.get(a.name, 0) < len(study.seeds)]
    lines = []
    if short:
        lines.append(
            f"- **missing runs**: {len(short)} arm(s) have fewer results than seeds (results in brackets): "
            + ", ".join(short)
            + "; their claims are 'not run' or rest on fewer seeds until the study runs them"
        )
    if stale:
        lines.append(
            "- records of another config or other eval settings than the study's (left out; running the "
            "study replaces them): " + ", ".join(stale)
        )
    return lines


def _setups(study: Study, arms: list[StudyArm]) -> str:
    """The distinct (dataset, size, backbone, batch) of the arms, in arm order: a study may span several."""
    seen: dict[str, None] = {}
    for arm in arms:
        c = arm_config(study, arm, study.seeds[0])
        seen[f"{c.data.name} at {c.model.image_size} px, {c.model.arch}, batch {c.train.batch_size}"] = None
    return "; ".join(seen)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| group | arm | steps | w | FD | KID x1e3 | precision | recall | class acc. | params (total / trainable) "
        "| adapter params | stored per task | train img/s | sample img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors_done: set[tuple[str, Any]] = set()
    for r in rows:
        key = (r["group"], r["labels"])
        if key not in floors_done:
            floors_done.add(key)
            f = r["floor"]
            lines.append(
                f"| {r['group']} | *real data (noise floor)* | - | - | {_floor_cell(f, 'fd', 2)} "
                f"| {_floor_cell(f, 'kid_mean', 2, 1e3)} | {_floor_cell(f, 'precision', 2)} "
                f"| {_floor_cell(f, 'recall', 2)} | {_floor_cell(f, 'class_accuracy', 2)} | - | - | - | - | - |"
            )
        g = r["parameters"]["by_group"]  # records written before "adapters" was its name say "lora"
        lines.append(
            f"| {r['group']} | {_label(r)} | {r['steps']} | {r['guidance']:g} | {pm(r['fd'])} "
            f"| {pm(r['kid_mean'], 2, 1e3)} "
            f"| {pm(r['precision'])} | {pm(r['recall'])} | {pm(r['class_accuracy'])} "
            f"| {r['parameters']['total']:,} / {r['parameters']['trainable']:,} "
            f"| {g.get('adapters', 0) + g.get('lora', 0) + g.get('weighting', 0):,} | {_stored(r['parameters'])} "
            f"| {pm(r['train_images_per_s'], 0)} "
            f"| {pm(r['sample_images_per_s'], 0)} |"
        )
    return lines


def _stored(parameters: dict[str, Any]) -> str:
    """What one more task adds to storage: its bank entries plus the parameters trained outside any bank (a
    fully fine-tuned model stores everything per task); '-' for records written before the count existed."""
    per_task = parameters.get("per_task")
    return f"{per_task['stored_per_task']:,}" if per_task else "-"


def _ci_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Bootstrap intervals of one run",
        "",
        "95% bootstrap interval of each score over resamples of both sets (within classes for "
        "class-stratified sets), averaged over seeds: how far a single run's score moves with the particular "
        "samples drawn. Percentile intervals, except for FD: a resample with replacement holds copies, which "
        "act like fewer samples and raise FD's count-dependent bias, so its percentile interval sits above the "
        "estimate; FD gets the basic (reflected) interval [2 FD - hi, 2 FD - lo], which removes that shift.",
        "",
        "| arm | w | FD | KID x1e3 | precision | recall | class acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for key, scale in (("fd", 1), ("kid_mean", 1e3), ("precision", 1), ("recall", 1), ("class_accuracy", 1)):
            ci = r["ci"].get(key)
            if not ci:
                cells.append("-")
                continue
            estimate = (r.get(key) or (math.nan,))[0]  # a mean over seeds (a basic interval reflects about it)
            lo, hi = reported_interval(key, estimate, (ci[0][0], ci[1][0]))
            cells.append(f"[{lo * scale:.2f}, {hi * scale:.2f}]")
        lines.append(f"| {_label(r)} | {r['guidance']:g} | " + " | ".join(cells) + " |")
    return lines


def _fidelity_table(rows: list[dict[str, Any]]) -> list[str]:
    """Condition fidelity of spatial tasks (``difflora.eval.fidelity``), mean ± std over seeds."""
    rows = [r for r in rows if r.get("fidelity")]
    if not rows:
        return []
    keys = list(dict.fromkeys(k for r in rows for k in r["fidelity"]))
    lines = [
        "",
        "## Condition fidelity of the spatial tasks",
        "",
        "How well samples follow their condition images (`docs/spatial-tasks.md`): edge F1 and correlation "
        "(higher is better), PSNR in dB of the 4x4 block means (higher), squared error on the known region "
        "of inpainting (lower).",
        "",
        "| arm | w | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for r in rows:
        cells = [pm(r["fidelity"].get(k), 3) for k in keys]
        lines.append(f"| {_label(r)} | {r['guidance']:g} | " + " | ".join(cells) + " |")
    return lines


def _copy(src: Path, dst: Path) -> None:
    if src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(dst, src.read_bytes())


def _images(study: Study, rows: list[dict[str, Any]], img_dir: Path, arms: list[StudyArm]) -> list[str]:
    lines = ["## Samples", "", "First seed of each arm, the first 100 samples of its evaluation.", ""]
    for r in rows:
        name = _grid_name(r["arm"], r)
        if (img_dir / name).is_file():
            lines += [
                f"**{_label(r)}**, guidance {r['guidance']:g}",
                "",
                f"![{r['arm']} w={r['guidance']:g}]({study.name}/{name})",
                "",
            ]
    for figure in REPORT_FIGURES.values():
        lines += figure.section(study, img_dir, arms)
    return lines


def draw_figures(study: Study, out_dir: Path, img_dir: Path, arms: list[StudyArm]) -> list[str]:
    """Draw every registered report figure (:data:`REPORT_FIGURES`) from the runs in ``out_dir``; returns failures."""
    return [note for figure in REPORT_FIGURES.values() for note in figure.draw(study, out_dir, img_dir, arms)]


def write_report(study: Study, report_dir: Path, arms: list[StudyArm], *, command: str, dirty: bool) -> Path:
    """Write ``<report_dir>/<name>.md`` from the records in ``<report_dir>/<name>/records``; returns its path.

    The report names the revisions the records were made at, so any later revision rewrites it
    unchanged. It is marked NOT REPRODUCIBLE when a record was made from uncommitted code or when
    ``dirty`` (the checkout writing it has uncommitted changes).
    """
    img_dir = report_dir / study.name
    records, stale = split_stale(study, load_records(study, img_dir, arms), arms)
    rows = summarise(study, records, arms)
    lines = []
    made_dirty = any(rec.get("code", {}).get("dirty") for recs in records.values() for rec in recs)
    if made_dirty or dirty:
        what = "runs made" if made_dirty else "written"
        lines += [
            f"> **NOT REPRODUCIBLE**: {what} from a git tree with uncommitted changes (`--allow-dirty`); "
            f"no commit holds the code that {'made these numbers' if made_dirty else 'wrote this report'}.",
            "",
        ]
    lines += (
        _header(study, rows, arms, command, _revision_line(records), stale)
        + _table(rows)
        + [""]
        + _ci_table(rows)
        + _fidelity_table(rows)
    )
    if study.claims:
        lines += [""] + claims_section(study, rows)
    lines += [""] + _images(study, rows, img_dir, arms)
    path = report_dir / f"{study.name}.md"
    tail = ""
    if path.is_file() and END_MARKER in path.read_text():
        tail = path.read_text().split(END_MARKER, 1)[1]
    write_bytes(path, "\n".join(lines).rstrip() + "\n\n" + END_MARKER + (tail or "\n"))
    return path
