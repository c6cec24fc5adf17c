"""Image folders streamed from disk: pixels, layouts, captions, the cached index, the order.

References are independent of the code under test: pixels against Pillow's own resize and crop
with the sizes worked out by hand here; the order against its definition (each epoch a permutation,
a function of the position alone); captions against the lines the test wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import difflora.data.folder_index as folder_index
from difflora.config.schema import ConfigError, DataConfig, load_config
from difflora.data import (
    DatasetFormatError,
    DatasetNotFoundError,
    EpochOrder,
    StreamBatches,
    index_folder,
    load_dataset,
    open_batches,
    read_image,
)
from difflora.data.stream import default_workers
from difflora.train.distributed import Dist
from difflora.train.step import own_rows


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))


def noise_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> np.ndarray:
    """A random image of ``size`` (width, height) saved at ``path``; returns its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return pixels


def class_folder(root: Path, per_class: int = 10, size: tuple[int, int] = (12, 9)) -> Path:
    for c, name in enumerate(["cat", "dog"]):
        for i in range(per_class):
            noise_image(root / name / f"{i:02d}.png", size, 100 * c + i)
    return root


def folder_cfg(root: Path, **keys) -> DataConfig:
    return DataConfig(name="image-folder", root=str(root), image_size=8, **keys)


# --------------------------------------------------------------------------------------- pixels


def test_read_image_is_pillows_resize_then_centre_crop(tmp_path):
    noise_image(tmp_path / "wide.png", (20, 12), 0)
    noise_image(tmp_path / "tall.png", (9, 14), 1)
    # 20 x 12 to side 8: the shorter side 12 -> 8, the longer 20 -> int(8 * 20 / 12) = 13; the
    # crop's left edge round((13 - 8) / 2) = 2. 9 x 14: 9 -> 8, 14 -> int(8 * 14 / 9) = 12, top 2.
    with Image.open(tmp_path / "wide.png") as img:
        wide = np.asarray(img.convert("RGB").resize((13, 8), Image.BILINEAR).crop((2, 0, 10, 8)))
    with Image.open(tmp_path / "tall.png") as img:
        tall = np.asarray(img.convert("L").resize((8, 12), Image.BILINEAR).crop((0, 2, 8, 10)))
    np.testing.assert_array_equal(read_image(tmp_path / "wide.png", 3, 8), wide.transpose(2, 0, 1))
    np.testing.assert_array_equal(read_image(tmp_path / "tall.png", 1, 8), tall[None])
    np.testing.assert_array_equal(
        read_image(tmp_path / "wide.png", 3, 8, flip=True), wide.transpose(2, 0, 1)[:, :, ::-1]
    )


def test_grayscale_is_itu_luma_and_rgba_drops_alpha(tmp_path):
    Image.fromarray(np.full((6, 6, 4), (10, 200, 30, 7), np.uint8), "RGBA").save(tmp_path / "a.png")
    # ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B = 123.81, rounded.
    assert np.unique(read_image(tmp_path / "a.png", 1, 6)).tolist() == [124]
    assert read_image(tmp_path / "a.png", 3, 6)[:, 0, 0].tolist() == [10, 200, 30]


def test_a_grayscale_folder_is_a_task_next_to_mnist_like_data(tmp_path):
    for i in range(10):
        noise_image(tmp_path / "g" / "x" / f"{i}.png", (8, 8), i, mode="L")
    tasks = "data.tasks=[{name: image-folder, root: %s, channels: 1}]" % (tmp_path / "g")
    cfg = load_config("tiny-unet", [tasks, "data.image_size=8", "data.limit=20"])
    ds = load_dataset(cfg.data, "train")
    assert ds.images.shape == (20 + 9, 1, 8, 8) and ds.conditions["task"].tolist() == [0] * 20 + [1] * 9
    with pytest.raises(ConfigError, match=r"image-folder has 3 channel\(s\) but task 0 \(digits\) has 1.*channels=1"):
        load_config("tiny-unet", [tasks.replace(", channels: 1", ""), "data.image_size=8"])
    with pytest.raises(ConfigError, match=r"data.channels=3 cannot take effect: data.name=digits"):
        load_config("tiny-unet", ["data.channels=3"])


# --------------------------------------------------------------------------------------- layouts


