"""Generate images from a model: the one sampling entry point used by training grids, the CLI and eval.

The run's validated sampling settings (a :class:`~difflora.config.schema.SampleConfig`) travel
whole. A one-pass student's run (:mod:`difflora.sampling.student`) samples its student, one
conditional pass per step with no guidance wrapper, or with ``teacher=True`` the guided teacher
held in the same weights.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from difflora.config.schema import Config, SampleConfig
from difflora.diffusion.guidance import ClassifierFreeGuidance, selective_threshold
from difflora.diffusion.samplers import sample
from difflora.model.build import DiffusionModel, build_diffusion
from difflora.model.pipeline import decode
from difflora.sampling.student import student_of

__all__ = [
    "NonFiniteSamplesError",
    "condition_tensors",
    "data_conditions",
    "default_labels",
    "generate",
    "sampling_settings",
]


class NonFiniteSamplesError(ValueError):
    """Sampling produced NaN or infinite values: a diverged checkpoint or settings far outside the
    trained range. Raised instead of writing an image of NaNs."""


def condition_tensors(conditions: dict[str, object] | None, num: int) -> dict[str, torch.Tensor]:
    """Per-sample conditions for ``num`` samples: name -> [num] tensor.

    A value is a number (shared by every sample), a sequence of ``num`` numbers or a tensor [num].
    Integral values become int64 (task ids, indices), others float32 (a guidance scale). Names
    must be identifiers other than ``t`` (the sampler sets it) and ``y`` (``labels``); values finite.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in (conditions or {}).items():
        if not isinstance(name, str) or not name.isidentifier() or name in ("t", "y"):
            hint = " (use --class / labels for y)" if name == "y" else ""
            raise ValueError(f"condition name {name!r} must be an identifier other than t and y{hint}")
        v = torch.as_tensor(value)
        if v.ndim == 0:
            v = v.expand(num)
        if v.shape != (num,):
            raise ValueError(f"condition {name}: give one value or {num} (one per sample), got {v.numel()}")
        if v.dtype == torch.bool or not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"condition {name}: values must be numbers, got {v.dtype}")
        if v.is_floating_point():
            if not torch.isfinite(v).all():
                raise ValueError(f"condition {name}: values must be finite, got {v.tolist()}")
            v = v.long() if (v == v.round()).all() else v.float()
        out[name] = v.long() if not v.is_floating_point() else v
    return out


def default_labels(cfg: Config, num: int, cls: int | None = None) -> torch.Tensor | None:
    """Labels for ``num`` samples of a run with config ``cfg``: all ``cls`` if given, else 0, 1, ...,
    C-1 repeated (a grid with one class per column); None (unconditional sampling) for an
    unconditional model and for a run trained with every label dropped (``train.label_dropout`` 1:
    only the null label was trained, so class labels would ask the untouched base's classes)."""
    num_classes = cfg.model.num_classes
    if num_classes == 0:
        if cls is not None:
            raise ValueError("--class was given but the model is unconditional (model.num_classes = 0)")
        return None
    if cls is not None:
        if not 0 <= cls < num_classes:
            raise ValueError(f"class {cls} is out of range: the model has classes 0..{num_classes - 1}")
        return torch.full((num,), cls, dtype=torch.long)
    if cfg.train.label_dropout >= 1.0:
        return None
    return torch.arange(num, dtype=torch.long) % num_classes


def data_conditions(cfg: Config) -> dict[str, int]:
    """The conditions of ``data.name``'s own samples beyond t and y: ``{"task": id}`` when the data
    carries task ids (``data.task_id``, or task 0 of ``data.tasks``), else none. Spatial tasks are
    not covered: each of them has its own id and condition images (``difflora.eval.fidelity``)."""
    d = cfg.data
    if d.spatial is None and (d.task_id is not None or d.tasks):
        return {"task": d.task_id or 0}
    return {}


