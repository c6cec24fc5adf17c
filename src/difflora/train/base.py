"""Adapt a trained model: load a checkpoint trained without adapters into an adapted model.

``train.init_from: RUN_DIR | CHECKPOINT_DIR | DIFFUSERS_FOLDER`` names the base (a diffusers model or
pipeline folder, ``model.pretrained``: its denoiser's safetensors fill the model's ``net.model.``,
see :mod:`difflora.model.pretrained`). Its keys map into the adapted
model by their paths: a wrapped layer's tensors live at ``<path>.base_layer.<param>`` in the
adapted model and at ``<path>.<param>`` in the base; every other base key keeps its name. Tensors
the adapters own (their parameters, and buffers of modules that hold only adapter parameters)
are new and keep their initialisation. A base key the model has no place for, a model key the
base lacks, or a shape that differs is an error that names the keys, and nothing is copied
unless everything fits.

The base is read one tensor at a time straight into the model's parameters, so loading adds no
second copy of it to memory; the same pass computes its fingerprint (a content hash, see
:class:`~difflora.train.checkpoint.Fingerprint`) that the run records to find and check its base
again on resume, sampling and evaluation.

Two registries let a paper package extend this (its ``register()``, :mod:`difflora.registry`):
:data:`BASE_READERS` read a checkpoint in another way before it is read as a plain base (002's
sequential regime: a multi-task adapter run fills the model's frozen task entries), and
:data:`BASE_LOADED` hooks finish a freshly built model once its base is in (002's ControlNet
branch starts as a copy of the loaded encoder).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflora.adapters import adapter_layers, adapter_parameters
from difflora.config.pretrained import is_pretrained_folder
from difflora.files.jsonfile import read_json_file
from difflora.model.pretrained import PRETRAINED_KEY_PREFIX, pretrained_weights
from difflora.registry import Registry
from difflora.train.checkpoint import (
    CheckpointError,
    Fingerprint,
    base_missing,
    select_checkpoint,
    stream_weights,
    tensor_shapes,
    weight_sources,
)
from difflora.train.run_dir import RESTORE_CONFIG

__all__ = [
    "BASE_LOADED",
    "BASE_READERS",
    "PRETRAINED_PREFIX",
    "BaseReader",
    "adapter_owned_keys",
    "base_key_map",
    "bases_cache_dir",
    "describe_base",
    "key_listing",
    "load_base",
    "pretrained_run_dir",
    "resolve_base_checkpoint",
    "start_from_base",
    "stored_state",
]

# ``train.init_from: pretrained:NAME``: the shared base ``difflora pretrain NAME`` trained into the cache.
PRETRAINED_PREFIX = "pretrained:"

# ``reader(model, ckpt, sources, state, expect)``: the base record when it read the checkpoint ``ckpt``
# (weight files ``sources``, ``state.json`` contents ``state``) into ``model`` itself, None when the
# checkpoint is not its kind (it may raise when the model needs its kind); ``expect`` as in load_base.
BaseReader = Callable[[nn.Module, Path, dict[str, Path], dict[str, Any], dict[str, Any] | None], dict[str, Any] | None]
# Readers load_base asks, in registration order, before it reads a checkpoint as a plain base.
BASE_READERS: Registry[BaseReader] = Registry("train.base_reader")
# ``hook(model)`` after the base is loaded into a freshly built model (not on resume: the run's checkpoint
# then restores what a hook set).
BASE_LOADED: Registry[Callable[[nn.Module], object]] = Registry("train.base_loaded")


def bases_cache_dir() -> Path:
    """``$DIFFLORA_CACHE/bases`` if the variable is set, else ``~/.cache/difflora/bases``."""
    root = os.environ.get("DIFFLORA_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "difflora") / "bases"


def pretrained_run_dir(name: str) -> Path:
    """The run directory of the shared base ``name`` (``configs/pretrain/NAME.yaml``) in the cache."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"pretrained base name {name!r} must be a preset name such as fmnist16-unet")
    return bases_cache_dir() / name


