"""Generate images from a model: the one sampling entry point used by training grids, the CLI and eval.

A distilled run (``train.objective: distill``) samples its student: one conditional pass per step,
the LoRA switched on by the condition it reads (``distill=0``, or ``guidance=w`` for a
guidance-scale LoRA), no guidance wrapper. ``teacher=True`` samples the same model with the LoRA off
and classifier-free guidance at w instead. :func:`fuse_student` writes the student's LoRA into
the weights once for a whole sampling run (no second copy of any weight).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from difflora.adapters import adapter_layers
from difflora.config.schema import DISTILL_ADAPTER, Config
from difflora.diffusion.guidance import ClassifierFreeGuidance, selective_threshold
from difflora.diffusion.samplers import sample
from difflora.model.build import DiffusionModel, build_diffusion

__all__ = [
    "NonFiniteSamplesError",
    "condition_tensors",
    "data_conditions",
    "default_labels",
    "fuse_student",
    "generate",
    "student_conditions",
    "student_guidance",
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


def student_guidance(cfg: Config, guidance: float | None = None) -> float:
    """The guidance scale a distilled run's student samples at: ``guidance``, or ``distill.guidance``.

    A fixed-w student knows its own w only; a guidance-scale LoRA any w of its range."""
    d = cfg.distill
    w = d.guidance if guidance is None else float(guidance)
    if d.guidance_range is None:
        if w != d.guidance:
            raise ValueError(
                f"this student was distilled at guidance {d.guidance:g} and samples at that scale only, not {w:g}; "
                "sample the teacher at other scales (--teacher) or distil a guidance-scale LoRA (--guidance-range)"
            )
        return w
    low, high = d.guidance_range
    if not low <= w <= high:
        raise ValueError(
            f"guidance {w:g} is outside the range [{low:g}, {high:g}] the guidance-scale LoRA was distilled on; "
            f"choose a scale in the range (or sample the teacher with --teacher)"
        )
    return w


def student_conditions(cfg: Config, guidance: float | torch.Tensor) -> dict[str, float | torch.Tensor]:
    """The condition that switches a distilled run's LoRA on: ``distill=0`` (fixed w) or ``guidance=w``."""
    return {"distill": 0} if cfg.distill.guidance_range is None else {"guidance": guidance}


def _has_student(model: nn.Module) -> bool:
    return any(DISTILL_ADAPTER in layer.adapters for _, layer in adapter_layers(model))


@torch.no_grad()
def fuse_student(model: nn.Module, cfg: Config, guidance: float | None = None) -> float:
    """Write the student's LoRA at ``guidance`` into the weights in place and drop it; returns w.

    ``W0 <- W0 + B A`` (or the guidance-scale bank's mixture at w) once for the whole sampling
    run: afterwards the model is the student, a plain network with zero per-step overhead, and
    no copy of W0 is kept (a reversible merge would hold one per layer). A wrapper left with no
    adapter is replaced by its base layer (its per-call routing work would be pure overhead), so a
    model whose only adapter was the student's LoRA becomes the plain network, module for module.
    Irreversible: for a model loaded for one sampling run; the teacher is no longer in it.
    """
    w = student_guidance(cfg, guidance)
    values = student_conditions(cfg, w)
    for path, layer in list(adapter_layers(model)):
        if DISTILL_ADAPTER in layer.adapters:
            branch = layer.adapters[DISTILL_ADAPTER]
            layer.base_layer.weight.add_(branch.delta_weight(values[branch.condition], layer.weight))
            del layer.adapters[DISTILL_ADAPTER]
            if not layer.adapters and not layer.merged:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, layer.base_layer)
    return w


def _resolve_guidance(model: nn.Module, cfg: Config, guidance: float | None, teacher: bool) -> float:
    """The scale to sample at: ``guidance``, else a distilled run's ``distill.guidance``, else ``sample.guidance``."""
    distilled = cfg.train.objective == "distill"
    if teacher and not (distilled and _has_student(model)):
        raise ValueError(
            "the teacher is sampled from a distilled run whose student LoRA is not fused into the weights; "
            "this model has no student LoRA"
        )
    if not distilled:
        return cfg.sample.guidance if guidance is None else guidance
    guidance = cfg.distill.guidance if guidance is None else guidance
    return guidance if teacher else student_guidance(cfg, guidance)


