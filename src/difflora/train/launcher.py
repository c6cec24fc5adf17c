"""The flags of ``accelerate launch``, honoured or refused: never silently ignored.

``accelerate launch [flags] -m difflora train CONFIG`` does not pass its flags to the command; it
puts them in the environment of every process it starts (``accelerate.utils.launch``). difflora
does not use accelerate's ``Accelerator``, so each flag that changes training is read here and
mapped onto the config key that does the same thing:

=====================================  =====================================================
``--mixed_precision fp16|bf16``        ``train.precision``, ``auto`` included (``no``: the
                                       launcher's default, the config decides); ``fp8``: refused
``--cpu``                              ``train.device=cpu``
``--dynamo_backend inductor``          ``train.compile=true``; other backends: refused
``--use_deepspeed``, ``--use_fsdp``    refused: difflora shards nothing, it trains with DDP
=====================================  =====================================================

A flag meets the config through :func:`~difflora.config.base.hold_fixed`: a key the config leaves
at its default takes the flag's value (and the run's ``config.json`` records it); a key the config
sets to another value is a one-line error naming both. ``--num_processes`` and the rendezvous
flags need nothing here: they arrive as torchrun's variables (:mod:`difflora.train.distributed`).
"""

from __future__ import annotations

from collections.abc import Mapping

from difflora.config.base import hold_fixed
from difflora.config.schema import Config

__all__ = ["accelerate_flags"]

_PRECISIONS = {"fp16", "bf16"}
# accelerate writes booleans as str(bool) ("True") or "true".
_TRUE = {"true", "1", "yes"}


def _refuse_sharding(env: Mapping[str, str]) -> None:
    for var, flag in (("ACCELERATE_USE_DEEPSPEED", "--use_deepspeed"), ("ACCELERATE_USE_FSDP", "--use_fsdp")):
        if env.get(var, "").lower() in _TRUE:
            raise ValueError(
                f"accelerate launch {flag}: difflora trains with DDP and shards nothing; launch without {flag}"
            )


def accelerate_flags(cfg: Config, env: Mapping[str, str]) -> tuple[Config, list[str]]:
    """``cfg`` with the flags ``accelerate launch`` left in ``env`` applied (a copy; ``cfg`` as it is
    when there are none), and one line per key a flag set. A flag difflora cannot honour, or one
    the config contradicts, is a ValueError naming the flag and the fix."""
    _refuse_sharding(env)
    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed not in _PRECISIONS | {"no"}:
        raise ValueError(
            f"accelerate launch --mixed_precision {mixed}: difflora trains in fp32, bf16 or fp16; "
            "launch with --mixed_precision bf16, fp16 or no"
        )
    backend = env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if backend not in ("no", "inductor"):
        raise ValueError(
            f"accelerate launch --dynamo_backend {backend}: difflora compiles with inductor only "
            "(train.compile); launch with --dynamo_backend inductor or no"
        )
    fixed: dict[str, tuple[object, str]] = {}
    if mixed in _PRECISIONS:
        fixed["precision"] = (mixed, f"--mixed_precision {mixed}")
    if env.get("ACCELERATE_USE_CPU", "").lower() in _TRUE and cfg.train.device != "cpu":
        fixed["device"] = ("cpu", "--cpu")
    if backend == "inductor":
        fixed["compile"] = (True, "--dynamo_backend inductor")
    if not fixed:
        return cfg, []
    cfg = cfg.model_copy(deep=True)
    notes = []
    for key, (value, flag) in fixed.items():
        if getattr(cfg.train, key) == value:
            continue
        if key in ("device", "precision") and getattr(cfg.train, key) == "auto":
            setattr(cfg.train, key, value)  # auto leaves the choice open: the launcher's flag makes it
        else:
            hold_fixed(cfg.train, "train", {key: value}, f"accelerate launch {flag}")
        notes.append(f"accelerate launch {flag}: train.{key}={str(value).lower()}")
    return cfg, notes
