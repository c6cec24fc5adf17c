"""One model, many tasks: the task banks of a model and what DiffScaler (002 section 3.3) does with them.

Every adapter reading the ``task`` condition through an index weighting holds one entry per task
(the Affiner's ``affiner_a``, ``affiner_b``, ``affiner_lr``, or any ``model.adapters`` entry with
``condition: task, weighting: index``); task ``-1`` is "no update", the base model bit for bit.

* **parallel regime**: N tasks trained together, one run with ``data.tasks`` (each sample carries
  its task id) and ``model.affiner.tasks: N`` (no code here: the router mixes tasks per sample);
* **sequential regime**: :func:`add_tasks` appends fresh entries for new tasks to every task bank
  and freezes the existing ones (``frozen`` entries, ``difflora.adapters.forms``): no gradient,
  optimizer state, weight decay or EMA reaches them, so tasks 0..N-1 keep their outputs bit for bit
  while task N trains. Build the optimizer after growing (the banks are new parameters).
* :func:`remove_task` drops one task's entries (later task ids move down by one);
  :func:`export_task` writes one task's entries as a one-task adapter file (the usual
  safetensors + JSON with the base fingerprint, ``difflora.adapters.io``) and :func:`import_task`
  loads such a file back as a task of a model, appended or in place of task K.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from difflora.adapters import (
    Branch,
    IndexWeighting,
    adapter_layers,
    branch_from_spec,
    load_adapters,
    read_adapter_config,
    save_adapters,
)

__all__ = ["add_tasks", "export_task", "import_task", "num_tasks", "remove_task", "task_branches"]


def task_branches(net: nn.Module, condition: str = "task") -> list[tuple[str, str, Branch]]:
    """``(layer path, adapter name, branch)`` of every index-weighted branch reading ``condition``."""
    out = []
    for path, layer in adapter_layers(net):
        for name, branch in layer.adapters.items():
            if branch.condition == condition and isinstance(branch.weighting, IndexWeighting):
                out.append((path, name, branch))
    return out


def num_tasks(net: nn.Module, condition: str = "task") -> int:
    """The number of tasks the model's task banks hold (they must agree); an error if it has none."""
    counts = {b.num_bases for _, _, b in task_branches(net, condition)}
    if not counts:
        raise ValueError(f"the model has no index-weighted adapters reading {condition!r} (add model.affiner)")
    if len(counts) > 1:
        raise ValueError(f"the model's {condition!r} banks hold different numbers of tasks: {sorted(counts)}")
    return counts.pop()


def add_tasks(net: nn.Module, num: int = 1, condition: str = "task", freeze_existing: bool = True) -> int:
    """Append ``num`` fresh ("no change") entries to every task bank; returns the first new task id.

    With ``freeze_existing`` (the sequential regime) the existing tasks become frozen entries.
    """
    if num < 1:
        raise ValueError(f"add_tasks: num must be >= 1, got {num}")
    first = num_tasks(net, condition)
    for _, _, branch in task_branches(net, condition):
        branch.add_entries(num, freeze_existing)
    return first


def remove_task(net: nn.Module, task: int, condition: str = "task") -> None:
    """Drop task ``task`` from every task bank; tasks after it move down by one id."""
    n = num_tasks(net, condition)
    if not 0 <= task < n:
        raise ValueError(f"remove_task: task must be in 0..{n - 1}, got {task}")
    if n == 1:
        raise ValueError("remove_task: the model's only task cannot be removed (remove the adapters instead)")
    keep = [i for i in range(n) if i != task]
    for _, _, branch in task_branches(net, condition):
        banks = {name: branch.entries(name)[keep] for name in branch.bank_names}
        branch.set_entries(banks, branch.frozen - (task < branch.frozen))


@contextlib.contextmanager
def _single_task_view(net: nn.Module, condition: str) -> Iterator[list[tuple[nn.Module, str, Branch, Branch]]]:
    """Temporarily replace every task branch by a one-entry branch of the same form (restored on exit)."""
    swaps = []
    try:
        for path, name, branch in task_branches(net, condition):
            spec = {**branch.spec(), "weighting": IndexWeighting(1).spec(), "frozen": 0}
            single = branch_from_spec(spec, branch.geometry).to(branch.entries(branch.bank_names[0]))
            layer = net.get_submodule(path)
            layer.adapters[name] = single
            swaps.append((layer, name, branch, single))
        yield swaps
    finally:
        for layer, name, branch, _ in swaps:
            layer.adapters[name] = branch


def export_task(net: nn.Module, task: int, directory: str | Path, condition: str = "task") -> Path:
    """Write task ``task``'s entries of every task bank to ``directory`` as a one-task adapter file."""
    n = num_tasks(net, condition)
    if not 0 <= task < n:
        raise ValueError(f"export_task: task must be in 0..{n - 1}, got {task}")
    with _single_task_view(net, condition) as swaps, torch.no_grad():
        for _, _, branch, single in swaps:
            single.set_entries({k: branch.entries(k)[task : task + 1] for k in branch.bank_names}, 0)
        names = sorted({name for _, name, _, _ in swaps})
        return save_adapters(net, directory, names=names, metadata={"task": task, "of_tasks": n})


def import_task(net: nn.Module, directory: str | Path, task: int | None = None, condition: str = "task") -> int:
    """Load a one-task adapter file (:func:`export_task`) as task ``task`` (None: a new, appended task).

    The file must fit the model's task banks (same layers, forms and base weights: checked by
    :func:`~difflora.adapters.load_adapters` before anything changes). Overwriting a frozen task
    is an error. Returns the task id the file now serves.
    """
    config = read_adapter_config(directory)
    if any(e["weighting"].get("num_values") != 1 for e in config["adapters"]):
        raise ValueError(f"{directory} is not a one-task adapter file (export one with export_task)")
    n = num_tasks(net, condition)
    if task is not None and not 0 <= task < n:
        raise ValueError(f"import_task: task must be in 0..{n - 1} or None (append), got {task}")
    saved = {(e["path"], e["name"]) for e in config["adapters"]}
    banks = {(path, name) for path, name, _ in task_branches(net, condition)}
    if saved != banks:
        differ = sorted(saved ^ banks)[:3]
        raise ValueError(
            f"{directory} holds other task banks than the model (e.g. {differ}); a task file fits the "
            "model it was exported from"
        )
    with _single_task_view(net, condition) as swaps:
        load_adapters(net, directory)
        loaded = {(id(layer), name): single for layer, name, _, single in swaps}
    frozen = [
        f"{path}.{name}"
        for path, name, branch in task_branches(net, condition)
        if task is not None and task < branch.frozen
    ]
    if frozen:  # found before any bank changes
        raise ValueError(f"import_task: task {task} is frozen in {frozen[0]}; import as a new task")
    if task is None:
        task = add_tasks(net, 1, condition, freeze_existing=False)
    for path, name, branch in task_branches(net, condition):
        single = loaded[(id(net.get_submodule(path)), name)]
        banks = {k: branch.entries(k).detach().clone() for k in branch.bank_names}
        for k in branch.bank_names:
            banks[k][task] = single.entries(k)[0].to(banks[k])
        branch.set_entries(banks, branch.frozen)
    return task
