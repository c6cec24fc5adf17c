"""A keyed, sharded, resumable store of tensors on disk: what the latent and prompt caches are made of.

A cache is a directory of safetensors shards (``shard_00000.safetensors``, ...; rows
``[k * shard_size, (k + 1) * shard_size)`` of every named tensor) and a ``manifest.json`` written
last. The manifest holds the cache's *key* (a JSON record of everything the contents depend on),
the key's sha256, the shapes and dtype of the tensors and each shard's size and sha256.

- **Atomic.** Every file is written to a temporary name and renamed (``difflora.files.atomic``), so
  a shard or manifest on disk is complete. A cache without a manifest is an unfinished build.
- **Resumable.** Each shard carries the key's hash and its row range in its safetensors metadata;
  a build that finds no manifest keeps the leading shards that match its plan and computes the
  rest, so an interrupted build continues from the last complete shard.
- **Never stale.** A directory whose manifest or shards carry another key is never read as this
  cache: a build into it, or a read expecting another key, is refused in one line that names the
  fields that differ. Under the default root a cache's directory is named by its key's hash, so a
  change of VAE, data or resolution is a new directory and the old cache is left as it was.
- **Checked on read.** Reading verifies each shard's size and sha256 against the manifest and the
  shards' row counts, shapes and dtype against what the manifest says, and refuses NaN or inf.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_tensor_bytes

from difflora.errors import DiffloraError
from difflora.files.atomic import write_bytes
from difflora.files.cachedir import cache_root
from difflora.files.jsonfile import read_json_file
from difflora.files.tensorfile import check_finite, save_tensors

__all__ = [
    "FORMAT",
    "MANIFEST",
    "STORAGE_DTYPES",
    "CacheError",
    "StorePlan",
    "build_store",
    "key_hash",
    "read_store",
]

FORMAT = "difflora-cache/1"
MANIFEST = "manifest.json"
# The dtypes a cache may store its tensors in (float16 halves a cache's disk and memory).
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


class CacheError(DiffloraError, ValueError):
    """A cache directory that cannot be used as asked: another key, a damaged shard or manifest."""


def key_hash(key: dict[str, Any]) -> str:
    """sha256 of the key's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class StorePlan:
    """What a build writes: ``rows`` rows in shards of ``shard_size``, under ``key``.

    ``kind`` ("latents", "prompts") names the cache in messages and in the manifest."""

    kind: str
    key: dict[str, Any]
    rows: int
    shard_size: int

    @property
    def hash(self) -> str:
        return key_hash(self.key)

    def shards(self) -> list[tuple[int, int]]:
        """(start row, row count) of every shard, in order."""
        return [(s, min(self.shard_size, self.rows - s)) for s in range(0, self.rows, self.shard_size)]

    def directory(self, root: str | Path | None) -> Path:
        """Where this cache lives under ``root`` (default ``$DIFFLORA_CACHE/latents``, the one
        folder of both kinds of cache): ``<kind>-<the key's hash>``."""
        base = Path(root) if root is not None else cache_root() / "latents"
        return base / f"{self.kind}-{self.hash[:16]}"


_SHARD = re.compile(r"shard_\d{5}\.safetensors")


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    """'vae: 1a2b3c4d5e6f there, 9f8e7d6c5b4a here; resolution: ...' over the keys that differ."""

    def short(value: Any) -> str:
        text = json.dumps(value, sort_keys=True)
        return text[:13].strip('"') if isinstance(value, str) and len(value) >= 32 else text[:60]

    names = sorted(set(found) | set(wanted))
    diff = [
        f"{n}: {short(found.get(n))} there, {short(wanted.get(n))} here" for n in names if found.get(n) != wanted.get(n)
    ]
    return "; ".join(diff) or "its key hash differs"


def _foreign(directory: Path, plan: StorePlan, found: dict[str, Any] | None) -> CacheError:
    what = f"made for another key ({_differences(found, plan.key)})" if found is not None else "of another cache"
    return CacheError(
        f"{plan.kind} cache {directory} holds shards {what}; it is never reused for other inputs: "
        "delete it or point at another cache path"
    )


