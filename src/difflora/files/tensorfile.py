"""Writing a safetensors file with the permissions of any other file the user creates; refusing
non-finite tensors a user's file hands us.

safetensors (0.8) writes through a private temporary file and keeps its mode, 0600, whatever the
umask: a run, an adapter or a peft export would be unreadable to a colleague sharing the
directory (or to a web server serving it) while the JSON beside it is readable. Every safetensors
file difflora writes goes through :func:`save_tensors`, which gives it the mode ``open()`` would
(0666 minus the umask), or is made by :func:`tensor_bytes` and written by Python's own ``open()``.

A NaN or inf in a loaded weight makes every output NaN, far from the file that caused it: every
reader of tensors a user gives (adapter files, peft files, checkpoints, feature networks, Inception
weights, diffusers weights, condition inputs) passes them through :func:`check_finite`, which names
the first bad tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from difflora.files.atomic import atomic_write

__all__ = ["check_finite", "new_file_mode", "save_tensors", "tensor_bytes"]


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 minus the umask."""
    # os.umask both sets and returns: set a throwaway value and put the old one straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _needed(tensors: Mapping[str, torch.Tensor]) -> int:
    """About the size of the safetensors file of ``tensors``: the data and ~100 header bytes per tensor."""
    return sum(t.numel() * t.element_size() + 100 for t in tensors.values()) + 8


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None, *, shared: bool = False
) -> None:
    """``safetensors.torch.save_file`` written atomically (:func:`~difflora.files.atomic.atomic_write`:
    a full disk is one line naming ``path``; ``shared``: other processes may write it at the same
    time), then the mode a newly created file gets from the umask."""

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, new_file_mode())

    atomic_write(path, write, _needed(tensors), shared=shared)


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of ``tensors`` as bytes, for outputs written together with others
    (:func:`~difflora.files.atomic.write_together`)."""
    return save(tensors, metadata=metadata)


def check_finite(
    tensors: Mapping[str, torch.Tensor], where: str, fix: str, error: Callable[[str], Exception] = ValueError
) -> None:
    """Raise ``error`` if a floating tensor of ``tensors`` holds NaN or inf: "``where``: tensor 'k'
    holds N NaN or infinite values of M; ``fix``"."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise error(f"{where}: tensor {key!r} holds {bad} NaN or infinite values of {tensor.numel()}; {fix}")
