"""Distilling classifier-free guidance into a LoRA (003): the target, the zero-init student, shared
vs two-call forwards, one copy of W0, a short distillation, and bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from difflora.adapters import adapter_layers, conditions
from difflora.cli.commands import main
from difflora.config.schema import DISTILL_TARGETS, ConfigError
from difflora.diffusion.guidance import NULL_LABEL
from difflora.distill.objective import DistillObjective, distill_config
from difflora.model.build import build_diffusion, build_model
from difflora.train import CheckpointError, latest_checkpoint, load_base, load_weights, train
from difflora.train.objectives import Batch

QUIET = {"progress": False, "log": lambda s: None}
# Float32 sums of the same numbers in a different grouping (3N vs 2N + N batches, hand formula).
TOL = dict(rtol=1e-5, atol=1e-6)
# Between forwards of different batch sizes (3N shared against 2N and N): multi-threaded GEMMs
# block, and so sum, differently by batch size, which moves float32 outputs by a few 1e-6.
BATCH_TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_config) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    cfg = tiny_config("tiny-unet", "train.steps=20", "train.ckpt_every=20")
    train(cfg, run, **QUIET)
    return run


def student(teacher: Path, *overrides: str, lora: float = 0.0):
    """(cfg, model with the teacher's weights and the distillation LoRA; B ~ lora * N(0, 1))."""
    cfg = distill_config(teacher, overrides=list(overrides))
    model = build_model(cfg)
    load_base(model, teacher)
    if lora:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _, layer in adapter_layers(model):
                b = layer.adapters["distill"].lora_B
                b.copy_(lora * torch.randn(b.shape, generator=g))
    return cfg, model.eval()


def batch(n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, {"y": torch.randint(0, 10, (n,), generator=g)})


def xt_inputs(n=6):
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 100, (n,), generator=g)


@pytest.mark.parametrize("rng", [None, "[1.0, 5.0]"])
def test_teacher_target_is_the_cfg_formula_by_hand_with_the_lora_off(teacher, rng):
    over = ["distill.guidance=3"] + ([f"distill.guidance_range={rng}"] if rng else [])
    cfg, model = student(teacher, *over, lora=0.5)
    obj = DistillObjective(cfg, build_diffusion(cfg))
    x, t = xt_inputs()
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    w = torch.tensor([3.0, 1.0, 1.5, 2.0, 4.5, 5.0])
    target = obj.teacher(model, x, t, y, w, {})
    with model.adapters_disabled():  # the teacher is the base network, every adapter off
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, NULL_LABEL))
    eps = uncond[:, :1] + w[:, None, None, None] * (cond[:, :1] - uncond[:, :1])
    torch.testing.assert_close(target, torch.cat([eps, cond[:, 1:]], 1), **TOL)
    # The LoRA (non-zero here) does change the student: the test above could fail.
    on = {"distill": 0} if rng is None else {"guidance": w}
    assert (model(x, t, y, **on) - cond).abs().max() > 1e-3


@pytest.mark.parametrize("shared", [False, True])
def test_zero_lora_student_is_the_conditional_model_and_loss_is_the_guidance_gap(teacher, shared):
    cfg, model = student(teacher, "distill.guidance=2.5", f"distill.shared_forward={str(shared).lower()}")
    diffusion = build_diffusion(cfg)
    b = batch()
    losses = DistillObjective(cfg, diffusion)(model, b, torch.Generator().manual_seed(7), torch.device("cpu"))
    # The objective's draws, redone by hand: t, then noise.
    g = torch.Generator().manual_seed(7)
    t = torch.randint(diffusion.num_timesteps, (6,), generator=g)
    noise = torch.randn(b.x.shape, generator=g)
    x_t = diffusion.q_sample(b.x, t, noise)
    tm = diffusion.model_timesteps(t)
    with torch.no_grad(), model.adapters_disabled():
        cond = model(x_t, tm, b.conditions["y"])
        uncond = model(x_t, tm, torch.full_like(b.conditions["y"], NULL_LABEL))
    gap = ((2.5 - 1.0) * (cond[:, :1] - uncond[:, :1])) ** 2  # guided - conditional
    torch.testing.assert_close(losses["eps"], gap.mean(dim=(1, 2, 3)), **TOL)
    torch.testing.assert_close(losses["var"], torch.zeros(6), **TOL)  # the teacher's variance is the cond one
    torch.testing.assert_close(losses["loss"], losses["eps"], **TOL)
    assert losses["eps"].min() > 0


