"""The training loop: one for every model difflora builds (the run directory: see ``run_dir.py``).

Each step draws a data batch and asks the objective (``objectives.py``, ``train.objective``) for
its loss terms; the loop owns the optimizer, the EMA, logging, sample grids and checkpoints.

Resuming restores the model, EMA, optimizer, every RNG the loop draws from and the metrics
window, so an interrupted run continues bit-identically (on the same device and thread count):

* kill -9 or a crash: from the newest checkpoint; metrics rows after it are dropped.
* Ctrl-C: the step in progress completes, a checkpoint is written at it, then the run stops. A
  second Ctrl-C stops at once; if that lands inside a step, the checkpoint is of the last
  completed step with the RNG state as of the start of the interrupted one, so the step is
  redone with the same draws (if it lands inside the update itself, nothing is written and the
  newest checkpoint stands).

``train.init_from`` adapts a trained model (``base.py``): checkpoints then hold the trainable
tensors only, plus the base's fingerprint, and one copy of the base lives in memory (the EMA
shadows trainable tensors, sample grids swap the EMA values in and out).

At scale (README "Training at scale"): a step itself (micro-batches, mixed precision, how the
global batch is shared by processes) is ``step.py``; joining a torchrun / accelerate process
group and DDP is ``distributed.py``. Under several processes every one trains, process 0 alone
writes; Ctrl-C then stops at once and the newest checkpoint stands (a deferred stop would need
every process to agree on the step).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difflora.config.schema import Config, ConfigError, config_to_dict, parse_saved_config
from difflora.data import BatchSource
from difflora.data.spatial import grid_indices
from difflora.files.atomic import append_line, write_bytes
from difflora.files.images import save_grid
from difflora.model.accounting import parameter_counts, peak_memory_mb
from difflora.model.build import build_diffusion, build_model
from difflora.sampling.generate import default_labels, generate
from difflora.train.activation_checkpointing import checkpoint_blocks
from difflora.train.base import describe_base, load_base, start_from_base, stored_state
from difflora.train.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    base_missing,
    find_checkpoints,
    load_checkpoint,
    save_checkpoint,
    select_checkpoint,
    unchecked,
)
from difflora.train.dependents import record_dependent
from difflora.train.distributed import Dist, launched_rank, launched_world_size, process_group, wrap_model
from difflora.train.ema import EMA
from difflora.train.footprint import check_memory, training_batch
from difflora.train.interrupt import DeferredInterrupt
from difflora.train.launcher import accelerate_flags
from difflora.train.objectives import build_objective
from difflora.train.pipeline_data import grid_context, open_training_batches
from difflora.train.precision import grad_scaler, resolve_precision
from difflora.train.run_dir import (
    RunExistsError,
    check_writable,
    load_run_config,
    lock_run,
    merge_accounting_segment,
    read_json,
    read_metrics,
    truncate_metrics,
    write_json,
)
from difflora.train.run_lock import RunLocked, check_unlocked
from difflora.train.state import TrainState, Window
from difflora.train.step import (
    TrainingDiverged,
    check_batch_split,
    diverged,
    optimizer_groups,
    own_rows,
    process_rng_states,
    rng_state,
    set_process_rng_state,
    set_rng_state,
    train_step,
)
from difflora.train.trackers import Trackers, check_trackers

__all__ = [
    "RunExistsError",
    "TrainState",
    "TrainingDiverged",
    "load_run_config",
    "resolve_device",
    "train",
    "write_json",
]

# Keys a resumed run may change: they alter neither the model nor the draws of a step.
_RESUMABLE_KEYS = {
    ("train", k) for k in ("steps", "log_every", "ckpt_every", "compile", "keep_checkpoints", "keep_every")
}
_RESUMABLE_KEYS |= {("data", "workers"), ("data", "index_cache")}  # how a folder is read, not what


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return dev


def _check_resume_config(saved: dict[str, Any], cfg: Config) -> None:
    """A resumed run must use the config it was started with; only train.steps (up; not under a
    decaying lr_schedule, whose length it is), log_every, ckpt_every, the retention keys, and the
    location of an init_from base (its fingerprint is checked) may change.

    The saved config is read with today's defaults, so a run started before a config key existed
    (and so ran with its default) resumes; a saved key today's schema rejects is compared as stored."""
    now = config_to_dict(cfg)
    try:
        saved = config_to_dict(parse_saved_config(saved))
    except ConfigError:
        pass
    diffs = []
    for section, values in saved.items():
        for key, old in values.items():
            new = now.get(section, {}).get(key)
            relocated = (section, key) == ("train", "init_from") and old is not None and new is not None
            if old != new and (section, key) not in _RESUMABLE_KEYS and not relocated:
                diffs.append(f"{section}.{key}: {old!r} -> {new!r}")
    if diffs:
        raise ValueError(
            "cannot resume with a different config (only train.steps, log_every, ckpt_every, keep_checkpoints and "
            "keep_every may change):\n  " + "\n  ".join(diffs)
        )
    steps = saved.get("train", {}).get("steps")
    if cfg.train.lr_schedule != "constant" and steps != cfg.train.steps:
        raise ValueError(
            f"cannot resume with train.steps {steps} -> {cfg.train.steps}: train.lr_schedule="
            f"{cfg.train.lr_schedule} decays over train.steps; keep train.steps={steps}"
        )


