"""Mixed precision (train.precision): bf16 autocast against fp32, fp16 with a gradient scaler.

Tolerance. bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %) and fp16 11 bits; a
forward through a dozen layers accumulates a few such roundings, so outputs and loss terms agree
with fp32 to a relative 3e-2 (RTOL), the one tolerance of this file.
"""

import json
from pathlib import Path

import pytest
import torch

from difflora.adapters import adapter_layers, conditions
from difflora.model.build import build_model
from difflora.train import latest_checkpoint, load_checkpoint, train
from difflora.train.precision import autocast, cpu_flags, grad_scaler, native_bf16, resolve_precision
from helpers import tiny_config

QUIET = {"progress": False, "log": lambda s: None}
RTOL = 3e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _adapted_model():
    # TimeLoRA (trainable weighting over t) and ClassLoRA (index over y) with non-zero factors
    # (and output layer), so that the adapters' batched per-sample paths shape the output.
    cfg = tiny_config("tiny-tclora-unet")
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero-initialised: LoRA B factors and the output convolution
                p.normal_(0, 0.05)
    return model


X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.tensor([0, 7, 30, 55, 80, 99])  # original timesteps 0..T-1 (T = 100)
Y = torch.tensor([0, 3, -1, 9, 5, -1])  # two null labels: rows without a class update


def test_bf16_autocast_of_the_whole_adapted_model_matches_fp32():
    model = _adapted_model()
    with torch.no_grad():
        ref = model(X, T, Y)
        with autocast("bf16", torch.device("cpu")):
            low = model(X, T, Y)
    assert low.dtype == torch.bfloat16  # autocast really ran the network in bf16
    assert _rel(low, ref) < RTOL


def test_bf16_autocast_of_every_adapter_layer_matches_fp32():
    """Each wrapped layer alone, on the fp32 input it received in the model: its output and its
    per-sample update (adapted minus base layer) under autocast equal fp32's within RTOL."""
    model = _adapted_model()
    inputs = {}

    def keep(path):
        def hook(module, args, out):
            inputs[path] = args[0]  # returns None: the output stands

        return hook

    hooks = [layer.register_forward_hook(keep(path)) for path, layer in adapter_layers(model)]
    with torch.no_grad():
        model(X, T, Y)
    for h in hooks:
        h.remove()
    assert len(inputs) >= 4
    for path, layer in adapter_layers(model):
        x = inputs[path]
        with torch.no_grad(), conditions(t=T, y=Y):
            ref, ref_base = layer(x), layer.base_layer(x)
            with autocast("bf16", torch.device("cpu")):
                low, low_base = layer(x), layer.base_layer(x)
        assert low.dtype == torch.bfloat16
        assert _rel(low, ref) < RTOL, path
        for i in range(len(Y)):  # every sample's own update, the null-label rows included
            assert _rel(low[i].float() - low_base[i].float(), ref[i] - ref_base[i]) < RTOL, (path, i)


def _run(tmp_path: Path, name: str, *extra: str) -> list[dict]:
    cfg = tiny_config(
        "tiny-unet", "train.steps=3", "train.batch_size=8", "train.log_every=1", "train.ckpt_every=3", *extra
    )
    seen = {}

    def spy(st):
        seen["dtypes"] = {p.dtype for p in st.model.parameters()} | {v.dtype for v in st.ema.shadow.values()}
        seen["optim"] = {v.dtype for s in st.optimizer.state.values() for v in s.values() if v.ndim}
        seen["scale"] = st.scaler.get_scale() if st.scaler.is_enabled() else None

    train(cfg, tmp_path / name, callback=spy, **QUIET)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return rows, seen


@pytest.fixture(scope="module")
def fp32_rows(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fp32"), "fp32")[0]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_keeps_fp32_master_weights_and_matches_fp32(tmp_path, precision, fp32_rows):
    ref = fp32_rows
    low, seen = _run(tmp_path, precision, f"train.precision={precision}")
    # Weights, EMA and AdamW's moments stay float32 (only the forward is low precision).
    assert seen["dtypes"] == {torch.float32} and seen["optim"] == {torch.float32}
    # The first step starts from the same weights and draws: its loss terms and gradient norm agree.
    # grad_norm is measured after the fp16 scaler's unscale: a scaled norm would be 65536x larger.
    for key in ("loss", "mse", "grad_norm"):
        assert low[0][key] == pytest.approx(ref[0][key], rel=RTOL), key
    if precision == "fp16":
        assert seen["scale"] == 2.0**16  # no overflow on these steps: the initial scale stands
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in low)


def test_fp16_scaler_skips_a_step_whose_gradients_overflow():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = grad_scaler("fp16", torch.device("cpu"))
    scaler.scale(p.sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(3))  # the step was skipped
    assert scaler.get_scale() == 2.0**15  # and the scale halved
    assert not grad_scaler("bf16", torch.device("cpu")).is_enabled()


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="train.precision='fp8'; choices: fp32, bf16, fp16"):
        autocast("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision"):
        tiny_config("tiny-unet", "train.precision=fp8")


def test_fp16_resume_records_the_loss_scale_and_continues_bit_identically(tmp_path):
    over = ["train.steps=4", "train.batch_size=4", "train.log_every=1", "train.ckpt_every=2", "train.precision=fp16"]
    cfg = tiny_config("tiny-unet", *over)
    train(cfg, tmp_path / "straight", **QUIET)
    train(cfg, tmp_path / "cut", stop_at=2, **QUIET)
    scales = []
    train(cfg, tmp_path / "cut", resume=True, callback=lambda st: scales.append(st.scaler.get_scale()), **QUIET)
    state = load_checkpoint(latest_checkpoint(tmp_path / "cut")).state
    assert state["grad_scaler"]["scale"] == scales[-1]
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / r)).model for r in ("straight", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- train.precision: auto --------------------------------------------------------------------------
CPU = torch.device("cpu")


def test_cpu_flags_are_read_from_cpuinfo_on_x86_and_arm(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(x86) == frozenset({"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"})  # the first CPU's
    assert cpu_flags(arm) == frozenset({"fp", "asimd", "bf16"})
    assert cpu_flags(tmp_path / "absent") == frozenset()  # not Linux: no flags, never an error


@pytest.mark.parametrize(
    ("flags", "native"),
    [({"avx2", "fma"}, False), ({"avx2", "avx512f"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True)],
)
def test_native_bf16_is_avx512_bf16_or_amx_bf16(flags, native):
    assert native_bf16(CPU, frozenset(flags)) is native


def test_auto_is_bf16_exactly_where_the_cpu_computes_bf16_natively():
    expected = "bf16" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "fp32"
    assert resolve_precision("auto", CPU) == expected
    for explicit in ("fp32", "bf16", "fp16"):
        assert resolve_precision(explicit, CPU) == explicit  # an explicit choice is never changed
    model = _adapted_model()
    with torch.no_grad(), autocast("auto", CPU):
        out = model(X, T, Y)
    assert out.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)
    assert not grad_scaler("auto", CPU).is_enabled()  # auto is never fp16: no loss scaling


def test_a_run_with_precision_auto_records_the_precision_it_trained_in(tmp_path):
    _run(tmp_path, "auto", "train.precision=auto", "train.steps=1", "train.ckpt_every=1")
    accounting = json.loads((tmp_path / "auto" / "accounting.json").read_text())
    assert accounting["precision"] == resolve_precision("auto", CPU)  # what ran, not "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: auto on a GPU needs one")
def test_auto_on_a_gpu_follows_its_bf16_support():
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