@pytest.mark.parametrize("rng", [None, "[1.0, 5.0]"])
def test_teacher_rows_of_a_shared_forward_are_unchanged_by_the_lora(teacher, rng):
    over = [f"distill.guidance_range={rng}"] if rng else []
    cfg, model = student(teacher, *over, lora=0.5)
    obj = DistillObjective(cfg, build_diffusion(cfg))
    x, t = xt_inputs()
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    w = obj.scales(6, torch.Generator().manual_seed(2))
    shared_student, shared_target = obj._shared(model, x, t, y, w, {})
    on = {"distill": 0} if rng is None else {"guidance": w}
    torch.testing.assert_close(shared_target, obj.teacher(model, x, t, y, w, {}), **BATCH_TOL)
    torch.testing.assert_close(shared_student, model(x, t, y, **on), **BATCH_TOL)


def _running_tensors(st) -> list[torch.Tensor]:
    """Every tensor the running distillation holds: model (incl. non-persistent buffers), EMA,
    optimizer state, and anything the objective keeps."""
    out = list(st.model.parameters()) + list(st.model.buffers()) + list(st.ema.shadow.values())
    for state in st.optimizer.state.values():
        out += [v for v in state.values() if torch.is_tensor(v)]
    out += [v for v in vars(st.objective).values() if torch.is_tensor(v)]
    return out


def _copies_of(frozen: list[torch.Tensor], tensors: list[torch.Tensor]) -> list[int]:
    """For each frozen weight: the number of distinct storages among ``tensors`` holding its values."""
    counts = []
    for p in frozen:
        ptrs = {
            t.untyped_storage().data_ptr()
            for t in tensors
            if t.shape == p.shape and t.dtype == p.dtype and torch.equal(t.detach(), p.detach())
        }
        counts.append(len(ptrs))
    return counts


def test_exactly_one_copy_of_w0_while_distilling_and_sampling(teacher, tmp_path):
    cfg = distill_config(teacher, overrides=["train.steps=3", "train.batch_size=4", "train.ckpt_every=3"])
    seen = {}

    def check(st):
        if st.step == 2:
            assert not any(isinstance(v, torch.nn.Module) for v in vars(st.objective).values())  # no teacher copy
            frozen = [p for p in st.model.parameters() if not p.requires_grad]
            seen["copies"] = _copies_of(frozen, _running_tensors(st))
            seen["frozen"] = sum(p.numel() for p in frozen)

    train(cfg, tmp_path / "run", callback=check, **QUIET)
    assert seen["frozen"] > 10 * cfg.distill.rank and set(seen["copies"]) == {1}
    # Sampling: the student's LoRA fused into the one copy; nothing kept aside.
    from difflora.distill.student import fuse_student

    model = build_model(cfg)
    state, _ = load_weights(latest_checkpoint(tmp_path / "run"), "ema")
    model.load_state_dict(state)
    del state
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    path = next(p for p, _ in adapter_layers(model))
    fuse_student(model, cfg)
    assert not list(adapter_layers(model))  # every wrapper gave way to its base layer: no W0 kept aside
    distinct = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert len(distinct) == len(list(model.parameters())) + len(list(model.buffers()))
    # The fused weight is W0 + B A (the LoRA trained to non-zero B).
    key = f"{path}.base_layer.weight"
    delta = weights[f"{path}.adapters.distill.lora_B"][0] @ weights[f"{path}.adapters.distill.lora_A"][0]
    fused = model.get_submodule(path).weight
    torch.testing.assert_close(fused, weights[key] + delta.reshape(weights[key].shape), **TOL)
    assert delta.abs().max() > 0


def _eval_gap(cfg, model) -> float:
    """The student's noise prediction against the guided teacher's on a fixed held batch (mean squared)."""
    obj = DistillObjective(cfg, build_diffusion(cfg))
    with torch.no_grad():
        return (
            obj(model, batch(32, seed=11), torch.Generator().manual_seed(12), torch.device("cpu"))["eps"].mean().item()
        )


@pytest.mark.parametrize("rng", [None, "[1.0, 4.0]"])
def test_short_distillation_reduces_the_loss_and_moves_the_student_toward_the_teacher(teacher, tmp_path, rng):
    # LoRA steps of Adam move every entry by ~lr: a small lr against the small guidance gap of a 20-step teacher.
    over = ["train.steps=30", "train.batch_size=16", "train.lr=3e-4", "train.log_every=5", "train.ckpt_every=30"]
    over += [f"distill.guidance_range={rng}"] if rng else ["distill.guidance=3"]
    cfg, fresh = student(teacher, *over)
    before = _eval_gap(cfg, fresh)  # zero LoRA: the conditional model against the guided teacher
    train(cfg, tmp_path / "run", **QUIET)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    trained = build_model(cfg)
    trained.load_state_dict(load_weights(latest_checkpoint(tmp_path / "run"), "model")[0])
    assert _eval_gap(cfg, trained.eval()) < 0.85 * before


