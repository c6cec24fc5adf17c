"""The fault catalogue: every bad input a user can give through the CLI (and a few through the API),
the one-line error it must produce, and proof that nothing on disk got worse.

Each entry is a :class:`Fault`: how to provoke it (a damage applied to a copy of a tiny trained
run, then a command line or an API call), the expected error (a regex searched in the single
``error: ...`` line on stderr, or in the exception's message), and the check, done for every
entry, that the case's whole directory (the run copy and every path the command was pointed at)
holds exactly the same files and bytes afterwards: no half-written PNG, no empty eval/ directory,
no rewritten config.json. Entries with ``error=None`` are faults the CLI must survive: it succeeds
(exit 0), says what it did about the fault on a ``warning:`` line, and leaves the run unchanged.

One tiny run is trained once per session; every entry works on its own copy. CLI entries run
in-process through ``difflora.cli.main``; only the signal entries start a process.

Not here: training-loop faults (interrupt/resume identity, unwritable output directories,
damaged metrics.jsonl: tests/test_train.py) and adapter-file loading (tests/test_adapters_*.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflora.cli import main
from difflora.config import config_to_dict, load_config
from difflora.model import build_model
from difflora.train.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TASK_ADAPTER = "model.adapters=[{name: task, condition: task, weighting: index, num_values: 3, rank: 2}]"


# --------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A trained tiny run (checkpoints at steps 2 and 4) and an untrained run with a task adapter."""
    from difflora.train import train

    root = tmp_path_factory.mktemp("faults")
    cfg = load_config(CONFIGS / "tiny-unet.yaml", ["train.steps=4", "train.ckpt_every=2", "sample.num=2"])
    train(cfg, root / "run", progress=False, log=lambda s: None)
    # The task run is written directly: its checkpoint is a freshly built adapted model.
    tcfg = load_config(CONFIGS / "tiny-unet.yaml", [TASK_ADAPTER, "sample.num=2"])
    model = build_model(tcfg)
    state = model.state_dict()
    opt = torch.optim.AdamW(model.parameters())
    meta = {"config": config_to_dict(tcfg), "ema_updates": 0}
    rng = {"loop": torch.Generator().get_state(), "torch": torch.get_rng_state()}
    save_checkpoint(root / "task", 1, model=state, ema=state, optimizer=opt, rng=rng, meta=meta)
    (root / "task" / "config.json").write_text(json.dumps(config_to_dict(tcfg)))
    return {"run": root / "run", "task": root / "task"}


# ------------------------------------------------------------------------------------ damage kit

CK2, CK4 = "checkpoints/step_0000002", "checkpoints/step_0000004"


def truncate(rel: str, keep: int = 100) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        p = run / rel
        p.write_bytes(p.read_bytes()[:keep])

    return damage


def flip_byte(rel: str) -> Callable[[Path, Path], None]:
    """Flip one byte in the middle: same size, so only the hash can tell."""

    def damage(run: Path, tmp: Path) -> None:
        p = run / rel
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))

    return damage


def write(rel: str, text: str) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)

    return damage


def remove(rel: str) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        p = run / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return damage


def edit_json(rel: str, fn: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        p = run / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))

    return damage


def forge(ckpt: str, name: str, make: Callable[[dict], bytes | dict]) -> Callable[[Path, Path], None]:
    """Replace ``name``.safetensors and record its true size and hash: damage the hashes cannot see."""

    def damage(run: Path, tmp: Path) -> None:
        path = run / ckpt / f"{name}.safetensors"
        new = make(load_file(str(path)))
        if isinstance(new, dict):
            save_file(new, str(path))
        else:
            path.write_bytes(new)
        state = json.loads((run / ckpt / "state.json").read_text())
        data = path.read_bytes()
        state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (run / ckpt / "state.json").write_text(json.dumps(state))

    return damage


def both(*damages: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        for d in damages:
            d(run, tmp)

    return damage


def nan_weights(t: dict) -> dict:
    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in t.items()}


def wrong_shapes(t: dict) -> dict:
    return {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim else v for k, v in t.items()}


def mkdir(rel: str) -> Callable[[Path, Path], None]:
    return lambda run, tmp: (tmp / rel).mkdir(parents=True)


