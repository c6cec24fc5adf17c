"""Writing a safetensors file with the permissions of any other file the user creates; refusing
non-finite tensors a user's file hands us.

safetensors (0.8) writes through a private temporary file and keeps its mode, 0600, whatever the
umask: a run, an adapter or a peft export would be unreadable to a colleague sharing the
directory (or to a web server serving it) while the JSON beside it is readable. Every safetensors
file difflora writes goes through :func:`save_tensors`, which gives it the mode ``open()`` would
(0666 minus the umask).

A NaN or inf in a loaded weight makes every output NaN, far from the file that caused it: every
reader of tensors a user gives (adapter files, peft files, checkpoints) passes them through
:func:`check_finite`, which names the first bad tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["check_finite", "new_file_mode", "save_tensors"]


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 minus the umask."""
    # os.umask both sets and returns: set a throwaway value and put the old one straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, then the mode a newly created file gets from the umask."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, new_file_mode())


def check_finite(
    tensors: Mapping[str, torch.Tensor], where: str, fix: str, error: Callable[[str], Exception] = ValueError
) -> None:
    """Raise ``error`` if a floating tensor of ``tensors`` holds NaN or inf: "``where``: tensor 'k'
    holds N NaN or infinite values of M; ``fix``"."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise error(f"{where}: tensor {key!r} holds {bad} NaN or infinite values of {tensor.numel()}; {fix}")
