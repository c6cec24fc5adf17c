"""Adapted models compile whole: ``torch.compile(fullgraph=True)`` of a TimeLoRA U-Net and an Affiner DiT
traces with no graph break and computes what eager computes (forward and gradients)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflora.adapters import adapters_disabled, conditions
from difflora.model.build import build_model
from helpers import tiny_config

# Float32 sums taken in another order by the compiler's fused kernels.
TOL = 1e-4
HAS_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None
# name: (tiny_config's arguments, extra conditions, an input with a value out of its weighting's range)
MODELS = {
    # 000: TimeLoRA (linear weighting over 11 bases) on the attention's qkv and proj_out, a class embedding.
    "timelora-unet": (("tiny-timelora-unet",), {}, {"t": [3, 12, 55, 500]}),
    # 002: the Affiner (scale, shift, low-rank with ReLU; index weighting over tasks, -1 the base rows).
    "affiner-dit": (
        ("tiny-dit", {"model.affiner": {"tasks": 3}}, "data.task_id=0"),
        {"task": [0, 1, 2, -1]},
        {"task": [0, 1, 5, -1]},
    ),
}


def _model(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    config, extra, _ = MODELS[name]
    torch.manual_seed(0)
    model = build_model(tiny_config(*config))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero-initialised adapters and output layers: make every path count
                p.normal_(0, 0.05)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([3, 12, 55, 99]), torch.tensor([1, -1, 4, 7])
    return model, {"x": x, "t": t, "y": y, **{k: torch.tensor(v) for k, v in extra.items()}}


def _run(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.square().mean().backward()
    named = model.named_parameters()
    return out.detach(), {k.removeprefix("_orig_mod."): p.grad.clone() for k, p in named if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_an_adapted_model_traces_into_one_graph(name):
    model, inputs = _model(name)
    explained = torch._dynamo.explain(model)(**inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    # The backbone alone, compiled, reads the conditions and switches of blocks opened around it.
    net = torch.compile(model.net, fullgraph=True, backend="eager")
    x, t, y = inputs["x"], inputs["t"], inputs["y"]
    steps = model.backbone_timesteps(t)
    with conditions(**{k: v for k, v in inputs.items() if k != "x"}):
        torch.testing.assert_close(net(x, steps, y), model(**inputs), rtol=0, atol=0)
        with adapters_disabled():
            plain = net(x, steps, y)
    with adapters_disabled():
        torch.testing.assert_close(plain, model(**inputs), rtol=0, atol=0)
    assert not torch.allclose(plain, model(**inputs))


@pytest.mark.slow  # inductor compiles the forward and the backward: tens of seconds per model on this CPU
@pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler for inductor's CPU kernels")
@pytest.mark.parametrize("name", list(MODELS))
def test_fullgraph_compiled_model_equals_eager_forward_and_gradients(name):
    # Inductor leaves compile workers (threads, a process pool) behind, and a later fork of this
    # process (the DDP tests fork their ranks) can deadlock on a lock one of them held: the compile
    # runs in a pytest process of its own, which runs this test body.
    if os.environ.get("DIFFLORA_COMPILE_CHILD") != name:
        node = f"{Path(__file__).resolve()}::test_fullgraph_compiled_model_equals_eager_forward_and_gradients[{name}]"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rp", node],  # -rp: "PASSED node"
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "DIFFLORA_COMPILE_CHILD": name},
            capture_output=True,
            text=True,
            timeout=3600,
        )
        assert done.returncode == 0 and "PASSED" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]
        return
    model, inputs = _model(name)
    ref_out, ref_grads = _run(model, inputs)
    compiled = torch.compile(model, fullgraph=True)
    out, grads = _run(compiled, inputs)
    torch.testing.assert_close(out, ref_out, rtol=TOL, atol=TOL)
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=TOL, atol=TOL)
    # The value checks stay in the compiled graph: a value out of range is refused there too.
    bad = {k: torch.tensor(v) for k, v in MODELS[name][2].items()}
    with pytest.raises(RuntimeError, match="weighting: value out of range"):
        compiled(**{**inputs, **bad})
