"""One optimizer step of the training loop: micro-batches, mixed precision, processes, metrics.

A step of global batch B (``train.batch_size``) over W processes with ``train.grad_accum`` = k:

1. every process draws the same B dataset indices (the data draws its flips) from the loop's
   generator, or a streamed folder gives the batch of this step, reading this process's rows only;
2. for each micro-batch j of B/k rows, the objective draws the per-sample random numbers of the
   whole batch (the generator is rewound to the same state for every j, so they are the numbers a
   k = 1 step draws) and computes this process's B/(kW) rows of micro-batch j (``Batch.rows``);
3. each micro-batch's loss is ``sum of its per-sample losses * W / B``: summed over micro-batches
   and averaged over processes by DDP, the gradient is that of the mean loss of the B rows,
   whatever k and W are. DDP synchronises on the last micro-batch only (``no_sync`` before);
4. clipping (after the fp16 scaler's unscale), the optimizer step and the EMA update.

No step reads a value back to the host: the loss terms are summed on the device
(``state.Window``) and read, over all processes at once, only when a metrics row or a checkpoint
is due. A non-finite loss is recorded on the device too and raised (``TrainingDiverged``) there.
"""

from __future__ import annotations

import contextlib
import math

import torch

from difflora.adapters.tokens import NewClassTokens
from difflora.config.schema import Config, TrainConfig
from difflora.errors import DiffloraError
from difflora.train.distributed import Dist
from difflora.train.objectives import Batch
from difflora.train.precision import autocast
from difflora.train.state import TrainState

__all__ = [
    "TrainingDiverged",
    "check_batch_split",
    "diverged",
    "optimizer_groups",
    "own_rows",
    "process_rng_states",
    "rng_state",
    "scheduled_lr",
    "set_process_rng_state",
    "set_rng_state",
    "train_step",
]


class TrainingDiverged(RuntimeError, DiffloraError):
    """The loss or the weights became NaN or infinite. The last good checkpoint is kept."""


def _global_rng_state() -> dict[str, torch.Tensor]:
    """This process's global RNG states (dropout draws from them): CPU, and every CUDA device."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _set_global_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The loop's generator and this process's global RNG states, as a checkpoint stores them."""
    return {"loop": gen.get_state(), **_global_rng_state()}


