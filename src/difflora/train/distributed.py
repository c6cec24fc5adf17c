"""Multi-process data-parallel training on torch.distributed (DDP), launched by torchrun or accelerate.

difflora builds no launcher of its own. ``torchrun --nproc_per_node N -m difflora train CONFIG`` and
``accelerate launch --num_processes N -m difflora train CONFIG`` both start N copies of the command
with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment;
:func:`process_group` reads them, joins the process group (``nccl`` on CUDA, ``gloo`` on the CPU)
and places each process on its own GPU (``cuda:LOCAL_RANK``).

How a step is shared (the contract the training loop keeps, see ``step.py``):

* ``train.batch_size`` is the **global** batch B. Every process draws the same B dataset indices and
  the same per-sample random numbers (timesteps, noise, label dropout) from the same seeded
  generator, then computes only its own rows (:meth:`Dist.rows`): process r of W owns a disjoint
  1/W of every batch, so each process sees its own shard of the data and the union is the batch a
  single process would have drawn. Changing W at a fixed B therefore changes no draw, and the loss
  curve stays the same up to the order of floating-point sums (dropout masks are the exception:
  each process draws its own, and a checkpoint stores each process's RNG state so a resume continues it).
* Gradients are averaged over processes by :class:`DistributedModel` (PyTorch's
  ``DistributedDataParallel``). DDP only registers parameters with ``requires_grad``, so adapters
  on a frozen base synchronise the adapters alone and no frozen weight crosses the network.
* Process 0 alone writes (logs, metrics, sample grids, checkpoints); every process reads a
  checkpoint when resuming, so the run directory must be visible to all of them (a shared
  filesystem across nodes).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["Dist", "DistributedModel", "launched_rank", "launched_world_size", "process_group", "wrap_model"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world_size`` (1 and 0 without a launcher)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rows(self, n: int) -> slice:
        """This process's rows of a batch of ``n`` (a multiple of ``world_size``): one contiguous block."""
        if n % self.world_size:
            raise ValueError(f"a batch of {n} cannot be shared by {self.world_size} processes")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every process (a collective: all processes must call it)."""
        if self.distributed:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` maximised over every process (a collective)."""
        if self.distributed:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def gather(self, values: torch.Tensor) -> list[torch.Tensor]:
        """``values`` of every process in rank order (a collective; the same shape everywhere)."""
        if not self.distributed:
            return [values]
        out = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(out, values.contiguous())
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, accelerate launch) started; 1 without one."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={raw!r} in the environment is not a number; launch with torchrun") from None
    if size < 1:
        raise ValueError(f"WORLD_SIZE={size} in the environment must be >= 1")
    return size


def _env_int(name: str) -> int:
    if name not in os.environ:
        raise ValueError(
            f"WORLD_SIZE is set but {name} is not: start multi-process training with torchrun or accelerate launch"
        )
    return int(os.environ[name])


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Dist, torch.device]]:
    """Join the launcher's process group for the block; yields (this process's Dist, its device).

    A single process (no launcher) yields ``Dist()`` and ``device`` unchanged. A group that is
    already initialised (by the caller, or by accelerate's ``Accelerator``) is used as it is and
    left open; one opened here is closed on exit, also on error. On CUDA process r trains on
    ``cuda:LOCAL_RANK``.
    """
    if not dist.is_initialized() and launched_world_size() == 1:
        yield Dist(), device
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    opened = False
    if not dist.is_initialized():
        rank, size = _env_int("RANK"), launched_world_size()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=datetime.timedelta(minutes=30))
        opened = True
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(), local), device
    finally:
        if opened:
            dist.destroy_process_group()


class DistributedModel(DistributedDataParallel):
    """``DistributedDataParallel`` around a :class:`~difflora.model.build.DiffusionModel`.

    DDP's ``forward`` is what registers a step's gradients for averaging, so objectives must call
    this wrapper, not the inner model; the model's own switches an objective uses (the distillation
    teacher's ``adapters_disabled``) are forwarded to the inner model.
    """

    def adapters_disabled(self, *names: str) -> contextlib.AbstractContextManager[None]:
        return self.module.adapters_disabled(*names)


def wrap_model(model: nn.Module, ctx: Dist, device: torch.device) -> nn.Module:
    """The model a training step calls: ``model`` itself in one process, a :class:`DistributedModel`
    otherwise (gradients of the trainable parameters averaged over processes in backward)."""
    if not ctx.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # Buffers (none is trained) are synchronised once at the start, not before every forward
    # (newer torch names the switch forward_sync_buffers and deprecates broadcast_buffers).
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    quiet = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedModel(model, device_ids=ids, **quiet)


def launched_rank() -> int:
    """This process's rank as the launcher set it (``RANK``; 0 without a launcher)."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))
