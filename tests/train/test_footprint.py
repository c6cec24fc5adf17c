"""Issue 28 class 5: what a command will allocate is estimated before anything is built, and what
cannot fit is refused with one line (difflora.train.footprint).

The references are independent of the estimator: parameter counts of the really built model, byte
sums written out by hand, and the peak resident memory a fresh process really reaches (Linux's
VmHWM, reset through /proc/self/clear_refs) while it trains or samples the same config.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflora.model.build import build_model
from difflora.train.footprint import (
    BUDGET_ENV,
    MemoryRefused,
    available_memory,
    check_memory,
    estimate,
    format_bytes,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["tiny-unet", "tiny-dit", "tiny-tclora-unet", "tiny-cross-dit"])
def test_the_weights_are_the_built_models_parameters_and_buffers_exactly(tiny_config, preset):
    cfg = tiny_config(preset)
    model = build_model(cfg)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    assert estimate(cfg).parts["weights"] == sum(t.numel() * t.element_size() for t in tensors)


def test_training_state_is_four_floats_per_trainable_parameter(tiny_config):
    cfg = tiny_config("tiny-tclora-unet", "train.train_base=false")
    trainable = sum(p.numel() for p in build_model(cfg).parameters() if p.requires_grad)
    assert estimate(cfg, train_batch=4).parts["training state"] == 4 * 4 * trainable


def test_samples_are_three_float_copies_of_every_image(tiny_config):
    cfg = tiny_config("tiny-unet")  # 8 x 8 x 1 digits
    fp = estimate(cfg, samples=1000, sample_batch=10)
    assert fp.parts["1000 samples"] == 3 * 1000 * 8 * 8 * 4


def test_activations_grow_with_the_batch_and_the_image(tiny_config):
    cfg = tiny_config("tiny-unet")
    small = estimate(cfg, train_batch=8).parts["activations at batch 8"]
    big = estimate(cfg, train_batch=64).parts["activations at batch 64"]
    assert 7 < big / small <= 8.1  # linear in the batch, up to batch-independent tensors
    wide = tiny_config("tiny-unet", "data.image_size=16")
    assert (
        estimate(wide, train_batch=8).parts["activations at batch 8"] > 2.5 * small
    )  # four times the pixels; the attention sites stay at 4 x 4


def test_diffusion_tables_scale_with_the_number_of_steps(tiny_config):
    short = estimate(tiny_config("tiny-unet")).parts["diffusion tables"]  # 100 steps
    long = estimate(tiny_config("tiny-unet", "diffusion.steps=1000000")).parts["diffusion tables"]
    assert long == pytest.approx(short * 10000, rel=1e-6)


def test_the_budget_comes_from_the_environment_or_the_machine(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "1.5G")
    assert available_memory(torch.device("cpu")) == (int(1.5 * 2**30), f"{BUDGET_ENV}=1.5G")
    monkeypatch.setenv(BUDGET_ENV, "off")
    assert available_memory(torch.device("cpu"))[0] is None
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=rf"{BUDGET_ENV}='lots': give a size such as 16G"):
        available_memory(torch.device("cpu"))
    monkeypatch.delenv(BUDGET_ENV)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():  # the machine's own number, within what other processes change meanwhile
        have = (
            int(next(ln.split()[1] for ln in meminfo.read_text().splitlines() if ln.startswith("MemAvailable"))) * 1024
        )
        assert available_memory(torch.device("cpu"))[0] == pytest.approx(have, rel=0.2)


def test_a_command_that_cannot_fit_is_refused_naming_the_estimate_the_memory_and_the_knob(tiny_config, monkeypatch):
    cfg = tiny_config("tiny-unet")
    monkeypatch.setenv(BUDGET_ENV, "64M")
    check_memory(cfg, "cpu", "train", train_batch=16)  # fits
    with pytest.raises(
        MemoryRefused,
        match=r"^train needs about .* GB \(weights .*activations at batch 100000 .*\) "
        r"but 64\.0 MB is DIFFLORA_MEMORY_BUDGET=64M; lower train\.batch_size or raise train\.grad_accum",
    ):
        check_memory(cfg, "cpu", "train", train_batch=100000)
    with pytest.raises(MemoryRefused, match=r"draw fewer samples \(the largest part: 10000000 samples\)"):
        check_memory(cfg, "cpu", "sample --num 10000000", samples=10_000_000)
    huge = tiny_config("tiny-unet", "model.num_classes=1000000000")
    with pytest.raises(MemoryRefused, match=r"shrink the model .*model\.num_classes"):
        check_memory(huge, "cpu", "train", train_batch=16)


def test_format_bytes():
    assert [format_bytes(n) for n in (5, 2048, 3 * 2**30)] == ["5 B", "2.0 KB", "3.0 GB"]


# The measured peak: a fresh process resets its high-water mark, builds and trains (or samples) the
# config, and reports how far its resident memory rose. (name, mode, batch, overrides)
MEASURED = [
    ("tiny-unet", "train", 1024, []),
    ("tiny-dit", "train", 1024, []),
    ("tiny-unet", "train", 64, ["model.unet.model_channels=64", "data.image_size=32"]),
    ("tiny-dit", "sample", 4096, ["sample.batch_size=4096"]),
]
PROBE = r"""
import json, re, sys, torch
from pathlib import Path
from difflora.config.schema import load_config
from difflora.model.build import build_model
from difflora.sampling.generate import generate
torch.set_num_threads(1)
status = lambda key: int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
name, mode, batch, sets = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
cfg = load_config(name, sets)
m = cfg.model
def step(model, b):
    x = torch.randn(b, m.in_channels, m.image_size, m.image_size)
    t = torch.randint(0, cfg.diffusion.steps, (b,))
    y = torch.randint(0, m.num_classes, (b,)) if m.num_classes else None
    model(x, t, y).pow(2).mean().backward()
warm = build_model(cfg)
step(warm, 1) if mode == "train" else generate(warm, cfg, cfg.sample.model_copy(update={"num": 1, "steps": 2}))
del warm
Path("/proc/self/clear_refs").write_text("5")
base = status("VmRSS")
model = build_model(cfg)
if mode == "train":
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ema = [p.detach().clone() for p in model.parameters()]
    step(model, batch)
    opt.step()
else:
    generate(model, cfg, cfg.sample.model_copy(update={"num": batch, "steps": 2}))
print(json.dumps(status("VmHWM") - base))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize(("name", "mode", "batch", "sets"), MEASURED, ids=lambda v: str(v))
def test_the_estimate_is_within_a_factor_of_two_of_the_measured_peak(tiny_config, name, mode, batch, sets):
    cfg = tiny_config(name, *sets)
    fp = estimate(
        cfg,
        train_batch=batch if mode == "train" else 0,
        samples=batch if mode == "sample" else 0,
        sample_batch=cfg.sample.batch_size,
    )
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, name, mode, str(batch), *sets],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.5 <= fp.total / measured <= 2.0, (format_bytes(fp.total), format_bytes(measured), fp.describe())
