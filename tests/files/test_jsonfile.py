"""``read_json_file`` against hand-made bad files, and every reader of a user's JSON file routed through it.

The expected messages are written out by hand (offsets and positions counted in the test's own
bytes), so a change of wording or of a reported position is a failure.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn

from difflora.adapters.io import AdapterLoadError, read_adapter_config
from difflora.adapters.peft_format import PeftFormatError, import_peft
from difflora.eval.evaluate import merge_accounting
from difflora.eval.features import load_feature_net
from difflora.experiments.study_spec import StudyError, read_run_json
from difflora.files.jsonfile import read_json_file
from difflora.train.checkpoint import CheckpointError, load_checkpoint
from difflora.train.run_dir import load_run_config

FIX = "write it again"


class _Damaged(RuntimeError):
    """A caller's own exception type (checkpoint errors are RuntimeErrors, not ValueErrors)."""


def _file(tmp_path: Path, content: bytes, name: str = "f.json") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_a_valid_file_is_its_content(tmp_path):
    path = _file(tmp_path, '{"steps": 4, "name": "caf\u00e9", "lr": [0.5, null]}'.encode())
    assert read_json_file(path, fix=FIX, expect=dict) == {"steps": 4, "name": "caf\u00e9", "lr": [0.5, None]}
    assert read_json_file(_file(tmp_path, b"[1, 2]"), fix=FIX) == [1, 2]  # no type required: any JSON
    assert read_json_file(_file(tmp_path, b" 7 \n"), fix=FIX) == 7


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        (b'{"a": 1', "is not valid JSON (Expecting ',' delimiter: line 1 column 8 (char 7))"),
        (b'{"a": 1}\n{"b": 2}\n', "is not valid JSON (Extra data: line 2 column 1 (char 9))"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "is not valid JSON (not UTF-8 text: byte 0x89 at offset 0)"),
        (b"\xff\xfe{\x00}\x00", "is not valid JSON (not UTF-8 text: byte 0xff at offset 0)"),  # UTF-16
        ('{"name": "caf\u00e9"}'.encode("latin-1"), "is not valid JSON (not UTF-8 text: byte 0xe9 at offset 13)"),
        (b"[" * 100_000, "is not valid JSON (nested too deeply to read)"),
    ],
    ids=["empty", "truncated", "two-documents", "png", "utf16", "latin1", "deep"],
)
def test_a_damaged_file_is_one_line_naming_file_problem_and_fix(tmp_path, content, problem):
    path = _file(tmp_path, content)
    with pytest.raises(ValueError) as info:
        read_json_file(path, fix=FIX)
    assert str(info.value) == f"{path} {problem}; {FIX}"


@pytest.mark.parametrize(
    ("content", "expect", "problem"),
    [
        (b"[1, 2]", dict, "is not a JSON object (it holds an array)"),
        (b"null", dict, "is not a JSON object (it holds null)"),
        (b'"config"', dict, "is not a JSON object (it holds a string)"),
        (b"3.5", dict, "is not a JSON object (it holds a number)"),
        (b"true", dict, "is not a JSON object (it holds true/false)"),
        (b'{"a": []}', list, "is not a JSON array (it holds an object)"),
    ],
)
def test_the_wrong_top_level_type_names_both_types(tmp_path, content, expect, problem):
    path = _file(tmp_path, content)
    with pytest.raises(ValueError) as info:
        read_json_file(path, fix=FIX, expect=expect)
    assert str(info.value) == f"{path} {problem}; {FIX}"


def test_a_missing_file_or_a_directory_says_so(tmp_path):
    with pytest.raises(ValueError) as info:
        read_json_file(tmp_path / "none.json", fix=FIX)
    assert str(info.value) == f"{tmp_path / 'none.json'} does not exist; {FIX}"
    with pytest.raises(ValueError) as info:  # a directory is not a JSON file either
        read_json_file(tmp_path, fix=FIX, missing="not a run: config.json is missing")
    assert str(info.value) == "not a run: config.json is missing"


def test_the_callers_type_and_name_for_the_file(tmp_path):
    path = _file(tmp_path, b"[]", "state.json")
    with pytest.raises(_Damaged) as info:
        read_json_file(path, fix=FIX, error=_Damaged, expect=dict, what="checkpoint step_4 is corrupt: state.json")
    assert (
        str(info.value) == f"checkpoint step_4 is corrupt: state.json is not a JSON object (it holds an array); {FIX}"
    )
    with pytest.raises(_Damaged) as info:
        read_json_file(_file(tmp_path, b"{", "state.json"), fix=FIX, error=_Damaged)
    assert info.value.__suppress_context__  # the JSONDecodeError is not chained into the user's traceback


# Every reader of a user's JSON file, handed a binary one (a PNG saved under the JSON name): each
# fails in its own exception type, naming the file, the problem (not UTF-8) and its own fix.
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
NOT_UTF8 = r"is not valid JSON \(not UTF-8 text: byte 0x89 at offset 0\); "


def _run_config(d: Path) -> None:
    _file(d, PNG, "config.json")
    load_run_config(d)


def _checkpoint_state(d: Path) -> None:
    _file(d, PNG, "state.json")
    load_checkpoint(d)


def _adapter_config(d: Path) -> None:
    _file(d, PNG, "adapter_config.json")
    read_adapter_config(d)


def _peft_config(d: Path) -> None:
    _file(d, PNG, "adapter_config.json")
    _file(d, b"", "adapter_model.safetensors")  # never reached: the config is read first
    import_peft(nn.Linear(2, 2), d)


def _feature_net(d: Path) -> None:
    _file(d, PNG, "net.json")
    _file(d, b"", "net.safetensors")
    load_feature_net(d / "net")


def _study_run(d: Path) -> None:
    _file(d, PNG, "accounting.json")
    read_run_json(d / "accounting.json")


@pytest.mark.parametrize(
    ("reader", "error", "message"),
    [
        (
            _run_config,
            ValueError,
            r"config\.json " + NOT_UTF8 + r"each checkpoint's state\.json holds the run's config",
        ),
        (_checkpoint_state, CheckpointError, r"is corrupt: state\.json " + NOT_UTF8 + r"pass --checkpoint STEP"),
        (_adapter_config, AdapterLoadError, r"adapter_config\.json " + NOT_UTF8 + r"the file is damaged: save the"),
        (_peft_config, PeftFormatError, r"adapter_config\.json " + NOT_UTF8 + r"export the adapter again"),
        (_feature_net, ValueError, r"net\.json " + NOT_UTF8 + r"the feature network .*net is damaged"),
        (_study_run, StudyError, r"accounting\.json " + NOT_UTF8 + r"delete that run directory"),
    ],
    ids=["run-config", "checkpoint-state", "adapter-config", "peft-config", "feature-net", "study-run"],
)
def test_every_reader_of_a_users_json_file_reports_a_binary_one(tmp_path, reader, error, message):
    with pytest.raises(error) as info:
        reader(tmp_path)
    assert re.search(message, str(info.value)) and "\n" not in str(info.value), str(info.value)


def test_merging_into_a_damaged_accounting_file_rebuilds_it(tmp_path):
    _file(tmp_path, PNG, "accounting.json")
    path = merge_accounting(tmp_path, {"sample_images_per_s": 2.5})
    assert read_json_file(path, fix=FIX) == {"sample_images_per_s": 2.5}
    merge_accounting(tmp_path, {"peak_memory_mb": 10.0})  # an intact file keeps what it held
    assert read_json_file(path, fix=FIX) == {"sample_images_per_s": 2.5, "peak_memory_mb": 10.0}
