"""Shared pretrained bases: train a preset once into a cache, reuse it from every study.

DiffScaler (002), LoRA distillation (003) and the adapter design space (004) all start from a
trained model. ``difflora pretrain NAME`` trains ``configs/pretrain/NAME.yaml`` (class-conditional
U-Net and DiT on Fashion-MNIST at 16x16 with label dropout for classifier-free guidance) into
``$DIFFLORA_CACHE/bases/NAME`` (default ``~/.cache/difflora/bases/NAME``) and prints that run
directory. Run again, it reuses a finished base (nothing is trained), resumes an unfinished one
from its newest checkpoint (bit-identical to an uninterrupted run), and refuses a cached base that
was trained with another config (delete the directory, or train the variant with ``difflora
train``). Studies adapt it with ``train.init_from: pretrained:NAME`` (the base's final checkpoint;
an unfinished base is an error) or with the printed path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from difflora.config.schema import Config
from difflora.train import train
from difflora.train.base import pretrained_run_dir
from difflora.train.checkpoint import find_checkpoints

__all__ = ["pretrain"]


def pretrain(name: str, cfg: Config, *, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train (or reuse, or resume) the shared base ``name`` with config ``cfg``; returns its run directory."""
    out = pretrained_run_dir(name)
    resume = bool(find_checkpoints(out))
    try:
        train(cfg, out, resume=resume, progress=progress, log=log)
    except ValueError as exc:
        if "cannot resume with a different config" in str(exc):
            raise ValueError(
                f"the cached base {out} was trained with another config ({exc}); delete {out} to retrain it "
                f"with this one, or train the variant elsewhere with `difflora train`"
            ) from None
        raise
    return out
