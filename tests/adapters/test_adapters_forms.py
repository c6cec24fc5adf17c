"""Every update form against a naive per-sample reference written from the formulas.

For sample n with condition c_n and bank weights w_i(c_n) (written out here from the weightings'
definitions, independently of weightings.py; a null row has all weights zero):

    y_n = (1 + sum_i w_i a_i) ⊙ (W x_n) + b                                  (scale)
          + sum_i w_i scaling B_i A_i x_n                                    (lowrank)
          + sum_i w_i s_i W_up,i act(W_down,i x_n)                           (lowrank_act)
          + sum_i w_i b_i                                                    (shift)

applied sample by sample with explicit per-sample, per-entry Python loops (the slow path the
router avoids). Float64 throughout; one tolerance (1e-10) for everything that is not bitwise.
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
    LowRankForm,
    ScaleForm,
    ShiftForm,
    TrainableWeighting,
    adapters_disabled,
    conditions,
    merge_shared,
)

TOL = 1e-10
N = 6
ACTS = {"relu": torch.relu, "silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "identity": lambda h: h}

BASES = {
    "linear": (lambda: nn.Linear(7, 5), (N, 3, 7)),
    "conv1d_1x1": (lambda: nn.Conv1d(6, 5, 1), (N, 6, 9)),
    "conv2d_3x3_s2": (lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1), (N, 4, 7, 6)),
}
# (weighting factory, condition, values with null rows: index -1, linear NaN, trainable -1 and NaN)
CONDS = {
    "task": (lambda: IndexWeighting(3), torch.tensor([0, -1, 2, 1, -1, 2])),
    "t": (lambda: LinearWeighting(4, 0, 12), torch.tensor([0.0, 12.0, float("nan"), 5.0, 11.0, 7.5])),
    "s": (lambda: TrainableWeighting(9, 3, "gaussian"), torch.tensor([0.0, 8.0, -1.0, 3.0, float("nan"), 6.0])),
}


def ref_weights(weighting, values: torch.Tensor) -> torch.Tensor:
    """[N x num_bases] weights by definition; differentiable in a trainable table."""
    rows = []
    for v in values.tolist():
        null = math.isnan(v) or (v == -1 and not isinstance(weighting, LinearWeighting))
        if null:
            rows.append(torch.zeros(weighting.num_bases, dtype=torch.float64))
        elif isinstance(weighting, IndexWeighting):
            rows.append(torch.tensor([float(v == b) for b in range(weighting.num_bases)], dtype=torch.float64))
        elif isinstance(weighting, LinearWeighting):
            m = weighting.num_bases - 1
            k = (weighting.high - weighting.low) / m
            w = [0.0] * (m + 1)
            i = min(int((v - weighting.low) // k), m - 1)
            w[i] = (weighting.low + (i + 1) * k - v) / k
            w[i + 1] = (v - weighting.low - i * k) / k
            rows.append(torch.tensor(w, dtype=torch.float64))
        else:
            rows.append(weighting.table[int(v)])
    return torch.stack(rows)


def down_apply(base: nn.Module, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One down factor [r x fan_in] on one sample x [1 x ...], reading the base's receptive field."""
    if isinstance(base, nn.Linear):
        return x @ down.t()
    w = down.reshape(down.shape[0], base.in_channels, *base.kernel_size)
    conv = {1: F.conv1d, 2: F.conv2d}[w.dim() - 2]
    return conv(x, w, None, base.stride, base.padding, base.dilation)


