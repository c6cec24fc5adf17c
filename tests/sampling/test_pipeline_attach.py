"""difflora.attach: a run's live adapters inside diffusers' own pipelines.

Reference: difflora's own sampler (``generate``; for the DiT its guided DDIM ``sample``) from the
same initial noise over the same timesteps. diffusers' schedulers and pipelines are an independent
implementation of the same steps (DDPM's posterior, DDIM's update, DiT's guidance), so agreement
checks that the pipeline's timestep reached the adapters as difflora's t at every step, the labels
and the guidance halves as difflora's guided sampler gives them. The adapters (TimeLoRA over 5
bases, ClassLoRA) are nonzero: each step's t and each sample's class change the output.
"""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

import types

import diffusers
import torch

from difflora.adapters import adapters_disabled, current
from difflora.diffusion.guidance import ClassifierFreeGuidance
from difflora.model.build import build_model
from difflora.sampling.generate import generate, sampling_settings
from difflora.sampling.pipeline import PipelineAttachError, attach, detach, matching_scheduler
from helpers import tiny_config

# float32 through 10..50 steps of two implementations of one sampler, on [0, 1] images: measured
# 7.7e-7 (DDPM, 50 steps), 4.8e-7 (DDPM, 10), 3.0e-6 (DDIM, 10), 1.2e-7 (DiTPipeline with guidance).
ATOL = 1e-5

UNET = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 8,
    "num_class_embeds": 10,
}
DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "patch_size": 2, "num_embeds_ada_norm": 10}
ADAPTERS = [
    {"name": "time", "condition": "t", "weighting": "linear", "num_values": 50, "num_bases": 5, "rank": 2},
    {"name": "cls", "condition": "y", "weighting": "index", "num_values": 10, "rank": 2},
]


def run(
    class_name: str = "UNet2DModel",
    config: dict | None = None,
    adapters: list | None = None,
    train: dict | None = None,
    distill: dict | None = None,
    **model,
):
    """A tiny diffusers-backbone run (cfg, model) on 8x8 digits, T = 50, with nonzero adapters."""
    sections = {"train": train} if train else {}
    sections |= {"distill": distill} if distill else {}
    cfg = tiny_config(
        {
            "data": {"name": "digits"},
            "model": {
                "arch": "diffusers",
                "num_classes": 10,
                "learn_sigma": False,
                "diffusers": {"class_name": class_name, "config": config or UNET},
                "adapters": ADAPTERS if adapters is None else adapters,
                **model,
            },
            "diffusion": {"steps": 50},
            **sections,
        }
    )
    torch.manual_seed(0)
    net = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return cfg, net


def ddpm_pipeline(cfg, model, cls=diffusers.DDPMPipeline, scheduler=diffusers.DDPMScheduler, **kw):
    """A pipeline around a fresh denoiser of the run's class and config (its own random weights)."""
    unet = type(model.net.model).from_config(model.net.model.config).eval()
    return cls(unet=unet, scheduler=matching_scheduler(cfg, scheduler, **kw))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return (x / 2 + 0.5).clamp(0, 1)


def snapshot(module: torch.nn.Module):
    return [(k, v.clone()) for k, v in module.state_dict().items()], list(module.named_modules())


def assert_same(module: torch.nn.Module, before) -> None:
    state, modules = before
    now = list(module.state_dict().items())
    assert [k for k, _ in now] == [k for k, _ in state]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for (_, a), (_, b) in zip(now, state, strict=True))
    assert [(n, id(m)) for n, m in module.named_modules()] == [(n, id(m)) for n, m in modules]
    assert "forward" not in vars(module) and not hasattr(module, "_difflora_live")


