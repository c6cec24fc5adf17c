"""The index of an image folder: which files are its samples, their labels and captions; built once, cached.

Layouts (``D`` is the folder, or each of its ``train/`` and ``test/`` subfolders when ``train/`` exists):

- class subfolders ``D/<class>/<image>``: labels are the sorted subfolder names (of both splits);
- a flat folder ``D/<image>``: one class, ``"unlabelled"``;
- either with ``D/metadata.jsonl`` (the image-folder convention of diffusers' training scripts): one
  JSON object per line, ``{"file_name": "a.png", "text": "a caption"}``, ``file_name`` relative to
  ``D`` (``name`` or ``<class>/name``). Its lines list exactly ``D``'s images; ``"text"`` gives each
  image its caption, on every line or on none.

Images are ``*.png|jpg|jpeg|bmp|webp`` (any case) directly in ``D`` or one subfolder down; hidden
names (``.x``) are skipped. Samples are ordered by label, then file name. Without ``train/``, every
image is split deterministically, stratified, 90 % train / 10 % test.

**The cache.** Building an index lists and stats every file (each time: the listing is the key) and
opens every new or changed file with Pillow to read its header (format and size), which a file that
is not an image fails, naming it. What the headers said is cached per file, keyed by its path, size
and modification time, in ``<index_cache>/<hash of the folder's path>.json``: a file added, removed
or rewritten is noticed by the listing and checked again, so the cache is never used stale. A file
whose header reads but whose pixels do not decode (truncated data) fails when it is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difflora.config.schema import ConfigError, DataConfig
from difflora.data.source import DatasetFormatError, not_found
from difflora.data.split import stratified_split
from difflora.files.atomic import write_bytes

__all__ = [
    "IMAGE_EXTENSIONS",
    "TEST_FRACTION",
    "UNLABELLED",
    "FolderSplit",
    "index_cache_dir",
    "index_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TEST_FRACTION = 0.1
UNLABELLED = "unlabelled"
METADATA = "metadata.jsonl"
_VERSION = 1
_LAYOUT = (
    "DIR/<class_name>/*.png|jpg|jpeg|bmp|webp, DIR/*.png|... with DIR/metadata.jsonl, or DIR/train/... and DIR/test/..."
)
_FIX = f"Pass --set data.root=DIR with the layout {_LAYOUT}."
_SHOWN = 3  # files named in an error about many


@dataclass(frozen=True)
class FolderSplit:
    """One split of an image folder: ``files`` (absolute paths under the split directory ``root``, in
    sample order; strings, cheaper than 100,000 ``Path`` objects), ``labels`` (int64 [N]),
    ``class_names``, ``captions`` (one per sample, or None without ``metadata.jsonl`` texts)."""

    root: Path
    files: list[str]
    labels: np.ndarray
    class_names: list[str]
    captions: list[str] | None

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """sha256 of what defines the samples and their order (paths, labels, captions), not pixels."""
        h = hashlib.sha256()
        start = len(os.path.join(self.root, ""))
        captions = self.captions if self.captions is not None else [None] * len(self)
        for path, label, caption in zip(self.files, self.labels.tolist(), captions, strict=True):
            h.update(json.dumps([path[start:], label, caption]).encode())
        return h.hexdigest()

    def head(self, n: int) -> FolderSplit:
        """The first ``n`` samples (``data.limit``)."""
        caps = self.captions[:n] if self.captions is not None else None
        return FolderSplit(self.root, self.files[:n], self.labels[:n], self.class_names, caps)


def index_cache_dir(cfg: DataConfig) -> Path:
    """``data.index_cache``, else ``$DIFFLORA_CACHE/image-folders``, else ``~/.cache/difflora/image-folders``."""
    if cfg.index_cache is not None:
        return Path(cfg.index_cache).expanduser()
    root = os.environ.get("DIFFLORA_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "difflora") / "image-folders"


def _is_image(entry: os.DirEntry) -> bool:
    return not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file()


def _listing(side: Path) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """The images of one split directory, ``relpath -> (size, mtime_ns)`` (relative to ``side``),
    and its class subfolders (every non-hidden subdirectory)."""
    files: dict[str, tuple[int, int]] = {}
    classes = []
    with os.scandir(side) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                classes.append(entry.name)
                with os.scandir(entry.path) as inner:
                    for e in inner:
                        if _is_image(e):
                            st = e.stat()
                            files[f"{entry.name}/{e.name}"] = (st.st_size, st.st_mtime_ns)
            elif _is_image(entry):
                st = entry.stat()
                files[entry.name] = (st.st_size, st.st_mtime_ns)
    return files, sorted(classes)


def _metadata_lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line number, file_name, text or None) of each non-blank line of a ``metadata.jsonl``."""
    fix = 'each line must be a JSON object like {"file_name": "a.png", "text": "a caption"}'
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: not UTF-8 text (byte offset {exc.start}); {fix}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path} line {number}: not valid JSON ({exc}); {fix}") from None
        name = row.get("file_name") if isinstance(row, dict) else None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(name, str) or not (text is None or isinstance(text, str)):
            raise DatasetFormatError(f"{path} line {number}: no string file_name (and text, if given); {fix}")
        yield number, name, text


