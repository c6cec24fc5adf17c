"""The base of every config section: strict pydantic models and the error they raise.

Its own module so that the section modules (``difflora.config.adapters``, ``.diffusers``) can share
it; users import everything from ``difflora.config``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ConfigError", "StrictModel"]


class ConfigError(ValueError):
    """A config key is unknown, ill-typed or out of range. The message names the key."""


class StrictModel(BaseModel):
    # extra="forbid": a typo in a key is an error, never a silently ignored setting.
    # validate_assignment: cfg.train.lr = "x" after loading is caught too.
    # allow_inf_nan=False: no setting means anything at NaN or infinity (train.lr=inf, sample.eta=.nan).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)