def idx_labels(rel: str) -> Callable[[Path, Path], None]:
    """A valid IDX label file of two labels, so that the images file is the one at fault."""
    return write_tmp(rel, bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 4]))


def write_tmp(rel: str, data: bytes) -> Callable[[Path, Path], None]:
    def damage(run: Path, tmp: Path) -> None:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)

    return damage


# ------------------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Fault:
    id: str
    argv: tuple[str, ...] = ()  # CLI arguments; {run} and {tmp} are filled in
    error: str | None = None  # regex for the single `error:` line; None: the command must succeed
    damage: Callable[[Path, Path], None] | None = None  # applied to (run copy, case dir) first
    run: str = "run"  # which fixture run is copied: "run" (trained) or "task" (task adapter)
    warning: str | None = None  # regex for a `warning:` line the command must print
    api: Callable[[Path, Path], object] | None = None  # instead of argv: a call that must raise
    exc: type[BaseException] = Exception


def sample(*extra: str) -> tuple[str, ...]:
    return ("sample", "{run}", "--out", "{tmp}/a.png", "--num", "2", "--steps", "2", "--no-progress", *extra)


def evaluate(*extra: str) -> tuple[str, ...]:
    return ("eval", "{run}", "--num-samples", "4", "--steps", "2", "--no-progress", "--cache-dir", "{tmp}/c", *extra)


