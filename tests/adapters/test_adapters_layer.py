"""Conditional LoRA layer and weightings against naive per-sample references.

Reference: for each sample i, ``W_i = W + scaling * sum_b w_b(c_i) B_b A_b`` is built explicitly
(weights from the paper's definitions, written out here independently of weightings.py) and the
base op is applied with W_i. Float64 throughout, so one tolerance (1e-10) covers every comparison
that is not bitwise.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflora.adapters import (
    ConditionalLayer,
    IndexWeighting,
    LinearWeighting,
    MissingConditionError,
    TrainableWeighting,
    active,
    conditions,
    current,
)

TOL = 1e-10
N = 6


# ----------------------------------------------------------------------------- reference weights
def ref_linear_weights(v: float, num_bases: int, low: float, high: float) -> list[float]:
    """000 section 3.2 written out: for t_i <= t < t_{i+1}: w_i = (t_{i+1}-t)/k, w_{i+1} = (t-t_i)/k."""
    m = num_bases - 1
    k = (high - low) / m
    basis = [low + i * k for i in range(num_bases)]
    w = [0.0] * num_bases
    if v == basis[-1]:
        w[-1] = 1.0
        return w
    for i in range(m):
        if basis[i] <= v < basis[i + 1]:
            w[i] = (basis[i + 1] - v) / (basis[i + 1] - basis[i])
            w[i + 1] = (v - basis[i]) / (basis[i + 1] - basis[i])
    return w


def ref_weights(weighting, values: torch.Tensor) -> torch.Tensor:
    """[N x num_bases] mixing weights by definition (index: one-hot, null -1 -> zeros)."""
    rows = []
    for v in values.tolist():
        if isinstance(weighting, IndexWeighting):
            rows.append([1.0 if (v == b) else 0.0 for b in range(weighting.num_bases)])
        elif isinstance(weighting, LinearWeighting):
            rows.append(ref_linear_weights(v, weighting.num_bases, weighting.low, weighting.high))
        else:
            rows.append(weighting.table[int(v)].tolist())
    return torch.tensor(rows, dtype=torch.float64)


def naive(layer: ConditionalLayer, x: torch.Tensor, values: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Per-sample weight matrices, built one sample at a time (the slow path adapters avoid)."""
    base = layer.base_layer
    outs = []
    for i in range(x.shape[0]):
        w = base.weight.clone()
        for bank in layer.adapters.values():
            vals = values[bank.condition]
            if vals is None:
                continue
            if isinstance(bank.weighting, TrainableWeighting):
                mix = bank.weighting.table[vals[i].long()]  # differentiable: gradients reach the table
            else:
                mix = ref_weights(bank.weighting, vals[i : i + 1])[0]
            for b in range(bank.lora_A.shape[0]):
                w = w + bank.scaling * mix[b] * (bank.lora_B[b] @ bank.lora_A[b]).reshape(w.shape)
        xi = x[i : i + 1]
        if isinstance(base, nn.Linear):
            outs.append(F.linear(xi, w, base.bias))
        else:
            conv = {1: F.conv1d, 2: F.conv2d}[w.dim() - 2]
            outs.append(conv(xi, w, base.bias, base.stride, base.padding, base.dilation))
    return torch.cat(outs)


# ----------------------------------------------------------------------------- fixtures
BASES = {
    "linear_tokens": (lambda: nn.Linear(7, 5), (N, 3, 7)),
    "linear_flat": (lambda: nn.Linear(7, 5), (N, 7)),
    "conv1d_1x1": (lambda: nn.Conv1d(6, 5, 1), (N, 6, 9)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 5, 1), (N, 6, 4, 3)),
    "conv2d_3x3": (lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1), (N, 4, 7, 6)),
    "conv1d_k3": (lambda: nn.Conv1d(4, 5, 3, dilation=2), (N, 4, 11)),
}
WEIGHTINGS = {
    "index": (lambda: IndexWeighting(5), "y", lambda g: torch.tensor([0, -1, 4, 2, -1, 2])),
    "linear": (lambda: LinearWeighting(4, 0, 12), "t", lambda g: torch.tensor([0, 12, 4, 5, 11, 7])),
    "linear_real": (
        lambda: LinearWeighting(3, 1.0, 7.5),
        "guidance",
        lambda g: torch.rand(N, generator=g, dtype=torch.float64) * 6.5 + 1,
    ),
    "trainable": (lambda: TrainableWeighting(13, 4, "gaussian"), "t", lambda g: torch.tensor([0, 12, 3, 3, 9, 6])),
}


