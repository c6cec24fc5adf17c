"""New class tokens on a frozen cross-attention base (``model.context.new_tokens``, adapters/tokens.py).

References: the base model itself. With the table started at the base's null context (``unconditional``), every class
of the adapted model is the base's unconditional model (y = -1), exactly; started at the base's own
class tokens (``base``) it is the base, exactly; the "mean" start is the
base run with a hand-built context (the mean of its class tokens) passed by the caller. The base
reaches the adapted model through the real ``train.init_from`` path (``load_base``), so the key
mapping is tested too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difflora.adapters import NewClassTokens
from difflora.model.build import build_model
from difflora.train import train
from difflora.train.base import load_base
from helpers import tiny_config

ADAPTER = [
    "model.adapters=[{name: pa, form: position, source: attn2_out, dest: ff_in, rank: 2, activation: relu, "
    "condition: t, weighting: index, num_values: 1000, targets: ['re:.*transformer_blocks\\.\\d+']}]"
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A 2-step tiny cross-attention base (trained, so its weights are not the fresh init)."""
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = tiny_config("tiny-cross-unet", "train.steps=2", "train.ckpt_every=2", "sample.num=1")
    train(cfg, out, progress=False, log=lambda _: None)
    return out


def adapted(base_run: Path, *overrides: str, train_base: bool = False):
    cfg = tiny_config(
        "tiny-cross-unet", f"train.init_from={base_run}", f"train.train_base={str(train_base).lower()}", *overrides
    )
    model = build_model(cfg)
    load_base(model, base_run, "model")
    return model


def base_model(base_run: Path):
    model = build_model(tiny_config("tiny-cross-unet"))
    load_base(model, base_run, "model")
    return model


def batch(n: int = 6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 100, (n,), generator=g)


def test_only_the_token_table_and_the_adapters_train(base_run):
    model = adapted(base_run, "model.context.new_tokens=unconditional", *ADAPTER)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert "net.context_embedder.new_tokens" in trainable
    assert all(n == "net.context_embedder.new_tokens" or ".position_adapters.pa." in n for n in trainable)
    assert len(trainable) == 1 + 4 * 4  # the table; 4 transformer blocks x (down, down_bias, up, bias)
    assert isinstance(model.net.context_embedder, NewClassTokens)
    assert model.net.context_embedder.new_tokens.shape == (10, 2 * 16)
    # The base's own table is frozen under base_layer (its checkpoint key maps there).
    assert not model.net.context_embedder.base_layer.embedding.weight.requires_grad


def test_null_start_is_the_unconditional_base_exactly_and_training_moves_only_the_table(base_run):
    base = base_model(base_run).eval()
    model = adapted(base_run, "model.context.new_tokens=unconditional").eval()
    x, t = batch()
    y = torch.tensor([0, 3, 9, -1, 5, 5])
    with torch.no_grad():
        uncond = base(x, t, torch.full_like(y, -1))
        cond = base(x, t, y)
        assert torch.equal(model(x, t, y), uncond)
        assert not torch.allclose(cond, uncond)  # the base's own class tokens do condition
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    model(x, t, y).square().mean().backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    table = model.net.context_embedder.new_tokens.detach()
    assert table[[0, 3, 5, 9]].abs().sum(1).min() > 0 and table[[1, 2, 4, 6, 7, 8]].abs().sum() == 0
    with torch.no_grad():  # y = -1 still reads the base's null context
        torch.testing.assert_close(model(x, t, torch.full_like(y, -1)), uncond, atol=0, rtol=0)


def test_mean_start_is_the_mean_of_the_base_class_tokens(base_run):
    base = base_model(base_run).eval()
    model = adapted(base_run, "model.context.new_tokens=mean").eval()
    x, t = batch()
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    table = base.net.context_embedder.embedding.weight.detach()
    mean = table[:10].double().mean(0).float().view(1, 2, 16).expand(6, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), base(x, t, y, context=mean), atol=1e-6, rtol=0)


def test_base_start_is_the_base_with_its_own_class_tokens_exactly(base_run):
    base = base_model(base_run).eval()
    model = adapted(base_run, "model.context.new_tokens=base").eval()
    x, t = batch()
    y = torch.tensor([0, 3, 9, -1, 5, 5])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), base(x, t, y), atol=0, rtol=0)
    model(x, t, y).square().mean().backward()  # the offsets of the classes present get a gradient
    grad = model.net.context_embedder.new_tokens.grad
    assert grad[[0, 3, 5, 9]].abs().sum(1).min() > 0 and grad[[1, 2, 4, 6, 7, 8]].abs().sum() == 0


def test_full_fine_tuning_trains_the_table_with_the_base_and_errors_are_named(base_run):
    model = adapted(base_run, "model.context.new_tokens=unconditional", train_base=True)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="model.context.new_tokens needs class tokens to replace"):
        build_model(tiny_config("tiny-unet", "model.context.new_tokens=unconditional", "model.num_classes=10"))
    with pytest.raises(ValueError, match="class labels must be < 10"):
        model(*batch(2), torch.tensor([3, 10]))


def test_token_lr_gives_the_table_its_own_learning_rate(base_run, tmp_path):
    # Adam's first step is lr * g / (|g| + eps): linear in lr for the same gradient. The same seed
    # gives the same first gradient, so with token_lr = 50 x train.lr the table moves 50 times as far
    # as without it, and every other parameter moves exactly as without it.
    from difflora.train import open_run

    over = [f"train.init_from={base_run}", "train.train_base=false", "model.context.new_tokens=unconditional"]
    over += [*ADAPTER, "train.steps=1", "train.ckpt_every=1", "train.lr=0.001", "train.warmup_steps=0"]
    over += ["train.ema_decay=0", "train.weight_decay=0", "sample.num=1"]
    start = dict(build_model(tiny_config("tiny-cross-unet", *over)).named_parameters())
    moved = {}
    for name, extra in (("same", []), ("token", ["train.token_lr=0.05"])):
        train(tiny_config("tiny-cross-unet", *over, *extra), tmp_path / name, progress=False)
        model = open_run(tmp_path / name, "model")[1]
        moved[name] = {n: (p - start[n]).detach() for n, p in model.named_parameters() if p.requires_grad}
    table = "net.context_embedder.new_tokens"
    assert moved["same"][table].abs().max() > 0
    torch.testing.assert_close(moved["token"][table], 50 * moved["same"][table], rtol=1e-4, atol=1e-9)
    for n in moved["same"]:
        if n != table:
            torch.testing.assert_close(moved["token"][n], moved["same"][n], rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="set model.context.new_tokens"):
        train(tiny_config("tiny-unet", "train.token_lr=0.05"), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
