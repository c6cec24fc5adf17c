"""Sampling a distilled run (one pass per step, the LoRA fused once; the guided teacher from the same
files) and selective guidance."""

from pathlib import Path

import pytest
import torch

from difflora.adapters import adapter_layers
from difflora.cli.commands import main
from difflora.config.schema import DiffusionConfig
from difflora.diffusion import NULL_LABEL, ClassifierFreeGuidance, create_diffusion
from difflora.diffusion.guidance import selective_threshold
from difflora.distill.objective import distill_config
from difflora.distill.student import fuse_student
from difflora.model.build import build_model
from difflora.sampling.generate import generate, sampling_settings
from difflora.train import load_base, train

QUIET = {"progress": False, "log": lambda s: None}
# Merged (W0 + B A) against per-sample (W0 x + B A x) weights over a few sampler steps.
TOL = dict(rtol=1e-4, atol=1e-5)
N = 4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_config) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(tiny_config("tiny-unet", "train.steps=2", "train.batch_size=4"), run, **QUIET)
    return run


def student(teacher: Path, *overrides: str):
    cfg = distill_config(teacher, overrides=list(overrides))
    model = build_model(cfg)
    load_base(model, teacher)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            b = layer.adapters["distill"].lora_B
            b.copy_(0.3 * torch.randn(b.shape, generator=g))
    return cfg, model


def counted(model):
    """Record the batch size and timesteps of every network forward."""
    calls = []
    model.net.register_forward_pre_hook(lambda m, args: calls.append((args[0].shape[0], args[1].clone())))
    return calls


LABELS = torch.tensor([0, 3, 7, 9])


@pytest.mark.parametrize(
    "over", [["distill.guidance=3"], ["distill.guidance_range=[1.0, 4.0]", "distill.guidance=2.5"]]
)
def test_fused_student_is_the_per_sample_student_in_one_pass_per_step(teacher, over):
    cfg, model = student(teacher, *over)
    calls = counted(model)
    per_sample = generate(model, cfg, sampling_settings(cfg, num=N, steps=4), labels=LABELS)
    assert [n for n, _ in calls] == [N] * 4
    w = fuse_student(model, cfg)
    assert w == cfg.distill.guidance
    calls.clear()
    fused = generate(model, cfg, sampling_settings(cfg, num=N, steps=4), labels=LABELS)
    assert [n for n, _ in calls] == [N] * 4
    torch.testing.assert_close(fused, per_sample, **TOL)
    with pytest.raises(ValueError, match="no student LoRA"):
        generate(model, cfg, sampling_settings(cfg, num=N, steps=2), labels=LABELS, teacher=True)


def test_fused_student_is_the_plain_network_holding_w0_plus_ba(teacher, tiny_config):
    # No wrapper outlives the fusing: the student's state loads strictly into the plain base network,
    # which then predicts what the per-sample student (W0 x + B A x, LoRA on) predicted.
    cfg, model = student(teacher, "distill.guidance=3")
    m, g = cfg.model, torch.Generator().manual_seed(2)
    x, t = torch.randn(N, m.in_channels, m.image_size, m.image_size, generator=g), torch.tensor([0, 5, 9, 19])
    with torch.no_grad():
        reference = model(x, t, y=LABELS, distill=torch.zeros(N, dtype=torch.long))
        fuse_student(model, cfg)
        assert not list(adapter_layers(model))
        plain = build_model(tiny_config("tiny-unet"))
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(plain(x, t, y=LABELS), reference, **TOL)


def test_guidance_scale_student_reads_w(teacher):
    cfg, model = student(teacher, "distill.guidance_range=[1.0, 4.0]", "distill.guidance=2.5")
    low = generate(model, cfg, sampling_settings(cfg, num=N, steps=3, guidance=1.0), labels=LABELS)
    high = generate(model, cfg, sampling_settings(cfg, num=N, steps=3, guidance=4.0), labels=LABELS)
    assert (low - high).abs().max() > 1e-3


def test_teacher_samples_are_the_guided_base_model(teacher, tiny_config):
    cfg, model = student(teacher, "distill.guidance=3")
    calls = counted(model)
    guided = generate(model, cfg, sampling_settings(cfg, num=N, steps=3), labels=LABELS, teacher=True)
    assert [n for n, _ in calls] == [2 * N] * 3
    plain_cfg = tiny_config("tiny-unet")
    base = build_model(plain_cfg)
    load_base(base, teacher)
    torch.testing.assert_close(
        guided,
        generate(base, plain_cfg, sampling_settings(plain_cfg, num=N, steps=3, guidance=3.0), labels=LABELS),
        **TOL,
    )


