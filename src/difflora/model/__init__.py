"""Building a model from a config: the backbone, its adapters from the config entries, and the
model callable ``model(x, t, y=None, **conditions)`` the diffusion code uses."""

from difflora.model.build import DiffusionModel, build_diffusion, build_model

__all__ = ["DiffusionModel", "build_diffusion", "build_model"]
