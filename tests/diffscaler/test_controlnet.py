"""The ControlNet-style baseline (diffscaler/controlnet.py): zero-initialised, an encoder copy, frozen base."""

from __future__ import annotations

import torch
from test_spatial_model import SMALL_UNET

from difflora.diffscaler.controlnet import ControlUNet, copy_encoder_into_control
from difflora.model.build import build_model
from difflora.nets import count_parameters
from difflora.train.base import base_key_map
from helpers import tiny_config

CONTROL = ["data.spatial={tasks: [edges, lowres, inpaint], lowres: 2}", "model.spatial_input=controlnet"]


def _pair():
    """A base with random weights everywhere and a ControlNet model holding them, its copy synced."""
    base = build_model(tiny_config({}, *SMALL_UNET))
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.2)
    model = build_model(tiny_config({}, *SMALL_UNET, *CONTROL, "train.train_base=false"))
    state = base.state_dict()
    model.load_state_dict({k: state[b] for k, b in base_key_map(model).items()}, strict=False)
    assert copy_encoder_into_control(model) == 1
    return base, model


def _inputs(n: int = 5):
    g = torch.Generator().manual_seed(2)
    return (
        torch.randn(n, 1, 8, 8, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
        torch.randint(-1, 10, (n,), generator=g),
        torch.randn(n, 4, 8, 8, generator=g),
    )


def test_controlnet_is_the_base_at_step_zero():
    base, model = _pair()
    assert isinstance(model.net, ControlUNet)
    x, t, y, spatial = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y, spatial=spatial), base(x, t, y))


def test_the_branch_starts_as_a_copy_of_the_encoder_and_only_it_trains():
    base, model = _pair()
    net, ref = model.net, base.net
    for name in ("input_blocks", "middle_block"):
        mine, theirs = getattr(net.control, name).state_dict(), getattr(ref, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("net.control.") for n in trainable)
    # Parameters: the encoder and middle copy plus the hint conv and one zero 1x1 conv per skip and the middle.
    copy = count_parameters(ref.input_blocks) + count_parameters(ref.middle_block)
    mc, skips = 16, net.skip_channels
    zeros = sum(c * c + c for c in skips) + skips[-1] ** 2 + skips[-1]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == copy + (4 * mc * 9 + mc) + zeros


def test_the_branch_joins_the_skips_and_the_middle_through_its_zero_convs():
    """With identity zero convs and a zero hint, the branch adds the base's own encoder features:
    every skip and the middle output doubled, computed here by hand from the base's blocks."""
    base, model = _pair()
    net, ref = model.net, base.net
    with torch.no_grad():
        for conv in [*net.control.zero_convs, net.control.middle_zero]:
            conv.weight.copy_(torch.eye(conv.weight.shape[0])[:, :, None, None])
        x, t, y, spatial = _inputs()
        emb = ref.embedding(t * 1.0, y, len(x), x.dtype)
        hs, h = [], x
        for block in ref.input_blocks:
            h = block(h, emb, None)
            hs.append(2 * h)
        h = 2 * ref.middle_block(h, emb, None)
        for block in ref.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, None)
        want = ref.out(h)
        got = net(x, t * 1.0, y, spatial=spatial)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
