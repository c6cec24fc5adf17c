"""difflora: low-rank conditioning, adaptation and distillation of diffusion models."""

from difflora.config import Config, ConfigError, load_config

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "__version__", "build_diffusion", "build_model", "load_config"]


def __getattr__(name: str):
    # Lazy: `import difflora` stays light (no torch import) for `difflora --help` and config checks.
    if name in ("build_model", "build_diffusion"):
        from difflora import model

        return getattr(model, name)
    raise AttributeError(f"module 'difflora' has no attribute {name!r}")
