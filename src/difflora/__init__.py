"""difflora: low-rank conditioning, adaptation and distillation of diffusion models."""

import importlib
from importlib.metadata import PackageNotFoundError, version

from difflora.config.schema import Config, ConfigError, load_config

try:
    # One source of truth: pyproject.toml's version, as installed (wheel or editable).
    __version__ = version("difflora")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Config",
    "ConfigError",
    "__version__",
    "attach",
    "build_diffusion",
    "build_model",
    "detach",
    "load_config",
    "open_run",
]


# Names built lazily, so that `import difflora` stays light (no torch) for `difflora --help` and
# config checks: name -> the module that defines it.
_LAZY = {
    "build_model": "difflora.model",
    "build_diffusion": "difflora.model",
    "open_run": "difflora.train",
    "attach": "difflora.sampling.pipeline",
    "detach": "difflora.sampling.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'difflora' has no attribute {name!r}")
