"""The condition image as zero-initialised extra input channels of the U-Net (model.spatial_input=concat)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflora.adapters import adapter_parameters
from difflora.model.build import build_model
from difflora.train.base import base_key_map
from helpers import tiny_config

SMALL_UNET = [
    "data.name=digits",
    "model.unet.model_channels=16",
    "model.unet.num_res_blocks=1",
    "model.unet.attention_resolutions=[4]",
    "model.num_classes=10",
]
SPATIAL = "data.spatial={tasks: [edges, lowres, inpaint], lowres: 2}"


def _pair(*extra: str):
    """A base model and a spatial model holding the base's weights (as train.init_from would load them)."""
    base = build_model(tiny_config({}, *SMALL_UNET))
    with torch.no_grad():  # a trained base: no zero-initialised layer left (the output depends on everything)
        for p in base.parameters():
            p.normal_(0.0, 0.2)
    model = build_model(tiny_config({}, *SMALL_UNET, SPATIAL, "train.train_base=false", *extra))
    state = base.state_dict()
    model.load_state_dict({k: state[b] for k, b in base_key_map(model).items()}, strict=False)
    return base, model


def _inputs(n: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(-1, 10, (n,), generator=g)
    spatial = torch.randn(n, 4, 8, 8, generator=g)
    task = torch.tensor([0, 1, 2, 0, 1, 2])[:n]
    return x, t, y, task, spatial


def test_an_adapted_spatial_model_is_the_base_at_step_zero():
    base, model = _pair("model.affiner={tasks: 3}")
    x, t, y, task, spatial = _inputs()
    with torch.no_grad():
        want = base(x, t, y)
        got = model(x, t, y, task=task, spatial=spatial)
    assert torch.equal(got, want)


def test_the_spatial_input_is_the_first_conv_with_concatenated_zero_initialised_channels():
    _, model = _pair()
    net = model.net
    torch.nn.init.normal_(net.spatial_in.conv.weight)  # as after training
    x, t, y, _, spatial = _inputs()
    conv = net.input_blocks[0][0]
    weight = torch.cat([conv.weight, net.spatial_in.conv.weight], dim=1)  # [mc x (C + C_s) x 3 x 3]
    want = F.conv2d(torch.cat([x, spatial], dim=1), weight, conv.bias + net.spatial_in.conv.bias, padding=1)
    hs, _ = net.encode(x, net.embedding(t, y, len(x), x.dtype), None, spatial)
    torch.testing.assert_close(hs[0], want, rtol=1e-5, atol=1e-5)


def test_the_spatial_input_trains_with_the_affiner_and_the_base_stays_frozen():
    _, model = _pair("model.affiner={tasks: 3}")
    own = {id(p) for p in adapter_parameters(model)}
    net = model.net
    assert id(net.spatial_in.conv.weight) in own and net.spatial_in.conv.weight.requires_grad
    assert not net.input_blocks[0][0].base_layer.weight.requires_grad
    # The Affiner adapts the base's layers, not the spatial input (it trains whole).
    paths = model.adapter_report.paths
    assert "input_blocks.0.0" in paths and not any(p.startswith("spatial_in") for p in paths)
    x, t, y, task, spatial = _inputs()
    model(x, t, y, task=task, spatial=spatial).square().mean().backward()
    assert net.spatial_in.conv.weight.grad.abs().sum() > 0


def test_each_task_reaches_its_own_input_channels():
    _, model = _pair()
    x, t, y, task, spatial = _inputs()
    with torch.no_grad():
        model.net.spatial_in.conv.weight[:, 1:2].normal_()  # only the lowres slot's weights
        before = model(x, t, y, task=task, spatial=torch.zeros_like(spatial))
        one_slot = torch.zeros_like(spatial)
        one_slot[:, 0] = spatial[:, 0]  # an edges condition: its slot has zero weights still
        assert torch.equal(model(x, t, y, task=task, spatial=one_slot), before)
        one_slot[:, 1] = spatial[:, 1]
        assert not torch.allclose(model(x, t, y, task=task, spatial=one_slot), before)
