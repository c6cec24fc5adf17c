"""Fault catalogue, part 3: run directories, damaged and forged checkpoints, and signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faultkit import (
    CK2,
    CK4,
    ROOT,
    Fault,
    both,
    cases,
    check_fault,
    edit_json,
    evaluate,
    flip_byte,
    forge,
    hold_lock,
    nan_weights,
    remove,
    sample,
    snapshot,
    truncate,
    write,
    write_tmp,
    wrong_shapes,
)

from difflora.adapters import AdapterLoadError
from difflora.model.build import build_model
from difflora.train import load_run_config
from difflora.train.checkpoint import CheckpointError, load_checkpoint, load_weights

RUN_DIRS = [
    Fault("run-dir-missing", ("sample", "{tmp}/nowhere", "--out", "{tmp}/a.png"), r"not a difflora run directory"),
    Fault(
        "run-dir-is-file",
        ("sample", "{tmp}/f", "--out", "{tmp}/a.png"),
        r"not a difflora run directory",
        damage=write_tmp("f", b"x"),
    ),
    Fault(
        "config-json-missing",
        sample(),
        r"run\b.* is not a difflora run directory: .*config\.json is missing",
        damage=remove("config.json"),
    ),
    Fault(
        "config-json-garbage",
        sample(),
        r"config\.json is not valid JSON .*state\.json holds the run's config",
        damage=write("config.json", "{oops"),
    ),
    Fault("config-json-empty", sample(), r"config\.json is not valid JSON", damage=write("config.json", "")),
    Fault(
        "config-json-binary",
        sample(),
        r"config\.json is not valid JSON",
        damage=lambda r, t: (r / "config.json").write_bytes(b"\xff\xfe\x00"),
    ),
    Fault(
        "config-json-list",
        sample(),
        r"config\.json is not a JSON object \(it holds an array\); .*state\.json holds the run's config",
        damage=write("config.json", "[1, 2]"),
    ),
    # null once parsed as the default config and sampled a model the run never trained.
    Fault(
        "config-json-null",
        sample(),
        r"config\.json is not a JSON object \(it holds null\)",
        damage=write("config.json", "null"),
    ),
    Fault(
        "config-json-bad-value",
        sample(),
        r"config\.json: invalid config: train\.lr: input should be a valid number",
        damage=edit_json("config.json", lambda c: {**c, "train": {**c["train"], "lr": "fast"}}),
    ),
    Fault(
        "config-json-unknown-key",
        sample(),
        r"config\.json: invalid config: model\.colour: unknown key",
        damage=edit_json("config.json", lambda c: {**c, "model": {**c["model"], "colour": 1}}),
    ),
    Fault("no-checkpoints", sample(), r"no checkpoint in .*checkpoints; train first", damage=remove("checkpoints")),
    Fault(
        "only-temp-checkpoint",
        sample(),
        r"no checkpoint in",
        damage=both(remove("checkpoints"), write("checkpoints/.tmp-step_0000006/x", "")),
    ),
    Fault(
        "eval-config-json-garbage", evaluate(), r"config\.json is not valid JSON", damage=write("config.json", "nope")
    ),
    Fault(
        "plot-weights-config-garbage",
        ("plot-weights", "{run}"),
        r"config\.json is not valid JSON",
        damage=write("config.json", ""),
    ),
    Fault("plot-weights-out-jpg", ("plot-weights", "{run}", "--out", "{tmp}/w.jpg"), r"--out must name a \.png file"),
    Fault(
        "plot-weights-no-trainable",
        ("plot-weights", "{run}", "--out", "{tmp}/w.png"),
        r"has no trainable weighting to plot",
    ),
]

CHECKPOINTS = [
    # The newest checkpoint is visibly damaged: say so, use the newest intact one, succeed.
    Fault(
        "newest-model-truncated-falls-back",
        sample("--weights", "model"),
        None,
        truncate(f"{CK4}/model.safetensors"),
        warning=r"skipping a damaged checkpoint: .*step_0000004 is cut short: model\.safetensors",
    ),
    Fault(
        "newest-ema-missing-falls-back",
        sample(),
        None,
        remove(f"{CK4}/ema.safetensors"),
        warning=r"step_0000004 is incomplete: ema\.safetensors is missing",
    ),
    Fault(
        "newest-state-missing-falls-back",
        sample(),
        None,
        remove(f"{CK4}/state.json"),
        warning=r"step_0000004 is incomplete: state\.json is missing",
    ),
    Fault(
        "newest-state-garbage-falls-back",
        sample(),
        None,
        write(f"{CK4}/state.json", "{"),
        warning=r"step_0000004 is corrupt: state\.json is not valid JSON",
    ),
    Fault(
        "newest-state-list-falls-back",
        sample(),
        None,
        write(f"{CK4}/state.json", "[]"),
        warning=r"state\.json is not a JSON object",
    ),
    Fault(
        "newest-state-no-files-falls-back",
        sample(),
        None,
        edit_json(f"{CK4}/state.json", lambda s: {k: v for k, v in s.items() if k != "files"}),
        warning=r"state\.json does not list model\.safetensors",
    ),
    Fault(
        "newest-state-future-format-falls-back",
        sample(),
        None,
        edit_json(f"{CK4}/state.json", lambda s: {**s, "format": 99}),
        warning=r"has format 99, this difflora reads 1",
    ),
    Fault(
        "newest-optim-truncated-falls-back",
        sample(),
        None,
        truncate(f"{CK4}/optim.safetensors", 10),
        warning=r"cut short: optim\.safetensors",
    ),
    Fault(
        "eval-newest-damaged-is-named",
        evaluate("--num-samples", "2"),
        r"--num-samples must be at least 4",
        truncate(f"{CK4}/ema.safetensors"),
        warning=r"skipping a damaged checkpoint: .*step_0000004",
    ),
    # Damage of the same size is found by the hashes on load; the advice (--checkpoint) works.
    Fault(
        "newest-ema-bitflip",
        sample(),
        r"step_0000004 is cut short or corrupt: ema\.safetensors .* pass --checkpoint STEP",
        flip_byte(f"{CK4}/ema.safetensors"),
    ),
    Fault("newest-ema-bitflip-checkpoint-2", sample("--checkpoint", "2"), None, flip_byte(f"{CK4}/ema.safetensors")),
    Fault(
        "newest-model-bitflip-by-path",
        sample("--weights", "model", "--checkpoint", "{run}/" + CK2),
        None,
        flip_byte(f"{CK4}/model.safetensors"),
    ),
    Fault(
        "chosen-checkpoint-bitflip",
        sample("--checkpoint", "2"),
        r"step_0000002 is cut short or corrupt: ema\.safetensors",
        flip_byte(f"{CK2}/ema.safetensors"),
    ),
    Fault(
        "chosen-checkpoint-state-garbage",
        sample("--checkpoint", "2"),
        r"step_0000002 is corrupt: state\.json is not valid JSON .*pass --checkpoint",
        write(f"{CK2}/state.json", "nul"),
    ),
    Fault(
        "every-checkpoint-damaged",
        sample(),
        r"every checkpoint in .*checkpoints is damaged \(steps 2, 4\); retrain",
        both(truncate(f"{CK2}/ema.safetensors"), remove(f"{CK4}/state.json")),
        warning=r"step_0000002",
    ),
    # Damage the hashes cannot see (a file rewritten with a matching record): still a clear error.
    Fault(
        "forged-ema-not-safetensors",
        sample(),
        r"ema\.safetensors is not a readable safetensors file .*pass --checkpoint",
        forge(CK4, "ema", lambda t: b"\x00" * 64),
    ),
    Fault(
        "forged-ema-header-garbage",
        sample(),
        r"ema\.safetensors is not a readable safetensors file",
        forge(CK4, "ema", lambda t: b"\xff" * 8 + b"{}"),
    ),
    Fault(
        "forged-ema-wrong-shapes",
        sample(),
        r"the weights in .*step_0000004 do not fit the model of .*config\.json \(\d+ of another shape, e\.g\. net\..*: \[.*\] vs \[",
        forge(CK4, "ema", wrong_shapes),
    ),
    Fault(
        "forged-ema-missing-keys",
        sample(),
        r"ema\.safetensors holds 3 tensors, state\.json records \d+; pass --checkpoint",
        forge(CK4, "ema", lambda t: dict(list(t.items())[:3])),
    ),
    Fault(
        "forged-ema-nan-weights",
        sample(),
        # Refused at load, naming the tensor (issue 28), not after sampling from NaN weights.
        r"step_0000004/ema\.safetensors: tensor '[^']+' holds \d+ NaN or infinite values of \d+; pass --checkpoint",
        forge(CK4, "ema", nan_weights),
    ),
    Fault(
        "state-step-not-int",
        sample(),
        r"state\.json has no integer 'step'",
        edit_json(f"{CK4}/state.json", lambda s: {**s, "step": "four"}),
    ),
    Fault(
        "state-files-record-garbled",
        sample("--checkpoint", "4"),
        r"step_0000004 is corrupt: state\.json has no size and hash for ema\.safetensors",
        edit_json(f"{CK4}/state.json", lambda s: {**s, "files": {**s["files"], "ema": 7}}),
    ),
    # The API raises CheckpointError naming the checkpoint for the same faults.
    Fault(
        "api-load-state-list",
        api=lambda r, t: load_checkpoint(r / CK4),
        exc=CheckpointError,
        error=r"step_0000004 is corrupt: state\.json is not a JSON object",
        damage=write(f"{CK4}/state.json", "[1]"),
    ),
    Fault(
        "api-load-no-optimizer",
        api=lambda r, t: load_checkpoint(r / CK4),
        exc=CheckpointError,
        error=r"step_0000004 is corrupt: state\.json lacks or garbles 'optimizer'",
        damage=edit_json(f"{CK4}/state.json", lambda s: {k: v for k, v in s.items() if k != "optimizer"}),
    ),
    Fault(
        "api-load-forged-rng",
        api=lambda r, t: load_checkpoint(r / CK4),
        exc=CheckpointError,
        error=r"rng\.safetensors is not a readable safetensors file",
        damage=forge(CK4, "rng", lambda t: b"garbage!"),
    ),
    Fault(
        "api-load-weights-which",
        api=lambda r, t: load_weights(r / CK4, "best"),
        exc=ValueError,
        error=r"which must be 'ema' or 'model'",
    ),
    Fault(
        "api-load-bitflip-rng",
        api=lambda r, t: load_checkpoint(r / CK4),
        exc=CheckpointError,
        error=r"rng\.safetensors has \d+ bytes, expected \d+ with a matching sha256",
        damage=flip_byte(f"{CK4}/rng.safetensors"),
    ),
]


def adapter_dir(run: Path, tmp: Path) -> None:
    """Adapters saved from the task run's model into tmp/ad (the damage cases then break a file)."""
    from difflora.adapters import save_adapters

    save_adapters(_seeded_model(run), tmp / "ad")


