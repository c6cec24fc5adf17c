"""Position adapters (004) against hand-written block forwards, and the nets' taps.

Reference: the DiT block and the U-Net ResBlock forwards are written out here from their
definitions (adaLN-Zero; residual block), and at the destination tap the reference adds, per
sample n, ``scale * sum_i w_i(c_n) (up_i act(down_i h_n + down_bias_i) + bias_i)`` with h_n the
activation at the source tap (``down``/``up`` 3x3 convolutions for a ResBlock's default kernel,
004's), built with explicit per-sample loops. Float64; one tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflora.adapters import (
    IndexWeighting,
    LinearWeighting,
    TrainableWeighting,
    adapter_parameters,
    adapters_disabled,
    conditions,
    freeze_base,
    inject_position_adapter,
)
from difflora.nets.dit import DiTBlock, modulate
from difflora.nets.unet import AttentionBlock, ResBlock

TOL = 1e-10
ACTS = {"relu": torch.relu, "gelu": F.gelu, "identity": lambda h: h}
TASK = torch.tensor([0, 2, -1, 1])  # -1: no update for that sample
T_VALUES = torch.tensor([0.0, 9.0, 4.5, float("nan")])


class Blocks(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList([block])


def ref_weights(adapter, values: torch.Tensor) -> torch.Tensor:
    rows = []
    for v in values.tolist():
        w = torch.zeros(adapter.weighting.num_bases, dtype=adapter.bias.dtype)
        if isinstance(adapter.weighting, IndexWeighting) and v >= 0:
            w[int(v)] = 1.0
        elif isinstance(adapter.weighting, TrainableWeighting) and v >= 0:
            w = adapter.weighting.table[int(v)]  # differentiable: gradients reach the table
        elif isinstance(adapter.weighting, LinearWeighting) and v == v:  # not NaN
            k = (adapter.weighting.high - adapter.weighting.low) / (adapter.weighting.num_bases - 1)
            i = min(int(v // k), adapter.weighting.num_bases - 2)
            w[i], w[i + 1] = (k * (i + 1) - v) / k, (v - k * i) / k
        rows.append(w)
    return torch.stack(rows)


def ref_update(adapter, h: torch.Tensor, values: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """scale * sum_i w_i (up_i act(down_i h_n) + bias_i), sample by sample."""
    w = ref_weights(adapter, values)
    outs = []
    for n in range(h.shape[0]):
        hn = h[n] if channels_last else h[n].movedim(0, -1)  # (..., C)
        acc = 0
        for i in range(w.shape[1]):
            z = hn @ adapter.lora_down[i].t() + adapter.down_bias[i]
            f = ACTS[adapter.act_name](z) @ adapter.lora_up[i].t() + adapter.bias[i]
            acc = acc + w[n, i] * f
        acc = adapter.scale * acc
        outs.append(acc if channels_last else acc.movedim(-1, 0))
    return torch.stack(outs)


def ref_conv_update(adapter, h: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The k x k adapter: scale * sum_i w_i (conv(act(conv(h_n, down_i) + down_bias_i), up_i) + bias_i)."""
    w = ref_weights(adapter, values)
    k, r = adapter.kernel, adapter.rank
    c_out = adapter.lora_up.shape[1]
    outs = []
    for n in range(h.shape[0]):
        acc = 0
        for i in range(w.shape[1]):
            down = adapter.lora_down[i].view(r, -1, k, k)
            up = adapter.lora_up[i].view(c_out, r, k, k)
            z = ACTS[adapter.act_name](F.conv2d(h[n : n + 1], down, adapter.down_bias[i], padding=k // 2))
            acc = acc + w[n, i] * (F.conv2d(z, up, padding=k // 2)[0] + adapter.bias[i][:, None, None])
        outs.append(adapter.scale * acc)
    return torch.stack(outs)


def ref_dit_block(block: DiTBlock, x, c, adapter, values) -> torch.Tensor:
    """DiT's block written out, with the adapter's update added at its dest tap."""
    acts = {}

    def tap(name, h):
        acts[name] = h
        if name == adapter.dest:
            h = h + ref_update(adapter, acts[adapter.source], values, channels_last=True)
        return h

    shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=1)
    x = tap("in", x)
    a = tap("attn_out", block.attn(tap("attn_in", modulate(block.norm1(x), shift1, scale1))))
    x = x + gate1.unsqueeze(1) * a
    m = tap("mlp_out", block.mlp(tap("mlp_in", modulate(block.norm2(x), shift2, scale2))))
    return tap("out", x + gate2.unsqueeze(1) * m)


def randomize(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def dit(source: str, dest: str, act: str = "identity", weighting=lambda: IndexWeighting(3), cond: str = "task"):
    torch.manual_seed(0)
    model = Blocks(DiTBlock(8, 2)).double()
    randomize(model)  # adaLN-Zero would otherwise make the block an identity
    report = inject_position_adapter(model, "pa", weighting, cond, ["blocks.0"], source, dest, 3, act, 0.7)
    adapter = model.blocks[0].position_adapters["pa"]
    randomize(adapter, seed=1)
    return model, adapter, report


def check_against_reference(model, adapter, cond: str, values: torch.Tensor):
    """Outputs and gradients (input, adapter parameters) of block 0 against :func:`ref_dit_block`."""
    x = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 8, dtype=torch.float64)
    with conditions(**{cond: values}):
        out = model.blocks[0](x, c)
    ref = ref_dit_block(model.blocks[0], x, c, adapter, values)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    params = [x, *adapter.parameters()]
    grad = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad), strict=True):
        torch.testing.assert_close(g, r, atol=1e-9, rtol=0)
    return x, c, out


@pytest.mark.parametrize(
    "source,dest,act",
    [
        ("attn_out", "mlp_in", "identity"),
        ("in", "out", "relu"),
        ("attn_in", "attn_out", "gelu"),
        ("mlp_in", "mlp_in", "relu"),
    ],
)
def test_dit_position_adapter_matches_hand_written_block(source, dest, act):
    model, adapter, _ = dit(source, dest, act)
    x, c, out = check_against_reference(model, adapter, "task", TASK)
    with adapters_disabled("pa"), conditions(task=TASK):
        plain = model.blocks[0](x, c)
    assert (out - plain).abs().max() > 1e-3
    assert torch.equal(out[2], plain[2])  # the null-task row gets no update


@pytest.mark.parametrize(
    "block_kind,kernel,weighting",
    [
        ("res", "1x1", lambda: LinearWeighting(4, 0, 9)),
        ("attn", "full", lambda: LinearWeighting(4, 0, 9)),
        ("res", "full", lambda: LinearWeighting(4, 0, 9)),  # 004's 3x3, routed sparsely
        ("res", "full", lambda: TrainableWeighting(10, 3, "gaussian")),  # 3x3, dense mixing
        ("res", 5, lambda: IndexWeighting(10)),
    ],
)
def test_unet_blocks_in_to_out(block_kind, kernel, weighting):
    torch.manual_seed(0)
    # float32: the U-Net's GroupNorm32 computes in float32 whatever the input (improved-diffusion's
    # habit), so these blocks do not run in float64; float32 rounding needs the looser 1e-5.
    block = ResBlock(4, None, 0.0, 6) if block_kind == "res" else AttentionBlock(4, 2)
    randomize(block)
    model = Blocks(block)
    inject_position_adapter(model, "pa", weighting, "t", ["blocks.0"], "in", "out", 2, "relu", 1.5, kernel)
    adapter = block.position_adapters["pa"]
    assert adapter.kernel == {"1x1": 1, "full": 3 if block_kind == "res" else 1}.get(kernel, kernel)
    randomize(adapter, seed=2)
    x = torch.randn(4, 4, 3, 3)
    values = T_VALUES if isinstance(adapter.weighting, LinearWeighting) else torch.tensor([0, 9, 4, -1])
    with conditions(t=values):
        out = block(x) if block_kind == "attn" else block(x, None)
    if block_kind == "res":  # skip(x) + out_layers(in_layers(x)), written out
        plain = block.skip_connection(x) + block.out_layers(block.in_layers(x))
    else:
        with adapters_disabled():
            plain = block(x)
    update = ref_conv_update if adapter.kernel > 1 else lambda a, h, v: ref_update(a, h, v, channels_last=False)
    ref = plain + update(adapter, x, values)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(out[3], plain[3])  # NaN / -1: no update
    grad = torch.randn_like(out)
    params = list(adapter.parameters())
    for g, r in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad), strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=0)