@pytest.mark.parametrize(
    ("sampler", "steps", "spacing"),
    [("ddpm", 50, "leading"), ("ddpm", 10, "linspace"), ("ddim", 10, "leading")],
)
def test_the_pipeline_samples_what_difflora_samples(sampler, steps, spacing):
    cfg, model = run()
    y = torch.tensor([1, 4, 7])
    if sampler == "ddpm":
        # diffusers' "linspace" spacing picks IDDPM's respaced timesteps (0, 5, 11, ..., 49).
        pipe = ddpm_pipeline(cfg, model, timestep_spacing=spacing)
        call = {}
    else:
        # DDIM's "leading" 10 of 50 are IDDPM's ddim10 (0, 5, ..., 45); IDDPM takes the noise of the clipped x0.
        pipe = ddpm_pipeline(cfg, model, diffusers.DDIMPipeline, diffusers.DDIMScheduler)
        call = {"eta": 0.0, "use_clipped_model_output": True}
    s = sampling_settings(cfg, num=3, steps=steps, sampler=sampler, guidance=1.0)
    want = to_unit(generate(model, cfg, s, labels=y, seed=3))
    with attach(pipe, cfg, model, y=y):
        g = torch.Generator().manual_seed(3)
        got = pipe(batch_size=3, generator=g, num_inference_steps=steps, output_type="pt", **call).images
        with adapters_disabled():  # the adapters change the samples: the comparison can fail
            g = torch.Generator().manual_seed(3)
            base = pipe(batch_size=3, generator=g, num_inference_steps=steps, output_type="pt", **call).images
    assert (got - want).abs().max() <= ATOL
    assert (got - base).abs().max() > 1e-2


def test_position_adapters_in_diffusers_blocks_stay_live_in_the_pipeline():
    # 004's ResNet in -> out adapter per class: the taps are hooks on the run's blocks, attached with them.
    position = {"name": "res", "form": "position", "source": "in", "dest": "out", "rank": 2}
    position |= {"condition": "y", "weighting": "index", "num_values": 10, "targets": ["re:.*resnets\\.\\d+"]}
    cfg, model = run(adapters=[*ADAPTERS, position])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".position_adapters." in name:
                p.normal_(0, 0.3)
    pipe = ddpm_pipeline(cfg, model, timestep_spacing="linspace")
    y = torch.tensor([2, 9])
    want = to_unit(
        generate(model, cfg, sampling_settings(cfg, num=2, steps=10, sampler="ddpm", guidance=1.0), labels=y, seed=5)
    )
    with attach(pipe, cfg, model, y=y):
        got = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=10, output_type="pt")
        with adapters_disabled("res"):
            off = pipe(
                batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=10, output_type="pt"
            )
    assert (got.images - want).abs().max() <= ATOL
    assert (got.images - off.images).abs().max() > 1e-2


def test_a_cross_attention_unet_takes_the_pipeline_context_or_its_learned_class_context():
    cond = {
        "block_out_channels": [8, 16],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "attention_head_dim": 8,
        "cross_attention_dim": 16,
    }
    cfg, model = run("UNet2DConditionModel", cond)
    unet = type(model.net.model).from_config(model.net.model.config).eval()
    pipe = types.SimpleNamespace(unet=unet, scheduler=matching_scheduler(cfg, diffusers.DDIMScheduler))
    x, ctx, y = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 16), torch.tensor([1, 2])
    t = torch.tensor([3, 3, 3, 3])
    with attach(pipe, cfg, model, y=y), torch.no_grad():
        # A guidance-doubled batch of 4 for y of 2: the second half gets the null class.
        y4 = torch.tensor([1, 2, -1, -1])
        assert torch.equal(pipe.unet(x, 3, encoder_hidden_states=ctx).sample, model(x, t, y4, context=ctx))
        assert torch.equal(pipe.unet(x, t, None).sample, model(x, t, y4))
        with pytest.raises(PipelineAttachError, match="does not read added_cond_kwargs"):
            pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": x})


def test_adapters_read_the_pipeline_timestep_at_every_step():
    cfg, model = run()
    pipe = ddpm_pipeline(cfg, model, timestep_spacing="linspace")
    seen = []
    layer = next(m for n, m in model.named_modules() if n.endswith("to_q"))
    layer.register_forward_pre_hook(lambda m, a: seen.append(current("t").tolist()))
    with attach(pipe, cfg, model, y=2):
        pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="pt")
    assert seen == [[int(t)] * 2 for t in pipe.scheduler.timesteps]
    assert len({t[0] for t in seen}) == 10


