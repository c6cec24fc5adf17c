"""Distilling a text pipeline (003 on Stable Diffusion's setting): the teacher is guided to each caption
with the empty prompt's context as its unconditional branch.

Reference: the guided target computed by hand from two calls of the model with the student's LoRA
off (the caption's context, then the empty prompt's), ``uncond + w (cond - uncond)``; the zero-init
student equals the conditional model; the one-forward (shared) path gives the two-call path's losses.
"""

import contextlib
import io

import pytest
import torch

from difflora.adapters import adapter_layers
from difflora.config.schema import DISTILL_ADAPTER
from difflora.distill.objective import DistillObjective, distill_config
from difflora.model.build import build_diffusion, build_model
from difflora.train.base import load_base
from difflora.train.objectives import Batch
from difflora.train.pipeline_data import open_training_batches
from latent_pipelines import image_folder, sd_pipeline

pytest.importorskip("transformers")

# Between forwards of different batch sizes (3N against 2N + N): float32 sums grouped differently.
BATCH_TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def text_student(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-distill")
    with contextlib.redirect_stderr(io.StringIO()):
        pipe = sd_pipeline(root / "sd")
    over = [
        "data.name=image-folder",
        f"data.root={image_folder(root / 'pets', n=12)}",
        f"data.index_cache={root / 'index'}",
        "distill.targets=[to_q,to_v]",
        f"model.latent.cache={root / 'latents'}",
        f"model.text.cache={root / 'prompts'}",
        "train.batch_size=6",
    ]
    cfg = distill_config(pipe, guidance=3.0, overrides=over)
    data = open_training_batches(cfg, seed=0, batch_size=6, rows=list(range(6)), log=lambda s: None)
    model = build_model(cfg)
    load_base(model, cfg.train.init_from)
    return cfg, model.eval(), data


def test_a_text_pipeline_is_a_teacher_and_its_captions_are_never_dropped(text_student):
    cfg, _, data = text_student
    assert cfg.distilled and cfg.model.num_classes == 0 and cfg.model.text is not None
    assert data.prompt_dropout == 0.0  # the teacher is guided to every caption
    x, y, conditions = data.draw(0, torch.Generator().manual_seed(0))
    empty = data.prompts.empty.float()
    assert torch.equal(conditions["null_context"], empty.expand_as(conditions["context"]))
    assert all(not torch.equal(c, empty) for c in conditions["context"])  # every row is a caption's context


@pytest.mark.parametrize("shared", [False, True])
def test_the_target_is_the_guided_teacher_and_the_zero_init_student_is_the_conditional_model(text_student, shared):
    cfg, model, data = text_student
    cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"shared_forward": shared})})
    x, y, conditions = data.draw(0, torch.Generator().manual_seed(1))
    diffusion = build_diffusion(cfg)
    objective = DistillObjective(cfg, diffusion)
    losses = objective(model, Batch(x, {"y": y, **conditions}), torch.Generator().manual_seed(2), torch.device("cpu"))
    # The same draws by hand: t, then the noise (w is fixed); the teacher's two branches, LoRA off.
    g = torch.Generator().manual_seed(2)
    t = torch.randint(diffusion.num_timesteps, (6,), generator=g)
    x_t = diffusion.q_sample(x, t, torch.randn(x.shape, generator=g))
    with torch.no_grad(), model.adapters_disabled(DISTILL_ADAPTER):
        cond = model(x_t, t, context=conditions["context"])
        uncond = model(x_t, t, context=conditions["null_context"])
        student = model(x_t, t, context=conditions["context"], distill=torch.zeros(6, dtype=torch.long))
    want = ((student - (uncond + 3.0 * (cond - uncond))) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["loss"], want, **BATCH_TOL)
    assert losses["loss"].min() > 1e-6  # guidance moves the target away from the conditional model


def test_the_trained_lora_changes_the_student_not_the_teacher(text_student):
    cfg, model, data = text_student
    x, y, conditions = data.draw(0, torch.Generator().manual_seed(3))
    t = torch.full((6,), 50)
    lora_B = [layer.adapters[DISTILL_ADAPTER].lora_B for _, layer in adapter_layers(model)]
    saved = [b.detach().clone() for b in lora_B]
    with torch.no_grad():
        before = model(x, t, context=conditions["context"], distill=torch.zeros(6, dtype=torch.long))
        for b in lora_B:
            b.normal_()
        after = model(x, t, context=conditions["context"], distill=torch.zeros(6, dtype=torch.long))
        with model.adapters_disabled(DISTILL_ADAPTER):
            teacher = model(x, t, context=conditions["context"])
        for b, value in zip(lora_B, saved, strict=True):
            b.copy_(value)
    assert torch.equal(teacher, before) and (after - before).abs().max() > 1e-3