def train(*sets: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    args = ["train", "tiny-unet", "--out", "{tmp}/new", "--no-progress", "--set", "train.steps=2", *extra]
    for s in sets:
        args += ["--set", s]
    return tuple(args)


def params(*sets: str) -> tuple[str, ...]:
    return ("params", "tiny-unet", *[a for s in sets for a in ("--set", s)])


FLAGS = [
    Fault("sample-guidance-nan", sample("--guidance", "nan"), r"--guidance: expected a finite number, got 'nan'"),
    Fault("sample-guidance-inf", sample("--guidance", "inf"), r"--guidance: expected a finite number, got 'inf'"),
    Fault("sample-guidance-neg-inf", sample("--guidance=-inf"), r"--guidance: expected a finite number"),
    Fault(
        "sample-guidance-negative",
        sample("--guidance=-2"),
        r"--guidance: .*greater than or equal to 0.*sample\.guidance",
    ),
    Fault("sample-guidance-word", sample("--guidance", "high"), r"--guidance: expected a number, got 'high'"),
    Fault("sample-eta-negative", sample("--eta=-1"), r"--eta: .*greater than or equal to 0.*sample\.eta"),
    Fault("sample-eta-nan", sample("--eta", "NaN"), r"--eta: expected a finite number"),
    Fault("sample-num-zero", sample("--num", "0"), r"--num: .*greater than or equal to 1"),
    Fault("sample-num-negative", sample("--num=-3"), r"--num: .*greater than or equal to 1"),
    Fault("sample-num-word", sample("--num", "x"), r"argument --num: invalid int value: 'x'"),
    Fault("sample-num-float", sample("--num", "2.5"), r"argument --num: invalid int value: '2.5'"),
    Fault("sample-steps-zero", sample("--steps", "0"), r"--steps: .*greater than or equal to 1"),
    Fault("sample-steps-too-many", sample("--steps", "1000"), r"--steps 1000 exceeds the diffusion's 100 timesteps"),
    Fault("sample-steps-word", sample("--steps", "many"), r"argument --steps: invalid int value"),
    Fault("sample-sampler-unknown", sample("--sampler", "euler"), r"argument --sampler: invalid choice: 'euler'"),
    Fault("sample-weights-unknown", sample("--weights", "best"), r"argument --weights: invalid choice: 'best'"),
    Fault("sample-class-too-big", sample("--class", "10"), r"class 10 is out of range: the model has classes 0\.\.9"),
    Fault("sample-class-negative", sample("--class=-2"), r"class -2 is out of range"),
    Fault("sample-seed-word", sample("--seed", "lucky"), r"argument --seed: invalid int value"),
    Fault("sample-device-gpu0", sample("--device", "gpu0"), r"--device: 'gpu0' is not a device; use auto, cpu"),
    Fault("sample-device-empty", sample("--device", ""), r"--device: '' is not a device"),
    Fault("sample-device-cuda-index", sample("--device", "cuda:x"), r"--device: 'cuda:x' is not a device"),
    Fault("sample-device-meta", sample("--device", "meta"), r"--device: 'meta' cannot run a model"),
    Fault("sample-out-jpg", ("sample", "{run}", "--out", "{tmp}/a.jpg"), r"--out must name a \.png file"),
    Fault("sample-out-dir", sample(), r"--out .*a\.png is a directory", damage=mkdir("a.png")),
    Fault("sample-save-tensor-pt", sample("--save-tensor", "{tmp}/a.pt"), r"--save-tensor must name a \.safetensors"),
    Fault("sample-unknown-flag", sample("--bogus"), r"unrecognized arguments: --bogus"),
    Fault("sample-no-run-dir-arg", ("sample", "--out", "{tmp}/a.png"), r"required: run_dir"),
    Fault("no-command", (), r"required: command"),
    Fault("unknown-command", ("fly",), r"invalid choice: 'fly'"),
    Fault(
        "sample-condition-unread", sample("--condition", "task=1"), r"--condition task: no adapter of this run reads it"
    ),
    Fault("sample-condition-no-equals", sample("--condition", "task"), r"--condition 'task': expected NAME=VALUE"),
    Fault(
        "sample-condition-bad-name", sample("--condition", "my task=1"), r"--condition 'my task=1': expected NAME=VALUE"
    ),
    Fault("sample-condition-t", sample("--condition", "t=3"), r"--condition t: set by the sampler"),
    Fault("sample-condition-y", sample("--condition", "y=3"), r"--condition y: set by the sampler \(use --class\)"),
    Fault(
        "sample-checkpoint-missing-step",
        sample("--checkpoint", "3"),
        r"--checkpoint 3: .* no checkpoint at step 3; steps: 2, 4",
    ),
    Fault(
        "sample-checkpoint-word",
        sample("--checkpoint", "latest"),
        r"--checkpoint latest: not a step number nor a checkpoint",
    ),
    Fault(
        "sample-checkpoint-bad-path",
        sample("--checkpoint", "{tmp}/nowhere"),
        r"--checkpoint .*nowhere: not a step number",
    ),
]

CONDITIONS = [
    Fault(
        "task-condition-missing",
        sample(),
        r"adapters read condition\(s\) task: pass --condition task=VALUE",
        run="task",
    ),
    Fault(
        "task-condition-out-of-range",
        sample("--condition", "task=3"),
        r"--condition task: adapter task takes integers -1\.\.2",
        run="task",
    ),
    Fault(
        "task-condition-fraction",
        sample("--condition", "task=1.5"),
        r"--condition task: adapter task takes integers",
        run="task",
    ),
    Fault(
        "task-condition-too-few",
        sample("--condition", "task=0,1,2"),
        r"--condition task: give one value or --num \(2\) values, got 3",
        run="task",
    ),
    Fault(
        "task-condition-nan",
        sample("--condition", "task=nan"),
        r"--condition task: expected a finite number, got 'nan'",
        run="task",
    ),
    Fault(
        "task-condition-inf",
        sample("--condition", "task=-inf"),
        r"--condition task: expected a finite number",
        run="task",
    ),
    Fault(
        "task-condition-word",
        sample("--condition", "task=two"),
        r"--condition task: expected a number, got 'two'",
        run="task",
    ),
    Fault(
        "task-condition-empty",
        sample("--condition", "task="),
        r"--condition task: expected a number, got ''",
        run="task",
    ),
    Fault("task-condition-ok-per-sample", sample("--condition", "task=0,2"), None, run="task"),
    Fault("task-condition-ok-null", sample("--condition", "task=-1"), None, run="task"),
]

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
        "config-json-list", sample(), r"config\.json: a config must be a mapping", damage=write("config.json", "[1, 2]")
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
        r"do not fit the model of .*\(\d+ missing tensor\(s\), e\.g\. net\.",
        forge(CK4, "ema", lambda t: dict(list(t.items())[:3])),
    ),
    Fault(
        "forged-ema-nan-weights",
        sample(),
        r"sampling produced NaN or infinite values in 2 of 2 samples.*earlier --checkpoint",
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

EVAL = [
    Fault(
        "eval-guidance-nan",
        evaluate("--guidance", "1", "nan"),
        r"argument --guidance: expected a finite number, got 'nan'",
    ),
    Fault("eval-guidance-negative", evaluate("--guidance=-1"), r"--guidance: .*greater than or equal to 0"),
    Fault("eval-eta-negative", evaluate("--eta=-0.5"), r"--eta: .*greater than or equal to 0"),
    Fault("eval-eta-inf", evaluate("--eta", "inf"), r"--eta: expected a finite number"),
    Fault("eval-steps-zero", evaluate("--steps", "0"), r"--steps: .*greater than or equal to 1"),
    Fault("eval-steps-too-many", evaluate("--steps", "500"), r"--steps 500 exceeds the run's 100 diffusion timesteps"),
    Fault("eval-num-samples-small", evaluate("--num-samples", "3"), r"--num-samples must be at least 4"),
    Fault("eval-feature-steps-zero", evaluate("--feature-steps", "0"), r"--feature-steps must be at least 1"),
    Fault("eval-device-gpu0", evaluate("--device", "gpu0"), r"--device: 'gpu0' is not a device"),
    Fault("eval-device-cuda", evaluate("--device", "cuda:1"), r"--device=cuda:1: CUDA is not available here"),
    Fault("eval-checkpoint-missing-step", evaluate("--checkpoint", "7"), r"no checkpoint at step 7; steps: 2, 4"),
    Fault("eval-run-missing", ("eval", "{tmp}/nowhere"), r"nowhere is not a difflora run directory"),
    Fault("eval-sampler-unknown", evaluate("--sampler", "heun"), r"argument --sampler: invalid choice"),
    Fault(
        "eval-every-checkpoint-damaged",
        evaluate(),
        r"every checkpoint .* is damaged",
        both(remove(f"{CK2}/state.json"), remove(f"{CK4}/state.json")),
        warning=r"skipping",
    ),
    Fault(
        "train-features-non-data-override",
        ("train-features", "digits", "--set", "train.lr=1"),
        r"takes only data\.\* overrides",
    ),
    Fault("train-features-unknown-dataset", ("train-features", "imagenet"), r"data\.name: input should be 'digits'"),
    Fault("train-features-device", ("train-features", "digits", "--device", "tpu"), r"--device: 'tpu' is not a device"),
    Fault(
        "train-features-steps-zero",
        ("train-features", "digits", "--feature-steps", "0"),
        r"--feature-steps must be at least 1",
    ),
]

CONFIG = [
    Fault("config-preset-missing", ("params", "no-such-preset"), r"config 'no-such-preset' not found.*presets: "),
    Fault(
        "config-file-bad-yaml",
        ("params", "{tmp}/c.yaml"),
        r"c\.yaml is not valid YAML: line 2, column 1: expected ',' or '\]', but got '<stream end>'$",
        damage=write_tmp("c.yaml", b"train: [1, 2\n"),
    ),
    Fault(
        "config-file-a-list",
        ("params", "{tmp}/c.yaml"),
        r"a config must be a mapping of sections",
        damage=write_tmp("c.yaml", b"- 1\n- 2\n"),
    ),
    Fault(
        "config-file-unknown-section",
        ("params", "{tmp}/c.yaml"),
        r"invalid config: trian: unknown key \(did you mean 'train'\?\)",
        damage=write_tmp("c.yaml", b"trian: {lr: 1}\n"),
    ),
    Fault(
        "config-file-not-utf8",
        ("params", "{tmp}/c.yaml"),
        r"c\.yaml is not a YAML text file \(not UTF-8\)",
        damage=write_tmp("c.yaml", b"\xff\xfe\xfa"),
    ),
    Fault("set-lr-inf", params("train.lr=inf"), r"train\.lr: input should be a finite number"),
    Fault("set-lr-nan", params("train.lr=nan"), r"train\.lr: input should be"),
    Fault("set-lr-negative", params("train.lr=-1"), r"train\.lr: input should be greater than 0"),
    Fault(
        "set-lr-word",
        params("train.lr=fast"),
        r"train\.lr: input should be a valid number, unable to parse string as a number, got 'fast'",
    ),
    Fault("set-steps-zero", params("train.steps=0"), r"train\.steps: input should be greater than or equal to 1"),
    Fault("set-batch-word", params("train.batch_size=many"), r"train\.batch_size: input should be a valid integer"),
    Fault(
        "set-ema-decay-big", params("train.ema_decay=1.5"), r"train\.ema_decay: input should be less than or equal to 1"
    ),
    Fault(
        "set-label-dropout-inf",
        params("train.label_dropout=.inf"),
        r"train\.label_dropout: input should be a finite number",
    ),
    Fault("set-grad-clip-nan", params("train.grad_clip=.nan"), r"train\.grad_clip: input should be a finite number"),
    Fault(
        "set-guidance-negative",
        params("sample.guidance=-1"),
        r"sample\.guidance: input should be greater than or equal to 0",
    ),
    Fault("set-guidance-nan", params("sample.guidance=.nan"), r"sample\.guidance: input should be a finite number"),
    Fault("set-eta-inf", params("sample.eta=.inf"), r"sample\.eta: input should be a finite number"),
    Fault(
        "set-mlp-ratio-inf",
        params("model.dit.mlp_ratio=.inf"),
        r"model\.dit\.mlp_ratio: input should be a finite number",
    ),
    Fault("set-dropout-one", params("model.unet.dropout=1"), r"model\.unet\.dropout: input should be less than 1"),
    Fault("set-unknown-key", params("train.lrr=1"), r"train\.lrr: unknown key \(did you mean 'lr'\?\)"),
    Fault("set-unknown-section", params("trian.lr=1"), r"trian: unknown key \(did you mean 'train'\?\)"),
    Fault("set-value-into-section", params("train=3"), r"train: input should be a valid dictionary"),
    Fault("set-section-of-value", params("train.lr.x=3"), r"train\.lr\.x: 'lr' is a value, not a section"),
    Fault("set-no-equals", params("train.lr"), r"override 'train\.lr' is not of the form key=value"),
    Fault("set-no-key", params("=3"), r"override '=3' has no key"),
    Fault(
        "set-bad-yaml-value",
        params("train.lr=[1,"),
        r"override train\.lr: cannot parse value '\[1,': line 1, column 4: expected the node content",
    ),
    Fault("set-arch-unknown", params("model.arch=resnet"), r"model\.arch: input should be 'unet' or 'dit'"),
    Fault("set-data-unknown", params("data.name=imagenet"), r"data\.name: input should be 'digits'"),
    Fault(
        "set-image-size-tiny",
        params("data.image_size=2"),
        r"data\.image_size: input should be greater than or equal to 4",
    ),
    Fault(
        "set-model-size-mismatch",
        params("model.image_size=16"),
        r"model\.image_size \(16\) differs from the data's image size \(8\); set data\.image_size=16",
    ),
    Fault(
        "set-channels-mismatch",
        params("model.in_channels=3"),
        r"model\.in_channels \(3\) differs from the data's channels \(1\)",
    ),
    Fault(
        "set-mse-with-learned-sigma", params("diffusion.loss=mse"), r"diffusion\.loss=mse with model\.learn_sigma=true"
    ),
    Fault(
        "set-hybrid-without-sigma",
        params("model.learn_sigma=false"),
        r"diffusion\.loss=hybrid needs model\.learn_sigma=true",
    ),
    Fault(
        "set-schedule-unknown",
        params("diffusion.noise_schedule=sigmoid"),
        r"diffusion\.noise_schedule: input should be 'linear' or 'cosine'",
    ),
    Fault(
        "set-tasks-channels",
        params("data.tasks=[{name: cifar10}]"),
        r"data\.tasks\[0\]\.name: cifar10 has 3 channel\(s\) but task 0 \(digits\) has 1",
    ),
    Fault(
        "set-tasks-unknown-key",
        params("data.tasks=[{name: digits, colour: red}]"),
        r"data\.tasks\.0\.colour: unknown key",
    ),
    Fault("set-tasks-not-a-list", params("data.tasks=digits"), r"data\.tasks: input should be a valid list"),
    Fault(
        "set-task-labels-unknown",
        params("data.task_labels=merge"),
        r"data\.task_labels: input should be 'shared' or 'offset'",
    ),
    Fault(
        "set-adapter-bad-name",
        params("model.adapters=[{name: 'two words'}]"),
        r"model\.adapters\.0\.name: string should match pattern",
    ),
    Fault(
        "set-adapter-no-bases",
        params("model.adapters=[{name: a, weighting: linear, num_values: 100}]"),
        r"model\.adapters\[a\]\.num_bases: linear weighting needs num_bases",
    ),
    Fault(
        "set-adapter-rank-zero",
        params("model.adapters=[{name: a, weighting: index, num_values: 100, rank: 0}]"),
        r"model\.adapters\.0\.rank: input should be greater than or equal to 1",
    ),
    Fault(
        "set-adapter-range-inf",
        params("model.adapters=[{name: a, condition: guidance, num_bases: 2, value_range: [0, .inf]}]"),
        r"model\.adapters\.0\.value_range\.1: input should be a finite number",
    ),
    Fault(
        "set-dit-patch",
        params("model.arch=dit", "model.dit.patch_size=3"),
        r"model\.dit\.patch_size \(3\) must divide model\.image_size \(8\)",
    ),
]

TRAIN = [
    Fault("train-device-gpu0", train("train.device=gpu0"), r"train\.device: 'gpu0' is not a device; use auto, cpu"),
    Fault("train-device-cuda", train("train.device=cuda"), r"train\.device=cuda: CUDA is not available here"),
    Fault("train-device-meta", train("train.device=meta"), r"train\.device: 'meta' cannot run a model"),
    Fault(
        "train-existing-run",
        ("train", "tiny-unet", "--out", "{run}", "--no-progress"),
        r"already holds a run; pass --resume",
    ),
    Fault(
        "train-checkpoint-without-resume",
        ("train", "tiny-unet", "--out", "{run}", "--checkpoint", "2"),
        r"--checkpoint picks the checkpoint to resume from: add --resume",
    ),
    Fault(
        "train-resume-missing-step",
        ("train", "tiny-unet", "--out", "{run}", "--resume", "--checkpoint", "3"),
        r"--checkpoint 3: .*no checkpoint at step 3; steps: 2, 4",
    ),
    Fault(
        "train-resume-other-config",
        ("train", "tiny-unet", "--out", "{run}", "--resume", "--set", "train.lr=0.5"),
        r"cannot resume with a different config .* train\.lr: 0\.001 -> 0\.5",
    ),
    Fault(
        "train-resume-all-damaged",
        ("train", "tiny-unet", "--out", "{run}", "--resume", "--set", "train.steps=6"),
        r"every checkpoint in .* is damaged",
        both(write(f"{CK2}/state.json", ""), write(f"{CK4}/state.json", "")),
        warning=r"skipping",
    ),
    Fault(
        "train-resume-chosen-damaged",
        ("train", "tiny-unet", "--out", "{run}", "--resume", "--checkpoint", "2", "--set", "train.steps=6"),
        r"step_0000002 is cut short or corrupt: model\.safetensors",
        flip_byte(f"{CK2}/model.safetensors"),
    ),
    Fault(
        "train-data-cifar-missing",
        train("data.name=cifar10", "data.root={tmp}/empty"),
        r"dataset 'cifar10' not found; looked for:",
        damage=mkdir("empty"),
    ),
    Fault(
        "train-data-mnist-no-root",
        train("data.name=mnist"),
        r"dataset 'mnist' not found\. mnist has no default location",
    ),
    Fault(
        "train-data-folder-no-size",
        train("data.name=image-folder", "data.root={tmp}"),
        r"model\.image_size: set it or data\.image_size",
    ),
    Fault(
        "train-data-folder-empty",
        train("data.name=image-folder", "data.root={tmp}/imgs", "data.image_size=8", "model.in_channels=3"),
        r"image-folder",
        damage=mkdir("imgs"),
    ),
    Fault(
        "train-data-idx-truncated",
        train("data.name=mnist", "data.root={tmp}/m", "data.image_size=8"),
        r"train-images-idx3-ubyte: size mismatch: .*truncated",
        damage=both(
            idx_labels("m/train-labels-idx1-ubyte"),
            write_tmp(
                "m/train-images-idx3-ubyte", bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 4]) + b"\x00" * 5
            ),
        ),
    ),
    Fault(
        "train-data-idx-bad-magic",
        train("data.name=mnist", "data.root={tmp}/m", "data.image_size=8"),
        r"train-images-idx3-ubyte: not an IDX file",
        damage=both(idx_labels("m/train-labels-idx1-ubyte"), write_tmp("m/train-images-idx3-ubyte", b"PNG\x00garbage")),
    ),
    Fault(
        "train-data-gzip-corrupt",
        train("data.name=fashion-mnist", "data.root={tmp}/m", "data.image_size=8"),
        r"train-images-idx3-ubyte\.gz: corrupt or truncated gzip file",
        damage=both(
            idx_labels("m/train-labels-idx1-ubyte"),
            write_tmp("m/train-images-idx3-ubyte.gz", b"\x1f\x8b\x08\x00broken"),
        ),
    ),
    Fault(
        "train-data-cifar-truncated",
        train("data.name=cifar10", "data.root={tmp}/c", "data.image_size=8", "model.in_channels=3"),
        r"data_batch_1\.bin",
        damage=lambda r, t: [write_tmp(f"c/data_batch_{i}.bin", b"\x01" * 100)(r, t) for i in range(1, 6)],
    ),
    Fault(
        "train-data-mnist5k-missing",
        train("data.name=mnist-5k", "data.root={tmp}", "data.image_size=8"),
        r"dataset 'mnist-5k' not found; looked for:",
    ),
    Fault("train-tasks-missing-dataset", train("data.tasks=[{name: mnist}]"), r"dataset 'mnist' not found"),
    Fault(
        "train-too-few-classes",
        train("model.num_classes=5"),
        r"data\.name=digits has 10 classes but model\.num_classes=5",
    ),
    Fault(
        "demo-device",
        ("demo", "--out", "{tmp}/demo", "--set", "train.device=gpu1"),
        r"train\.device: 'gpu1' is not a device",
    ),
]