def sampling_settings(cfg: Config, **changes: object) -> SampleConfig:
    """The sampling settings of a run with config ``cfg`` (``cfg.sample``; the guidance scale of a
    one-pass student is its own, see :mod:`difflora.sampling.student`) with ``changes`` (None: keep)
    applied, validated by the rules of the ``sample`` keys (pydantic's ValidationError, a ValueError)."""
    student = student_of(cfg)
    own = {"guidance": student.default_guidance(cfg)} if student is not None else {}
    return cfg.sample.with_changes(own | {k: v for k, v in changes.items() if v is not None})


def _sampling_fn(model: nn.Module, cfg: Config, s: SampleConfig, teacher: bool, diffusion, null_context=None):
    """(model callable, extra conditions, the block to sample in): CFG (selective when
    ``s.guidance_fraction`` < 1), or a one-pass student switched on by its conditions (the scale
    checked), or with ``teacher`` its guided teacher (the student switched off in the block)."""
    student = student_of(cfg)
    if teacher and student is None:
        raise ValueError(
            "teacher=True samples the guided teacher held in a one-pass student's run; this run is not one"
        )
    if student is not None and not teacher:
        if s.guidance_fraction != 1.0:
            raise ValueError(
                "the guidance fraction applies to classifier-free guidance; a one-pass student has none "
                "(sample the teacher with --teacher)"
            )
        return model, student.conditions(cfg, student.check_guidance(cfg, s.guidance)), contextlib.nullcontext()
    block = student.teacher(model, cfg) if teacher else contextlib.nullcontext()
    if s.guidance == 1.0:
        return model, {}, block
    min_t = selective_threshold(diffusion, s.guidance_fraction)
    return ClassifierFreeGuidance(model, s.guidance, min_t=min_t, null_context=null_context), {}, block


