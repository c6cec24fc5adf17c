"""Fault catalogue, part 2: config files, --set overrides, and train (devices, resume, data files)."""

from __future__ import annotations

import pytest
from faultkit import (
    CK2,
    CK4,
    TASK_ADAPTER,
    Fault,
    both,
    cases,
    check_fault,
    flip_byte,
    idx_labels,
    mkdir,
    params,
    sample,
    train,
    write,
    write_tmp,
)

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
    Fault(
        "set-arch-unknown", params("model.arch=resnet"), r"model\.arch: input should be 'unet', 'dit' or 'diffusers'"
    ),
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

# Issue 28 class 3: a value that cannot take effect is refused (config.hold_fixed), naming the key.
HELD = [
    *[
        Fault(
            f"set-dit-preset-{key.replace('_', '-')}",
            params("model.arch=dit", "model.dit.preset=DiT-T/2", f"model.dit.{key}={value}"),
            rf"model\.dit\.{key}={value} cannot take effect: model\.dit\.preset=DiT-T/2 holds it at {held}; "
            rf"remove model\.dit\.{key}$",
        )
        for key, value, held in (("depth", 3, 2), ("hidden_size", 96, 64), ("num_heads", 4, 2), ("patch_size", 4, 2))
    ],
    Fault(
        "set-dit-preset-unknown",
        params("model.arch=dit", "model.dit.preset=DiT-Q/2"),
        r"model\.dit\.preset: unknown preset 'DiT-Q/2'; choose one of DiT-XL/2",
    ),
    Fault(
        "set-unet-under-diffusers",
        params("model.arch=diffusers"),
        r"model\.unet\.model_channels=16 cannot take effect: model\.arch=diffusers holds it at 128",
    ),
    Fault(
        "set-diffusers-under-unet",
        params("model.diffusers.class_name=DiTTransformer2DModel"),
        r"model\.diffusers\.class_name='DiTTransformer2DModel' cannot take effect: model\.arch=unet",
    ),
    Fault(
        "set-eta-ddpm",
        params("sample.sampler=ddpm", "sample.eta=0.5"),
        r"sample\.eta=0\.5 cannot take effect: sample\.sampler=ddpm holds it at 0\.0; remove sample\.eta$",
    ),
    Fault(
        "set-init-weights-without-init-from",
        params("train.init_weights=model"),
        r"train\.init_weights='model' cannot take effect: train\.init_from=None",
    ),
    Fault(
        "set-token-lr-without-new-tokens",
        params("train.token_lr=0.01"),
        r"train\.token_lr=0\.01 cannot take effect: model\.context\.new_tokens=None",
    ),
    Fault(
        "set-base-groups-with-train-base",
        params("train.base_groups=[bias]"),
        r"train\.base_groups=\['bias'\] cannot take effect: train\.train_base=true .*set train\.train_base=false",
    ),
    Fault(
        "set-label-dropout-distill",
        ("params", "distill/digits", "--set", "train.label_dropout=0.2"),
        r"train\.label_dropout=0\.2 cannot take effect: train\.objective=distill",
    ),
    *[
        Fault(
            f"set-adapter-{key}-{form}",
            params(f"model.adapters=[{{name: a, form: {form}, weighting: index, num_values: 100, {key}: {value}}}]"),
            rf"model\.adapters\[a\]\.{key}={shown} cannot take effect: form {form} \(",
        )
        for key, form, value, shown in (
            ("alpha", "scale", 8, "8\\.0"),
            ("activation", "lowrank", "identity", "'identity'"),
            ("kernel", "shift", "1x1", "'1x1'"),
            ("scale", "lowrank", 2, "2\\.0"),
        )
    ],
    Fault(
        "sample-eta-ddpm",
        sample("--sampler", "ddpm", "--eta", "0.5"),
        r"sample\.eta=0\.5 cannot take effect: sample\.sampler=ddpm holds it at 0\.0",
    ),
]

