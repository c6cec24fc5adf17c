"""Files written by an earlier difflora load and compute what they computed when they were written.

``data/`` holds a tiny run directory (``run_every_form``: config + one checkpoint) and an adapter
file (``adapters_every_form``, saved from the run's model with random adapter values), both
covering every adapter form (low-rank under linear, index and trainable weightings, low-rank with
activation at both kernels, weight scale, bias shift, position adapters at both kernels), and
``expected.safetensors``: fixed inputs and the outputs recorded when the files were written. They
were written at commit 87951d6 (before the form classes and ``ConditionalLoRA`` were renamed) by
running this module as a script (``python tests/adapters/test_saved_files.py``); loading them
after a change that renames stored names proves the old keys still map.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difflora.adapters import conditions, load_adapters, save_adapters
from difflora.config.schema import parse_config
from difflora.model.build import build_model
from difflora.train import load_run_config, load_weights, select_checkpoint, train

DATA = Path(__file__).parent / "data"
STEP = 2
RUN, ADAPTERS, EXPECTED = DATA / "run_every_form", DATA / "adapters_every_form", DATA / "expected.safetensors"

# Every form on a U-Net of four channels (3,602 base parameters): the files stay a few tens of KB.
ADAPTERS_CFG = [
    {"name": "time", "weighting": "linear", "num_values": 100, "num_bases": 3, "rank": 2,
     "targets": ["middle_block.1.qkv", "middle_block.1.proj_out"]},
    {"name": "cls", "condition": "y", "weighting": "index", "num_values": 10, "rank": 1, "alpha": 2.0,
     "targets": ["middle_block.1.qkv"]},
    {"name": "tw", "weighting": "trainable", "num_values": 100, "num_bases": 2, "init": "gaussian",
     "targets": ["middle_block.1.proj_out"], "rank": 1},
    {"name": "act", "form": "lowrank_act", "condition": "y", "weighting": "index", "num_values": 10,
     "kernel": "1x1", "targets": ["middle_block.0.in_layers.2"], "rank": 2},
    {"name": "actf", "form": "lowrank_act", "weighting": "linear", "num_values": 100, "num_bases": 2,
     "activation": "silu", "targets": ["middle_block.2.out_layers.3"], "rank": 1},
    {"name": "sc", "form": "scale", "condition": "y", "weighting": "index", "num_values": 10,
     "targets": ["middle_block.1.qkv"]},
    {"name": "sh", "form": "shift", "weighting": "linear", "num_values": 100, "num_bases": 2,
     "targets": ["middle_block.1.proj_out", "out.2"]},
    {"name": "pos", "form": "position", "condition": "y", "weighting": "index", "num_values": 10,
     "source": "in", "dest": "out", "targets": ["middle_block.0"], "rank": 2},
    {"name": "pos1", "form": "position", "weighting": "shared", "kernel": "1x1", "activation": "relu",
     "source": "in", "dest": "out", "scale": 0.5, "targets": ["middle_block.2"], "rank": 2},
]  # fmt: skip
TREE = {
    "data": {"name": "digits"},
    "model": {
        "arch": "unet",
        "learn_sigma": True,
        "num_classes": 10,
        "unet": {"model_channels": 4, "num_res_blocks": 1, "attention_resolutions": [8], "channel_mult": [1]},
    },
    "diffusion": {"steps": 100, "loss": "hybrid"},
    "train": {"steps": STEP, "batch_size": 4, "lr": 0.05, "log_every": 1, "ckpt_every": 2, "sample_every": 0},
    "sample": {"num": 2, "steps": 2, "sampler": "ddim"},
}


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(4, 1, 8, 8, generator=gen),
        "t": torch.tensor([0.0, 31.0, 64.0, 99.0]),
        "y": torch.tensor([3, -1, 0, 9]),
    }


def _output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # The fixture's t is the backbone's time input of its day (t * 1000 / T, T = 100, fractional
    # ones included), which the model callable no longer takes: the backbone gets it as is, the
    # adapters the original timestep it stood for, rounded, as the model callable then gave them.
    with torch.no_grad(), conditions(t=(inputs["t"] * 0.1).round().long(), y=inputs["y"]):
        return model.net(inputs["x"], inputs["t"], inputs["y"])


def _run_model(run: Path) -> torch.nn.Module:
    state, _ = load_weights(select_checkpoint(run, STEP), "model")
    model = build_model(load_run_config(run))
    model.load_state_dict(state)
    return model.eval()


def _plain_base(run: Path) -> torch.nn.Module:
    """The run's model without adapters, with the run's base weights (the adapter file's base)."""
    tree = load_run_config(run).model_dump(mode="json")
    tree["model"]["adapters"] = []
    model = build_model(parse_config(tree))
    state, _ = load_weights(select_checkpoint(run, STEP), "model")
    # A wrapped layer holds its base as ``<path>.base_layer``; the plain base has it at ``<path>``.
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if "adapters." not in k}
    model.load_state_dict(base)
    return model.eval()


def test_a_run_directory_written_before_the_renames_loads_and_computes_the_same():
    expected = load_file(str(EXPECTED))
    out = _output(_run_model(RUN), expected)
    torch.testing.assert_close(out, expected["run_out"], rtol=1e-5, atol=1e-6)


def test_an_adapter_file_written_before_the_renames_loads_and_computes_the_same():
    expected = load_file(str(EXPECTED))
    model = _plain_base(RUN)
    report = load_adapters(model.net, ADAPTERS)
    assert {e.form for e in report.layers} == {"lowrank", "lowrank_act", "scale", "shift", "position"}
    out = _output(model, expected)
    torch.testing.assert_close(out, expected["adapters_out"], rtol=1e-5, atol=1e-6)


def _write() -> None:
    """Write the fixture (run once, with the code of the commit named in the module docstring)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tree = {**TREE, "model": {**TREE["model"], "adapters": ADAPTERS_CFG}}
        train(parse_config(tree), Path(tmp) / "run", progress=False, log=lambda s: None)
        ckpt = select_checkpoint(Path(tmp) / "run")
        shutil.rmtree(RUN, ignore_errors=True)
        (RUN / "checkpoints" / ckpt.name).mkdir(parents=True)
        shutil.copy(Path(tmp) / "run" / "config.json", RUN / "config.json")
        # The step's model weights and record: what sampling the run at that step reads.
        for name in ("model.safetensors", "state.json"):
            shutil.copy(ckpt / name, RUN / "checkpoints" / ckpt.name / name)
    inputs = _inputs()
    run_out = _output(_run_model(RUN), inputs)
    # The adapter file: the run's adapters with every value random (the trained ones are near zero).
    model = _run_model(RUN)
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            if "adapters." in name:
                p.copy_(torch.randn_like(p) * 0.3)
    save_adapters(model.net, ADAPTERS)
    save_file({**inputs, "run_out": run_out, "adapters_out": _output(model, inputs)}, str(EXPECTED))


if __name__ == "__main__":
    sys.exit(_write())