def _seeded_model(run: Path):
    torch.manual_seed(0)  # the same base weights at save and at load: the fingerprints match
    return build_model(load_run_config(run))


def load_adapters_of(run: Path, tmp: Path) -> object:
    from difflora.adapters import load_adapters

    return load_adapters(_seeded_model(run), tmp / "ad")


ADAPTERS = [
    Fault(
        "adapter-dir-missing",
        api=load_adapters_of,
        run="task",
        exc=AdapterLoadError,
        error=r"ad/adapter_config\.json does not exist: not an adapter directory",
    ),
    Fault(
        "adapter-config-other-format",
        api=load_adapters_of,
        run="task",
        exc=AdapterLoadError,
        error=r"adapter_config\.json is not a difflora adapter file",
        damage=both(adapter_dir, write_tmp("ad/adapter_config.json", b'{"format": "peft"}')),
    ),
    Fault(
        "adapter-config-garbage",
        api=load_adapters_of,
        run="task",
        exc=AdapterLoadError,
        error=r"adapter_config\.json",
        damage=both(adapter_dir, write_tmp("ad/adapter_config.json", b"{")),
    ),
    Fault(
        "adapter-weights-garbage",
        api=load_adapters_of,
        run="task",
        exc=AdapterLoadError,
        error=r"adapters\.safetensors",
        damage=both(adapter_dir, write_tmp("ad/adapters.safetensors", b"junk")),
    ),
    Fault(
        "eval-feature-net-json-garbage",
        evaluate("--feature-net", "{tmp}/fn"),
        r"fn\.json",
        damage=both(write_tmp("fn.json", b"{oops"), write_tmp("fn.safetensors", b"x")),
    ),
]