def up_apply(base: nn.Module, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """One up factor [d_out x r] (a 1x1 for convolutions)."""
    if isinstance(base, nn.Linear):
        return h @ up.t()
    return torch.einsum("or,nr...->no...", up, h)


def channel(base: nn.Module, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v if isinstance(base, nn.Linear) else v.view(-1, *([1] * (like.dim() - 2)))


def naive(layer: ConditionalLayer, x: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
    base = layer.base_layer
    outs = []
    for n in range(x.shape[0]):
        xn = x[n : n + 1]
        wx = base(xn) - (channel(base, base.bias, base(xn)) if base.bias is not None else 0)
        a = torch.zeros(layer.out_features, dtype=x.dtype)
        add = torch.zeros_like(wx)
        for branch in layer.adapters.values():
            w = ref_weights(branch.weighting, values[branch.condition][n : n + 1])[0]
            for i in range(branch.weighting.num_bases):
                if isinstance(branch, ScaleForm):
                    a = a + w[i] * branch.scale[i]
                elif isinstance(branch, ShiftForm):
                    add = add + w[i] * channel(base, branch.shift[i], wx)
                elif isinstance(branch, LowRankForm):
                    h = down_apply(base, xn, branch.lora_A[i])
                    add = add + w[i] * branch.scaling * up_apply(base, h, branch.lora_B[i])
                else:
                    h = ACTS[branch.act_name](down_apply(base, xn, branch.lora_down[i]))
                    add = add + w[i] * branch.lora_s[i] * up_apply(base, h, branch.lora_up[i])
        bias = channel(base, base.bias, wx) if base.bias is not None else 0
        outs.append((1 + channel(base, a, wx)) * wx + bias + add)
    return torch.cat(outs)


def randomize(layer: ConditionalLayer, seed: int = 0) -> ConditionalLayer:
    """Non-zero values for the zero-initialised tensors, so every branch changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.adapters.named_parameters():
            if name.endswith(("lora_B", "lora_s", "scale", "shift")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return layer


ALL_FORMS = [
    ("lr", "lowrank", "task", None),
    ("act", "lowrank_act", "t", "gelu"),
    ("sc", "scale", "s", None),
    ("sh", "shift", "t", None),
]


def make(base_key: str, forms=ALL_FORMS, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    factory, shape = BASES[base_key]
    base = factory().double()
    if not bias:
        base.bias = None
    layer = ConditionalLayer(base)
    for name, form, cond, act in forms:
        layer.add_adapter(
            name, CONDS[cond][0](), cond, rank=3, alpha=6.0 if form == "lowrank" else None, form=form, activation=act
        )
    randomize(layer, seed)
    x = torch.randn(shape, dtype=torch.float64)
    values = {c: CONDS[c][1] for c in CONDS}
    return layer.double(), x, values


# ----------------------------------------------------------------------------- outputs and gradients
@pytest.mark.parametrize("base_key", list(BASES))
@pytest.mark.parametrize("forms", [[f] for f in ALL_FORMS] + [ALL_FORMS], ids=[f[1] for f in ALL_FORMS] + ["all"])
def test_forms_match_reference_in_outputs_and_gradients(base_key, forms):
    layer, x, values = make(base_key, forms)
    x.requires_grad_(True)
    params = dict(layer.named_parameters())
    with conditions(**values):
        out = layer(x)
    ref = naive(layer, x, values)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    # The branches really change the output, and the null rows (1 and 4 are null for task/s) do not
    # change for forms read only through null-holding conditions.
    assert (out - layer.base_layer(x)).abs().max() > 1e-3
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *params.values()], grad)
    want = torch.autograd.grad(ref, [x, *params.values()], grad, allow_unused=True)
    for name, g, r in zip(["x", *params], got, want, strict=True):
        if r is None:  # e.g. a trainable table row no sample reads: the reference has no graph to it
            r = torch.zeros_like(g)
        torch.testing.assert_close(g, r, atol=1e-9, rtol=0, msg=f"gradient of {name}")


@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "sigmoid", "identity"])
def test_every_activation_matches_reference(act):
    layer, x, values = make("conv1d_1x1", [("act", "lowrank_act", "task", act)])
    with conditions(**values):
        torch.testing.assert_close(layer(x), naive(layer, x, values), atol=TOL, rtol=0)


@pytest.mark.parametrize("base_key", list(BASES))
def test_dense_routing_of_rank_forms_with_activation(base_key):
    # A trainable weighting mixes every entry (the dense path): act(down_i x) per entry, then mixed.
    forms = [("act", "lowrank_act", "s", "silu"), ("lr", "lowrank", "s", None)]
    layer, x, values = make(base_key, forms)
    x.requires_grad_(True)
    with conditions(**values):
        out = layer(x)
    ref = naive(layer, x, values)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    params = [x, *layer.parameters()]
    for g, r in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(ref.sum(), params), strict=True):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=0)


def test_null_rows_get_exactly_the_base_output():
    layer, x, _ = make("linear")
    null = {"task": torch.full((N,), -1), "t": torch.full((N,), float("nan")), "s": torch.full((N,), -1)}
    null["task"][0], null["t"][0], null["s"][0] = 1, 3.0, 2  # row 0 adapted, the rest null
    with conditions(**null):
        out = layer(x)
    base = layer.base_layer(x)
    assert torch.equal(out[1:], base[1:])
    assert (out[0] - base[0]).abs().max() > 1e-3


@pytest.mark.parametrize("base_key", list(BASES))
def test_fresh_branches_change_nothing(base_key):
    torch.manual_seed(0)
    factory, shape = BASES[base_key]
    layer = ConditionalLayer(factory().double())
    for name, form, cond, act in ALL_FORMS:
        layer.add_adapter(name, CONDS[cond][0](), cond, rank=3, form=form, activation=act)
    x = torch.randn(shape, dtype=torch.float64)
    with conditions(**{c: v for c, (_, v) in CONDS.items()}):
        assert torch.equal(layer(x), layer.base_layer(x))
    act = layer.adapters["act"]
    # Kaiming-normal factors (std sqrt(2 / fan_in)) and s = 0 (002).
    assert torch.equal(act.lora_s, torch.zeros_like(act.lora_s)) and act.lora_down.std() > 0.1


# ----------------------------------------------------------------------------- merge / unmerge
MERGEABLE = [("lr", "lowrank", "task", None), ("sc", "scale", "task", None), ("sh", "shift", "t", None)]


@pytest.mark.parametrize("base_key", list(BASES))
def test_merge_equals_per_sample_and_unmerge_restores_bits(base_key):
    layer, x, _ = make(base_key, MERGEABLE)
    shared = {"task": 2, "t": 7.5}
    with conditions(**{k: torch.full((N,), float(v)) for k, v in shared.items()}):
        per_sample = layer(x)
    weight, bias = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
    delta_w, delta_b = layer.get_delta_weight(**shared), layer.get_delta_bias(**shared)
    layer.merge(**shared)
    assert set(layer.merged) == {"lr", "sc", "sh"}
    merged = layer(x)  # merged branches read no condition
    torch.testing.assert_close(merged, per_sample, atol=TOL, rtol=0)
    torch.testing.assert_close(layer.base_layer.weight, weight + delta_w, atol=TOL, rtol=0)
    torch.testing.assert_close(layer.base_layer.bias, bias + delta_b, atol=TOL, rtol=0)
    for value in (0, 1, 2, 0, 2):  # repeated merges replace the value; unmerge is exact
        layer.merge(task=value)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, weight) and torch.equal(layer.base_layer.bias, bias)
    assert not layer.merged and layer._unmerged_weight is None and layer._unmerged_bias is None


def test_merge_refusals_are_clear():
    layer, _, _ = make("linear", [("act", "lowrank_act", "t", "relu")])
    with pytest.raises(ValueError, match="cannot be merged"):
        layer.merge(t=3)
    layer, _, _ = make("linear", [("sh", "shift", "t", None)], bias=False)
    with pytest.raises(ValueError, match="no bias"):
        layer.merge(t=3)
    layer, _, _ = make("linear", [("lr", "lowrank", "task", None), ("sc", "scale", "s", None)])
    weight = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="weight scale 'sc' stays per sample"):
        layer.merge(task=1)
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged  # nothing changed
    layer.merge(task=1, s=4)  # both together is fine


FORM_NAMES = ["lowrank", "lowrank_act", "scale", "shift"]


def merge_refused(forms: dict[str, str], merged: set[str], bias: bool) -> bool:
    """When merging the branches ``merged`` (name -> form in ``forms``) must be refused: a non-linear
    branch, a shift without a bias, or anything written into W while a weight scale stays per sample."""
    live_scale = any(f == "scale" and n not in merged for n, f in forms.items())
    return any(
        forms[n] == "lowrank_act"
        or (forms[n] == "shift" and not bias)
        or (live_scale and forms[n] in ("lowrank", "scale"))
        for n in merged
    )


@pytest.mark.parametrize("base_key", ["linear", "conv2d_3x3_s2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("first", FORM_NAMES)
@pytest.mark.parametrize("second", FORM_NAMES)
def test_every_pair_of_forms_merges_as_per_sample_or_refuses(base_key, bias, first, second):
    # Branch "b1" reads task, "b2" reads t; merge one of them (the other stays per sample, with
    # a different value per sample), or both. A merged layer computes what the per-sample path
    # computes, or the merge is refused and nothing changes; merge_shared falls back to per sample.
    forms = {"b1": first, "b2": second}
    acts = {"lowrank_act": "gelu"}
    layer, x, values = make(
        base_key, [("b1", first, "task", acts.get(first)), ("b2", second, "t", acts.get(second))], bias=bias
    )
    shared = {"task": 2, "t": 7.5}
    weight = layer.base_layer.weight.clone()
    for merge in ({"task"}, {"t"}, {"task", "t"}):
        batch = {c: torch.full((N,), float(shared[c])) if c in merge else values[c] for c in ("task", "t")}
        with conditions(**batch):
            per_sample = layer(x)
        names = {n for n, c in (("b1", "task"), ("b2", "t")) if c in merge}
        if merge_refused(forms, names, bias):
            with pytest.raises(ValueError, match="cannot be merged|no bias|stays per sample"):
                layer.merge(**{c: shared[c] for c in merge})
            assert not layer.merged and torch.equal(layer.base_layer.weight, weight)
        else:
            layer.merge(**{c: shared[c] for c in merge})
            with conditions(**batch):
                torch.testing.assert_close(layer(x), per_sample, atol=TOL, rtol=0)
            layer.unmerge()
        merge_shared(layer, **batch)  # merges what it can: the same output either way
        with conditions(**batch):
            torch.testing.assert_close(layer(x), per_sample, atol=TOL, rtol=0)
        layer.unmerge()
        assert torch.equal(layer.base_layer.weight, weight)


def test_two_scales_on_different_conditions_merge_as_their_sum():
    # The case: (1 + a1 + a2) W x per sample; merging one scale alone would give
    # (1 + a1)(1 + a2) W x, so it is refused; both together merge to 1 + a1 + a2.
    layer, x, _ = make("linear", [("s1", "scale", "task", None), ("s2", "scale", "t", None)])
    with pytest.raises(ValueError, match="weight scale 's2' stays per sample"):
        layer.merge(task=1)
    batch = {"task": torch.full((N,), 1.0), "t": torch.full((N,), 3.0)}
    with conditions(**batch):
        per_sample = layer(x)
    layer.merge(task=1, t=3.0)
    torch.testing.assert_close(layer(x), per_sample, atol=TOL, rtol=0)


def test_biasless_base_runs_every_form():
    layer, x, values = make("conv2d_3x3_s2", bias=False)
    with conditions(**values):
        torch.testing.assert_close(layer(x), naive(layer, x, values), atol=TOL, rtol=0)


def test_unknown_form_and_activation_are_errors():
    layer = ConditionalLayer(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="unknown adapter form 'affine'; valid: lowrank, lowrank_act, scale, shift"):
        layer.add_adapter("a", IndexWeighting(2), "task", form="affine")
    with pytest.raises(ValueError, match="unknown activation 'tanh'; valid: relu"):
        layer.add_adapter("a", IndexWeighting(2), "task", form="lowrank_act", activation="tanh")
    with pytest.raises(ValueError, match="has no activation"):
        layer.add_adapter("a", IndexWeighting(2), "task", form="lowrank", activation="relu")
    assert not layer.adapters


# ----------------------------------------------------------------------------- disabling
def test_adapters_disabled_by_name_and_all():
    layer, x, values = make("conv1d_1x1")
    with conditions(**values):
        full = layer(x)
        with adapters_disabled():
            assert torch.equal(layer(x), layer.base_layer(x))
        with adapters_disabled("sc", "sh"):
            partial = layer(x)
        assert torch.equal(layer(x), full)  # restored on exit
    keep = ConditionalLayer(layer.base_layer)
    keep.adapters["lr"], keep.adapters["act"] = layer.adapters["lr"], layer.adapters["act"]
    with conditions(**values):
        torch.testing.assert_close(partial, keep(x), atol=TOL, rtol=0)
    layer.merge(task=1, s=4)
    with (
        pytest.raises(RuntimeError, match="unmerge it before disabling"),
        adapters_disabled("lr"),
        conditions(**values),
    ):
        layer(x)