@torch.no_grad()
def generate(
    model: nn.Module,
    cfg: Config,
    settings: SampleConfig | None = None,
    *,
    labels: torch.Tensor | None = None,
    conditions: dict[str, object] | None = None,
    spatial: torch.Tensor | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    teacher: bool = False,
    context: torch.Tensor | None = None,
    null_context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw ``settings.num`` samples [num x C x H x W] in [-1, 1].

    ``settings``: the validated sampling settings (number, steps, sampler, eta, guidance, guidance
    fraction, batch size; default: the run's, :func:`sampling_settings`). ``labels`` [num] selects
    classes (-1 = unconditional); guidance != 1 wraps the model in classifier-free guidance.
    ``conditions`` (e.g. ``{"task": 2}`` or ``{"task": [0, 1, 2]}``, see :func:`condition_tensors`)
    reach the adapters reading them, in both halves of a guided batch. The same seed and batch size
    give the same images. Raises :class:`NonFiniteSamplesError` when a sample holds NaN or inf.

    A guidance fraction < 1 is selective guidance: CFG on the first (noisiest) fraction of the
    steps, conditional on the rest. A one-pass student's run (:mod:`difflora.sampling.student`, e.g.
    003's LoRA student) samples the student in one pass per step at the guidance scale, or with
    ``teacher=True`` the guided teacher held in the same weights.
    ``spatial`` [num x C_s x H x W]: the condition images of a run with spatial tasks
    (:func:`difflora.data.spatial.heldout_conditions`), one per sample, with ``conditions["task"]``.
    A text pipeline's run (``model.text``) needs ``context`` [num x L x D], the prompts' contexts, and
    ``null_context`` [L x D], the empty prompt's (guidance's unconditional branch); a latent
    pipeline's samples (``model.latent``) are decoded by its VAE, loaded for the purpose.
    """
    s = settings if settings is not None else sampling_settings(cfg)
    num = s.num
    if s.steps > cfg.diffusion.steps:
        raise ValueError(f"--steps {s.steps} exceeds the diffusion's {cfg.diffusion.steps} timesteps")
    text = _text_inputs(cfg, context, null_context, num)
    if s.guidance != 1.0 and cfg.model.num_classes == 0 and not text:
        raise ValueError("guidance needs a class-conditional model (model.num_classes > 0) or a text pipeline")
    diffusion = build_diffusion(cfg, respacing=f"ddim{s.steps}" if s.sampler == "ddim" else s.steps)
    fn, student, guided_teacher = _sampling_fn(model, cfg, s, teacher, diffusion, null_context)
    extra = condition_tensors({**(conditions or {}), **student}, num) | _spatial_condition(spatial, num, cfg) | text
    m = cfg.model
    shape = (m.in_channels, m.image_size, m.image_size)
    was_training = model.training
    model.eval()
    # One generator for the whole draw: the initial noise of every sample is drawn up front so that
    # splitting into batches does not change which noise a sample gets.
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num, *shape), generator=gen)
    # Every sample of a sampler step shares t: the TimeLoRA update is merged once per step (exact,
    # undone on exit); class adapters stay per sample, as classifier-free guidance needs.
    merged = model.merged("t") if isinstance(model, DiffusionModel) else contextlib.nullcontext()
    try:
        with merged, guided_teacher:
            # Latents are not images: only the VAE's decoded images are clamped to [-1, 1].
            draw = dict(generator=gen, sampler=s.sampler, eta=s.eta, progress=progress, device=device)
            draw["clamp"] = cfg.model.latent is None
            out = _draw_batches(diffusion, fn, noise, extra, labels, s.batch_size, draw)
    finally:
        model.train(was_training)
    images = torch.cat(out)
    bad = ~torch.isfinite(images).flatten(1).all(1)
    if bad.any():
        raise NonFiniteSamplesError(
            f"sampling produced NaN or infinite values in {int(bad.sum())} of {num} samples "
            f"({s.sampler}, {s.steps} steps, guidance {s.guidance:g}); the weights may have diverged: "
            "try the other weights (--weights) or an earlier --checkpoint"
        )
    return decode(cfg, images, device, s.batch_size) if cfg.model.latent is not None else images


def _text_inputs(
    cfg: Config, context: torch.Tensor | None, null: torch.Tensor | None, num: int
) -> dict[str, torch.Tensor]:
    """``{"context": [num x L x D]}`` for a text pipeline's run, checked (``{}`` for any other run)."""
    if cfg.model.text is None:
        if context is not None:
            raise ValueError("context= is for a text pipeline's run (model.text); this run has no text encoder")
        return {}
    if context is None or null is None:
        raise ValueError("a text pipeline's run samples from prompts: give their contexts and the empty prompt's")
    if context.ndim != 3 or context.shape[0] != num or null.shape != context.shape[1:]:
        raise ValueError(
            f"context must be [{num} x L x D] and null_context [L x D], got {tuple(context.shape)} and {tuple(null.shape)}"
        )
    return {"context": context.float()}


def _spatial_condition(spatial: torch.Tensor | None, num: int, cfg: Config) -> dict[str, torch.Tensor]:
    """``{"spatial": [num x C_s x H x W]}`` checked against the model (``{}`` without condition images)."""
    if spatial is None:
        return {}
    m = cfg.model
    if spatial.shape != (num, m.spatial_channels, m.image_size, m.image_size):
        raise ValueError(
            f"spatial must be [{num} x {m.spatial_channels} x {m.image_size} x {m.image_size}] "
            f"(one condition image per sample), got {tuple(spatial.shape)}"
        )
    return {"spatial": spatial.float()}


def _draw_batches(
    diffusion,
    fn,
    noise: torch.Tensor,
    extra: dict[str, torch.Tensor],
    labels: torch.Tensor | None,
    batch_size: int,
    draw: dict[str, Any],
) -> list[torch.Tensor]:
    """Run the sampler over ``noise`` [num x C x H x W] in batches of ``batch_size``; ``extra`` [num]
    conditions and ``labels`` [num] are sliced to each batch; ``draw`` holds the sampler's options."""
    num, device, out = noise.shape[0], draw["device"], []
    for start in range(0, num, batch_size):
        end = min(num, start + batch_size)
        kwargs = {k: v[start:end].to(device) for k, v in extra.items()}
        if labels is not None:
            kwargs["y"] = labels[start:end].to(device)
        x = sample(
            diffusion,
            fn,
            (end - start, *noise.shape[1:]),
            model_kwargs=kwargs,
            noise=noise[start:end].to(device),
            **draw,
        )
        out.append(x.cpu())
    return out
