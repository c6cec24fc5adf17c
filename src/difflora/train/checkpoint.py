"""Checkpoints: safetensors (model, EMA, optimizer, RNG states) plus JSON, written atomically.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_0001000/``::

    model.safetensors   ema.safetensors   optim.safetensors   rng.safetensors
    state.json          # step, config, optimizer hyper-parameters, sha256 of every file above

The directory is first written as ``.tmp-step_...`` and renamed when complete, and ``state.json``
records each file's size and hash, so a checkpoint cut short (a crash, a full disk, a truncated
copy) is detected on load and never silently used. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "find_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "load_weights",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "save_checkpoint",
]

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FILES = ("model", "ema", "optim", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt. The message says which and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; a clone per tensor is cheap next to the disk write.
    return {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able hyper-parameters."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    optim_tensors, optim_meta = optimizer_to_tensors(optimizer)
    parts = {"model": model, "ema": ema, "optim": optim_tensors, "rng": rng}
    files = {}
    for name, tensors in parts.items():
        path = tmp / f"{name}.safetensors"
        save_file(_contiguous(tensors), str(path))
        files[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    state = {"format": FORMAT_VERSION, "step": step, "files": files, "optimizer": optim_meta, **meta}
    state_tmp = tmp / "state.json.tmp"
    state_tmp.write_text(json.dumps(state, indent=1))
    os.replace(state_tmp, tmp / "state.json")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in find_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoint directories of a run, oldest first (temp directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist (pass the --out directory of `difflora train`)")
    found = find_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"no checkpoint in {run_dir / 'checkpoints'}; train first (`difflora train CONFIG --out {run_dir}`) "
            "or wait for the first checkpoint (train.ckpt_every)"
        )
    return found[-1]


def _read_state(ckpt: Path) -> dict[str, Any]:
    state_path = ckpt / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: state.json is missing (the write was cut short)")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: state.json is not valid JSON ({exc})") from None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt} has format {state.get('format')}, this difflora reads {FORMAT_VERSION}"
        )
    return state


def _verified_load(ckpt: Path, name: str, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = ckpt / f"{name}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {path.name} is missing")
    size = path.stat().st_size
    if size != record["bytes"] or _sha256(path) != record["sha256"]:
        raise CheckpointError(
            f"checkpoint {ckpt} is cut short or corrupt: {path.name} has {size} bytes, expected {record['bytes']} "
            "with a matching sha256; use an earlier checkpoint or retrain"
        )
    return load_file(str(path))


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    state: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optim: dict[str, Any]
    rng: dict[str, torch.Tensor]


def load_checkpoint(ckpt: str | Path) -> LoadedCheckpoint:
    """Load and verify every file of one checkpoint directory."""
    ckpt = Path(ckpt)
    state = _read_state(ckpt)
    loaded = {name: _verified_load(ckpt, name, state["files"][name]) for name in _FILES}
    optim = optimizer_from_tensors(loaded["optim"], state["optimizer"])
    return LoadedCheckpoint(ckpt, int(state["step"]), state, loaded["model"], loaded["ema"], optim, loaded["rng"])


def load_weights(ckpt: str | Path, which: str = "ema") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Only the model or EMA weights of a checkpoint (for sampling), verified, and its state.json."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    ckpt = Path(ckpt)
    state = _read_state(ckpt)
    return _verified_load(ckpt, which, state["files"][which]), state
