"""One run that serves the tasks of several independently trained runs (``difflora combine-tasks``).

002's promise is one model for many tasks. Its parallel and sequential regimes grow that model
inside training; this module builds it after the fact. Runs that adapt the same base checkpoint and
train nothing but task banks (the Affiner, or any adapter reading ``task`` through an index
weighting, e.g. per-task LoRA) each store their banks alone, so their tasks stack: the combined run's
task ids follow the order of the runs, every run's tasks in its own order, and task ``-1`` stays
the base bit for bit. Every task computes exactly what it computed in its own run (tested).

The combined directory is a run: ``difflora sample DIR --condition task=K`` and
``difflora eval DIR --task K`` read it, and so does ``train.init_from`` with
``model.affiner.frozen_tasks`` (add one more task, the sequential regime). It holds the source
runs' model and EMA banks but no optimizer state, so it cannot resume training; its checkpoint
carries the longest run's step and a ``combined_from`` record of every run it came from.

What cannot be combined is refused with the reason: full fine-tuning and methods that train tensors
outside task banks (DiffFit's and BitFit's biases, embeddings, new class rows) store a different
model per task; runs on different bases or with a different architecture; label-free runs with
runs trained on labels; spatial tasks; offset labels; a run whose config does not name every one
of its tasks' datasets.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflora.config.schema import Config, DataConfig, TaskDataConfig, config_to_dict, parse_config
from difflora.diffscaler.tasks import task_branches
from difflora.files.atomic import storage_errors
from difflora.model.build import build_model
from difflora.train.checkpoint import save_checkpoint, select_checkpoint, stream_weights, weight_sources
from difflora.train.dependents import record_dependent
from difflora.train.run_dir import RunExistsError, check_writable, load_run_config, write_json
from difflora.train.run_lock import LOCK_FILE, run_lock

__all__ = ["CombineError", "combine_task_runs"]

CONDITION = "task"


class CombineError(ValueError):
    """Runs that cannot be served by one model; the message names the run and the reason."""


@dataclass
class _Source:
    run: Path
    cfg: Config
    ckpt: Path
    state: dict[str, Any]
    tasks: int
    datasets: list[TaskDataConfig]  # one per task, in task order


def _task_count(cfg: Config, run: Path) -> int:
    """How many tasks the run's task banks hold (the Affiner's and every index adapter on ``task``)."""
    counts = {a.num_values for a in cfg.model.adapters if a.condition == CONDITION and a.weighting == "index"}
    if cfg.model.affiner is not None and cfg.model.affiner.condition == CONDITION:
        counts.add(cfg.model.affiner.tasks)
    if not counts:
        raise CombineError(
            f"{run} has no task banks (model.affiner, or model.adapters reading 'task' through an index "
            "weighting): its trained weights cannot become one task of a shared model"
        )
    if len(counts) > 1:
        raise CombineError(f"{run}: its task banks hold different numbers of tasks {sorted(counts)}")
    return counts.pop()


def _task_datasets(cfg: Config, run: Path, tasks: int) -> list[TaskDataConfig]:
    """The dataset of each of the run's tasks (data.name is task data.task_id, data.tasks[k] the next ones)."""
    d = cfg.data
    if d.spatial is not None:
        raise CombineError(
            f"{run} trains spatial tasks, which share one dataset and a condition image; combine-tasks cannot serve them"
        )
    if d.task_labels == "offset":
        raise CombineError(f"{run} numbers each task's classes after the previous ones (data.task_labels: offset)")
    first = d.task_id or 0
    named = [TaskDataConfig(name=d.name, root=d.root, limit=d.limit), *d.tasks]
    if first != 0 or len(named) != tasks:
        raise CombineError(
            f"{run} holds {tasks} tasks but its config names the datasets of tasks {first}..{first + len(named) - 1} "
            "only (the others were trained in the run its train.init_from names); combine the runs that trained "
            "them, or the multi-task run itself"
        )
    return named