def _sampling_fn(model: nn.Module, cfg: Config, guidance: float, fraction: float, teacher: bool, diffusion):
    """(model callable, extra conditions, effective guidance): CFG (selective when fraction < 1), or a
    distilled run's one-pass student."""
    if cfg.train.objective == "distill" and not teacher:
        if fraction != 1.0:
            raise ValueError(
                "the guidance fraction applies to classifier-free guidance; a distilled student has none "
                "(sample the teacher with --teacher)"
            )
        return model, student_conditions(cfg, guidance), guidance
    if guidance == 1.0:
        return model, {}, guidance
    min_t = selective_threshold(diffusion, fraction)
    return ClassifierFreeGuidance(model, guidance, min_t=min_t), {}, guidance


@torch.no_grad()
def generate(
    model: nn.Module,
    cfg: Config,
    num: int,
    *,
    steps: int | None = None,
    sampler: str | None = None,
    eta: float | None = None,
    guidance: float | None = None,
    labels: torch.Tensor | None = None,
    conditions: dict[str, object] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    guidance_fraction: float | None = None,
    teacher: bool = False,
    spatial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw ``num`` samples [num x C x H x W] in [-1, 1]; unset options come from ``cfg.sample``.

    ``labels`` [num] selects classes (-1 = unconditional); guidance != 1 wraps the model in
    classifier-free guidance. ``conditions`` (e.g. ``{"task": 2}`` or ``{"task": [0, 1, 2]}``, see
    :func:`condition_tensors`) reach the adapters reading them, in both halves of a guided batch.
    The same seed and ``cfg.sample.batch_size`` give the same images. Raises
    :class:`NonFiniteSamplesError` when a sample holds NaN or inf.

    ``guidance_fraction`` (default ``sample.guidance_fraction``) < 1 is selective guidance: CFG on
    the first (noisiest) fraction of the steps, conditional on the rest. A distilled run samples
    its student in one pass per step at ``guidance`` (default ``distill.guidance``; see
    :func:`student_guidance`), or with ``teacher=True`` the guided teacher (the LoRA off).
    ``spatial`` [num x C_s x H x W]: the condition images of a run with spatial tasks
    (:func:`difflora.data.spatial.heldout_conditions`), one per sample, with ``conditions["task"]``.
    """
    s = cfg.sample
    steps = steps or s.steps
    sampler = sampler or s.sampler
    eta = s.eta if eta is None else eta
    fraction = s.guidance_fraction if guidance_fraction is None else guidance_fraction
    guidance = _resolve_guidance(model, cfg, guidance, teacher)
    if num < 1:
        raise ValueError(f"the number of samples must be at least 1, got {num}")
    if steps > cfg.diffusion.steps:
        raise ValueError(f"--steps {steps} exceeds the diffusion's {cfg.diffusion.steps} timesteps")
    if guidance != 1.0 and cfg.model.num_classes == 0:
        raise ValueError("guidance needs a class-conditional model (model.num_classes > 0)")
    diffusion = build_diffusion(cfg, respacing=f"ddim{steps}" if sampler == "ddim" else steps)
    fn, student, guidance = _sampling_fn(model, cfg, guidance, fraction, teacher, diffusion)
    extra = condition_tensors({**(conditions or {}), **student}, num) | _spatial_condition(spatial, num, cfg)
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
    # The teacher of a distilled run is the same weights with the student's LoRA off.
    lora_off = model.adapters_disabled(DISTILL_ADAPTER) if teacher else contextlib.nullcontext()
    try:
        with merged, lora_off:
            draw = dict(generator=gen, sampler=sampler, eta=eta, progress=progress, device=device)
            out = _draw_batches(diffusion, fn, noise, extra, labels, s.batch_size, draw)
    finally:
        model.train(was_training)
    images = torch.cat(out)
    bad = ~torch.isfinite(images).flatten(1).all(1)
    if bad.any():
        raise NonFiniteSamplesError(
            f"sampling produced NaN or infinite values in {int(bad.sum())} of {num} samples "
            f"({sampler}, {steps} steps, guidance {guidance:g}); the weights may have diverged: "
            "try the other weights (--weights) or an earlier --checkpoint"
        )
    return images


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
