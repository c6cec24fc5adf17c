"""Fault catalogue, part 1: command-line flags of sample and eval, --condition, train-features, combine-tasks."""

from __future__ import annotations

import pytest
from faultkit import (
    CK2,
    CK4,
    Fault,
    both,
    cases,
    check_fault,
    evaluate,
    mkdir,
    remove,
    sample,
    write_tmp,
)

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
    Fault(
        "sample-out-dir-not-empty",
        sample("--out-dir", "{tmp}/pngs"),
        r"pngs is not empty; choose another directory or pass --overwrite",
        damage=write_tmp("pngs/000000.png", b"mine"),
    ),
    Fault(
        "sample-out-dir-is-a-file",
        sample("--out-dir", "{tmp}/pngs"),
        r"pngs is a file; name a directory",
        damage=write_tmp("pngs", b"x"),
    ),
    Fault("sample-npz-npy", sample("--npz", "{tmp}/a.npy"), r"--npz must name a \.npz file"),
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

COMBINE = [
    Fault("combine-tasks-one-run", ("combine-tasks", "{run}", "--out", "{tmp}/c"), r"needs at least two runs"),
    Fault(
        "combine-tasks-full-run",
        ("combine-tasks", "{run}", "{run}", "--out", "{tmp}/c"),
        r"run stores every weight of its model .* only runs that adapt a shared base",
    ),
    Fault(
        "combine-tasks-not-a-run",
        ("combine-tasks", "{tmp}/nowhere", "{run}", "--out", "{tmp}/c"),
        r"nowhere is not a difflora run directory",
    ),
    Fault("combine-tasks-out-exists", ("combine-tasks", "{run}", "{run}", "--out", "{run}"), r"already exists"),
    Fault("combine-tasks-no-out", ("combine-tasks", "{run}", "{run}"), r"required: --out"),
]


CASES = FLAGS + CONDITIONS + EVAL + COMBINE


@pytest.mark.parametrize("fault", cases(CASES))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