def _load_resume_checkpoint(out: Path, cfg: Config, choice: str | Path | None = None) -> LoadedCheckpoint:
    """The checkpoint ``--resume`` continues from (``choice``: see :func:`select_checkpoint`; default the
    newest intact one), checked against ``cfg`` before anything is written."""
    ckpt = load_checkpoint(select_checkpoint(out, choice))
    _check_resume_config(ckpt.state["config"], cfg)
    if cfg.train.steps < ckpt.step:
        raise ValueError(
            f"train.steps={cfg.train.steps} is below step {ckpt.step} of the newest checkpoint in {out}: a run "
            f"cannot be shortened by resuming it; keep train.steps >= {ckpt.step} (or train into another --out)"
        )
    return ckpt


def _init_base(model: torch.nn.Module, cfg: Config, ckpt: LoadedCheckpoint | None, log) -> dict[str, Any] | None:
    """Load the ``train.init_from`` base into ``model``; on resume, the base the run recorded."""
    if not cfg.train.init_from:
        return None
    if ckpt is None:
        record = start_from_base(model, cfg.train.init_from, cfg.train.init_weights)
        log(f"adapting {describe_base(record)}")
        return record
    rec = ckpt.state["base"]
    # The recorded checkpoint directory, unless the user moved the base and said so in train.init_from.
    moved = cfg.train.init_from != ckpt.state["config"]["train"]["init_from"]
    where = cfg.train.init_from if moved else rec["path"]
    if not Path(where).exists():
        raise base_missing(rec | {"path": str(where)}, "is missing")
    return load_base(model, where, rec["weights"], expect=rec)


def _stored_keys(model: torch.nn.Module, base: dict[str, Any] | None) -> list[str]:
    """Every state-dict key, except frozen tensors that come from a base (they stay in the base)."""
    params = dict(model.named_parameters())
    from_base = set(base["keys"]) if base else set()
    frozen = {k for k in from_base if k not in params or not params[k].requires_grad}
    if base is not None:
        base["keys"] = {k: base["keys"][k] for k in sorted(frozen)}
    return [k for k in model.state_dict() if k not in frozen]


def _training_model(model: torch.nn.Module, cfg: Config, ctx: Dist, device: torch.device) -> torch.nn.Module:
    """The callable a step trains through: blocks checkpointed, DDP across processes, compiled."""
    if cfg.model.checkpoint_blocks:
        checkpoint_blocks(model)
    wrapped = wrap_model(model, ctx, device)
    if cfg.train.compile:
        # DDP first, then compile: dynamo splits the graph at DDP's gradient buckets.
        wrapped = torch.compile(wrapped)
    return wrapped


def _check_conditions(cfg: Config, data: BatchSource) -> None:
    """Every adapter reads a condition this run's batches carry (t, y, the data's own such as task,
    a distilled student's): found before the run directory is written, not at the first step."""
    given = {"t", "y", *data.conditions}
    if cfg.distilled and not cfg.train.train_base:
        given.add(cfg.distill.adapter(cfg.model.arch).condition)
    readers = [(f"model.adapters[{a.name}].condition", a.condition) for a in cfg.model.adapters]
    if cfg.model.affiner is not None:
        readers.append(("model.affiner.condition", cfg.model.affiner.condition))
    for key, condition in readers:
        if condition not in given:
            fix = (
                "set data.task_id=K (the task id of these images) or list more datasets in data.tasks"
                if condition == "task"
                else f"use one of them as {key}"
            )
            raise ValueError(
                f"{key}={condition}: no batch of this run carries '{condition}' (they carry {', '.join(sorted(given))}); {fix}"
            )


