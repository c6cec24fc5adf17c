"""004, the adapter design space (Xiang et al., "A Closer Look at Parameter-Efficient Tuning in
Diffusion Models", arXiv 2303.18181): where an adapter reads and writes inside a block and what
function it computes, swept and analysed with ANOVA.

Position adapters are part of the shared mechanism (:mod:`difflora.adapters.positions`); the sweep
(:mod:`difflora.design_space.sweep`, a factorial design run by the shared study runner) and its
analysis (:mod:`difflora.design_space.anova`) live here, called by the ``difflora sweep`` and
``difflora anova`` commands; what 004 adds to the shared registries goes in :func:`register`
(:mod:`difflora.registry`).
"""

__all__ = ["register"]


def register() -> None:
    """Add 004 to the shared registries (called once, through the ``difflora.papers`` entry point)."""
