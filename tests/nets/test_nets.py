"""Backbones: parameter counts of the paper configurations, improved-diffusion naming, null labels,
optional embeddings, zero-init, and attention / embeddings against naive formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflora.config.schema import Config, ModelConfig
from difflora.nets import DIT_PRESETS, build_net, count_parameters
from difflora.nets.dit import Attention, get_2d_sincos_pos_embed
from difflora.nets.layers import dot_product_attention, timestep_embedding
from difflora.nets.unet import AttentionBlock

# Seed 000's CIFAR-10 U-Net flags (improved-diffusion's cifar10 run).
CIFAR_UNET = {
    "model_channels": 128,
    "num_res_blocks": 3,
    "attention_resolutions": [16, 8],
    "num_heads": 4,
    "dropout": 0.3,
    "use_scale_shift_norm": True,
}
TINY_UNET = {"model_channels": 32, "num_res_blocks": 1, "attention_resolutions": [4], "num_heads": 2}


def model_cfg(**kw) -> ModelConfig:
    base = {"image_size": 8, "in_channels": 1, "learn_sigma": True}
    if kw.get("arch", "unet") == "unet":
        base["unet"] = TINY_UNET
    else:
        base["dit"] = {"preset": "DiT-T/2"}
    base.update(kw)
    return ModelConfig.model_validate(base)


def randomize_(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter by N(0, 0.1) so that zero-initialised paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def inputs(n: int = 4, c: int = 1, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g)


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, 52_546_438),  # 000 / improved-diffusion CIFAR-10, unconditional
        ({"num_classes": 10}, 52_551_558),  # + 10 x 512 class rows, no null row
        ({"time_embed": False}, 45_257_350),  # TimeLoRA base (000 section 5.1): no time_embed, no emb_layers
    ],
)
def test_unet_cifar_parameter_counts(extra, expected):
    cfg = Config.model_validate({"data": {"name": "cifar10"}, "model": {"unet": CIFAR_UNET, **extra}}).model
    assert (cfg.image_size, cfg.in_channels, cfg.learn_sigma) == (32, 3, True)
    net = build_net(cfg)
    assert count_parameters(net) == expected


def test_unet_no_embeddings_has_no_embedding_layers():
    cfg = model_cfg(num_classes=3, time_embed=False, class_embed=False)
    names = [n for n, _ in build_net(cfg).named_parameters()]
    assert not [n for n in names if "emb" in n]


def test_dit_s2_parameter_count():
    cfg = ModelConfig(arch="dit", image_size=32, in_channels=4, num_classes=1000, dit={"preset": "DiT-S/2"})
    net = build_net(cfg)
    # DiT paper / facebookresearch/DiT: DiT-S/2 on 32x32x4 latents, 1000 classes, learn_sigma.
    assert count_parameters(net) == 32_865_056
    assert count_parameters(net, trainable_only=False) == 32_865_056  # pos_embed is a buffer, not a parameter
    assert net.pos_embed.shape == (1, 256, 384) and len(net.blocks) == 12


def test_dit_presets_fix_size_fields_and_refuse_other_values():
    assert DIT_PRESETS["DiT-XL/2"] == (28, 1152, 16, 2) and DIT_PRESETS["DiT-T/2"] == (2, 64, 2, 2)
    cfg = model_cfg(arch="dit", dit={"preset": "DiT-T/4", "depth": 2})  # the preset's own value is fine
    net = build_net(cfg)
    assert (len(net.blocks), net.hidden_size, net.patch_size, net.blocks[0].attn.num_heads) == (2, 64, 4, 2)
    # The config (and so config.json) holds what runs.
    assert (cfg.dit.depth, cfg.dit.hidden_size, cfg.dit.num_heads, cfg.dit.patch_size) == (2, 64, 2, 4)
    for key, value in (("depth", 7), ("hidden_size", 96), ("num_heads", 4), ("patch_size", 2)):
        with pytest.raises(
            ValueError, match=rf"model\.dit\.{key}={value} cannot take effect: model\.dit\.preset=DiT-T/4"
        ):
            model_cfg(arch="dit", dit={"preset": "DiT-T/4", key: value})
    with pytest.raises(ValueError, match="unknown preset"):
        model_cfg(arch="dit", dit={"preset": "DiT-Q/2"})


# ----------------------------------------------------------------------------- improved-diffusion naming


def expected_improved_diffusion_state() -> dict[str, tuple[int, ...]]:
    """Names and shapes of improved-diffusion's UNetModel(in_channels=1, model_channels=32,
    out_channels=2, num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
    num_classes=3, num_heads=2, use_scale_shift_norm=True), written out by hand from its unet.py."""

    def res(prefix, cin, cout):
        s = {
            f"{prefix}.in_layers.0.weight": (cin,),
            f"{prefix}.in_layers.0.bias": (cin,),
            f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3),
            f"{prefix}.in_layers.2.bias": (cout,),
            f"{prefix}.emb_layers.1.weight": (2 * cout, 128),
            f"{prefix}.emb_layers.1.bias": (2 * cout,),
            f"{prefix}.out_layers.0.weight": (cout,),
            f"{prefix}.out_layers.0.bias": (cout,),
            f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3),
            f"{prefix}.out_layers.3.bias": (cout,),
        }
        if cin != cout:
            s |= {f"{prefix}.skip_connection.weight": (cout, cin, 1, 1), f"{prefix}.skip_connection.bias": (cout,)}
        return s

    def attn(prefix, c):
        return {
            f"{prefix}.norm.weight": (c,),
            f"{prefix}.norm.bias": (c,),
            f"{prefix}.qkv.weight": (3 * c, c, 1),
            f"{prefix}.qkv.bias": (3 * c,),
            f"{prefix}.proj_out.weight": (c, c, 1),
            f"{prefix}.proj_out.bias": (c,),
        }

    s = {
        "time_embed.0.weight": (128, 32),
        "time_embed.0.bias": (128,),
        "time_embed.2.weight": (128, 128),
        "time_embed.2.bias": (128,),
        "label_emb.weight": (3, 128),
        "input_blocks.0.0.weight": (32, 1, 3, 3),
        "input_blocks.0.0.bias": (32,),
        "input_blocks.2.0.op.weight": (32, 32, 3, 3),
        "input_blocks.2.0.op.bias": (32,),
        "output_blocks.1.2.conv.weight": (64, 64, 3, 3),
        "output_blocks.1.2.conv.bias": (64,),
        "out.0.weight": (32,),
        "out.0.bias": (32,),
        "out.2.weight": (2, 32, 3, 3),
        "out.2.bias": (2,),
    }
    s |= res("input_blocks.1.0", 32, 32)
    s |= res("input_blocks.3.0", 32, 64) | attn("input_blocks.3.1", 64)
    s |= res("middle_block.0", 64, 64) | attn("middle_block.1", 64) | res("middle_block.2", 64, 64)
    s |= res("output_blocks.0.0", 128, 64) | attn("output_blocks.0.1", 64)
    s |= res("output_blocks.1.0", 96, 64) | attn("output_blocks.1.1", 64)
    s |= res("output_blocks.2.0", 96, 32)
    s |= res("output_blocks.3.0", 64, 32)
    return s


def test_unet_state_dict_matches_improved_diffusion_naming():
    # attention at 4 px of an 8 px image = improved-diffusion's downsampling rate 2.
    net = build_net(model_cfg(num_classes=3, unet={**TINY_UNET, "use_scale_shift_norm": True}))
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == expected_improved_diffusion_state()
    convs = {n: type(m) for n, m in net.named_modules() if n.endswith(("qkv", "proj_out"))}
    assert set(convs.values()) == {torch.nn.Conv1d} and "middle_block.1.proj_out" in convs


def test_dit_attention_names_are_linear():
    net = build_net(model_cfg(arch="dit"))
    names = {n: type(m) for n, m in net.named_modules() if n.endswith(("attn.qkv", "attn.proj"))}
    assert names == {f"blocks.{i}.attn.{k}": torch.nn.Linear for i in range(2) for k in ("qkv", "proj")}


# ----------------------------------------------------------------------------- shapes, sizes


@pytest.mark.parametrize("arch", ["unet", "dit"])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shape(arch, learn_sigma):
    net = build_net(model_cfg(arch=arch, in_channels=3, learn_sigma=learn_sigma, num_classes=5))
    x, t = inputs(c=3)
    out = net(x, t, torch.tensor([0, -1, 4, 2]))
    assert out.shape == (4, 6 if learn_sigma else 3, 8, 8)


def test_unet_28px_fashion_mnist():
    cfg = Config.model_validate(
        {"data": {"name": "fashion-mnist"}, "model": {"unet": {**TINY_UNET, "attention_resolutions": [14, 7]}}}
    ).model
    net = build_net(cfg)
    assert net.channel_mult == (1, 2, 2)
    # Attention sits at the 14 px and 7 px levels, none at 28 px.
    attn_blocks = [n for n, m in net.named_modules() if isinstance(m, AttentionBlock)]
    assert (
        "input_blocks.1.1" not in attn_blocks
        and "input_blocks.3.1" in attn_blocks
        and "input_blocks.5.1" in attn_blocks
    )
    x, t = inputs(n=2, size=28)
    assert randomize_(net)(x, t).shape == (2, 2, 28, 28)


def test_unet_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible"):
        build_net(model_cfg(image_size=28, unet={**TINY_UNET, "channel_mult": [1, 2, 2, 2]}))
    with pytest.raises(ValueError, match="no default"):
        build_net(model_cfg(image_size=12))


# ----------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_null_label_rows_equal_unconditional(arch):
    net = randomize_(build_net(model_cfg(arch=arch, num_classes=3))).eval()
    x, t = inputs()
    y = torch.tensor([-1, 2, -1, 0])
    with torch.no_grad():
        mixed = net(x, t, y)
        uncond = net(x, t, None)
        null_only = net(x[y < 0], t[y < 0], None)
    torch.testing.assert_close(mixed[y < 0], null_only, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[y < 0], uncond[y < 0], atol=1e-5, rtol=0)
    # The class rows are conditioned: they differ from the unconditional output.
    assert (mixed[y >= 0] - uncond[y >= 0]).abs().amax() > 1e-3


@pytest.mark.parametrize("arch", ["unet", "dit"])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_time_embed_off_ignores_t(arch, num_classes):
    x, t = inputs()
    y = torch.tensor([1, -1, 0, 2]) if num_classes else None
    t2 = (t + 317) % 1000
    off = randomize_(build_net(model_cfg(arch=arch, time_embed=False, num_classes=num_classes))).eval()
    on = randomize_(build_net(model_cfg(arch=arch, num_classes=num_classes))).eval()
    with torch.no_grad():
        assert torch.equal(off(x, t, y), off(x, t2, y))
        assert (on(x, t, y) - on(x, t2, y)).abs().amax() > 1e-3  # the control: with the embedding, t matters


def test_unet_class_only_embedding_feeds_resblocks():
    net = build_net(model_cfg(num_classes=3, time_embed=False))
    names = [n for n, _ in net.named_parameters()]
    assert "time_embed.0.weight" not in names and "label_emb.weight" in names
    assert "input_blocks.1.0.emb_layers.1.weight" in names


def test_dit_no_embeddings_modulation_is_bias():
    """time_embed and class_embed off: c = 0, so adaLN(c) is the adaLN linear's bias for every sample."""
    net = randomize_(build_net(model_cfg(arch="dit", num_classes=3, time_embed=False, class_embed=False))).eval()
    assert net.t_embedder is None and net.y_embedder is None
    x, t = inputs()
    c = net.condition(t, None, 4, x.dtype)
    mod = net.blocks[0].adaLN_modulation
    torch.testing.assert_close(mod(c), mod[1].bias.expand(4, -1), atol=0, rtol=0)