def set_rng_state(gen: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    gen.set_state(state["loop"])
    _set_global_rng_state(state)


def process_rng_states(ctx: Dist, device: torch.device) -> dict[str, torch.Tensor]:
    """The global RNG states of processes 1.. of a multi-process run, as ``rank{r}/torch`` and
    ``rank{r}/cuda{i}`` next to process 0's plain keys (a collective: every process must call it).
    Each process draws its own dropout masks, so each one's stream is part of the run's state."""
    out = {}
    for key, value in _global_rng_state().items():
        for r, theirs in enumerate(ctx.gather(value.to(device))):
            if r:
                out[f"rank{r}/{key}"] = theirs.cpu()
    return out


def set_process_rng_state(ctx: Dist, state: dict[str, torch.Tensor]) -> bool:
    """Restore this process's own global RNG state from ``state`` (process 0's were restored by
    :func:`set_rng_state`); False when ``state`` holds no state of each of ``ctx``'s processes (a
    checkpoint from before they were stored, or from another number of processes)."""
    saved = 1 + sum(1 for k in state if k.startswith("rank") and k.endswith("/torch"))
    if saved != ctx.world_size:
        return False
    prefix = f"rank{ctx.rank}/"
    if ctx.rank:
        _set_global_rng_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return True


def check_batch_split(batch_size: int, grad_accum: int, world_size: int) -> None:
    """The global batch must split evenly into micro-batches and processes; the error says how."""
    parts = grad_accum * world_size
    if batch_size % parts:
        lower, upper = batch_size - batch_size % parts, batch_size + parts - batch_size % parts
        raise ValueError(
            f"train.batch_size={batch_size} (the global batch) must be a multiple of train.grad_accum={grad_accum} "
            f"x {world_size} process(es) = {parts}; use train.batch_size={lower or upper} or {upper}"
        )


def diverged(st: TrainState, what: str) -> TrainingDiverged:
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


def _micro_rows(j: int, micro: int, ctx: Dist) -> slice:
    """This process's rows of micro-batch j (rows j*micro .. (j+1)*micro of the global batch)."""
    own = ctx.rows(micro)
    return slice(j * micro + own.start, j * micro + own.stop)


def own_rows(cfg: TrainConfig, ctx: Dist) -> list[int]:
    """The rows of each global batch this process computes, over all its micro-batches (the rows a
    streamed dataset reads)."""
    micro = cfg.batch_size // cfg.grad_accum
    return [r for j in range(cfg.grad_accum) for r in range(*_micro_rows(j, micro, ctx).indices(cfg.batch_size))]


def _accumulate(st: TrainState, x: torch.Tensor, conditions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward and backward of every micro-batch of this process; returns its share of the batch
    means of the loss terms (0-d tensors on the device)."""
    cfg, ctx = st.cfg.train, st.dist
    k, total = cfg.grad_accum, cfg.batch_size
    micro = total // k
    mark = st.generator.get_state()
    shares: dict[str, torch.Tensor] = {}
    for j in range(k):
        st.generator.set_state(mark)  # the same draws for the whole batch in every micro-batch
        batch = Batch(x, conditions, rows=_micro_rows(j, micro, ctx) if (k > 1 or ctx.distributed) else None)
        last = j == k - 1
        quiet = st.train_model.no_sync() if (ctx.distributed and not last) else contextlib.nullcontext()
        with quiet:
            with autocast(cfg.precision, st.device):
                losses = st.objective(st.train_model, batch, st.generator, st.device)
            local = {name: v.float().sum() / total for name, v in losses.items()}
            st.scaler.scale(local["loss"] * ctx.world_size).backward()
        for name, v in local.items():
            shares[name] = shares[name] + v if name in shares else v
    return shares


def train_step(st: TrainState, step: int) -> float:
    """Run step ``step`` (0-based); returns its learning rate. Everything random comes from
    ``st.generator`` (data, flips, t, noise, label dropout) or the global torch RNG (dropout)."""
    cfg = st.cfg.train
    st.rng_mark = rng_state(st.generator)
    lr = scheduled_lr(cfg, step)
    for group in st.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    # Per-sample conditions the data supplies (e.g. a task id per sample with data.tasks) go to the
    # objective next to the labels (difflora.data.batches: in memory or streamed from disk).
    x, y, conditions = st.data.draw(step, st.generator)
    st.optimizer.zero_grad(set_to_none=True)
    shares = _accumulate(st, x, {"y": y, **conditions})
    if cfg.grad_clip > 0:
        st.scaler.unscale_(st.optimizer)
        # Every process holds the same averaged gradients: its share of the norm is 1/W of it.
        norm = torch.nn.utils.clip_grad_norm_(st.params, cfg.grad_clip)
        shares["grad_norm"] = norm.detach().float() / st.dist.world_size
    # From here to the end of the step the state is mid-update: an interrupt must not checkpoint it.
    st.updating = True
    st.scaler.step(st.optimizer)
    st.scaler.update()
    st.ema.update(st.model)
    st.window.add(shares, step + 1)
    st.step = step + 1
    st.updating = False
    st.rng_mark = None
    return lr


def scheduled_lr(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based): a linear warm-up to ``train.lr`` over
    ``train.warmup_steps`` steps, then ``train.lr_schedule``. With progress p = (step - warmup) /
    (steps - warmup), from 0 at the first step after the warm-up towards 1 at the end, linear gives
    lr (1 - p) and cosine lr (1 + cos(pi p)) / 2; the last step's rate is small but not 0."""
    # Multiplying by 1.0 is exact: a constant schedule gives the rates it gave before schedules existed.
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    p = max(0, step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    decay = {"constant": 1.0, "linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * p))}[cfg.lr_schedule]
    return cfg.lr * warm * decay


def optimizer_groups(model: torch.nn.Module, params: list[torch.nn.Parameter], cfg: Config) -> list[dict]:
    """AdamW parameter groups: ``params``, with the new class-token tables (``model.context.new_tokens``)
    in a group of their own at ``train.token_lr`` when it is set (``lr_scale``: its ratio to ``train.lr``,
    which the warm-up schedule multiplies)."""

    if cfg.train.token_lr is None:
        return [{"params": params}]
    tokens = {id(m.new_tokens) for m in model.modules() if isinstance(m, NewClassTokens)}
    if not tokens:
        raise ValueError("train.token_lr sets the learning rate of new class tokens: set model.context.new_tokens too")
    table = [p for p in params if id(p) in tokens]
    rest = [p for p in params if id(p) not in tokens]
    groups = [{"params": rest}] if rest else []
    return [*groups, {"params": table, "lr_scale": cfg.train.token_lr / cfg.train.lr}]
