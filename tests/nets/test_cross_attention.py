"""Cross-attention blocks (``model.attention: cross``) and 004's positions inside them.

Reference: LDM's transformer block written out here with attention as an explicit
softmax(q k^T / sqrt(d)) v over einsums, the GEGLU feed-forward from its formula, and a position
adapter's ``scale (up act(down h) + bias)`` added at its output position. Float64; one tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflora.adapters import IndexWeighting, conditions, inject_position_adapter
from difflora.config.schema import ConfigError, ModelConfig, parse_config
from difflora.model.build import build_model
from difflora.nets import build_net, count_parameters
from difflora.nets.transformer import TRANSFORMER_TAP_PAIRS, TransformerBlock

TOL = 1e-10


def randomize(module: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def naive_attention(attn, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    n, t, d = x.shape
    h = attn.heads
    q = (x @ attn.to_q.weight.t()).reshape(n, t, h, d // h)
    k = (ctx @ attn.to_k.weight.t()).reshape(n, ctx.shape[1], h, d // h)
    v = (ctx @ attn.to_v.weight.t()).reshape(n, ctx.shape[1], h, d // h)
    w = torch.softmax(torch.einsum("nthd,nshd->nhts", q, k) / math.sqrt(d // h), dim=-1)
    out = torch.einsum("nhts,nshd->nthd", w, v).reshape(n, t, d)
    return out @ attn.to_out.weight.t() + attn.to_out.bias


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + norm.eps)
    return y * norm.weight + norm.bias if norm.elementwise_affine else y


def reference_block(block: TransformerBlock, x, ctx, c=None, adapter=None) -> torch.Tensor:
    """The block from its definition; ``adapter`` = (source, dest, fn) adds fn(h_source) at dest."""
    acts = {}

    def at(name, h):
        acts[name] = h
        if adapter is not None and name == adapter[1]:
            h = h + adapter[2](acts[adapter[0]])
        return h

    if c is None:
        mods = [(0.0, 0.0, 1.0)] * 3
    else:
        m = (F.silu(c) @ block.adaLN_modulation[1].weight.t() + block.adaLN_modulation[1].bias)[:, None]
        m = m.chunk(9, dim=-1)
        mods = [m[0:3], m[3:6], m[6:9]]
    norms = (block.norm1, block.norm2, block.norm3)

    def pre(i, h):
        return layer_norm(h, norms[i]) * (1 + mods[i][1]) + mods[i][0]

    x = at("attn1_in", x)
    a = at("attn1_out", naive_attention(block.attn1, pre(0, x), pre(0, x)))
    x = at("attn2_in", x + mods[0][2] * a)
    ctx = at("context", ctx)
    a = at("attn2_out", naive_attention(block.attn2, pre(1, x), ctx))
    x = at("ff_in", x + mods[1][2] * a)
    hid, gate = (pre(2, x) @ block.ff.proj.weight.t() + block.ff.proj.bias).chunk(2, dim=-1)
    gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    f = at("ff_out", (hid * gelu) @ block.ff.out.weight.t() + block.ff.out.bias)
    return at("out", x + mods[2][2] * f)


@pytest.mark.parametrize("adaln", [False, True])
def test_block_matches_hand_written_reference(adaln):
    block = randomize(TransformerBlock(8, 2, 6, 12, cond_dim=5 if adaln else None).double())
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    ctx = torch.randn(3, 4, 6, dtype=torch.float64)
    c = torch.randn(3, 5, dtype=torch.float64) if adaln else None
    torch.testing.assert_close(block(x, ctx, c), reference_block(block, x, ctx, c), atol=TOL, rtol=0)


def cross_cfg(arch: str, **kw) -> ModelConfig:
    base = {
        "arch": arch,
        "image_size": 8,
        "in_channels": 1,
        "num_classes": 10,
        "attention": "cross",
        "context": {"dim": 16, "tokens": 3},
    }
    # Each backbone gets only its own section: a section the arch does not build is refused.
    sections = {
        "unet": {"unet": {"model_channels": 32, "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 2}},
        "dit": {"dit": {"preset": "DiT-T/2"}},
    }
    return ModelConfig.model_validate({**base, **sections[arch], **kw})


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_shapes_and_null_context(arch):
    # The U-Net's GroupNorm computes in float32 whatever the input, so it is checked in float32.
    dtype, tol = (torch.float32, 1e-5) if arch == "unet" else (torch.float64, TOL)
    net = randomize(build_net(cross_cfg(arch)).to(dtype), std=0.1).eval()
    x, t = torch.randn(4, 1, 8, 8, dtype=dtype), torch.tensor([3.0, 500.0, 10.0, 999.0])
    y = torch.tensor([2, -1, 7, -1])
    out = net(x, t, y)
    assert out.shape == (4, 2, 8, 8)
    # y = -1 rows see the learned null context, exactly as a wholly unconditional batch (y=None).
    torch.testing.assert_close(out[[1, 3]], net(x, t, None)[[1, 3]], atol=tol, rtol=0)
    # The label matters where it is given.
    assert (out[0] - net(x, t, torch.tensor([3, -1, 7, -1]))[0]).abs().max() > 1e-3
    # A caller's context [N x L x D] is used for every row but the null ones: handing the net its
    # own label tokens reproduces the label-conditioned output.
    tokens = net.context_embedder.embedding.weight[[2, 0, 7, 0]].view(4, 3, 16)
    torch.testing.assert_close(net(x, t, y, context=tokens), out, atol=tol, rtol=0)
    other = net(x, t, y, context=torch.randn(4, 3, 16, dtype=dtype))
    torch.testing.assert_close(other[[1, 3]], out[[1, 3]], atol=tol, rtol=0)
    assert (other[0] - out[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"context must be \[N x L x 16\]"):
        net(x, t, y, context=torch.randn(4, 3, 5, dtype=dtype))
    with pytest.raises(ValueError, match="null context of 3 token"):
        net(x, t, y, context=torch.randn(4, 2, 16, dtype=dtype))


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_default_attention_unchanged_and_context_refused(arch):
    cfg = cross_cfg(arch, attention="self", context={})  # a context section is refused under self-attention
    net = build_net(cfg)
    assert not any(isinstance(m, TransformerBlock) for m in net.modules())
    with pytest.raises(ValueError, match="model.attention=cross"):
        net(torch.randn(1, 1, 8, 8), torch.tensor([1]), None, context=torch.randn(1, 3, 16))
    cross = build_net(cross_cfg(arch))
    # The class moves from the additive embedding into the context.
    names = {n for n, _ in cross.named_parameters()}
    assert "context_embedder.embedding.weight" in names
    assert not any(n.startswith(("label_emb", "y_embedder")) for n in names)


def test_model_passes_caller_context_through_the_wrapper(tiny_config):
    cfg = tiny_config("tiny-cross-unet")
    model = build_model(cfg)
    randomize(model.net, std=0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    ctx = torch.randn(2, 2, 16)
    net_t = model.backbone_timesteps(t)
    torch.testing.assert_close(model(x, t, None, context=ctx), model.net(x, net_t, None, context=ctx), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_tiny_cross_config_trains(tmp_path, arch, tiny_config):
    from difflora.train import train

    cfg = tiny_config(f"tiny-cross-{arch}", "train.steps=3", "train.ckpt_every=3", "train.log_every=1")
    result = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert result["step"] == 3 and math.isfinite(result["last"]["loss"])


# --------------------------------------------------------------------------- 004's positions


def adapted_block(source: str, dest: str, act: str = "relu"):
    model = nn.Module()
    model.blocks = nn.ModuleList([randomize(TransformerBlock(8, 2, 6, 12).double())])
    inject_position_adapter(model, "pa", lambda: IndexWeighting(2), "task", ["blocks.0"], source, dest, 3, act, 0.5)
    adapter = randomize(model.blocks[0].position_adapters["pa"], seed=1)
    return model.blocks[0], adapter


@pytest.mark.parametrize("source,dest", TRANSFORMER_TAP_PAIRS)
def test_every_valid_pair_matches_the_reference(source, dest):
    block, adapter = adapted_block(source, dest)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    ctx = torch.randn(2, 4, 6, dtype=torch.float64)
    task = torch.tensor([1, 1])

    def fn(h):
        z = h @ adapter.lora_down[1].t() + adapter.down_bias[1]
        return 0.5 * (torch.relu(z) @ adapter.lora_up[1].t() + adapter.bias[1])

    with conditions(task=task):
        out = block(x, ctx)
    ref = reference_block(block, x, ctx, adapter=(source, dest, fn))
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    assert (out - reference_block(block, x, ctx)).abs().max() > 1e-3


def test_004_has_twenty_pairs_and_others_are_errors():
    from difflora.nets.unet import ResBlock

    res_pairs = [
        (s, d) for s in ResBlock.TAPS for d in ResBlock.TAPS if ResBlock.TAPS.index(s) <= ResBlock.TAPS.index(d)
    ]
    assert len(TRANSFORMER_TAP_PAIRS) + len(res_pairs) == 20
    for source, dest in [
        ("attn1_out", "attn1_out"),
        ("attn2_out", "attn2_out"),
        ("context", "out"),
        ("ff_out", "ff_out"),
    ]:
        with pytest.raises(ValueError, match=r"not a valid \(source, dest\) pair.*valid pairs: attn1_in->attn1_in"):
            adapted_block(source, dest)


def test_position_adapter_from_config_and_bad_pair_named(tiny_config):
    cfg = tiny_config("tiny-cross-unet")
    tree = cfg.model_dump(mode="json")
    entry = {
        "name": "pa",
        "form": "position",
        "source": "attn2_out",
        "dest": "ff_in",
        "rank": 4,
        "activation": "silu",
        "scale": 2.0,
        "condition": "task",
        "weighting": "index",
        "num_values": 2,
        "targets": ["re:.*transformer_blocks\\.\\d+"],
    }
    tree["model"]["adapters"] = [entry]
    model = build_model(parse_config(tree))
    layers = model.adapter_report.layers
    # 4 attention sites at 4 px: one input block, the middle block, two output blocks.
    assert len(layers) == 4 and all(r.path.endswith("transformer_blocks.0") for r in layers)
    assert all(r.num_params == 2 * (4 * 32 + 4 + 32 * 4 + 32) for r in layers)  # 2 tasks x (down + bias, up + bias)
    tree["model"]["adapters"] = [{**entry, "dest": "attn2_in"}]
    with pytest.raises(ValueError, match="valid pairs"):
        build_model(parse_config(tree))
    with pytest.raises(ConfigError, match="model.attention"):
        parse_config(tree, ["model.attention=both"])


@pytest.mark.parametrize("adaln", [False, True])
def test_block_parameter_count_closed_form(adaln):
    d, dc, inner, cond = 32, 16, 128, 24
    block = TransformerBlock(d, 4, dc, inner, cond if adaln else None)
    norms = 0 if adaln else 3 * 2 * d
    attn1 = 4 * d * d + d  # q, k, v without bias; out with bias
    attn2 = 2 * d * d + 2 * dc * d + d
    ff = d * 2 * inner + 2 * inner + inner * d + d  # GEGLU's doubled projection, then back to d
    mod = cond * 9 * d + 9 * d if adaln else 0
    assert count_parameters(block) == norms + attn1 + attn2 + ff + mod


def test_guidance_with_a_caller_context_uses_the_null_context_for_the_unconditional_half():
    from difflora.diffusion.guidance import ClassifierFreeGuidance

    net = randomize(build_net(cross_cfg("dit")).double(), std=0.1).eval()
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([4.0, 40.0])
    y, ctx = torch.tensor([1, 5]), torch.randn(2, 3, 16, dtype=torch.float64)
    guided = ClassifierFreeGuidance(net, 3.0)(x, t, y, context=ctx)
    cond, uncond = net(x, t, y, context=ctx), net(x, t, None)
    torch.testing.assert_close(guided[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]), atol=TOL, rtol=0)
    torch.testing.assert_close(guided[:, 1:], cond[:, 1:], atol=TOL, rtol=0)