# One writer per run directory: a second one is refused naming the holder (train, resume, distill,
# pretrain), and a base's record of the runs that stand on its checkpoints is never overwritten.
HELD_BY = r"is being written by pid 4242 on elsewhere \(difflora train tiny-unet\), started 2026-12-07 12:00:00 UTC"
LORA = "model.adapters=[{name: lora, condition: t, weighting: linear, num_values: 100, num_bases: 2, rank: 2}]"
WRITERS = [
    Fault(
        "train-resume-while-training",
        ("train", "tiny-unet", "--out", "{run}", "--resume", "--no-progress", "--set", "train.steps=6"),
        HELD_BY,
        damage=hold_lock("{run}"),
    ),
    Fault(
        "train-into-a-run-being-trained", ("train", "tiny-unet", "--out", "{run}"), HELD_BY, damage=hold_lock("{run}")
    ),
    Fault(
        "train-new-dir-being-trained",
        ("train", "tiny-unet", "--out", "{tmp}/new", "--no-progress", "--set", "train.steps=2"),
        HELD_BY,
        damage=hold_lock("{tmp}/new"),
    ),
    Fault(
        "distill-into-a-run-being-trained",
        ("distill", "{run}", "--out", "{tmp}/d", "--no-progress", "--set", "train.steps=2"),
        HELD_BY,
        damage=hold_lock("{tmp}/d"),
    ),
    Fault(
        "pretrain-while-pretraining",
        ("pretrain", "fmnist16-unet", "--no-progress"),
        HELD_BY,
        damage=hold_lock("{tmp}/cache/bases/fmnist16-unet"),
    ),
    Fault(
        "adapt-a-base-with-a-garbled-dependents-record",
        ("train", "tiny-unet", "--out", "{tmp}/new", "--no-progress", "--set", "train.steps=2", "--set", LORA)
        + ("--set", "train.train_base=false", "--set", "train.init_from={run}"),
        r"dependents\.json is not valid JSON .* lists the runs started from checkpoints of",
        damage=write("dependents.json", "{not json"),
    ),
    Fault(
        "adapt-a-base-whose-dependents-record-is-a-list",
        ("train", "tiny-unet", "--out", "{tmp}/new", "--no-progress", "--set", "train.steps=2", "--set", LORA)
        + ("--set", "train.train_base=false", "--set", "train.init_from={run}"),
        r"dependents\.json is not a dependents record \(format 1\)",
        damage=write("dependents.json", '{"format": 1, "dependents": []}'),
    ),
]
CASES = RUN_DIRS + CHECKPOINTS + ADAPTERS + WRITERS


