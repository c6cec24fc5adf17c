"""A built model's adapters at fixed conditions, in the formats other stacks read (``difflora export``).

=================  =================================================  ==========================================
format             what is written                                    loads with
=================  =================================================  ==========================================
``peft``           adapter directory (``adapter_config.json`` +       ``PeftModel.from_pretrained(base, OUT)``
                   ``adapter_model.safetensors``)
``diffusers-lora`` ``OUT/pytorch_lora_weights.safetensors`` (keys     ``unet.load_lora_adapter(OUT, prefix="unet")``,
                   under ``unet.`` / ``transformer.``)                ``pipe.load_lora_weights(OUT)``
``diffusers``      the diffusers model with every adapter merged      ``UNet2DModel.from_pretrained(OUT)`` (its class)
                   (``save_pretrained``: config + safetensors)
=================  =================================================  ==========================================

What each format holds, adapter form by form, is :mod:`difflora.adapters.lora_export`'s table:
low-rank banks export exactly (a rank-2r LoRA for TimeLoRA at one t), scale and shift only merged,
``lowrank_act`` and position adapters nowhere (except at their no-update value). The LoRA formats
are relative to the backbone: the diffusers model itself for ``model.arch: diffusers``, the run's
net otherwise (peft only); ``diffusers`` needs a diffusers backbone.

A pipeline-folder base (``model.pretrained``) would write the whole folder: the folder's other
components copied and :func:`save_merged` into its ``unet`` / ``transformer`` subfolder
(:func:`component_name`), the one step :func:`export_model` does not take yet.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from difflora.adapters.context import ConditionValue
from difflora.adapters.lora_export import ExportError, export_lora, merged_copy
from difflora.config.schema import Config
from difflora.files.atomic import storage_errors
from difflora.model.build import DiffusionModel

__all__ = ["EXPORT_FORMATS", "component_name", "export_model", "save_merged"]

EXPORT_FORMATS = ("peft", "diffusers-lora", "diffusers")


def component_name(net: nn.Module) -> str:
    """The name diffusers' pipelines give the denoiser ``net``: ``unet`` for UNets, else ``transformer``."""
    return "unet" if type(net).__name__.startswith("UNet") else "transformer"


def save_merged(net: nn.Module, directory: str | Path, **values: ConditionValue) -> Path:
    """``net`` (a diffusers model) with every adapter merged at ``values``, written with ``save_pretrained``
    into ``directory`` (its class's ``from_pretrained(directory)`` loads it); ``net`` is unchanged.

    Everything is checked, and written under a temporary name beside ``directory``, before any file
    of ``directory`` is replaced: a refused or failed export leaves it as it was.
    """
    merged = merged_copy(net, **values)
    if not hasattr(merged, "save_pretrained"):
        raise ExportError(f"{type(merged).__name__} is no diffusers model (no save_pretrained): export --to peft")
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    needed = sum(t.numel() * t.element_size() for t in merged.state_dict().values())
    try:
        with storage_errors(directory, needed):
            merged.save_pretrained(tmp, safe_serialization=True)
        directory.mkdir(parents=True, exist_ok=True)
        for file in sorted(tmp.iterdir()):
            os.replace(file, directory / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def export_model(
    model: DiffusionModel, cfg: Config, to: str, out: str | Path, values: dict[str, ConditionValue]
) -> Path:
    """Export ``model`` (built from ``cfg``) at the fixed condition ``values`` as format ``to`` into ``out``
    (module table); returns what was written. Nothing is written when the format cannot hold an adapter."""
    if to not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {to!r}; choose {', '.join(EXPORT_FORMATS)}")
    diffusers = cfg.model.arch == "diffusers"
    if to != "peft" and not diffusers:
        raise ExportError(
            f"--to {to} is for a diffusers backbone (model.arch: diffusers); this run's is model.arch "
            f"{cfg.model.arch}: export --to peft"
        )
    root = model.net.model if diffusers else model.net
    if to == "diffusers":
        return save_merged(root, out, **values)
    return export_lora(root, out, to, component_name(root), **values)