def _read_manifest(directory: Path, kind: str) -> dict[str, Any]:
    fix = f"delete {directory} to rebuild the {kind} cache"
    manifest = read_json_file(directory / MANIFEST, fix=fix, error=CacheError, expect=dict)
    if manifest.get("format") != FORMAT or manifest.get("kind") != kind:
        found = f"{manifest.get('format')!r} / {manifest.get('kind')!r}"
        raise CacheError(f"{directory / MANIFEST} is not a {FORMAT} {kind} cache manifest (it says {found}); {fix}")
    if not isinstance(manifest.get("key"), dict) or key_hash(manifest["key"]) != manifest.get("key_hash"):
        raise CacheError(f"{directory / MANIFEST}: its key does not match its key_hash (edited by hand?); {fix}")
    return manifest


def _shard_matches(path: Path, plan: StorePlan, start: int, count: int) -> bool:
    """Whether ``path`` is a complete shard of this plan with rows [start, start + count); a shard of
    another key is refused (:func:`_foreign`), an unreadable or differently cut one is not kept."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return False
    if meta.get("key_hash") != plan.hash:
        raise _foreign(path.parent, plan, None)
    return meta.get("start") == str(start) and meta.get("count") == str(count)


def _file_record(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _check_cache_directory(directory: Path, kind: str) -> None:
    """Refuse to build into a file or into a directory of other files (a user's image folder)."""
    if directory.exists() and not directory.is_dir():
        raise CacheError(f"{directory} is a file, not a {kind} cache; point the cache at a new or empty directory")
    others = sorted(
        p.name
        for p in (directory.iterdir() if directory.is_dir() else ())
        if p.name != MANIFEST and not p.name.startswith(".") and not _SHARD.fullmatch(p.name)
    )
    if others:
        raise CacheError(
            f"{directory} is not a {kind} cache (it holds {others[0]}); point the cache at a new or empty directory"
        )


def build_store(
    directory: Path,
    plan: StorePlan,
    compute: Callable[[int, int], dict[str, torch.Tensor]],
    info: Callable[[], dict[str, Any]] = dict,
    log: Callable[[str], None] = lambda s: None,
) -> bool:
    """Make ``directory`` hold the cache ``plan`` describes; returns whether anything was computed.

    A complete cache of the same key is kept as it is (False). Otherwise the leading shards that
    match the plan are kept and ``compute(start, count)`` (named tensors, ``count`` rows each,
    every shard the same names and trailing shapes) fills the rest; the manifest is written last,
    with ``info()`` (what a reader needs beside the tensors, decided by the key) merged in.
    A directory holding a manifest or shards of another key raises :class:`CacheError` before
    anything is written, and so does one holding other files than a cache's."""
    _check_cache_directory(directory, plan.kind)
    if (directory / MANIFEST).is_file():
        manifest = _read_manifest(directory, plan.kind)
        if manifest["key_hash"] != plan.hash:
            raise _foreign(directory, plan, manifest["key"])
        return False
    shards = plan.shards()
    done = 0
    while done < len(shards) and (directory / _shard_name(done)).is_file():
        if not _shard_matches(directory / _shard_name(done), plan, *shards[done]):
            break
        done += 1
    # Refuse a foreign shard further on too, before the first write.
    for index in range(done, len(shards)):
        if (directory / _shard_name(index)).is_file():
            _shard_matches(directory / _shard_name(index), plan, *shards[index])
    if done:
        log(f"{plan.kind} cache {directory}: resuming after {done} of {len(shards)} complete shards")
    shapes: dict[str, list[int]] = {}
    dtype = ""
    for index, (start, count) in enumerate(shards):
        path = directory / _shard_name(index)
        if index >= done:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in compute(start, count).items()}
            meta = {"key_hash": plan.hash, "start": str(start), "count": str(count)}
            directory.mkdir(parents=True, exist_ok=True)  # only once there is something to write
            save_tensors(tensors, path, metadata=meta)
            log(f"{plan.kind} cache: shard {index + 1}/{len(shards)} written")
        if not shapes:  # the first shard (kept or new) tells the shapes every shard must have
            with safe_open(str(path), framework="pt") as f:
                first = {k: f.get_slice(k)[0:1] for k in f.keys()}  # one row tells shape and dtype
                shapes = {k: list(v.shape[1:]) for k, v in first.items()}
                dtype = str(next(iter(first.values())).dtype).removeprefix("torch.")
    files = [_file_record(directory / _shard_name(i)) for i in range(len(shards))]
    manifest = {
        "format": FORMAT,
        "kind": plan.kind,
        "key": plan.key,
        "key_hash": plan.hash,
        "rows": plan.rows,
        "shapes": shapes,
        "dtype": dtype,
        "shards": [{"file": _shard_name(i), "start": s, "count": c} | files[i] for i, (s, c) in enumerate(shards)],
        **info(),
    }
    write_bytes(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return True


def _check_shards(directory: Path, manifest: dict[str, Any], fix: str) -> None:
    """The manifest's rows are its shards' row ranges, in order, without gaps; shapes are lists of ints."""
    where = f"{directory / MANIFEST}"

    def ints(values: Any) -> bool:
        return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)

    shards, shapes = manifest.get("shards"), manifest.get("shapes")
    ranges = (
        [[e.get("start"), e.get("count")] for e in shards if isinstance(e, dict)] if isinstance(shards, list) else []
    )
    if not isinstance(shapes, dict) or not all(ints(v) for v in shapes.values()) or not shapes:
        raise CacheError(f"{where}: 'shapes' is not a non-empty map of tensor names to lists of sizes; {fix}")
    if not isinstance(shards, list) or len(ranges) != len(shards) or not all(ints(r) for r in ranges):
        raise CacheError(f"{where}: 'shards' is not a list of shard records with integer start and count; {fix}")
    ends = [s + c for s, c in ranges]
    rows = manifest.get("rows")
    if [s for s, _ in ranges] != [0, *ends[:-1]] or (ends[-1] if ends else 0) != rows:
        raise CacheError(f"{where}: its shards do not cover rows 0..{rows} in order; {fix}")