# ----------------------------------------------------------------------------- init, training


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_fresh_model_outputs_zero(arch):
    torch.manual_seed(0)
    net = build_net(model_cfg(arch=arch, num_classes=3))
    x, t = inputs()
    assert torch.equal(net(x, t, torch.tensor([0, 1, -1, 2])), torch.zeros(4, 2, 8, 8))
    # Every residual branch starts as the identity too (zero_module / adaLN-Zero).
    zero = {n: p for n, p in net.named_parameters() if "out_layers.3" in n or "proj_out" in n or "adaLN" in n}
    assert zero and all(torch.count_nonzero(p) == 0 for p in zero.values())


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_tiny_forward_backward_step(arch):
    torch.manual_seed(0)
    dropout = {"unet": {**TINY_UNET, "dropout": 0.1}} if arch == "unet" else {}  # the U-Net's section only
    net = build_net(model_cfg(arch=arch, num_classes=3, **dropout))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, t = inputs()
    y = torch.tensor([0, -1, 1, 2])
    loss = (net(x, t, y) - x.repeat(1, 2, 1, 1)).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    opt.step()
    with torch.no_grad():
        assert (net(x, t, y) - x.repeat(1, 2, 1, 1)).pow(2).mean() < loss


# ----------------------------------------------------------------------------- against naive formulas


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    emb = timestep_embedding(t, 7)
    half = 3
    expected = torch.zeros(4, 7, dtype=torch.float64)
    for i in range(half):
        f = 10000 ** (-i / half)
        expected[:, i] = torch.cos(t.double() * f)
        expected[:, half + i] = torch.sin(t.double() * f)
    torch.testing.assert_close(emb.double(), expected, atol=1e-4, rtol=0)  # float32 args at t ~ 1000