def _prepare(cfg: Config, out: Path, ckpt: LoadedCheckpoint | None, log, ctx: Dist, device, net=None) -> TrainState:
    """Build everything a run needs (on ``net``, the caller's backbone, if given); bad input fails here,
    before the run directory is written."""
    check_batch_split(cfg.train.batch_size, cfg.train.grad_accum, ctx.world_size)
    torch.manual_seed(cfg.train.seed)
    rows = own_rows(cfg.train, ctx)
    data = open_training_batches(cfg, seed=cfg.train.seed, batch_size=cfg.train.batch_size, rows=rows, log=log)
    if cfg.model.num_classes and data.num_classes > cfg.model.num_classes:
        raise ValueError(
            f"data.name={cfg.data.name} has {data.num_classes} classes but model.num_classes={cfg.model.num_classes}"
        )
    _check_conditions(cfg, data)
    model = build_model(cfg, net).to(device)
    base = _init_base(model, cfg, ckpt, log)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "nothing to train: every parameter is frozen (set train.train_base=true or add model.adapters)"
        )
    if ctx.distributed:
        # Dropout masks: each process its own stream (the model above is built the same everywhere).
        torch.manual_seed(cfg.train.seed + 7919 * (ctx.rank + 1))
    st = TrainState(
        cfg=cfg,
        out=out,
        device=device,
        model=model,
        train_model=_training_model(model, cfg, ctx, device),
        objective=build_objective(cfg, build_diffusion(cfg)),
        data=data,
        optimizer=torch.optim.AdamW(
            optimizer_groups(model, params, cfg), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        ),
        ema=EMA(model, cfg.train.ema_decay),
        generator=torch.Generator().manual_seed(cfg.train.seed + 1),
        params=params,
        stored_keys=_stored_keys(model, base),
        base=base,
        dist=ctx,
        scaler=grad_scaler(cfg.train.precision, device),
        window=Window(device),
    )
    if ckpt is not None:
        _restore(st, ckpt)
    return st


def _restore(st: TrainState, ckpt: LoadedCheckpoint) -> None:
    differ = sorted(set(ckpt.model) ^ set(st.stored_keys))
    if differ:
        raise CheckpointError(
            f"checkpoint {ckpt.path} does not fit the model of this config; differing keys: {differ[:5]}"
        )
    st.model.load_state_dict(ckpt.model, strict=False)
    st.ema.load_state_dict(ckpt.ema, ckpt.state["ema_updates"])
    st.optimizer.load_state_dict(ckpt.optim)
    set_rng_state(st.generator, ckpt.rng)
    st.data.restore(ckpt.state.get("data"), ckpt.step)  # a streamed folder's position
    if st.dist.distributed and not set_process_rng_state(st.dist, ckpt.rng):
        # No stored state for each process (an older checkpoint, or another number of processes):
        # a fresh dropout stream per process, as in _prepare.
        torch.manual_seed(st.cfg.train.seed + 7919 * (st.dist.rank + 1) + ckpt.step)
    if st.scaler.is_enabled() and "grad_scaler" in ckpt.state:
        st.scaler.load_state_dict(ckpt.state["grad_scaler"])
    st.step = st.last_good = ckpt.step
    st.window = Window(st.device, ckpt.state.get("metrics_window", {}))


def _flush(st: TrainState) -> None:
    """Read the window's device sums back (a collective); raise if a loss went non-finite."""
    bad = st.window.flush(st.dist)
    if bad:
        raise diverged(st, f"the loss became non-finite at step {bad}")