# Issue 28 class 10: every config error is found before the first step (before any file is written).
EARLY = [
    Fault(
        "train-task-adapter-no-task-data",
        train(TASK_ADAPTER),
        r"model\.adapters\[task\]\.condition=task: no batch of this run carries 'task' \(they carry t, y\); "
        r"set data\.task_id=K",
    ),
    Fault(
        "train-adapter-condition-unknown",
        train(TASK_ADAPTER.replace("condition: task", "condition: colour")),
        r"model\.adapters\[task\]\.condition=colour: no batch of this run carries 'colour'",
    ),
    Fault(
        "train-affiner-condition-unknown",
        train("model.affiner={tasks: 2, condition: colour}", "train.train_base=false"),
        r"model\.affiner\.condition=colour: no batch of this run carries 'colour'",
    ),
    Fault(
        "demo-eval-samples-too-few",
        ("demo", "--out", "{tmp}/demo", "--eval-samples", "2"),
        r"--eval-samples must be 0 \(no evaluation\) or at least 4, got 2$",
    ),
    Fault(
        "demo-eval-samples-negative",
        ("demo", "--out", "{tmp}/demo", "--eval-samples", "-1"),
        r"--eval-samples must be 0 \(no evaluation\) or at least 4, got -1$",
    ),
    Fault(
        "demo-eval-steps-over-diffusion",
        ("demo", "--out", "{tmp}/demo", "--set", "diffusion.steps=10"),
        # The demo has no --steps: the key that sets the steps is named (issue 28, known gap).
        r"sample\.steps \(100\) exceeds diffusion\.steps \(10\): .*set sample\.steps to at most 10$",
    ),
    Fault(
        "diffusers-dit-patch",
        ("params", "{tmp}/c.yaml"),
        r"model\.diffusers\.config\.patch_size \(3\) must be a positive integer dividing model\.image_size \(8\)",
        damage=write_tmp(
            "c.yaml",
            b"model:\n  arch: diffusers\n  learn_sigma: false\n  diffusers:\n    class_name: DiTTransformer2DModel\n"
            b"    config: {patch_size: 3, num_layers: 1}\ndiffusion: {loss: mse}\n",
        ),
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


STUDIES = [
    Fault("study-missing", ("study", "{tmp}/nope.yaml"), r"study file .*nope\.yaml does not exist"),
    Fault(
        "study-bad-yaml",
        ("study", "{tmp}/s.yaml"),
        r"s\.yaml is not valid YAML",
        damage=write_tmp("s.yaml", b"arms: [1,\n"),
    ),
    Fault(
        "study-no-arms",
        ("study", "{tmp}/s.yaml"),
        r"invalid study .*s\.yaml: arms: Field required",
        damage=write_tmp("s.yaml", b"name: x\n"),
    ),
    Fault(
        "study-unknown-key",
        ("study", "{tmp}/s.yaml"),
        r"foo: unknown key",
        damage=write_tmp("s.yaml", b"name: x\nfoo: 1\n"),
    ),
    Fault(
        "study-eval-seed-misspelt",
        ("study", "{tmp}/s.yaml"),
        r"eval\.seed: a sampling seed \(an integer >= 0\) or per_run \(each run's own seed\), got 'per-run'",
        damage=write_tmp("s.yaml", b"name: x\neval: {seed: per-run}\narms: [{name: a}]\n"),
    ),
    Fault(
        "adapter-up-init-outside-position",
        params("model.adapters=[{name: a, weighting: index, num_values: 100, up_init: linear}]"),
        r"up_init",
    ),
    Fault(
        "adapter-targets-match-nothing",
        params("model.adapters=[{name: a, weighting: index, num_values: 100, targets: [nothing_here]}]"),
        r"adapter targets matched no module: 'nothing_here'",
    ),
]

CASES = CONFIG + HELD + TRAIN + EARLY + STUDIES


@pytest.mark.parametrize("fault", cases(CASES))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