def test_unet_attention_matches_improved_diffusion_formula():
    """improved-diffusion's QKVAttention: heads are contiguous groups of 3C/heads qkv channels."""
    torch.manual_seed(0)
    block = randomize_(AttentionBlock(64, num_heads=4))
    x = torch.randn(2, 64, 4, 4)
    b, c, heads, d = 2, 64, 4, 16
    xs = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(xs)).reshape(b * heads, 3 * d, -1)
    q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
    s = 1 / math.sqrt(math.sqrt(d))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    h = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    expected = (xs + block.proj_out(h)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dot_product_attention_is_the_softmax_product_for_every_kernel(dtype):
    """Whichever kernel runs (SDPA on contiguous inputs in fp32, the product written out in bf16 on a
    CPU), it computes softmax(q k^T / sqrt(d)) v: on strided views (the U-Net's head split) and
    contiguous ones, self- and cross-attention (S != T), against the formula in float64."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 3, 3 * 8, 10, generator=g)  # the U-Net's [N x heads x 3d x T] before its transpose
    strided = qkv.transpose(-1, -2).chunk(3, dim=-1)
    cross = (
        torch.randn(2, 3, 10, 8, generator=g),
        torch.randn(2, 3, 5, 8, generator=g),
        torch.randn(2, 3, 5, 8, generator=g),
    )
    for q, k, v in (strided, cross):
        w = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(8), dim=-1)
        got = dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        assert got.dtype == dtype and got.shape == q.shape
        tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 keeps 8 significant bits
        torch.testing.assert_close(got.double(), w @ v.double(), atol=tol, rtol=tol)


def test_dit_attention_matches_timm_layout():
    torch.manual_seed(0)
    attn = randomize_(Attention(32, num_heads=4))
    x = torch.randn(2, 9, 32)
    qkv = attn.qkv(x).reshape(2, 9, 3, 4, 8)
    out = torch.empty(2, 9, 4, 8)
    for h in range(4):
        q, k, v = qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h]
        out[:, :, h] = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1) @ v
    torch.testing.assert_close(attn(x), attn.proj(out.reshape(2, 9, 32)), atol=1e-5, rtol=0)


def test_pos_embed_matches_mae_formula():
    dim, g = 16, 3
    pe = get_2d_sincos_pos_embed(dim, g).numpy()
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    for row in range(g):
        for col in range(g):
            a, b = col * omega, row * omega  # first half: column (DiT's "w goes first"), second: row
            expected = np.concatenate([np.sin(a), np.cos(a), np.sin(b), np.cos(b)])
            np.testing.assert_allclose(pe[row * g + col], expected, atol=1e-6)
