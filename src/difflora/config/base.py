"""The base of every config section: strict pydantic models and the error they raise.

Its own module so that the section modules (``difflora.config.adapters``, ``.diffusers``) can share
it; users import everything from ``difflora.config``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MAX_GUIDANCE", "ConfigError", "GuidanceScale", "StrictModel"]

# The largest classifier-free guidance scale w a config may hold. The papers use w <= 14; past a
# few hundred, w (eps_c - eps_u) drowns the sample, and near 1e19 the distillation target's square
# overflows float32 (1e308 does not even fit a float32 tensor). Refused when the config is read,
# not met as an overflow, or a loss blamed on the learning rate, after a run directory was made.
MAX_GUIDANCE = 1000.0
GuidanceScale = Annotated[float, Field(ge=0, le=MAX_GUIDANCE)]


class ConfigError(ValueError):
    """A config key is unknown, ill-typed or out of range. The message names the key."""


class StrictModel(BaseModel):
    # extra="forbid": a typo in a key is an error, never a silently ignored setting.
    # validate_assignment: cfg.train.lr = "x" after loading is caught too.
    # allow_inf_nan=False: no setting means anything at NaN or infinity (train.lr=inf, sample.eta=.nan).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)
