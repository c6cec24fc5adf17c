"""The training loop: learning, exact resume, atomic checkpoints, divergence."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from difflora.train import CheckpointError, TrainingDiverged, latest_checkpoint, load_checkpoint, train
from difflora.train.checkpoint import optimizer_from_tensors, optimizer_to_tensors


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["mse"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_few_hundred_steps_on_digits_lower_the_loss(tmp_path, tiny_config):
    cfg = tiny_config(
        "tiny-unet", "train.steps=300", "train.batch_size=32", "train.log_every=1", "train.ckpt_every=300"
    )
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    mse = _losses(tmp_path / "run")
    # The fresh net outputs zeros (zero-initialised output conv), so the first epsilon-MSE is
    # E[eps^2] = 1 up to sampling noise; training must bring it far below.
    assert mse[0] == pytest.approx(1.0, abs=0.1)
    assert sum(mse[-50:]) / 50 < 0.3
    assert (tmp_path / "run" / "samples" / "step_0000300.png").is_file()
    acc = json.loads((tmp_path / "run" / "accounting.json").read_text())
    assert acc["parameters"]["total"] == acc["parameters"]["trainable"] > 0
    assert acc["train_images_per_s"] > 0


def test_resume_is_bit_identical(tmp_path, tiny_config):
    cfg = tiny_config("tiny-unet", "train.steps=12", "train.ckpt_every=4", "model.unet.dropout=0.2", "data.hflip=true")
    train(cfg, tmp_path / "straight", progress=False, log=lambda s: None)
    train(cfg, tmp_path / "cut", progress=False, stop_at=6, log=lambda s: None)
    assert load_checkpoint(latest_checkpoint(tmp_path / "cut")).step == 6
    train(cfg, tmp_path / "cut", resume=True, progress=False, log=lambda s: None)
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "cut"))
    assert a.step == b.step == 12
    for name in ("model", "ema"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs after resume"


def test_checkpoint_cut_short_is_rejected(tmp_path, tiny_config):
    train(tiny_config("tiny-unet", "train.steps=4", "train.ckpt_every=4"), tmp_path / "run", progress=False)
    ckpt = latest_checkpoint(tmp_path / "run")
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut short or corrupt"):
        load_checkpoint(ckpt)
    (ckpt / "state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: state.json is missing"):
        load_checkpoint(ckpt)


def test_temp_directories_are_not_checkpoints(tmp_path, tiny_config):
    train(tiny_config("tiny-unet", "train.steps=4", "train.ckpt_every=2"), tmp_path / "run", progress=False)
    (tmp_path / "run" / "checkpoints" / ".tmp-step_0000006").mkdir()
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config):
    # lr = 1e30 blows the weights up after the first update; the loss becomes inf/nan soon after.
    cfg = tiny_config("tiny-unet", "train.steps=50", "train.ckpt_every=1", "train.lr=1e30", "train.grad_clip=0")
    with pytest.raises(TrainingDiverged, match=r"kept the last good checkpoint step \d+"):
        train(cfg, tmp_path / "run", progress=False)
    good = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert all(torch.isfinite(v).all() for v in good.model.values())


def test_existing_run_needs_resume(tmp_path, tiny_config):
    train(tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2"), tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(tiny_config("tiny-unet", "train.steps=2"), tmp_path / "run", progress=False)


def test_resume_with_another_config_is_refused(tmp_path, tiny_config):
    train(tiny_config("tiny-unet", "train.steps=2", "train.ckpt_every=2"), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="train.lr"):
        train(tiny_config("tiny-unet", "train.steps=4", "train.lr=0.5"), tmp_path / "run", resume=True, progress=False)


def test_resume_reads_the_saved_config_with_todays_defaults(tiny_config):
    from difflora.config.schema import config_to_dict
    from difflora.train.loop import _check_resume_config

    cfg = tiny_config("tiny-unet", "train.steps=2")
    saved = config_to_dict(cfg)
    # A run started before a (nested) key existed ran with its default: it resumes.
    saved["model"]["context"] = {k: v for k, v in saved["model"]["context"].items() if k != "new_tokens"}
    _check_resume_config(saved, cfg)
    saved["train"]["lr"] = 0.5
    with pytest.raises(ValueError, match="train.lr"):
        _check_resume_config(saved, cfg)


def test_optimizer_state_round_trips_through_tensors():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    tensors, meta = optimizer_to_tensors(opt)
    json.dumps(meta)  # hyper-parameters must be JSON, never pickled
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    opt2.load_state_dict(optimizer_from_tensors(tensors, meta))
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    for k in s1:
        assert torch.equal(torch.as_tensor(s1[k]), torch.as_tensor(s2[k]))


def test_bad_data_leaves_no_run_behind(tmp_path, tiny_config):
    with pytest.raises(FileNotFoundError):
        train(tiny_config("tiny-unet", "data.name=cifar10", f"data.root={tmp_path}"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_resumed_metrics_have_each_step_once(tmp_path, tiny_config):
    cfg = tiny_config("tiny-unet", "train.steps=8", "train.ckpt_every=4", "train.log_every=1")
    train(cfg, tmp_path / "run", progress=False, stop_at=6)  # checkpoints at 4 and 6
    # A crash after step 6 whose checkpoint never landed: steps 5 and 6 are redone from step 4.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_0000006")
    train(cfg, tmp_path / "run", resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