def test_conditions_per_call_and_detach_restores_the_pipeline_bit_for_bit(tmp_path):
    cfg, model = run()
    pipe = ddpm_pipeline(cfg, model)
    before = snapshot(pipe.unet)
    pipe.unet.save_pretrained(tmp_path / "before")

    def draw():
        g = torch.Generator().manual_seed(1)
        return pipe(batch_size=2, generator=g, num_inference_steps=5, output_type="pt").images

    live = attach(pipe, cfg, model, y=[3, 3])
    assert type(pipe.unet) is diffusers.UNet2DModel
    first = draw()
    with live.conditions(y=[5, 6]):
        other = draw()
    assert torch.equal(draw(), first)
    live.set(y=[5, 6])
    assert torch.equal(draw(), other) and not torch.equal(other, first)
    x = torch.randn(2, 1, 8, 8)
    eps = pipe.unet(x, 30).sample
    pipe.to(torch.float64)  # the pipeline's own calls keep working on the attached denoiser
    assert pipe.unet.dtype == torch.float64 and draw().dtype == torch.float64
    assert (pipe.unet(x.double(), 30).sample.float() - eps).abs().max() < 1e-4
    pipe.to(torch.float32)
    detach(pipe)
    assert_same(pipe.unet, before)
    pipe.unet.save_pretrained(tmp_path / "after")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()
    live.detach()  # a second detach does nothing


def test_the_dit_pipeline_with_guidance_equals_difflora_guidance_in_a_scheduler_loop():
    # DiTPipeline's DDIM takes the raw predicted noise after clipping x0 (difflora's DDIM re-derives it
    # from the clipped x0), and its DDPM draws step noise without the caller's generator: the reference
    # is diffusers' DDIM step driven by difflora's guided model callable (both halves in one batch).
    cfg, model = run("DiTTransformer2DModel", DIT, learn_sigma=True)
    dit = model.net.model
    transformer = type(dit).from_config(dit.config).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=1, block_out_channels=[8], norm_num_groups=4
    ).eval()
    pipe = diffusers.DiTPipeline(
        transformer=transformer, vae=vae, scheduler=matching_scheduler(cfg, diffusers.DDIMScheduler)
    )
    labels, scale = [2, 8], 3.0
    reference = matching_scheduler(cfg, diffusers.DDIMScheduler)
    reference.set_timesteps(10)
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    guided = ClassifierFreeGuidance(model, scale)
    with torch.no_grad():
        for t in reference.timesteps:
            eps = guided(x, t.expand(2), torch.tensor(labels))[:, :1]
            x = reference.step(eps, t, x).prev_sample
        want = to_unit(vae.decode(x / vae.config.scaling_factor).sample)
    for given in ({}, {"y": labels}):  # the pipeline's labels (null 1000), or y set per sample
        with attach(pipe, cfg, model, **given):
            g = torch.Generator().manual_seed(4)
            got = pipe(labels, guidance_scale=scale, generator=g, num_inference_steps=10, output_type="pt").images
        assert (got - want).abs().max() <= ATOL
    with attach(pipe, cfg, model):
        g = torch.Generator().manual_seed(4)
        plain = pipe(labels, guidance_scale=1.0, generator=g, num_inference_steps=10, output_type="pt").images
    assert (plain - want).abs().max() > 1e-3  # guidance matters here: the comparison can fail


def refused(pipe, match: str, *args, **kw) -> None:
    before = snapshot(pipe.unet)
    with pytest.raises(PipelineAttachError, match=match) as info:
        attach(pipe, *args, **kw)
    assert "\n" not in str(info.value)
    assert_same(pipe.unet, before)