def _few(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _read_metadata(side: Path, files: dict[str, tuple[int, int]]) -> dict[str, str | None]:
    """``file_name -> text`` of ``side/metadata.jsonl``, checked against the images ``side`` holds."""
    path = side / METADATA
    captions: dict[str, str | None] = {}
    for number, name, text in _metadata_lines(path):
        if name in captions:
            raise DatasetFormatError(f"{path} line {number}: {name} is listed twice; list each image once")
        if name not in files:
            raise DatasetFormatError(
                f"{path} line {number}: {name} is not an image of {side} (a *.png|jpg|jpeg|bmp|webp file in it "
                f"or one subfolder down); fix the file_name or remove the line"
            )
        captions[name] = text
    unlisted = sorted(set(files) - set(captions))
    if unlisted:
        raise DatasetFormatError(
            f"captions missing for {len(unlisted)} of {len(files)} images of {side}: {_few(unlisted)} are not in "
            f"{METADATA}; add a line for each"
        )
    missing = sorted(n for n, t in captions.items() if t is None)
    if missing and len(missing) < len(captions):
        raise DatasetFormatError(
            f"captions missing for {len(missing)} of {len(captions)} images of {side}: {_few(missing)} have no "
            f'"text" in {METADATA}; give every line a "text" (or none)'
        )
    return captions


def _locate(cfg: DataConfig, split: str) -> tuple[Path, list[Path], Path]:
    """The folder, the split directories whose classes count (both, or the folder itself), and the one to read."""
    if cfg.image_size is None:
        raise ConfigError("data.image_size: required for data.name=image-folder (image folders have no native size)")
    if cfg.root is None:
        raise not_found("image-folder", [], "image-folder has no default location. " + _FIX)
    root = Path(cfg.root).absolute()
    if not root.is_dir():
        raise not_found("image-folder", [root], _FIX)
    if not (root / "train").is_dir():
        return root, [root], root
    side = root / split
    if not side.is_dir():
        raise not_found("image-folder", [side], f"{root / 'train'} exists, so {side} must too. " + _FIX)
    return root, [d for d in (root / "train", root / "test") if d.is_dir()], side


def _class_names(listings: dict[Path, tuple[dict[str, tuple[int, int]], list[str]]]) -> list[str]:
    """The sorted subfolders of every split directory, or ``[UNLABELLED]`` for flat folders."""
    classes = sorted(set().union(*(c for _, c in listings.values())))
    for side, (files, _) in listings.items():
        top = sorted(n for n in files if "/" not in n)
        if top and classes:
            raise DatasetFormatError(
                f"{side} holds images at its top level ({_few(top)}) next to class subfolders "
                f"({_few(classes)}); move them into class subfolders, or every image to the top level (unlabelled)"
            )
    return classes or [UNLABELLED]


def _header(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, read by Pillow without decoding the pixels."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def _cached_headers(path: Path, root: Path) -> dict[str, list[int]]:
    """The cache file's entries, or none when it is missing, damaged or of another folder or version."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(cache, dict) and cache.get("version") == _VERSION and cache.get("root") == str(root)
        return dict(cache["files"]) if ok else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_cache(path: Path, root: Path, entries: dict[str, list[int]]) -> None:
    """Atomically (a unique temp file renamed over ``path``: processes may race); a cache that cannot
    be written only costs the next run the header checks again."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, json.dumps({"version": _VERSION, "root": str(root), "files": entries}), shared=True)


def _check_headers(root: Path, listing: dict[str, tuple[int, int]], cache_dir: Path) -> None:
    """Open every file of ``listing`` (``relpath -> (size, mtime_ns)`` under ``root``) whose header
    the cache does not hold at that size and time; one that is not an image is an error naming it."""
    path = cache_dir / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json"
    cached = _cached_headers(path, root)
    entries: dict[str, list[int]] = {}
    bad: list[str] = []
    for rel, (size, mtime) in listing.items():
        hit = cached.get(rel)
        if isinstance(hit, list) and hit[:2] == [size, mtime]:
            entries[rel] = hit
            continue
        try:
            entries[rel] = [size, mtime, *_header(root / rel)]
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a file that is not an image
            bad.append(f"{root / rel} ({type(exc).__name__}: {exc})")
    if bad:
        raise DatasetFormatError(f"{len(bad)} file(s) cannot be read as images: {_few(bad)}; remove or replace them")
    if entries != cached:
        _write_cache(path, root, entries)


def index_folder(cfg: DataConfig, split: str) -> FolderSplit:
    """The index of split ``split`` of the image folder ``cfg.root`` (see the module docstring);
    ``data.limit`` is not applied here. Every file's header is checked, or known from the cache."""
    root, sides, side = _locate(cfg, split)
    listings = {s: _listing(s) for s in sides}
    class_names = _class_names(listings)
    label = {name: i for i, name in enumerate(class_names)}
    class_of = lambda n: label[n.partition("/")[0]] if "/" in n else 0  # noqa: E731 - "name" or "class/name"
    files = listings[side][0]
    order = sorted(files, key=lambda n: (class_of(n), n.rpartition("/")[2]))
    labels = np.asarray([class_of(n) for n in order], dtype=np.int64)
    texts = _read_metadata(side, files) if (side / METADATA).is_file() else {}
    captions = [texts[n] for n in order] if any(t is not None for t in texts.values()) else None
    prefix = {s: os.path.join(os.path.relpath(s, root), "") if s != root else "" for s in listings}
    every = {prefix[s] + n: v for s, (f, _) in listings.items() for n, v in f.items()}
    if order:
        _check_headers(root, every, index_cache_dir(cfg))
    pick = np.arange(len(order))
    if len(sides) == 1:
        train, test = stratified_split(labels, TEST_FRACTION)
        pick = train if split == "train" else test
    if not len(pick):
        tried = [side / c for c in listings[side][1]] or [side]
        exts = "|".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise not_found(
            "image-folder",
            tried,
            f"No *.{exts} images for split '{split}' in these folders. {_FIX}",
        )
    return FolderSplit(
        side,
        [os.path.join(side, order[i]) for i in pick],
        labels[pick],
        class_names,
        [captions[i] for i in pick] if captions is not None else None,
    )
