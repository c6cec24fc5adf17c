"""Parameter and resource accounting: what a model holds and what a run costs."""

from __future__ import annotations

import resource
import sys
from collections import OrderedDict

import torch
from torch import nn

from difflora.adapters import IndexWeighting, adapter_layers

__all__ = ["parameter_counts", "parameter_group", "peak_memory_mb", "per_task_counts"]

# Names that mark conditioning machinery, so `difflora params` can show what LoRA replaces.
_EMBEDDING_PARTS = ("time_embed", "emb_layers", "label_emb", "t_embedder", "y_embedder", "context_embedder")


def parameter_group(name: str) -> str:
    """The accounting group of a parameter name: adapters, their weighting tables, embeddings or base.

    Adapter-owned tensors live under a wrapped layer's ``adapters.<name>.`` (every update form) or a
    block's ``position_adapters.<name>.``; a trainable weighting's table under ``...weighting.``.
    """
    parts = name.split(".")
    if "weighting" in parts:
        return "weighting"
    if "adapters" in parts or "position_adapters" in parts:
        return "adapters"
    if any(part in parts for part in _EMBEDDING_PARTS):
        return "embeddings"
    return "base"


def _top_level(name: str) -> str:
    parts = name.split(".")
    # DiffusionModel wraps the backbone as `.net`: break down by the backbone's own children.
    return parts[1] if parts[0] == "net" and len(parts) > 1 else parts[0]


def parameter_counts(model: nn.Module) -> dict:
    """Total and trainable parameters, by group and by top-level module (shared tensors counted once).

    A dict of counts (before issue 27 also named ``count_parameters``); the one number of a module
    is :func:`difflora.nets.count_parameters`.
    """
    seen: set[int] = set()
    total = trainable = 0
    by_group: dict[str, int] = OrderedDict((g, 0) for g in ("base", "embeddings", "adapters", "weighting"))
    by_module: dict[str, int] = OrderedDict()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        by_group[parameter_group(name)] += n
        top = _top_level(name)
        by_module[top] = by_module.get(top, 0) + n
    # Per task (DiffScaler): one entry of every task bank plus the trainable tensors outside them.
    per_task = per_task_counts(model)
    return {
        "total": total,
        "trainable": trainable,
        "by_group": dict(by_group),
        "by_module": dict(by_module),
        "per_task": per_task,
    }


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, max resident set size on CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def per_task_counts(net: nn.Module, condition: str = "task") -> dict[str, int]:
    """Trainable and stored parameters per task: ``{"tasks": N, "task_entry": n, "shared_trainable": m,
    "stored_per_task": n + m}``.

    ``task_entry``: one entry of every index-weighted bank reading ``condition`` (what each task
    owns); ``shared_trainable``: trainable parameters outside those banks (biases, norms, a whole
    fine-tuned model), which a method must store once per task to serve several tasks.
    """
    entry, banked, tasks = 0, set(), 0
    for _, layer in adapter_layers(net):
        for branch in layer.adapters.values():
            if branch.condition == condition and isinstance(branch.weighting, IndexWeighting):
                params = [p for n, p in branch.named_parameters() if not n.startswith("weighting.")]
                banked.update(id(p) for p in params)
                entry += sum(p.numel() for p in params) // branch.num_bases
                tasks = max(tasks, branch.num_bases)
    shared = sum(p.numel() for p in net.parameters() if p.requires_grad and id(p) not in banked)
    return {"tasks": tasks, "task_entry": entry, "shared_trainable": shared, "stored_per_task": entry + shared}
