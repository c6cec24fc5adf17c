"""Every adapter of a model at fixed conditions, exported exactly, or refused with what would be lost.

At one value per condition (``t=500, y=3``) each adapter's update of a layer is fixed. Which of
them a file can hold:

=========================  =======================================  ======================================
adapter                    as a plain LoRA (peft, diffusers-lora)   merged into the weights (diffusers)
=========================  =======================================  ======================================
``lowrank`` (any bank)     exact: the entries the weighting mixes,  exact
                           concatenated (:meth:`LowRankForm.lora_at`)
``scale``, ``shift``       refused (a LoRA file holds no changed    exact (``W' = (1 + a) W``, ``b' = b + s``)
                           base weight or bias)
``lowrank_act``            refused (not linear in x)                refused
position adapter           refused (not at one layer)               refused
new class tokens, base     refused                                  refused
extensions
=========================  =======================================  ======================================

An adapter at its weighting's "no update" value (``-1``, ``NaN``) changes nothing and is left
out, whatever its form: so every export at the no-update values is the base model. The LoRA of a
layer that several low-rank adapters change (TimeLoRA and ClassLoRA on one projection) is all of
their entries concatenated. A plain LoRA (a bank of one at weight 1) keeps its rank and alpha;
any other keeps ``alpha = rank`` (its scaling and mixing weights are folded into ``B``).

Every check runs before anything is written, and a refusal names each adapter, its form, where it
is and what exporting it would lose.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from difflora.adapters.context import ConditionValue
from difflora.adapters.forms import Branch
from difflora.adapters.inject import adapter_layers
from difflora.adapters.peft_format import (
    PeftFormatError,
    PlainLora,
    merge_and_unload,
    write_diffusers_lora,
    write_peft,
)
from difflora.adapters.positions import position_adapters
from difflora.adapters.tokens import NewClassTokens
from difflora.nets.layers import BaseExtension

__all__ = [
    "LORA_FORMATS",
    "ExportError",
    "check_conditions",
    "conditions_read",
    "export_lora",
    "fixed_loras",
    "merged_copy",
]

# The LoRA file formats :func:`export_lora` writes.
LORA_FORMATS = ("peft", "diffusers-lora")
_POSITION_LOSS = "it adds scale f(h) between two taps of a block, which no LoRA and no merged weight holds"
_EXTENSION_LOSS = "it extends the base model with parameters that no LoRA and no diffusers model holds"


class ExportError(PeftFormatError):
    """Adapters that the asked format cannot hold at the given conditions (nothing was written)."""


def _number(value: ConditionValue) -> ConditionValue:
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def conditions_read(model: nn.Module) -> set[str]:
    """The names of the conditions ``model``'s adapters (layer branches and position adapters) read."""
    read = {b.condition for _, layer in adapter_layers(model) for b in layer.adapters.values()}
    return read | {a.condition for _, a in position_adapters(model)}


def check_conditions(model: nn.Module, values: dict[str, ConditionValue]) -> dict[str, ConditionValue]:
    """``values`` as Python numbers, checked to give exactly the conditions ``model``'s adapters read."""
    read = conditions_read(model)
    if not read:
        raise ExportError("the model has no adapters: there is nothing to export")
    missing, unknown = sorted(read - set(values)), sorted(set(values) - read)
    if missing:
        raise ExportError(
            f"the adapters read condition(s) {', '.join(missing)}: give a value for each "
            f"(--condition {missing[0]}=VALUE; -1 or nan is an adapter's no-update value)"
        )
    if unknown:
        raise ExportError(f"no adapter reads condition(s) {', '.join(unknown)}; they read: {', '.join(sorted(read))}")
    out = {name: _number(v) for name, v in values.items()}
    shared = [n for n, v in out.items() if isinstance(v, torch.Tensor)]
    if shared:
        raise ExportError(f"condition {shared[0]!r} needs one value (an export is at fixed conditions)")
    return out


# (adapter name, its kind, what exporting it would lose) -> the paths where it is.
Problems = dict[tuple[str, str, str], list[str]]


def _refuse(problems: Problems, what: str) -> None:
    """Raise one error naming every adapter ``what`` cannot hold, where it is, and what would be lost."""
    if problems:
        parts = [
            f"adapter {name!r} ({kind}, {len(paths)} place(s), e.g. {paths[0]!r}): {loss}"
            for (name, kind, loss), paths in problems.items()
        ]
        raise ExportError(f"{what} cannot hold {'; '.join(parts)}; nothing was written")


