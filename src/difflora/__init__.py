"""difflora: low-rank conditioning, adaptation and distillation of diffusion models."""

from importlib.metadata import PackageNotFoundError, version

from difflora.config.schema import Config, ConfigError, load_config

try:
    # One source of truth: pyproject.toml's version, as installed (wheel or editable).
    __version__ = version("difflora")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = ["Config", "ConfigError", "__version__", "build_diffusion", "build_model", "load_config", "open_run"]


def __getattr__(name: str):
    # Lazy: `import difflora` stays light (no torch import) for `difflora --help` and config checks.
    if name in ("build_model", "build_diffusion"):
        from difflora import model

        return getattr(model, name)
    if name == "open_run":
        from difflora import train

        return train.open_run
    raise AttributeError(f"module 'difflora' has no attribute {name!r}")
