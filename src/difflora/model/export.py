"""A built model's adapters at fixed conditions, in the formats other stacks read (``difflora export``).

=================  =================================================  ==========================================
format             what is written                                    loads with
=================  =================================================  ==========================================
``peft``           adapter directory (``adapter_config.json`` +       ``PeftModel.from_pretrained(base, OUT)``
                   ``adapter_model.safetensors``)
``diffusers-lora`` ``OUT/pytorch_lora_weights.safetensors`` (keys     ``unet.load_lora_adapter(OUT, prefix="unet")``,
                   under ``unet.`` / ``transformer.``)                ``pipe.load_lora_weights(OUT)``
``diffusers``      the diffusers model with every adapter merged      ``UNet2DModel.from_pretrained(OUT)`` (its class)
                   (``save_pretrained``: config + safetensors); for a
                   pipeline base, the whole pipeline folder with it   ``DiffusionPipeline.from_pretrained(OUT)``
=================  =================================================  ==========================================

What each format holds, adapter form by form, is :mod:`difflora.adapters.lora_export`'s table:
low-rank banks export exactly (a rank-2r LoRA for TimeLoRA at one t), scale and shift only merged,
``lowrank_act`` and position adapters nowhere (except at their no-update value). The LoRA formats
are relative to the backbone: the diffusers model itself for ``model.arch: diffusers``, the run's
net otherwise (peft only); ``diffusers`` needs a diffusers backbone.

A run on a pipeline folder (``model.pretrained`` with a ``model_index.json``) exports ``--to diffusers``
as a pipeline (:func:`save_pipeline`): every file and component of the folder but the denoiser
(``model_index.json``, ``scheduler``, ``vae``, ``text_encoder``, ``tokenizer``, ...) copied byte for
byte, and the merged denoiser saved into its ``unet`` / ``transformer`` subfolder. ``OUT`` is
written whole (staged beside it, then renamed): an existing non-empty ``OUT`` is replaced only
with ``overwrite``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from difflora.adapters.context import ConditionValue
from difflora.adapters.lora_export import ExportError, export_lora, merged_copy
from difflora.config.pretrained import PIPELINE_INDEX, read_pretrained
from difflora.config.schema import Config
from difflora.files.atomic import check_directory, storage_errors, write_directory
from difflora.model.build import DiffusionModel

__all__ = ["EXPORT_FORMATS", "component_name", "export_model", "save_merged", "save_pipeline", "writes_pipeline"]

EXPORT_FORMATS = ("peft", "diffusers-lora", "diffusers")


def component_name(net: nn.Module) -> str:
    """The name diffusers' pipelines give the denoiser ``net``: ``unet`` for UNets, else ``transformer``."""
    return "unet" if type(net).__name__.startswith("UNet") else "transformer"