CATALOGUE = FLAGS + CONDITIONS + RUN_DIRS + CHECKPOINTS + EVAL + CONFIG + TRAIN


# ------------------------------------------------------------------------------------ the check


def snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256) and directory under ``root``: what 'nothing got worse' compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _fill(argv: tuple[str, ...], run: Path, tmp: Path) -> list[str]:
    return [a.replace("{run}", str(run)).replace("{tmp}", str(tmp)) for a in argv]


@pytest.mark.parametrize("fault", CATALOGUE, ids=[f.id for f in CATALOGUE])
def test_fault(fault: Fault, runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFLORA_DEBUG", raising=False)
    run = tmp_path / "run"
    shutil.copytree(runs[fault.run], run)
    if fault.damage is not None:
        fault.damage(run, tmp_path)
    before = snapshot(tmp_path)
    if fault.api is not None:
        with pytest.raises(fault.exc) as info:
            fault.api(run, tmp_path)
        assert re.search(fault.error, str(info.value)), str(info.value)
        assert snapshot(tmp_path) == before
        return
    code = main(_fill(fault.argv, run, tmp_path))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    warned = [ln for ln in lines if ln.startswith("warning: ")]
    assert "Traceback" not in err
    if fault.warning is not None:
        assert any(re.search(fault.warning, ln) for ln in warned), err
    if fault.error is None:
        assert code == 0, err
        assert not errors
        after = snapshot(tmp_path)
        # A command that succeeds may add its outputs (a.png) but never changes the run.
        assert {k: v for k, v in after.items() if k.startswith("run")} == {
            k: v for k, v in before.items() if k.startswith("run")
        }
        return
    assert code == 2, err
    # The error is one line (the warnings that led to it may precede it): it names what and how.
    assert len(errors) == 1 and lines[-1] == errors[0] and len(lines) == 1 + len(warned), err
    assert re.search(fault.error, errors[0]), errors[0]
    assert snapshot(tmp_path) == before, "the failed command changed files on disk"


def test_catalogue_is_large_and_ids_are_unique():
    ids = [f.id for f in CATALOGUE] + [s[0] for s in SIGNALS]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 100


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
        "import sys, pathlib, difflora.generate as g\n"
        "orig = g.sample\n"
        "def marked(*a, **k):\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n"
        "    return orig(*a, **k)\n"
        "g.sample = marked\n"
        "from difflora.cli import main\n"
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