def test_resblock_adapter_shapes_and_counts():
    """004's ResBlock adapter: 3x3 down (C_in -> r, bias) and 3x3 up (r -> C_out, bias) convolutions."""
    model = Blocks(ResBlock(4, None, 0.0, 6))
    report = inject_position_adapter(model, "pa", lambda: IndexWeighting(2), "task", ["blocks.0"], "in", "out", 3)
    a = model.blocks[0].position_adapters["pa"]
    assert (a.lora_down.shape, a.down_bias.shape, a.lora_up.shape, a.bias.shape) == (
        (2, 3, 4 * 9),
        (2, 3),
        (2, 6, 3 * 9),
        (2, 6),
    )
    assert report.adapter_params == 2 * (4 * 9 * 3 + 3 + 3 * 9 * 6 + 6)
    with pytest.raises(ValueError, match="kernel must be 'full', '1x1' or an odd size >= 1, got 2"):
        inject_position_adapter(model, "pb", lambda: IndexWeighting(2), "task", ["blocks.0"], "in", "out", 3, kernel=2)
    with pytest.raises(ValueError, match="a 3x3 position adapter needs a block of feature maps; DiTBlock has tokens"):
        inject_position_adapter(
            Blocks(DiTBlock(8, 2)), "pa", lambda: IndexWeighting(2), "task", ["blocks.0"], "in", "out", kernel=3
        )