def randomized(layer: ConditionalLayer, seed: int = 0) -> ConditionalLayer:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bank in layer.adapters.values():
            bank.lora_B.copy_(torch.randn(bank.lora_B.shape, generator=g, dtype=bank.lora_B.dtype))
    return layer


def make(base_key: str, weighting_keys: list[str], rank: int = 3, alpha: float | None = 6.0):
    factory, shape = BASES[base_key]
    layer = ConditionalLayer(factory().double())
    values = {}
    g = torch.Generator().manual_seed(1)
    for i, key in enumerate(weighting_keys):
        wf, cond, vf = WEIGHTINGS[key]
        layer.add_adapter(f"a{i}", wf(), cond, rank=rank, alpha=alpha)
        values[cond] = vf(g)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return randomized(layer), x, values


# ----------------------------------------------------------------------------- forward == naive
@pytest.mark.parametrize("base_key", list(BASES))
@pytest.mark.parametrize("weighting_key", list(WEIGHTINGS))
def test_forward_matches_per_sample_reference(base_key, weighting_key):
    layer, x, values = make(base_key, [weighting_key])
    with conditions(**values):
        out = layer(x)
    ref = naive(layer, x, values)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    # The adapter really changes the output (B is random), so the comparison can fail.
    assert (out - layer.base_layer(x)).abs().max() > 1e-3


@pytest.mark.parametrize("base_key", ["linear_tokens", "conv1d_1x1", "conv2d_3x3"])
def test_several_adapters_on_one_layer(base_key):
    # TimeLoRA (linear), ClassLoRA (index with nulls) and a trainable one, all per sample.
    layer, x, values = make(base_key, ["linear", "index", "trainable"])
    with conditions(**values):
        out = layer(x)
    torch.testing.assert_close(out, naive(layer, x, values), atol=TOL, rtol=0)


def test_gradients_match_reference_and_reach_every_tensor():
    layer, x, values = make("conv1d_1x1", ["linear", "index", "trainable"])
    x.requires_grad_(True)
    params = dict(layer.named_parameters())
    with conditions(**values):
        loss = (layer(x) ** 2).sum()
    grads = torch.autograd.grad(loss, [x, *params.values()])
    ref_loss = (naive(layer, x, values) ** 2).sum()
    ref_grads = torch.autograd.grad(ref_loss, [x, *params.values()])
    for name, g, rg in zip(["x", *params], grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, atol=1e-9, rtol=0, msg=f"gradient of {name}")
        assert g.abs().sum() > 0, f"no gradient reaches {name}"
    assert {"base_layer.weight", "base_layer.bias", "adapters.a0.lora_A", "adapters.a2.weighting.table"} <= set(params)


def test_frozen_base_gets_no_gradient():
    layer, x, values = make("linear_tokens", ["trainable"])
    layer.base_layer.requires_grad_(False)
    with conditions(**values):
        layer(x).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    bank = layer.adapters["a0"]
    assert bank.lora_A.grad is not None and bank.lora_B.grad is not None and bank.weighting.table.grad is not None


