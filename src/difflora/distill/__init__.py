"""003, LoRA-enhanced distillation (Golnari, "LoRA-Enhanced Distillation on Guided Diffusion
Models", arXiv 2312.06899): a LoRA student that shares the teacher's frozen weights learns to
reproduce classifier-free guidance in one pass.

Everything of 003 lives here; the shared code reaches it only through the registries this
package fills in :func:`register` (:mod:`difflora.registry`).
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
