"""The training loop: one for every model difflora builds.

A run directory holds everything a run produced::

    config.json      the resolved config (every default filled in)
    metrics.jsonl    one JSON object per logged step
    accounting.json  parameters, peak memory, step time, images/s
    tb/              TensorBoard scalars
    samples/         PNG sample grids (EMA weights)
    checkpoints/     see difflora.train.checkpoint

Resuming restores the model, EMA, optimizer and every RNG the loop draws from, so an interrupted
run continues bit-identically (on the same device and thread count).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from difflora.accounting import count_parameters, peak_memory_mb
from difflora.config import Config, config_to_dict, parse_config
from difflora.data import load_dataset
from difflora.diffusion.guidance import drop_labels
from difflora.generate import default_labels, generate
from difflora.imaging import save_grid
from difflora.model import build_diffusion, build_model
from difflora.train.checkpoint import find_checkpoints, load_checkpoint, save_checkpoint, select_checkpoint
from difflora.train.ema import EMA

__all__ = ["RunExistsError", "TrainingDiverged", "load_run_config", "resolve_device", "train", "write_json"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. The last good checkpoint is kept."""


class RunExistsError(FileExistsError):
    """The output directory already holds a run and resuming was not asked for."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return dev


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


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


def _check_resume_config(saved: dict[str, Any], cfg: Config) -> None:
    """A resumed run must use the config it was started with; only train.steps may grow."""
    now = config_to_dict(cfg)
    diffs = []
    for section, values in saved.items():
        for key, old in values.items():
            new = now.get(section, {}).get(key)
            if old != new and (section, key) not in {
                ("train", "steps"),
                ("train", "log_every"),
                ("train", "ckpt_every"),
            }:
                diffs.append(f"{section}.{key}: {old!r} -> {new!r}")
    if diffs:
        raise ValueError(
            "cannot resume with a different config (only train.steps, log_every and ckpt_every may change):\n  "
            + "\n  ".join(diffs)
        )


def _sample_grid(model, ema: EMA, cfg: Config, path: Path, device: torch.device) -> Path:
    ema_model = copy.deepcopy(model)
    ema.copy_to(ema_model)
    num = cfg.sample.num
    labels = default_labels(num, cfg.model.num_classes)
    images = generate(ema_model, cfg, num, labels=labels, seed=cfg.train.seed, device=device)
    nrow = cfg.model.num_classes or None
    return save_grid(images, path, nrow=nrow)


def train(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    stop_at: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir``; returns the final metrics and accounting.

    ``resume`` continues from the newest intact checkpoint of ``out_dir``, or from ``checkpoint``
    (a step or a directory, see ``select_checkpoint``). ``stop_at`` ends the run after that step
    (with a checkpoint), as an interruption would: the tests use it to check resuming.
    """
    out = Path(out_dir)
    device = resolve_device(cfg.train.device)
    if find_checkpoints(out) and not resume:
        raise RunExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    ckpt = None
    if resume:
        ckpt = load_checkpoint(select_checkpoint(out, checkpoint))
        _check_resume_config(ckpt.state["config"], cfg)
    # Everything that can fail on bad input (data, model) happens before the run directory is written.
    torch.manual_seed(cfg.train.seed)
    data = load_dataset(cfg.data, "train")
    if cfg.model.num_classes and data.num_classes > cfg.model.num_classes:
        raise ValueError(
            f"data.name={cfg.data.name} has {data.num_classes} classes but model.num_classes={cfg.model.num_classes}"
        )
    model = build_model(cfg).to(device)
    diffusion = build_diffusion(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config_to_dict(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    ema = EMA(model, cfg.train.ema_decay)
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema, ckpt.state["ema_updates"])
        opt.load_state_dict(ckpt.optim)
        _set_rng_state(gen, ckpt.rng)
        start = ckpt.step
        log(f"resuming {out} from step {start}")

    counts = count_parameters(model)
    from torch.utils.tensorboard import SummaryWriter  # heavy import: only when training

    writer = SummaryWriter(str(out / "tb"), purge_step=start)
    if ckpt is not None and (out / "metrics.jsonl").is_file():
        # Steps logged after the checkpoint are about to be redone: drop them so no step appears twice.
        kept = [ln for ln in (out / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= start]
        (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
    metrics_file = open(out / "metrics.jsonl", "a" if ckpt is not None else "w")
    last_good = start if ckpt is not None else None

    def checkpoint(step: int) -> None:
        nonlocal last_good
        # The loss of a step is computed before its update: the update itself can still overflow.
        if not all(torch.isfinite(p).all() for p in params):
            raise TrainingDiverged(
                f"weights became non-finite at step {step}; kept the last good checkpoint step {last_good} "
                f"in {out / 'checkpoints'}. Lower train.lr or set train.grad_clip > 0."
            )
        save_checkpoint(
            out,
            step,
            model=model.state_dict(),
            ema=ema.state_dict(),
            optimizer=opt,
            rng=_rng_state(gen),
            meta={"config": config_to_dict(cfg), "ema_updates": ema.num_updates},
        )
        last_good = step

    end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    bs = cfg.train.batch_size
    bar = tqdm(
        range(start, end), initial=start, total=cfg.train.steps, desc="train", disable=not progress, dynamic_ncols=True
    )
    model.train()
    step_time = 0.0
    timed_steps = 0
    window: dict[str, float] = {}
    last: dict[str, Any] = {}
    try:
        for step in bar:
            t0 = time.perf_counter()
            lr = _lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            # All randomness of a step comes from `gen` (data, flips, t, noise, label dropout) or the
            # global torch RNG (dropout): both are checkpointed, so resuming is exact.
            idx = torch.randint(len(data), (bs,), generator=gen)
            x, y = data.batch(idx, generator=gen)
            t = torch.randint(diffusion.num_timesteps, (bs,), generator=gen)
            noise = torch.randn(x.shape, generator=gen)
            kwargs = {}
            if cfg.model.num_classes:
                kwargs["y"] = drop_labels(y, cfg.train.label_dropout, gen).to(device)
            losses = diffusion.training_losses(model, x.to(device), t.to(device), kwargs, noise=noise.to(device))
            loss = losses["loss"].mean()
            if not torch.isfinite(loss):
                where = (
                    f"checkpoint step {last_good} in {out / 'checkpoints'}"
                    if last_good is not None
                    else "no checkpoint yet"
                )
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {step + 1}; kept the last good {where}. "
                    "Lower train.lr, raise train.warmup_steps or set train.grad_clip > 0."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip) if cfg.train.grad_clip > 0 else None
            opt.step()
            ema.update(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if step > start:  # the first step pays for allocation and warm-up
                step_time += dt
                timed_steps += 1
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + v.mean().item()
            window["_n"] = window.get("_n", 0) + 1
            if grad_norm is not None:
                window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm.item()

            done = step + 1
            if done % cfg.train.log_every == 0 or done == end:
                n = window.pop("_n")
                last = {k: v / n for k, v in window.items()}
                last.update(step=done, lr=lr, images_per_s=bs / dt)
                window = {}
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                for k, v in last.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, done)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            if cfg.train.sample_every and done % cfg.train.sample_every == 0 and done != end:
                _sample_grid(model, ema, cfg, out / "samples" / f"step_{done:07d}.png", device)
            if done % cfg.train.ckpt_every == 0 or done == end:
                checkpoint(done)
    except KeyboardInterrupt:
        # An interrupted run keeps its progress: checkpoint the last completed step, then stop.
        done_steps = int(bar.n)
        if done_steps > (last_good or 0):
            checkpoint(done_steps)
        log(f"interrupted; checkpoint at step {done_steps} in {out}. Continue with --resume.")
        raise
    finally:
        bar.close()
        metrics_file.close()
        writer.close()

    grid = None
    if end == cfg.train.steps and end > start:
        grid = _sample_grid(model, ema, cfg, out / "samples" / f"step_{end:07d}.png", device)
    step_s = step_time / timed_steps if timed_steps else float("nan")
    accounting = {
        "parameters": counts,
        "peak_memory_mb": peak_memory_mb(device),
        "train_step_s": step_s,
        "train_images_per_s": bs / step_s if timed_steps else float("nan"),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    write_json(out / "accounting.json", accounting)
    return {"step": end, "last": last, "accounting": accounting, "grid": str(grid) if grid else None}


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config saved in a run directory."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a difflora run directory: {path} is missing")
    return parse_config(json.loads(path.read_text()))