def _checkpoint(st: TrainState, step: int, rng: dict[str, torch.Tensor] | None = None) -> None:
    """Every process checks, process 0 writes (``rng``: the RNG state to store, default now's)."""
    _flush(st)
    # The loss of a step is computed before its update: the update itself can still overflow.
    if not bool(torch.stack([torch.isfinite(p).all() for p in st.params]).all()):
        raise diverged(st, f"the weights became non-finite at step {step}")
    rng = rng if rng is not None else rng_state(st.generator)
    if st.dist.distributed:
        rng = {**rng, **process_rng_states(st.dist, st.device)}  # every process's dropout stream
    if not st.dist.is_main:
        st.last_good = step
        return
    meta = {"config": config_to_dict(st.cfg), "ema_updates": st.ema.num_updates, "metrics_window": st.window.totals}
    if st.base is not None:
        meta["base"] = st.base
    if (position := st.data.state(step)) is not None:
        meta["data"] = position
    if st.scaler.is_enabled():
        meta["grad_scaler"] = st.scaler.state_dict()  # fp16: the loss scale (numbers only)
    save_checkpoint(
        st.out,
        step,
        model=stored_state(st.model, st.stored_keys),
        ema=st.ema.state_dict(),
        optimizer=st.optimizer,
        rng=rng,
        meta=meta,
        keep=st.cfg.train.keep_checkpoints,
        keep_every=st.cfg.train.keep_every,
    )
    # config.json follows the newest checkpoint (a resume with a raised train.steps changes it only now).
    write_json(st.out / "config.json", meta["config"])
    st.last_good = step


def _sample_grid(st: TrainState, path: Path) -> Path:
    """A grid of the EMA model's samples; the EMA values are swapped in and out (no model copy)."""
    cfg = st.cfg
    labels = default_labels(cfg, cfg.sample.num)
    conditions = _grid_conditions(st.data, cfg.sample.num)
    spatial = conditions.pop("spatial", None)  # condition images of spatial tasks (data.spatial)
    # Sampling must not move the training RNG: forked, so a run with grids resumes like one without.
    with torch.random.fork_rng(devices=[st.device] if st.device.type == "cuda" else []), st.ema.applied(st.model):
        images = generate(
            st.model,
            cfg,
            labels=labels,
            seed=cfg.train.seed,
            device=st.device,
            conditions=conditions,
            spatial=spatial,
            **grid_context(st.data, cfg.sample.num),  # a text pipeline: the data's captions
        )
    path = save_grid(images, path, nrow=cfg.model.num_classes or None)
    if st.trackers is not None:
        st.trackers.image("samples/grid", path, st.step)
    return path


def _grid_conditions(data: BatchSource, num: int) -> dict[str, torch.Tensor]:
    """Per-sample conditions for a training grid: each data condition (e.g. ``task``) cycles through
    the values the data holds, so a multi-task run shows every task."""
    if "spatial" in data.conditions:  # condition images: whole samples of each task (data.spatial)
        return data.batch_conditions(grid_indices(data.conditions["task"], num))
    out = {}
    for name, values in data.conditions.items():
        distinct = values.unique()
        out[name] = distinct[torch.arange(num) % len(distinct)]
    return out


def _log_due(st: TrainState, end: int) -> bool:
    return st.step % st.cfg.train.log_every == 0 or st.step == end


def _after_step(st: TrainState, end: int, lr: float, metrics) -> None:
    """Log, sample and checkpoint as the config asks after step ``st.step`` (``metrics`` and the
    trackers are None on every process but 0, which alone writes)."""
    cfg, done = st.cfg.train, st.step
    if _log_due(st, end):
        _flush(st)  # every process: the row holds the loss over the global batch
        totals = st.window.totals
        n = totals.pop("_n")
        row = {k: v / n for k, v in totals.items()}
        row.update(step=done, lr=lr, images_per_s=cfg.batch_size * st.row_steps / max(st.row_s, 1e-12))
        st.window.totals, st.row_s, st.row_steps = {}, 0.0, 0
        st.last_row = row
        if metrics is not None:
            append_line(metrics, st.out / "metrics.jsonl", json.dumps(row) + "\n")
            st.trackers.scalars(row, done)
    if cfg.sample_every and done % cfg.sample_every == 0 and done != end and st.dist.is_main:
        _sample_grid(st, st.out / "samples" / f"step_{done:07d}.png")
    if done % cfg.ckpt_every == 0 or done == end:
        _checkpoint(st, done)


