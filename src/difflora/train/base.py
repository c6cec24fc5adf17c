"""Adapt a trained model: load a checkpoint trained without adapters into an adapted model.

``train.init_from: RUN_DIR | CHECKPOINT_DIR`` names the base. Its keys map into the adapted
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
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflora.adapters import adapter_layers, adapter_parameters
from difflora.train.checkpoint import (
    CheckpointError,
    Fingerprint,
    base_missing,
    select_checkpoint,
    stream_weights,
    tensor_shapes,
    weight_sources,
)

__all__ = [
    "PRETRAINED_PREFIX",
    "adapter_owned_keys",
    "base_key_map",
    "bases_cache_dir",
    "load_base",
    "pretrained_run_dir",
    "resolve_base_checkpoint",
    "stored_state",
]

# ``train.init_from: pretrained:NAME``: the shared base ``difflora pretrain NAME`` trained into the cache.
PRETRAINED_PREFIX = "pretrained:"


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
        steps = json.loads((run / "config.json").read_text())["train"]["steps"]
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
    or (``pretrained:NAME``) the final checkpoint of the shared base ``difflora pretrain NAME`` trained."""
    if str(init_from).startswith(PRETRAINED_PREFIX):
        return _pretrained_checkpoint(str(init_from))
    path = Path(init_from)
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
    keys = {name for name, p in model.named_parameters() if id(p) in own}
    keys.update(k for k in model.state_dict() if k.startswith(tuple(owned_modules)))
    return keys


def base_key_map(model: nn.Module) -> dict[str, str]:
    """``{model key: base checkpoint key}`` for every tensor of ``model`` that comes from the base."""
    owned = adapter_owned_keys(model)
    return {k: ".".join(p for p in k.split(".") if p != "base_layer") for k in model.state_dict() if k not in owned}


def _listing(keys: list[str], limit: int = 6) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_fit(ckpt: Path, sources: dict[str, Path], wanted: dict[str, str], model: nn.Module) -> None:
    """Raise ``ValueError`` naming the keys unless the base's keys and shapes match the model's exactly."""
    missing = sorted(set(wanted) - set(sources))
    unexpected = sorted(set(sources) - set(wanted))
    problems = []
    if missing:
        problems.append(f"missing from the base (the model needs them): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected in the base (the model has no place for them): {_listing(unexpected)}")
    if not problems:
        target = model.state_dict()
        shapes = tensor_shapes(sources)
        bad = [
            f"{b} {shapes[b]} -> {k} {tuple(target[k].shape)}"
            for b, k in sorted(wanted.items())
            if shapes[b] != tuple(target[k].shape)
        ]
        if bad:
            problems.append(f"shapes differ: {_listing(bad, 3)}")
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
    different fingerprint an error: the run was trained on another base.
    """
    ckpt = resolve_base_checkpoint(init_from)
    sources, state = weight_sources(ckpt, weights)
    if state.get("base", {}).get("keys"):
        raise ValueError(
            f"train.init_from: {ckpt} is itself an adapter run (it stores its trainable tensors only, on "
            f"base {state['base']['path']}); adapt a run trained without adapters"
        )
    keymap = base_key_map(model)
    wanted = {b: k for k, b in keymap.items()}
    _check_fit(ckpt, sources, wanted, model)
    target = model.state_dict()
    fp = Fingerprint()
    for key, tensor in stream_weights(sources):
        fp.update(key, tensor)
        target[wanted[key]].copy_(tensor)
    record = {
        "path": str(ckpt),
        "weights": weights,
        "step": int(state["step"]),
        "fingerprint": fp.hexdigest(),
        "keys": keymap,
    }
    if expect is not None and record["fingerprint"] != expect["fingerprint"]:
        raise base_missing(expect | {"path": str(ckpt)}, f"now holds other weights (fingerprint {fp.hexdigest()[:12]})")
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
