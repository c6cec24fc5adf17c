"""Writing a safetensors file with the permissions of any other file the user creates.

safetensors (0.8) writes through a private temporary file and keeps its mode, 0600, whatever the
umask: a run, an adapter or a peft export would be unreadable to a colleague sharing the
directory (or to a web server serving it) while the JSON beside it is readable. Every safetensors
file difflora writes goes through :func:`save_tensors`, which gives it the mode ``open()`` would
(0666 minus the umask).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["save_tensors"]


def _umask() -> int:
    # os.umask both sets and returns: set a throwaway value and put the old one straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, then the mode a newly created file gets from the umask."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
