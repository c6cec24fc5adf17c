"""Issue 28 classes 13 and 14 at their roots: the parser refuses a flag given twice and a negative
count; a raw OSError becomes one line naming the path and the fix; ``--set`` indexes lists."""

from __future__ import annotations

import errno
import os

import pytest

from difflora.cli.commands import build_parser
from difflora.cli.inputs import refuse_inapplicable
from difflora.cli.parser import CLIError
from difflora.config.schema import ConfigError, parse_config
from difflora.errors import describe_os_error


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["sample", "r", "--out", "a.png", "--seed", "1", "--seed", "2"], r"--seed given twice; give it once"),
        (["sample", "r", "--out", "a.png", "--out", "b.png"], r"--out given twice"),
        (["eval", "r", "--teacher", "--teacher"], r"--teacher given twice"),
        (["train", "c", "--set", "train.lr=1", "--set", " train.lr = 2"], r"--set train\.lr given twice"),
        (["study", "s", "--only", "a", "--only", "a"], r"--only a given twice"),
        (["sample", "r", "--out", "a.png", "--seed=-1"], r"--seed: expected an integer greater than or equal to 0"),
        (["eval", "r", "--task=-2"], r"--task: expected an integer greater than or equal to 0, got '-2'"),
        (["eval", "r", "--seed", "x"], r"--seed: invalid int value: 'x'"),
    ],
)
def test_the_parser_refuses_repeats_and_negative_counts(argv, error):
    with pytest.raises(CLIError, match=error):
        build_parser().parse_args(argv)


def test_distinct_keys_of_a_repeatable_flag_are_kept_in_order():
    args = build_parser().parse_args(["train", "c", "--set", "train.lr=1", "--set", "train.steps=2", "--set", "a=b=c"])
    assert args.set == ["train.lr=1", "train.steps=2", "a=b=c"]
    args = build_parser().parse_args(["sample", "r", "--out", "a.png", "--condition", "task=1", "--condition", "g=2"])
    assert args.condition == ["task=1", "g=2"] and args.seed == 0


def test_an_inapplicable_flag_is_refused_only_when_given():
    refuse_inapplicable({"--x": (None, "never"), "--y": (False, "never"), "--z": (3, None)})
    with pytest.raises(CLIError, match=r"^--z does not apply here: the run is plain; remove it$"):
        refuse_inapplicable({"--z": (0.5, "the run is plain")})


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (
            FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/x/a.png.tmp"),
            "cannot use /x/a.png: no such file",
        ),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/r/o"), "cannot use /r/o: permission denied: fix"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/a"), "cannot use /mnt/a: the file system is read-only"),
        (FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), "f"), "cannot use f: a file is in the way"),
        (IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), "d.tmp", "d"), "cannot use d: it is a directory"),
        (NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "f/x"), "cannot use f/x: a part of the path"),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "big"), "cannot use big: no space left on the device"),
        (OSError(errno.EIO, os.strerror(errno.EIO)), "cannot use a file: input/output error"),
        (OSError(errno.ELOOP, os.strerror(errno.ELOOP), "l"), "cannot use l: too many levels of symbolic links"),
        (FileNotFoundError("runs/x is not a difflora run directory"), "runs/x is not a difflora run directory"),
    ],
)
def test_a_raw_os_error_is_one_line_naming_the_path_and_the_fix(exc, line):
    assert describe_os_error(exc).startswith(line)
    assert "Errno" not in describe_os_error(exc)


def test_set_indexes_a_list_of_the_config():
    lora = "model.adapters=[{name: a, condition: y, weighting: index, num_values: 10, rank: 2}]"
    cfg = parse_config({"model": {"num_classes": 10}}, [lora, "model.adapters.0.rank=8"])
    assert cfg.model.adapters[0].rank == 8
    cfg = parse_config({}, ["model.unet.attention_resolutions=[16, 8]", "model.unet.attention_resolutions.1=4"])
    assert cfg.model.unet.attention_resolutions == [16, 4]
    with pytest.raises(ConfigError, match=r"model\.adapters is a list of 1 entries \(index 0\.\.0\); give the whole"):
        parse_config({"model": {"num_classes": 10}}, [lora, "model.adapters.x.rank=8"])
    with pytest.raises(ConfigError, match=r"model\.adapters is an empty list"):
        parse_config({}, ["model.adapters.0.rank=8"])