@pytest.mark.parametrize("fault", cases(CASES))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)


# --------------------------------------------------------------------------------------- signals


SIGNALS = [
    # (id, command, signal): an interrupted `sample` exits with one line and writes no file; a killed
    # one leaves no file under the requested name (outputs are written to a temporary, then renamed).
    ("sigint-during-sample", "sample", signal.SIGINT),
    ("sigkill-during-sample", "sample", signal.SIGKILL),
]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never started sampling"
        time.sleep(0.05)


@pytest.mark.parametrize("case", SIGNALS, ids=[s[0] for s in SIGNALS])
def test_signal(case, runs, tmp_path):
    _, _, sig = case
    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    before = snapshot(run)
    marker = tmp_path / "started"
    # The child marks the moment sampling starts (its first model call), then samples for long.
    code = (
        "import signal, sys, pathlib, difflora.sampling.generate as g\n"
        # Python's own SIGINT handler even when the child inherits SIGINT ignored (a test run
        # started in the background of a non-interactive shell), which would make it unstoppable.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "orig = g.sample\n"
        "def marked(*a, **k):\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n"
        "    return orig(*a, **k)\n"
        "g.sample = marked\n"
        "from difflora.cli.commands import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = ["sample", str(run), "--out", str(tmp_path / "a.png"), "--num", "64", "--steps", "100", "--no-progress"]
    argv += ["--save-tensor", str(tmp_path / "a.safetensors")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(marker, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.strip() == "interrupted", err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "a.safetensors").exists()
    assert snapshot(run) == before


def test_catalogue_is_large_and_ids_are_unique():
    import test_faults_config
    import test_faults_flags
    import test_faults_inputs
    import test_faults_outputs

    faults = CASES + test_faults_flags.CASES + test_faults_config.CASES + test_faults_inputs.CASES
    faults += test_faults_outputs.CASES
    ids = [f.id for f in faults] + [s[0] for s in SIGNALS]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 100