def test_class_subfolders_and_the_stream_read_the_pixels_of_the_folder_in_memory(tmp_path):
    cfg = folder_cfg(class_folder(tmp_path / "f"), hflip=True, workers=0)
    index = index_folder(cfg, "train")
    assert index.class_names == ["cat", "dog"] and len(index) == 18  # 90 %, stratified
    memory = load_dataset(cfg, "train")
    source = open_batches(cfg, seed=3, batch_size=24, rows=range(24))
    assert isinstance(source, StreamBatches)
    x, y, cond = source.draw(0, torch.Generator())
    which, flips = EpochOrder(18, 3).take(np.arange(24))
    want = memory.images[torch.from_numpy(which)]
    want = torch.where(torch.from_numpy(flips)[:, None, None, None], want.flip(-1), want)
    assert torch.equal(x, want) and torch.equal(y, memory.labels[torch.from_numpy(which)]) and cond == {}


def test_flat_folder_with_metadata_gives_captions_aligned_with_samples(tmp_path):
    root = tmp_path / "f"
    lines = []
    for i in range(10):
        noise_image(root / f"{i}.jpg", (10, 10), i)
        lines.append({"file_name": f"{i}.jpg", "text": f"picture number {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in reversed(lines)) + "\n")
    cfg = folder_cfg(root, workers=0)
    index = index_folder(cfg, "train")
    assert index.class_names == ["unlabelled"] and set(index.labels.tolist()) == {0}
    assert [f"picture number {Path(p).stem}" for p in index.files] == index.captions
    source = open_batches(cfg, seed=0, batch_size=4, rows=range(4))
    assert source.captions == index.captions
    _, _, cond = source.draw(1, torch.Generator())
    which, _ = EpochOrder(len(index), 0).take(np.arange(4, 8))
    assert cond["caption"].tolist() == which.tolist()  # the caption of row r: source.captions[caption[r]]


def test_metadata_with_class_subfolders_and_no_texts(tmp_path):
    root = class_folder(tmp_path / "f")
    (root / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{c}/{i:02d}.png"}) + "\n" for c in ("cat", "dog") for i in range(10))
    )
    index = index_folder(folder_cfg(root), "test")
    assert index.captions is None and sorted(index.labels.tolist()) == [0, 1]


@pytest.mark.parametrize(
    "lines,error",
    [
        (['{"file_name": "0.png", "text": "a"}', "{oops"], r"metadata.jsonl line 2: not valid JSON"),
        (['{"file_name": "0.png", "text": "a"}', '["1.png"]'], r"metadata.jsonl line 2: no string file_name"),
        (['{"file_name": "0.png", "text": 5}'], r"metadata.jsonl line 1: no string file_name"),
        (['{"file_name": "0.png", "text": "a"}', '{"file_name": "0.png"}'], r"line 2: 0.png is listed twice"),
        (['{"file_name": "zz.png", "text": "a"}'], r"line 1: zz.png is not an image of"),
        (
            ['{"file_name": "0.png", "text": "a"}'],
            r"captions missing for 4 of 5 images .*: 1.png, 2.png, 3.png and 1 more are not in metadata.jsonl",
        ),
        (
            [json.dumps({"file_name": f"{i}.png", **({"text": "a"} if i < 2 else {})}) for i in range(5)],
            r'captions missing for 3 of 5 images .*: 2.png, 3.png, 4.png have no "text"',
        ),
    ],
)
def test_bad_metadata_is_one_line_naming_the_line_or_the_files(tmp_path, lines, error):
    for i in range(5):
        noise_image(tmp_path / f"{i}.png", (4, 4), i)
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=error) as info:
        index_folder(folder_cfg(tmp_path), "train")
    assert "\n" not in str(info.value)


def test_layout_errors(tmp_path):
    class_folder(tmp_path / "f", per_class=2)
    noise_image(tmp_path / "f" / "stray.png", (4, 4), 0)
    with pytest.raises(DatasetFormatError, match=r"images at its top level \(stray.png\) next to class subfolders"):
        index_folder(folder_cfg(tmp_path / "f"), "train")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="No .*png.* images"):
        index_folder(folder_cfg(tmp_path / "empty"), "train")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_undecodable_file_is_named_when_indexed_and_a_truncated_one_when_read(tmp_path, workers):
    root = class_folder(tmp_path / "f", per_class=5)
    (root / "cat" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetFormatError, match=r"1 file\(s\) cannot be read as images: .*cat/bad.png") as info:
        index_folder(folder_cfg(root), "train")
    assert "\n" not in str(info.value)
    data = (root / "cat" / "00.png").read_bytes()
    (root / "cat" / "bad.png").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    source = open_batches(folder_cfg(root, workers=workers), seed=0, batch_size=20, rows=range(20))  # an epoch
    with pytest.raises(DatasetFormatError, match=r"cat/bad.png: cannot read as an image") as info:
        source.draw(0, torch.Generator())
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ the cache