def _pretrained_checkpoint(init_from: str) -> Path:
    """The final checkpoint of a finished shared base; a missing or unfinished one is an error."""
    name = init_from[len(PRETRAINED_PREFIX) :]
    run = pretrained_run_dir(name)
    try:
        ckpt = select_checkpoint(run)
        steps = read_json_file(run / "config.json", fix=RESTORE_CONFIG, expect=dict)["train"]["steps"]
    except (CheckpointError, OSError, ValueError, KeyError):
        raise FileNotFoundError(
            f"train.init_from={init_from}: no finished base in {run}; run `difflora pretrain {name}` first"
        ) from None
    if int(ckpt.name.removeprefix("step_")) < steps:
        raise ValueError(
            f"train.init_from={init_from}: the base in {run} is unfinished ({ckpt.name} of {steps} steps); "
            f"run `difflora pretrain {name}` to finish it"
        )
    return ckpt.resolve()


def resolve_base_checkpoint(init_from: str | Path) -> Path:
    """The checkpoint directory ``init_from`` names: itself, a run directory's newest intact checkpoint,
    (``pretrained:NAME``) the final checkpoint of the shared base ``difflora pretrain NAME`` trained, or
    a diffusers model or pipeline folder (``model.pretrained``)."""
    if str(init_from).startswith(PRETRAINED_PREFIX):
        return _pretrained_checkpoint(str(init_from))
    path = Path(init_from)
    if is_pretrained_folder(path):  # a diffusers model or pipeline folder (model.pretrained)
        return path.resolve()
    if (path / "state.json").is_file():
        return path.resolve()
    if (path / "checkpoints").is_dir() or (path / "config.json").is_file():
        try:
            return select_checkpoint(path).resolve()
        except CheckpointError as exc:
            raise CheckpointError(f"train.init_from={init_from}: {exc}") from None
    if not path.exists():
        raise FileNotFoundError(f"train.init_from={init_from} does not exist (give a run directory or a checkpoint)")
    raise ValueError(
        f"train.init_from={init_from} is neither a run directory (with checkpoints/) nor a checkpoint "
        "directory (with state.json)"
    )


def adapter_owned_keys(model: nn.Module) -> set[str]:
    """State-dict keys of ``model`` that its adapters own (not in a base checkpoint)."""
    own = {id(p) for p in adapter_parameters(model)}
    owned_modules = []
    for path, module in model.named_modules():
        params = list(module.parameters())
        if path and params and all(id(p) in own for p in params):
            owned_modules.append(path + ".")
    # Parameters a module adds to a base model (e.g. 002's new class rows) are new too.
    own |= {id(p) for m in model.modules() for n in getattr(m, "new_parameters", ()) for p in [getattr(m, n)]}
    keys = {name for name, p in model.named_parameters() if id(p) in own}
    keys.update(k for k in model.state_dict() if k.startswith(tuple(owned_modules)))
    return keys


def base_key_map(model: nn.Module) -> dict[str, str]:
    """``{model key: base checkpoint key}`` for every tensor of ``model`` that comes from the base."""
    owned = adapter_owned_keys(model)
    return {k: ".".join(p for p in k.split(".") if p != "base_layer") for k in model.state_dict() if k not in owned}


def key_listing(keys: list[str], limit: int = 6) -> str:
    """Up to ``limit`` of ``keys``, comma-separated, and how many more (for one-line errors)."""
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_fit(ckpt: Path, sources: dict[str, Path], wanted: dict[str, str], model: nn.Module) -> None:
    """Raise ``ValueError`` naming the keys unless the base's keys and shapes match the model's exactly."""
    missing = sorted(set(wanted) - set(sources))
    unexpected = sorted(set(sources) - set(wanted))
    problems = []
    if missing:
        problems.append(f"missing from the base (the model needs them): {key_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected in the base (the model has no place for them): {key_listing(unexpected)}")
    if not problems:
        target = model.state_dict()
        shapes = tensor_shapes(sources)
        bad = [
            f"{b} {shapes[b]} -> {k} {tuple(target[k].shape)}"
            for b, k in sorted(wanted.items())
            if shapes[b] != tuple(target[k].shape)
        ]
        if bad:
            problems.append(f"shapes differ: {key_listing(bad, 3)}")
    if problems:
        raise ValueError(
            f"train.init_from: the checkpoint {ckpt} does not fit the model of this config; "
            + "; ".join(problems)
            + ". init_from takes a run trained without adapters on the same model.* settings"
        )