def test_distill_config_and_defaults(teacher):
    cfg = distill_config(teacher, guidance=4.0)
    lora = [a for a in cfg.model.adapters if a.name == "distill"]
    assert len(lora) == 1 and lora[0].condition == "distill" and lora[0].targets == list(DISTILL_TARGETS["unet"])
    assert cfg.train.init_from == str(teacher) and not cfg.train.train_base and cfg.train.objective == "distill"
    assert cfg.sample.guidance == 4.0  # evaluation's default scale is the student's w
    ranged = distill_config(teacher, guidance_range=(1.0, 5.0))
    assert ranged.distill.guidance == 3.0 and ranged.model.adapters[0].condition == "guidance"
    assert ranged.model.adapters[0].value_range == (1.0, 5.0)
    # Targets cover the attention and the ResBlock convolutions of the U-Net.
    model = build_model(cfg)
    paths = [p for p, _ in adapter_layers(model)]
    assert any(p.endswith("qkv") for p in paths) and any(p.endswith("in_layers.2") for p in paths)


def test_bad_input_is_a_clear_error(teacher, tmp_path, capsys, tiny_config):
    # A teacher without class conditioning.
    uncond = tmp_path / "uncond"
    uncond.mkdir()
    tree = json.loads((teacher / "config.json").read_text())
    tree["model"]["num_classes"] = 0
    (uncond / "config.json").write_text(json.dumps(tree))
    with pytest.raises(ValueError, match="class-conditional teacher"):
        distill_config(uncond)
    with pytest.raises(ConfigError, match="class-conditional teacher"):
        tiny_config("tiny-unet", "model.num_classes=0", "train.objective=distill")
    # Guidance outside the LoRA's range, in the config and when sampling.
    with pytest.raises(ValueError, match="must lie in distill.guidance_range"):
        distill_config(teacher, guidance=7.0, guidance_range=(1.0, 5.0))
    cfg, model = student(teacher, "distill.guidance_range=[1.0, 5.0]", "distill.guidance=2")
    from difflora.sampling.generate import generate, sampling_settings

    with pytest.raises(ValueError, match=r"outside the range \[1, 5\]"):
        generate(model, cfg, sampling_settings(cfg, num=2, steps=2, guidance=6.0))
    fixed_cfg, fixed = student(teacher, "distill.guidance=2")
    with pytest.raises(ValueError, match="distilled at guidance 2"):
        generate(fixed, fixed_cfg, sampling_settings(fixed_cfg, num=2, steps=2, guidance=3.0))
    # A training batch with a null label or no labels (the teacher is guided to each image's class).
    obj, cpu = DistillObjective(fixed_cfg, build_diffusion(fixed_cfg)), torch.device("cpu")
    nulled = batch()
    nulled.conditions["y"][2] = -1
    for bad in (nulled, Batch(nulled.x)):
        with pytest.raises(ValueError, match="needs a class label for every training image"):
            obj(fixed, bad, torch.Generator().manual_seed(0), cpu)
    # A teacher run whose checkpoints are missing.
    gone = tmp_path / "gone"
    shutil.copytree(teacher, gone)
    shutil.rmtree(gone / "checkpoints")
    assert main(["distill", str(gone), "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.init_from" in err and not (tmp_path / "d" / "config.json").exists()
    assert main(["distill", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sampling_a_distilled_run_whose_teacher_is_gone_names_the_teacher(teacher, tmp_path, capsys):
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    cfg = distill_config(copy, overrides=["train.steps=1", "train.batch_size=2"])
    train(cfg, tmp_path / "run", **QUIET)
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(CheckpointError, match="is missing"):
        load_weights(latest_checkpoint(tmp_path / "run"), "ema")


def test_conditions_reach_the_lora_by_row(teacher):
    # -1 turns the fixed-w LoRA off row by row: the rows equal the base network's.
    cfg, model = student(teacher, lora=0.5)
    x, t = xt_inputs()
    y = torch.arange(6)
    with conditions():
        mixed = model(x, t, y, distill=torch.tensor([0, -1, 0, -1, 0, -1]))
    with model.adapters_disabled():
        base = model(x, t, y)
    torch.testing.assert_close(mixed[1::2], base[1::2], **TOL)
    assert (mixed[0::2] - base[0::2]).abs().max() > 1e-3


def test_default_targets_of_a_dit_student(tiny_config):
    over = ["train.objective=distill", "train.train_base=false", "train.init_from=teacher", "model.num_classes=10"]
    cfg = tiny_config("tiny-dit", *over)
    model = build_model(cfg)
    paths = [p for p, _ in adapter_layers(model)]
    depth = len(model.net.blocks)
    for suffix in DISTILL_TARGETS["dit"]:
        assert sum(p.endswith(suffix) for p in paths) == depth
    assert len(paths) == 4 * depth
