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
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difflora.accounting import count_parameters, peak_memory_mb
from difflora.config import Config, config_to_dict
from difflora.data import ImageDataset, load_dataset
from difflora.data.spatial import grid_indices
from difflora.generate import default_labels, generate
from difflora.imaging import save_grid
from difflora.model import build_diffusion, build_model
from difflora.nets.controlnet import copy_encoder_into_control
from difflora.train.base import load_base, stored_state
from difflora.train.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    base_missing,
    find_checkpoints,
    load_checkpoint,
    save_checkpoint,
    select_checkpoint,
)
from difflora.train.ema import EMA
from difflora.train.objectives import Batch, Objective, build_objective
from difflora.train.run_dir import (
    RunExistsError,
    check_writable,
    load_run_config,
    merge_accounting_segment,
    read_json,
    read_metrics,
    truncate_metrics,
    write_json,
)

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
_RESUMABLE_KEYS = {("train", "steps"), ("train", "log_every"), ("train", "ckpt_every")}


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite. The last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return dev


def _lr_at(cfg: Config, step: int) -> float:
    # Linear warm-up, then constant (improved-diffusion trains at a constant rate).
    warm = cfg.train.warmup_steps
    return cfg.train.lr * min(1.0, (step + 1) / warm) if warm else cfg.train.lr


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"loop": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _set_rng_state(gen: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    gen.set_state(state["loop"])
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class TrainState:
    """Everything a running training holds; ``train(callback=...)`` receives it after each step.

    ``step`` counts completed steps. ``stored_keys`` are the model's state-dict keys a checkpoint
    holds (all of them, or the trainable ones when adapting a base); ``base`` is the base record
    (``difflora.train.base.load_base``) or None.
    """

    cfg: Config
    out: Path
    device: torch.device
    model: torch.nn.Module
    objective: Objective
    data: ImageDataset
    optimizer: torch.optim.Optimizer
    ema: EMA
    generator: torch.Generator
    params: list[torch.nn.Parameter]
    stored_keys: list[str]
    base: dict[str, Any] | None
    step: int = 0
    last_good: int | None = None  # step of the newest checkpoint
    # Sums of the loss terms since the last metrics row ("_n": steps summed); checkpointed.
    window: dict[str, float] = field(default_factory=dict)
    timed_s: float = 0.0
    timed_steps: int = 0
    # The RNG state at the start of the step in progress (None between steps), and whether the
    # optimizer/EMA update is under way: what an interrupt checkpoint needs to know.
    rng_mark: dict[str, torch.Tensor] | None = None
    updating: bool = False
    last_row: dict[str, Any] = field(default_factory=dict)


def _check_resume_config(saved: dict[str, Any], cfg: Config) -> None:
    """A resumed run must use the config it was started with; only train.steps (up), log_every,
    ckpt_every, and the location of an init_from base (its fingerprint is checked) may change."""
    now = config_to_dict(cfg)
    diffs = []
    for section, values in saved.items():
        for key, old in values.items():
            new = now.get(section, {}).get(key)
            relocated = (section, key) == ("train", "init_from") and old is not None and new is not None
            if old != new and (section, key) not in _RESUMABLE_KEYS and not relocated:
                diffs.append(f"{section}.{key}: {old!r} -> {new!r}")
    if diffs:
        raise ValueError(
            "cannot resume with a different config (only train.steps, log_every and ckpt_every may change):\n  "
            + "\n  ".join(diffs)
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
        record = load_base(model, cfg.train.init_from, cfg.train.init_weights)
        copy_encoder_into_control(model)  # a ControlNet branch starts as a copy of the loaded encoder
        log(f"adapting {record['path']} (step {record['step']}, {record['weights']} weights)")
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


def _prepare(cfg: Config, out: Path, ckpt: LoadedCheckpoint | None, log) -> TrainState:
    """Build everything a run needs; bad input fails here, before the run directory is written."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    data = load_dataset(cfg.data, "train")
    if cfg.model.num_classes and data.num_classes > cfg.model.num_classes:
        raise ValueError(
            f"data.name={cfg.data.name} has {data.num_classes} classes but model.num_classes={cfg.model.num_classes}"
        )
    model = build_model(cfg).to(device)
    base = _init_base(model, cfg, ckpt, log)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "nothing to train: every parameter is frozen (set train.train_base=true or add model.adapters)"
        )
    st = TrainState(
        cfg=cfg,
        out=out,
        device=device,
        model=model,
        objective=build_objective(cfg, build_diffusion(cfg)),
        data=data,
        optimizer=torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay),
        ema=EMA(model, cfg.train.ema_decay),
        generator=torch.Generator().manual_seed(cfg.train.seed + 1),
        params=params,
        stored_keys=_stored_keys(model, base),
        base=base,
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
    _set_rng_state(st.generator, ckpt.rng)
    st.step = st.last_good = ckpt.step
    st.window = dict(ckpt.state.get("metrics_window", {}))


def _diverged(st: TrainState, what: str) -> TrainingDiverged:
    cfg = st.cfg.train
    if st.last_good is not None:
        kept = f"kept the last good checkpoint step {st.last_good} in {st.out / 'checkpoints'}"
    else:
        kept = f"no checkpoint was written yet (the first was due at step {min(cfg.ckpt_every, cfg.steps)})"
    if cfg.grad_clip > 0:
        fix = f"Lower train.lr or raise train.warmup_steps (gradients are already clipped to norm {cfg.grad_clip:g})."
    else:
        fix = "Lower train.lr, raise train.warmup_steps or set train.grad_clip > 0."
    return TrainingDiverged(f"{what}; {kept}. {fix}")


def _checkpoint(st: TrainState, step: int, rng: dict[str, torch.Tensor] | None = None) -> None:
    # The loss of a step is computed before its update: the update itself can still overflow.
    if not all(torch.isfinite(p).all() for p in st.params):
        raise _diverged(st, f"the weights became non-finite at step {step}")
    meta = {"config": config_to_dict(st.cfg), "ema_updates": st.ema.num_updates, "metrics_window": st.window}
    if st.base is not None:
        meta["base"] = st.base
    save_checkpoint(
        st.out,
        step,
        model=stored_state(st.model, st.stored_keys),
        ema=st.ema.state_dict(),
        optimizer=st.optimizer,
        rng=rng if rng is not None else _rng_state(st.generator),
        meta=meta,
    )
    # config.json follows the newest checkpoint (a resume with a raised train.steps changes it only now).
    write_json(st.out / "config.json", meta["config"])
    st.last_good = step


def _train_step(st: TrainState, step: int) -> float:
    """Run step ``step`` (0-based); returns its learning rate. Everything random comes from
    ``st.generator`` (data, flips, t, noise, label dropout) or the global torch RNG (dropout)."""
    cfg = st.cfg.train
    st.rng_mark = _rng_state(st.generator)
    lr = _lr_at(st.cfg, step)
    for group in st.optimizer.param_groups:
        group["lr"] = lr
    idx = torch.randint(len(st.data), (cfg.batch_size,), generator=st.generator)
    # Per-sample conditions the data supplies (e.g. a task id per sample with data.tasks) go to the
    # objective next to the labels; drawing them takes no random numbers.
    x, y, conditions = st.data.batch_with_conditions(idx, generator=st.generator)
    losses = st.objective(st.model, Batch(x, {"y": y, **conditions}), st.generator, st.device)
    loss = losses["loss"].mean()
    if not torch.isfinite(loss):
        raise _diverged(st, f"the loss became {loss.item()} at step {step + 1}")
    st.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    values = {k: v.mean().item() for k, v in losses.items()}
    if cfg.grad_clip > 0:
        values["grad_norm"] = torch.nn.utils.clip_grad_norm_(st.params, cfg.grad_clip).item()
    # From here to the end of the step the state is mid-update: an interrupt must not checkpoint it.
    st.updating = True
    st.optimizer.step()
    st.ema.update(st.model)
    for k, v in values.items():
        st.window[k] = st.window.get(k, 0.0) + v
    st.window["_n"] = st.window.get("_n", 0) + 1
    st.step = step + 1
    st.updating = False
    st.rng_mark = None
    return lr


def _sample_grid(st: TrainState, path: Path) -> Path:
    """A grid of the EMA model's samples; the EMA values are swapped in and out (no model copy)."""
    cfg = st.cfg
    labels = default_labels(cfg.sample.num, cfg.model.num_classes)
    conditions = _grid_conditions(st.data, cfg.sample.num)
    spatial = conditions.pop("spatial", None)  # condition images of spatial tasks (data.spatial)
    # Sampling must not move the training RNG: forked, so a run with grids resumes like one without.
    with torch.random.fork_rng(devices=[st.device] if st.device.type == "cuda" else []), st.ema.applied(st.model):
        images = generate(
            st.model,
            cfg,
            cfg.sample.num,
            labels=labels,
            seed=cfg.train.seed,
            device=st.device,
            conditions=conditions,
            spatial=spatial,
        )
    return save_grid(images, path, nrow=cfg.model.num_classes or None)


def _grid_conditions(data: ImageDataset, num: int) -> dict[str, torch.Tensor]:
    """Per-sample conditions for a training grid: each data condition (e.g. ``task``) cycles through
    the values the data holds, so a multi-task run shows every task."""
    if "spatial" in data.conditions:  # condition images: whole samples of each task (data.spatial)
        return data.batch_conditions(grid_indices(data.conditions["task"], num))
    out = {}
    for name, values in data.conditions.items():
        distinct = values.unique()
        out[name] = distinct[torch.arange(num) % len(distinct)]
    return out


def _after_step(st: TrainState, end: int, lr: float, dt: float, metrics, writer) -> None:
    """Log, sample and checkpoint as the config asks after step ``st.step``."""
    cfg, done = st.cfg.train, st.step
    if done % cfg.log_every == 0 or done == end:
        n = st.window.pop("_n")
        row = {k: v / n for k, v in st.window.items()}
        row.update(step=done, lr=lr, images_per_s=cfg.batch_size / dt)
        st.window = {}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        for k, v in row.items():
            if k != "step":
                writer.add_scalar(f"train/{k}", v, done)
        st.last_row = row
    if cfg.sample_every and done % cfg.sample_every == 0 and done != end:
        _sample_grid(st, st.out / "samples" / f"step_{done:07d}.png")
    if done % cfg.ckpt_every == 0 or done == end:
        _checkpoint(st, done)


class _DeferredInterrupt:
    """SIGINT handler for the loop: the first Ctrl-C asks the loop to stop after the step in
    progress (checkpointed); a second one raises KeyboardInterrupt at once."""

    def __init__(self, log: Callable[[str], None]):
        self.requested = False
        self.log = log

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("\ninterrupt: finishing the current step, then checkpointing (Ctrl-C again to stop at once)")

    @contextlib.contextmanager
    def installed(self) -> Iterator[_DeferredInterrupt]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers live in the main thread; elsewhere Ctrl-C is not ours
            return
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _save_interrupted(st: TrainState, log: Callable[[str], None]) -> None:
    """Checkpoint the last completed step of an interrupted run (see the module docstring)."""
    newest = st.last_good or 0
    if st.updating:
        log(f"interrupted inside an update: not checkpointed; resume continues from step {newest} in {st.out}")
        return
    if st.step > newest:
        _checkpoint(st, st.step, rng=st.rng_mark)
    log(f"interrupted; checkpoint at step {st.step} in {st.out}. Continue with --resume.")


def _run_steps(st: TrainState, end: int, progress: bool, log, callback) -> None:
    """Steps ``st.step`` .. ``end``; metrics rows never outlive the newest checkpoint on exit."""
    from torch.utils.tensorboard import SummaryWriter  # heavy import: only when training

    cfg = st.cfg.train
    writer = SummaryWriter(str(st.out / "tb"), purge_step=st.step)
    metrics = open(st.out / "metrics.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=st.step, desc="train", disable=not progress, dynamic_ncols=True)
    start, ok = st.step, False
    st.model.train()
    try:
        with _DeferredInterrupt(log).installed() as interrupt:
            while st.step < end:
                t0 = time.perf_counter()
                lr = _train_step(st, st.step)
                if st.device.type == "cuda":
                    torch.cuda.synchronize(st.device)
                dt = time.perf_counter() - t0
                if st.step > start + 1:  # the first step pays for allocation and warm-up
                    st.timed_s, st.timed_steps = st.timed_s + dt, st.timed_steps + 1
                bar.update(1)
                _after_step(st, end, lr, dt, metrics, writer)
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
        metrics.close()
        writer.close()
        if not ok:
            _drop_unsaved_rows(st, log)


def _drop_unsaved_rows(st: TrainState, log) -> None:
    try:
        truncate_metrics(st.out / "metrics.jsonl", st.last_good or 0, log)
    except (OSError, ValueError) as exc:
        log(f"could not drop the metrics rows after the newest checkpoint: {exc}")


def _finish(st: TrainState, start: int, resumed: bool) -> dict[str, Any]:
    cfg, out = st.cfg, st.out
    grid = None
    if st.step == cfg.train.steps and st.step > start:
        grid = _sample_grid(st, out / "samples" / f"step_{st.step:07d}.png")
    segment = {
        "parameters": count_parameters(st.model),
        "peak_memory_mb": peak_memory_mb(st.device),
        "timed_steps": st.timed_steps,
        "timed_s": st.timed_s,
        "batch_size": cfg.train.batch_size,
        "device": str(st.device),
        "threads": torch.get_num_threads(),
    }
    accounting = merge_accounting_segment(read_json(out / "accounting.json") if resumed else None, segment)
    write_json(out / "accounting.json", accounting)
    return {"step": st.step, "last": st.last_row, "accounting": accounting, "grid": str(grid) if grid else None}


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
) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir``; returns the final metrics and accounting.

    ``resume`` continues from the newest intact checkpoint of ``out_dir``, or from ``checkpoint``
    (a step or a directory, see ``select_checkpoint``). ``stop_at`` ends the run after that step
    (with a checkpoint), as an interruption would: the tests use it to check resuming.
    ``callback(state)`` runs after every completed step (see :class:`TrainState`).
    """
    out = Path(out_dir)
    if find_checkpoints(out) and not resume:
        raise RunExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    ckpt = _load_resume_checkpoint(out, cfg, checkpoint) if resume else None
    end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    if ckpt is not None and ckpt.step >= end:
        return _nothing_to_do(out, ckpt.step, log)
    check_writable(out)
    st = _prepare(cfg, out, ckpt, log)
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        # Steps logged after the checkpoint are about to be redone: drop them so no step appears twice.
        truncate_metrics(out / "metrics.jsonl", ckpt.step, log)
        log(f"resuming {out} from step {ckpt.step}")
    else:
        write_json(out / "config.json", config_to_dict(cfg))
        (out / "metrics.jsonl").write_text("")
    start = st.step
    _run_steps(st, end, progress, log, callback)
    return _finish(st, start, resumed=ckpt is not None)