def test_selective_guidance_wrapper_guides_rows_at_or_above_min_t():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 4, 1)
    emb = torch.randn(10, 4)

    def model(x, t, y=None):
        out = net(x) * (1 + t[:, None, None, None] / 1000)
        return out + (emb[y.clamp(min=0)] * (y >= 0)[:, None])[:, :, None, None]

    x, y = torch.randn(4, 2, 3, 3), torch.tensor([1, 2, 3, 4])
    t = torch.tensor([900.0, 500.0, 499.0, 10.0])
    out = ClassifierFreeGuidance(model, 3.0, min_t=500.0)(x, t, y)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL_LABEL))
    guided = torch.cat([uncond[:, :2] + 3.0 * (cond[:, :2] - uncond[:, :2]), cond[:, 2:]], 1)
    torch.testing.assert_close(out[:2], guided[:2])
    torch.testing.assert_close(out[2:], cond[2:])


def test_selective_threshold_counts_the_first_steps():
    d = create_diffusion(DiffusionConfig(steps=100), learn_sigma=True, respacing="ddim10")
    visits = d.model_timesteps(torch.arange(9, -1, -1))  # the sampler's order: noisiest first
    for fraction, guided in [(0.3, 3), (0.5, 5), (0.04, 0)]:
        min_t = selective_threshold(d, fraction)
        assert int((visits >= min_t).sum()) == guided
        assert bool((visits[:guided] >= min_t).all())
    assert selective_threshold(d, 1.0) is None


def test_selective_guidance_in_generate(teacher, tiny_config):
    cfg = tiny_config("tiny-unet")
    model = build_model(cfg)
    load_base(model, teacher)
    calls = counted(model)
    generate(model, cfg, sampling_settings(cfg, num=N, steps=5, guidance=3.0, guidance_fraction=0.4), labels=LABELS)
    assert [n for n, _ in calls] == [2 * N, 2 * N, N, N, N]
    assert calls[1][1].max() > calls[2][1].max()  # the guided steps are the noisiest
    none = generate(
        model, cfg, sampling_settings(cfg, num=N, steps=5, guidance=3.0, guidance_fraction=0.0), labels=LABELS
    )
    torch.testing.assert_close(
        none, generate(model, cfg, sampling_settings(cfg, num=N, steps=5, guidance=1.0), labels=LABELS)
    )
    full = generate(
        model, cfg, sampling_settings(cfg, num=N, steps=5, guidance=3.0, guidance_fraction=1.0), labels=LABELS
    )
    torch.testing.assert_close(
        full, generate(model, cfg, sampling_settings(cfg, num=N, steps=5, guidance=3.0), labels=LABELS)
    )


def test_cli_distill_and_sample(teacher, tmp_path, capsys):
    run = tmp_path / "d"
    args = ["distill", str(teacher), "--guidance-range", "1", "4", "--out", str(run), "--no-progress"]
    assert main([*args, "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "distill.rank=2"]) == 0
    assert "guidance range [1, 4]" in capsys.readouterr().out
    common = ["sample", str(run), "--num", "4", "--steps", "2", "--no-progress"]
    assert main([*common, "--guidance", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert (
        main([*common, "--teacher", "--guidance", "3", "--guidance-fraction", "0.5", "--out", str(tmp_path / "t.png")])
        == 0
    )
    assert (tmp_path / "s.png").is_file() and (tmp_path / "t.png").is_file()
    capsys.readouterr()
    assert main([*common, "--guidance", "5", "--out", str(tmp_path / "x.png")]) == 2
    assert "outside the range [1, 4]" in capsys.readouterr().err
    assert main([*common, "--guidance-fraction", "0.5", "--out", str(tmp_path / "x.png")]) == 2
    assert "add --teacher" in capsys.readouterr().err
    assert main(["sample", str(teacher), "--teacher", "--num", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "not one" in capsys.readouterr().err
    # The student's guidance condition is set by --guidance, and the message says so (issue 28, class 13).
    assert main([*common, "--condition", "guidance=3", "--out", str(tmp_path / "x.png")]) == 2
    assert "error: --condition guidance: set by --guidance (the student's scale)" in capsys.readouterr().err