def _read_source(run: Path) -> _Source:
    if not (run / "config.json").is_file():
        raise CombineError(f"{run} is not a difflora run directory: {run / 'config.json'} is missing")
    cfg = load_run_config(run)
    ckpt = select_checkpoint(run)
    _, state = weight_sources(ckpt)
    if not state.get("base", {}).get("keys"):
        raise CombineError(
            f"{run} stores every weight of its model (full fine-tuning, or trained without train.init_from): "
            "only runs that adapt a shared base with task banks can be served by one model"
        )
    tasks = _task_count(cfg, run)
    return _Source(run, cfg, ckpt, state, tasks, _task_datasets(cfg, run, tasks))


def _comparable(cfg: Config) -> dict[str, Any]:
    """The config sections that must agree between combined runs, with the task counts blanked."""
    model = config_to_dict(cfg)["model"]
    if model["affiner"] is not None:
        model["affiner"] |= {"tasks": None, "frozen_tasks": None}
    for a in model["adapters"]:
        if a["condition"] == CONDITION and a["weighting"] == "index":
            a |= {"num_values": None, "frozen": None}
    return {"model": model, "diffusion": config_to_dict(cfg)["diffusion"]}


def _outside_banks(run: Path, keys: list[str]) -> CombineError:
    return CombineError(
        f"{run} trains tensors outside its task banks ({', '.join(keys[:3])}{' and more' if len(keys) > 3 else ''}): "
        "they would differ per task, so one model cannot hold them (DiffFit, BitFit, embeddings, new classes, "
        "trained base weights)"
    )


def _check_compatible(sources: list[_Source]) -> None:
    first = sources[0]
    want, base = _comparable(first.cfg), first.state["base"]
    for s in sources[1:]:
        got = _comparable(s.cfg)
        for section in ("model", "diffusion"):
            if got[section] != want[section]:
                keys = sorted(k for k in want[section] if want[section][k] != got[section].get(k))
                raise CombineError(
                    f"{s.run} and {first.run} differ in {section}.{', '.join(keys)}: only runs of one "
                    "architecture and one diffusion share a model"
                )
        if (s.cfg.train.label_dropout >= 1) != (first.cfg.train.label_dropout >= 1):
            free = s if s.cfg.train.label_dropout >= 1 else first
            raise CombineError(
                f"{free.run} trained with every label dropped (train.label_dropout=1) and the other run with "
                "labels: one config cannot sample both as trained (eval draws balanced labels or none)"
            )
        other = s.state["base"]
        if other["fingerprint"] != base["fingerprint"]:
            raise CombineError(
                f"{s.run} adapts the base {other['path']} (fingerprint {other['fingerprint'][:12]}) and {first.run} "
                f"adapts {base['path']} ({base['fingerprint'][:12]}): only runs on one base share its weights"
            )
        if other["keys"] != base["keys"]:
            # A run's base record lists the base tensors it left frozen: the one listing fewer trained some.
            fewer = s if len(other["keys"]) < len(base["keys"]) else first
            raise _outside_banks(fewer.run, sorted(set(base["keys"]) ^ set(other["keys"])))


def _combined_config(sources: list[_Source]) -> Config:
    tree = config_to_dict(sources[0].cfg)
    total = sum(s.tasks for s in sources)
    model = tree["model"]
    if model["affiner"] is not None:
        model["affiner"] |= {"tasks": total, "frozen_tasks": 0}
    for a in model["adapters"]:
        if a["condition"] == CONDITION and a["weighting"] == "index":
            a |= {"num_values": total, "frozen": 0}
    datasets = [d for s in sources for d in s.datasets]
    data = DataConfig(
        name=datasets[0].name,
        root=datasets[0].root,
        limit=datasets[0].limit,
        image_size=sources[0].cfg.model.image_size,
        tasks=datasets[1:],
        task_id=0,
    )
    tree["data"] = config_to_dict(sources[0].cfg.model_copy(update={"data": data}))["data"]
    return parse_config(tree)


