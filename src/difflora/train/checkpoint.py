"""Checkpoints: safetensors (model, EMA, optimizer, RNG states) plus JSON, written atomically.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step_0001000/``::

    model.safetensors   ema.safetensors   optim.safetensors   rng.safetensors
    state.json          # step, config, optimizer hyper-parameters, sha256 of every file above,
                        # the digest of its own values

The directory is first written as ``.tmp-step_...`` and renamed when complete, and ``state.json``
records each file's size and hash, so a checkpoint cut short (a crash, a full disk, a truncated
copy) is detected on load and never silently used. Nothing is unpickled.

What state.json says is checked against the files before it is trusted (:func:`check_consistent`):
its values against the digest recorded with them (a step, a learning rate or a config edited by
hand), its step against the directory's name, and its file list against the files present. A
mismatch is a :class:`CheckpointMismatch` naming the checkpoint; it is never skipped for an older
checkpoint, so a resume cannot overwrite it. Checkpoints written before the digest existed load,
their values unchecked (:func:`unchecked`).

``model.safetensors`` holds every tensor of the model, except in a run that adapts a base
(``train.init_from``): there it holds the trainable tensors only, and ``state.json["base"]`` records
the base checkpoint's path, its fingerprint (a content hash of its weights) and which model keys
come from which base key. ``ema.safetensors`` holds the EMA of the trainable tensors. The complete
weights of a checkpoint are therefore base (if any), overlaid by ``model``, overlaid by ``ema`` for
the EMA weights: :func:`load_weights` assembles them and checks the base's fingerprint.

Retention keeps the newest ``train.keep_checkpoints`` checkpoints of a run (2 by default), every
one whose step is a multiple of ``train.keep_every``, and every one another run was started from
(recorded in the run's ``dependents.json``, see :mod:`difflora.train.dependents`).

Which checkpoint a command reads is :func:`select_checkpoint`'s choice: a step or a directory the
user names (``--checkpoint``), else the newest one that looks intact, after a warning for every
newer one that does not. Every failure to read one, including third-party errors (a JSON or
safetensors parse error behind matching hashes), is a :class:`CheckpointError` naming the
checkpoint and the way out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from difflora.config.base import ConfigError
from difflora.errors import DiffloraError
from difflora.files.atomic import storage_errors, write_bytes
from difflora.files.jsonfile import read_json_file
from difflora.files.tensorfile import check_finite, save_tensors
from difflora.model.pretrained import PretrainedError, pretrained_weights
from difflora.train.dependents import DependentsError, pinned_checkpoints

__all__ = [
    "CheckpointError",
    "CheckpointMismatch",
    "LoadedCheckpoint",
    "Fingerprint",
    "find_checkpoints",
    "latest_checkpoint",
    "load_base_tensors",
    "load_checkpoint",
    "load_weights",
    "check_consistent",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "save_checkpoint",
    "select_checkpoint",
    "state_digest",
    "stream_weights",
    "tensor_shapes",
    "unchecked",
    "weight_sources",
]

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_FILES = ("model", "ema", "optim", "rng")


class CheckpointError(RuntimeError, DiffloraError):
    """A checkpoint is missing, incomplete or corrupt. The message says which and what to do."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint's state.json disagrees with its files or with itself (edited by hand, renamed,
    files added): never skipped in favour of an older checkpoint, since resuming from one would
    overwrite the newer work."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older, intact one."""