# ----------------------------------------------------------------------------- init and nulls
def test_fresh_adapter_changes_nothing_and_init_statistics():
    torch.manual_seed(0)
    base = nn.Linear(64, 32).double()
    layer = ConditionalLayer(base, LinearWeighting(11, 0, 4000), "t", rank=4)
    x = torch.randn(5, 64, dtype=torch.float64)
    with conditions(t=torch.tensor([0, 1, 2000, 3999, 4000])):
        assert torch.equal(layer(x), base(x))
    bank = layer.adapters["default"]
    assert torch.equal(bank.lora_B, torch.zeros_like(bank.lora_B))
    assert bank.lora_A.shape == (11, 4, 64) and bank.lora_B.shape == (11, 32, 4)
    # A ~ N(0, 1/r): 2816 draws, the std estimate is within a few percent of 1/sqrt(4) = 0.5.
    assert abs(bank.lora_A.std().item() - 0.5) < 0.03
    assert abs(bank.lora_A.mean().item()) < 0.03


def test_null_class_adds_nothing():
    layer, x, _ = make("conv2d_1x1", ["index"])
    y = torch.tensor([-1, 3, -1, 0, -1, -1])
    with conditions(y=y):
        out = layer(x)
    base = layer.base_layer(x)
    null = y == -1
    assert torch.equal(out[null], base[null])
    assert (out[~null] - base[~null]).abs().min() > 0
    with conditions(y=None):  # y=None: the whole batch unconditional
        assert torch.equal(layer(x), base)


def test_shared_condition_broadcasts():
    layer, x, _ = make("linear_tokens", ["linear"])
    with conditions(t=5):
        a = layer(x)
    with conditions(t=torch.tensor(5)):
        b = layer(x)
    with conditions(t=torch.full((N,), 5)):
        c = layer(x)
    assert torch.equal(a, c) and torch.equal(b, c)


# ----------------------------------------------------------------------------- weightings
def test_linear_interpolation_exact_at_basis_times_and_linear_between():
    # 000's m = 10, T = 4001 (1-based t_i = 1 + 400 i), i.e. 0-based basis times 0, 400, ..., 4000.
    w = LinearWeighting(11, 0, 4000)
    basis = torch.arange(0, 4001, 400)
    assert torch.equal(w(basis).dense(11), torch.eye(11))
    t = torch.arange(0, 4001)
    dense = w(t).dense(11).double()
    ref = ref_weights(w, t)
    torch.testing.assert_close(dense, ref, atol=1e-6, rtol=0)  # float32 weights: 1e-6 covers their rounding
    assert torch.allclose(dense.sum(1), torch.ones(4001, dtype=torch.float64))
    assert ((dense > 0).sum(1) <= 2).all()
    # Between two bases the weights are affine in t: second differences vanish inside a segment.
    seg = dense[401:800, 1:3]
    assert (seg[2:] - 2 * seg[1:-1] + seg[:-2]).abs().max() < 1e-6
    # A real-valued range (a guidance scale) with non-integer spacing: exact at every basis.
    w = LinearWeighting(5, 1.0, 8.0)
    assert torch.equal(w(w.basis_points()).dense(5), torch.eye(5))


def test_trainable_inits_equal_their_definitions():
    num_values, num_bases = 4001, 11
    onehot = TrainableWeighting(num_values, num_bases, "onehot").table
    # 000: w_i(t) = 1[t_i <= t < t_{i+1}] with 1-based t and t_i = 1 + i k; t_{m+1} = +inf.
    k = (num_values - 1) / (num_bases - 1)
    ref = torch.zeros(num_values, num_bases)
    for t0 in range(num_values):
        t = t0 + 1
        for i in range(num_bases):
            upper = 1 + (i + 1) * k if i + 1 < num_bases else math.inf
            if 1 + i * k <= t < upper:
                ref[t0, i] = 1
    assert torch.equal(onehot, ref)
    linear = TrainableWeighting(num_values, num_bases, "linear").table
    torch.testing.assert_close(
        linear.double(), ref_weights(LinearWeighting(11, 0, 4000), torch.arange(4001)), atol=1e-6, rtol=0
    )
    torch.manual_seed(0)
    gauss = TrainableWeighting(num_values, num_bases, "gaussian").table
    # N(0, 1) over 44,011 entries: mean and std within 0.02 of 0 and 1.
    assert abs(gauss.mean().item()) < 0.02 and abs(gauss.std().item() - 1) < 0.02