def _read_shard(directory: Path, entry: dict[str, Any], manifest: dict[str, Any], fix: str) -> dict[str, torch.Tensor]:
    """One shard's tensors, checked against the manifest's record of it (bytes, sha256, rows, shapes, dtype)."""
    path = directory / str(entry.get("file", ""))
    if not path.is_file() or path.parent != directory:
        raise CacheError(f"{path} is missing (listed in {MANIFEST}); {fix}")
    data = path.read_bytes()
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise CacheError(f"{path} is damaged (its size or sha256 differs from {MANIFEST}'s record); {fix}")
    tensors = load_tensor_bytes(data)
    shapes = manifest["shapes"]
    for name, tensor in tensors.items():
        want = [int(entry["count"]), *shapes.get(name, [])]
        if name not in shapes or list(tensor.shape) != want or str(tensor.dtype) != f"torch.{manifest['dtype']}":
            raise CacheError(
                f"{path}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, "
                f"{MANIFEST} says {manifest['dtype']} {want}; {fix}"
            )
    if set(tensors) != set(shapes):
        raise CacheError(f"{path} holds tensors {sorted(tensors)}, {MANIFEST} says {sorted(shapes)}; {fix}")
    check_finite(tensors, str(path), fix, CacheError)
    return tensors


def read_store(directory: str | Path, kind: str, expect: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """(manifest, name -> tensor of all rows) of the ``kind`` cache in ``directory``.

    ``expect`` (a key) makes a cache of another key an error naming the fields that differ. Every
    shard is checked (see the module docstring); any problem is one :class:`CacheError` line. Peak
    memory is the cache's tensors plus one shard."""
    directory = Path(directory)
    fix = f"delete {directory} to rebuild the {kind} cache"
    if not (directory / MANIFEST).is_file():
        unfinished = directory.is_dir() and any(directory.glob("shard_*.safetensors"))
        state = "is an unfinished build (no manifest yet)" if unfinished else f"holds no {MANIFEST}"
        raise CacheError(f"{kind} cache {directory} {state}; build it first (or resume the build)")
    manifest = _read_manifest(directory, kind)
    if expect is not None and manifest["key_hash"] != key_hash(expect):
        raise CacheError(
            f"{kind} cache {directory} was made for another key ({_differences(manifest['key'], expect)}); "
            "it is never reused for other inputs: delete it or point at another cache path"
        )
    _check_shards(directory, manifest, fix)
    dtype = getattr(torch, str(manifest.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise CacheError(f"{directory / MANIFEST}: unknown dtype {manifest.get('dtype')!r}; {fix}")
    out = {name: torch.empty(manifest["rows"], *shape, dtype=dtype) for name, shape in manifest["shapes"].items()}
    for entry in manifest["shards"]:
        tensors = _read_shard(directory, entry, manifest, fix)
        for name, tensor in tensors.items():
            out[name][entry["start"] : entry["start"] + entry["count"]] = tensor
    return manifest, out