def _unexportable(model: nn.Module, values: dict[str, ConditionValue]) -> Problems:
    """Position adapters away from their no-update value, and modules the base lacks: no format holds them."""
    found: Problems = {}
    for path, adapter in position_adapters(model):
        if not adapter.weighting.is_null(values[adapter.condition]):
            key = (adapter.name, f"position adapter {adapter.source}->{adapter.dest}", _POSITION_LOSS)
            found.setdefault(key, []).append(path)
    for path, module in model.named_modules():
        if isinstance(module, NewClassTokens | BaseExtension):
            key = (path.rsplit(".", 1)[-1], type(module).__name__, _EXTENSION_LOSS)
            found.setdefault(key, []).append(path)
    return found


def fixed_loras(model: nn.Module, **values: ConditionValue) -> dict[str, PlainLora]:
    """Every adapter of ``model`` at ``values`` as one exact plain LoRA per layer it changes (module docstring);
    :class:`ExportError` naming what a LoRA cannot hold (scale, shift, lowrank_act, position adapters)."""
    values = check_conditions(model, values)
    problems = _unexportable(model, values)
    layers: dict[str, PlainLora] = {}
    for path, layer in adapter_layers(model):
        pieces = []
        for name, branch in layer.adapters.items():
            value = values[branch.condition]
            if branch.weighting.is_null(value):
                continue
            factors = branch.lora_at(value)
            if factors is None:
                problems.setdefault((name, f"form {branch.form}", branch.lora_loss), []).append(path)
            elif factors[0].shape[0]:
                pieces.append((branch, value, factors))
        kernel = tuple(layer.base_layer.weight.shape[2:])
        if len(pieces) == 1 and _plain(pieces[0][0], pieces[0][1]):
            branch = pieces[0][0]
            a, b = branch.entries("lora_A")[0].detach(), branch.entries("lora_B")[0].detach()
            layers[path] = PlainLora(a, b, branch.alpha, kernel)
        elif pieces:
            a = torch.cat([f[0] for _, _, f in pieces])
            b = torch.cat([f[1] for _, _, f in pieces], dim=1)
            layers[path] = PlainLora(a, b, float(a.shape[0]), kernel)  # alpha = rank: scaling 1
    _refuse(problems, "a LoRA file")
    if not layers:
        raise ExportError(
            "at these conditions no adapter changes the model (every one is at its no-update value or zero): "
            "there is no LoRA to write; export --to diffusers for the base model"
        )
    return layers


def _plain(branch: Branch, value: ConditionValue) -> bool:
    """A bank of one used at weight exactly 1: exported as it is (its own rank and alpha)."""
    if branch.num_bases != 1:
        return False
    w = branch.shared_weights(value, torch.device("cpu"))
    return w is not None and float(w[0]) == 1.0


def export_lora(
    model: nn.Module, directory: str | Path, to: str = "peft", prefix: str = "unet", **values: ConditionValue
) -> Path:
    """Write every adapter of ``model`` at ``values`` as one plain LoRA file of format ``to``; returns its path.

    ``to``: ``"peft"`` (an adapter directory for ``PeftModel.from_pretrained``) or ``"diffusers-lora"``
    (``directory/pytorch_lora_weights.safetensors`` with keys under ``prefix``, the pipeline
    component: ``unet.load_lora_adapter(directory, prefix="unet")``, ``pipe.load_lora_weights``).
    Paths are relative to ``model``: pass the module the file is for (a diffusers model). Refused,
    with nothing written, where the adapters are no plain LoRA at these values (module docstring).
    """
    if to not in LORA_FORMATS:
        raise ExportError(f"unknown LoRA format {to!r}; choose {', '.join(LORA_FORMATS)}")
    layers = fixed_loras(model, **values)
    meta = {"difflora_conditions": json.dumps({k: _number(v) for k, v in values.items()})}
    if to == "peft":
        return write_peft(directory, layers, meta)
    return write_diffusers_lora(directory, layers, prefix, meta)


def merged_copy(model: nn.Module, **values: ConditionValue) -> nn.Module:
    """A copy of ``model`` with every adapter merged at ``values`` and no difflora module left
    (:func:`merge_and_unload`); ``model`` is unchanged. :class:`ExportError` naming what no merged
    weight holds (``lowrank_act`` and position adapters away from their no-update value)."""
    values = check_conditions(model, values)
    problems = _unexportable(model, values)
    for path, layer in adapter_layers(model):
        has_bias = layer.base_layer.bias is not None
        for name, branch in layer.adapters.items():
            value = values[branch.condition]
            if not branch.weighting.is_null(value) and branch.merge_problem(name, has_bias):
                loss = branch.lora_loss if not branch.mergeable else "the base layer has no bias to merge it into"
                problems.setdefault((name, f"form {branch.form}", loss), []).append(path)
    _refuse(problems, "a merged model")
    return merge_and_unload(copy.deepcopy(model), **values)