def _save_interrupted(st: TrainState, log: Callable[[str], None]) -> None:
    """Checkpoint the last completed step of an interrupted run (see the module docstring)."""
    newest = st.last_good or 0
    if st.dist.distributed:
        # The processes may be at different steps: a checkpoint (a collective) could wait forever.
        if st.dist.is_main:
            log(f"interrupted; resume continues from the newest checkpoint (step {newest}) in {st.out}")
        return
    if st.updating:
        log(f"interrupted inside an update: not checkpointed; resume continues from step {newest} in {st.out}")
        return
    if st.step > newest:
        _checkpoint(st, st.step, rng=st.rng_mark)
    log(f"interrupted; checkpoint at step {st.step} in {st.out}. Continue with --resume.")


def _timed_step(st: TrainState, end: int, start: int) -> float:
    """One step, its wall time added to the accounting; returns its learning rate."""
    t0 = time.perf_counter()
    lr = train_step(st, st.step)
    if st.device.type == "cuda" and _log_due(st, end):
        # Only where a row is read back anyway: the clock then covers all the window's queued work.
        torch.cuda.synchronize(st.device)
    dt = time.perf_counter() - t0
    if st.step > start + 1:  # the first step pays for allocation and warm-up (and compilation)
        st.timed_s, st.timed_steps = st.timed_s + dt, st.timed_steps + 1
    st.row_s, st.row_steps = st.row_s + dt, st.row_steps + 1
    return lr


def _run_steps(st: TrainState, end: int, progress: bool, log, callback) -> None:
    """Steps ``st.step`` .. ``end``; metrics rows never outlive the newest checkpoint on exit."""
    main = st.dist.is_main
    metrics = open(st.out / "metrics.jsonl", "ab", buffering=0) if main else None
    bar = tqdm(total=st.cfg.train.steps, initial=st.step, desc="train", disable=not (progress and main))
    start, ok = st.step, False
    st.model.train()
    try:
        with DeferredInterrupt(log).installed(not st.dist.distributed) as interrupt:
            while st.step < end:
                lr = _timed_step(st, end, start)
                bar.update(1)
                _after_step(st, end, lr, metrics)
                if st.last_row:
                    bar.set_postfix(loss=f"{st.last_row['loss']:.4f}")
                if callback is not None:
                    callback(st)
                if interrupt.requested and st.step < end:
                    raise KeyboardInterrupt
        ok = True
    except KeyboardInterrupt:
        _save_interrupted(st, log)
        raise
    finally:
        bar.close()
        st.data.close()
        if main:
            metrics.close()
            if not ok:
                _drop_unsaved_rows(st, log)


def _drop_unsaved_rows(st: TrainState, log) -> None:
    try:
        truncate_metrics(st.out / "metrics.jsonl", st.last_good or 0, log)
    except (OSError, ValueError) as exc:
        log(f"could not drop the metrics rows after the newest checkpoint: {exc}")


def _finish(st: TrainState, start: int, resumed: bool) -> dict[str, Any]:
    cfg, out = st.cfg, st.out
    result: dict[str, Any] = {"step": st.step, "last": st.last_row, "grid": None, "main": st.dist.is_main}
    segment = {
        "parameters": parameter_counts(st.model),
        "peak_memory_mb": peak_memory_mb(st.device),
        "timed_steps": st.timed_steps,
        "timed_s": st.timed_s,
        "batch_size": cfg.train.batch_size,
        "device": str(st.device),
        "threads": torch.get_num_threads(),
        "processes": st.dist.world_size,
        "precision": resolve_precision(cfg.train.precision, st.device),
    }
    if not st.dist.is_main:
        return result | {"accounting": merge_accounting_segment(None, segment)}
    if st.step == cfg.train.steps and st.step > start:
        result["grid"] = str(_sample_grid(st, out / "samples" / f"step_{st.step:07d}.png"))
    accounting = merge_accounting_segment(read_json(out / "accounting.json") if resumed else None, segment)
    write_json(out / "accounting.json", accounting)
    return result | {"accounting": accounting}


