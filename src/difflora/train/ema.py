"""Exponential moving average of a model's trainable weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * param`` for every trainable parameter of a model.

    Only parameters with ``requires_grad`` are shadowed: a frozen tensor's average is itself, so
    adapter training on a frozen base keeps one copy of the base, not two. Keys are the
    parameters' names in ``model.state_dict()``.

    The effective decay is ``min(decay, (1 + n) / (10 + n))`` after n updates, so that short runs
    (the CPU presets train for a few thousand steps) do not average in their random initialisation;
    with the paper's 500k steps this warm-up is irrelevant and 0.9999 is what IDDPM used.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[k] for k in self.shadow]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.num_updates += 1
        torch._foreach_lerp_(list(self.shadow.values()), [p.detach() for p in self._params(model)], 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, shadow: dict[str, torch.Tensor], num_updates: int) -> None:
        differ = set(self.shadow) ^ set(shadow)
        if differ:
            raise ValueError(
                f"EMA state does not match the model's trainable parameters; differing keys: {sorted(differ)[:5]}"
            )
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.num_updates = num_updates

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block ``model`` holds the EMA weights; on exit (also on error) its own are back.

        The swap exchanges tensors, it copies nothing: no second model, no extra memory, and the
        parameters get their original storages back bit for bit. Do not step an optimizer inside.
        """
        params = self._params(model)
        self._swap(params)
        try:
            yield model
        finally:
            self._swap(params)

    def _swap(self, params: list[torch.Tensor]) -> None:
        for key, p in zip(list(self.shadow), params, strict=True):
            own = p.data
            p.data = self.shadow[key]
            self.shadow[key] = own