class RetentionWarning(UserWarning):
    """Retention kept an old checkpoint because other runs were started from it."""


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
    optimizer: torch.optim.Optimizer | None,
    rng: dict[str, torch.Tensor],
    meta: dict[str, Any],
    keep: int = 2,
    keep_every: int = 0,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` ones (0: all), every one
    whose step is a multiple of ``keep_every`` (0: none), and every one another run was started
    from (:mod:`difflora.train.dependents`).

    ``optimizer`` None stores no optimizer state (a run that serves but does not train, such as a
    merged one: 002's ``difflora combine-tasks``).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}"
    optim_tensors, optim_meta = optimizer_to_tensors(optimizer) if optimizer is not None else ({}, None)
    parts = {"model": model, "ema": ema, "optim": optim_tensors, "rng": rng}
    needed = sum(t.numel() * t.element_size() for p in parts.values() for t in p.values()) + (1 << 16)
    try:
        # A refused write names the checkpoint and the space all of it needs, and leaves no .tmp-step_ behind.
        with storage_errors(final, needed):
            shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed mid-write
            tmp.mkdir()
            _write_parts(tmp, step, parts, {"optimizer": optim_meta, **meta})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = find_checkpoints(run_dir)[:-keep] if keep > 0 else []
    _retire(run_dir, [c for c in old if not (keep_every and int(_STEP_DIR.match(c.name).group(1)) % keep_every == 0)])
    return final


def _write_parts(tmp: Path, step: int, parts: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
    """The files of checkpoint ``step`` into the directory ``tmp``: the tensors, then state.json."""
    files = {}
    for name, tensors in parts.items():
        path = tmp / f"{name}.safetensors"
        save_tensors(_contiguous(tensors), path)
        files[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    # The tensor counts, kept apart from the hashes, let a reader notice a file that was replaced
    # by one with fewer tensors and its hash recomputed (a checkpoint edited by another program).
    counts = {name: len(tensors) for name, tensors in parts.items()}
    state = {"format": FORMAT_VERSION, "step": step, "files": files, "tensor_counts": counts, **meta}
    state["digest"] = state_digest(state)
    write_bytes(tmp / "state.json", json.dumps(state, indent=1))


def _retire(run_dir: str | Path, old: list[Path]) -> None:
    """Delete the checkpoints ``old`` retention lets go, except those other runs were started from
    (``dependents.json``, see :mod:`difflora.train.dependents`); each one kept is said in a warning."""
    if not old:
        return
    try:
        pins = pinned_checkpoints(run_dir)
    except DependentsError as exc:
        warnings.warn(f"kept every old checkpoint of {run_dir}: {exc}", RetentionWarning, stacklevel=3)
        return
    for ckpt in old:
        if ckpt.name in pins:
            runs = ", ".join(pins[ckpt.name])
            warnings.warn(f"kept {ckpt}: other runs were started from it ({runs})", RetentionWarning, stacklevel=3)
        else:
            shutil.rmtree(ckpt, ignore_errors=True)


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed checkpoint directories of a run, oldest first (temp directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest intact checkpoint of a run (see :func:`select_checkpoint` with ``spec=None``)."""
    return select_checkpoint(run_dir)


def _read_state(ckpt: Path) -> dict[str, Any]:
    state = read_json_file(
        ckpt / "state.json",
        fix=_ADVICE,
        error=CheckpointError,
        expect=dict,
        what=f"checkpoint {ckpt} is corrupt: state.json",
        missing=f"checkpoint {ckpt} is incomplete: state.json is missing (the write was cut short)",
    )
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt} has format {state.get('format')}, this difflora reads {FORMAT_VERSION}"
        )
    return state


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of what state.json records besides the file records (checked against the files by
    size and hash) and the digest itself: the step, config, optimizer hyper-parameters, EMA count,
    base record... A value edited by hand no longer matches it."""
    body = json.loads(json.dumps({k: v for k, v in state.items() if k not in ("files", "digest")}))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def unchecked(state: dict[str, Any]) -> list[str]:
    """What cannot be checked in a checkpoint written before difflora recorded it (empty for new ones)."""
    older = {"digest": "state.json's values (no digest)", "tensor_counts": "tensor counts"}
    return [what for key, what in older.items() if key not in state]


def check_consistent(ckpt: Path, state: dict[str, Any]) -> None:
    """Raise :class:`CheckpointMismatch` unless ``state`` agrees with itself (its digest), with the
    directory's name (``step_N``) and with the files the directory holds (no unlisted file). What an
    older checkpoint did not record is not checked (:func:`unchecked`)."""
    fix = "restore the checkpoint as it was written, or pass --checkpoint STEP (an earlier step)"
    if "digest" in state and state_digest(state) != state["digest"]:
        raise CheckpointMismatch(
            f"checkpoint {ckpt} disagrees with itself: state.json was changed after it was written (its digest "
            f"does not match its values); {fix}"
        )
    named = _STEP_DIR.match(ckpt.name)
    if named and int(named.group(1)) != state.get("step"):
        raise CheckpointMismatch(
            f"checkpoint {ckpt} disagrees with its name: state.json records step {state.get('step')}; {fix}"
        )
    listed = {f"{name}.safetensors" for name in state.get("files", {})} | {"state.json"}
    extra = sorted(p.name for p in ckpt.iterdir() if p.name not in listed)
    if extra or set(state.get("files", {})) != set(_FILES):
        odd = extra or sorted(set(state.get("files", {})) - set(_FILES))
        raise CheckpointMismatch(
            f"checkpoint {ckpt} holds files its state.json does not account for: {', '.join(odd)}; move them out "
            f"of the checkpoint, or {fix}"
        )


def _verified_file(ckpt: Path, name: str, record: dict[str, Any]) -> Path:
    path = ckpt / f"{name}.safetensors"
    if not isinstance(record, dict) or not {"bytes", "sha256"} <= record.keys():
        raise CheckpointError(
            f"checkpoint {ckpt} is corrupt: state.json has no size and hash for {path.name}; {_ADVICE}"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {path.name} is missing")
    size = path.stat().st_size
    if size != record["bytes"] or _sha256(path) != record["sha256"]:
        raise CheckpointError(
            f"checkpoint {ckpt} is cut short or corrupt: {path.name} has {size} bytes, expected {record['bytes']} "
            f"with a matching sha256; {_ADVICE}"
        )
    return path


def _verified_load(ckpt: Path, name: str, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    return _load_tensors(ckpt, _verified_file(ckpt, name, record))


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
    if state.get("combined_from"):
        raise CheckpointError(
            f"checkpoint {ckpt} belongs to a combined run (difflora combine-tasks): it serves its tasks but holds no "
            "training state to resume; to train one more task, start a new run with train.init_from set to this "
            "run and model.affiner.frozen_tasks set to its number of tasks"
        )
    loaded = {name: _verified_load(ckpt, name, _record(ckpt, state, name)) for name in _FILES}
    try:
        optim = optimizer_from_tensors(loaded["optim"], state["optimizer"])
        step = int(state["step"])
    except (KeyError, TypeError, ValueError) as exc:
        # The hashes matched, so this is a state.json edited by hand (or by another program).
        raise CheckpointError(
            f"checkpoint {ckpt} is corrupt: state.json lacks or garbles {exc} (optimizer / step); {_ADVICE}"
        ) from None
    check_consistent(ckpt, state)
    return LoadedCheckpoint(ckpt, step, state, loaded["model"], loaded["ema"], optim, loaded["rng"])


# safetensors dtype names -> torch dtypes (the ones checkpoints hold).
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (without ``__metadata__``) and where its data start.

    Every entry is checked (a known dtype, offsets inside the file that match the shape), so that
    :func:`stream_weights` can trust it: a damaged or forged file is a :class:`CheckpointError`.
    """
    try:
        total = path.stat().st_size
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > total - 8:
                raise ValueError(f"its header claims {size} bytes, the file has {total}")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        data = total - 8 - size
        for key, info in header.items():
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            if not 0 <= begin <= end <= data or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {key!r} has offsets that do not fit its shape or the file")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); {_ADVICE}") from None
    return header, 8 + size


def tensor_shapes(sources: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the tensors ``sources`` point to, read from the file headers only."""
    headers = {path: _header(path)[0] for path in set(sources.values())}
    return {key: tuple(headers[path][key]["shape"]) for key, path in sources.items()}


def weight_sources(ckpt: str | Path, which: str = "ema") -> tuple[dict[str, Path], dict[str, Any]]:
    """``{key: file holding it}`` for the weights a checkpoint stores itself (verified), and its state.json.

    ``which="ema"``: the model file overlaid by the EMA file (the EMA covers the trainable tensors;
    frozen ones are their own average). Keys taken from a base (``state["base"]["keys"]``) are not
    among them: see :func:`load_weights`.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    ckpt = Path(ckpt)
    state = _read_state(ckpt)
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: state.json has no integer 'step'; {_ADVICE}")
    sources: dict[str, Path] = {}
    for name in ("model", "ema") if which == "ema" else ("model",):
        record = _record(ckpt, state, name)
        path = _verified_file(ckpt, name, record)
        keys = _header(path)[0]
        expected = state.get("tensor_counts", {}).get(name, len(keys))  # absent in older checkpoints
        if len(keys) != expected:
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupt: {path.name} holds {len(keys)} tensors, state.json records "
                f"{expected}; {_ADVICE}"
            )
        sources.update(dict.fromkeys(keys, path))
    check_consistent(ckpt, state)
    return sources, state


def stream_weights(sources: dict[str, Path], keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for ``keys`` (default: all, sorted), read one tensor at a time.

    Plain reads, not a memory map: a mapped file's touched pages count as resident memory until it
    is closed, which would hold a second copy of a base while it streams into a model.
    """
    headers = {path: _header(path) for path in set(sources.values())}
    with ExitStack() as stack:
        files = {path: stack.enter_context(open(path, "rb")) for path in headers}
        for key in sorted(sources) if keys is None else keys:
            path = sources[key]
            (header, data_start), f = headers[path], files[path]
            info = header[key]
            begin, end = info["data_offsets"]
            buf = bytearray(end - begin)
            f.seek(data_start + begin)
            f.readinto(buf)
            dtype = _DTYPES[info["dtype"]]
            flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            tensor = flat.reshape(info["shape"])
            check_finite({key: tensor}, str(path), _ADVICE, CheckpointError)
            yield key, tensor


class Fingerprint:
    """SHA-256 over named tensors (name, dtype, shape and bytes, fed in sorted name order): the
    content hash that identifies a base model whatever file it is stored in."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, key: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        self._h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        self._h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def base_missing(record: dict[str, Any], what: str) -> CheckpointError:
    """The error for a run whose base checkpoint cannot be used (missing, corrupt, replaced)."""
    return CheckpointError(
        f"this run adapts the base checkpoint {record['path']} (fingerprint {record['fingerprint'][:12]}), "
        f"which {what}; restore that base checkpoint at that path to load the run"
    )


def load_base_tensors(record: dict[str, Any], keep: bool = True) -> dict[str, torch.Tensor]:
    """Every weight of the base checkpoint a run adapts (``state["base"]``), checked against its fingerprint;
    ``keep=False`` checks only (one tensor at a time in memory) and returns none."""
    if not Path(record["path"]).is_dir():
        raise base_missing(record, "is missing")
    try:
        if record.get("format") == "diffusers":  # a diffusers folder (model.pretrained)
            sources = pretrained_weights(record["path"])
        else:
            sources, _ = weight_sources(record["path"], record["weights"])
    except (CheckpointError, PretrainedError, ConfigError) as exc:
        raise base_missing(record, f"cannot be read: {str(exc).replace(f'; {_ADVICE}', '')}") from None
    fp = Fingerprint()
    tensors = {}
    for key, tensor in stream_weights(sources):
        fp.update(key, tensor)
        if keep:
            tensors[key] = tensor
    if fp.hexdigest() != record["fingerprint"]:
        raise base_missing(record, f"now holds other weights (fingerprint {fp.hexdigest()[:12]})")
    return tensors


def load_weights(ckpt: str | Path, which: str = "ema") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The complete model or EMA weights of a checkpoint (for sampling, eval), verified, and its state.json.

    For a run that adapts a base (``train.init_from``), the base's tensors are read from the base
    checkpoint the run recorded and must match its fingerprint: a missing or changed base is a
    :class:`CheckpointError` that says so. The result loads with ``model.load_state_dict(state)``.
    """
    sources, state = weight_sources(ckpt, which)
    tensors = dict(stream_weights(sources))
    base = state.get("base")
    if base and base["keys"]:
        base_tensors = load_base_tensors(base)
        tensors = {key: base_tensors[b] for key, b in base["keys"].items()} | tensors
    return tensors, state


# What a user can do about a damaged checkpoint; every command that reads one takes --checkpoint.
_ADVICE = "pass --checkpoint STEP (an earlier step of the run) or retrain"


def _record(ckpt: Path, state: dict[str, Any], name: str) -> dict[str, Any]:
    files = state.get("files")
    if not isinstance(files, dict) or name not in files:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: state.json does not list {name}.safetensors; {_ADVICE}")
    return files[name]


def _load_tensors(ckpt: Path, path: Path) -> dict[str, torch.Tensor]:
    # Hashes matched, so a failure here means the file was written broken (or hashes were forged):
    # safetensors' own exception names neither the file nor a fix.
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {ckpt}: {path.name} is not a readable safetensors file ({exc}); {_ADVICE}"
        ) from None
    check_finite(tensors, str(path), _ADVICE, CheckpointError)
    return tensors


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why ``ckpt`` cannot be loaded, found without hashing (a missing or torn state.json, a missing
    file, a size that differs from the record), or None when it looks intact. A bit flip that keeps
    sizes is only found by the hashes on load."""
    ckpt = Path(ckpt)
    try:
        state = _read_state(ckpt)
        for name in _FILES:
            record = _record(ckpt, state, name)
            path = ckpt / f"{name}.safetensors"
            if not path.is_file():
                return f"checkpoint {ckpt} is incomplete: {path.name} is missing"
            if not isinstance(record, dict) or path.stat().st_size != record.get("bytes"):
                recorded = record.get("bytes") if isinstance(record, dict) else None
                return f"checkpoint {ckpt} is cut short: {path.name} has {path.stat().st_size} bytes, state.json records {recorded}"
    except CheckpointError as exc:
        return str(exc).replace(f"; {_ADVICE}", "")
    return None


def select_checkpoint(
    run_dir: str | Path, spec: str | int | Path | None = None, *, warn: Callable[[str], None] | None = None
) -> Path:
    """The checkpoint directory a command should read.

    ``spec`` None: the newest checkpoint that looks intact (:func:`checkpoint_problem`); each newer
    damaged one is reported through ``warn`` (default :func:`warnings.warn`) with its problem. An
    int or a string of digits: step N of ``run_dir`` (``--checkpoint 1000``). Anything else: a
    checkpoint directory, as given or relative to ``run_dir/checkpoints`` (``step_0001000``).
    Raises :class:`CheckpointError` naming the run and the steps it has.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist (pass the --out directory of `difflora train`)")
    found = find_checkpoints(run_dir)
    steps = ", ".join(str(int(_STEP_DIR.match(p.name).group(1))) for p in found) or "none"
    if spec is None:
        if not found:
            raise CheckpointError(
                f"no checkpoint in {run_dir / 'checkpoints'}; train first (`difflora train CONFIG --out {run_dir}`) "
                "or wait for the first checkpoint (train.ckpt_every)"
            )
        say = warn or (lambda msg: warnings.warn(msg, CheckpointWarning, stacklevel=3))
        for ckpt in reversed(found):
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return ckpt
            say(f"skipping a damaged checkpoint: {problem}")
        raise CheckpointError(f"every checkpoint in {run_dir / 'checkpoints'} is damaged (steps {steps}); retrain")
    text = str(spec).strip()
    if text.isdigit():
        ckpt = run_dir / "checkpoints" / f"step_{int(text):07d}"
        if not ckpt.is_dir():
            raise CheckpointError(
                f"--checkpoint {text}: {run_dir} has no checkpoint at step {int(text)}; steps: {steps}"
            )
        return ckpt
    for ckpt in (Path(text), run_dir / "checkpoints" / text):
        if (ckpt / "state.json").is_file() or (ckpt.is_dir() and _STEP_DIR.match(ckpt.name)):
            return ckpt
    raise CheckpointError(
        f"--checkpoint {text}: not a step number nor a checkpoint directory (one holding state.json); "
        f"steps of {run_dir}: {steps}"
    )