def _nothing_to_do(out: Path, step: int, log) -> dict[str, Any]:
    """The result of resuming a run that already reached its end: every record stays as it is."""
    log(f"{out} is already at step {step}: nothing to train (raise train.steps to continue it)")
    rows = read_metrics(out / "metrics.jsonl", log)
    grid = out / "samples" / f"step_{step:07d}.png"
    accounting = read_json(out / "accounting.json") or {}
    accounting.setdefault("train_images_per_s", float("nan"))
    accounting.setdefault("peak_memory_mb", float("nan"))
    return {
        "step": step,
        "last": rows[-1] if rows else {},
        "accounting": accounting,
        "grid": str(grid) if grid.is_file() else None,
        "main": launched_rank() == 0,
    }


def train(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    stop_at: int | None = None,
    log: Callable[[str], None] = print,
    callback: Callable[[TrainState], None] | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir``; returns the final metrics and accounting.

    ``model``: a backbone the caller built for ``cfg.model`` (e.g. a diffusers model loaded with
    ``from_pretrained``), used instead of a fresh one; the config's adapters, freezing and base
    (``train.init_from``) apply to it as to a built one (:func:`~difflora.model.build.build_model`).

    ``resume`` continues from the newest intact checkpoint of ``out_dir``, or from ``checkpoint``
    (a step or a directory, see ``select_checkpoint``). ``stop_at`` ends the run after that step
    (with a checkpoint), as an interruption would: the tests use it to check resuming.
    ``callback(state)`` runs after every completed step (see :class:`TrainState`).

    Started by torchrun or accelerate launch (or inside an initialised process group), every
    process trains its share of each batch and process 0 alone logs and writes; the result's
    ``main`` says whether this is that process.
    """
    out = Path(out_dir)
    cfg, flags = accelerate_flags(cfg, os.environ)  # before the resume check: the flags are part of the config
    if launched_rank() == 0:
        for line in flags:
            log(line)
    # A second writer is refused before it reads or builds anything; every process asks, so that
    # none is left waiting for a process 0 that was refused.
    check_unlocked(out)
    check_trackers(cfg)
    micro = training_batch(cfg, launched_world_size())
    check_memory(cfg, resolve_device(cfg.train.device), "train", train_batch=micro, samples=cfg.sample.num)
    newest = find_checkpoints(out)[-1:]
    if newest and not resume:
        raise RunExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    ckpt = _load_resume_checkpoint(out, cfg, checkpoint) if resume else None
    end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    if ckpt is not None and ckpt.step >= end:
        return _nothing_to_do(out, ckpt.step, log if launched_rank() == 0 else _silent)
    with process_group(resolve_device(cfg.train.device)) as (ctx, device):
        if not ctx.is_main:
            log = _silent
        else:
            check_writable(out)
        st = _prepare(cfg, out, ckpt, log, ctx, device, model)
        if ctx.is_main and st.base is not None:
            record_dependent(st.base["path"], out)  # from now on the base's retention spares that checkpoint
        # Process 0 alone writes, so it alone holds the run's lock: from its first write to its exit.
        with contextlib.ExitStack() as held:
            refused = lock_run(held, out, newest) if ctx.is_main else None
            if ctx.max(torch.tensor([float(refused is not None)], device=device)).item():
                # Every process leaves with the refusal, none waits for a process 0 that is gone.
                raise refused or RunLocked(f"process 0 was refused the lock of {out} (see its error)")
            if ctx.is_main:
                _open_run_dir(out, cfg, ckpt, log)
                st.trackers = held.enter_context(Trackers(out, st.cfg, st.step))
            ctx.barrier()  # every process has read the checkpoint before process 0 writes any
            start = st.step
            _run_steps(st, end, progress, log, callback)
            result = _finish(st, start, resumed=ckpt is not None)
        # After the lock and the trackers are let go: no process moves on (e.g. to resume the run)
        # before process 0 has written the run and released it.
        ctx.barrier()
        return result


def _silent(message: str) -> None:
    """The log of every process but 0 (one copy of each message)."""


def _open_run_dir(out: Path, cfg: Config, ckpt: LoadedCheckpoint | None, log) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        # Steps logged after the checkpoint are about to be redone: drop them so no step appears twice.
        truncate_metrics(out / "metrics.jsonl", ckpt.step, log)
        older = unchecked(ckpt.state)
        note = f" (written by an older difflora: {', '.join(older)} not checked)" if older else ""
        log(f"resuming {out} from step {ckpt.step}{note}")
    else:
        write_json(out / "config.json", config_to_dict(cfg))
        write_bytes(out / "metrics.jsonl", b"")
