"""003's "distillation without LoRA" row: a fully fine-tuned student guided by a separate frozen
teacher copy (``train.objective: distill`` with ``train.train_base: true``)."""

from pathlib import Path

import pytest
import torch

from difflora.config.schema import ConfigError
from difflora.diffusion.guidance import NULL_LABEL
from difflora.distill.objective import DistillObjective, distill_config
from difflora.model.build import build_diffusion, build_model
from difflora.sampling.generate import generate, sampling_settings
from difflora.train import latest_checkpoint, load_base, load_weights, train
from difflora.train.objectives import Batch

QUIET = {"progress": False, "log": lambda s: None}
TOL = dict(rtol=1e-5, atol=1e-6)
FULL = ["train.train_base=true", "distill.guidance=3"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_config) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(tiny_config("tiny-unet", "train.steps=4", "train.batch_size=8"), run, **QUIET)
    return run


def _teacher_weights(teacher: Path) -> dict[str, torch.Tensor]:
    return load_weights(latest_checkpoint(teacher), "ema")[0]


def test_full_student_has_no_lora_and_a_frozen_teacher_copy(teacher):
    cfg = distill_config(teacher, overrides=FULL)
    assert cfg.model.adapters == [] and cfg.train.train_base and cfg.train.objective == "distill"
    obj = DistillObjective(cfg, build_diffusion(cfg))
    copy = obj.teacher_copy
    assert copy is not None and not copy.training
    assert not any(p.requires_grad for p in copy.parameters())
    want = _teacher_weights(teacher)
    got = copy.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_full_student_target_is_the_teachers_cfg_and_starts_at_the_guidance_gap(teacher):
    cfg = distill_config(teacher, overrides=FULL)
    diffusion = build_diffusion(cfg)
    model = build_model(cfg)
    load_base(model, teacher)
    g = torch.Generator().manual_seed(3)
    b = Batch(torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, {"y": torch.randint(0, 10, (6,), generator=g)})
    losses = DistillObjective(cfg, diffusion)(model, b, torch.Generator().manual_seed(7), torch.device("cpu"))
    # The objective's draws by hand (t, then noise); the student starts as the teacher's conditional model.
    g = torch.Generator().manual_seed(7)
    t = torch.randint(diffusion.num_timesteps, (6,), generator=g)
    x_t = diffusion.q_sample(b.x, t, torch.randn(b.x.shape, generator=g))
    tm = diffusion.model_timesteps(t)
    with torch.no_grad():
        cond = model.eval()(x_t, tm, b.conditions["y"])
        uncond = model(x_t, tm, torch.full_like(b.conditions["y"], NULL_LABEL))
    gap = ((3.0 - 1.0) * (cond[:, :1] - uncond[:, :1])) ** 2
    torch.testing.assert_close(losses["eps"], gap.mean(dim=(1, 2, 3)), **TOL)
    torch.testing.assert_close(losses["var"], torch.zeros(6), **TOL)
    assert losses["eps"].min() > 0


def test_training_moves_the_whole_student_and_never_the_teacher_copy(teacher, tmp_path):
    cfg = distill_config(teacher, overrides=[*FULL, "train.steps=3", "train.batch_size=8", "train.ckpt_every=3"])
    want = _teacher_weights(teacher)
    seen = {}

    def check(st):
        copy = st.objective.teacher_copy
        seen["copy_frozen"] = not any(p.requires_grad for p in copy.parameters())
        seen["copy_same"] = all(torch.equal(v, want[k]) for k, v in copy.state_dict().items())
        params = dict(st.model.named_parameters())
        seen["all_trainable"] = all(p.requires_grad for p in params.values()) and len(st.params) == len(params)
        # Two models, no shared storage: the teacher copy is separate.
        mine = {p.untyped_storage().data_ptr() for p in st.model.parameters()}
        seen["separate"] = not mine & {p.untyped_storage().data_ptr() for p in copy.parameters()}

    train(cfg, tmp_path / "run", callback=check, **QUIET)
    assert seen == {"copy_frozen": True, "copy_same": True, "all_trainable": True, "separate": True}
    trained = load_weights(latest_checkpoint(tmp_path / "run"), "model")[0]
    assert set(trained) == set(want)  # the checkpoint holds the whole student, not a LoRA
    # Every weight of the backbone moved, except class-embedding rows of classes no batch drew.
    unchanged = [k for k in want if torch.equal(trained[k], want[k]) and want[k].is_floating_point()]
    assert set(unchanged) <= {"net.label_emb.weight"}
    assert len(unchanged) < len(want)


def test_full_student_samples_in_one_pass_per_step(teacher, tmp_path):
    cfg = distill_config(teacher, overrides=[*FULL, "train.steps=1", "train.batch_size=4"])
    train(cfg, tmp_path / "run", **QUIET)
    model = build_model(cfg)
    model.load_state_dict(load_weights(latest_checkpoint(tmp_path / "run"), "ema")[0])
    calls = []
    model.net.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    labels = torch.tensor([0, 3, 7, 9])
    out = generate(model, cfg, sampling_settings(cfg, num=4, steps=3), labels=labels)
    assert calls == [4, 4, 4] and out.shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="distilled at guidance 3"):
        generate(model, cfg, sampling_settings(cfg, num=4, steps=3, guidance=2.0))


@pytest.mark.parametrize(
    "extra", [["distill.guidance_range=[1.0, 5.0]"], ["distill.shared_forward=true"]], ids=["range", "shared"]
)
def test_full_student_refuses_what_needs_the_lora(teacher, extra, tiny_config):
    with pytest.raises(ConfigError, match="fully fine-tunes"):
        tiny_config("tiny-unet", "train.objective=distill", f"train.init_from={teacher}", *FULL, *extra)