def _merged_model(net: nn.Module, values: dict[str, ConditionValue]) -> nn.Module:
    merged = merged_copy(net, **values)
    if not hasattr(merged, "save_pretrained"):
        raise ExportError(f"{type(merged).__name__} is no diffusers model (no save_pretrained): export --to peft")
    return merged


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def save_merged(net: nn.Module, directory: str | Path, **values: ConditionValue) -> Path:
    """``net`` (a diffusers model) with every adapter merged at ``values``, written with ``save_pretrained``
    into ``directory`` (its class's ``from_pretrained(directory)`` loads it); ``net`` is unchanged.

    Everything is checked, and written under a temporary name beside ``directory``, before any file
    of ``directory`` is replaced: a refused or failed export leaves it as it was.
    """
    merged = _merged_model(net, values)
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.partial-{os.getpid()}"
    try:
        with storage_errors(directory, _nbytes(merged)):
            merged.save_pretrained(tmp, safe_serialization=True)
        directory.mkdir(parents=True, exist_ok=True)
        for file in sorted(tmp.iterdir()):
            os.replace(file, directory / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _size(path: Path) -> int:
    files = [path] if not path.is_dir() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def _copy(path: Path, into: Path) -> None:
    """``path`` (a file or a component folder) into ``into``, byte for byte; a symbolic link (a hub
    cache's snapshot) is copied as the file it points to."""
    if path.is_dir():
        shutil.copytree(path, into / path.name, symlinks=False)
    else:
        shutil.copyfile(path, into / path.name)


def save_pipeline(
    net: nn.Module, folder: str | Path, out: str | Path, overwrite: bool = False, **values: ConditionValue
) -> Path:
    """The pipeline folder ``folder`` with its denoiser replaced by ``net`` (the folder's denoiser as a run
    adapted it) merged at ``values``, written as ``out``: every other file and component copied byte
    for byte (``DiffusionPipeline.from_pretrained(out)`` loads it). ``out`` is written whole or not at
    all; an existing non-empty ``out`` is replaced only with ``overwrite``. Every check (the adapters'
    forms, ``out``) runs before the first file is written."""
    source = read_pretrained(folder)
    if not (source.path / PIPELINE_INDEX).is_file():
        raise ExportError(f"{source.path} is a model folder, not a pipeline ({PIPELINE_INDEX}): use save_merged")
    target = Path(out).expanduser().resolve()
    if target == source.path or source.path in target.parents or target in source.path.parents:
        raise ExportError(
            f"{out} is, holds or lies inside the pipeline {source.path} the run adapts; export into another directory"
        )
    what = "the exported pipeline"
    check_directory(out, what, overwrite)
    merged = _merged_model(net, values)
    name = source.denoiser.name
    others = sorted(p for p in source.path.iterdir() if p.name != name)

    def write(stage: Path) -> None:
        for path in others:
            _copy(path, stage)
        merged.save_pretrained(stage / name, safe_serialization=True)

    needed = _nbytes(merged) + sum(_size(p) for p in others)
    return write_directory(out, write, needed, what, overwrite)


def writes_pipeline(cfg: Config, to: str) -> bool:
    """Whether ``export --to to`` of a run of ``cfg`` writes a whole pipeline folder (module docstring)."""
    return (
        to == "diffusers"
        and cfg.model.pretrained is not None
        and (Path(cfg.model.pretrained) / PIPELINE_INDEX).is_file()
    )


def _learned_context(model: DiffusionModel) -> None:
    """Refuse a pipeline export of a UNet whose context is difflora's learned class tokens: the
    pipeline has no place for them (its UNet reads a text encoder's context)."""
    if getattr(model.net, "context_embedder", None) is not None:
        raise ExportError(
            "the run's UNet2DConditionModel reads difflora's learned class context (its pipeline has no text "
            "encoder), which a diffusers pipeline cannot hold; nothing was written: export --to peft or "
            "diffusers-lora for the adapters alone"
        )


def export_model(
    model: DiffusionModel,
    cfg: Config,
    to: str,
    out: str | Path,
    values: dict[str, ConditionValue],
    overwrite: bool = False,
) -> Path:
    """Export ``model`` (built from ``cfg``) at the fixed condition ``values`` as format ``to`` into ``out``
    (module table); returns what was written. Nothing is written when the format cannot hold an adapter.
    ``overwrite``: replace a non-empty ``out`` (a pipeline export only, :func:`writes_pipeline`)."""
    if to not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {to!r}; choose {', '.join(EXPORT_FORMATS)}")
    diffusers = cfg.model.arch == "diffusers"
    if to != "peft" and not diffusers:
        raise ExportError(
            f"--to {to} is for a diffusers backbone (model.arch: diffusers); this run's is model.arch "
            f"{cfg.model.arch}: export --to peft"
        )
    pipeline = writes_pipeline(cfg, to)
    if overwrite and not pipeline:
        raise ExportError(
            "--overwrite replaces a whole pipeline folder (--to diffusers of a run on a pipeline); this export "
            "writes its files into OUT, replacing those of the same names: remove --overwrite"
        )
    root = model.net.model if diffusers else model.net
    if pipeline:
        _learned_context(model)
        return save_pipeline(root, cfg.model.pretrained, out, overwrite, **values)
    if to == "diffusers":
        return save_merged(root, out, **values)
    return export_lora(root, out, to, component_name(root), **values)
