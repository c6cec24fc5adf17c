"""Classifier-free guidance wrapper and training label dropout."""

import pytest
import torch

from difflora.config.schema import DiffusionConfig
from difflora.diffusion import NULL_LABEL, ClassifierFreeGuidance, create_diffusion, drop_labels, sample

# The wrapper's arithmetic is a few float32 ops on the same numbers as the reference.
TOL = dict(rtol=1e-6, atol=1e-6)
N, H = 5, 4


class ToyClassNet(torch.nn.Module):
    """out = [noise channels | variance channels], each depending on x, t and a class embedding.

    y == -1 (and y=None) adds no embedding: the null label is "no class input", as in difflora's
    networks. Records every call's batch size and labels.
    """

    def __init__(self, channels, learn_sigma=True, num_classes=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c, self.learn_sigma = channels, learn_sigma
        out_c = 2 * channels if learn_sigma else channels
        self.embed = torch.nn.Parameter(torch.randn(num_classes, out_c, generator=g))
        self.w = torch.nn.Parameter(torch.randn(out_c, channels, generator=g))
        self.calls = []

    def forward(self, x, t, y=None, task=None):
        self.calls.append((x.shape[0], None if y is None else y.clone(), task))
        out = torch.einsum("oc,nchw->nohw", self.w, torch.tanh(x)) * (1 + t.reshape(-1, 1, 1, 1) / 1000)
        if y is not None:
            emb = self.embed[y.clamp(min=0)] * (y >= 0).unsqueeze(1)  # -1 -> zero embedding
            out = out + emb[:, :, None, None]
        if task is not None:
            out = out + task.reshape(-1, 1, 1, 1).float()
        return out


def inputs(c):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, c, H, H, generator=g)
    t = torch.randint(0, 1000, (N,), generator=g).float()
    y = torch.tensor([3, 0, NULL_LABEL, 9, 2])
    return x, t, y


@pytest.mark.parametrize("c", [1, 3, 4])
def test_guidance_is_one_batched_forward_and_extrapolates_every_noise_channel(c):
    net = ToyClassNet(c)
    x, t, y = inputs(c)
    cond = net(x, t, y=y)
    uncond = net(x, t, y=torch.full_like(y, NULL_LABEL))
    net.calls.clear()
    out = ClassifierFreeGuidance(net, 4.0)(x, t, y)
    # ONE forward of 2N: the conditional half with y, the unconditional half with the null label.
    assert len(net.calls) == 1 and net.calls[0][0] == 2 * N
    assert net.calls[0][1].tolist() == y.tolist() + [NULL_LABEL] * N
    # Guidance on all c noise channels (not a hard-coded 3).
    torch.testing.assert_close(out[:, :c], uncond[:, :c] + 4.0 * (cond[:, :c] - uncond[:, :c]), **TOL)
    # Learned-variance channels from the conditional pass.
    torch.testing.assert_close(out[:, c:], cond[:, c:], **TOL)
    assert out.shape == cond.shape and not torch.allclose(out[:, :c], cond[:, :c])


def test_scale_one_is_exactly_the_conditional_model():
    net = ToyClassNet(3)
    x, t, y = inputs(3)
    cond = net(x, t, y=y)
    net.calls.clear()
    out = ClassifierFreeGuidance(net, 1.0)(x, t, y)
    torch.testing.assert_close(out, cond, rtol=0, atol=0)
    assert len(net.calls) == 1 and net.calls[0][0] == N  # short-circuit: no doubled batch


def test_scale_zero_is_the_unconditional_model_and_null_label_is_no_class_input():
    net = ToyClassNet(2)
    x, t, y = inputs(2)
    # The null label equals calling the network without class input.
    torch.testing.assert_close(net(x, t, y=torch.full_like(y, NULL_LABEL)), net(x, t, y=None), rtol=0, atol=0)
    uncond = net(x, t, y=None)
    net.calls.clear()
    # w = 0: one pass of N with the null label, noise and variance channels both unconditional.
    torch.testing.assert_close(ClassifierFreeGuidance(net, 0.0)(x, t, y), uncond, rtol=0, atol=0)
    assert len(net.calls) == 1 and net.calls[0][0] == N and net.calls[0][1].tolist() == [NULL_LABEL] * N
    # Per-sample scales of 0 in a tensor (the guided 2N pass) give the same rows.
    torch.testing.assert_close(ClassifierFreeGuidance(net, torch.zeros(N))(x, t, y), uncond, **TOL)
    # A sample whose own label is null gets the unconditional prediction whatever the scale.
    torch.testing.assert_close(ClassifierFreeGuidance(net, 7.0)(x, t, y)[2], net(x, t)[2], **TOL)


def test_per_sample_scales_and_per_sample_kwargs():
    net = ToyClassNet(1)
    x, t, y = inputs(1)
    task = torch.arange(N)
    scales = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    out = ClassifierFreeGuidance(net, scales)(x, t, y, task=task)
    assert net.calls[-1][2].tolist() == task.tolist() * 2  # per-sample kwarg follows both halves
    for i, s in enumerate(scales.tolist()):
        one = ClassifierFreeGuidance(net, s)(x[i : i + 1], t[i : i + 1], y[i : i + 1], task=task[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], one, **TOL)
    # guidance_scale overrides the wrapper's scale for one call.
    torch.testing.assert_close(ClassifierFreeGuidance(net, 9.0)(x, t, y, guidance_scale=1.0), net(x, t, y=y), **TOL)


def test_unconditional_batch_is_a_single_plain_pass():
    net = ToyClassNet(3)
    x, t, _ = inputs(3)
    net.calls.clear()
    torch.testing.assert_close(ClassifierFreeGuidance(net, 3.0)(x, t), net(x, t), rtol=0, atol=0)
    assert [c[0] for c in net.calls] == [N, N]


def test_guided_sampling_with_learned_variance():
    net = ToyClassNet(1)
    d = create_diffusion(DiffusionConfig(steps=100, loss="hybrid"), learn_sigma=True, respacing=8)
    guided = ClassifierFreeGuidance(net, 2.0)
    net.calls.clear()
    y = torch.tensor([1, 2, NULL_LABEL])
    out = sample(d, guided, (3, 1, H, H), generator=torch.Generator().manual_seed(0), model_kwargs={"y": y})
    assert len(net.calls) == 8 and all(c[0] == 6 for c in net.calls)  # one 2N forward per step
    assert torch.isfinite(out).all() and out.abs().max() <= 1


def test_drop_labels_rate_and_reproducibility():
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    a = drop_labels(y, 0.1, torch.Generator().manual_seed(5))
    b = drop_labels(y, 0.1, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    dropped = a == NULL_LABEL
    # Binomial(20000, 0.1): standard deviation of the rate 0.0021; 0.01 is ~5 sigma.
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert (a[~dropped] == y[~dropped]).all()  # kept labels are untouched
    assert not torch.equal(a, drop_labels(y, 0.1, torch.Generator().manual_seed(6)))
    assert torch.equal(drop_labels(y, 0.0, torch.Generator()), y)
    assert (drop_labels(y, 1.0, torch.Generator()) == NULL_LABEL).all()
    assert drop_labels(None, 0.5) is None
    with pytest.raises(ValueError):
        drop_labels(y, 1.5)
