"""A run's files against a full disk (issue 28, class 6) and against hand edits (class 4).

A full disk during a checkpoint: one line naming the checkpoint and the space, no temporary
directory left, the older checkpoints and the metrics up to them intact, and a resume once space is
free ends bit-identical to a run that never stopped. A checkpoint's state.json is checked against
the digest recorded with it, recomputed here independently (sha256 of its canonical JSON)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import SafetensorError

from difflora.files import tensorfile
from difflora.files.atomic import WriteError
from difflora.train import latest_checkpoint, load_checkpoint, train
from difflora.train.checkpoint import CheckpointMismatch, find_checkpoints, state_digest, unchecked


def _rows(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_full_disk_at_a_checkpoint_then_resume_is_bit_identical(tmp_path, tiny_config, monkeypatch):
    cfg = tiny_config("tiny-unet", "train.steps=6", "train.ckpt_every=2", "train.log_every=1")
    train(cfg, tmp_path / "straight", progress=False, log=lambda s: None)

    real = tensorfile.save_file
    calls = []

    def full_from_the_fifth_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 4:  # the second checkpoint (step 4): the disk is full
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, filename, metadata=metadata)

    cut = tmp_path / "cut"
    monkeypatch.setattr("difflora.files.tensorfile.save_file", full_from_the_fifth_file)
    with pytest.raises(WriteError) as info:
        train(cfg, cut, progress=False, log=lambda s: None)
    msg = str(info.value)
    assert msg.startswith(f"cannot write {cut / 'checkpoints' / 'step_0000004'}: no space left on the device (")
    assert "MB needed" in msg and msg.endswith("free some space and run the command again")
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_0000002"]  # no .tmp-step_ left
    assert not [p for p in cut.rglob("*.tmp")]
    assert _rows(cut) == [1, 2]  # no row past the newest checkpoint

    monkeypatch.undo()  # space is free again
    train(cfg, cut, resume=True, progress=False, log=lambda s: None)
    a, b = load_checkpoint(latest_checkpoint(tmp_path / "straight")), load_checkpoint(latest_checkpoint(cut))
    assert a.step == b.step == 6 and _rows(cut) == _rows(tmp_path / "straight")
    for name in ("model", "ema", "rng"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_the_digest_is_sha256_of_the_canonical_json(tmp_path, tiny_config):
    run = tmp_path / "run"
    train(tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2"), run, progress=False, log=lambda s: None)
    state = json.loads((latest_checkpoint(run) / "state.json").read_text())
    body = {k: v for k, v in state.items() if k not in ("files", "digest")}
    expected = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    assert state["digest"] == expected == state_digest(state)
    assert unchecked(state) == []


def test_an_edited_value_is_refused_and_a_resume_overwrites_nothing(tmp_path, tiny_config):
    cfg = tiny_config("tiny-unet", "train.steps=4", "train.ckpt_every=2")
    run = tmp_path / "run"
    train(cfg, run, progress=False, log=lambda s: None)
    path = latest_checkpoint(run) / "state.json"
    state = json.loads(path.read_text())
    state["optimizer"]["param_groups"][0]["lr"] = 1.0  # the kind of edit a user makes by hand
    path.write_text(json.dumps(state))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointMismatch, match=r"step_0000004 disagrees with itself"):
        train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 6})}), run, resume=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert [p.name for p in find_checkpoints(run)] == ["step_0000002", "step_0000004"]


def test_an_older_checkpoint_without_a_digest_resumes_and_says_what_is_not_checked(tmp_path, tiny_config):
    cfg = tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2")
    run = tmp_path / "run"
    train(cfg, run, progress=False, log=lambda s: None)
    path = latest_checkpoint(run) / "state.json"
    state = json.loads(path.read_text())
    older = {k: v for k, v in state.items() if k not in ("digest", "tensor_counts")}
    path.write_text(json.dumps(older))
    assert unchecked(older) == ["state.json's values (no digest)", "tensor counts"]
    said = []
    train(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 4})}), run, resume=True, log=said.append
    )
    assert any(
        "resuming" in s
        and "written by an older difflora: state.json's values (no digest), tensor counts not checked" in s
        for s in said
    ), said
    assert load_checkpoint(latest_checkpoint(run)).step == 4
