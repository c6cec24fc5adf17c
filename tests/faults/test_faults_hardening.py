"""Fault catalogue, part 6 (issue 28, classes 5, 13, 14 and the known gaps): huge values refused by
the memory estimate before any work (difflora.train.footprint), raw or misleading messages, and
inputs that used to be accepted in silence (a flag given twice, a negative count, an option that
cannot act on this run)."""

from __future__ import annotations

import sys

import pytest
from faultkit import Fault, cases, check_fault, evaluate, mkdir, params, sample, train, write_tmp

HUGE = 10**12
OUT = ("--out", "{tmp}/a.png", "--steps", "2", "--no-progress")
# A study of two tiny arms whose second cannot fit: refused before the first one trains.
STUDY = b"""name: s
seeds: [0]
eval: {num_samples: 20, steps: 2, guidance: [1]}
base:
  data: {name: digits}
  model: {num_classes: 0, learn_sigma: false, unet: {model_channels: 8, num_res_blocks: 1, attention_resolutions: [4], channel_mult: [1, 2]}}
  diffusion: {steps: 20}
  train: {steps: 2, batch_size: 4, device: cpu}
  sample: {num: 2, steps: 2}
arms:
  - {name: small}
  - {name: huge, set: {train.batch_size: 100000000}}
"""

MEMORY = [
    Fault(
        "train-huge-num-classes",
        train(f"model.num_classes={HUGE}"),
        r"^error: train needs about .* TB \(weights .* "
        r"is (available on this machine|DIFFLORA); shrink the model \(model\.num_classes",
    ),
    Fault(
        "train-huge-batch",
        train("train.batch_size=100000000"),
        r"train needs about .*activations at batch 100000000.*; lower train\.batch_size or raise train\.grad_accum",
    ),
    Fault(
        "train-huge-diffusion-steps",
        train(f"diffusion.steps={HUGE}"),
        r"train needs about .*diffusion tables .*; lower diffusion\.steps \(the largest part: diffusion tables\)",
    ),
    Fault(
        "train-huge-rank",
        train(f"model.adapters=[{{name: a, condition: y, weighting: index, num_values: 10, rank: {HUGE}}}]"),
        r"train needs about .* TB .*shrink the model .*adapter ranks",
    ),
    Fault(
        "train-huge-channels",
        train("model.unet.model_channels=10000000"),
        r"train needs about .* TB .*shrink the model",
    ),
    Fault(
        "train-huge-context-tokens",
        train("model.attention=cross", f"model.context.tokens={HUGE}"),
        r"train needs about [\d.]+ TB .*activations at batch 16",
    ),
    Fault(
        "train-huge-image",
        train("data.image_size=1024", "train.batch_size=100000"),
        r"train needs about .*activations at batch 100000",
    ),
    Fault(
        "sample-huge-num",
        ("sample", "{run}", "--num", str(HUGE), *OUT),
        rf"sample --num {HUGE} needs about .*{HUGE} samples.*; draw fewer samples",
    ),
    Fault(
        "eval-huge-num-samples",
        ("eval", "{run}", "--num-samples", str(HUGE), "--steps", "2", "--no-progress", "--cache-dir", "{tmp}/c"),
        rf"eval of {HUGE} samples needs about .*draw fewer samples",
    ),
    Fault(
        "demo-huge-eval-samples",
        ("demo", "--out", "{tmp}/demo", "--eval-samples", str(HUGE), "--no-progress"),
        rf"demo --eval-samples {HUGE} needs about .*draw fewer samples",
    ),
    Fault(
        "distill-huge-batch",
        ("distill", "{run}", "--out", "{tmp}/d", "--set", "train.batch_size=100000000", "--no-progress"),
        r"train needs about .*activations at batch 100000000",
    ),
    Fault(
        "pretrain-huge-batch",
        ("pretrain", "fmnist16-unet", "--set", "train.batch_size=100000000", "--no-progress"),
        r"train needs about .*activations at batch 100000000",
    ),
    Fault(
        "study-huge-arm-before-the-first-trains",
        ("study", "{tmp}/s.yaml", "--out", "{tmp}/st", "--allow-dirty", "--no-progress"),
        r"study arm huge needs about .*activations at batch 100000000",
        damage=write_tmp("s.yaml", STUDY),
    ),
]

REPEATED = [
    Fault(
        "sample-num-twice", ("sample", "{run}", "--num", "2", "--num", "3", *OUT), r"--num given twice; give it once"
    ),
    Fault(
        "sample-switch-twice",
        ("sample", "{run}", "--out", "{tmp}/a.png", "--no-progress", "--no-progress"),
        r"--no-progress given twice; give it once",
    ),
    Fault("train-set-key-twice", train("train.lr=1", "train.lr=2"), r"--set train\.lr given twice; give it once"),
    Fault(
        "sample-condition-twice",
        sample("--condition", "task=1", "--condition", "task=2"),
        r"--condition task given twice; give it once",
        run="task",
    ),
    Fault("eval-guidance-twice", evaluate("--guidance", "1", "--guidance", "2"), r"--guidance given twice"),
    Fault(
        "sample-seed-negative", sample("--seed=-1"), r"argument --seed: expected an integer greater than or equal to 0"
    ),
    Fault(
        "eval-task-negative", evaluate("--task=-1"), r"argument --task: expected an integer greater than or equal to 0"
    ),
    Fault(
        "eval-seed-negative", evaluate("--seed=-4"), r"argument --seed: expected an integer greater than or equal to 0"
    ),
]