def _stacked_banks(sources: list[_Source], keys: list[str], which: str) -> dict[str, torch.Tensor]:
    """``{bank key: every run's entries, frozen ones first, runs in order}`` of the ``which`` weights."""
    per_run = []
    for s in sources:
        sources_of, _ = weight_sources(s.ckpt, which)
        tensors = dict(stream_weights(sources_of))
        wanted = {k for key in keys for k in (key, key + "_frozen")}
        if extra := sorted(set(tensors) - wanted):
            raise _outside_banks(s.run, extra)
        if missing := sorted(k for k in keys if k not in tensors):
            raise CombineError(
                f"{s.run} does not store the task bank {missing[0]} (its checkpoint {s.ckpt} is incomplete)"
            )
        per_run.append({k: torch.cat([tensors[n] for n in (k + "_frozen", k) if n in tensors]) for k in keys})
    return {k: torch.cat([banks[k] for banks in per_run]) for k in keys}


def _bank_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of every task bank of a ``DiffusionModel`` (its network is ``model.net``)."""
    return sorted(
        f"net.{path}.adapters.{name}.{bank}"
        for path, name, branch in task_branches(model.net, CONDITION)
        for bank in branch.bank_names
    )


def _combined_tensors(sources: list[_Source], cfg: Config) -> dict[str, dict[str, torch.Tensor]]:
    """The combined model and EMA banks, checked against the combined model's shapes."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = build_model(cfg)
    keys = _bank_keys(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = set(shapes) - set(sources[0].state["base"]["keys"])
    if stored != set(keys):  # every run left the same base tensors frozen (checked), and trained more
        raise _outside_banks(sources[0].run, sorted(stored - set(keys)))
    out = {which: _stacked_banks(sources, keys, which) for which in ("model", "ema")}
    for k in keys:
        if tuple(out["model"][k].shape) != shapes[k]:
            raise CombineError(
                f"{k}: the combined bank has shape {tuple(out['model'][k].shape)}, the model {shapes[k]}"
            )
    return out


def combine_task_runs(runs: Sequence[str | Path], out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Write a run at ``out`` serving every task of ``runs`` (in their order); returns ``out``.

    Each run's newest intact checkpoint is read. Nothing is written unless every check passes, and
    the directory appears whole or not at all (written beside ``out``, then renamed).
    """
    runs, out = [Path(r) for r in runs], Path(out)
    if len(runs) < 2:
        raise CombineError("combine-tasks needs at least two runs")
    if out.exists():
        raise RunExistsError(f"{out} already exists; choose a new --out for the combined run")
    check_writable(out)
    sources = [_read_source(r) for r in runs]
    _check_compatible(sources)
    cfg = _combined_config(sources)
    tensors = _combined_tensors(sources, cfg)
    first_id = 0
    combined_from = []
    for s in sources:
        ids = list(range(first_id, first_id + s.tasks))
        combined_from.append(
            {"run": str(s.run.resolve()), "checkpoint": str(s.ckpt.resolve()), "step": s.state["step"], "tasks": ids}
        )
        first_id += s.tasks
    meta = {"config": config_to_dict(cfg), "base": sources[0].state["base"], "combined_from": combined_from}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}"  # not mkdtemp: its 0700 would outlive the rename
    # Locked like any run directory (the lock moves with it): a second combine-tasks into this --out is refused.
    with run_lock(tmp):
        for leftover in (p for p in tmp.iterdir() if p.name != LOCK_FILE):  # left by a killed combine-tasks
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        needed = sum(t.numel() * t.element_size() for part in tensors.values() for t in part.values())
        try:
            # A refused write names --out (not its temporary name) and the space the whole run needs.
            with storage_errors(out, needed):
                step = max(s.state["step"] for s in sources)
                save_checkpoint(
                    tmp, step, model=tensors["model"], ema=tensors["ema"], optimizer=None, rng={}, meta=meta
                )
                write_json(tmp / "config.json", meta["config"])
                os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        record_dependent(meta["base"]["path"], out)  # the combined run reads the base's frozen weights too
    names = [d.name for s in sources for d in s.datasets]
    for m in combined_from:
        log(f"tasks {m['tasks']}: {m['run']} (step {m['step']})")
    log(f"wrote {out}: {len(names)} tasks ({', '.join(f'{k} = {n}' for k, n in enumerate(names))})")
    return out
