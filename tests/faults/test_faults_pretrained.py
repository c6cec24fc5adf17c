"""Fault catalogue: pretrained diffusers folders (model.pretrained, train.init_from) that cannot be a base.

Each case writes a tiny pixel UNet2DModel pipeline into the case's directory, damages it, and runs
``params`` or ``train`` on a config naming it: one ``error:`` line, exit code 2, nothing on disk
changed (no run directory, no file in the folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from faultkit import Fault, cases, check_fault

pytest.importorskip("diffusers")

from pretrained_folders import unet_pipeline  # noqa: E402

LORA = {"name": "time", "condition": "t", "weighting": "linear", "num_values": 100, "num_bases": 3, "rank": 2}


def folder(*edits):
    """A damage: the pipeline {tmp}/pipe, edited, and {tmp}/c.yaml adapting it."""

    def damage(run: Path, tmp: Path) -> None:
        pipe = unet_pipeline(tmp / "pipe")
        for edit in edits:
            edit(pipe)
        tree = {"model": {"pretrained": str(pipe), "adapters": [LORA]}, "train": {"train_base": False, "steps": 2}}
        (tmp / "c.yaml").write_text(yaml.safe_dump(tree))

    return damage


def edit(rel: str, **changes):
    def apply(pipe: Path) -> None:
        path = pipe / rel
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))

    return apply


def pickle_only(pipe: Path) -> None:
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (pipe / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def not_a_pipeline(pipe: Path) -> None:
    (pipe / "model_index.json").unlink()


def no_scheduler(pipe: Path) -> None:
    (pipe / "scheduler" / "scheduler_config.json").unlink()


def with_vae(pipe: Path) -> None:
    edit("model_index.json", vae=["diffusers", "AutoencoderKL"])(pipe)


PARAMS = ("params", "{tmp}/c.yaml")
TRAIN = ("train", "{tmp}/c.yaml", "--out", "{tmp}/new", "--no-progress")

CASES = [
    Fault(
        "pretrained-neither-model-nor-pipeline",
        PARAMS,
        r"pipe is neither a diffusers model folder \(config\.json with _class_name\) nor a pipeline folder",
        damage=folder(not_a_pipeline),
    ),
    Fault(
        "pretrained-missing",
        (*PARAMS, "--set", "model.pretrained={tmp}/nowhere"),
        r"model\.pretrained: .*nowhere does not exist \(give a diffusers model or pipeline folder\)",
        damage=folder(),
    ),
    Fault(
        "pretrained-unsupported-class",
        PARAMS,
        r"holds a UNet1DModel; difflora adapts UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel$",
        damage=folder(edit("unet/config.json", _class_name="UNet1DModel")),
    ),
    Fault(
        "pretrained-unsupported-scheduler",
        PARAMS,
        r"scheduler: its scheduler is a FlowMatchEulerDiscreteScheduler; difflora reads the noise process of DDPMScheduler",
        damage=folder(edit("scheduler/scheduler_config.json", _class_name="FlowMatchEulerDiscreteScheduler")),
    ),
    Fault(
        "pretrained-unsupported-beta-schedule",
        PARAMS,
        r"beta_schedule 'sigmoid' is not supported \(supported: linear, scaled_linear, squaredcos_cap_v2\)",
        damage=folder(edit("scheduler/scheduler_config.json", beta_schedule="sigmoid")),
    ),
    Fault(
        "pretrained-unsupported-prediction-type",
        PARAMS,
        r"prediction_type 'sample' is not supported \(supported: epsilon, v_prediction\)",
        damage=folder(edit("scheduler/scheduler_config.json", prediction_type="sample")),
    ),
    Fault(
        "pretrained-learned-variance-without-channels",
        PARAMS,
        r"variance_type 'learned_range': its model has no variance channels",
        damage=folder(edit("scheduler/scheduler_config.json", variance_type="learned_range")),
    ),
    Fault(
        "pretrained-pipeline-without-scheduler",
        PARAMS,
        r"pipe has no scheduler/scheduler_config\.json .*or point model\.pretrained at .*pipe/unet$",
        damage=folder(no_scheduler),
    ),
    Fault(
        "pretrained-pickle-only",
        TRAIN,
        r"holds pickle weights only \(diffusion_pytorch_model\.bin\); difflora reads safetensors only",
        damage=folder(pickle_only),
    ),
    Fault(
        "pretrained-resolution",
        (*PARAMS, "--set", "data.image_size=9"),
        r"model\.image_size \(9\) cannot be taken by this UNet2DModel: its 2 blocks need a multiple of 2",
        damage=folder(),
    ),
    Fault(
        "pretrained-restated-architecture",
        (*PARAMS, "--set", "model.learn_sigma=true"),
        r"model\.learn_sigma=True contradicts the pretrained folder .*pipe, which gives False; remove model\.learn_sigma",
        damage=folder(),
    ),
    Fault(
        "pretrained-latent-pipeline",
        PARAMS,
        r"pipe lists a vae but has no vae/config\.json; re-save the pipeline with save_pretrained",
        damage=folder(with_vae),
    ),
]


@pytest.mark.parametrize("fault", cases(CASES))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