INAPPLICABLE = [
    Fault(
        "sample-guidance-fraction-unguided",
        sample("--guidance-fraction", "0.5"),
        r"--guidance-fraction does not apply here: guidance is 1 \(no guided steps to select\); remove it",
    ),
    Fault(
        "sample-condition-images-not-spatial",
        sample("--condition-images", "{tmp}/x.safetensors"),
        r"--condition-images does not apply here: the run has no spatial tasks \(data\.spatial\); remove it",
    ),
    Fault(
        "eval-guidance-fraction-unguided",
        evaluate("--guidance-fraction", "0.3"),
        r"--guidance-fraction does not apply here: every guidance scale is 1",
    ),
    Fault(
        "eval-feature-steps-with-a-feature-net",
        evaluate("--feature-net", "{tmp}/fn", "--feature-steps", "3"),
        r"--feature-steps does not apply here: --feature-net is given",
    ),
    Fault(
        "study-plan-report-only",
        ("study", "{tmp}/s.yaml", "--plan", "--report-only"),
        r"--report-only does not apply here: --plan writes nothing; remove it",
    ),
    Fault(
        "train-distill-key-without-distillation",
        train("distill.rank=4"),
        r"distill\.rank=4 cannot take effect: train\.objective=diffusion .*; remove distill\.rank$",
    ),
    Fault(
        "params-context-under-self-attention",
        params("model.context.tokens=4"),
        r"model\.context\.tokens=4 cannot take effect: model\.attention=self",
    ),
    Fault(
        "params-sample-steps-over-diffusion",
        params("sample.steps=200"),
        r"sample\.steps \(200\) exceeds diffusion\.steps \(100\): .*set sample\.steps to at most 100$",
    ),
    Fault("params-sample-steps-held-at-diffusion", params("diffusion.steps=20", "model.num_classes=0"), None),
]

MESSAGES = [
    Fault(
        "sample-out-under-a-file",
        ("sample", "{run}", "--num", "2", "--out", "{tmp}/f/a.png", "--steps", "2", "--no-progress"),
        r"^error: cannot use .*/f: a file is in the way of a directory there",
        damage=write_tmp("f", b"x"),
    ),
    Fault(
        "runs-csv-is-a-directory",
        ("runs", "{run}", "--csv", "{tmp}/d"),
        r"cannot use .*/d: it is a directory: name a file",
        damage=mkdir("d"),
    ),
    Fault(
        "train-features-cache-is-a-file",
        ("train-features", "digits", "--cache-dir", "{tmp}/f", "--no-progress"),
        r"cannot use .*/f: a file is in the way of a directory",
        damage=write_tmp("f", b"x"),
    ),
    Fault(
        "params-config-is-a-directory",
        ("params", "{tmp}/d"),
        r"config .*/d is a directory; give a YAML config file",
        damage=mkdir("d"),
    ),
    Fault(
        "train-config-is-a-run",
        ("train", "{run}", "--out", "{tmp}/x"),
        r"config .*run is a run directory: its config is .*run/config\.json",
    ),
    Fault(
        "set-list-index-on-an-empty-list",
        params("model.adapters.0.rank=8"),
        r"model\.adapters\.0\.rank: model\.adapters is an empty list; give the whole list instead: model\.adapters=\[\.\.\.\]",
    ),
    Fault(
        "set-list-index-out-of-range",
        params(
            "model.adapters=[{name: a, condition: y, weighting: index, num_values: 10, rank: 2}]",
            "model.adapters.1.rank=8",
        ),
        r"model\.adapters is a list of 1 entries \(index 0\.\.0\)",
    ),
    Fault(
        "set-list-index",
        params(
            "model.adapters=[{name: a, condition: y, weighting: index, num_values: 10, rank: 2}]",
            "model.adapters.0.rank=8",
        ),
        None,
    ),
    Fault(
        "set-under-a-value",
        params("train.lr.x=1"),
        r"train\.lr\.x: 'lr' is a value, not a section \(train\.lr = 0\.001\)",
    ),
    Fault(
        "sample-condition-none-read",
        sample("--condition", "guidance=2"),
        r"--condition guidance: no adapter of this run reads it \(it reads no condition but t and y\); remove it",
    ),
    Fault(
        "export-peft-no-adapter",
        ("export-peft", "{run}", "{tmp}/p"),
        r"the model has no adapter: only a run with a plain LoRA",
    ),
]
if sys.platform == "linux":  # a path the OS refuses to create files in, whoever runs the tests
    MESSAGES += [
        Fault(
            "sample-out-read-only",
            ("sample", "{run}", "--num", "2", "--out", "/proc/a.png", "--steps", "2", "--no-progress"),
            r"^error: cannot use /proc/a\.png: ",
        ),
        Fault(
            "params-config-unreadable",
            ("params", "/proc/self/mem"),
            r"/proc/self/mem: cannot read it \(input/output error\)",
        ),
    ]

CASES = MEMORY + REPEATED + INAPPLICABLE + MESSAGES


@pytest.mark.parametrize("fault", cases(CASES))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
