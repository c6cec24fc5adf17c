"""004's positions inside diffusers' blocks (``difflora.nets.diffusers_taps``).

References: the raw diffusers model (zero-init adapters change nothing, bit for bit), and the
forwards of ``BasicTransformerBlock`` and ``ResnetBlock2D`` written out here from their weights
(layer and group norms, attention as softmax(q k^T / sqrt(d)) v, GEGLU, convolutions), with the
adapter's ``scale (up act(down h) + bias)`` added at its output position. Float64; one tolerance.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("diffusers")

from diffusers.models.attention import BasicTransformerBlock  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from difflora.adapters import (  # noqa: E402
    IndexWeighting,
    SharedWeighting,
    conditions,
    inject_position_adapter,
    load_adapters,
    save_adapters,
)
from difflora.config.schema import parse_config  # noqa: E402
from difflora.model.build import DiffusionModel  # noqa: E402
from difflora.nets.diffusers_taps import add_diffusers_taps  # noqa: E402
from difflora.nets.diffusers_wrap import DiffusersNet, build_diffusers_model  # noqa: E402
from difflora.nets.transformer import TRANSFORMER_TAP_PAIRS  # noqa: E402
from difflora.train import latest_checkpoint, load_weights, open_run, train  # noqa: E402

TOL = 1e-10
RES_PAIRS = [("in", "in"), ("in", "out"), ("out", "out")]
PAIRS_004 = [*TRANSFORMER_TAP_PAIRS, *RES_PAIRS]
TRANSFORMERS, RESNETS = "re:.*transformer_blocks\\.\\d+", "re:.*resnets\\.\\d+"
UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "cross_attention_dim": 16,
}


def randomize(module: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def targets(source: str) -> list[str]:
    return [RESNETS if source in ("in", "out") else TRANSFORMERS]


# ------------------------------------------------------------------- references, from the weights


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def group_norm(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    n, c = x.shape[:2]
    g = x.reshape(n, norm.num_groups, -1)
    mu = g.mean(-1, keepdim=True)
    var = ((g - mu) ** 2).mean(-1, keepdim=True)
    y = ((g - mu) / torch.sqrt(var + norm.eps)).reshape(x.shape)
    return y * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def attention(attn: nn.Module, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    n, t, d = x.shape
    h = attn.heads
    q = (x @ attn.to_q.weight.t()).reshape(n, t, h, d // h)
    k = (ctx @ attn.to_k.weight.t()).reshape(n, ctx.shape[1], h, d // h)
    v = (ctx @ attn.to_v.weight.t()).reshape(n, ctx.shape[1], h, d // h)
    w = torch.softmax(torch.einsum("nthd,nshd->nhts", q, k) / math.sqrt(d // h), dim=-1)
    out = torch.einsum("nhts,nshd->nthd", w, v).reshape(n, t, d)
    return out @ attn.to_out[0].weight.t() + attn.to_out[0].bias


def geglu(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    proj, out = ff.net[0].proj, ff.net[2]
    a, gate = (x @ proj.weight.t() + proj.bias).chunk(2, dim=-1)
    return (a * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))) @ out.weight.t() + out.bias


def reference_transformer(block, x, ctx, adapter=None) -> torch.Tensor:
    """norm1 -> attn1 -> residual, norm2 -> attn2 -> residual, norm3 -> ff -> residual; ``adapter`` =
    (source, dest, fn) adds fn(h_source) at dest."""
    acts = {}

    def at(name, h):
        acts[name] = h
        if adapter is not None and name == adapter[1]:
            h = h + adapter[2](acts[adapter[0]])
        return h

    x = at("attn1_in", x)
    a = at("attn1_out", attention(block.attn1, layer_norm(x, block.norm1), layer_norm(x, block.norm1)))
    x = at("attn2_in", x + a)
    c = at("context", ctx)
    a = at("attn2_out", attention(block.attn2, layer_norm(x, block.norm2), c))
    x = at("ff_in", x + a)
    f = at("ff_out", geglu(block.ff, layer_norm(x, block.norm3)))
    return at("out", x + f)


def conv(x: torch.Tensor, layer: nn.Conv2d) -> torch.Tensor:
    return F.conv2d(x, layer.weight, layer.bias, padding=layer.padding)


def reference_resnet(block, x, temb, adapter=None) -> torch.Tensor:
    """GN, SiLU, conv 3x3, + time, GN, SiLU, conv 3x3, + shortcut(x), / output_scale_factor."""
    acts = {}

    def at(name, h):
        acts[name] = h
        if adapter is not None and name == adapter[1]:
            h = h + adapter[2](acts[adapter[0]])
        return h

    x = at("in", x)
    h = conv(F.silu(group_norm(x, block.norm1)), block.conv1)
    h = h + (F.silu(temb) @ block.time_emb_proj.weight.t() + block.time_emb_proj.bias)[:, :, None, None]
    h = conv(F.silu(group_norm(h, block.norm2)), block.conv2)
    skip = x if block.conv_shortcut is None else conv(x, block.conv_shortcut)
    return at("out", (skip + h) / block.output_scale_factor)


def adapted(block: nn.Module, source: str, dest: str, act: str = "relu"):
    model = nn.Module()
    model.blocks = nn.ModuleList([randomize(block.double())])
    assert add_diffusers_taps(model) == ["blocks.0"]
    inject_position_adapter(model, "pa", lambda: IndexWeighting(2), "task", ["blocks.0"], source, dest, 3, act, 0.5)
    return model.blocks[0], randomize(model.blocks[0].position_adapters["pa"], seed=1)


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("source,dest", TRANSFORMER_TAP_PAIRS)
def test_basic_transformer_block_with_an_adapter_is_the_hand_written_forward_plus_its_term(source, dest):
    block, adapter = adapted(BasicTransformerBlock(8, 2, 4, cross_attention_dim=6), source, dest)
    x, ctx = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)

    def fn(h):  # entry 1 of the bank: the task of both samples
        z = h @ adapter.lora_down[1].t() + adapter.down_bias[1]
        return 0.5 * (torch.relu(z) @ adapter.lora_up[1].t() + adapter.bias[1])

    with conditions(task=torch.tensor([1, 1])):
        out = block(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(out, reference_transformer(block, x, ctx, (source, dest, fn)), atol=TOL, rtol=0)
    assert (out - reference_transformer(block, x, ctx)).abs().max() > 1e-3
    with conditions(task=torch.tensor([-1, -1])):  # the "no update" value: exactly the block
        torch.testing.assert_close(block(x, encoder_hidden_states=ctx), reference_transformer(block, x, ctx))


@pytest.mark.parametrize("source,dest", RES_PAIRS)
def test_resnet_block_with_an_adapter_is_the_hand_written_forward_plus_its_3x3_term(source, dest):
    block, adapter = adapted(ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=16, groups=4), source, dest)
    x, temb = torch.randn(2, 8, 5, 5, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    c_in, c_out = block.tap_channels[source], block.tap_channels[dest]
    assert adapter.kernel == 3  # 004's ResBlock adapters are 3 x 3 convolutions

    def fn(h):
        z = F.conv2d(h, adapter.lora_down[0].view(3, c_in, 3, 3), adapter.down_bias[0], padding=1)
        return 0.5 * (
            F.conv2d(torch.relu(z), adapter.lora_up[0].view(c_out, 3, 3, 3), padding=1) + adapter.bias[0][:, None, None]
        )

    with conditions(task=torch.tensor([0, 0])):
        out = block(x, temb)
    torch.testing.assert_close(out, reference_resnet(block, x, temb, (source, dest, fn)), atol=TOL, rtol=0)
    assert (out - reference_resnet(block, x, temb)).abs().max() > 1e-3


def _unet(raw: nn.Module) -> DiffusionModel:
    return DiffusionModel(DiffusersNet(copy.deepcopy(raw))).eval()


@pytest.mark.parametrize("source,dest", PAIRS_004)
def test_every_pair_of_004_on_a_unet2dconditionmodel(source, dest):
    """Zero init: the raw diffusers UNet bit for bit. Trained: a different output, and gradients
    reach every adapter parameter through forward and backward."""
    torch.manual_seed(0)
    raw = build_diffusers_model("UNet2DConditionModel", UNET).eval()
    model = _unet(raw)
    report = inject_position_adapter(
        model, "pa", lambda: SharedWeighting(), "t", targets(source), source, dest, 4, "silu", 1.0
    )
    assert len(report.layers) == (4 if source not in ("in", "out") else 8)
    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g), torch.tensor([3, 700])
    with torch.no_grad():
        base = raw(x, model.backbone_timesteps(t), encoder_hidden_states=ctx, return_dict=False)[0]
        assert torch.equal(model(x, t, None, context=ctx), base)
    for _, adapter in model.named_modules():
        if hasattr(adapter, "lora_up"):
            randomize(adapter, seed=2, std=0.1)
    out = model(x, t, None, context=ctx)
    assert (out - base).abs().max() > 1e-4
    out.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".position_adapters.pa." in n]
    assert len(grads) == 4 * len(report.layers)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_a_tapped_diffusers_unet_computes_what_the_raw_one_does_and_deep_copies():
    raw = build_diffusers_model("UNet2DConditionModel", UNET).eval()
    model = _unet(raw)
    tapped = [p for p, m in model.named_modules() if hasattr(m, "TAPS")]
    assert sum(p.endswith("transformer_blocks.0") for p in tapped) == 4 and sum(".resnets." in p for p in tapped) == 8
    assert list(model.net.model.state_dict()) == list(raw.state_dict())  # taps add no parameter, rename none
    inject_position_adapter(model, "pa", lambda: IndexWeighting(2), "task", [TRANSFORMERS], "attn2_in", "ff_in")
    for name, p in model.named_parameters():
        if ".position_adapters." in name:
            torch.nn.init.normal_(p, std=0.1)
    twin = copy.deepcopy(model)  # the copy's hooks act on the copy's own taps and adapters
    x, ctx, t, task = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 16), torch.tensor([3, 70]), torch.tensor([0, 1])
    with torch.no_grad(), conditions(task=task):
        a = model(x, t, None, context=ctx)
        assert torch.equal(twin(x, t, None, context=ctx), a)
        for p in twin.parameters():
            p.zero_()
        assert torch.equal(model(x, t, None, context=ctx), a)


def test_adapters_on_diffusers_blocks_save_and_reload_bit_identically(tmp_path):
    base = _unet(build_diffusers_model("UNet2DConditionModel", UNET))
    model = copy.deepcopy(base)
    inject_position_adapter(model, "pa", lambda: IndexWeighting(2), "task", [TRANSFORMERS], "attn1_out", "out", 4)
    inject_position_adapter(model, "res", lambda: IndexWeighting(2), "task", [RESNETS], "in", "out", 2, "gelu")
    for name, p in model.named_parameters():
        if ".position_adapters." in name:
            torch.nn.init.normal_(p, std=0.1)
    save_adapters(model, tmp_path / "adapters")
    fresh = copy.deepcopy(base)
    load_adapters(fresh, tmp_path / "adapters")
    assert sorted(fresh.state_dict()) == sorted(model.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    key = "net.model.mid_block.attentions.0.transformer_blocks.0.position_adapters.pa.lora_down"
    assert key in fresh.state_dict()  # the stable path: <block>.position_adapters.<name>
    x, ctx, t, task = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 16), torch.tensor([3, 70]), torch.tensor([1, 0])
    with torch.no_grad(), conditions(task=task):
        assert torch.equal(fresh(x, t, None, context=ctx), model(x, t, None, context=ctx))


def test_chunked_feed_forward_is_refused_with_adapters_only():
    raw = build_diffusers_model("UNet2DConditionModel", UNET).eval()
    model = _unet(raw)
    blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    for block in blocks:
        block.set_chunk_feed_forward(1, 1)  # diffusers' feed-forward chunking, one token at a time
    x, ctx, t = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 16), torch.tensor([3])
    with torch.no_grad():
        model(x, t, None, context=ctx)  # no adapter: chunking is fine
        inject_position_adapter(model, "pa", lambda: SharedWeighting(), "t", [TRANSFORMERS], "ff_in", "out")
        with pytest.raises(ValueError, match=r"cannot chunk its feed-forward: call set_chunk_feed_forward\(None\)"):
            model(x, t, None, context=ctx)
        for block in blocks:
            block.set_chunk_feed_forward(None)
        model(x, t, None, context=ctx)


def test_bad_taps_and_pairs_name_the_valid_ones():
    model = _unet(build_diffusers_model("UNet2DConditionModel", UNET))
    with pytest.raises(
        ValueError, match=r"source tap 'attn3_in' is not a tap of BasicTransformerBlock; its taps: attn1_in, attn1_out"
    ):
        inject_position_adapter(model, "pa", lambda: SharedWeighting(), "t", [TRANSFORMERS], "attn3_in", "out")
    with pytest.raises(
        ValueError, match=r"\(ff_out, attn1_in\) is not a valid \(source, dest\) pair.*valid pairs: attn1_in->attn1_in"
    ):
        inject_position_adapter(model, "pa", lambda: SharedWeighting(), "t", [TRANSFORMERS], "ff_out", "attn1_in")
    with pytest.raises(
        ValueError, match=r"source tap 'out' comes after dest tap 'in' in ResnetBlock2D's forward \(order: in, out\)"
    ):
        inject_position_adapter(model, "pa", lambda: SharedWeighting(), "t", [RESNETS], "out", "in")
    assert not any(".position_adapters" in n for n, _ in model.named_modules())


def test_a_trained_run_with_adapters_in_diffusers_blocks_reloads_bit_identically(tmp_path):
    adapters = [
        {"name": "pa", "form": "position", "source": "attn2_out", "dest": "ff_in", "rank": 2, "activation": "gelu"},
        {"name": "res", "form": "position", "source": "in", "dest": "out", "rank": 2, "targets": [RESNETS]},
    ]
    adapters[0]["targets"] = [TRANSFORMERS]
    for entry in adapters:
        entry |= {"condition": "y", "weighting": "index", "num_values": 10}
    unet = {k: v for k, v in UNET.items() if k not in ("sample_size", "in_channels", "out_channels")}
    cfg = parse_config(
        {
            "model": {
                "arch": "diffusers",
                "num_classes": 10,
                "learn_sigma": False,
                "diffusers": {"class_name": "UNet2DConditionModel", "config": unet},
                "adapters": adapters,
            },
            "diffusion": {"steps": 20},
            "train": {"steps": 3, "batch_size": 4, "lr": 1e-2, "train_base": False, "ckpt_every": 3, "ema_decay": 0},
            "sample": {"num": 2, "steps": 2},
        }
    )
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    state, _ = load_weights(latest_checkpoint(tmp_path / "run"), "model")
    _, first, _ = open_run(tmp_path / "run", "model")
    _, second, _ = open_run(tmp_path / "run", "model")
    loaded = first.state_dict()
    assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    ups = [v for k, v in state.items() if ".position_adapters." in k and k.endswith("lora_up")]
    assert len(ups) == 12 and all(v.abs().sum() > 0 for v in ups)  # 4 transformer blocks + 8 resnets, trained
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 9, 17]), torch.tensor([2, -1, 7])
    with torch.no_grad():
        assert torch.equal(first(x, t, y), second(x, t, y))


def test_blocks_whose_forward_the_taps_do_not_describe_get_none():
    dit = build_diffusers_model(
        "DiTTransformer2DModel",
        {"sample_size": 8, "in_channels": 1, "out_channels": 1, "num_attention_heads": 2, "attention_head_dim": 8}
        | {"num_layers": 1, "patch_size": 2, "num_embeds_ada_norm": 10},
    )
    assert add_diffusers_taps(dit) == []  # ada_norm_zero blocks without cross-attention: not LDM's block
    model = nn.Module()
    model.down = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4, down=True)
    model.plain = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=4, groups=4)
    assert add_diffusers_taps(model) == ["plain"] and add_diffusers_taps(model) == ["plain"]  # once
    with pytest.raises(ValueError, match=r"match no block with taps; blocks with taps include: none \(position"):
        inject_position_adapter(dit, "pa", lambda: SharedWeighting(), "t", [TRANSFORMERS], "attn2_out", "ff_in")