@torch.no_grad()
def load_base(
    model: nn.Module, init_from: str | Path, weights: str = "ema", expect: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Copy the base checkpoint ``init_from`` into ``model``; returns the base record a run stores.

    The record: ``path`` (the checkpoint directory, absolute), ``weights``, ``step``,
    ``fingerprint`` and ``keys`` (``{model key: base key}``). ``expect`` (a stored record) makes a
    different fingerprint an error: the run was trained on another base. A checkpoint a reader of
    :data:`BASE_READERS` takes is read by it (e.g. 002's multi-task adapter run filling
    ``model.affiner.frozen_tasks``); any other adapter run is an error.
    """
    ckpt = resolve_base_checkpoint(init_from)
    if is_pretrained_folder(ckpt):
        return _load_pretrained(model, ckpt, weights, expect)
    sources, state = weight_sources(ckpt, weights)
    for reader in BASE_READERS.values():
        record = reader(model, ckpt, sources, state, expect)
        if record is not None:
            return record
    if state.get("base", {}).get("keys"):
        raise ValueError(
            f"train.init_from: {ckpt} is itself an adapter run (it stores its trainable tensors only, on "
            f"base {state['base']['path']}); adapt a run trained without adapters, or add tasks to it "
            "with model.affiner.frozen_tasks (the number of tasks it holds)"
        )
    keymap = base_key_map(model)
    fingerprint = _stream_into(model, ckpt, sources, keymap, expect)
    return {
        "path": str(ckpt),
        "weights": weights,
        "step": int(state["step"]),
        "fingerprint": fingerprint,
        "keys": keymap,
    }


def _stream_into(
    model: nn.Module, ckpt: Path, sources: dict[str, Path], keymap: dict[str, str], expect: dict[str, Any] | None
) -> str:
    """Copy the base tensors ``sources`` into ``model`` by ``keymap`` ({model key: base key}) after checking
    that they fit; their fingerprint, which must be ``expect``'s when a stored record is given."""
    wanted = {b: k for k, b in keymap.items()}
    _check_fit(ckpt, sources, wanted, model)
    target = model.state_dict()
    fp = Fingerprint()
    for key, tensor in stream_weights(sources):
        fp.update(key, tensor)
        target[wanted[key]].copy_(tensor)
    if expect is not None and fp.hexdigest() != expect["fingerprint"]:
        raise base_missing(expect | {"path": str(ckpt)}, f"now holds other weights (fingerprint {fp.hexdigest()[:12]})")
    return fp.hexdigest()


def _load_pretrained(model: nn.Module, folder: Path, weights: str, expect: dict[str, Any] | None) -> dict[str, Any]:
    """Load the denoiser of a diffusers folder into ``model`` (its ``net.model.``); the base record.

    Tensors of ``model`` outside the diffusers model (a ``UNet2DConditionModel``'s learned context)
    are not in the folder: they keep their initialisation and every checkpoint stores them.
    """
    keymap = {
        k: b.removeprefix(PRETRAINED_KEY_PREFIX)
        for k, b in base_key_map(model).items()
        if b.startswith(PRETRAINED_KEY_PREFIX)
    }
    fingerprint = _stream_into(model, folder, pretrained_weights(folder), keymap, expect)
    return {
        "path": str(folder),
        "format": "diffusers",
        "weights": weights,
        "step": 0,
        "fingerprint": fingerprint,
        "keys": keymap,
    }


def describe_base(record: dict[str, Any]) -> str:
    """What a base record names, for the log: a checkpoint and its step, or a diffusers folder."""
    if record.get("format") == "diffusers":
        return f"the diffusers folder {record['path']} (fingerprint {record['fingerprint'][:12]})"
    return f"{record['path']} (step {record['step']}, {record['weights']} weights)"


def start_from_base(model: nn.Module, init_from: str | Path, weights: str = "ema") -> dict[str, Any]:
    """:func:`load_base` into a freshly built ``model``, then every :data:`BASE_LOADED` hook; the base record."""
    record = load_base(model, init_from, weights)
    for hook in BASE_LOADED.values():
        hook(model)
    return record


def stored_state(model: nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` a checkpoint stores (``keys``); refuses while an adapter is merged.

    A merged layer's base weight holds ``W + delta``: stored, it would silently become the base of
    every later load. Merging is a sampling tool whose context manager always unmerges.
    """
    merged = [path for path, layer in adapter_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(
            f"adapters of {merged[0]} (and {len(merged) - 1} more layers) are merged into the base weights; "
            "unmerge them before saving: a merged weight must never reach a checkpoint"
        )
    state = model.state_dict()
    return {k: state[k] for k in keys}
