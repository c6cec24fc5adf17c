"""003, LoRA-enhanced distillation (Golnari, "LoRA-Enhanced Distillation on Guided Diffusion
Models", arXiv 2312.06899): a LoRA student that shares the teacher's frozen weights learns to
reproduce classifier-free guidance in one pass.

Everything of 003 lives here: the training objective (``objective.py``), the student as it samples
and its guided teacher (``student.py``), and the logic of ``difflora distill`` and of sampling a
distilled run (``command.py``). The shared code reaches it only through the registries this
package fills in :func:`register` (:mod:`difflora.registry`): ``train.objective`` and
``sampling.student``; it asks a config whether it is a distilled run through ``Config.distilled``.
"""

from difflora.distill.objective import DistillObjective
from difflora.distill.student import DistilledStudent
from difflora.sampling.student import STUDENTS
from difflora.train.objectives import OBJECTIVES

__all__ = ["register"]


def register() -> None:
    """Add 003 to the shared registries (called once, through the ``difflora.papers`` entry point)."""
    OBJECTIVES.register("distill", DistillObjective)
    STUDENTS.register("distill", DistilledStudent())
