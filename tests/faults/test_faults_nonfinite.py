"""Fault catalogue, part 4: NaN and inf in files a user hands difflora (issue 28, class 8).

Every reader of user tensors (checkpoints, adapter files, peft files) refuses a NaN or inf at load,
naming the file and the tensor (difflora.files.tensorfile.check_finite), as do non-finite numbers
in their JSON (a peft ``lora_alpha``): before, they loaded silently and every output was NaN.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faultkit import CK4, Fault, both, cases, check_fault, evaluate, forge, nan_weights, sample, write_tmp
from safetensors.torch import load_file, save_file
from torch import nn

from difflora.adapters import AdapterLoadError, load_adapters, save_adapters
from difflora.adapters.peft_format import PeftFormatError, import_peft
from difflora.model.build import build_model
from difflora.train import load_run_config
from difflora.train.checkpoint import CheckpointError, load_checkpoint, load_weights

NONFINITE = r"tensor '[^']+' holds \d+ NaN or infinite values of \d+"


def inf_weights(t: dict) -> dict:
    """One infinite value in the first floating tensor: a single bad number is enough to be refused."""
    out = dict(t)
    key = next(k for k, v in t.items() if v.is_floating_point())
    out[key] = t[key].clone().reshape(-1)
    out[key][0] = float("inf")
    out[key] = out[key].reshape(t[key].shape)
    return out


def _seeded_model(run: Path) -> nn.Module:
    torch.manual_seed(0)  # the same base weights at save and at load: the fingerprints match
    return build_model(load_run_config(run))


def adapter_dir_with(make) -> object:
    """Adapters saved from the task run's model into tmp/ad, their tensors then replaced by ``make``."""

    def damage(run: Path, tmp: Path) -> None:
        save_adapters(_seeded_model(run), tmp / "ad")
        path = tmp / "ad" / "adapters.safetensors"
        save_file(make(load_file(str(path))), str(path), metadata={"format": "pt"})

    return damage


def peft_dir(config: dict | None = None, b: float = 0.5) -> object:
    """A peft LoRA of the Linear "0" of :func:`_peft_base` in tmp/peft (``config`` overrides keys)."""

    def damage(run: Path, tmp: Path) -> None:
        d = tmp / "peft"
        d.mkdir()
        tensors = {
            "base_model.model.0.lora_A.weight": torch.ones(2, 4),
            "base_model.model.0.lora_B.weight": torch.full((4, 2), b),
        }
        save_file(tensors, str(d / "adapter_model.safetensors"))
        text = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0"], **(config or {})})
        (d / "adapter_config.json").write_text(text)  # json writes NaN / Infinity as they are

    return damage


def _peft_base() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4))


FAULTS = [
    # Checkpoints: sampling, evaluation and export read the weights; resume reads every file.
    Fault(
        "forged-ema-inf-sample",
        sample(),
        rf"step_0000004/ema\.safetensors: {NONFINITE}; pass --checkpoint",
        forge(CK4, "ema", inf_weights),
    ),
    Fault(
        "forged-ema-nan-eval",
        evaluate(),
        rf"step_0000004/ema\.safetensors: {NONFINITE}; pass --checkpoint",
        forge(CK4, "ema", nan_weights),
    ),
    Fault(
        "forged-ema-nan-export-peft",
        ("export-peft", "{run}", "{tmp}/peft"),
        rf"step_0000004/ema\.safetensors: {NONFINITE}",
        forge(CK4, "ema", nan_weights),
    ),
    Fault(
        "forged-model-nan-resume",
        ("train", "tiny-unet", "--out", "{run}", "--resume", "--set", "train.steps=6", "--no-progress"),
        rf"step_0000004/model\.safetensors: {NONFINITE}; pass --checkpoint",
        forge(CK4, "model", nan_weights),
    ),
    Fault(
        "forged-optim-inf-resume",
        ("train", "tiny-unet", "--out", "{run}", "--resume", "--set", "train.steps=6", "--no-progress"),
        rf"step_0000004/optim\.safetensors: {NONFINITE}; pass --checkpoint",
        forge(CK4, "optim", inf_weights),
    ),
    Fault(
        "api-load-checkpoint-nan-model",
        api=lambda run, tmp: load_checkpoint(run / CK4),
        exc=CheckpointError,
        error=rf"model\.safetensors: {NONFINITE}",
        damage=forge(CK4, "model", nan_weights),
    ),
    Fault(
        "api-load-weights-inf-ema",
        api=lambda run, tmp: load_weights(run / CK4),
        exc=CheckpointError,
        error=rf"ema\.safetensors: {NONFINITE}",
        damage=forge(CK4, "ema", inf_weights),
    ),
    # Adapter files.
    Fault(
        "adapter-weights-nan",
        api=lambda run, tmp: load_adapters(_seeded_model(run), tmp / "ad"),
        run="task",
        exc=AdapterLoadError,
        error=rf"ad/adapters\.safetensors: {NONFINITE}",
        damage=adapter_dir_with(nan_weights),
    ),
    Fault(
        "adapter-weights-inf",
        api=lambda run, tmp: load_adapters(_seeded_model(run), tmp / "ad"),
        run="task",
        exc=AdapterLoadError,
        error=rf"ad/adapters\.safetensors: {NONFINITE}",
        damage=adapter_dir_with(inf_weights),
    ),
    # peft files: the tensors, and alpha in the JSON (NaN and Infinity are read by json).
    Fault(
        "peft-weights-nan",
        api=lambda run, tmp: import_peft(_peft_base(), tmp / "peft"),
        exc=PeftFormatError,
        error=r"peft/adapter_model\.safetensors: tensor 'base_model\.model\.0\.lora_B\.weight' holds 8 NaN",
        damage=peft_dir(b=float("nan")),
    ),
    Fault(
        "peft-lora-alpha-nan",
        api=lambda run, tmp: import_peft(_peft_base(), tmp / "peft"),
        exc=PeftFormatError,
        error=r"peft/adapter_config\.json: the alpha of '0' \(lora_alpha / alpha_pattern\) is nan",
        damage=peft_dir({"lora_alpha": float("nan")}),
    ),
    Fault(
        "peft-alpha-pattern-inf",
        api=lambda run, tmp: import_peft(_peft_base(), tmp / "peft"),
        exc=PeftFormatError,
        error=r"the alpha of '0' \(lora_alpha / alpha_pattern\) is inf",
        damage=peft_dir({"alpha_pattern": {"0": float("inf")}}),
    ),
    Fault(
        "peft-lora-alpha-string",
        api=lambda run, tmp: import_peft(_peft_base(), tmp / "peft"),
        exc=PeftFormatError,
        error=r"the alpha of '0' \(lora_alpha / alpha_pattern\) is 'eight'",
        damage=peft_dir({"lora_alpha": "eight"}),
    ),
    Fault(
        "peft-weights-garbage-then-nan-config",
        api=lambda run, tmp: import_peft(_peft_base(), tmp / "peft"),
        exc=PeftFormatError,
        error=r"adapter_model\.safetensors is not a readable safetensors file",
        damage=both(peft_dir({"lora_alpha": float("nan")}), write_tmp("peft/adapter_model.safetensors", b"junk")),
    ),
]


@pytest.mark.parametrize("fault", cases(FAULTS))
def test_fault(fault, runs, tmp_path, capsys, monkeypatch):
    check_fault(fault, runs, tmp_path, capsys, monkeypatch)
