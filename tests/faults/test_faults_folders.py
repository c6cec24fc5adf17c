"""Fault catalogue: image folders (difflora.data.folder_index, difflora.data.stream).

A file that is not an image, a folder with no images, images both at the top level and in class
subfolders, captions missing for some images, a malformed ``metadata.jsonl``, channels other than 1
or 3, and a grayscale folder as a task next to RGB data: each one line, before anything is written
(the index cache included: it is written only for a folder that indexed cleanly).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from faultkit import Fault, both, cases, check_fault, train, write_tmp
from PIL import Image


def png(seed: int, size: tuple[int, int] = (10, 7)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def images(*names: str):
    """Valid PNG files at ``names`` (relative to the case directory)."""
    return both(*(write_tmp(name, png(i)) for i, name in enumerate(names)))


def metadata(rel: str, rows: list[dict] | list[str]):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return write_tmp(rel, ("\n".join(lines) + "\n").encode())


FOLDER = ("data.name=image-folder", "data.root={tmp}/f", "data.image_size=8", "model.in_channels=3")
CLASSES = [f"f/{c}/{i}.png" for c in ("a", "b") for i in range(5)]
FLAT = [f"f/{i}.png" for i in range(5)]

CASES = [
    Fault(
        "train-folder-undecodable-image",
        train(*FOLDER),
        r"1 file\(s\) cannot be read as images: .*f/a/broken\.png \(UnidentifiedImageError.*remove or replace them",
        damage=both(images(*CLASSES), write_tmp("f/a/broken.png", b"\x89PNG not really")),
    ),
    Fault(
        "train-folder-no-images",
        train(*FOLDER),
        r"dataset 'image-folder' not found; looked for: .*No \*\.png\|.* images for split 'train'",
        damage=write_tmp("f/a/notes.txt", b"no pictures here"),
    ),
    Fault(
        "train-folder-top-level-next-to-classes",
        train(*FOLDER),
        r"f holds images at its top level \(stray\.png\) next to class subfolders \(a, b\)",
        damage=images(*CLASSES, "f/stray.png"),
    ),
    Fault(
        "train-folder-captions-missing",
        train(*FOLDER),
        r'captions missing for 2 of 5 images of .*/f: 3\.png, 4\.png have no "text" in metadata\.jsonl',
        damage=both(
            images(*FLAT),
            metadata(
                "f/metadata.jsonl", [{"file_name": f"{i}.png", **({"text": "x"} if i < 3 else {})} for i in range(5)]
            ),
        ),
    ),
    Fault(
        "train-folder-images-not-in-metadata",
        train(*FOLDER),
        r"captions missing for 4 of 5 images of .*/f: 1\.png, 2\.png, 3\.png and 1 more are not in metadata\.jsonl",
        damage=both(images(*FLAT), metadata("f/metadata.jsonl", [{"file_name": "0.png", "text": "x"}])),
    ),
    Fault(
        "train-folder-metadata-malformed",
        train(*FOLDER),
        r"metadata\.jsonl line 2: not valid JSON \(.*\); each line must be a JSON object like",
        damage=both(
            images(*FLAT), metadata("f/metadata.jsonl", [{"file_name": "0.png", "text": "x"}, '{"file_name": '])
        ),
    ),
    Fault(
        "train-folder-metadata-names-a-missing-file",
        train(*FOLDER),
        r"metadata\.jsonl line 1: gone\.png is not an image of .*; fix the file_name or remove the line",
        damage=both(images(*FLAT), metadata("f/metadata.jsonl", [{"file_name": "gone.png", "text": "x"}])),
    ),
    Fault(
        "train-folder-channels-not-1-or-3",
        train(*FOLDER, "data.channels=4"),
        r"data\.channels: input should be 1 or 3, got 4",
        damage=images(*CLASSES),
    ),
    Fault(
        "train-grayscale-folder-task-next-to-rgb",
        train(
            "data.name=cifar10", "data.tasks=[{name: image-folder, root: '{tmp}/f', channels: 1}]", "data.image_size=8"
        ),
        r"data\.tasks\[0\]\.name: image-folder has 1 channel\(s\) but task 0 \(cifar10\) has 3.*set data\.tasks\[0\]\.channels=3",
        damage=images(*CLASSES),
    ),
    Fault(
        "train-workers-without-a-streamed-folder",
        train("data.workers=2"),
        r"data\.workers=2 cannot take effect: a run that does not stream one image folder",
    ),
]


@pytest.mark.parametrize("fault", cases(CASES))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
