"""The base of every config section: strict pydantic models and the error they raise.

Its own module so that the section modules (``difflora.config.adapters``, ``.diffusers``) can share
it; users import everything from ``difflora.config``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MAX_GUIDANCE", "ConfigError", "GuidanceScale", "StrictModel", "hold_fixed", "unused_at_default"]

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
    # The docstring under each field is its description (difflora.config.explain reads them when asked:
    # pydantic's use_attribute_docstrings would parse every module's source at import, ~0.5 s a command).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


def hold_fixed(section: BaseModel, where: str, fixed: dict[str, Any], by: str) -> None:
    """Give ``section``'s keys the values ``by`` fixes (a preset, a mode, an arch), so that the config
    and its ``config.json`` record what runs. A key whose value cannot take effect is never ignored:
    one the user set (``model_fields_set``) to another value is a ValueError naming it and the fix.
    A key that ``by`` leaves unused is fixed at its default: the default is the only value it records."""
    for key, value in fixed.items():
        have = getattr(section, key)
        if key in section.model_fields_set and have != value:
            raise ValueError(
                f"{where}.{key}={have!r} cannot take effect: {by} holds it at {value!r}; remove {where}.{key}"
            )
        object.__setattr__(section, key, value)


def unused_at_default(section: BaseModel, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``{key: default}`` for ``keys`` of ``section`` (all of its keys when None): what
    :func:`hold_fixed` holds when a mode leaves those keys unused."""
    fields = type(section).model_fields
    return {k: fields[k].get_default(call_default_factory=True) for k in (keys or tuple(fields))}
