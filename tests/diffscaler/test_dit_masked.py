"""DiT masked training (002 section 4.2): dropped tokens never enter the network, the loss covers the
kept patches only, and ratio 0 is the unmasked objective."""

from __future__ import annotations

import pytest
import torch

from difflora.diffscaler.masked import MaskedDiffusionObjective, random_keep
from difflora.diffusion.guidance import drop_labels
from difflora.model.build import build_diffusion, build_model
from difflora.nets.dit import patch_strip
from difflora.train import train
from difflora.train.objectives import Batch, DiffusionObjective, build_objective
from helpers import tiny_config

TOL = dict(rtol=0, atol=1e-5)
# 8x8 digits, patch 2: a 4 x 4 grid of T = 16 tokens.
MSE = ["model.learn_sigma=false", "diffusion.loss=mse"]


def _setup(*overrides: str):
    cfg = tiny_config("tiny-dit", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # a trained-looking DiT (a fresh one outputs zeros: adaLN-Zero)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(2)
    batch = Batch(torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, {"y": torch.tensor([0, 3, 7, 9])})
    return cfg, model, batch


def test_patch_strip_lays_the_kept_patches_side_by_side():
    x = torch.randn(3, 2, 8, 8)
    keep = random_keep(3, 16, 0.5, torch.Generator().manual_seed(0))
    assert keep.shape == (3, 8) and (keep.diff(dim=1) > 0).all()
    strip = patch_strip(x, keep, 2)
    for i in range(3):
        for k, tok in enumerate(keep[i].tolist()):
            r, c = divmod(tok, 4)
            assert torch.equal(strip[i, :, :, 2 * k : 2 * k + 2], x[i, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2])


def test_keeping_every_token_is_the_unmasked_dit():
    _, model, batch = _setup()
    t = torch.tensor([3, 50, 80, 99])
    keep = torch.arange(16).expand(4, 16)
    with torch.no_grad():
        full = model(batch.x, t, batch.conditions["y"])
        masked = model(patch_strip(batch.x, keep, 2), t, batch.conditions["y"], keep=keep)
    torch.testing.assert_close(masked, patch_strip(full, keep, 2), **TOL)


def test_masked_loss_equals_a_naive_per_sample_reference_on_the_kept_patches():
    cfg, model, batch = _setup(*MSE, "train.mask_ratio=0.5")
    diffusion = build_diffusion(cfg)
    objective = build_objective(cfg, diffusion)
    assert isinstance(objective, MaskedDiffusionObjective)
    losses = objective(model, batch, torch.Generator().manual_seed(9), torch.device("cpu"))
    # The same draws, in the objective's order: t, noise, label dropout, kept tokens.
    g = torch.Generator().manual_seed(9)
    t = torch.randint(diffusion.num_timesteps, (4,), generator=g)
    noise = torch.randn(batch.x.shape, generator=g)
    y = drop_labels(batch.conditions["y"], cfg.train.label_dropout, g)
    keep = random_keep(4, 16, 0.5, g)
    x_t = diffusion.q_sample(batch.x, t, noise)
    net = model.net
    expected = []
    with torch.no_grad():
        for i in range(4):  # naive: the full patch embedding, then only the kept rows go through the blocks
            tokens = net.x_embedder(x_t[i : i + 1])[0][keep[i]] + net.pos_embed[0][keep[i]]
            c = net.condition(model.backbone_timesteps(t[i : i + 1]), y[i : i + 1], 1, tokens.dtype)
            h = tokens[None]
            for block in net.blocks:
                h = block(h, c)
            out = torch.zeros(1, 16, 4, dtype=h.dtype)  # p*p*C_out = 2*2*1 values per token
            out[0, keep[i]] = net.final_layer(h, c)[0]
            eps = net.unpatchify(out)[0]
            pixel = net.unpatchify(torch.zeros(1, 16, 4).index_fill_(1, keep[i], 1.0))[0]
            expected.append((((noise[i] - eps) ** 2) * pixel).sum() / pixel.sum())
    torch.testing.assert_close(losses["mse"].detach(), torch.stack(expected), **TOL)


def test_ratio_0_is_the_unmasked_objective_bit_for_bit():
    cfg, model, batch = _setup("train.mask_ratio=0")
    objective = build_objective(cfg, build_diffusion(cfg))
    assert type(objective) is DiffusionObjective
    ref = DiffusionObjective(cfg, build_diffusion(cfg))
    a = objective(model, batch, torch.Generator().manual_seed(4), torch.device("cpu"))
    b = ref(model, batch, torch.Generator().manual_seed(4), torch.device("cpu"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_masked_hybrid_run_trains_and_the_ratio_needs_a_dit(tmp_path):
    cfg = tiny_config(
        "tiny-dit", "train.mask_ratio=0.5", "train.steps=2", "train.ckpt_every=2", "sample.num=2", "sample.steps=2"
    )
    result = train(cfg, tmp_path / "run", progress=False, log=lambda _: None)
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["last"]["vb"]))
    with pytest.raises(ValueError, match="model.arch=dit"):
        tiny_config("tiny-unet", "train.mask_ratio=0.5")
