"""The sequential regime from a config (002 section 3.3): add tasks to a multi-task adapter run.

``model.affiner.frozen_tasks: N`` (or ``model.adapters[].frozen``) with ``train.init_from`` a run
that trained N tasks: the new model's task banks hold N frozen entries and the new tasks' trainable
ones. :func:`read_task_run` is the :data:`difflora.train.base.BASE_READERS` entry that fills them:
it loads that run's own base, then the run's banks (every entry, frozen or not) as the frozen
entries. The new run then stores those entries itself, so it needs the first run no more: its base
record is the first run's base, plus ``adapters_from``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflora.adapters import adapter_layers
from difflora.train.base import key_listing, load_base
from difflora.train.checkpoint import stream_weights

__all__ = ["frozen_banks", "read_task_run"]


def frozen_banks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{state-dict key of a bank: its frozen entries}`` of every adapter bank holding frozen entries."""
    out = {}
    for path, layer in adapter_layers(model):
        for name, branch in layer.adapters.items():
            if branch.frozen:
                out.update({f"{path}.adapters.{name}.{b}": getattr(branch, b + "_frozen") for b in branch.bank_names})
    return out


def read_task_run(
    model: nn.Module,
    ckpt: Path,
    sources: dict[str, Path],
    state: dict[str, Any],
    expect: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """The base record of ``model`` loaded from the adapter run ``ckpt`` when the model holds frozen
    entries; None for a model without them (the checkpoint is then read as a plain base). Frozen
    entries with a plain base are an error on a fresh start (``expect`` None): nothing would fill them."""
    frozen = frozen_banks(model)
    if not frozen:
        return None
    if state.get("base", {}).get("keys"):
        return _load_adapter_run(model, ckpt, sources, state, frozen, expect)
    if expect is None:
        raise ValueError(
            f"train.init_from: frozen task entries (model.affiner.frozen_tasks) come from the multi-task run that "
            f"trained them, but {ckpt} is a run without adapters; set train.init_from to that run"
        )
    return None


@torch.no_grad()
def _load_adapter_run(
    model: nn.Module,
    ckpt: Path,
    sources: dict[str, Path],
    state: dict[str, Any],
    frozen: dict[str, torch.Tensor],
    expect: dict[str, Any] | None,
) -> dict[str, Any]:
    """``init_from`` an adapter run: its base, then its banks (every entry, frozen or not) as the
    model's frozen entries ``frozen``."""
    tensors = dict(stream_weights(sources))  # the adapter run's own tensors: small
    full = {
        key: torch.cat([tensors[k] for k in (key + "_frozen", key) if k in tensors]) for key in frozen if key in tensors
    }
    used = {k for key in full for k in (key + "_frozen", key)}
    problems = []
    if missing := sorted(set(frozen) - set(full)):
        problems.append(f"frozen banks it does not hold: {key_listing(missing)}")
    if extra := sorted(set(tensors) - used):
        problems.append(f"tensors with no frozen place in this model (trained base weights?): {key_listing(extra)}")
    if bad := [
        f"{k} {tuple(full[k].shape)} -> {tuple(frozen[k].shape)}"
        for k in sorted(full)
        if full[k].shape != frozen[k].shape
    ]:
        problems.append(
            f"shapes differ (does model.affiner.frozen_tasks equal its number of tasks?): {key_listing(bad, 3)}"
        )
    if problems:
        raise ValueError(f"train.init_from: the adapter run {ckpt} does not fit this model: " + "; ".join(problems))
    record = load_base(model, state["base"]["path"], state["base"]["weights"], expect=expect or state["base"])
    for key, tensor in full.items():
        frozen[key].copy_(tensor)
    return record | {"adapters_from": str(ckpt)}
