"""One-pass students: runs whose network samples in one pass what a guided teacher does in two.

A paper package may make such runs (003's student: the teacher's frozen weights plus a
LoRA). Sampling, evaluation and studies never name that paper: they ask :func:`student_of` for the
:class:`Student` that owns a run's config (None for every other run) and let it pick and check the
guidance scale, switch the student on (its conditions) or off (the guided teacher held in the same
weights), and fuse it into the weights for a sampling run. Paper packages fill :data:`STUDENTS`
in their ``register()`` (:mod:`difflora.registry`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from difflora.config.schema import Config
from difflora.registry import Registry

if TYPE_CHECKING:  # studies ask student_of without loading torch
    import torch
    from torch import nn

__all__ = ["STUDENTS", "Student", "student_of"]


class Student(Protocol):
    """How the one-pass student of a run samples; every method takes the run's config."""

    def owns(self, cfg: Config) -> bool:
        """Whether runs of ``cfg`` are students of this kind."""

    def default_guidance(self, cfg: Config) -> float:
        """The scale the student (and its teacher) sample at when none is asked for."""

    def check_guidance(self, cfg: Config, guidance: float) -> float:
        """``guidance`` if the student can sample at it, else a ValueError saying which scales it can."""

    def scales(self, cfg: Config, asked: list[float]) -> list[float]:
        """The scales of ``asked`` a study scores the student at (its own scale when none fits)."""

    def conditions(self, cfg: Config, guidance: float | torch.Tensor) -> dict[str, float | torch.Tensor]:
        """The conditions that switch the student on at ``guidance`` (one pass per step, no guidance wrapper)."""

    def teacher(self, model: nn.Module, cfg: Config) -> AbstractContextManager[None]:
        """A block inside which ``model`` is the teacher (the student off); ValueError if it holds none."""

    def teacher_problem(self, cfg: Config) -> str | None:
        """What a run of ``cfg`` is when its files hold no teacher ("a fully fine-tuned student: ..."), or None."""

    def fuse(self, model: nn.Module, cfg: Config, guidance: float | None = None) -> float:
        """Write the student at ``guidance`` (default: its own) into ``model``'s weights; returns the scale."""


# The kinds of one-pass students, filled by the paper packages' ``register()``.
STUDENTS: Registry[Student] = Registry("sampling.student")


def student_of(cfg: Config) -> Student | None:
    """The student kind that owns runs of ``cfg``, or None (a run that samples with guidance as usual)."""
    return next((s for s in STUDENTS.values() if s.owns(cfg)), None)