def test_dit_position_adapter_with_a_trainable_table():
    model, adapter, _ = dit("attn_in", "mlp_out", "gelu", lambda: TrainableWeighting(10, 3, "gaussian"), "t")
    check_against_reference(model, adapter, "t", torch.tensor([0, 9, -1, 4]))


def test_fresh_adapter_changes_nothing_and_paths_are_stable():
    torch.manual_seed(0)
    model = Blocks(DiTBlock(8, 2)).double()
    randomize(model)
    names_before = [n for n, _ in model.named_parameters()]
    x, c = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    before = model.blocks[0](x, c)
    report = inject_position_adapter(model, "pa", lambda: IndexWeighting(2), "task", ["blocks.0"], "in", "mlp_out", 4)
    with conditions(task=torch.tensor([0, 1])):
        assert torch.equal(model.blocks[0](x, c), before)
    names = [n for n, _ in model.named_parameters()]
    assert names[: len(names_before)] == names_before
    assert names[len(names_before) :] == [
        "blocks.0.position_adapters.pa.lora_down",
        "blocks.0.position_adapters.pa.down_bias",
        "blocks.0.position_adapters.pa.lora_up",
        "blocks.0.position_adapters.pa.bias",
    ]
    assert report.adapter_params == 2 * (4 * 8 + 4 + 8 * 4 + 8)
    assert {id(p) for p in adapter_parameters(model)} == {id(p) for p in model.blocks[0].position_adapters.parameters()}
    freeze_base(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names[len(names_before) :]


def test_deepcopy_rebinds_the_hooks():
    model, adapter, _ = dit("in", "out")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.blocks[0].position_adapters["pa"].bias.add_(1.0)
    x, c = torch.randn(4, 3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with conditions(task=torch.tensor([0, 0, 1, 2])):
        diff = twin.blocks[0](x, c) - model.blocks[0](x, c)
    torch.testing.assert_close(diff, torch.full_like(diff, 0.7), atol=TOL, rtol=0)  # scale * 1.0, own hooks only


def test_bad_taps_and_targets_are_errors():
    model = Blocks(DiTBlock(8, 2))
    with pytest.raises(ValueError, match="source tap 'out' comes after dest tap 'in'"):
        inject_position_adapter(model, "pa", lambda: IndexWeighting(2), "task", ["blocks.0"], "out", "in")
    with pytest.raises(ValueError, match="'ffn_in' is not a tap of DiTBlock; its taps: in, attn_in"):
        inject_position_adapter(model, "pa", lambda: IndexWeighting(2), "task", ["blocks.0"], "ffn_in", "out")
    with pytest.raises(ValueError, match=r"match no block with taps; blocks with taps include: blocks.0"):
        inject_position_adapter(model, "pa", lambda: IndexWeighting(2), "task", ["attn"], "in", "out")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        inject_position_adapter(model, "pa", lambda: IndexWeighting(2), "task", ["blocks.0"], "in", "out", 2, "tanh")
    assert not hasattr(model.blocks[0], "position_adapters") or not model.blocks[0].position_adapters