def test_the_index_is_cached_and_rebuilt_for_what_changed(tmp_path, monkeypatch):
    root = class_folder(tmp_path / "f", per_class=5)
    cfg = folder_cfg(root, index_cache=str(tmp_path / "idx"))
    first = index_folder(cfg, "train")
    (cache,) = (tmp_path / "idx").iterdir()
    assert len(json.loads(cache.read_text())["files"]) == 10
    opened: list[str] = []
    real = folder_index._header
    monkeypatch.setattr(folder_index, "_header", lambda p: opened.append(p.name) or real(p))
    assert index_folder(cfg, "train").files == first.files and opened == []  # nothing opened again
    noise_image(root / "dog" / "new.png", (4, 4), 7)
    os.utime(root / "cat" / "01.png", ns=(1, 1))  # same bytes, another time: checked again
    index_folder(cfg, "train")
    assert sorted(opened) == ["01.png", "new.png"]
    (root / "dog" / "new.png").unlink()
    index_folder(cfg, "train")
    assert "dog/new.png" not in json.loads(cache.read_text())["files"] and len(opened) == 2


# ------------------------------------------------------------------------------------ the order


def test_the_order_is_a_pure_function_of_seed_and_position():
    order = EpochOrder(7, seed=5)
    index, flips = order.take(np.arange(21))
    for e in range(3):
        assert sorted(index[7 * e : 7 * e + 7].tolist()) == list(range(7))  # each epoch: every sample once
    # Any positions, in any order, from a fresh instance: the same samples and flips.
    some = np.array([20, 3, 14, 0])
    again = EpochOrder(7, seed=5).take(some)
    assert again[0].tolist() == index[some].tolist() and again[1].tolist() == flips[some].tolist()
    assert EpochOrder(7, seed=6).take(np.arange(21))[0].tolist() != index.tolist()
    coins = EpochOrder(10_000, seed=0).take(np.arange(10_000))[1]
    assert abs(coins.mean() - 0.5) < 0.02


def test_workers_and_restarts_read_the_same_batches(tmp_path):
    root = class_folder(tmp_path / "f", per_class=6)
    batches = {}
    for workers in (0, 2):
        src = open_batches(folder_cfg(root, hflip=True, workers=workers), seed=1, batch_size=8, rows=range(8))
        batches[workers] = [src.draw(s, torch.Generator())[0] for s in range(4)]
        assert torch.equal(src.draw(2, torch.Generator())[0], batches[workers][2])  # a restart at step 2
        src.close()
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2], strict=True))


def test_each_process_reads_its_own_rows_of_the_global_batch(tmp_path):
    root = class_folder(tmp_path / "f", per_class=6)
    cfg = folder_cfg(root, workers=0)
    train_cfg = load_config("tiny-unet", ["train.batch_size=8", "train.grad_accum=2"]).train
    whole = open_batches(cfg, seed=0, batch_size=8, rows=range(8)).draw(3, torch.Generator())
    seen = torch.zeros(8, dtype=torch.bool)
    for rank in range(2):
        rows = own_rows(train_cfg, Dist(rank=rank, world_size=2))
        assert rows == ([0, 1, 4, 5] if rank == 0 else [2, 3, 6, 7])  # its half of each micro-batch
        x, y, _ = open_batches(cfg, seed=0, batch_size=8, rows=rows).draw(3, torch.Generator())
        assert torch.equal(x[rows], whole[0][rows]) and torch.equal(y, whole[1])
        others = [r for r in range(8) if r not in rows]
        assert not x[others].any()  # never read
        seen[rows] = True
    assert seen.all()


def test_memory_batches_draw_what_the_loop_always_drew():
    cfg = load_config("tiny-unet", ["data.hflip=true"]).data
    source = open_batches(cfg, seed=0, batch_size=16, rows=range(16))
    ds = load_dataset(cfg, "train")
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    x, y, _ = source.draw(0, g1)
    idx = torch.randint(len(ds), (16,), generator=g2)
    want_x, want_y = ds.batch(idx, generator=g2)
    assert torch.equal(x, want_x) and torch.equal(y, want_y) and torch.equal(g1.get_state(), g2.get_state())
    assert source.state(5) is None


def test_default_workers_share_the_cpus_among_training_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 4  # at most 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 1  # 8 CPUs over 4 processes: 2 each, one for the process itself
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_workers() == 0