def test_bad_inputs_are_one_line_errors_that_leave_the_pipeline_unchanged():
    cfg, model = run()
    pipe = ddpm_pipeline(cfg, model)
    own = tiny_config("tiny-unet")
    refused(pipe, "model.arch: diffusers", own, build_model(own))
    pipe.scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    refused(pipe, "num_train_timesteps=1000 but the run's diffusion has T=50", cfg, model)
    pipe.scheduler = diffusers.DDPMScheduler(num_train_timesteps=50)
    refused(pipe, "other betas", cfg, model)
    pipe.scheduler = matching_scheduler(cfg, diffusers.DDPMScheduler, variance_type="fixed_small")
    refused(pipe, "variance_type", cfg, model)
    pipe.scheduler = matching_scheduler(cfg, diffusers.DDPMScheduler)
    refused(pipe, "no adapter of the run reads condition.* task", cfg, model, task=1)
    refused(pipe, r"y must lie in -1\.\.9", cfg, model, y=10)
    task = {"name": "task", "condition": "task", "weighting": "index", "num_values": 3, "rank": 2}
    cfg_task, model_task = run(adapters=[*ADAPTERS, task])
    refused(pipe, "read condition.* task: give a value", cfg_task, model_task)
    cfg_other, model_other = run(config={**UNET, "block_out_channels": [8, 8]})
    refused(pipe, "block_out_channels", cfg_other, model_other)
    with attach(pipe, cfg, model):
        with pytest.raises(PipelineAttachError, match="already attached"):
            attach(pipe, cfg, model)
    with pytest.raises(PipelineAttachError, match="no difflora run is attached"):
        detach(pipe)


def test_a_task_condition_per_sample_and_calls_the_run_cannot_serve():
    task = {"name": "task", "condition": "task", "weighting": "index", "num_values": 3, "rank": 2}
    cfg, model = run(adapters=[task])
    pipe = ddpm_pipeline(cfg, model, timestep_spacing="linspace")
    s = sampling_settings(cfg, num=3, steps=5, sampler="ddpm", guidance=1.0)
    want = to_unit(generate(model, cfg, s, labels=None, conditions={"task": [0, 2, 1]}, seed=2))
    with attach(pipe, cfg, model, task=[0, 2, 1]) as live:
        g = torch.Generator().manual_seed(2)
        got = pipe(batch_size=3, generator=g, num_inference_steps=5, output_type="pt").images
        assert (got - want).abs().max() <= ATOL
        x = torch.zeros(3, 1, 8, 8)
        with pytest.raises(PipelineAttachError, match="condition task has 3 values but .* batch of 4"):
            pipe.unet(torch.zeros(4, 1, 8, 8), 3)
        with pytest.raises(PipelineAttachError, match="not one integer per sample"):
            pipe.unet(x, 2.5)
        with pytest.raises(PipelineAttachError, match=r"outside the run's 0\.\.49"):
            pipe.unet(x, 50)
        assert pipe.unet(x, torch.tensor(7.0), return_dict=False)[0].shape == x.shape
        with pytest.raises(PipelineAttachError, match="no adapter of the run reads"):
            live.set(guidance=2.0)


def test_a_one_pass_student_samples_at_its_guidance_scale():
    # 003's guidance-scale LoRA: the pipeline makes one conditional pass per step, the student's LoRA on at w.
    cfg, model = run(
        adapters=ADAPTERS[:1],
        train={"objective": "distill", "train_base": False, "init_from": "teacher"},
        distill={"guidance_range": [1.0, 5.0], "num_bases": 3, "rank": 2, "targets": ["to_q", "to_v"]},
    )
    pipe = ddpm_pipeline(cfg, model, timestep_spacing="linspace")
    y = torch.tensor([0, 6])
    for scale in (2.0, 4.5):
        s = sampling_settings(cfg, num=2, steps=5, sampler="ddpm", guidance=scale)
        want = to_unit(generate(model, cfg, s, labels=y, seed=1))
        with attach(pipe, cfg, model, y=y, guidance=scale):
            g = torch.Generator().manual_seed(1)
            got = pipe(batch_size=2, generator=g, num_inference_steps=5, output_type="pt").images
        assert (got - want).abs().max() <= ATOL
    with pytest.raises(ValueError, match="guidance"):
        attach(pipe, cfg, model, guidance=9.0)
