"""Typed configuration: one tree of pydantic models, loaded from YAML with dotted overrides.

The bottom of the house: every layer may import it. ``base`` holds the strict base model and
:class:`ConfigError`; ``adapters`` the adapter, Affiner and distillation sections; ``diffusers``
the section of a diffusers backbone; ``schema`` the whole tree and its loading.
"""

from difflora.config.schema import *  # noqa: F403  (the package's face: every public name of the tree)
from difflora.config.schema import __all__  # noqa: F401
