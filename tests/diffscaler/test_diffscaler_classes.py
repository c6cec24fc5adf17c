"""Incremental classes (002 eq. 1): new classes start as the unconditional model, old ones stay frozen."""

from __future__ import annotations

import pytest
import torch

from difflora.diffscaler import add_classes
from difflora.diffusion.samplers import sample
from difflora.model.build import build_diffusion, build_model
from helpers import TINY_ARCH, tiny_config


def _model(arch: str):
    cfg = tiny_config(
        {"data": {"name": "digits"}, "model": {"num_classes": 10}, "diffusion": {"steps": 20}}, TINY_ARCH[arch]
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # a trained base (DiT's adaLN and final layer start at zero)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return cfg, model


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_new_classes_sample_exactly_as_the_unconditional_model_at_step_0(arch):
    cfg, model = _model(arch)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.randint(20, (4,), generator=g)
    old_y = torch.tensor([0, 3, 9, -1])
    with torch.no_grad():
        before = model(x, t, old_y)
    assert add_classes(model.net, 3) == 10 and model.net.num_classes == 13
    with torch.no_grad():
        uncond = model(x, t, torch.full((4,), -1))
        for new in (10, 11, 12):
            assert torch.equal(model(x, t, torch.full((4,), new)), uncond)
        assert torch.equal(model(x, t, old_y), before)  # old classes and the null label unchanged
    # A whole sampling run: a new class draws the unconditional model's samples.
    diffusion = build_diffusion(cfg, respacing="ddim4")
    draw = [
        sample(
            diffusion,
            model,
            (2, 1, 8, 8),
            model_kwargs={"y": torch.full((2,), y)},
            generator=torch.Generator().manual_seed(7),
        )
        for y in (11, -1)
    ]
    assert torch.equal(draw[0], draw[1])


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_training_new_class_rows_leaves_the_old_rows_bit_identical(arch):
    _, model = _model(arch)
    add_classes(model.net, 2)
    trainable = [(n, p) for n, p in model.named_parameters() if "new_rows" in n]
    assert len(trainable) == 1
    frozen = [p for n, p in model.named_parameters() if n.endswith(("embedding_table.weight", "label_emb.weight"))]
    assert len(frozen) == 1 and not frozen[0].requires_grad
    old = frozen[0].detach().clone()
    opt = torch.optim.AdamW([trainable[0][1]], lr=0.1, weight_decay=0.5)
    x, t = torch.randn(4, 1, 8, 8), torch.randint(20, (4,))
    for _ in range(2):
        loss = model(x, t, torch.tensor([10, 11, 3, -1])).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(frozen[0], old)
    assert trainable[0][1].grad is not None and trainable[0][1].grad.abs().sum() > 0


def test_dit_keeps_002s_row_layout_and_a_model_without_classes_is_refused():
    _, model = _model("dit")
    null = model.net.y_embedder.embedding_table.weight[10].detach().clone()
    add_classes(model.net, 2)
    table = model.net.y_embedder.embedding_table.full_table()
    assert table.shape[0] == 13  # [W_1..W_10, W_uc, W_12, W_13]
    assert torch.equal(table[10], null) and torch.equal(table[11], null) and torch.equal(table[12], null)
    cfg = tiny_config({"data": {"name": "digits"}}, TINY_ARCH["unet"])
    with pytest.raises(ValueError, match="no class embedding"):
        add_classes(build_model(cfg).net, 1)
