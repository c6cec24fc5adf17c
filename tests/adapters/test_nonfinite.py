"""NaN and inf are refused where adapters are loaded or built (issue 28, class 8): tensors in adapter
files (difflora.files.tensorfile.check_finite, shared with peft files and checkpoints) and the
numbers of an adapter's spec (alpha, a position adapter's scale), naming what is not finite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difflora.adapters import (
    AdapterLoadError,
    IndexWeighting,
    LinearWeighting,
    PositionAdapter,
    inject_adapter,
    load_adapters,
    make_branch,
    save_adapters,
)
from difflora.adapters.router import Geometry
from difflora.files.tensorfile import check_finite
from difflora.nets.unet import ResBlock


class Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)


def test_check_finite_names_the_first_bad_tensor():
    good = torch.zeros(3)
    check_finite({"a": good, "ids": torch.tensor([1, 2])}, "f", "fix")
    with pytest.raises(ValueError, match=r"^f: tensor 'b' holds 2 NaN or infinite values of 3; fix$"):
        check_finite({"a": good, "b": torch.tensor([float("nan"), 1.0, -float("inf")])}, "f", "fix")


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_a_lowrank_alpha_must_be_finite(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        make_branch("lowrank", IndexWeighting(1), "lora", Geometry("linear", 4, 4), 2, alpha)


def test_a_position_adapter_scale_must_be_finite():
    with pytest.raises(ValueError, match="scale must be a finite number, got inf"):
        PositionAdapter(ResBlock(4, None, 0.0, 4), "pa", IndexWeighting(2), "task", "in", "out", scale=float("inf"))


def _saved(tmp_path: Path) -> tuple[Layers, Path]:
    torch.manual_seed(0)
    model = Layers()
    inject_adapter(model, "lora", lambda: IndexWeighting(2), "task", ["a", "b"])
    save_adapters(model, tmp_path / "ad")
    return model, tmp_path / "ad"


def test_an_adapter_file_with_nan_changes_no_adapter(tmp_path: Path):
    model, directory = _saved(tmp_path)
    path = directory / "adapters.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[-1]
    tensors[key][0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=rf"adapters\.safetensors: tensor '{key}' holds \d+ NaN"):
        load_adapters(model, directory)  # into the model that has them: values would be overwritten
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_adapter_config_with_nan_alpha_is_refused(tmp_path: Path):
    _, directory = _saved(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["adapters"][0]["alpha"] = float("nan")
    (directory / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    fresh = Layers()
    names = list(fresh.state_dict())
    with pytest.raises(AdapterLoadError, match="invalid spec .*alpha must be a finite number"):
        load_adapters(fresh, directory)
    assert list(fresh.state_dict()) == names


@pytest.mark.parametrize(("low", "high"), [(-float("inf"), 10.0), (0.0, float("inf")), (float("nan"), 10.0)])
def test_a_linear_weighting_range_must_be_finite(low, high):
    with pytest.raises(ValueError, match="need finite high > low"):
        LinearWeighting(4, low, high)
