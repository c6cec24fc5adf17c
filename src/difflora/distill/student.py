"""003's student as it samples: one conditional pass per step with the LoRA switched on.

The LoRA is switched on by the condition it reads (``distill=0``, or ``guidance=w`` for a
guidance-scale LoRA), with no guidance wrapper. The teacher is the same model with the LoRA off and
classifier-free guidance at w. :func:`fuse_student` writes the student's LoRA into the weights
once for a whole sampling run (no second copy of any weight). :class:`DistilledStudent` is what
sampling, evaluation and studies reach through :data:`difflora.sampling.student.STUDENTS`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from difflora.adapters import adapter_layers
from difflora.config.schema import DISTILL_ADAPTER, Config

__all__ = ["DistilledStudent", "fuse_student", "has_student", "student_conditions", "student_guidance"]


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


def has_student(model: nn.Module) -> bool:
    """Whether ``model`` still holds the student's LoRA (not fused into its weights)."""
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


class DistilledStudent:
    """A distilled run (``Config.distilled``) for sampling, evaluation and studies (the
    :class:`~difflora.sampling.student.Student` protocol)."""

    def owns(self, cfg: Config) -> bool:
        return cfg.distilled

    def default_guidance(self, cfg: Config) -> float:
        # The scale the run was distilled at, for the student and its teacher alike.
        return cfg.distill.guidance

    def check_guidance(self, cfg: Config, guidance: float) -> float:
        return student_guidance(cfg, guidance)

    def scales(self, cfg: Config, asked: list[float]) -> list[float]:
        """A fixed-w student: its own w. A guidance-scale LoRA: the scales of ``asked`` inside its
        range (none: its default w)."""
        d = cfg.distill
        if d.guidance_range is None:
            return [float(d.guidance)]
        low, high = d.guidance_range
        return [w for w in asked if low <= w <= high] or [float(d.guidance)]

    def conditions(self, cfg: Config, guidance: float | torch.Tensor) -> dict[str, float | torch.Tensor]:
        return student_conditions(cfg, guidance)

    def teacher(self, model: nn.Module, cfg: Config) -> AbstractContextManager[None]:
        """The teacher of a distilled run is the same weights with the student's LoRA off."""
        if not has_student(model):
            raise ValueError(
                "the teacher is sampled from a distilled run whose student LoRA is not fused into the weights; "
                "this model has no student LoRA"
            )
        return model.adapters_disabled(DISTILL_ADAPTER)

    def teacher_problem(self, cfg: Config) -> str | None:
        if cfg.train.train_base:
            return (
                "a fully fine-tuned student: its files hold no teacher; evaluate its teacher run "
                f"{cfg.train.init_from} instead"
            )
        return None

    def fuse(self, model: nn.Module, cfg: Config, guidance: float | None = None) -> float:
        return fuse_student(model, cfg, guidance)
