"""003's command-line logic: ``difflora distill`` and the distilled run's side of ``difflora sample``.

The CLI parses and checks the flags and calls these; they raise ValueError (one line) for a
request a distilled run cannot take.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from difflora.config.schema import DISTILL_ADAPTER, Config
from difflora.distill.student import fuse_student
from difflora.train import train

__all__ = ["distill_out_dir", "run_distill", "sampling_guidance", "without_student"]


def distill_out_dir(teacher_run: str | Path, out: str | Path | None = None) -> Path:
    """The run directory of a distillation: ``out``, else ``runs/<teacher name>-distill``."""
    return Path(out or Path("runs") / f"{Path(teacher_run).name}-distill")


def run_distill(cfg: Config, teacher_run: str | Path, out: Path, resume: bool = False, progress: bool = True) -> str:
    """Train the distillation run ``cfg`` (:func:`~difflora.distill.objective.distill_config`) into
    ``out``; returns the line that reports it."""
    result = train(cfg, out, resume=resume, progress=progress)
    d = cfg.distill
    what = (
        f"guidance {d.guidance:g}"
        if d.guidance_range is None
        else "guidance range [{:g}, {:g}]".format(*d.guidance_range)
    )
    acc = result["accounting"]
    return (
        f"distilled {teacher_run} ({what}) into {out}: {result['step']} steps, loss "
        f"{result['last'].get('loss', float('nan')):.5f}, {acc['parameters']['trainable']:,} trainable parameters, "
        f"peak memory {acc['peak_memory_mb']:.0f} MB"
    )


def sampling_guidance(
    model: nn.Module, cfg: Config, guidance: float | None, guidance_fraction: float | None, teacher: bool
) -> float:
    """The scale ``difflora sample`` draws a distilled run at. The student: its LoRA is fused into
    the weights once for the whole sampling run (at ``guidance``, which sets its guidance
    condition). ``teacher`` keeps the LoRA and guides instead (default scale: ``distill.guidance``)."""
    if guidance_fraction not in (None, 1.0) and not teacher:
        raise ValueError(
            "--guidance-fraction applies to classifier-free guidance: add --teacher (the student has none)"
        )
    if teacher:
        return cfg.distill.guidance if guidance is None else guidance
    return fuse_student(model, cfg, guidance)


def without_student(cfg: Config) -> Config:
    """``cfg`` without a distilled run's student LoRA, whose condition sampling sets (not --condition)."""
    adapters = [a for a in cfg.model.adapters if a.name != DISTILL_ADAPTER]
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"adapters": adapters})})