def test_out_of_range_values_are_clear_errors():
    with pytest.raises(ValueError, match=r"values must be in \[0, 12\]"):
        LinearWeighting(4, 0, 12)(torch.tensor([3, 13]))
    with pytest.raises(ValueError, match=r"0\.\.4"):
        IndexWeighting(5)(torch.tensor([5]))
    with pytest.raises(ValueError, match="integers"):
        IndexWeighting(5)(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="None"):
        TrainableWeighting(5, 2)(None)


# ----------------------------------------------------------------------------- merge
@pytest.mark.parametrize(
    ("base_key", "time_key"),
    [("linear_tokens", "linear"), ("conv1d_1x1", "trainable"), ("conv2d_3x3", "linear"), ("conv2d_1x1", "trainable")],
)
def test_merge_equals_unmerged_and_unmerge_restores_exactly(base_key, time_key):
    layer, x, values = make(base_key, [time_key, "index"])
    original = layer.base_layer.weight.detach().clone()
    t5 = torch.full((N,), 5)
    with conditions(t=t5, y=values["y"]):
        unmerged = layer(x)
        delta = layer.get_delta_weight(t=5)
        layer.merge(t=5)  # TimeLoRA merged, ClassLoRA stays per sample
        assert layer.merged == {"a0": 5}
        torch.testing.assert_close(layer.base_layer.weight, original + delta, atol=TOL, rtol=0)
        merged = layer(x)
        torch.testing.assert_close(merged, unmerged, atol=TOL, rtol=0)
        for step in range(50):  # many merges at other values: no drift
            layer.merge(t=step % 13)
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original) and not layer.merged
    assert layer._unmerged_weight is None


def test_get_delta_weight_is_the_naive_sum():
    layer, _, _ = make("conv2d_3x3", ["linear"])
    bank = layer.adapters["a0"]
    w = ref_weights(bank.weighting, torch.tensor([7]))[0]
    ref = sum(bank.scaling * w[b] * bank.lora_B[b] @ bank.lora_A[b] for b in range(4)).reshape(layer.weight.shape)
    torch.testing.assert_close(layer.get_delta_weight(t=7), ref, atol=TOL, rtol=0)
    assert torch.equal(layer.get_delta_weight(y=3), torch.zeros_like(ref))  # no adapter reads y


def test_eval_has_no_side_effects():
    layer, x, values = make("linear_tokens", ["linear"])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    layer.train()
    assert not layer.merged
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


# ----------------------------------------------------------------------------- context
def test_missing_condition_is_a_clear_error():
    layer, x, _ = make("linear_tokens", ["linear"])
    with pytest.raises(MissingConditionError, match="reads condition 't' but none is set"):
        layer(x)
    with conditions(y=torch.zeros(N)), pytest.raises(MissingConditionError, match="conditions set: y"):
        layer(x)


def test_conditions_nest_and_restore_on_error():
    with conditions(t=1, y=2):
        with conditions(t=3):
            assert current("t") == 3 and current("y") == 2
        assert current("t") == 1
        with pytest.raises(RuntimeError), conditions(t=9):
            raise RuntimeError
        assert current("t") == 1
    assert active() == {}
    with pytest.raises(TypeError, match="condition 't'"):
        with conditions(t="late"):
            pass


def test_batch_size_mismatch_is_a_clear_error():
    layer, x, _ = make("linear_tokens", ["linear"])
    with conditions(t=torch.zeros(N + 1)), pytest.raises(ValueError, match="holds 6 samples"):
        layer(x)


def test_unsupported_bases_are_rejected():
    with pytest.raises(TypeError, match="nn.Linear"):
        ConditionalLayer(nn.Embedding(3, 4))
    with pytest.raises(ValueError, match="groups"):
        ConditionalLayer(nn.Conv2d(4, 4, 3, groups=2))
