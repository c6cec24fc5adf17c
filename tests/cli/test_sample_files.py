"""`difflora sample --out-dir DIR` and `--npz FILE`: samples in the layouts external FID tools read
(one PNG per image; uint8 [N,H,W,C] under arr_0), decoding to exactly the sampled values, written
all or nothing."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difflora.cli.commands import main
from difflora.files import images as image_files
from difflora.files.images import save_image_dir

SAMPLE = ["--num", "5", "--steps", "2", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "run"
    argv = ["train", "tiny-unet", "--out", str(out), "--no-progress", "--set", "train.steps=2"]
    assert main([*argv, "--set", "train.ckpt_every=2", "--set", "sample.num=2"]) == 0
    return out


def _expected_uint8(tensor_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """The sampled floats in [-1, 1] as uint8 [N,H,W,C], by the formula written out, and the labels."""
    saved = load_file(str(tensor_file))
    x = saved["images"].double().clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), saved["labels"].numpy()


def test_out_dir_and_npz_hold_exactly_the_sampled_values(run_dir, tmp_path, capsys):
    tensor, out_dir, npz = tmp_path / "s.safetensors", tmp_path / "pngs", tmp_path / "s.npz"
    argv = ["sample", str(run_dir), *SAMPLE, "--save-tensor", str(tensor), "--out-dir", str(out_dir)]
    assert main([*argv, "--npz", str(npz)]) == 0
    expected, labels = _expected_uint8(tensor)
    assert expected.shape == (5, 8, 8, 1)
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{i:06d}.png" for i in range(5)]
    for i in range(5):
        with Image.open(out_dir / f"{i:06d}.png") as img:
            assert img.mode == "L" and img.size == (8, 8)
            assert np.array_equal(np.asarray(img), expected[i, ..., 0])
    with np.load(npz) as arrays:
        assert sorted(arrays.files) == ["arr_0", "arr_1"]
        assert arrays["arr_0"].dtype == np.uint8 and np.array_equal(arrays["arr_0"], expected)
        assert np.array_equal(arrays["arr_1"], labels)
    assert str(out_dir) in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_non_empty_out_dir_is_refused_before_sampling_unless_overwrite(run_dir, tmp_path, capsys):
    out_dir = tmp_path / "pngs"
    out_dir.mkdir()
    (out_dir / "mine.txt").write_text("keep")
    assert main(["sample", str(run_dir), *SAMPLE, "--out-dir", str(out_dir)]) == 2
    assert capsys.readouterr().err == f"error: {out_dir} is not empty; choose another directory or pass --overwrite\n"
    assert [p.name for p in out_dir.iterdir()] == ["mine.txt"]
    assert main(["sample", str(run_dir), *SAMPLE, "--out-dir", str(out_dir), "--overwrite"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{i:06d}.png" for i in range(5)]  # replaced whole
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["sample", str(run_dir), *SAMPLE, "--out-dir", str(empty)]) == 0
    assert len(list(empty.iterdir())) == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], r"sample writes nothing: give --out FILE.png \(a grid\), --out-dir DIR"),
        (["--npz", "{tmp}/a.npy"], r"--npz must name a \.npz file, got .*a\.npy"),
        (["--out-dir", "{tmp}/file.txt"], r"file\.txt is a file; name a directory"),
    ],
)
def test_bad_sample_outputs_are_one_line(run_dir, tmp_path, capsys, extra, message):
    (tmp_path / "file.txt").write_text("x")
    assert main(["sample", str(run_dir), *SAMPLE, *[e.format(tmp=tmp_path) for e in extra]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_failure_midway_leaves_the_old_directory_and_no_staging(tmp_path, monkeypatch):
    out_dir = tmp_path / "pngs"
    save_image_dir(torch.zeros(2, 1, 4, 4), out_dir)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    calls = []

    def failing(arr):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(arr)

    real = image_files._image
    monkeypatch.setattr(image_files, "_image", failing)
    with pytest.raises(OSError, match="no space left on the device"):
        save_image_dir(torch.ones(4, 3, 4, 4), out_dir, overwrite=True)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["pngs"]
