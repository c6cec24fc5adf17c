"""Safetensors files difflora writes get the mode any new file gets from the umask (safetensors
alone leaves 0600), checked on the helper and on the writers of checkpoints and adapter files."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from difflora.adapters import save_adapters
from difflora.files.tensorfile import save_tensors
from difflora.model.build import build_model
from difflora.train.checkpoint import save_checkpoint


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_save_tensors_gives_the_mode_open_would(umask, tmp_path):
    save_tensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    with open(tmp_path / "plain", "w"):
        pass
    assert _mode(tmp_path / "x.safetensors") == _mode(tmp_path / "plain") == 0o666 & ~umask


def test_checkpoints_and_adapter_files_are_readable_as_the_umask_allows(umask, tmp_path, tiny_config):
    cfg = tiny_config("tiny-unet", "model.adapters=[{name: lora, condition: t, weighting: shared}]")
    model = build_model(cfg)
    state = model.state_dict()
    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_checkpoint(tmp_path / "run", 1, model=state, ema=state, optimizer=opt, rng={}, meta={})
    adapters = save_adapters(model.net, tmp_path / "adapters")
    files = [*ckpt.glob("*.safetensors"), *adapters.glob("*.safetensors")]
    assert len(files) == 5
    assert {_mode(f) for f in files} == {0o666 & ~umask}
