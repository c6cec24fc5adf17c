"""Content fingerprints (what a cache's key is made of), and the modules the caches are given.

A module's fingerprint is the sha256 of its class name, its ``config`` (diffusers' and
transformers' models carry one; keys starting with "_" and version strings are dropped, they say
where the model came from, not what it computes) and every parameter and buffer: name, dtype,
shape and bytes. Two VAEs that differ in one weight, in ``scaling_factor`` or in dtype have
different fingerprints; the same weights loaded twice have the same one.

A cache is given its VAE or text encoder as a module, or as a function that loads one: with a
fingerprint known without the weights (a pipeline folder's), a cache that is already built then
needs no model in memory at all (:func:`loaded_once`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "ModuleOrLoader",
    "hash_tensor",
    "loaded_once",
    "module_config",
    "module_fingerprint",
    "tensor_fingerprint",
]

ModuleOrLoader = nn.Module | Callable[[], nn.Module]

# Keys of a model config that record its provenance (library version, source path), not its function.
_PROVENANCE = ("transformers_version", "diffusers_version")


def module_config(module: nn.Module) -> dict[str, Any]:
    """The module's ``config`` as a plain dict ({} when it has none), provenance keys dropped."""
    config = getattr(module, "config", None)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        return {}
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _PROVENANCE}


def hash_tensor(hasher: Any, tensor: torch.Tensor) -> None:
    """Feed ``tensor``'s dtype, shape and bytes (as stored, on the CPU) to ``hasher``."""
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    hasher.update(f"{str(t.dtype)}{list(tensor.shape)}".encode())
    hasher.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    hasher = hashlib.sha256()
    hash_tensor(hasher, tensor)
    return hasher.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """sha256 of ``module``'s class, config and every parameter and buffer (see the module docstring)."""
    hasher = hashlib.sha256()
    config = json.dumps(module_config(module), sort_keys=True, default=str)
    hasher.update(f"{type(module).__qualname__}\n{config}\n".encode())
    for name, tensor in sorted(module.state_dict().items()):
        hasher.update(name.encode())
        hash_tensor(hasher, tensor)
    return hasher.hexdigest()


def loaded_once(module: ModuleOrLoader) -> Callable[[], nn.Module]:
    """A function returning ``module``, or what the loader ``module`` returns, calling it at most once."""
    if isinstance(module, nn.Module):
        return lambda: module
    loaded: list[nn.Module] = []

    def get() -> nn.Module:
        if not loaded:
            loaded.append(module())
        return loaded[0]

    return get
