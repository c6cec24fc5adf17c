"""000, TimeLoRA and ClassLoRA (Choi et al., "LoRA can Replace Time and Class Embeddings in
Diffusion Probabilistic Models"; extended as arXiv 2405.03958): LoRA on the attention weights,
conditioned per sample on the timestep and the class, in place of the time and class embeddings.

The mechanism itself is shared (a timestep or class weighting over a bank of LoRA bases, see
:mod:`difflora.adapters`); what is 000's alone lives here and is added to the shared registries
in :func:`register` (:mod:`difflora.registry`).
"""

from difflora.experiments.report import REPORT_FIGURES
from difflora.timelora.figures import WEIGHT_HEATMAPS

__all__ = ["register"]


def register() -> None:
    """Add 000 to the shared registries (called once, through the ``difflora.papers`` entry point)."""
    REPORT_FIGURES.register("timelora.weights", WEIGHT_HEATMAPS)
